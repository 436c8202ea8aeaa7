"""What every benchmark records: where it ran (device label, commit) and a random model to time.

Benchmarks run as scripts (`python bench/NAME.py`), so this module is imported by its plain name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from pipeline.files import write_json  # noqa: E402  (after the sys.path insert)


def commit() -> str:
    """The short commit of the checkout, with -dirty when the code differs from it; BARLOW_COMMIT where
    .git is absent (a copied tree on a GPU box)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "serving", "bench/*.py"],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BARLOW_COMMIT", "unknown")


def merge_record(path: Path, key: str, value: dict) -> dict:
    """Set `key` in the JSON record at `path`, keeping what other benchmarks wrote there (one file gathers
    several, e.g. reliability-<date>.json); read just before an atomic replace."""
    record = json.loads(path.read_text()) if path.exists() else {}
    record[key] = value
    write_json(path, record, indent=2)
    return record


def write_record(path: Path, record: dict) -> None:
    """A benchmark's JSON record, written atomically."""
    write_json(path, record, indent=2)


def process_tree(pid: int) -> list:
    """psutil processes of `pid` and all its children (a server: BentoML's manager plus one per service);
    the caller skips any that exit while it reads them (psutil.NoSuchProcess)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(processes: list) -> float:
    """User plus system CPU seconds these processes used so far (those that exited count 0)."""
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def device_label(on_gpu: bool) -> str:
    """The GPU's name (spaces as dashes) when the model ran on one, else cpu-<usable cores>core."""
    if on_gpu:
        import torch

        return torch.cuda.get_device_name(0).replace(" ", "-")
    from pipeline.runtime import usable_cpus

    return f"cpu-{usable_cpus()}core"


def random_model(out: Path, arch: str, image_size: int) -> Path:
    """Export a randomly initialised encoder to out/model: speed does not depend on the weights."""
    from pipeline.train.checkpoint import save_encoder
    from pipeline.config import Config
    from pipeline.export import export_model
    from pipeline.train.model import build_backbone
    from pipeline.train.presets import PRESETS

    config = Config.from_dict(PRESETS["fmnist" if image_size <= 64 else "imagenet"])
    config.model.arch, config.views.image_size = arch, image_size
    backbone, _ = build_backbone(config.model)
    save_encoder(out / "run" / "encoder.pt", backbone, config, step=0)
    export_model(out / "run", out / "model")
    return out / "model"
