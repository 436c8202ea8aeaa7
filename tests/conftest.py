"""Shared test fixtures: small real images and real WebDataset shards built in temp folders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def random_image(seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> Image.Image:
    """A noise image: any change of pixels (re-encoding, wrong member) shows in comparisons."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(name="random_image")
def random_image_fixture():
    """`random_image(seed, size=(w, h), mode="RGB") -> PIL.Image` of noise."""
    return random_image


@pytest.fixture(name="image_bytes")
def image_bytes_fixture():
    """`image_bytes(seed, fmt="JPEG", size=(w, h)) -> bytes` of an encoded noise image."""
    return image_bytes


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """Fashion-MNIST's folder (the Debian package's, or BARLOW_FASHION_MNIST_DIR); skips the test when it is
    not installed."""
    from pipeline.data.fashion_mnist import fashion_mnist_dir

    folder = fashion_mnist_dir()
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist")
    return folder


@pytest.fixture(scope="session")
def fmnist_shards(fashion_mnist, tmp_path_factory) -> Path:
    """200 Fashion-MNIST test images in 5 shards of up to 48 (the last one short), with index.json."""
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("fmnist-shards")
    write_shards("fashion-mnist:test", out, per_shard=48, limit=200)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the whole session (see helpers_s3)."""
    from helpers_s3 import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, emptied, with its AWS variables set in this process (children inherit them).

    Returns the server; `s3.client()` is a boto3 client for arranging buckets and objects."""
    from pipeline import storage

    s3_server.reset()
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(storage.OPTIONS_ENV, raising=False)
    storage._filesystems.clear()  # s3fs clients made under other variables
    yield s3_server
    storage._filesystems.clear()
