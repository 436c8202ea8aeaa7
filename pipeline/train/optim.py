"""LARS and the learning-rate schedule of the paper: linear warm-up, then cosine, lr scaled by batch/256.

As in the official implementation, 1-D parameters (biases, BatchNorm) get neither weight decay nor
the LARS trust ratio, and have their own learning rate. The update runs on whole parameter groups
with foreach ops, so there is no per-parameter Python loop of tensor ops in the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pipeline.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS as in the official Barlow Twins code, per group:

        g = grad + wd * p;  g *= eta * ||p|| / ||g|| (1 where a norm is 0);  mu = momentum * mu + g;
        p -= lr * mu

    Each param group says whether it is decayed (`weight_decay` > 0) and adapted (`lars_adaptation`).
    """

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, lars_adaptation: bool = True):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        lars_adaptation=lars_adaptation)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars_adaptation"]:
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((param_norms > 0) & (grad_norms > 0),
                                    group["eta"] * param_norms / grad_norms, torch.ones_like(param_norms))
                grads = torch._foreach_mul(grads, list(trust.unbind(0)))
            for p in params:  # lazily created state, not a tensor op per step
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            mus = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, grads)
            torch._foreach_add_(params, mus, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[weights (ndim > 1): decayed and adapted, biases (ndim <= 1, also BN): neither], as in the paper."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"name": "weights", "params": [p for p in params if p.ndim > 1],
         "weight_decay": weight_decay, "lars_adaptation": True},
        {"name": "biases", "params": [p for p in params if p.ndim <= 1],
         "weight_decay": 0.0, "lars_adaptation": False},
    ]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final_fraction: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine to `final_fraction * peak`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    q = 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay_steps) / decay_steps))
    return peak * q + peak * final_fraction * (1 - q)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int,
           final_fraction: float) -> float:
    """Set every group's lr from its own `peak_lr` (weights and biases have separate peaks); return the
    weights' lr, for logging."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total_steps, warmup_steps, group["peak_lr"], final_fraction)
    return optimizer.param_groups[0]["lr"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> LARS:
    """LARS over `model`; call `set_lr` every step for the warm-up + cosine schedule.

    Peaks are `lr * batch_size / 256` (the paper's scaling), stored in the groups so that they travel
    with the optimizer's state_dict.
    """
    groups = param_groups(model, cfg.weight_decay)
    scale = cfg.batch_size / 256
    groups[0]["peak_lr"] = cfg.lr_weights * scale
    groups[1]["peak_lr"] = cfg.lr_biases * scale
    return LARS(groups, lr=0.0, momentum=cfg.momentum, eta=cfg.eta)
