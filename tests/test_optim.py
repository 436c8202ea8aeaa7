"""LARS against hand-computed updates, its state_dict, the parameter split and the lr schedule."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from pipeline.config import OptimConfig
from pipeline.train.optim import LARS, build_optimizer, lr_at, param_groups, set_lr


def two_param_lars(weight_decay=0.1, momentum=0.9, eta=0.001, lr=(0.5, 0.1)):
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||W|| = 5
    bias = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = LARS([
        {"params": [weight], "weight_decay": weight_decay, "lars_adaptation": True, "lr": lr[0]},
        {"params": [bias], "weight_decay": 0.0, "lars_adaptation": False, "lr": lr[1]},
    ], momentum=momentum, eta=eta)
    return weight, bias, optimizer


def set_grads(weight, bias):
    weight.grad = torch.tensor([[0.6, 0.8]])
    bias.grad = torch.tensor([0.5, -0.5])


def test_lars_matches_hand_computed_steps():
    weight, bias, optimizer = two_param_lars()
    set_grads(weight, bias)
    optimizer.step()
    # g = [0.6, 0.8] + 0.1 * [3, 4] = [0.9, 1.2], ||g|| = 1.5; trust = 0.001 * 5 / 1.5 = 1/300
    # mu = g / 300 = [0.003, 0.004]; W = [3, 4] - 0.5 * mu
    torch.testing.assert_close(weight.data, torch.tensor([[2.9985, 3.998]]))
    # bias: no decay, no adaptation: mu = grad; b = [1, 2] - 0.1 * [0.5, -0.5]
    torch.testing.assert_close(bias.data, torch.tensor([0.95, 2.05]))

    set_grads(weight, bias)
    optimizer.step()
    # step 2, by the formula with Python floats: momentum 0.9 on the buffers of step 1
    w = [2.9985, 3.998]
    g = [0.6 + 0.1 * w[0], 0.8 + 0.1 * w[1]]
    trust = 0.001 * math.hypot(*w) / math.hypot(*g)
    mu = [0.9 * 0.003 + trust * g[0], 0.9 * 0.004 + trust * g[1]]
    torch.testing.assert_close(weight.data, torch.tensor([[w[0] - 0.5 * mu[0], w[1] - 0.5 * mu[1]]]))
    torch.testing.assert_close(bias.data, torch.tensor([0.95 - 0.1 * 0.95, 2.05 + 0.1 * 0.95]))
    torch.testing.assert_close(optimizer.state[bias]["mu"], torch.tensor([0.95, -0.95]))
    # the step never writes into .grad
    torch.testing.assert_close(weight.grad, torch.tensor([[0.6, 0.8]]))


def test_lars_trust_ratio_is_one_where_a_norm_is_zero():
    zero_weight = nn.Parameter(torch.zeros(2, 2))  # ||p|| = 0
    still_weight = nn.Parameter(torch.full((2, 2), 2.0))  # ||g|| = 0 (no decay)
    optimizer = LARS([zero_weight, still_weight], lr=0.5, weight_decay=0.0, momentum=0.9, eta=0.001)
    zero_weight.grad = torch.ones(2, 2)
    still_weight.grad = torch.zeros(2, 2)
    optimizer.step()
    torch.testing.assert_close(zero_weight.data, torch.full((2, 2), -0.5))  # full, unscaled step
    torch.testing.assert_close(still_weight.data, torch.full((2, 2), 2.0))
    assert torch.isfinite(optimizer.state[still_weight]["mu"]).all()


def test_lars_skips_parameters_without_grad():
    weight, bias, optimizer = two_param_lars()
    weight.grad = torch.tensor([[0.6, 0.8]])
    optimizer.step()
    assert bias.tolist() == [1.0, 2.0] and bias not in optimizer.state


def test_lars_state_dict_round_trip():
    weight, bias, optimizer = two_param_lars()
    set_grads(weight, bias)
    optimizer.step()
    buffer = io.BytesIO()
    params = [weight.detach().clone(), bias.detach().clone()]
    torch.save({"params": params, "optim": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    set_grads(weight, bias)
    optimizer.step()  # the uninterrupted run

    weight2, bias2, resumed = two_param_lars(lr=(0.0, 0.0))  # hyper-parameters come from the state_dict
    with torch.no_grad():
        weight2.copy_(saved["params"][0])
        bias2.copy_(saved["params"][1])
    resumed.load_state_dict(saved["optim"])
    assert set(resumed.state[weight2]) == {"mu"}
    set_grads(weight2, bias2)
    resumed.step()
    assert torch.equal(weight2, weight) and torch.equal(bias2, bias)


def test_param_groups_split_by_dimension():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    weights, biases = param_groups(model, weight_decay=1e-6)
    assert [p.shape for p in weights["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert [p.shape for p in biases["params"]] == [(4,), (4,), (4,), (2,)]  # conv bias, BN w/b, fc bias
    assert (weights["weight_decay"], weights["lars_adaptation"]) == (1e-6, True)
    assert (biases["weight_decay"], biases["lars_adaptation"]) == (0.0, False)


def test_lr_schedule_values():
    total, warmup, peak, final = 1000, 100, 0.8, 0.001
    assert lr_at(0, total, warmup, peak, final) == 0.0
    assert lr_at(50, total, warmup, peak, final) == pytest.approx(0.4)
    assert lr_at(warmup, total, warmup, peak, final) == pytest.approx(peak)
    assert lr_at(total, total, warmup, peak, final) == pytest.approx(final * peak)
    mid = warmup + (total - warmup) // 2  # cosine at pi/2: half-way between peak and final
    assert lr_at(mid, total, warmup, peak, final) == pytest.approx((peak + final * peak) / 2)
    quarter = warmup + (total - warmup) // 4
    q = 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(quarter, total, warmup, peak, final) == pytest.approx(peak * q + final * peak * (1 - q))
    assert lr_at(total + 10, total, warmup, peak, final) == pytest.approx(final * peak)  # clamped
    assert lr_at(0, 10, 0, peak, final) == pytest.approx(peak)  # no warm-up


def test_build_optimizer_scales_peaks_by_batch_and_sets_every_group():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2, bias=False))
    cfg = OptimConfig(batch_size=512, lr_weights=0.2, lr_biases=0.0048, weight_decay=1e-6,
                      momentum=0.9, eta=0.001, warmup_epochs=2, final_lr_fraction=0.001)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, LARS)
    total, warmup = 100, round(cfg.warmup_epochs * 10)  # 10 steps per epoch
    assert set_lr(optimizer, 0, total, warmup, cfg.final_lr_fraction) == 0.0
    lr = set_lr(optimizer, 20, total, warmup, cfg.final_lr_fraction)  # end of warm-up: the peaks, times 512 / 256
    weights, biases = optimizer.param_groups
    assert lr == weights["lr"] == pytest.approx(0.4)
    assert biases["lr"] == pytest.approx(0.0096)
    set_lr(optimizer, total, total, warmup, cfg.final_lr_fraction)
    assert weights["lr"] == pytest.approx(0.4 * 0.001) and biases["lr"] == pytest.approx(0.0096 * 0.001)
    assert weights["momentum"] == 0.9 and weights["eta"] == 0.001 and weights["weight_decay"] == 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lars_cuda_step_equals_cpu_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    results = []
    for device in ("cpu", "cuda"):
        replica = copy.deepcopy(model).to(device)
        optimizer = build_optimizer(replica, OptimConfig(batch_size=256, warmup_epochs=0))
        for step in range(3):
            set_lr(optimizer, step, 10, 0, 0.001)
            batch = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)).to(device)
            replica(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().cpu() for p in replica.parameters()])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-6)
