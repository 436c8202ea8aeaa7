"""serving/thumbnails.py without a server: where a key's image is read from (a tar member, a file, an index
from before the shard column), the size bound, the byte-bounded cache, and what is never read."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.embed.index import build_index
from pipeline.embed.parts import new_meta, part_name, write_part
from pipeline.embed.search import SearchIndex
from serving.requests import RequestError
from serving.thumbnails import ThumbnailCache, parse_size, thumbnail

MODEL = {"name": "synthetic", "sha256": "e" * 64, "dim": 8, "image_size": 8}
MAX_PIXELS = 10_000_000


def encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour + (0,)).save(out, fmt)
    return out.getvalue()


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def index(tmp_path):
    """An index of a tar shard's members, a file, a vanished file and a pipe: shard."""
    shard = tmp_path / "shard-000000.tar"
    write_tar(shard, {"a.jpg": encoded((300, 200), "JPEG"), "a.cls": b"1", "b.png": encoded((40, 40), "PNG", "RGBA"),
                      "c.txt": b"no image"})
    photo = tmp_path / "photos" / "d.png"
    photo.parent.mkdir()
    photo.write_bytes(encoded((64, 128), "PNG"))
    rows = [("a", "orig/a.jpg", str(shard)), ("b", "orig/b.png", str(shard)), ("c", "orig/c", str(shard)),
            ("d", str(photo), None), ("gone", str(tmp_path / "gone.png"), None), ("piped", "x", "pipe:cat x.tar")]
    sources = {source: "v1" for _, source, _ in rows}
    vectors = np.random.default_rng(0).standard_normal((len(rows), 8)).astype(np.float32)
    emb = tmp_path / "emb"
    write_part(str(emb / part_name("s", sources, MODEL["sha256"])), [r[0] for r in rows], [r[1] for r in rows],
               [None] * len(rows), vectors, new_meta(MODEL, True, "file", sources, len(rows), [], []),
               [r[2] for r in rows])
    build_index(emb, tmp_path / "index")
    return SearchIndex(tmp_path / "index")


def test_thumbnails_come_from_the_tar_member_or_the_file_bounded_and_cached(index):
    cache = ThumbnailCache()
    a = Image.open(io.BytesIO(thumbnail(index, cache, "a", 64, MAX_PIXELS)))
    assert a.format == "JPEG" and a.size == (64, 43) and a.getpixel((30, 20))[0] > 150  # the member's red pixels
    b = Image.open(io.BytesIO(thumbnail(index, cache, "b", 64, MAX_PIXELS)))
    assert b.size == (40, 40) and min(b.getpixel((5, 5))) > 240, "never enlarged; transparency on white"
    d = Image.open(io.BytesIO(thumbnail(index, cache, "d", 32, MAX_PIXELS)))
    assert d.size == (16, 32)
    assert set(cache.items) == {("a", 64), ("b", 64), ("d", 32)}
    assert thumbnail(index, cache, "a", 64, MAX_PIXELS) is cache.items[("a", 64)]


@pytest.mark.parametrize("key, reason", [
    ("c", "no image member"), ("gone", "cannot read"), ("piped", "pipe: shard"), ("zzz", "not in the index"),
    ("../../etc/passwd", "not in the index"), ("/etc/passwd", "not in the index"),
])
def test_what_cannot_be_read_is_a_404_and_nothing_outside_the_index_is_read(index, key, reason):
    with pytest.raises(RequestError) as caught:
        thumbnail(index, ThumbnailCache(), key, 64, MAX_PIXELS)
    assert caught.value.status == 404 and reason in caught.value.message


def test_an_index_from_before_the_shard_column_reads_a_shard_named_as_the_source(tmp_path, index):
    generation = tmp_path / "index" / index.info["generation"] / "keys.parquet"
    table = pq.read_table(generation)
    shard = str(tmp_path / "shard-000000.tar")
    sources = [shard if s is not None else src for s, src in zip(table["shard"].to_pylist(), table["source"].to_pylist())]
    pq.write_table(table.drop_columns(["shard", "source"]).append_column("source", pa.array(sources)), generation)
    reloaded = SearchIndex(tmp_path / "index")
    assert reloaded.image_location("a") == (shard, "a") and reloaded.image_location("d")[1] is None
    assert Image.open(io.BytesIO(thumbnail(reloaded, ThumbnailCache(), "a", 16, MAX_PIXELS))).size == (16, 11)

    sources = {"new.png": "v1"}  # an update adds a part with the column to the generation without it
    write_part(str(tmp_path / "emb" / part_name("t", sources, MODEL["sha256"])), ["new"], ["new.png"], [None],
               np.ones((1, 8), np.float32), new_meta(MODEL, True, "file", sources, 1, [], []), [None])
    assert build_index(tmp_path / "emb", tmp_path / "index")["last_run"]["action"] == "update"
    updated = SearchIndex(tmp_path / "index")
    assert updated.image_location("a") == (shard, "a") and updated.image_location("new") == ("new.png", None)


def test_the_cache_drops_the_least_recently_used_beyond_its_bytes():
    cache = ThumbnailCache(max_bytes=250)
    for name in "abc":
        cache.put((name, 1), b"x" * 100)
        cache.get(("a", 1))  # a stays in use
    assert set(cache.items) == {("a", 1), ("c", 1)} and cache.bytes == 200


def test_size_must_be_a_bounded_integer():
    assert parse_size(None) == 160 and parse_size("16") == 16 and parse_size("512") == 512
    for bad in ("15", "513", "-1", "1e3", "big"):
        with pytest.raises(RequestError) as caught:
            parse_size(bad)
        assert caught.value.status == 422
