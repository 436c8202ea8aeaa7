"""The two evaluation protocols on frozen features: weighted kNN and a linear probe.

- kNN: cosine similarity to every training feature; the k nearest vote for their class with weight
  exp(sim / T) (the classifier of `train.monitor`).
- linear probe: a linear classifier (cross-entropy) on standardised frozen features, trained with
  full-batch L-BFGS (convex, so no schedule to tune) or SGD with a cosine schedule; the weight decay is
  chosen on a held-out part of the training split. By default every candidate decay is fitted in one
  joint fit and the winner on the held-out part is tested (`sweep="joint"`); `separate` fits one decay
  at a time and refits the winner on all of train.
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


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decays: tuple[float, ...], *,
               optimizer: str = "lbfgs", max_iter: int = 300, epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
               seed: int = 0) -> torch.nn.Linear:
    """One linear classifier per weight decay, fitted together: output block j (classes wide) minimises mean
    cross-entropy + weight_decays[j] / 2 * ||W_j||^2. The blocks share no parameters, so the joint minimum is
    each block's own; fitting them as one layer reads the features once per step instead of once per decay."""
    generator = torch.Generator().manual_seed(seed)
    heads = len(weight_decays)
    layer = torch.nn.Linear(x.shape[1], classes * heads).to(x.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    decay = torch.tensor(weight_decays, dtype=torch.float32, device=x.device).repeat_interleave(classes).view(-1, 1)

    def objective(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = layer(inputs).view(len(inputs), heads, classes)
        cross_entropy = F.cross_entropy(logits.transpose(1, 2), targets.view(-1, 1).expand(-1, heads))
        return heads * cross_entropy + (decay / 2 * layer.weight.pow(2)).sum()  # a sum over the heads' problems

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = objective(x, y)
            loss.backward()
            return loss

        opt.step(closure)
        return layer
    if optimizer != "sgd":
        raise UserError(f"--optimizer must be lbfgs or sgd, not {optimizer!r}")
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss = objective(x[batch], y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return layer


def head_logits(layer: torch.nn.Linear, x: torch.Tensor, classes: int, head: int) -> torch.Tensor:
    """Logits of block `head` of a `fit_linear` layer."""
    return layer(x)[:, head * classes:(head + 1) * classes]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 weight_decays: tuple[float, ...] = WEIGHT_DECAYS, val_fraction: float = 0.1,
                 optimizer: str = "lbfgs", sweep: str = "joint", seed: int = 0, device: torch.device | None = None,
                 **fit_options: Any) -> dict[str, Any]:
    """Linear-probe accuracy; the weight decay is the best on a held-out `val_fraction` of train.

    sweep `joint` (the default): every decay fitted at once on the rest of train (`fit_linear`), and the
    classifier that wins on the held-out part is the one tested: one fit. `separate`: one fit per decay,
    then a refit of the chosen one on all of train (the slower path; the same numbers up to the 10 %
    of data the joint path leaves out of the final fit)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    if not weight_decays or min(weight_decays) < 0:
        raise UserError("--weight-decays must be one or more numbers >= 0")
    if sweep not in ("joint", "separate"):
        raise UserError(f"--sweep must be joint or separate, not {sweep!r}")
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
    held_out = max(1, round(val_fraction * len(x)))
    chosen, chosen_head, fitted_on, layer = 0, 0, slice(None), None
    if len(weight_decays) > 1 and len(x) - held_out >= 2:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
        val, part = order[:held_out], order[held_out:]
        joint = fit_linear(x[part], y[part], classes, tuple(weight_decays), **fit) if sweep == "joint" else None
        best = -1.0
        for head, wd in enumerate(weight_decays):
            candidate = joint or fit_linear(x[part], y[part], classes, (wd,), **fit)
            with torch.no_grad():
                logits = head_logits(candidate, x[val], classes, head if joint else 0)
                accuracy = float((logits.argmax(1) == y[val]).float().mean())
            validation[f"{wd:g}"] = accuracy
            if accuracy > best or (accuracy == best and wd < weight_decays[chosen]):  # ties: the smaller decay
                best, chosen = accuracy, head
        if joint is not None:
            layer, chosen_head, fitted_on = joint, chosen, part
    if layer is None:  # one decay, or the separate sweep's refit of the chosen one on all of train
        layer = fit_linear(x, y, classes, (weight_decays[chosen],), **fit)
    with torch.no_grad():
        result = topk_accuracy(head_logits(layer, test, classes, chosen_head), torch.from_numpy(test_y).to(device))
        train_top1 = float((head_logits(layer, x[fitted_on], classes, chosen_head).argmax(1) == y[fitted_on]).float().mean())
    return {**result, "train_top1": train_top1, "weight_decay": weight_decays[chosen], "validation": validation,
            "optimizer": optimizer, "sweep": sweep, "seconds": round(time.perf_counter() - start, 3)}
