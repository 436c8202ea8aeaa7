"""The two evaluation protocols on frozen features: weighted kNN and a linear probe.

- kNN: cosine similarity to every training feature; the k nearest vote for their class with weight
  exp(sim / T) (the classifier of `train.monitor`).
- linear probe: a linear classifier (cross-entropy) on standardised frozen features, trained with
  full-batch L-BFGS (convex, so no schedule to tune) or SGD with a cosine schedule; the weight decay is
  chosen on a held-out part of the training split, then refit on all of it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.train.monitor import DEFAULT_K, DEFAULT_TEMPERATURE, knn_scores, topk_accuracy

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def num_classes(*label_arrays: np.ndarray) -> int:
    return int(max(int(labels.max()) for labels in label_arrays)) + 1


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
