"""Representation quality of the `fmnist` recipe: pretrain, export, then kNN and linear probe on Fashion-MNIST.

Trains the `fmnist` preset for E epochs (or for as many steps as fit in M minutes, from the speed of a
short calibration run: the learning-rate schedule needs the step count up front), exports MODEL_DIR
(ONNX, parity-checked), evaluates kNN and the linear probe on the test split with the train split as
bank / training set, plus baselines (raw-pixel kNN, random-init kNN and linear), and writes
bench/results/quality-<device>-<date>.json with keys device, commit, epochs, train_minutes, knn, linear
(top-1 fractions), baselines {raw_knn, random_knn, random_linear} and rankme, plus the details.
Targets (issue 6), `fmnist` on one GPU in under 15 minutes of training: kNN >= 0.905, linear >= 0.920.

    PYTHONPATH=. python bench/quality.py --minutes 14                       # one GPU: the target run
    PYTHONPATH=. python bench/quality.py --minutes 5                        # one GPU: fits a 10-minute slot
    PYTHONPATH=. python bench/quality.py --epochs 100 optim.lr_weights=0.3  # key=value overrides the preset
    PYTHONPATH=. python bench/quality.py --steps 20 optim.batch_size=64 --limit-train 10000 --limit-test 2000  # CPU

Needs torch, torchvision, webdataset, onnxruntime (CPU or GPU build) and, for the export, onnx and
onnxscript; not bentoml or faiss. When the export fails (say, no onnx) the error is recorded and the
RUN_DIR is evaluated by torch instead, so a finished training is never lost.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, commit, device_label, write_record  # noqa: E402  (also puts the repo on sys.path)
from pipeline.devices import torch_device  # noqa: E402
from pipeline.train import loop as train  # noqa: E402
from pipeline.config import Config, apply, parse_overrides  # noqa: E402
from pipeline.evaluate.run import evaluate  # noqa: E402
from pipeline.train.presets import PRESETS  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402

TARGETS = {"knn": 0.905, "linear": 0.920, "train_minutes": 15}
log = logging.getLogger("quality")


def source_digest() -> str:
    """sha256 of the pipeline sources and this script: identifies the code where git is absent."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + [Path(__file__).resolve()]:
        digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def train_shards(work: Path) -> Path:
    shards = work / "shards-train"
    if not (shards / "index.json").exists():
        log.info("writing Fashion-MNIST training shards to %s", shards)
        write_shards("fashion-mnist:train", shards, overwrite=True)
    return shards


def calibrate_steps(config: Config, work: Path, minutes: float, steps: int) -> tuple[int, float]:
    """Training steps that fit in `minutes`, from a `steps`-step run of the same config; and its steps/s."""
    probe = Config.from_dict(config.to_dict())
    probe.train.steps, probe.train.log_every = steps, max(1, steps // 10)
    probe.train.checkpoint_every, probe.train.diag_every = 10**9, 10**9
    run_dir = work / "calibrate"
    shutil.rmtree(run_dir, ignore_errors=True)
    train.train(probe, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir, ignore_errors=True)
    # The first half pays for worker start-up and kernel selection; the steady state is what the run sees.
    later = [r["images_per_s"] for r in records if r["step"] > steps // 2] or [records[-1]["images_per_s"]]
    steps_per_s = statistics.median(later) / config.optim.batch_size
    # 10 % margin for what calibration does not see: epoch boundaries, checkpoints, diagnostics, plots.
    return max(1, int(0.9 * minutes * 60 * steps_per_s)), steps_per_s


def pick_eval_via(wanted: str) -> str:
    """onnx (the exported MODEL_DIR) unless a GPU would sit idle under a CPU-only ONNX Runtime: then torch."""
    if wanted != "auto":
        return wanted
    if not torch.cuda.is_available():
        return "onnx"
    import onnxruntime as ort

    return "onnx" if "CUDAExecutionProvider" in ort.get_available_providers() else "torch"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="training epochs of the 60k images (default: the preset's)")
    length.add_argument("--steps", type=int, help="training steps")
    length.add_argument("--minutes", type=float, help="train for about this many minutes (steps from a calibration run)")
    parser.add_argument("--calibration-steps", type=int, default=0, help="steps of the calibration run (default 100 on "
                        "a GPU, 4 on a CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (training and evaluation)")
    parser.add_argument("--eval-via", choices=("auto", "onnx", "torch"), default="auto",
                        help="evaluate MODEL_DIR under ONNX Runtime or RUN_DIR under torch (auto: onnx unless a GPU "
                             "would wait for a CPU-only ONNX Runtime)")
    parser.add_argument("--limit-train", type=int, help="evaluate with only the first N training images")
    parser.add_argument("--limit-test", type=int, help="evaluate on only the first N test images")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="shards, RUN_DIR and MODEL_DIR")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on the fmnist preset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = Config()
    apply(config, PRESETS["fmnist"])
    apply(config, parse_overrides(args.overrides))
    config.train.device = args.device
    device = torch_device(config.train.device)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    config.data.urls = str(train_shards(work))
    calibration = None
    if args.epochs is not None:
        config.train.epochs, config.train.steps = args.epochs, 0
    elif args.steps is not None:
        config.train.steps = args.steps
    elif args.minutes is not None:
        probe_steps = args.calibration_steps or (100 if device.type == "cuda" else 4)
        config.train.steps, steps_per_s = calibrate_steps(config, work, args.minutes, probe_steps)
        calibration = {"steps": probe_steps, "steps_per_s": round(steps_per_s, 3)}
        log.info("calibration: %.2f steps/s -> %d steps for %.1f minutes", steps_per_s, config.train.steps, args.minutes)

    code = {"commit": commit(), "source_sha256": source_digest()}  # before the run: HEAD may move meanwhile
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, model_dir = work / f"run-{stamp}", work / f"model-{stamp}"
    started = time.perf_counter()
    summary = train.train(config, run_dir)
    train_minutes = (time.perf_counter() - started) / 60
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = train.make_plan(config, 1)

    export: dict = {}
    try:
        from pipeline.export import export_model

        info = export_model(run_dir, model_dir)
        export = {"max_rel": info["parity"]["max_rel"], "opset": info["exporter"]["opset"]}
    except Exception as exc:  # noqa: BLE001 - no onnx/onnxscript, or an exporter failure: keep the trained run
        log.warning("export failed (%s: %s); evaluating the RUN_DIR with torch", type(exc).__name__, exc)
        export = {"skipped": f"{type(exc).__name__}: {exc}"[:500]}
    via = "torch" if "skipped" in export else pick_eval_via(args.eval_via)
    result = evaluate(str(model_dir if via == "onnx" else run_dir), "fashion-mnist:train", "fashion-mnist:test",
                      ("knn", "linear"), baselines=True, limit_train=args.limit_train, limit_test=args.limit_test,
                      device=args.device)

    record = {
        "device": device_label(device.type == "cuda"),
        **code,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "epochs": round(summary["step"] / plan.steps_per_epoch, 3),
        "steps": summary["step"],
        "train_minutes": round(train_minutes, 2),
        "knn": result["knn"]["top1"],
        "linear": result["linear"]["top1"],
        "baselines": {name: value["top1"] for name, value in result["baselines"].items()},
        "rankme": round(result["rankme"], 2),
        "top5": {"knn": result["knn"].get("top5"), "linear": result["linear"].get("top5")},
        "targets": {**TARGETS, "met": result["knn"]["top1"] >= TARGETS["knn"]
                    and result["linear"]["top1"] >= TARGETS["linear"] and train_minutes <= TARGETS["train_minutes"]},
        "train": {"images_per_s": round(statistics.median(r["images_per_s"] for r in records), 1),
                  "final_loss": records[-1]["loss"], "calibration": calibration, "run_dir": str(run_dir)},
        "eval": {"via": via, "runtime": result["runtime"], "train_count": result["train"]["count"],
                 "test_count": result["test"]["count"], "knn_k": result["knn"]["k"],
                 "knn_temperature": result["knn"]["temperature"], "linear_weight_decay": result["linear"]["weight_decay"],
                 "linear_validation": result["linear"]["validation"], "seconds": result["seconds"]["total"]},
        "export": export,
        "config": config.to_dict(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda if device.type == "cuda" else None},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quality-{record['device']}-{datetime.date.today().isoformat()}.json"
    write_record(path, record)

    baselines = record["baselines"]
    print(f"device {record['device']}, {record['steps']} steps = {record['epochs']} epochs in "
          f"{record['train_minutes']} min ({record['train']['images_per_s']} pairs/s), eval via {via} on "
          f"{record['eval']['train_count']} / {record['eval']['test_count']} images")
    print(f"kNN top-1     {record['knn']:.4f}   (target {TARGETS['knn']})   random init {baselines['random_knn']:.4f}"
          f"   raw pixels {baselines['raw_knn']:.4f}")
    print(f"linear top-1  {record['linear']:.4f}   (target {TARGETS['linear']})   random init "
          f"{baselines['random_linear']:.4f}")
    print(f"RankMe {record['rankme']}   targets met: {record['targets']['met']}   record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
