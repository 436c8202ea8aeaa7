"""Labelled images of a SRC, preprocessed: what evaluation and the training kNN monitor read.

SRC is `fashion-mnist:train|test` or shard URLs whose samples carry `.cls` labels. Every image passes
through `preprocess`, the path serving and batch embedding use, so the evaluated embedding is the
served one. Corrupt and unlabelled samples are skipped and counted, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
from PIL import Image

from pipeline.data import stream
from pipeline.data.fashion_mnist import FASHION_MNIST_CLASSES, SPLITS, read_fashion_mnist
from pipeline.data.preprocess import BadImage, image_to_array, load_array
from pipeline.data.stream import CorruptCounter
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def iter_labelled(src: str, size: int, counter: CorruptCounter,
                  limit: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 [3, size, size], label) of each usable sample of SRC, in order; the rest counted in `counter`
    (corrupt samples, samples without a label, unreadable shards)."""
    if src.startswith("fashion-mnist:"):
        images, labels = read_fashion_mnist(src.partition(":")[2])
        for pixels, label in zip(images[:limit], labels[:limit]):
            counter.ok()
            # A decoded grayscale image, exactly what the PNG in a shard decodes to.
            yield image_to_array(Image.fromarray(pixels), size), int(label)  # uint8 [28, 28]: mode L
        return
    produced = 0
    for sample in stream.iter_samples(stream.expand_urls(src), counter):
        if limit is not None and produced >= limit:
            break
        try:
            _, data = stream.image_member(sample)
            label = stream.label_of(sample)
            array = load_array(data, size)
        except (stream.CorruptSample, BadImage) as exc:
            counter.bad(sample.get("__key__"), sample.get("__url__"), str(exc))
            continue
        counter.ok()
        if label is None:
            counter.unlabelled += 1
            continue
        produced += 1
        yield array, label


def check_source(src: str) -> None:
    """Fail fast, before any model is loaded, on a SRC that cannot be read."""
    if src.startswith("fashion-mnist:"):
        if src.partition(":")[2] not in SPLITS:
            raise UserError(f"unknown Fashion-MNIST split in {src!r}; use fashion-mnist:train or fashion-mnist:test")
    else:
        stream.expand_urls(src)


def class_names(src: str) -> list[str] | None:
    if src.startswith("fashion-mnist:"):
        return list(FASHION_MNIST_CLASSES)
    index = stream.read_index(src)
    return index.get("classes") if index else None
