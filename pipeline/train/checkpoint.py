"""Checkpoint files: the full training state (`checkpoints/last.pt`) and the exported `encoder.pt`.

Writes go to a temp file in the same directory, are fsynced, then renamed: a kill at any moment
leaves either the previous file or the new one, never a torn one. Loads use
`torch.load(weights_only=True)`, so a checkpoint can never run code; every value stored here is a
tensor, a number, a string or a container of those.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.train.model import build_encoder

ENCODER_FORMAT = "barlow-embed/encoder/1"
TRAINING_FORMAT = "barlow-embed/training/1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write `obj` to `path` via a temp file and a rename. A write the disk refuses (full, quota, file-size
    limit) is one sentence and leaves the previous file in place.

    Temp files of an earlier save killed midway (kill -9, OOM) are removed first: each path has one writer,
    so they are never in use, and a job preempted again and again must not fill its disk with them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        refused = _os_error(exc)
        if refused is not None:
            raise UserError(f"cannot write {path}: {refused.strerror or refused}; the previous {path.name} "
                            "(if any) is kept") from None
        raise


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: torch.save reports a failed write as a RuntimeError raised while handling it."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


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


def save_encoder(path: str | Path, backbone: nn.Module, config: Config, step: int) -> None:
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    atomic_save({"format": ENCODER_FORMAT, "backbone": state, "config": config.to_dict(), "step": step}, path)


def load_encoder(path: str | Path) -> tuple[nn.Module, Config]:
    """The trained backbone (eval mode, CPU) and the resolved config it was trained with."""
    data = safe_load(path, ENCODER_FORMAT)
    config = Config.from_dict(data["config"])
    backbone, _ = build_encoder(config.model.arch, config.model.small_stem)
    try:
        backbone.load_state_dict(data["backbone"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match {config.model.arch}: {str(exc).splitlines()[0]}") from None
    return backbone.eval(), config
