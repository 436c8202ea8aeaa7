"""`barlow demo`: the whole flow on the embedded default, Fashion-MNIST, sized for a 2-core CPU.

Shards the Debian package's training split, then runs a short `fmnist` pretraining. Every stage is
the real command a user would run; the demo only chooses small sizes. Re-running skips finished stages
(an existing RUN_DIR resumes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import shards, train
from pipeline.config import Config, apply
from pipeline.presets import PRESETS

log = logging.getLogger(__name__)

# About 5 minutes of training on 2 CPU cores: enough for the loss to fall and C to sharpen.
DEMO_STEPS = 60
DEMO_OVERRIDES = {"optim": {"batch_size": 64}, "train": {"log_every": 5, "diag_every": 20, "checkpoint_every": 20}}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for shards, RUN_DIR and later stages")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")


def run(args) -> int:
    out = Path(args.out)
    shard_dir = out / "shards" / "train"
    if not (shard_dir / "index.json").exists():
        log.info("writing Fashion-MNIST training shards to %s", shard_dir)
        shards.write_shards("fashion-mnist:train", shard_dir)
    config = Config()
    apply(config, PRESETS["fmnist"])
    apply(config, DEMO_OVERRIDES)
    config.data.urls = str(shard_dir)
    config.train.steps = args.steps
    run_dir = out / "run"
    summary = train.train(config, run_dir)
    print(f"RUN_DIR {run_dir}: step {summary['step']}, encoder {run_dir / 'encoder.pt'}, "
          f"metrics {run_dir / 'metrics.jsonl'}, plots {run_dir / 'plots'}")
    return 0
