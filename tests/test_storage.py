"""pipeline/storage.py against a real S3 endpoint (moto on 127.0.0.1) and the local disk: listings with
identities, objects published whole, downloads for path-only libraries, and one sentence per store error."""

from __future__ import annotations

import time

import pytest

from pipeline import cli, storage
from pipeline.errors import UserError


def test_schemes_and_joins():
    assert storage.scheme("s3://b/k") == "s3" and storage.scheme("/tmp/x") == "" and storage.scheme("C://x") == ""
    assert storage.scheme("file:///tmp/x") == "" and storage.local_path("file:///tmp/x").as_posix() == "/tmp/x"
    assert storage.join("s3://b/p/", "a", "b.json") == "s3://b/p/a/b.json"
    assert storage.join("/tmp/p", "a") == "/tmp/p/a" and storage.name_of("s3://b/p/x.tar?sig=1") == "x.tar"


def test_storage_options_are_checked_and_reach_children_by_environment(monkeypatch, capsys):
    monkeypatch.setenv(storage.OPTIONS_ENV, "")  # set_options exports it: restored after the test
    assert cli.main(["--storage-options", "{not json", "index", "x", "--out", "y"]) == 2
    assert "--storage-options must be a JSON object" in capsys.readouterr().err
    storage.set_options('{"s3": {"endpoint_url": "http://minio:9000"}, "anon": false}')
    assert storage.options("s3") == {"endpoint_url": "http://minio:9000"}, "keyed by scheme"
    assert storage.options("gs") == {"anon": False}, "flat options apply to every scheme"


def test_listing_identities_change_with_the_bytes(s3, tmp_path):
    s3.client().create_bucket(Bucket="bkt")
    s3.client().put_object(Bucket="bkt", Key="a/x.jpg", Body=b"one")
    s3.client().put_object(Bucket="bkt", Key="a/sub/y.png", Body=b"two")
    listed = storage.list_files("s3://bkt/a")
    assert sorted(listed) == ["s3://bkt/a/sub/y.png", "s3://bkt/a/x.jpg"]
    before = storage.identity(listed["s3://bkt/a/x.jpg"])
    assert before.startswith("etag:")
    s3.client().put_object(Bucket="bkt", Key="a/x.jpg", Body=b"uno")
    assert storage.identity(storage.list_files("s3://bkt/a")["s3://bkt/a/x.jpg"]) != before, "no stale listing cache"

    local = tmp_path / "x.jpg"
    local.write_bytes(b"one")
    first = storage.identity(storage.list_files(str(tmp_path))[str(local)])
    time.sleep(0.01)
    local.write_bytes(b"two")
    assert storage.identity(storage.list_files(str(tmp_path))[str(local)]) != first, "size + mtime"


def test_an_object_is_published_whole_or_not_at_all(s3, tmp_path):
    s3.client().create_bucket(Bucket="bkt")
    with pytest.raises(RuntimeError):
        with storage.output("s3://bkt/out/part.parquet") as temp:
            temp.write_bytes(b"half a part")
            raise RuntimeError("killed while writing")
    assert not storage.exists("s3://bkt/out/part.parquet")
    storage.write_json("s3://bkt/out/m.json", {"a": 1})
    assert storage.read_text("s3://bkt/out/m.json").strip() == '{\n "a": 1\n}'
    with pytest.raises(UserError, match="read-only"):
        storage.write_bytes("https://example.invalid/x", b"")

    storage.write_bytes("s3://bkt/model/model.onnx", b"onnx")
    storage.write_bytes("s3://bkt/model/model.json", b"{}")
    folder = storage.local_copy("s3://bkt/model", ("model.onnx", "model.json"))
    assert (folder / "model.onnx").read_bytes() == b"onnx"
    assert storage.local_copy(str(tmp_path)) == tmp_path, "a local folder is used as it is"
    with pytest.raises(UserError, match=r"^s3://bkt/model/index.faiss does not exist$"):
        storage.local_copy("s3://bkt/model", ("index.faiss",))


def test_store_errors_are_one_sentence(s3, monkeypatch, tmp_path):
    with pytest.raises(UserError, match=r"^the bucket of s3://no-such-bucket/x does not exist"):
        storage.list_files("s3://no-such-bucket/x")
    s3.client().create_bucket(Bucket="bkt")
    with pytest.raises(UserError, match=r"^s3://bkt/missing.jpg does not exist$"):
        storage.read_bytes("s3://bkt/missing.jpg")

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage._filesystems.clear()
    with pytest.raises(UserError, match=r"^no credentials to read s3://bkt/x"):
        storage.list_files("s3://bkt/x")


@pytest.mark.slow
def test_access_denied_is_one_sentence(tmp_path, monkeypatch):
    """A second moto server that checks credentials (IAM auth on): unknown keys are refused, as AWS does."""
    from helpers_s3 import S3Server

    server = S3Server.start(tmp_path / "moto.log", extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv(storage.OPTIONS_ENV, raising=False)
        storage._filesystems.clear()
        with pytest.raises(UserError, match=r"^access denied to s3://bkt/x"):
            storage.list_files("s3://bkt/x")
    finally:
        storage._filesystems.clear()
        server.stop()
