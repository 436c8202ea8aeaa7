"""GlobalBatchNorm, SyncBatchNorm and the global-batch loss: 2 processes must match 1 process on the whole batch.

One BatchNorm layer over 2 gloo processes (GlobalBatchNorm on CPU; on CUDA also SyncBatchNorm, both
processes on one GPU, which gloo allows and NCCL would refuse) must give the forward output, running
statistics and gradients of plain BatchNorm on the concatenated batch. The model-level test spawns real processes (torch.multiprocessing, gloo on 127.0.0.1) running DDP over a
small BarlowTwins, each with half of a fixed batch, and compares the averaged gradients with those of
one process on the concatenated batch with plain BatchNorm. It also runs the official code's
reduction (in-place, non-autograd all_reduce of c) and checks that it gets exactly half the gradient,
which is the bug this project must not have.
"""

from __future__ import annotations

import copy
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import ModelConfig
from pipeline.train.distributed import (GlobalBatchNorm, all_reduce_sum, convert_batchnorm, rank,
                                        uses_sync_batchnorm, world_size)
from pipeline.train.loss import barlow_twins_loss, off_diagonal, on_diagonal, standardize
from pipeline.train.model import BarlowTwins

BATCH, SIZE, LAMBD = 8, 8, 0.0051


def make_model_and_batch() -> tuple[BarlowTwins, torch.Tensor, torch.Tensor]:
    """The same small model and batch in every process (fixed seeds)."""
    torch.manual_seed(0)
    model = BarlowTwins(ModelConfig("resnet18", small_stem=True, projector="32-32"))
    for module in model.modules():  # non-trivial BN affine (zero_init_residual zeroes some), so every
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):  # parameter gets a gradient
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    generator = torch.Generator().manual_seed(1)
    view1 = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    view2 = view1 + 0.5 * torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    return model, view1, view2


def official_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The official code's reduction: c summed with the in-place, non-autograd all_reduce."""
    c = standardize(z1).T @ standardize(z2) / (len(z1) * world_size())
    dist.all_reduce(c)  # torch warns at backward that c10d::allreduce_ has no autograd kernel: the bug
    return (1 - on_diagonal(c)).pow(2).sum() + LAMBD * off_diagonal(c).pow(2).sum()


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


def worker(process_rank: int, port: int, out: str, device: str, sync: bool) -> None:
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process_rank, world_size=2)
    try:
        model, view1, view2 = make_model_and_batch()
        half = slice(process_rank * BATCH // 2, (process_rank + 1) * BATCH // 2)
        view1, view2 = view1[half].to(device), view2[half].to(device)
        results = {"world_size": world_size(), "rank": rank()}
        for name, loss_fn in [("autograd", lambda z1, z2: barlow_twins_loss(z1, z2, LAMBD)[0]),
                              ("official", official_loss)]:
            replica = convert_batchnorm(copy.deepcopy(model), sync=sync).to(device)
            ddp = nn.parallel.DistributedDataParallel(replica)
            loss = loss_fn(*ddp(view1, view2))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="c10d::allreduce_: an autograd kernel")
                loss.backward()
            results[name] = {"loss": loss.detach().cpu(), "grads": gradients(replica),
                             "buffers": {k: v.cpu().clone() for k, v in replica.named_buffers()}}
        if process_rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# (device, sync): GlobalBatchNorm on CPU; on CUDA both kinds, two processes on one GPU (gloo moves CUDA
# tensors through the host, NCCL would refuse two ranks on one device)
KINDS = [pytest.param("cuda", False, marks=ON_CUDA, id="cuda-global"),
         pytest.param("cuda", True, marks=ON_CUDA, id="cuda-sync")]


def layer_inputs() -> tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]:
    """A global batch, an upstream gradient for it and a BatchNorm2d with non-trivial affine parameters."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, 3, 3, generator=generator) * 2 + 1
    grad = torch.randn(BATCH, 4, 3, 3, generator=generator)
    layer = nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=generator)
        layer.bias.uniform_(-0.2, 0.2, generator=generator)
    return x, grad, layer


def layer_worker(process_rank: int, port: int, out: str, device: str, sync: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process_rank, world_size=2)
    try:
        x, grad, layer = layer_inputs()
        layer = convert_batchnorm(layer, sync=sync).to(device)
        assert type(layer) is (nn.SyncBatchNorm if sync else GlobalBatchNorm)
        half = slice(process_rank * BATCH // 2, (process_rank + 1) * BATCH // 2)
        x = x[half].to(device).requires_grad_()
        y = layer(x)
        (y * grad[half].to(device)).sum().backward()  # summed over ranks: the loss of the whole batch
        weight_grads = torch.stack([layer.weight.grad, layer.bias.grad])
        dist.all_reduce(weight_grads)  # each rank holds its samples' share of these
        outputs = [None, None]
        dist.all_gather_object(outputs, (y.detach().cpu(), x.grad.cpu()))
        if process_rank == 0:
            torch.save({"y": torch.cat([o[0] for o in outputs]), "x_grad": torch.cat([o[1] for o in outputs]),
                        "weight_grads": weight_grads.cpu(), "running_mean": layer.running_mean.cpu(),
                        "running_var": layer.running_var.cpu()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device, sync", [pytest.param("cpu", False, marks=pytest.mark.slow)] + KINDS)  # ~15 s: spawns
def test_global_batchnorm_layer_on_two_processes_is_batchnorm_on_the_whole_batch(tmp_path, device, sync):
    out = tmp_path / "rank0.pt"
    mp.spawn(layer_worker, args=(free_port(), str(out), device, sync), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    x, grad, layer = layer_inputs()
    x.requires_grad_()
    y = layer(x)
    (y * grad).sum().backward()
    torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["x_grad"], x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["weight_grads"], torch.stack([layer.weight.grad, layer.bias.grad]), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(got["running_mean"], layer.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["running_var"], layer.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device, sync", [pytest.param("cpu", False, marks=pytest.mark.slow)] + KINDS)
def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path, monkeypatch, device, sync):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(free_port(), str(out), device, sync), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert (got["world_size"], got["rank"]) == (2, 0)

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, view1, view2 = make_model_and_batch()  # plain BatchNorm, whole batch, one process
    model.to(device)
    loss, _ = barlow_twins_loss(*model(view1.to(device), view2.to(device)), LAMBD)
    loss.backward()
    loss = loss.detach().cpu()
    expected = gradients(model)
    # measured on CPU: max |difference| / max |gradient| of a parameter ~1e-5 (summation order)
    scale = max(g.abs().max().item() for g in expected.values())
    tolerance = dict(rtol=1e-4, atol=1e-5 * scale)

    ours, official = got["autograd"], got["official"]
    torch.testing.assert_close(ours["loss"], loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(official["loss"], loss, rtol=1e-5, atol=1e-6)
    assert sum(g.abs().sum().item() > 0 for g in expected.values()) == len(expected)  # all non-trivial
    for name, grad in expected.items():
        torch.testing.assert_close(ours["grads"][name], grad, **tolerance, msg=f"gradient of {name}")
        # the official reduction: exactly 1/world_size of the true gradient
        torch.testing.assert_close(official["grads"][name], grad / 2, **tolerance, msg=f"official {name}")
    # running statistics were updated from the global batch, like BatchNorm on the whole batch
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(ours["buffers"][name], buffer.cpu(), rtol=1e-4, atol=1e-6, msg=name)


def test_helpers_without_distributed():
    assert world_size() == 1 and rank() == 0 and not uses_sync_batchnorm()
    x = torch.randn(3, requires_grad=True)
    assert all_reduce_sum(x) is x


@pytest.mark.parametrize("shape", [(16, 6), (16, 6, 5), (8, 6, 4, 4)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_is_batchnorm_in_one_process(shape, momentum):
    torch.manual_seed(0)
    plain = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(6, momentum=momentum)
    nn.init.uniform_(plain.weight, 0.5, 1.5)
    ours = convert_batchnorm(copy.deepcopy(plain))
    assert isinstance(ours, GlobalBatchNorm)
    for training in (True, True, False):
        plain.train(training)
        ours.train(training)
        x = torch.randn(shape) * 3 + 1
        torch.testing.assert_close(ours(x), plain(x))
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    torch.testing.assert_close(ours.running_var, plain.running_var)
    assert ours.num_batches_tracked.item() == 2


def test_global_batchnorm_rejects_wrong_rank_input():
    with pytest.raises(ValueError, match="expected 2D, 3D or 4D input"):
        GlobalBatchNorm(3)(torch.randn(3))


@pytest.mark.slow  # five forward passes of a ResNet-18 (~8 s on 2 cores)
def test_convert_batchnorm_keeps_parameters_buffers_and_settings():
    model, view1, view2 = make_model_and_batch()
    model.projector[1].eps, model.projector[1].momentum = 1e-3, 0.3
    model.train()
    model(view1, view2)  # non-default running stats
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)}
    converted = convert_batchnorm(copy.deepcopy(model))
    for name, module in converted.named_modules():
        if name in bns:
            assert type(module) is GlobalBatchNorm, name
            assert (module.eps, module.momentum, module.affine) == (bns[name].eps, bns[name].momentum, True)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    reference = model.state_dict()
    assert converted.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in converted.state_dict().items())
    for training in (True, False):
        model.train(training)
        converted.train(training)
        for a, b in zip(model(view1, view2), converted(view1, view2)):
            torch.testing.assert_close(a, b)
    affine_free = convert_batchnorm(nn.BatchNorm1d(4, affine=False, track_running_stats=False))
    assert affine_free.weight is None and affine_free.running_mean is None


def test_sync_and_global_batchnorm_checkpoints_are_interchangeable():
    """SyncBatchNorm (NCCL) and GlobalBatchNorm (gloo) keep BatchNorm's state_dict: a run resumes across them."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    plain.train()(torch.randn(6, 3, 1, 1))  # non-default running stats
    synced = convert_batchnorm(copy.deepcopy(plain), sync=True)
    assert [type(m) for m in synced if "BatchNorm" in type(m).__name__] == [nn.SyncBatchNorm] * 2
    reference = plain.state_dict()
    assert synced.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in synced.state_dict().items())
    globalised = convert_batchnorm(copy.deepcopy(plain))
    globalised.load_state_dict(synced.state_dict())
    x = torch.randn(5, 3, 1, 1)
    torch.testing.assert_close(globalised.eval()(x), plain.eval()(x))
