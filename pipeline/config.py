"""One config object per run: dataclasses, loaded from a preset or YAML, overridden by `key=value`.

A recipe is data: presets in `presets.py` are plain dicts of overrides on these defaults (which are the
paper's ImageNet recipe), so `fmnist` and `imagenet` run the same code. The resolved config is written
back into RUN_DIR as `config.yaml` and stored inside checkpoints and `encoder.pt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    urls: str = ""  # a path, brace pattern, pipe:CMD or http(s) URL; see stream.py
    samples_per_epoch: int = 0  # 0: the `count` in index.json beside the shards
    workers: int = 4  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples held for the in-stream shuffle, per worker
    max_corrupt_fraction: float = 0.01  # stop the run when more samples than this are corrupt


@dataclass
class ViewConfig:
    """The two asymmetric views (docs/method.md, "Views"); entries in pairs are (view 1, view 2)."""

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness contrast saturation hue
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet10 | resnet18 | resnet34 | resnet50
    small_stem: bool = False  # 3x3 conv, no max-pool: for images of 64 px or less
    stem_stride: int = 1  # of the small stem: 2 quarters the backbone's cost (the `small` preset)
    projector: str = "8192-8192-8192"
    lambd: float = 0.0051  # weight of the off-diagonal term of the loss


@dataclass
class OptimConfig:
    batch_size: int = 2048  # GLOBAL batch; each rank takes batch_size / world_size
    lr_weights: float = 0.2  # multiplied by batch_size / 256
    lr_biases: float = 0.0048  # for 1-D parameters (biases, BN), also scaled by batch_size / 256
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    eta: float = 0.001  # LARS trust coefficient
    warmup_epochs: float = 10.0
    final_lr_fraction: float = 0.001  # cosine decays to this fraction of the peak


@dataclass
class TrainConfig:
    epochs: int = 1000
    steps: int = 0  # when > 0 it overrides epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the backbone (docs/method.md, "Training speed")
    view_ops: str = "auto"  # gpu data path's ops after the crop: auto (compiled on CUDA with a C compiler) | compiled | eager
    data_path: str = "auto"  # auto (gpu on CUDA) | gpu (gpu_views.py on the device) | cpu (views.py in workers)
    log_every: int = 10  # steps between metrics.jsonl lines (and host syncs)
    diag_every: int = 100  # steps between RankMe / std diagnostics
    checkpoint_every: int = 500  # steps between checkpoints (and always on SIGTERM and at the end)
    deterministic: bool = False  # deterministic kernels, for bit-exact resume tests
    metrics_port: int = 0  # > 0: serve Prometheus metrics on this port (rank 0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        config = cls()
        apply(config, data)
        return config


def _coerce(value: Any, like: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the type of the default it replaces."""
    if isinstance(value, str) and isinstance(like, float) and not isinstance(like, bool):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e38" as a string
            return float(value)
    if isinstance(value, str) and not isinstance(like, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"cannot parse the value of {key}: {exc}") from None
    if isinstance(like, bool):
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, not {value!r}")
        return value
    if isinstance(like, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(like):
            raise UserError(f"{key} must be a list of {len(like)} numbers, like {list(like)}")
        return tuple(_coerce(v, l, key) for v, l in zip(value, like))
    if isinstance(like, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(like, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if type(value) is not type(like):
        kind = {int: "an integer", float: "a number", str: "a string"}.get(type(like), type(like).__name__)
        raise UserError(f"{key} must be {kind}, not {value!r}")
    return value


def set_value(config: Config, key: str, value: Any) -> None:
    """Set a dotted key such as `optim.batch_size`, checking that it exists and the type fits."""
    section_name, _, name = key.partition(".")
    section = getattr(config, section_name, None)
    if section is None or not name or not dataclasses.is_dataclass(section) or not hasattr(section, name):
        sections = ", ".join(f.name for f in dataclasses.fields(config))
        raise UserError(f"unknown config key {key!r} (sections: {sections}; see config.yaml of a run)")
    setattr(section, name, _coerce(value, getattr(section, name), key))


def apply(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply nested ({"optim": {"batch_size": 256}}) or dotted ({"optim.batch_size": 256}) overrides."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            for name, inner in value.items():
                set_value(config, f"{key}.{name}", inner)
        else:
            set_value(config, key, value)
    return config


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"expected key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of sections")
    return data


def save_yaml(config: Config, path: str | Path) -> None:
    data = config.to_dict()
    Path(path).write_text(yaml.safe_dump(_lists(data), sort_keys=False))


def _lists(value: Any) -> Any:
    """YAML-safe copy: tuples become lists."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value
