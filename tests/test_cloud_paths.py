"""Bucket URLs in the commands' paths, against a real S3 endpoint (moto on 127.0.0.1) and real tar shards:
train's data stream, `barlow shards` in and out of a bucket, `barlow export` to a bucket and serving from it."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipeline import cli, storage
from pipeline.data import shards, stream
from pipeline.data.preprocess import load_array
from pipeline.errors import UserError
from pipeline.serve import MODEL_FILES, start_server
from pipeline.storage import local_copy

from helpers_serving import log_tail, make_run_dir, torch_embed, torch_reference

BUCKET = "data"


def upload(s3, folder: Path, prefix: str, bucket: str = BUCKET) -> str:
    """Every file of `folder` under s3://bucket/prefix/ (the bucket made first); returns that URL."""
    client = s3.client()
    if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def keys_in(s3, prefix: str, bucket: str = BUCKET) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix) + 1 :] for o in listed)


def read(urls: list[str]) -> list[tuple]:
    """(key, image bytes, label) of every sample, with no shard error."""
    counter = stream.CorruptCounter()
    samples = [(s["__key__"], s.get("jpg", s.get("png")), s.get("cls")) for s in stream.iter_samples(urls, counter)]
    assert counter.shard_errors == 0, counter.first_shard_error
    return samples


@pytest.fixture
def image_folder(tmp_path, image_bytes) -> Path:
    """cat/ (with a sub-folder) and dog/: 24 small JPEG and PNG images, one unreadable file, one hidden one."""
    root = tmp_path / "images"
    for i in range(24):
        folder = root / ("cat" if i % 2 else "dog") / ("nested" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:02d}.{'png' if i % 3 else 'jpg'}").write_bytes(image_bytes(i, "PNG" if i % 3 else "JPEG"))
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.jpg").write_bytes(b"ignored")
    return root


@pytest.fixture
def local_shards(image_folder, tmp_path) -> Path:
    """3 shards of 8 samples and index.json, on disk."""
    out = tmp_path / "shards"
    shards.write_shards(str(image_folder), out, per_shard=8)
    return out


# ---------------------------------------------------------------- train's data stream


def test_bucket_shards_read_like_their_local_copies(s3, local_shards):
    url = upload(s3, local_shards, "shards")
    local = sorted(str(p) for p in local_shards.glob("*.tar"))
    reference = read(local)
    assert len(reference) == 24
    for spec in (url, url + "/", f"{url}/shard-{{000000..000002}}.tar",
                 f"{url}/shard-000000.tar::{url}/shard-00000{{1,2}}.tar"):
        urls = stream.expand_urls(spec)
        assert urls == [f"{url}/shard-00000{i}.tar" for i in range(3)], spec
        assert read(urls) == reference, spec
    assert read(stream.expand_urls(f"{url}/shard-000001.tar")) == read(local[1:2])

    index = stream.read_index(url)
    assert index["count"] == 24 and index["counts"] == [8, 8, 8] and index["classes"] == ["cat", "dog"]
    assert index["shards"] == [f"{url}/shard-00000{i}.tar" for i in range(3)]
    part = stream.read_index(f"{url}/shard-{{000001..000002}}.tar")
    assert part["count"] == 16 and part["shards"] == [f"{url}/shard-00000{i}.tar" for i in (1, 2)]

    # The training stream in forked DataLoader workers: each makes its own S3 client; same batches as from disk.
    def batches(urls):
        loader = stream.train_loader(urls, transform=None, per_rank_batch=4, steps=6, start_step=0, epoch=0, seed=3,
                                     rank=0, world_size=1, workers=2, shuffle_buffer=8, max_corrupt_fraction=0.0)
        return [(b.data.numpy().tobytes(), b.labels.tolist(), b.seen, b.corrupt) for b in loader]

    assert batches(stream.expand_urls(url)) == batches(local)


def test_truncated_or_vanished_objects_are_shard_errors(s3, local_shards):
    url = upload(s3, local_shards, "shards")
    whole = (local_shards / "shard-000001.tar").read_bytes()
    with tarfile.open(local_shards / "shard-000001.tar") as tar:
        member = tar.getmembers()[9]  # cut inside a member's bytes, as an interrupted upload would
    s3.client().put_object(Bucket=BUCKET, Key="shards/shard-000001.tar", Body=whole[: member.offset_data + 10])
    counter = stream.CorruptCounter()
    urls = stream.expand_urls(url) + [f"{url}/gone.tar"]
    samples = list(stream.iter_samples(urls, counter))
    assert 16 <= len(samples) < 24 and counter.shard_errors == 2
    assert all(s.get("jpg") or s.get("png") for s in samples)  # no sample cut in half
    assert counter.first_shard_error.startswith("ReadError")
    # A training stream over a truncated shard keeps going: the error is counted, not raised.
    loader = stream.train_loader([f"{url}/shard-000001.tar"], transform=None, per_rank_batch=2, steps=3,
                                 start_step=0, epoch=0, seed=0, rank=0, world_size=1, workers=0, shuffle_buffer=0,
                                 max_corrupt_fraction=0.0)
    assert len(list(loader)) == 3


def test_missing_bucket_prefix_or_shard_is_one_sentence(s3, local_shards):
    url = upload(s3, local_shards, "shards")
    s3.client().put_object(Bucket=BUCKET, Key="loose/readme.txt", Body=b"no shards here")
    cases = [
        ("s3://nobucket/shards", r"^the bucket of s3://nobucket/shards does not exist"),
        (f"{url}/shard-{{000000..000003}}.tar", rf"^shard {url}/shard-000003\.tar does not exist$"),
        (f"s3://{BUCKET}/elsewhere", rf"^s3://{BUCKET}/elsewhere does not exist$"),
        (f"s3://{BUCKET}/loose", rf"^no \.tar shards in s3://{BUCKET}/loose$"),
    ]
    for spec, message in cases:
        with pytest.raises(UserError, match=message):
            stream.expand_urls(spec)
    tar = (local_shards / "shard-000000.tar").read_bytes()
    s3.client().put_object(Bucket=BUCKET, Key="bare/shard-000000.tar", Body=tar)
    assert stream.read_index(f"s3://{BUCKET}/bare") is None  # no index.json beside them: the count is unknown


@pytest.mark.slow  # a real `barlow train` process (~10 s on 2 cores)
def test_barlow_train_reads_its_data_from_a_bucket(s3, local_shards, tmp_path):
    url = upload(s3, local_shards, "shards")
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--preset", "tiny", "--data", url,
                             "--out", str(run_dir), "--steps", "2", "data.workers=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "encoder.pt").is_file()
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m][-1] == 2


# ---------------------------------------------------------------- barlow shards


def samples_of(location: str) -> list[tuple]:
    return read(stream.expand_urls(location))


def test_shards_into_and_out_of_a_bucket_match_local_to_local(s3, image_folder, tmp_path, capsys):
    reference = shards.write_shards(str(image_folder), tmp_path / "ref", per_shard=10)
    expected = samples_of(str(tmp_path / "ref"))
    assert len(expected) == 24 and reference["counts"] == [10, 10, 4]

    out = f"s3://{BUCKET}/out"
    s3.client().create_bucket(Bucket=BUCKET)
    assert cli.main(["shards", str(image_folder), "--out", out, "--per-shard", "10"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 24 images in 3 shards to {out} (1 skipped)")
    assert keys_in(s3, "out") == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert samples_of(out) == expected
    assert json.loads(storage.read_text(f"{out}/index.json")) == reference  # same counts, classes, sources
    for name in reference["shards"]:  # byte-identical tars: nothing depends on where they go
        assert storage.read_bytes(f"{out}/{name}") == (tmp_path / "ref" / name).read_bytes()

    # Existing shards in a bucket are refused without --overwrite; with it, stale ones go.
    assert cli.main(["shards", str(image_folder), "--out", out]) == 2
    assert "already holds shards" in capsys.readouterr().err
    shards.write_shards(str(image_folder), out, per_shard=30, overwrite=True)
    assert keys_in(s3, "out") == ["index.json", "shard-000000.tar"]

    # An image prefix in a bucket (sub-folder = class) gives the same samples as the folder on disk.
    images = upload(s3, image_folder, "images")
    index = shards.write_shards(images, tmp_path / "from-bucket", per_shard=10)
    assert samples_of(str(tmp_path / "from-bucket")) == expected
    assert index["classes"] == ["cat", "dog"] and index["counts"] == [10, 10, 4] and index["source"] == images
    assert [s["source"] for s in index["skipped"]] == [f"{images}/dog/notes.txt"]
    with pytest.raises(UserError, match=r"^the bucket of s3://nobucket/images does not exist"):
        shards.write_shards("s3://nobucket/images", tmp_path / "x")


def test_a_failure_mid_write_leaves_no_partial_shard(s3, image_folder, tmp_path, monkeypatch):
    s3.client().create_bucket(Bucket=BUCKET)
    record, written = shards._record, []

    def failing(sample, classes):
        written.append(sample.key)
        if len(written) == 13:  # in the middle of the second shard
            raise RuntimeError("disk on fire")
        return record(sample, classes)

    monkeypatch.setattr(shards, "_record", failing)
    for out in (f"s3://{BUCKET}/out", str(tmp_path / "out")):
        written.clear()
        with pytest.raises(RuntimeError, match="disk on fire"):
            shards.write_shards(str(image_folder), out, per_shard=10)
        # The first shard is published whole; the broken second one and index.json are not there at all.
        names = keys_in(s3, "out") if out.startswith("s3://") else sorted(p.name for p in Path(out).iterdir())
        assert names == ["shard-000000.tar"], out
        assert len(read([f"{out}/shard-000000.tar"])) == 10


# ---------------------------------------------------------------- export to a bucket, serve from it


def test_serving_downloads_a_url_model_dir_and_says_what_is_missing(s3, tmp_path, monkeypatch):
    from serving.settings import settings_from_env

    s3.client().create_bucket(Bucket="models")
    for name in MODEL_FILES:
        s3.client().put_object(Bucket="models", Key=f"m1/{name}", Body=name.encode())
    s3.client().put_object(Bucket="models", Key="half/model.json", Body=b"{}")
    monkeypatch.setenv("BARLOW_CACHE_DIR", str(tmp_path / "cache"))
    folder = local_copy("s3://models/m1", MODEL_FILES)
    assert folder.is_relative_to(tmp_path / "cache") and sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)
    assert (folder / "model.onnx").read_bytes() == b"model.onnx"
    assert local_copy("s3://models/m1/", MODEL_FILES) == folder  # one cache folder per URL, refreshed
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]  # no download folder left

    # A pod with BARLOW_MODEL_DIR=s3://... and no `barlow serve`: the settings hold the local copy.
    monkeypatch.setenv("BARLOW_MODEL_DIR", "s3://models/m1")
    assert settings_from_env().served_model_dir() == folder

    for location, message in (("s3://models/half", r"^s3://models/half/model\.onnx does not exist$"),
                              ("s3://nobucket/m1", r"^the bucket of s3://nobucket/m1/model\.onnx does not exist")):
        with pytest.raises(UserError, match=message):
            local_copy(location, MODEL_FILES)
    assert cli.main(["serve", "s3://nobucket/m1"]) == 2


@pytest.mark.slow  # one ResNet-18 export (~5 s) and one BentoML server (~15 s on 2 cores)
def test_export_to_a_bucket_then_serve_from_it(s3, tmp_path, monkeypatch, capsys, image_bytes):
    run_dir = make_run_dir(tmp_path / "run")
    s3.client().create_bucket(Bucket="models")
    out = "s3://models/m1"
    assert cli.main(["export", str(run_dir), "--out", out]) == 0
    assert f"and pointed {out}/current.json at it: dim 512" in capsys.readouterr().out
    version = json.loads(storage.read_text(f"{out}/current.json"))["version"]
    assert keys_in(s3, "m1", bucket="models") == ["current.json", f"versions/{version}/model.json",
                                                  f"versions/{version}/model.onnx"]
    info = json.loads(storage.read_text(f"{out}/versions/{version}/model.json"))
    assert info["parity"]["max_rel"] <= 1e-4 and info["dim"] == 512 and info["version"] == version

    monkeypatch.setenv("BARLOW_CACHE_DIR", str(tmp_path / "cache"))
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    server = start_server(out, env=env, log_file=tmp_path / "server.log")
    try:
        blob = image_bytes(0, "PNG", (40, 36))
        response = httpx.post(f"{server.url}/embed", files=[("images", ("a.png", blob, "image/png"))],
                              data={"normalize": "false"}, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        assert server.stop() == 0, log_tail(server)
    actual = np.asarray(response.json()["embeddings"], dtype=np.float32)
    expected = torch_embed(torch_reference(run_dir), load_array(blob, 32)[None])
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()
