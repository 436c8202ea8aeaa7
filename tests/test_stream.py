"""stream.py on real tar shards: URL specs, splitting, corrupt samples and the resumable training stream."""

from __future__ import annotations

import functools
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import stream
from pipeline.errors import UserError


def jpeg(seed: int) -> bytes:
    """A 24x20 noise JPEG, different for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in members:
            writer.write(sample)
    return str(path)


def good(key: str, seed: int, label: int = 0) -> dict:
    return {"__key__": key, "jpg": jpeg(seed), "cls": str(label).encode()}


@pytest.fixture
def uneven_shards(tmp_path) -> list[str]:
    """Three shards of 7, 3 and 20 JPEG samples."""
    sizes, urls, seed = (7, 3, 20), [], 0
    for shard, size in enumerate(sizes):
        members = []
        for _ in range(size):
            members.append(good(f"{seed:05d}", seed, seed % 3))
            seed += 1
        urls.append(write_tar(tmp_path / f"shard-{shard:06d}.tar", members))
    return urls


def crop_views(image) -> tuple[torch.Tensor, torch.Tensor]:
    """A small deterministic-given-the-seed transform: two random 16x16 crops, normalised."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    views = []
    for _ in range(2):
        top, left = torch.randint(0, pixels.shape[1] - 15, ()).item(), torch.randint(0, pixels.shape[2] - 15, ()).item()
        views.append((pixels[:, top : top + 16, left : left + 16] - 0.5) / 0.25)
    return views[0], views[1]


def loader(urls, **overrides):
    options = dict(transform=crop_views, per_rank_batch=4, steps=8, start_step=0, epoch=0, seed=7, rank=0,
                   world_size=1, workers=2, shuffle_buffer=6, max_corrupt_fraction=0.01)
    return stream.train_loader(urls, **{**options, **overrides})


def keyed(samples) -> list[tuple[str, bytes]]:
    return [(s["__key__"], s["jpg"]) for s in samples]


# ---------------------------------------------------------------- specs and splitting


def test_specs_expand_and_read_the_same_samples(uneven_shards, tmp_path):
    folder = str(tmp_path)
    reference = keyed(stream.iter_samples(uneven_shards, stream.CorruptCounter()))
    assert len(reference) == 30
    specs = [
        folder,
        f"{folder}/shard-{{000000..000002}}.tar",
        "::".join(uneven_shards),
        "::".join(f"pipe:cat {u}" for u in uneven_shards),
        f"pipe:cat {folder}/shard-{{000000..000002}}.tar",
    ]
    for spec in specs:
        urls = stream.expand_urls(spec)
        assert len(urls) == 3, spec
        counter = stream.CorruptCounter()
        assert keyed(stream.iter_samples(urls, counter)) == reference, spec
        assert counter.shard_errors == 0


def test_http_urls_read_the_same_samples(uneven_shards, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            urls = stream.expand_urls(f"http://127.0.0.1:{server.server_port}/shard-{{000000..000002}}.tar")
            samples = keyed(stream.iter_samples(urls, stream.CorruptCounter()))
        finally:
            server.shutdown()
    assert samples == keyed(stream.iter_samples(uneven_shards, stream.CorruptCounter()))
    assert stream.read_index(urls[0]) is None  # remote: no index beside it


def test_bad_specs_give_one_sentence(uneven_shards, tmp_path):
    with pytest.raises(UserError, match=r"shard .*shard-000003\.tar does not exist$"):
        stream.expand_urls(f"{tmp_path}/shard-{{000000..000009}}.tar")
    with pytest.raises(UserError, match=r"^cannot open nope:// locations"):
        stream.expand_urls("nope://bucket/a.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .tar shards"):
        stream.expand_urls(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no data given"):
        stream.expand_urls(" :: ")


def test_read_index_counts_the_selected_shards(fmnist_shards):
    full = stream.read_index(str(fmnist_shards))
    assert full["count"] == 200 and full["counts"] == [48, 48, 48, 48, 8] and len(full["classes"]) == 10
    part = stream.read_index(f"{fmnist_shards}/shard-{{000003..000004}}.tar")
    assert part["count"] == 56 and part["shards"] == [str(fmnist_shards / f"shard-00000{i}.tar") for i in (3, 4)]


def test_split_by_node_gives_disjoint_covering_shares():
    for n_urls in (1, 5, 12):
        urls = [f"shard-{i}.tar" for i in range(n_urls)]
        for world in (1, 2, 3, 8):
            shares = [stream.split_by_node(urls, rank, world) for rank in range(world)]
            flat = [u for share in shares for u in share]
            assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


class _WorkerShares(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield stream.split_by_worker([f"shard-{i}.tar" for i in range(7)])


def test_split_by_worker_inside_dataloader_workers():
    assert stream.split_by_worker(["a", "b"]) == ["a", "b"]  # main process: everything
    shares = list(torch.utils.data.DataLoader(_WorkerShares(), batch_size=None, num_workers=2))
    flat = [u for share in shares for u in share]
    assert len(shares) == 2 and sorted(flat) == sorted(f"shard-{i}.tar" for i in range(7)) and len(set(flat)) == 7


# ---------------------------------------------------------------- corrupt data


def test_decode_and_label_reject_corrupt_samples():
    truncated = jpeg(1)[:150]
    cases = {
        "garbage": {"__key__": "a", "jpg": b"\x00not a jpeg at all"},
        "truncated": {"__key__": "b", "jpg": truncated},
        "no image": {"__key__": "c", "txt": b"hello"},
    }
    for name, sample in cases.items():
        with pytest.raises(stream.CorruptSample):
            stream.decode_rgb(sample)
    assert stream.decode_rgb(good("d", 2)).mode == "RGB"
    assert stream.label_of({"cls": b" 7\n"}) == 7 and stream.label_of({}) is None
    with pytest.raises(stream.CorruptSample):
        stream.label_of({"cls": b"seven"})


def test_unreadable_shards_are_counted_and_skipped(uneven_shards, tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    counter = stream.CorruptCounter()
    urls = [str(garbage), uneven_shards[0], str(tmp_path / "gone.tar"), f"pipe:cat {tmp_path}/gone.tar", uneven_shards[1]]
    samples = list(stream.iter_samples(urls, counter))
    assert len(samples) == 10 and counter.shard_errors >= 3


def test_corrupt_samples_are_skipped_and_counted_and_training_continues(tmp_path):
    members = [good(f"{i:04d}", i) for i in range(40)]
    members[5] = {"__key__": "0005", "jpg": b"garbage bytes, not a jpeg"}
    members[17] = {"__key__": "0017", "jpg": jpeg(17)[:120]}  # truncated JPEG
    urls = [write_tar(tmp_path / "shard-000000.tar", members)]
    batches = list(loader(urls, steps=12, max_corrupt_fraction=0.2, shuffle_buffer=0, workers=1))
    assert len(batches) == 12 and all(b[0].shape == (4, 3, 16, 16) for b in batches)
    seen, corrupt = sum(b[2] for b in batches), sum(b[3] for b in batches)
    assert seen == 48 + corrupt and corrupt >= 2  # every batch full; the bad samples were counted


def test_too_many_corrupt_samples_stop_the_run_with_one_sentence(tmp_path):
    members = [good(f"{i:04d}", i) if i % 2 else {"__key__": f"{i:04d}", "jpg": b"junk"} for i in range(40)]
    urls = [write_tar(tmp_path / "shard-000000.tar", members)]
    with pytest.raises(UserError) as failure:
        list(loader(urls, steps=50, workers=2, min_samples=20))
    message = str(failure.value)
    assert "\n" not in message  # the worker's error, not a wrapped traceback
    assert message.endswith("are corrupt, above the limit of 1 % (data.max_corrupt_fraction)")
    counter = stream.CorruptCounter()
    counter.add(1000, 10)
    counter.check(0.01)  # exactly at the limit is allowed
    counter.add(0, 1)
    with pytest.raises(UserError, match=r"^11 of 1000 samples \(1\.1 %\) are corrupt"):
        counter.check(0.01)


def test_all_shards_unreadable_stop_the_run(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="none of the 1 shards could be read"):
        list(loader([str(bad)], workers=0))


# ---------------------------------------------------------------- the training stream


def test_exact_step_count_with_two_workers_and_uneven_shards(uneven_shards):
    batches = list(loader(uneven_shards, steps=7, per_rank_batch=5))
    assert len(batches) == 7 and len(loader(uneven_shards, steps=7, start_step=2)) == 5
    assert all(b[0].shape == b[1].shape == (5, 3, 16, 16) and b[2] == 5 and b[3] == 0 for b in batches)
    assert not torch.equal(batches[0][0], batches[0][1])  # two different views


def test_resumed_run_sees_bit_identical_batches(uneven_shards):
    for workers in (2, 0):
        full = list(loader(uneven_shards, workers=workers))
        resumed = list(loader(uneven_shards, workers=workers, start_step=3))
        assert len(full) == 8 and len(resumed) == 5
        for a, b in zip(full[3:], resumed):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]
        assert not torch.equal(full[3][0], full[4][0])


def test_in_process_stream_equals_one_worker_and_leaves_the_global_rng_alone(uneven_shards):
    before = torch.get_rng_state()
    in_process = list(loader(uneven_shards, workers=0, steps=3))
    assert torch.equal(torch.get_rng_state(), before)
    one_worker = list(loader(uneven_shards, workers=1, steps=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(in_process, one_worker))


def test_ranks_and_epochs_get_different_batches(uneven_shards):
    rank0 = list(loader(uneven_shards, steps=2, world_size=2, rank=0))
    rank1 = list(loader(uneven_shards, steps=2, world_size=2, rank=1))
    epoch1 = list(loader(uneven_shards, steps=2, world_size=2, rank=0, epoch=1))
    for other in (rank1, epoch1):
        assert all(not torch.equal(a[0], b[0]) for a, b in zip(rank0, other))


def test_every_sample_gets_its_own_augmentation(tmp_path):
    urls = [write_tar(tmp_path / "same.tar", [{"__key__": f"{i:02d}", "jpg": jpeg(0)} for i in range(8)])]
    (batch,) = loader(urls, steps=1, per_rank_batch=8, workers=0)
    distinct = {tuple(view.flatten().tolist()) for view in batch[0]}
    assert len(distinct) >= 4  # one image, eight different crops
