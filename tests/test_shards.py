"""`barlow shards`: real tar shards from image folders and Fashion-MNIST, read back with stream.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import cli
from pipeline.data.fashion_mnist import read_fashion_mnist
from pipeline.data.shards import write_shards
from pipeline.data.stream import CorruptCounter, decode_rgb, expand_urls, iter_samples, label_of
from pipeline.errors import UserError


def read_back(out: Path) -> list[dict]:
    counter = CorruptCounter()
    samples = list(iter_samples(expand_urls(str(out)), counter))
    assert counter.shard_errors == 0
    return samples


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def class_folder(tmp_path, image_bytes) -> Path:
    """cat/ and dog/ with JPEG, PNG and BMP images, awkward names, a text file and a truncated JPEG."""
    root = tmp_path / "images"
    (root / "dog").mkdir(parents=True)
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(image_bytes(1))
    (root / "cat" / "b.png").write_bytes(image_bytes(2, "PNG"))
    (root / "cat" / "my.photo 1.JPEG").write_bytes(image_bytes(3))
    (root / "cat" / "my_photo 1.bmp").write_bytes(image_bytes(4, "BMP"))  # same sanitized key as the line above
    (root / "cat" / "nested" / "c.jpg").write_bytes(image_bytes(5))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "d.jpg").write_bytes(image_bytes(6))
    (root / "dog" / "truncated.jpg").write_bytes(image_bytes(7)[:200])
    (root / "dog" / ".hidden.jpg").write_bytes(b"ignored")
    return root


def test_class_folder_round_trip(class_folder, tmp_path):
    out = tmp_path / "shards"
    index = write_shards(str(class_folder), out, per_shard=2)

    assert index["classes"] == ["cat", "dog"]
    assert index["count"] == 6 and index["counts"] == [2, 2, 2]
    assert index["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((out / "index.json").read_text()) == index
    skipped = {Path(s["source"]).name: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"notes.txt", "truncated.jpg"}
    assert "truncated" in skipped["truncated.jpg"].lower() and skipped["notes.txt"] == "not a readable image"

    samples = read_back(out)
    keys = [s["__key__"] for s in samples]
    assert keys == ["cat/a", "cat/b", "cat/my_photo_1", "cat/my_photo_1_2", "cat/nested/c", "dog/d"]
    for sample in samples:
        meta = json.loads(sample["json"])
        source = Path(meta["source"])
        assert source.is_absolute() and source.is_relative_to(class_folder.resolve())
        assert label_of(sample) == index["classes"].index(meta["label"]) == ["cat", "dog"].index(source.relative_to(class_folder.resolve()).parts[0])
        original = source.read_bytes()
        image = decode_rgb(sample)
        assert (meta["width"], meta["height"]) == image.size == (24, 20)
        if source.suffix.lower() in {".jpg", ".jpeg"}:
            assert sample["jpg"] == original  # JPEG bytes copied, never re-encoded
        elif source.suffix == ".png":
            assert sample["png"] == original
        else:  # BMP: losslessly re-encoded as PNG
            assert "png" in sample and np.array_equal(pixels(sample["png"]), pixels(original))


def test_flat_folder_is_unlabelled(tmp_path, random_image):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        random_image(i, mode="L").save(root / f"img{i}.tif")
    index = write_shards(str(root), tmp_path / "out")
    assert index["classes"] is None and index["count"] == 3 and len(index["shards"]) == 1
    samples = read_back(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["img0", "img1", "img2"]
    for i, sample in enumerate(samples):
        assert "cls" not in sample and label_of(sample) is None and "label" not in json.loads(sample["json"])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), np.asarray(random_image(i, mode="L")))


def test_fashion_mnist_round_trip(fashion_mnist, tmp_path):
    images, labels = read_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and labels.max() == 9
    index = write_shards("fashion-mnist:test", tmp_path, per_shard=16, limit=30)
    assert index["count"] == 30 and index["counts"] == [16, 14] and len(index["classes"]) == 10
    samples = read_back(tmp_path)
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(30)]
    for i, sample in enumerate(samples):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[i])
        assert label_of(sample) == labels[i]
        assert json.loads(sample["json"]) == {"source": f"fashion-mnist:test/{i}", "width": 28, "height": 28,
                                              "label": index["classes"][labels[i]]}


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        read_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_dir_comes_from_the_environment(tmp_path, monkeypatch, fashion_mnist):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(fashion_mnist / name)
    monkeypatch.setenv("BARLOW_FASHION_MNIST_DIR", str(tmp_path))
    images, labels = read_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and labels.max() == 9
    with pytest.raises(UserError, match=f"not installed in {tmp_path}.*BARLOW_FASHION_MNIST_DIR"):
        read_fashion_mnist("train")  # only the test split was copied there


def test_cli_summary_refuses_to_overwrite_and_overwrites(class_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["shards", str(class_folder), "--out", str(out), "--per-shard", "4"]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[0] == f"wrote 6 images in 2 shards to {out} (2 skipped)"
    assert any("truncated.jpg" in line for line in summary[1:])

    assert cli.main(["shards", str(class_folder), "--out", str(out)]) == 2
    assert "already holds shards; pass --overwrite" in capsys.readouterr().err
    assert len(list(out.glob("shard-*.tar"))) == 2  # nothing lost

    assert cli.main(["shards", str(class_folder), "--out", str(out), "--limit", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]  # no stale shard left
    assert json.loads((out / "index.json").read_text())["count"] == 3

    assert cli.main(["shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a folder" in capsys.readouterr().err
