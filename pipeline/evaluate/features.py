"""Backbone features of labelled images, for evaluation: one read of the data, several encoders.

An encoder here is any callable `uint8 RGB [B, 3, S, S] (numpy) -> float32 [B, D] (numpy)`: the
exported `model.onnx` under ONNX Runtime, the trained `encoder.pt` under torch, the same
architecture at random initialisation, or the raw pixels. Images come from a SRC as `barlow shards`
takes it (`fashion-mnist:train|test`) or from shard URLs, and always pass through
`pipeline.data.preprocess`, the preprocessing serving and batch embedding use: the evaluated embedding is
the served one. Corrupt or unlabelled samples are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.data import stream
from pipeline.errors import UserError
from pipeline.data.preprocess import BadImage, image_to_array, load_array

log = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray], np.ndarray]
RAW_PIXELS_SIZE = 32  # the raw-pixel baseline looks at (at most) 32 x 32 images, the "tiny images" baseline


@dataclass
class Features:
    """Features of one SRC per encoder name, the labels, and what was skipped."""

    features: dict[str, np.ndarray]  # name -> float32 [N, D]
    labels: np.ndarray  # int64 [N]
    seen: int = 0
    corrupt: int = 0
    unlabelled: int = 0
    classes: list[str] | None = None
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {"count": len(self.labels), "seen": self.seen, "corrupt": self.corrupt, "unlabelled": self.unlabelled}


@dataclass
class Model:
    """An encoder and what evaluation needs to know about it."""

    encoder: Encoder
    image_size: int
    arch: str
    small_stem: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str  # onnx | torch
    path: str
    info: dict[str, Any] = field(default_factory=dict)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} but torch sees no GPU")
    return torch.device(name)


# ---------------------------------------------------------------- encoders


class TorchEncoder:
    """A backbone under torch with the ONNX graph's normalisation (`export.ImageEncoder`), on `device`."""

    def __init__(self, backbone: torch.nn.Module, mean, std, device: torch.device):
        from pipeline.export import ImageEncoder

        self.module = ImageEncoder(backbone, tuple(mean), tuple(std)).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images).to(self.device, non_blocking=True)
        return self.module(batch).float().cpu().numpy()


def raw_pixels(images: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: the preprocessed image itself (area-downsampled to 32 px), scaled to 0-1."""
    tensor = torch.from_numpy(images).float() / 255
    if tensor.shape[-1] > RAW_PIXELS_SIZE:
        tensor = torch.nn.functional.adaptive_avg_pool2d(tensor, RAW_PIXELS_SIZE)
    return tensor.flatten(1).numpy()


def random_init_encoder(model: Model, device: torch.device, seed: int = 0) -> TorchEncoder:
    """The same architecture as `model`, randomly initialised with a fixed seed: the untrained baseline."""
    from pipeline.train.model import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, _ = build_encoder(model.arch, model.small_stem)
    return TorchEncoder(backbone.eval(), model.mean, model.std, device)


def open_model(path: str | Path, device: torch.device) -> Model:
    """MODEL_DIR (model.onnx + model.json, run by ONNX Runtime) or RUN_DIR / encoder.pt (run by torch)."""
    path = Path(path)
    if (path / "model.onnx").is_file():
        try:
            info = json.loads((path / "model.json").read_text())
            model_config, size = info["config"]["model"], int(info["image_size"])
            mean, std = tuple(info["mean"]), tuple(info["std"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path / 'model.json'} is missing or unreadable ({exc}); re-run barlow export") from None
        from pipeline.runtime import OnnxEncoder

        encoder = OnnxEncoder(path, device="cuda" if device.type == "cuda" else "cpu")
        return Model(encoder, size, model_config["arch"], bool(model_config["small_stem"]), mean, std, "onnx",
                     str(path), {"provider": encoder.providers[0], "name": info.get("name")})
    checkpoint = path / "encoder.pt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise UserError(f"{path} is neither a MODEL_DIR (model.onnx) nor a RUN_DIR (encoder.pt) nor an encoder.pt")
    from pipeline.train.checkpoint import load_encoder

    backbone, config = load_encoder(checkpoint)
    views = config.views
    return Model(TorchEncoder(backbone, views.mean, views.std, device), views.image_size, config.model.arch,
                 config.model.small_stem, tuple(views.mean), tuple(views.std), "torch", str(path),
                 {"device": str(device)})


# ---------------------------------------------------------------- labelled images


class Tally:
    """Samples read from a SRC, and how many of them were corrupt or had no label."""

    def __init__(self) -> None:
        self.seen = self.corrupt = self.unlabelled = 0


def iter_labelled(src: str, size: int, tally: Tally, limit: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 [3, size, size], label) of each usable sample of SRC, in order; the rest counted in `tally`."""
    if src.startswith("fashion-mnist:"):
        from pipeline.data.shards import read_fashion_mnist

        images, labels = read_fashion_mnist(src.partition(":")[2])
        for pixels, label in zip(images[:limit], labels[:limit]):
            tally.seen += 1
            # A decoded grayscale image, exactly what the PNG in a shard decodes to.
            yield image_to_array(Image.fromarray(pixels), size), int(label)  # uint8 [28, 28]: mode L
        return
    counter = stream.CorruptCounter()
    produced = 0
    for sample in stream.iter_samples(stream.expand_urls(src), counter):
        if limit is not None and produced >= limit:
            break
        tally.seen += 1
        ext = next((e for e in stream.IMAGE_EXTENSIONS if e in sample), None)
        try:
            if ext is None:
                raise stream.CorruptSample("no image member")
            label = stream.label_of(sample)
            array = load_array(sample[ext], size)
        except (stream.CorruptSample, BadImage) as exc:
            tally.corrupt += 1
            if tally.corrupt <= stream.LOGGED_CORRUPT:
                log.warning("corrupt sample %s in %s skipped: %s", sample.get("__key__"), sample.get("__url__"), exc)
            continue
        if label is None:
            tally.unlabelled += 1
            continue
        produced += 1
        yield array, label
    tally.corrupt += counter.shard_errors  # unreadable shards or tar members: counted, not fatal


def check_source(src: str) -> None:
    """Fail fast, before any model is loaded, on a SRC that cannot be read."""
    if src.startswith("fashion-mnist:"):
        from pipeline.data.shards import FASHION_MNIST_FILES

        if src.partition(":")[2] not in FASHION_MNIST_FILES:
            raise UserError(f"unknown Fashion-MNIST split in {src!r}; use fashion-mnist:train or fashion-mnist:test")
    else:
        stream.expand_urls(src)


def class_names(src: str) -> list[str] | None:
    if src.startswith("fashion-mnist:"):
        from pipeline.data.shards import FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES)
    index = stream.read_index(src)
    return index.get("classes") if index else None


def _batches(items: Iterator[tuple[np.ndarray, int]], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    images, labels = [], []
    for array, label in items:
        images.append(array)
        labels.append(label)
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels, dtype=np.int64)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, dtype=np.int64)


def extract(encoders: dict[str, Encoder], src: str, size: int, batch_size: int = 256, limit: int | None = None,
            desc: str = "features") -> Features:
    """Run every encoder over the labelled images of SRC (read and preprocessed once), in batches."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    start = time.perf_counter()
    tally = Tally()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    labels: list[np.ndarray] = []
    with tqdm(desc=desc, unit="img", total=limit, leave=False) as bar:
        for images, batch_labels in _batches(iter_labelled(src, size, tally, limit), batch_size):
            for name, encoder in encoders.items():
                chunks[name].append(np.asarray(encoder(images), dtype=np.float32))
            labels.append(batch_labels)
            bar.update(len(images))
    if not labels:
        raise UserError(f"{src} has no labelled images ({tally.seen} samples read, {tally.corrupt} corrupt, "
                        f"{tally.unlabelled} without a .cls label); evaluation needs labelled data")
    if tally.corrupt or tally.unlabelled:
        log.warning("%s: skipped %d corrupt and %d unlabelled of %d samples", src, tally.corrupt, tally.unlabelled,
                    tally.seen)
    return Features({name: np.concatenate(parts) for name, parts in chunks.items()}, np.concatenate(labels),
                    tally.seen, tally.corrupt, tally.unlabelled, class_names(src), time.perf_counter() - start)
