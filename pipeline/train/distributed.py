"""Training across processes: joining the group, rank helpers, an autograd-aware sum and the global BatchNorm.

Barlow Twins standardises embeddings and normalises BatchNorm layers with statistics of the GLOBAL
batch. On CUDA with NCCL the model's BatchNorms become torch's `SyncBatchNorm` (the official code's
choice: fused CUDA kernels, one all_gather of [mean, invstd, count] per layer forward and one all_reduce
backward). `SyncBatchNorm` raises on CPU tensors, so on gloo/CPU (the CI tests) they become
`GlobalBatchNorm`, which computes the same thing with an autograd-aware all_reduce whose backward sums
the incoming gradients over ranks: its gradients are exactly those of one process on the concatenated
batch. `tests/test_distributed.py` checks both against plain BatchNorm on the concatenated batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launch_rank() -> int:
    """This process's global rank as torchrun sets it, known before the process group is joined."""
    return int(os.environ.get("RANK", 0))


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (env://).

    By default torchrun's agent keeps one TCPStore for all restarts of the group (--max-restarts), and the
    process group's keys (each rank's address) carry no attempt number: a restarted rank can read the
    address of a rank from the previous attempt, which is dead, and fail to connect ("Connection refused")
    until the restarts run out. With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the training Job sets it) every
    rendezvous round gets a fresh store, hosted by the new rank 0 on a new port, so there are no stale
    keys. Only with the shared store are the keys put under this agent's restart count: that count is the
    same on every rank only with one agent (--nnodes=1). With several agents it is not (an agent whose own
    worker did not fail restarts for the membership change without counting it), and ranks waiting under
    different prefixes would never meet (tests/helpers_cluster.py, scenario c).
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store, rank, world_size = next(dist.rendezvous("env://"))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent's store, shared by restarts
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"barlow/attempt_{attempt}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world_size)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set, so all ranks stop at the same step."""
    if world_size() == 1:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def all_gather_objects(obj: object) -> list[object]:
    """`obj` of every rank, in rank order (a one-element list in a single process)."""
    if world_size() == 1:
        return [obj]
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class _AllReduceSum(torch.autograd.Function):
    """What `torch.distributed.nn.functional.all_reduce` does (deprecated in torch 2.14, and its
    functional-collectives replacement is differentiable only in recent releases): the forward sums
    over ranks, the backward sums the incoming gradients over ranks, its exact adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable: the backward sums the gradients of every rank's copy."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for statistics; fp32 and fp64 unchanged (no copy)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def global_mean_var(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased variance and sample count over `dims` of the global batch (>= fp32).

    Two fused reductions: [sum, count] for the global mean, then each rank's sum of squared
    deviations from it (local M2 plus the shift of the local mean, as in Chan's combination), which
    avoids the cancellation of E[x^2] - E[x]^2.
    """
    x = at_least_fp32(x)
    n = x.numel() // x.shape[1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    if world_size() == 1:
        return mean, var, x.new_full((), n)
    # new_full, not torch.tensor: a fill kernel, no host-to-device copy that would sync the stream
    total = all_reduce_sum(torch.cat([mean * n, x.new_full((1,), n)]))
    count = total[-1]
    global_mean = total[:-1] / count
    m2 = all_reduce_sum(n * (var + (mean - global_mean) ** 2))
    return global_mean, m2 / count, count


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d/2d that normalises with statistics of the global batch in training mode.

    With one process, or in eval mode, it is exactly `F.batch_norm`. Running estimates are updated
    like BatchNorm: momentum (or cumulative average when momentum is None) and the unbiased variance.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        xf = at_least_fp32(x)  # statistics and normalisation in fp32, also under bf16 autocast
        mean, var, count = global_mean_var(xf, dims)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as in _BatchNorm
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def uses_sync_batchnorm() -> bool:
    """SyncBatchNorm where it runs (a CUDA device in an NCCL group), GlobalBatchNorm elsewhere (gloo)."""
    return is_distributed() and dist.get_backend() == "nccl"


def convert_batchnorm(module: nn.Module, sync: bool = False) -> nn.Module:
    """Replace every BatchNorm1d/2d with a global-batch one sharing its parameters, buffers and settings:
    `nn.SyncBatchNorm` when `sync`, else `GlobalBatchNorm`. Both keep BatchNorm's state_dict keys, so a
    checkpoint resumes across them."""
    if sync:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_batchnorm(child))
    return converted
