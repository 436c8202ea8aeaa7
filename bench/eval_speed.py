"""Evaluation time: the full Fashion-MNIST kNN and linear probe of a model, with the raw-pixel and random-init
baselines (what bench/quality.py runs), timed end to end for each linear-probe sweep.

`joint` fits every candidate weight decay in one fit and tests the one that wins on the held-out tenth of
train; `separate` fits one decay at a time and refits the winner on all of train. Both read and embed the
70,000 images afresh. Writes bench/results/eval-<device>-<date>.json: per sweep the seconds (features,
total) and the accuracies, so the record shows the fast path gives the slow path's numbers.

    PYTHONPATH=. python bench/eval_speed.py MODEL_DIR                     # both sweeps
    PYTHONPATH=. python bench/eval_speed.py MODEL_DIR --sweeps joint      # the fast path only
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from common import RESULTS, commit, device_label, write_record  # noqa: E402  (also puts the repo on sys.path)
from pipeline.evaluate.run import evaluate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="MODEL_DIR or RUN_DIR")
    parser.add_argument("--sweeps", nargs="+", choices=("joint", "separate"), default=["joint", "separate"])
    parser.add_argument("--limit-train", type=int, help="only the first N training images")
    parser.add_argument("--limit-test", type=int, help="only the first N test images")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    args = parser.parse_args()

    record = {"device": device_label(False), "commit": commit(), "model": args.model, "threads": torch.get_num_threads(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for sweep in args.sweeps:
        result = evaluate(args.model, "fashion-mnist:train", "fashion-mnist:test", ("knn", "linear"), baselines=True,
                          limit_train=args.limit_train, limit_test=args.limit_test, device="cpu", sweep=sweep)
        record[sweep] = {"seconds": result["seconds"], "knn": result["knn"]["top1"], "linear": result["linear"]["top1"],
                         "linear_seconds": result["linear"]["seconds"], "knn_seconds": result["knn"]["seconds"],
                         "weight_decay": result["linear"]["weight_decay"],
                         "baselines": {name: value["top1"] for name, value in result["baselines"].items()},
                         "train_count": result["train"]["count"], "test_count": result["test"]["count"]}
        print(f"{sweep}: {result['seconds']['total']:.0f} s in all ({result['seconds']['features']:.0f} s features), "
              f"kNN {result['knn']['top1']:.4f}, linear {result['linear']['top1']:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"eval-{record['device']}-{datetime.date.today().isoformat()}.json"
    write_record(path, record)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
