"""Backbone features of labelled images, for evaluation: one read of the data, several feature functions.

A feature function is any callable `uint8 RGB [B, 3, S, S] (numpy) -> float32 [B, D] (numpy)`: the
exported `model.onnx` under ONNX Runtime (`runtime.OnnxModel`), the trained `encoder.pt` under torch
(`TorchModel`), the same architecture at random initialisation, or the raw pixels. Images come from
`data.labelled`, which preprocesses them exactly as serving and batch embedding do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Config, ModelConfig
from pipeline.data.labelled import class_names, iter_labelled
from pipeline.data.stream import CorruptCounter
from pipeline.errors import UserError

log = logging.getLogger(__name__)

FeatureFn = Callable[[np.ndarray], np.ndarray]
RAW_PIXELS_SIZE = 32  # the raw-pixel baseline looks at (at most) 32 x 32 images, the "tiny images" baseline


@dataclass
class Features:
    """Features of one SRC per feature-function name, the labels, and what was skipped."""

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
class EvaluatedModel:
    """The model under evaluation as a feature function, and what evaluation needs to know about it."""

    features: FeatureFn
    image_size: int
    model: ModelConfig  # the backbone's architecture (arch, stem)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str  # onnx | torch
    path: str
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- feature functions


class TorchModel:
    """A backbone under torch with the ONNX graph's standardisation (`export.FeatureExtractor`), on `device`."""

    def __init__(self, backbone: torch.nn.Module, mean, std, device: torch.device):
        from pipeline.export import FeatureExtractor

        self.module = FeatureExtractor(backbone, tuple(mean), tuple(std)).to(device).eval()
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


def random_init_model(model: EvaluatedModel, device: torch.device, seed: int = 0) -> TorchModel:
    """The same architecture as `model`, randomly initialised with a fixed seed: the untrained baseline."""
    from pipeline.train.model import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, _ = build_backbone(model.model)
    return TorchModel(backbone.eval(), model.mean, model.std, device)


def open_model(path: str | Path, device: torch.device) -> EvaluatedModel:
    """MODEL_DIR (model.onnx + model.json, run by ONNX Runtime) or RUN_DIR / encoder.pt (run by torch)."""
    path = Path(path)
    if (path / "model.onnx").is_file() or (path / "current.json").is_file():
        from pipeline.runtime import OnnxModel, resolve_model_dir

        path = resolve_model_dir(path)
        onnx = OnnxModel(path, device="cuda" if device.type == "cuda" else "cpu")
        info = onnx.info
        try:
            model_config, size = Config.from_dict(info["config"]).model, int(info["image_size"])
            mean, std = tuple(info["mean"]), tuple(info["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path / 'model.json'} lacks a field evaluation needs ({exc}); re-run barlow export") from None
        return EvaluatedModel(onnx, size, model_config, mean, std, "onnx", str(path),
                              {"provider": onnx.providers[0], "name": info.get("name")})
    checkpoint = path / "encoder.pt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise UserError(f"{path} is neither a MODEL_DIR (model.onnx) nor a RUN_DIR (encoder.pt) nor an encoder.pt")
    from pipeline.train.checkpoint import load_encoder

    backbone, config = load_encoder(checkpoint)
    views = config.views
    return EvaluatedModel(TorchModel(backbone, views.mean, views.std, device), views.image_size, config.model,
                          tuple(views.mean), tuple(views.std), "torch", str(path),
                          {"device": str(device)})


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


def extract(functions: dict[str, FeatureFn], src: str, size: int, batch_size: int = 256, limit: int | None = None,
            desc: str = "features") -> Features:
    """Run every feature function over the labelled images of SRC (read and preprocessed once), in batches."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    start = time.perf_counter()
    counter = CorruptCounter()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in functions}
    labels: list[np.ndarray] = []
    with tqdm(desc=desc, unit="img", total=limit, leave=False) as bar:
        for images, batch_labels in _batches(iter_labelled(src, size, counter, limit), batch_size):
            for name, function in functions.items():
                chunks[name].append(np.asarray(function(images), dtype=np.float32))
            labels.append(batch_labels)
            bar.update(len(images))
    corrupt = counter.corrupt + counter.shard_errors  # unreadable shards or tar members: counted, not fatal
    if not labels:
        raise UserError(f"{src} has no labelled images ({counter.seen} samples read, {corrupt} corrupt, "
                        f"{counter.unlabelled} without a .cls label); evaluation needs labelled data")
    if corrupt or counter.unlabelled:
        log.warning("%s: skipped %d corrupt and %d unlabelled of %d samples", src, corrupt, counter.unlabelled,
                    counter.seen)
    return Features({name: np.concatenate(parts) for name, parts in chunks.items()}, np.concatenate(labels),
                    counter.seen, corrupt, counter.unlabelled, class_names(src), time.perf_counter() - start)
