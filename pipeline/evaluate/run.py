"""`barlow eval {knn,linear}`: how good are the frozen representations on labelled data?

Features of the train and test SRC through the model (`features.py`), then each protocol
(`protocols.py`: weighted kNN, linear probe; docs/method.md). `--baselines` adds raw pixels (kNN) and
the same architecture at random initialisation, so a number means something.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import torch

from pipeline.data.labelled import check_source
from pipeline.devices import torch_device as pick_torch_device
from pipeline.errors import UserError
from pipeline.evaluate import features as feats
from pipeline.evaluate.protocols import DEFAULT_K, DEFAULT_TEMPERATURE, WEIGHT_DECAYS, knn, linear_probe, num_classes
from pipeline.train.diagnostics import rankme

log = logging.getLogger(__name__)


def evaluate(model_path: str, train_src: str, test_src: str, protocols: tuple[str, ...] = ("knn",), *,
             baselines: bool = False, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
             batch_size: int = 256, limit_train: int | None = None, limit_test: int | None = None,
             device: str = "auto", seed: int = 0, **linear_options: Any) -> dict[str, Any]:
    """Features of train and test through the model (and baselines), then each protocol; a JSON-able dict."""
    unknown = set(protocols) - {"knn", "linear"}
    if unknown:
        raise UserError(f"unknown protocol {sorted(unknown)[0]!r}; use knn or linear")
    for name, limit in (("--limit-train", limit_train), ("--limit-test", limit_test)):
        if limit is not None and limit < 1:
            raise UserError(f"{name} must be at least 1, not {limit}")
    check_source(train_src)
    check_source(test_src)
    started = time.perf_counter()
    torch_device = pick_torch_device(device)
    model = feats.open_model(model_path, torch_device)
    functions: dict[str, feats.FeatureFn] = {"model": model.features}
    if baselines:
        functions["raw"] = feats.raw_pixels
        functions["random"] = feats.random_init_model(model, torch_device, seed)
    train = feats.extract(functions, train_src, model.image_size, batch_size, limit_train, desc="train features")
    test = feats.extract(functions, test_src, model.image_size, batch_size, limit_test, desc="test features")

    def run(protocol: str, name: str) -> dict[str, Any]:
        args = (train.features[name], train.labels, test.features[name], test.labels)
        if protocol == "knn":
            return knn(*args, k=k, temperature=temperature, device=torch_device)
        return linear_probe(*args, seed=seed, device=torch_device, **linear_options)

    result: dict[str, Any] = {
        "model": str(model_path), "runtime": model.kind, **model.info, "arch": model.model.arch,
        "image_size": model.image_size, "dim": int(train.features["model"].shape[1]),
        "classes": num_classes(train.labels, test.labels),
        "train": {"src": train_src, **train.counts()}, "test": {"src": test_src, **test.counts()},
    }
    for protocol in protocols:
        result[protocol] = run(protocol, "model")
        log.info("%s top-1 %.4f", protocol, result[protocol]["top1"])
    result["rankme"] = rankme(torch.from_numpy(test.features["model"]).to(torch_device))
    if baselines:
        result["baselines"] = {"raw_knn": run("knn", "raw")}
        for protocol in protocols:
            result["baselines"][f"random_{protocol}"] = run(protocol, "random")
    result["seconds"] = {"features": round(train.seconds + test.seconds, 3),
                         "total": round(time.perf_counter() - started, 3)}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("protocol", choices=("knn", "linear"), help="kNN on cosine similarity, or a linear probe")
    parser.add_argument("model", metavar="MODEL_DIR|RUN_DIR",
                        help="MODEL_DIR (model.onnx, run by ONNX Runtime) or RUN_DIR / encoder.pt (run by torch)")
    parser.add_argument("--train", required=True, metavar="SRC",
                        help="labelled training images: shard URLs or fashion-mnist:train")
    parser.add_argument("--test", required=True, metavar="SRC", help="labelled test images: shard URLs or fashion-mnist:test")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours for the kNN (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="kNN vote weight exp(sim / T) (default %(default)s)")
    parser.add_argument("--baselines", action="store_true",
                        help="also raw pixels (kNN) and the same architecture at random initialisation")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default %(default)s)")
    parser.add_argument("--limit-train", type=int, metavar="N", help="only the first N training images")
    parser.add_argument("--limit-test", type=int, metavar="N", help="only the first N test images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda, for torch models and the protocols")
    parser.add_argument("--optimizer", choices=("lbfgs", "sgd"), default="lbfgs",
                        help="linear probe: full-batch L-BFGS or SGD with a cosine schedule (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=100, help="linear probe with SGD: epochs (default %(default)s)")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS), metavar="WD",
                        help="linear probe: weight decays to choose from on the held-out split")
    parser.add_argument("--sweep", choices=("joint", "separate"), default="joint",
                        help="linear probe: fit every weight decay at once and test the one that wins on the held-out "
                             "split, or one fit per decay and a refit of the winner on all of train (default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="linear probe: part of train held out to choose the weight decay (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random-init baseline and held-out split")


def run(args: argparse.Namespace) -> int:
    linear_options = {}
    if args.protocol == "linear":
        linear_options = {"optimizer": args.optimizer, "epochs": args.epochs,
                          "weight_decays": tuple(args.weight_decays), "val_fraction": args.val_fraction,
                          "sweep": args.sweep}
    result = evaluate(args.model, args.train, args.test, (args.protocol,), baselines=args.baselines, k=args.k,
                      temperature=args.temperature, batch_size=args.batch_size, limit_train=args.limit_train,
                      limit_test=args.limit_test, device=args.device, seed=args.seed, **linear_options)
    accuracy = {key: result[args.protocol][key] for key in ("top1", "top5") if key in result[args.protocol]}
    print(json.dumps({"protocol": args.protocol, **accuracy, **result}, indent=1))
    return 0
