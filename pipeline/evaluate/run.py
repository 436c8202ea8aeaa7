"""`barlow eval {knn,linear}`: how good are the frozen representations on labelled data?

Two standard protocols on backbone features (REFERENCE.md section 1), both on precomputed features:
- kNN: cosine similarity to every training feature, the k nearest vote for their class with weight
  exp(sim / T) (k=20, T=0.07, as the lightly / solo-learn monitors).
- linear probe: a linear classifier (cross-entropy) on standardised frozen features, trained with
  full-batch L-BFGS (as CLIP's probes; convex, so no schedule to tune) or SGD with a cosine schedule;
  the weight decay is chosen on a held-out part of the training split, then refit on all of it.
`--baselines` adds raw pixels (kNN) and the same architecture at random initialisation, so a number
means something. The `KnnMonitor` runs the kNN during training on a small labelled set.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.evaluate import features as feats
from pipeline.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_K, DEFAULT_TEMPERATURE = 20, 0.07


# ---------------------------------------------------------------- metrics


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 always, top5 when there are more than 5 classes; fractions 0-1."""
    ks = (1, 5) if scores.shape[1] > 5 else (1,)
    ranked = scores.topk(max(ks), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    return {f"top{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def num_classes(*label_arrays: np.ndarray) -> int:
    return int(max(int(labels.max()) for labels in label_arrays)) + 1


# ---------------------------------------------------------------- kNN


@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, classes: int,
               k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, exclude_self: bool = False,
               chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, classes]: sum over the k most cosine-similar bank rows of exp(sim / T) per class.

    `exclude_self`: the queries are the bank (same order) and each row's own match is left out.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, len(bank) - int(exclude_self))
    if k < 1:
        raise UserError("the kNN needs at least 2 labelled training images")
    scores = []
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ bank.T
        if exclude_self:
            rows = torch.arange(len(sim), device=sim.device)
            sim[rows, rows + start] = -math.inf
        top_sim, top_index = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), classes, device=sim.device)
        scores.append(votes.scatter_add_(1, bank_labels[top_index], weights))
    return torch.cat(scores)


def knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE, device: torch.device | None = None) -> dict[str, Any]:
    """Weighted cosine kNN accuracy of the test features against the training features."""
    if k < 1 or not temperature > 0:
        raise UserError(f"--k must be >= 1 and --temperature > 0 (got {k}, {temperature})")
    device = device or torch.device("cpu")
    start = time.perf_counter()
    classes = num_classes(train_y, test_y)
    scores = knn_scores(torch.from_numpy(train_x).to(device), torch.from_numpy(train_y).to(device),
                        torch.from_numpy(test_x).to(device), classes, k, temperature)
    result = topk_accuracy(scores, torch.from_numpy(test_y).to(device))
    return {**result, "k": k, "temperature": temperature, "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------- linear probe


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, *, optimizer: str = "lbfgs",
               max_iter: int = 300, epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
               seed: int = 0) -> torch.nn.Linear:
    """A linear classifier minimising mean cross-entropy + weight_decay / 2 * ||W||^2 on fixed features."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], classes).to(x.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(layer(x), y) + weight_decay / 2 * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return layer
    if optimizer != "sgd":
        raise UserError(f"--optimizer must be lbfgs or sgd, not {optimizer!r}")
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD([{"params": [layer.weight], "weight_decay": weight_decay},
                           {"params": [layer.bias], "weight_decay": 0.0}], lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(layer(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return layer


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 weight_decays: tuple[float, ...] = WEIGHT_DECAYS, val_fraction: float = 0.1,
                 optimizer: str = "lbfgs", seed: int = 0, device: torch.device | None = None,
                 **fit_options: Any) -> dict[str, Any]:
    """Linear-probe accuracy; the weight decay is the best on a held-out `val_fraction` of train."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    if not weight_decays or min(weight_decays) < 0:
        raise UserError("--weight-decays must be one or more numbers >= 0")
    device = device or torch.device("cpu")
    start = time.perf_counter()
    classes = num_classes(train_y, test_y)
    x = torch.from_numpy(train_x).float().to(device)
    y = torch.from_numpy(train_y).to(device)
    # Standardise with train statistics: a fixed affine map, so the probe is still linear in the features,
    # and one weight-decay grid fits every encoder's feature scale.
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    test = (torch.from_numpy(test_x).float().to(device) - mean) / std
    fit = dict(optimizer=optimizer, seed=seed, **fit_options)

    validation: dict[str, float] = {}
    chosen = weight_decays[0]
    held_out = max(1, round(val_fraction * len(x)))
    if len(weight_decays) > 1 and len(x) - held_out >= 2:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
        val, part = order[:held_out], order[held_out:]
        best = -1.0
        for wd in weight_decays:
            layer = fit_linear(x[part], y[part], classes, wd, **fit)
            with torch.no_grad():
                accuracy = float((layer(x[val]).argmax(1) == y[val]).float().mean())
            validation[f"{wd:g}"] = accuracy
            if accuracy > best:  # ties keep the smaller decay found first
                best, chosen = accuracy, wd
    layer = fit_linear(x, y, classes, chosen, **fit)
    with torch.no_grad():
        result = topk_accuracy(layer(test), torch.from_numpy(test_y).to(device))
        train_top1 = float((layer(x).argmax(1) == y).float().mean())
    return {**result, "train_top1": train_top1, "weight_decay": chosen, "validation": validation,
            "optimizer": optimizer, "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------- the evaluation of a model


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
    feats.check_source(train_src)
    feats.check_source(test_src)
    started = time.perf_counter()
    torch_device = feats.pick_device(device)
    model = feats.open_model(model_path, torch_device)
    encoders: dict[str, feats.Encoder] = {"model": model.encoder}
    if baselines:
        encoders["raw"] = feats.raw_pixels
        encoders["random"] = feats.random_init_encoder(model, torch_device, seed)
    train = feats.extract(encoders, train_src, model.image_size, batch_size, limit_train, desc="train features")
    test = feats.extract(encoders, test_src, model.image_size, batch_size, limit_test, desc="test features")

    def run(protocol: str, name: str) -> dict[str, Any]:
        args = (train.features[name], train.labels, test.features[name], test.labels)
        if protocol == "knn":
            return knn(*args, k=k, temperature=temperature, device=torch_device)
        return linear_probe(*args, seed=seed, device=torch_device, **linear_options)

    from pipeline.train.diagnostics import rankme

    result: dict[str, Any] = {
        "model": str(model_path), "runtime": model.kind, **model.info, "arch": model.arch,
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


# ---------------------------------------------------------------- the online monitor of training


class KnnMonitor:
    """kNN accuracy of the training backbone on a small labelled set, every `every` steps (rank 0).

    Leave-one-out over the one set: each image is classified by its k nearest other images, so a
    single held-out shard set is enough. Images are read and preprocessed once, at the start.
    """

    def __init__(self, src: str, image_size: int, mean, std, every: int, limit: int = 2000, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, batch_size: int = 256):
        if every < 1:
            raise UserError(f"--monitor-every must be at least 1, not {every}")
        tally = feats.Tally()
        pairs = list(feats.iter_labelled(src, image_size, tally, limit))
        if len(pairs) < 2:
            raise UserError(f"--monitor-data {src} has {len(pairs)} labelled images; the kNN monitor needs at least 2")
        self.images = torch.from_numpy(np.stack([image for image, _ in pairs]))
        self.labels = torch.tensor([label for _, label in pairs])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.every, self.k, self.temperature, self.batch_size = every, k, temperature, batch_size
        self.last: float | None = None
        self.next_step = every
        log.info("kNN monitor: %d labelled images from %s every %d steps", len(pairs), src, every)

    def due(self, step: int, total_steps: int) -> bool:
        """True at the first step asked about once `every` steps passed since the last run, and at the end."""
        if step >= self.next_step or step == total_steps:
            self.next_step = step + self.every
            return True
        return False

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """{"knn_top1": ...} for the backbone as it is now; its train/eval mode is restored."""
        was_training = backbone.training
        backbone.eval()
        mean, std = self.mean.to(device), self.std.to(device)
        chunks = []
        for start in range(0, len(self.images), self.batch_size):
            images = self.images[start:start + self.batch_size].to(device)
            chunks.append(backbone((images.float() / 255 - mean) / std).float())
        backbone.train(was_training)
        features, labels = torch.cat(chunks), self.labels.to(device)
        scores = knn_scores(features, labels, features, int(labels.max()) + 1, self.k, self.temperature,
                            exclude_self=True)
        self.last = topk_accuracy(scores, labels)["top1"]
        return {"knn_top1": self.last}

    def postfix(self) -> dict[str, str]:
        return {} if self.last is None else {"knn": f"{self.last:.3f}"}

    def attach(self, gauges: Any) -> None:
        """Add a `barlow_train_knn_top1` gauge to the run's Prometheus gauges (updated from each record)."""
        from prometheus_client import Gauge

        gauges.gauges["knn_top1"] = Gauge("barlow_train_knn_top1", "kNN top-1 accuracy on the monitor set",
                                          registry=gauges.registry)


# ---------------------------------------------------------------- CLI


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
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder call (default %(default)s)")
    parser.add_argument("--limit-train", type=int, metavar="N", help="only the first N training images")
    parser.add_argument("--limit-test", type=int, metavar="N", help="only the first N test images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda, for torch models and the protocols")
    parser.add_argument("--optimizer", choices=("lbfgs", "sgd"), default="lbfgs",
                        help="linear probe: full-batch L-BFGS or SGD with a cosine schedule (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=100, help="linear probe with SGD: epochs (default %(default)s)")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS), metavar="WD",
                        help="linear probe: weight decays to choose from on the held-out split")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="linear probe: part of train held out to choose the weight decay (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random-init baseline and held-out split")


def run(args: argparse.Namespace) -> int:
    linear_options = {}
    if args.protocol == "linear":
        linear_options = {"optimizer": args.optimizer, "epochs": args.epochs,
                          "weight_decays": tuple(args.weight_decays), "val_fraction": args.val_fraction}
    result = evaluate(args.model, args.train, args.test, (args.protocol,), baselines=args.baselines, k=args.k,
                      temperature=args.temperature, batch_size=args.batch_size, limit_train=args.limit_train,
                      limit_test=args.limit_test, device=args.device, seed=args.seed, **linear_options)
    accuracy = {key: result[args.protocol][key] for key in ("top1", "top5") if key in result[args.protocol]}
    print(json.dumps({"protocol": args.protocol, **accuracy, **result}, indent=1))
    return 0
