"""barlow embed: parts and manifest, the served embedding, resumability after kill -9, --part-of shares,
incremental re-runs by source identity, undecodable images and unreadable shards, image folders and
path lists, clear CLI errors. tests/test_embed_s3.py runs the same against a real S3 endpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.data.preprocess import load_array
from pipeline.data.shards import write_shards
from pipeline.embed.embed import Listing, Source, embed, list_sources, make_plan, parse_part_of, shard_stem
from pipeline.embed.parts import Parts, find_parts
from pipeline.errors import UserError

from helpers_embed import other_model, read_rows, shared_embeddings, shared_model, tar_keys, write_tar

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model(tmp_path_factory)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory, model_dir, fmnist_shards):
    return shared_embeddings(tmp_path_factory, model_dir, fmnist_shards)


def jpeg(seed: int, size=(40, 30)) -> bytes:
    from helpers_serving import encode, photo

    return encode(photo(seed, size), "JPEG", quality=90)


# ---------------------------------------------------------------- pure functions


def test_part_of_shares_are_disjoint_cover_every_shard_and_do_not_depend_on_what_is_written():
    listing = Listing(True, [Source(f"/data/s{i:02d}.tar", f"size:{i}") for i in range(23)])
    for n in range(1, 8):
        shares = [make_plan(listing, Parts(), "sha", (i, n), prune=False).units for i in range(n)]
        urls = [u.sources[0].url for units in shares for u in units]
        assert sorted(urls) == sorted(s.url for s in listing.sources) and len(urls) == len(set(urls))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1, "balanced"
    # Share 1 of 2 plans the same whether or not share 0 has already written its parts.
    from pipeline.embed.parts import Part

    first = make_plan(listing, Parts(), "sha", (0, 2), prune=False).units
    written = Parts(live={u.name: Part(u.name, f"/emb/{u.name}", {"sources": dict(u.covers)}) for u in first})
    assert make_plan(listing, written, "sha", (1, 2), False).units == make_plan(listing, Parts(), "sha", (1, 2), False).units


def test_a_plan_embeds_new_and_changed_sources_and_supersedes_the_parts_it_touches():
    from pipeline.embed.parts import Part

    old = Listing(False, [Source(f"s3://b/i/{k}.jpg", f"etag:{k}", k) for k in "abcd"])
    units = make_plan(old, Parts(), "sha", (0, 1), False, per_part=2).units
    assert [[s.key for s in u.sources] for u in units] == [["a", "b"], ["c", "d"]]
    parts = Parts(live={u.name: Part(u.name, f"/emb/{u.name}", {"sources": dict(u.covers), "unit": u.stem})
                        for u in units})
    now = Listing(False, [Source("s3://b/i/a.jpg", "etag:a2", "a"), *old.sources[1:3],
                          Source("s3://b/i/e.jpg", "etag:e", "e")])  # a changed, d gone, e new
    plan = make_plan(now, parts, "sha", (0, 1), prune=False, per_part=2)
    assert (plan.new, plan.changed, plan.unchanged, plan.gone) == (1, 1, 2, ["s3://b/i/d.jpg"])
    rewrite, added = plan.units
    assert [s.key for s in rewrite.sources] == ["a"] and rewrite.replaces == (units[0].name,)
    assert rewrite.drop == {"s3://b/i/a.jpg"} and dict(rewrite.covers)["s3://b/i/b.jpg"] == "etag:b"
    assert [s.key for s in added.sources] == ["e"] and not added.replaces
    assert not plan.deletions, "without --prune a vanished source is only reported"
    pruned = make_plan(now, parts, "sha", (0, 1), prune=True, per_part=2)
    carry = next(u for u in pruned.units if u.replaces == (units[1].name,))
    assert carry.sources == () and carry.drop == {"s3://b/i/d.jpg"} and dict(carry.covers) == {"s3://b/i/c.jpg": "etag:c"}


def test_part_of_defaults_to_the_indexed_job_environment():
    assert parse_part_of(None, {}) == (0, 1)
    assert parse_part_of(None, {"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "3"}) == (2, 3)
    assert parse_part_of("1/4", {"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "3"}) == (1, 4), "the flag wins"
    with pytest.raises(UserError, match="JOB_COMPLETIONS is not"):
        parse_part_of(None, {"JOB_COMPLETION_INDEX": "0"})
    for bad in ("2/2", "-1/3", "a/b", "3", "1/0"):
        with pytest.raises(UserError, match="i/n|outside"):
            parse_part_of(bad, {})


def test_part_names_come_from_shard_stems_and_the_sources_they_cover():
    from pipeline.embed.parts import part_name

    assert shard_stem("/d/shard-000001.tar") == "shard-000001"
    assert shard_stem("pipe:aws s3 cp s3://bucket/x/shard-000007.tar -") == "shard-000007"
    assert shard_stem("https://host/data/00042.tar?token=1") == "00042"
    names = {part_name("shard-000000", {url: "size:1"}, "sha") for url in ("train/shard-000000.tar",
                                                                           "test/shard-000000.tar")}
    assert len(names) == 2 and all(n.startswith("part-shard-000000-") for n in names), "same stem, other shard"
    assert part_name("s", {"u": "etag:1"}, "sha") != part_name("s", {"u": "etag:2"}, "sha"), "changed content"


# ---------------------------------------------------------------- a real run over Fashion-MNIST shards


@pytest.mark.slow
def test_parts_hold_every_image_once_with_schema_dim_and_the_served_embedding(emb_dir, model_dir, fmnist_shards):
    from pipeline.runtime import OnnxModel, l2_normalize
    from serving.requests import preprocess_all  # exactly what /embed runs

    shards = sorted(fmnist_shards.glob("shard-*.tar"))
    parts = sorted(emb_dir.glob("part-*.parquet"))
    assert [p.name.rsplit("-", 1)[0] for p in parts] == [f"part-{s.stem}" for s in shards]
    assert not list(emb_dir.glob("*.tmp")) and not list(emb_dir.glob(".*"))
    for shard, part in zip(shards, parts):
        table = pq.read_table(part)
        assert table.schema.remove_metadata() == pa.schema([
            ("key", pa.string()), ("source", pa.string()), ("label", pa.int32()), ("shard", pa.string()),
            ("embedding", pa.list_(pa.float32(), 512))])
        assert table.column("key").to_pylist() == tar_keys(shard), "every sample, in shard order"
        assert set(table.column("shard").to_pylist()) == {str(shard.resolve())}, "where thumbnails read the members"
    rows = read_rows(emb_dir)
    assert len(rows["key"]) == len(set(rows["key"])) == 200
    assert rows["source"][:2] == ["fashion-mnist:test/0", "fashion-mnist:test/1"]
    from pipeline.data.fashion_mnist import read_fashion_mnist

    images, labels = read_fashion_mnist("test")
    assert rows["label"] == labels[:200].tolist()
    vectors = np.array(rows["embedding"], dtype=np.float32)
    assert vectors.shape == (200, 512) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.abs(vectors - vectors[0]).max() > 1e-3, "different images, different embeddings"

    # The same PNG bytes through /embed's code path give the same (normalised) embedding.
    import tarfile

    with tarfile.open(shards[1]) as tar:
        blobs = [tar.extractfile(f"{key}.png").read() for key in tar_keys(shards[1])[:5]]
    served = l2_normalize(OnnxModel(model_dir, "cpu")(preprocess_all(blobs, 32, 40_000_000)))
    first = rows["key"].index(tar_keys(shards[1])[0])
    assert np.abs(vectors[first:first + 5] - served).max() < 1e-5

    manifest = json.loads((emb_dir / "manifest.json").read_text())
    model = json.loads((model_dir / "model.json").read_text())
    assert manifest["model"]["sha256"] == model["onnx_sha256"] and manifest["model"]["dim"] == 512
    assert manifest["count"] == 200 and manifest["failed"] == 0 and manifest["failures"] == []
    assert [p["part"] for p in manifest["parts"]] == [p.name for p in parts]
    assert sum(p["count"] for p in manifest["parts"]) == 200
    run = manifest["runs"]["part-of-0-1"]
    assert run["images"] == 200 and run["parts_written"] == 5 and run["images_per_s"] > 0 and run["duration_s"] > 0
    assert run["new"] == 5 and run["changed"] == run["unchanged"] == run["disappeared"] == 0


@pytest.mark.slow
def test_rerun_skips_complete_parts_and_a_different_model_is_refused(emb_dir, model_dir, fmnist_shards, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in emb_dir.glob("part-*.parquet")}
    manifest = embed(model_dir, str(fmnist_shards), emb_dir)
    assert {p.name: p.stat().st_mtime_ns for p in emb_dir.glob("part-*.parquet")} == before, "nothing rewritten"
    run = manifest["this_run"]
    assert manifest["count"] == 200 and (run["unchanged"], run["new"], run["images"]) == (5, 0, 0), "this run's numbers"

    other = other_model(model_dir, tmp_path / "other")
    with pytest.raises(UserError, match="another model"):
        embed(other, str(fmnist_shards), emb_dir)
    assert {p.name: p.stat().st_mtime_ns for p in emb_dir.glob("part-*.parquet")} == before


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_every_key_exactly_once(model_dir, fashion_mnist, tmp_path):
    data = tmp_path / "shards"
    write_shards("fashion-mnist:test", data, per_shard=16, limit=160)  # 10 shards
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "pipeline.cli", "embed", str(model_dir), "--data", str(data), "--out", str(out),
               "--batch-size", "4", "--workers", "1", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the pod dies: main process and decode worker at once
        process.wait()
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 1 <= len(done) < 10, f"killed mid-run (parts {done})"
    for part in done:  # what survived a kill is complete
        assert pq.read_table(out / part).num_rows == 16

    manifest = embed(model_dir, str(data), out, batch_size=8, workers=1)
    keys = read_rows(out)["key"]
    expected = [key for shard in sorted(data.glob("*.tar")) for key in tar_keys(shard)]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == 160
    assert manifest["count"] == 160 and manifest["this_run"]["unchanged"] == len(done)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".part-*"))


@pytest.mark.slow
def test_part_of_runs_into_one_folder_cover_every_key_once(model_dir, fmnist_shards, tmp_path):
    out = tmp_path / "emb"
    parts = []
    for i in range(2):
        assert cli.main(["embed", str(model_dir), "--data", str(fmnist_shards), "--out", str(out),
                         "--part-of", f"{i}/2", "--workers", "1", "--batch-size", "48"]) == 0
        parts.append({p.name for p in out.glob("part-*.parquet")} - set().union(*parts))
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    keys = read_rows(out)["key"]
    assert len(keys) == len(set(keys)) == 200
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["runs"]) == {"part-of-0-2", "part-of-1-2"} and manifest["count"] == 200


@pytest.mark.slow
def test_undecodable_images_are_listed_with_a_reason_and_skipped(model_dir, tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    good = jpeg(1)
    write_tar(data / "mixed.tar", [
        {"__key__": "good-1", "jpg": good, "cls": b"3"},
        {"__key__": "truncated", "jpg": good[: len(good) // 2]},
        {"__key__": "garbage", "jpg": b"this is not an image"},
        {"__key__": "empty", "png": b""},
        {"__key__": "no-image", "txt": b"a caption without its image"},
        {"__key__": "good-2", "png": jpeg(2)},  # JPEG bytes under .png: decoded by content, as /embed does
    ])
    manifest = embed(model_dir, str(data), tmp_path / "emb", workers=0)
    table = pq.read_table(next((tmp_path / "emb").glob("part-mixed-*.parquet"))).to_pydict()
    assert table["key"] == ["good-1", "good-2"] and table["label"] == [3, None]
    reasons = {f["key"]: f["reason"] for f in manifest["failures"]}
    assert set(reasons) == {"truncated", "garbage", "empty", "no-image"} and manifest["failed"] == 4
    assert "truncated" in reasons["truncated"].lower() and "not a readable" in reasons["garbage"]
    assert "empty" in reasons["empty"] and "no image member" in reasons["no-image"]
    assert all(f["source"] == str(data / "mixed.tar") for f in manifest["failures"])


@pytest.mark.slow
def test_an_unreadable_shard_gets_no_part_and_a_rerun_retries_it(model_dir, fmnist_shards, tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    shutil.copy(fmnist_shards / "shard-000000.tar", data / "a.tar")
    whole = (fmnist_shards / "shard-000001.tar").read_bytes()
    (data / "b.tar").write_bytes(whole[: len(whole) // 2])  # a download cut short
    out = tmp_path / "emb"
    with pytest.raises(UserError, match="1 of 2 shards could not be read .*b.tar"):
        embed(model_dir, str(data), out, workers=2)
    assert [p.name.rsplit("-", 1)[0] for p in out.glob("*.parquet")] == ["part-a"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"]["part-of-0-1"]["unreadable_shards"][0]["shard"] == str(data / "b.tar")

    (data / "b.tar").write_bytes(whole)
    manifest = embed(model_dir, str(data), out, workers=2)
    run = manifest["this_run"]
    assert manifest["count"] == 96 and run["unreadable_shards"] == [] and run["parts_written"] == 1


@pytest.mark.slow
def test_image_folders_and_path_lists_are_embedded_like_shards(model_dir, tmp_path):
    from pipeline.runtime import OnnxModel, l2_normalize

    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    (folder / "dogs").mkdir()
    blobs = {"cats/a.jpg": jpeg(1), "cats/b c.jpeg": jpeg(2), "dogs/d.png": jpeg(3), "top.jpg": jpeg(4)}
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    (folder / "notes.txt").write_text("not an image, not counted")
    (folder / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 broken")

    listing = list_sources(str(folder))
    assert [s.key for s in listing.sources] == ["cats/a", "cats/b_c", "dogs/broken", "dogs/d", "top"]
    assert listing.ignored == 1, "notes.txt: not an image by extension, counted"
    manifest = embed(model_dir, str(folder), tmp_path / "emb-folder", workers=1, files_per_part=3)
    rows = read_rows(tmp_path / "emb-folder")
    assert rows["key"] == ["cats/a", "cats/b_c", "dogs/d", "top"], "sorted walk, keys as barlow shards makes them"
    assert rows["source"] == [str(folder / n) for n in ("cats/a.jpg", "cats/b c.jpeg", "dogs/d.png", "top.jpg")]
    assert rows["label"] == [None] * 4
    assert [f["key"] for f in manifest["failures"]] == ["dogs/broken"]

    listing = tmp_path / "list.txt"
    listing.write_text("# queries\nphotos/top.jpg\n" + f"{folder / 'cats' / 'a.jpg'}\n\n")
    embed(model_dir, str(listing), tmp_path / "emb-list", workers=0)
    listed = read_rows(tmp_path / "emb-list")
    assert listed["source"] == [str(tmp_path / "photos/top.jpg"), str(folder / "cats/a.jpg")]
    assert len(list((tmp_path / "emb-list").glob("part-*.parquet"))) == 1
    arrays = np.stack([load_array(blobs[name], 32) for name in ("top.jpg", "cats/a.jpg")])
    expected = l2_normalize(OnnxModel(model_dir, "cpu")(arrays))
    assert np.abs(np.array(listed["embedding"]) - expected).max() < 1e-5
    by_key = dict(zip(rows["key"], rows["embedding"]))
    assert np.abs(np.array(by_key["top"]) - np.array(listed["embedding"][0])).max() < 1e-5


def test_cli_errors_are_one_sentence(tmp_path, capsys):
    assert cli.main(["embed", str(tmp_path / "no-model"), "--data", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "has no model.onnx" in capsys.readouterr().err
    assert cli.main(["embed", str(tmp_path), "--data", "x", "--out", str(tmp_path / "e"), "--part-of", "2/2"]) == 2
    assert "outside 0 <= i < n" in capsys.readouterr().err
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "model.json").write_text(json.dumps({"format": "barlow-embed/model/1", "name": "m", "dim": 4,
                                                     "image_size": 8, "onnx_sha256": "0" * 64}))
    assert cli.main(["embed", str(tmp_path), "--data", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli.main(["embed", str(tmp_path), "--data", str(tmp_path), "--out", "https://host/emb"]) == 2
    assert "read-only" in capsys.readouterr().err


@pytest.mark.slow
def test_a_kill_between_writing_a_superseding_part_and_deleting_the_old_one_loses_and_repeats_nothing(
        model_dir, tmp_path, monkeypatch):
    from pipeline.embed import embed as embed_module

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"p{i}.jpg").write_bytes(jpeg(i))
    out = tmp_path / "emb"
    embed(model_dir, str(folder), out, workers=0)
    before = dict(zip(*(read_rows(out)[c] for c in ("key", "embedding"))))

    (folder / "p2.jpg").write_bytes(jpeg(20))  # changed: its part is superseded by a new one
    monkeypatch.setattr(embed_module, "remove_parts", lambda locations: 0)  # the pod dies before deleting
    embed(model_dir, str(folder), out, workers=0)
    monkeypatch.undo()
    assert len(list(out.glob("part-*.parquet"))) == 2, "old and new part both on disk"
    parts = find_parts(str(out))
    assert len(parts.live) == 1 and len(parts.dead) == 1, "the superseded part is not read"
    rows = read_rows(out)
    assert sorted(rows["key"]) == [f"p{i}" for i in range(5)]
    after = dict(zip(rows["key"], rows["embedding"]))
    assert after["p2"] != before["p2"] and all(after[k] == before[k] for k in before if k != "p2")

    manifest = embed(model_dir, str(folder), out, workers=0)  # the next run finishes the deletion
    assert len(list(out.glob("part-*.parquet"))) == 1 and manifest["count"] == 5
    assert manifest["this_run"]["unchanged"] == 5 and manifest["superseded_awaiting_deletion"] == []
