"""Checkpoint files: the full training state (`checkpoints/last.pt`) and the exported `encoder.pt`.

This module alone builds and reads both dicts. Writes are atomic (`files.save_torch`): a kill at any
moment leaves the previous file or the new one, never a torn one. Loads use
`torch.load(weights_only=True)`, so a checkpoint can never run code; every value stored here is a
tensor, a number, a string or a container of those.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.files import remove_stale_temps, save_torch
from pipeline.train.model import build_backbone

ENCODER_FORMAT = "barlow-embed/encoder/1"
TRAINING_FORMAT = "barlow-embed/training/1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """`files.save_torch`, first removing temp files of saves killed midway (kill -9, OOM): a checkpoint
    has one writer, and a job preempted again and again must not fill its disk with them."""
    remove_stale_temps(Path(path))
    save_torch(path, obj)


def safe_load(path: str | Path, expected_format: str) -> dict[str, Any]:
    """Load a checkpoint written by this project, or fail with one sentence saying why."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): {reason[:200]}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not a {expected_format} checkpoint (found {found!r})")
    return data


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: torch (CPU and, on CUDA, the device) and Python's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def save_training(path: Path, *, config: Config, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                  rng: list[dict[str, Any]], first_crosscorr: torch.Tensor | None, first_crosscorr_step: int) -> None:
    """The full training state: model, optimizer, step, the RNG state of every rank (index = rank) and the
    first logged cross-correlation (for the before/after plot)."""
    atomic_save({
        "format": TRAINING_FORMAT, "config": config.to_dict(), "step": step,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
        "crosscorr_first": first_crosscorr, "crosscorr_first_step": first_crosscorr_step,
    }, path)


def load_training(path: Path, config: Config) -> dict[str, Any]:
    """The training state at `path`, refused when it was trained with another model section."""
    state = safe_load(path, TRAINING_FORMAT)
    if state["config"]["model"] != config.to_dict()["model"]:
        raise UserError(f"{path} was trained with a different model section; use a new --out")
    return state


def save_encoder(path: str | Path, backbone: nn.Module, config: Config, step: int) -> None:
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    atomic_save({"format": ENCODER_FORMAT, "backbone": state, "config": config.to_dict(), "step": step}, path)


def load_encoder(path: str | Path) -> tuple[nn.Module, Config]:
    """The trained backbone (eval mode, CPU) and the resolved config it was trained with."""
    data = safe_load(path, ENCODER_FORMAT)
    config = Config.from_dict(data["config"])
    backbone, _ = build_backbone(config.model)
    try:
        backbone.load_state_dict(data["backbone"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match {config.model.arch}: {str(exc).splitlines()[0]}") from None
    return backbone.eval(), config
