"""barlow embed against a real S3 endpoint (moto's server on 127.0.0.1): image objects of a bucket
prefix embedded once, then incrementally (new, changed, disappeared, --prune), a kill -9 mid-run,
two --part-of pods at once, bad input as one sentence, list files in a bucket, and an index that is
updated giving the same answers as one rebuilt. Plus two local-folder reproductions of the same
incremental behaviour."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli, storage
from pipeline.embed import embed as embed_module
from pipeline.embed.embed import Piece, Source, Unit, embed, fetch, piece_batches
from pipeline.embed.parts import find_parts, read_table

from helpers_embed import shared_model, write_tar

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_BUCKET = "photos"
EMB_BUCKET = "embeddings"
EMB = f"s3://{EMB_BUCKET}/emb"
FOLDERS = ("", "cats/", "dogs/puppies/")  # sub-"folders" below the prefix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model(tmp_path_factory)


# ---------------------------------------------------------------- helpers


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> bytes:
    """Encoded noise (conftest's image_bytes): any change of pixels shows in the embedding."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    return image_bytes(seed, "JPEG", (24, 20))  # resized to the model's 32 px


def bucket(s3, *names: str):
    client = s3.client()
    for name in names:
        client.create_bucket(Bucket=name)
    return client


def put(client, objects: dict[str, bytes], bucket_name: str = DATA_BUCKET) -> None:
    for key, data in objects.items():
        client.put_object(Bucket=bucket_name, Key=key, Body=data)


def image_objects(first: int, count: int, prefix: str = "set/") -> dict[str, bytes]:
    """`count` JPEG objects below `prefix`, spread over FOLDERS, seeds first..first+count-1."""
    return {f"{prefix}{FOLDERS[i % len(FOLDERS)]}img-{i:04d}.jpg": jpeg(i) for i in range(first, first + count)}


def key_of(object_key: str, prefix: str = "set/") -> str:
    """The row key of an object: its path below the prefix, without the extension."""
    return object_key[len(prefix):].rsplit(".", 1)[0]


def live(emb: str) -> dict[str, tuple[str, np.ndarray]]:
    """source -> (key, embedding) over EMB_DIR's live parts; asserts every source and key is there once."""
    rows: dict[str, tuple[str, np.ndarray]] = {}
    keys: list[str] = []
    for part in find_parts(emb).live.values():
        table, vectors = read_table(part.location)
        for key, source, vector in zip(table.column("key").to_pylist(), table.column("source").to_pylist(), vectors):
            assert source not in rows, f"{source} is in the live parts twice"
            rows[source] = (key, vector)
            keys.append(key)
    assert len(keys) == len(set(keys)), f"duplicate keys: {sorted(k for k in set(keys) if keys.count(k) > 1)[:5]}"
    return rows


def objects_below(client, bucket_name: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket_name, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def run_embed(model_dir, data: str, out: str = EMB, **kwargs) -> dict:
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("batch_size", 32)
    return embed(model_dir, data, out, device="cpu", **kwargs)


# files_per_part is keyword-only with no CLI flag: the subprocess sets its default before the CLI runs.
PATCHED_CLI = ("import sys; from pipeline.embed import embed as e; e.embed.__kwdefaults__['files_per_part'] = {n}; "
               "from pipeline import cli; sys.exit(cli.main(sys.argv[1:]))")


def embed_command(model_dir, data: str, out: str, per_part: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", PATCHED_CLI.format(n=per_part), "embed", str(model_dir), "--data", data,
            "--out", out, "--device", "cpu", *extra]


# ---------------------------------------------------------------- a bucket prefix, embedded incrementally


@pytest.mark.slow
def test_bucket_prefix_is_embedded_once_then_only_what_changed(s3, model_dir):
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    first = image_objects(0, 200)
    put(client, first)
    put(client, {"set-other/img-9999.jpg": jpeg(9999), "elsewhere/img-0.jpg": jpeg(9998)})  # not below set/
    data = f"s3://{DATA_BUCKET}/set"

    # a. 200 objects: 200 keys, each once; keys are paths below the prefix; sources the s3:// URLs.
    manifest = run_embed(model_dir, data, files_per_part=64)
    rows = live(EMB)
    assert sorted(rows) == sorted(f"s3://{DATA_BUCKET}/{k}" for k in first)
    assert {rows[f"s3://{DATA_BUCKET}/{k}"][0] for k in first} == {key_of(k) for k in first}
    assert sorted(key for key, _ in rows.values()) == sorted(key_of(k) for k in first)
    assert manifest["count"] == 200 and manifest["failed"] == 0 and len(manifest["parts"]) == 4  # 64 per part
    run = manifest["this_run"]
    assert (run["listed"], run["new"], run["changed"], run["images"], run["parts_written"]) == (200, 200, 0, 200, 4)
    vectors = np.stack([v for _, v in rows.values()])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert json.loads(client.get_object(Bucket=EMB_BUCKET, Key="emb/manifest.json")["Body"].read())["count"] == 200

    # b. 50 new objects and 5 overwritten with other pixels: 250 keys once, only the 5 changed embeddings move.
    added = image_objects(200, 50)
    modified = [sorted(first)[i] for i in (0, 7, 70, 140, 199)]  # in different parts
    put(client, added)
    put(client, {k: jpeg(5000 + i) for i, k in enumerate(modified)})
    manifest = run_embed(model_dir, data, files_per_part=64)
    after = live(EMB)
    assert sorted(after) == sorted(f"s3://{DATA_BUCKET}/{k}" for k in [*first, *added])
    assert sorted(key for key, _ in after.values()) == sorted(key_of(k) for k in [*first, *added])
    run = manifest["this_run"]
    assert (run["new"], run["changed"], run["unchanged"], run["disappeared"]) == (50, 5, 195, 0), run
    assert run["images"] == 55 and manifest["count"] == 250
    for source, (key, vector) in rows.items():
        if source.removeprefix(f"s3://{DATA_BUCKET}/") in modified:
            assert after[source][0] == key and np.abs(after[source][1] - vector).max() > 1e-3, f"{key} not re-embedded"
        else:
            assert after[source][0] == key and np.array_equal(after[source][1], vector), f"{key} changed"
    assert not find_parts(EMB).dead, "superseded parts are deleted once their successor is written"

    # c. 10 objects deleted: reported, kept without --prune; removed with it.
    deleted = sorted([*first, *added])[::25][:10]
    assert len(deleted) == 10
    client.delete_objects(Bucket=DATA_BUCKET, Delete={"Objects": [{"Key": k} for k in deleted]})
    parts_before = set(find_parts(EMB).live)
    manifest = run_embed(model_dir, data, files_per_part=64)
    run = manifest["this_run"]
    assert run["disappeared"] == 10 and run["images"] == 0 and run["parts_written"] == 0, run
    assert manifest["count"] == 250 and len(live(EMB)) == 250 and set(find_parts(EMB).live) == parts_before
    assert sorted(manifest["disappeared"]) == sorted(f"s3://{DATA_BUCKET}/{k}" for k in deleted)

    manifest = run_embed(model_dir, data, files_per_part=64, prune=True)
    pruned = live(EMB)
    assert len(pruned) == 240 and manifest["count"] == 240
    assert not {f"s3://{DATA_BUCKET}/{k}" for k in deleted} & set(pruned)
    assert not {key_of(k) for k in deleted} & {key for key, _ in pruned.values()}
    assert all(np.array_equal(vector, after[source][1]) for source, (_, vector) in pruned.items())
    assert manifest["this_run"]["disappeared"] == 10 and manifest["this_run"]["images"] == 0
    assert not find_parts(EMB).dead

    manifest = run_embed(model_dir, data, files_per_part=64, prune=True)
    run = manifest["this_run"]
    assert (run["new"], run["changed"], run["disappeared"], run["images"], run["parts_written"]) == (0, 0, 0, 0, 0)
    assert run["unchanged"] == 240 and manifest["count"] == 240


@pytest.mark.slow
def test_an_added_object_whose_name_sorts_first_does_not_take_an_existing_key(s3, model_dir):
    """`cat.jpg` was embedded as key `cat`; `cat.jpeg` (sorting before it) is added: both keys stay unique."""
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    put(client, {"set/cat.jpg": jpeg(1), "set/dog.jpg": jpeg(2)})
    data = f"s3://{DATA_BUCKET}/set"
    run_embed(model_dir, data, workers=0)
    assert live(EMB)[f"s3://{DATA_BUCKET}/set/cat.jpg"][0] == "cat"
    put(client, {"set/cat.jpeg": jpeg(3)})
    manifest = run_embed(model_dir, data, workers=0)
    assert manifest["this_run"]["new"] == 1
    rows = live(EMB)  # asserts the keys are unique
    assert rows[f"s3://{DATA_BUCKET}/set/cat.jpg"][0] == "cat", "an embedded object keeps its key"
    assert len(rows) == 3


def requests_logged(s3, since: int) -> list[tuple[str, str]]:
    """(method, path) of each request the moto server logged after byte `since` of its log."""
    import re

    time.sleep(0.3)  # the server's last lines
    with open(s3.log.name, "rb") as file:
        file.seek(since)
        text = re.sub(r"\x1b\[[0-9;]*m", "", file.read().decode(errors="replace"))  # werkzeug colours errors
    return re.findall(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" \d{3} ', text)


@pytest.mark.slow
def test_each_image_object_costs_one_request(s3, model_dir):
    """One GET per image, no HEAD before it: per-object latency is what limits buckets of small images."""
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    objects = image_objects(0, 30)
    put(client, objects)
    since = os.path.getsize(s3.log.name)
    run_embed(model_dir, f"s3://{DATA_BUCKET}/set", workers=1)
    requests = requests_logged(s3, since)
    per_object = [(m, p) for m, p in requests if p.split("?")[0].removeprefix(f"/{DATA_BUCKET}/") in objects]
    assert sorted(per_object) == sorted(("GET", f"/{DATA_BUCKET}/{k}") for k in objects), \
        sorted(set(per_object) - {("GET", f"/{DATA_BUCKET}/{k}") for k in objects})[:4]
    others = [r for r in requests if r not in per_object]
    assert len(others) <= 30, others  # listing, the part, runs/ and manifest.json: not per image


@pytest.mark.slow
def test_fewer_new_objects_than_a_part_still_use_every_decode_worker(s3, model_dir):
    """40 new objects, 2 workers: both decode (else a bucket of 50k photos on 16 cores gets 5 of them)."""
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    put(client, image_objects(0, 40))
    manifest = run_embed(model_dir, f"s3://{DATA_BUCKET}/set", workers=2)
    assert manifest["count"] == 40 and len(live(EMB)) == 40
    assert manifest["this_run"]["workers"] == 2, manifest["this_run"]


@pytest.mark.slow
def test_tar_shards_in_a_bucket_are_embedded_and_a_replaced_shard_is_re_embedded(s3, model_dir, tmp_path):
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    shards = {}
    for s in range(3):
        path = write_tar(tmp_path / f"shard-{s:06d}.tar",
                         [{"__key__": f"s{s}-{i}", "jpg": jpeg(10 * s + i), "cls": str(i).encode()} for i in range(5)])
        shards[f"shards/{path.name}"] = path.read_bytes()
    put(client, shards)
    data = f"s3://{DATA_BUCKET}/shards"
    manifest = run_embed(model_dir, data, workers=2)
    rows = {}
    for part in find_parts(EMB).live.values():
        table, vectors = read_table(part.location)
        rows.update({(src, key): (label, vec) for key, src, label, vec in zip(
            *(table.column(c).to_pylist() for c in ("key", "source", "label")), vectors)})
    assert sorted(rows) == sorted((f"s3://{DATA_BUCKET}/shards/shard-{s:06d}.tar", f"s{s}-{i}")
                                  for s in range(3) for i in range(5))
    assert [rows[(f"s3://{DATA_BUCKET}/shards/shard-000001.tar", f"s1-{i}")][0] for i in range(5)] == list(range(5))
    assert manifest["count"] == 15 and len(manifest["parts"]) == 3

    replaced = tmp_path / "new.tar"
    write_tar(replaced, [{"__key__": f"s1-{i}", "jpg": jpeg(500 + i)} for i in range(6)])
    put(client, {"shards/shard-000001.tar": replaced.read_bytes()})
    manifest = run_embed(model_dir, data, workers=1)
    run = manifest["this_run"]
    assert (run["new"], run["changed"], run["unchanged"], run["images"]) == (0, 1, 2, 6), run
    assert manifest["count"] == 16 and len(find_parts(EMB).live) == 3 and not find_parts(EMB).dead


# ---------------------------------------------------------------- kill -9, and two pods at once


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_every_key_exactly_once(s3, model_dir):
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    objects = image_objects(0, 200)
    put(client, objects)
    data = f"s3://{DATA_BUCKET}/set"
    # 10 parts of 20; one object in flight at a time, so the run lasts long enough to be killed in the middle
    command = embed_command(model_dir, data, EMB, 20, "--batch-size", "4", "--workers", "1", "--fetches", "1")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if [k for k in objects_below(client, EMB_BUCKET, "emb/") if k.startswith("emb/part-")]:
                break
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the pod dies: main process and decode worker at once
        process.wait()
    survived = find_parts(EMB)
    assert 1 <= len(survived.live) < 10, f"killed mid-run ({len(survived.live)} parts, exit {process.returncode})"
    assert not survived.unreadable and all(p.count == 20 for p in survived.live.values()), "a part is whole or absent"
    assert "emb/manifest.json" not in objects_below(client, EMB_BUCKET, "emb/"), "killed before its summary"

    manifest = run_embed(model_dir, data, files_per_part=20)
    rows = live(EMB)
    assert sorted(rows) == sorted(f"s3://{DATA_BUCKET}/{k}" for k in objects)
    assert sorted(key for key, _ in rows.values()) == sorted(key_of(k) for k in objects)
    run = manifest["this_run"]
    assert run["new"] == 200 - 20 * len(survived.live) and run["unchanged"] == 20 * len(survived.live)
    assert manifest["count"] == 200 and len(manifest["parts"]) == 10
    found = find_parts(EMB)
    assert not found.dead and not found.unreadable
    remaining = objects_below(client, EMB_BUCKET, "emb/")
    assert sorted(k for k in remaining if k.startswith("emb/part-")) == sorted(f"emb/{n}" for n in found.live)
    assert set(remaining) - {f"emb/{n}" for n in found.live} == {"emb/manifest.json", "emb/runs/part-of-0-1.json"}


@pytest.mark.slow
def test_a_crash_between_a_superseding_part_and_the_delete_leaves_each_source_once(s3, model_dir, monkeypatch):
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    objects = image_objects(0, 40)
    put(client, objects)
    data = f"s3://{DATA_BUCKET}/set"
    run_embed(model_dir, data, files_per_part=16, workers=0)
    before = live(EMB)
    assert len(find_parts(EMB).live) == 3
    changed = sorted(objects)[20]
    put(client, {changed: jpeg(900)})

    remove_parts = embed_module.remove_parts

    def crash_before_deleting(locations):
        locations = list(locations)
        if locations:
            raise RuntimeError("killed between the new part's upload and the old one's delete")
        return remove_parts(locations)

    monkeypatch.setattr(embed_module, "remove_parts", crash_before_deleting)
    with pytest.raises(RuntimeError, match="killed"):
        run_embed(model_dir, data, files_per_part=16, workers=0)
    monkeypatch.setattr(embed_module, "remove_parts", remove_parts)
    found = find_parts(EMB)
    assert len(found.dead) == 1 and len(found.live) == 3, "the superseded part is still there, but not live"
    after = live(EMB)  # every source once
    assert sorted(after) == sorted(before)
    url = f"s3://{DATA_BUCKET}/{changed}"
    assert np.abs(after[url][1] - before[url][1]).max() > 1e-3, "the live part holds the new embedding"

    manifest = run_embed(model_dir, data, files_per_part=16, workers=0)
    assert manifest["this_run"]["images"] == 0 and manifest["this_run"]["changed"] == 0
    assert not find_parts(EMB).dead and manifest["superseded_awaiting_deletion"] == []
    assert len(objects_below(client, EMB_BUCKET, "emb/part-")) == 3

    # Every object of one part deleted, then --prune: that part goes without a successor.
    first_part = sorted(objects)[:16]
    client.delete_objects(Bucket=DATA_BUCKET, Delete={"Objects": [{"Key": k} for k in first_part]})
    manifest = run_embed(model_dir, data, files_per_part=16, workers=0, prune=True)
    run = manifest["this_run"]
    assert (run["disappeared"], run["images"], run["parts_deleted"]) == (16, 0, 1), run
    assert len(live(EMB)) == 24 and len(objects_below(client, EMB_BUCKET, "emb/part-")) == 2


@pytest.mark.slow
def test_two_part_of_pods_at_once_cover_every_key_once(s3, model_dir):
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    objects = image_objects(0, 120)
    put(client, objects)
    data = f"s3://{DATA_BUCKET}/set"
    processes = [subprocess.Popen(embed_command(model_dir, data, EMB, 25, "--part-of", f"{i}/2", "--workers", "1",
                                                "--batch-size", "16"),
                                  cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    outputs = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    rows = live(EMB)
    assert sorted(rows) == sorted(f"s3://{DATA_BUCKET}/{k}" for k in objects)
    assert sorted(key for key, _ in rows.values()) == sorted(key_of(k) for k in objects)
    records = {}
    for i in range(2):
        body = client.get_object(Bucket=EMB_BUCKET, Key=f"emb/runs/part-of-{i}-2.json")["Body"].read()
        records[i] = json.loads(body)
    assert [records[i]["part_of"] for i in range(2)] == ["0/2", "1/2"]
    assert [records[i]["images"] for i in range(2)] == [60, 60], "each pod embedded its own half"
    assert all(records[i]["listed"] == records[i]["new"] + records[i]["unchanged"] == 120 for i in range(2))
    sources_by_part = [set(p.sources) for p in find_parts(EMB).live.values()]
    assert sum(map(len, sources_by_part)) == 120 and len(sources_by_part) == 6  # 25 + 25 + 10 per pod

    # Both pods again: nothing to do, nothing rewritten.
    names = set(find_parts(EMB).live)
    for i in range(2):
        manifest = run_embed(model_dir, data, files_per_part=25, part_of=(i, 2))
        assert manifest["this_run"]["images"] == 0 and manifest["this_run"]["unchanged"] == 120
    assert set(find_parts(EMB).live) == names
    assert set(manifest["runs"]) == {"part-of-0-2", "part-of-1-2"} and manifest["count"] == 120


# ---------------------------------------------------------------- bad input, failures, list files


def error_lines(capsys) -> list[str]:
    """The CLI's error lines on stderr (log records of the libraries aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("barlow ")]


@pytest.fixture
def model_json(tmp_path) -> Path:
    """A MODEL_DIR that gets as far as listing --data (its graph is never loaded): no export needed."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    (folder / "model.json").write_text(json.dumps({"format": "barlow-embed/model/1", "name": "m", "dim": 4,
                                                   "image_size": 8, "onnx_sha256": "0" * 64}))
    return folder


def test_a_missing_bucket_is_one_sentence(s3, model_json, capsys):
    bucket(s3, EMB_BUCKET)
    code = cli.main(["embed", str(model_json), "--data", "s3://no-such-bucket/set", "--out", EMB, "--workers", "0"])
    err = error_lines(capsys)
    assert code == 2, err
    assert len(err) == 1 and "no-such-bucket" in err[0] and "does not exist" in err[0], err


def test_missing_credentials_are_one_sentence(s3, model_json, tmp_path, monkeypatch, capsys):
    bucket(s3, DATA_BUCKET, EMB_BUCKET)
    put(s3.client(), image_objects(0, 3))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        empty = tmp_path / name.lower()
        empty.write_text("")
        monkeypatch.setenv(name, str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage._filesystems.clear()
    code = cli.main(["embed", str(model_json), "--data", f"s3://{DATA_BUCKET}/set", "--out", EMB, "--workers", "0"])
    err = error_lines(capsys)
    assert code == 2, err
    assert len(err) == 1 and "credentials" in err[0], err


@pytest.mark.slow
def test_a_non_image_and_a_truncated_jpeg_are_skipped_and_listed(s3, model_dir, capsys):
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    whole = image_bytes(7, "JPEG", (96, 80))
    put(client, {**image_objects(0, 6), "set/cats/garbage.jpg": b"this is not an image",
                 "set/readme": b"no extension and no image either", "set/truncated.jpg": whole[: len(whole) // 2],
                 "set/notes.txt": b"not an image by its extension: ignored without a fetch",
                 "set/My Photos/\u00e9t\u00e9 1.jpg": jpeg(50),  # spaces and non-ASCII in the object key
                 "set/empty-folder/": b""})  # a console-made "folder": no image, no failure
    code = cli.main(["embed", str(model_dir), "--data", f"s3://{DATA_BUCKET}/set", "--out", EMB, "--workers", "1",
                     "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    manifest = json.loads(client.get_object(Bucket=EMB_BUCKET, Key="emb/manifest.json")["Body"].read())
    reasons = {f["source"]: f["reason"] for f in manifest["failures"]}
    url = f"s3://{DATA_BUCKET}/set/"
    assert set(reasons) == {url + "cats/garbage.jpg", url + "readme", url + "truncated.jpg"}, reasons
    assert all(reasons.values()) and "truncated" in reasons[url + "truncated.jpg"].lower(), reasons
    assert {f["key"] for f in manifest["failures"]} == {"cats/garbage", "readme", "truncated"}
    assert manifest["count"] == 7 and manifest["failed"] == 3 and manifest["ignored_not_images"] == 1
    rows = live(EMB)
    assert len(rows) == 7 and rows[url + "My Photos/\u00e9t\u00e9 1.jpg"][0] == "My_Photos/t_1"

    # The failures are remembered (their identity is recorded): a re-run does not fetch them again; the
    # prefix with a trailing slash is the same prefix.
    manifest = run_embed(model_dir, f"s3://{DATA_BUCKET}/set/", workers=0)
    run = manifest["this_run"]
    assert (run["new"], run["changed"], run["images"]) == (0, 0, 0), run
    assert manifest["failed"] == 3 and manifest["count"] == 7

    # A broken object fixed in place: re-embedded, and no longer listed as a failure.
    put(client, {"set/cats/garbage.jpg": jpeg(51)})
    manifest = run_embed(model_dir, f"s3://{DATA_BUCKET}/set", workers=0)
    assert manifest["this_run"]["changed"] == 1 and manifest["this_run"]["images"] == 1
    assert manifest["count"] == 8 and manifest["failed"] == 2
    assert url + "cats/garbage.jpg" not in {f["source"] for f in manifest["failures"]}
    assert live(EMB)[url + "cats/garbage.jpg"][0] == "cats/garbage"


def test_an_object_that_vanished_after_listing_is_a_failure_not_a_crash(s3):
    client = bucket(s3, DATA_BUCKET)
    put(client, {"set/here.jpg": jpeg(1)})
    gone = f"s3://{DATA_BUCKET}/set/gone.jpg"
    result = fetch(gone)
    assert isinstance(result, Exception) and "vanished" in str(result)
    assert isinstance(fetch(f"s3://{DATA_BUCKET}/set/here.jpg"), bytes)

    sources = (Source(f"s3://{DATA_BUCKET}/set/here.jpg", "etag:x:1", "here"), Source(gone, "etag:y:1", "gone"))
    unit = Unit("part-set-x.parquet", "set", False, sources, tuple((s.url, s.identity) for s in sources))
    batches = list(piece_batches(Piece(unit, unit.sources), 32, 8, 10**8, 4))
    assert batches[-1].last and sum(len(b.keys) for b in batches) == 1
    failures = [f for b in batches for f in b.failures]
    assert failures == [{"key": "gone", "source": gone, "reason": "vanished during the run"}]


@pytest.mark.slow
def test_an_object_deleted_between_listing_and_fetching_is_listed_and_the_run_goes_on(s3, model_dir, monkeypatch):
    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    put(client, image_objects(0, 5))
    victim = sorted(image_objects(0, 5))[2]
    listed = embed_module.list_sources

    def list_then_delete(spec):
        listing = listed(spec)
        client.delete_object(Bucket=DATA_BUCKET, Key=victim)
        return listing

    monkeypatch.setattr(embed_module, "list_sources", list_then_delete)
    manifest = run_embed(model_dir, f"s3://{DATA_BUCKET}/set", workers=0)
    assert manifest["count"] == 4 and manifest["this_run"]["images"] == 4
    assert [(f["source"], f["reason"]) for f in manifest["failures"]] == \
        [(f"s3://{DATA_BUCKET}/{victim}", "vanished during the run")]
    monkeypatch.setattr(embed_module, "list_sources", listed)
    put(client, {victim: jpeg(77)})  # back again: embedded as new
    manifest = run_embed(model_dir, f"s3://{DATA_BUCKET}/set", workers=0)
    assert manifest["this_run"]["new"] == 1 and manifest["count"] == 5 and len(live(EMB)) == 5


@pytest.mark.slow
def test_lists_of_s3_urls_in_a_bucket_txt_csv_and_parquet(s3, model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    objects = image_objects(0, 6)
    put(client, objects)
    urls = [f"s3://{DATA_BUCKET}/{k}" for k in sorted(objects)][:4]
    missing = f"s3://{DATA_BUCKET}/set/not-there.jpg"
    parquet = io.BytesIO()
    pq.write_table(pa.table({"label": [1, 2, 3, 4], "url": urls}), parquet)
    lists = {"lists/images.txt": ("# wanted\n" + "\n".join([*urls, missing]) + "\n").encode(),
             "lists/images.csv": ("id,url\n" + "".join(f"{i},{u}\n" for i, u in enumerate(urls))).encode(),
             "lists/images.parquet": parquet.getvalue()}
    put(client, lists)
    for name in lists:
        out = f"s3://{EMB_BUCKET}/{name.replace('.', '-')}"
        manifest = run_embed(model_dir, f"s3://{DATA_BUCKET}/{name}", out, workers=0)
        rows = live(out)
        assert sorted(rows) == sorted(urls), name
        assert manifest["count"] == 4 and manifest["failed"] == 0
        assert manifest["missing_from_list"] == ([missing] if name.endswith(".txt") else []), name
    a, b = live(f"s3://{EMB_BUCKET}/lists/images-txt"), live(f"s3://{EMB_BUCKET}/lists/images-parquet")
    assert all(np.array_equal(a[u][1], b[u][1]) for u in urls), "the same images, the same embeddings"


# ---------------------------------------------------------------- the same, in local folders


@pytest.mark.slow
def test_local_folder_rerun_reports_this_runs_numbers(model_dir, tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "emb"
    folder.mkdir()
    for i in range(5):
        (folder / f"img-{i}.jpg").write_bytes(jpeg(i))
    assert run_embed(model_dir, str(folder), str(out), workers=0)["this_run"]["new"] == 5
    for i in range(5, 8):
        (folder / f"img-{i}.jpg").write_bytes(jpeg(i))
    manifest = run_embed(model_dir, str(folder), str(out), workers=0)
    run = manifest["this_run"]
    assert (run["new"], run["unchanged"], run["images"]) == (3, 5, 3), run
    assert manifest["count"] == 8 and len(live(str(out))) == 8
    assert manifest["runs"]["part-of-0-1"]["new"] == 3, "the record of this run, not of the one before"


@pytest.mark.slow
def test_a_second_set_of_shards_with_the_same_names_is_embedded_not_skipped(model_dir, tmp_path):
    sets = {}
    for name, base in (("first", 0), ("second", 100)):
        folder = tmp_path / name
        folder.mkdir()
        for s in range(2):
            write_tar(folder / f"shard-{s:06d}.tar",
                      [{"__key__": f"k{s}-{i}", "jpg": jpeg(base + 10 * s + i)} for i in range(4)])
        sets[name] = folder
    out = tmp_path / "emb"
    assert run_embed(model_dir, str(sets["first"]), str(out))["count"] == 8
    manifest = run_embed(model_dir, str(sets["second"]), str(out))
    run = manifest["this_run"]
    assert (run["new"], run["images"], run["disappeared"]) == (2, 8, 2), run
    covered = {s for part in find_parts(str(out)).live.values() for s in part.sources}
    assert covered == {str(sets[n] / f"shard-{s:06d}.tar") for n in sets for s in range(2)}
    assert manifest["count"] == 16 and len(manifest["parts"]) == 4
    rows = {}
    for part in find_parts(str(out)).live.values():
        table, vectors = read_table(part.location)
        for key, source, vector in zip(table.column("key").to_pylist(), table.column("source").to_pylist(), vectors):
            rows[(source, key)] = vector
    assert len(rows) == 16
    first = rows[(str(sets["first"] / "shard-000000.tar"), "k0-0")]
    second = rows[(str(sets["second"] / "shard-000000.tar"), "k0-0")]
    assert np.abs(first - second).max() > 1e-3, "same key, other image: both embedded"


# ---------------------------------------------------------------- an updated index answers like a rebuilt one


@pytest.mark.slow
def test_an_updated_index_gives_the_same_search_results_as_a_full_rebuild(s3, model_dir, tmp_path):
    pytest.importorskip("faiss")
    from pipeline.embed.index import build_index
    from pipeline.embed.search import SearchIndex

    client = bucket(s3, DATA_BUCKET, EMB_BUCKET)
    objects = image_objects(0, 60)
    put(client, objects)
    data = f"s3://{DATA_BUCKET}/set"
    run_embed(model_dir, data, files_per_part=16)
    updated, fresh = f"s3://{EMB_BUCKET}/index", tmp_path / "index-fresh"  # a bucket INDEX_DIR, a local one
    assert build_index(EMB, updated, kind="flat")["count"] == 60

    put(client, image_objects(60, 12))  # new
    put(client, {k: jpeg(7000 + i) for i, k in enumerate(sorted(objects)[5:50:9])})  # changed
    gone = sorted(objects)[1:60:7]
    client.delete_objects(Bucket=DATA_BUCKET, Delete={"Objects": [{"Key": k} for k in gone]})
    manifest = run_embed(model_dir, data, files_per_part=16, prune=True)
    assert manifest["count"] == 72 - len(gone)

    info = build_index(EMB, updated, kind="flat", mode="update")  # the existing INDEX_DIR, updated in place
    assert info["count"] == manifest["count"] and info["last_run"]["action"] == "update", info.get("last_run")
    assert build_index(EMB, fresh, kind="flat", mode="rebuild")["count"] == manifest["count"]
    a, b = SearchIndex(updated), SearchIndex(fresh)
    rows = live(EMB)
    sources = sorted(rows)
    queries = np.stack([rows[s][1] for s in sources])
    got, want = a.search(queries, 5), b.search(queries, 5)
    for source, hits, expected in zip(sources, got, want):
        assert hits[0]["source"] == source and hits[0]["score"] > 0.999, "a stored vector finds itself first"
        assert [h["source"] for h in hits] == [h["source"] for h in expected]
        assert [h["key"] for h in hits] == [h["key"] for h in expected]
        assert np.allclose([h["score"] for h in hits], [h["score"] for h in expected], atol=1e-5)
    assert {a.row(i, 0)["source"] for i in range(len(a))} == set(sources), "no stale rows of changed/gone images"
