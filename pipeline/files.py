"""Atomic file writes: a reader sees the previous file or the new one, never a torn one.

Every file the pipeline publishes (checkpoints, model.onnx, parquet parts, manifests, index files,
bench records) goes through `atomic_output`: write to a temp file in the same folder, fsync it, rename
it over the target. A kill at any moment leaves at most a `.NAME.*.tmp` file behind, and a write the
disk refuses (full, quota, file-size limit) is one sentence that keeps the previous file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import UserError


def temp_pattern(path: Path) -> str:
    """The glob of temp files `atomic_output` creates for `path` (to clean up after a killed writer)."""
    return f".{path.name}.*.tmp"


def remove_stale_temps(path: Path) -> None:
    """Remove temp files of earlier writes of `path` killed midway. Only for paths with one writer:
    another writer's temp file may still be in use."""
    for stale in path.parent.glob(temp_pattern(path)):
        stale.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds, fsync it and rename it to `path`.

    On any failure the temp file is removed and `path` keeps its previous content; an OSError from
    the disk (found also behind the RuntimeError torch.save raises) becomes one UserError sentence.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        refused = None if isinstance(exc, (UserError, KeyboardInterrupt, SystemExit)) else _os_error(exc)
        if refused is not None:
            raise UserError(f"cannot write {path}: {refused.strerror or refused}; the previous {path.name} "
                            "(if any) is kept") from None
        raise


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError `exc` is or was raised from (torch.save wraps a failed write in a RuntimeError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as temp:
        temp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any, indent: int = 1) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def save_torch(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_output(path) as temp, open(temp, "wb") as file:  # a file object: the archive is named "archive"
        torch.save(obj, file)
