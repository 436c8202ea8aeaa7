"""`train.compile` (torch.compile of the backbone in the training step) on CPU: the same losses as eager
within float tolerance, and a run resumed from a checkpoint continues bit for bit like an uninterrupted
compiled run. Whether compile is faster is a GPU measurement (`bench/train_throughput.py --compile`
records eager and compiled steps/s side by side); it is not the default until such a record says so.

The resume check runs in one process, with one compiled model restarted from state dicts (a checkpoint
written, then loaded with a new optimizer): three CLI processes would each spend minutes compiling on
2 cores.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import Config, apply
from pipeline.train.checkpoint import load_training, save_training
from pipeline.train.loop import training_step
from pipeline.train.model import BarlowTwins
from pipeline.train.optim import build_optimizer, set_lr
from pipeline.train.presets import PRESETS

pytestmark = pytest.mark.slow  # inductor compiles the forward and backward once (~1 min on 2 cores)

STEPS, RESUME_AT = 4, 2


def tiny_config() -> Config:
    config = Config()
    apply(config, PRESETS["tiny"])
    config.optim.batch_size = 8
    return config


def batches(config: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    size = config.views.image_size
    return [(torch.randn(8, 3, size, size, generator=generator), torch.randn(8, 3, size, size, generator=generator))
            for _ in range(STEPS)]


def run_steps(model, optimizer, config: Config, data, steps: range) -> list[float]:
    losses = []
    for step in steps:
        set_lr(optimizer, step, STEPS, 1, config.optim.final_lr_fraction)
        loss, _, _ = training_step(model, optimizer, *data[step], config.model.lambd, torch.autocast("cpu", enabled=False))
        losses.append(float(loss))
    return losses


def test_compiled_step_matches_eager_and_resumes_bit_identically(tmp_path):
    config = tiny_config()
    data = batches(config)
    torch.manual_seed(0)
    model = BarlowTwins(config.model)
    initial = copy.deepcopy(model.state_dict())
    eager_losses = run_steps(model, build_optimizer(model, config.optim), config, data, range(STEPS))

    model.load_state_dict(initial)
    model.backbone.compile()  # compiled once; each run below restarts it from a state dict

    def restart(state: dict, optimizer_state: dict | None = None) -> torch.optim.Optimizer:
        model.load_state_dict(state)
        optimizer = build_optimizer(model, config.optim)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return optimizer

    torch.use_deterministic_algorithms(True)
    try:
        compiled_losses = run_steps(model, restart(initial), config, data, range(STEPS))
        # the same maths in fused kernels: summation order differs, nothing else
        assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-4)
        final = copy.deepcopy(model.state_dict())

        optimizer = restart(initial)
        run_steps(model, optimizer, config, data, range(RESUME_AT))
        path = tmp_path / "last.pt"
        save_training(path, config=config, step=RESUME_AT, model=model, optimizer=optimizer, rng=[],
                      first_crosscorr=None, first_crosscorr_step=0)
        state = load_training(path, config)
        resumed = run_steps(model, restart(state["model"], state["optimizer"]), config, data, range(RESUME_AT, STEPS))
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed == compiled_losses[RESUME_AT:]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), f"{name} differs after resume"
