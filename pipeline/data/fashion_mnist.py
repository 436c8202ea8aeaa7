"""Fashion-MNIST from its four IDX .gz files: the data set `make demo`, the tests and the quality bench use.

The files come from the Debian package `dataset-fashion-mnist`, or from any folder named by
BARLOW_FASHION_MNIST_DIR (machines where apt cannot run). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package installs it
SPLITS = {"train": "train", "test": "t10k"}  # split -> file stem
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def fashion_mnist_dir() -> Path:
    """BARLOW_FASHION_MNIST_DIR (the four .gz files copied elsewhere), else the Debian package's folder."""
    return Path(os.environ.get("BARLOW_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (big-endian header: magic, then one uint32 per dimension; uint8 payload)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    ndim = magic & 0xFF
    header = np.frombuffer(raw[: 4 * (ndim + 1)], dtype=">u4")
    if len(header) != ndim + 1 or header[0] != magic:
        raise UserError(f"{path} is not an IDX file of the expected kind (magic {magic:#x})")
    shape = tuple(int(d) for d in header[1:])
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 * (ndim + 1))
    if payload.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} bytes of data, got {payload.size}")
    return payload.reshape(shape)


def read_fashion_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `train` or `test` as (images uint8 [N, 28, 28], labels int64 [N])."""
    if split not in SPLITS:
        raise UserError(f"unknown Fashion-MNIST split {split!r}; use train or test")
    root = Path(root) if root is not None else fashion_mnist_dir()
    stem = SPLITS[split]
    images_path = root / f"{stem}-images-idx3-ubyte.gz"
    labels_path = root / f"{stem}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise UserError(
            f"Fashion-MNIST is not installed in {root}; run `sudo apt-get install dataset-fashion-mnist` "
            "or set BARLOW_FASHION_MNIST_DIR to a folder with its four .gz files"
        )
    images = _read_idx(images_path, 0x803)
    labels = _read_idx(labels_path, 0x801).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels
