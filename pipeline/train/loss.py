"""The Barlow Twins objective over the GLOBAL batch (Zbontar et al. 2021).

c = standardize(z1).T @ standardize(z2) / global_batch, each view standardised with its own batch
statistics; loss = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2.

Distributed correctness: c and the standardisation statistics are summed over ranks with an
autograd-aware all_reduce whose backward sums the gradients of every rank's copy, i.e. multiplies
each rank's gradient by N. DDP then averages over the N ranks, so the final gradient equals the
single-process gradient on the concatenated batch. The official code and older lightly summed c with
the in-place, non-autograd `torch.distributed.all_reduce` and got 1/N of it.
"""

from __future__ import annotations

import torch

from pipeline.train.distributed import all_reduce_sum, at_least_fp32, global_mean_var, world_size


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-feature (z - mean) / sqrt(var + eps) over the global batch: BatchNorm1d(affine=False)."""
    mean, var, _ = global_mean_var(z, [0])
    return (at_least_fp32(z) - mean) * torch.rsqrt(var + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The D x D cross-correlation of the two views' standardised embeddings, in fp32."""
    # fp32 even under bf16 autocast: the diagonal is compared against 1 and the 8192^2 entries summed
    with torch.autocast(device_type=z1.device.type, enabled=False):
        global_batch = len(z1) * world_size()  # every rank holds the same per-rank batch (stream.py)
        c = standardize(z1).T @ standardize(z2) / global_batch
        return all_reduce_sum(c)


def on_diagonal(c: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(c)


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened (as in the official code)."""
    n, m = c.shape
    assert n == m
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the cross-correlation matrix it came from (for logging and plots)."""
    c = cross_correlation(z1, z2)
    loss = (1 - on_diagonal(c)).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum()
    return loss, c

