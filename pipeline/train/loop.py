"""`barlow train`: Barlow Twins pretraining on CPU, one GPU, or many under torchrun.

The loop is the official one (two views -> backbone -> projector -> cross-correlation loss -> LARS)
plus what a production job needs: exact resume from `checkpoints/last.pt` (model, optimizer, step,
RNG states of every rank, data position), a checkpoint on SIGTERM so a preempted pod loses at most the
work since the last save, a stop with a clear message on a non-finite loss, metrics and plots.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.train import diagnostics
from pipeline.train import distributed
from pipeline.data import gpu_views
from pipeline.data import stream
from pipeline.train.checkpoint import TRAINING_FORMAT, atomic_save, safe_load, save_encoder
from pipeline.config import Config, apply, load_yaml, parse_overrides, save_yaml
from pipeline.errors import UserError
from pipeline.train.loss import barlow_twins_loss, off_diagonal
from pipeline.train.model import BarlowTwins
from pipeline.train.optim import build_optimizer, set_lr
from pipeline.train.presets import PRESETS
from pipeline.data.views import TwoViews

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143  # non-zero, so a Kubernetes Job restarts a preempted pod instead of finishing


def add_arguments(parser) -> None:
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument("--preset", choices=sorted(PRESETS), help="a built-in recipe")
    recipe.add_argument("--config", help="a YAML file of config sections (see config.yaml of a run)")
    parser.add_argument("--data", help="shard URLs: path, directory, brace pattern, pipe:CMD or http(s)")
    parser.add_argument("--out", default="runs/train", help="RUN_DIR; an existing one is resumed")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total optimizer steps (overrides epochs)")
    length.add_argument("--epochs", type=int, help="total epochs of data.samples_per_epoch samples")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--monitor-data", metavar="SRC", help="labelled shards (or fashion-mnist:test) for an online kNN")
    parser.add_argument("--monitor-every", type=int, metavar="N", help="steps between kNN runs (default train.diag_every)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.batch_size=256")


def resolve_config(args) -> Config:
    """Defaults <- preset or config file <- flags <- key=value overrides. A RUN_DIR being resumed
    without --preset/--config keeps its own config.yaml."""
    config = Config()
    saved = Path(args.out) / "config.yaml"
    if args.preset:
        apply(config, PRESETS[args.preset])
    elif args.config:
        apply(config, load_yaml(args.config))
    elif saved.exists():
        apply(config, load_yaml(saved))
    else:
        raise UserError("give --preset (tiny, fmnist, imagenet) or --config FILE")
    if args.data:
        config.data.urls = args.data
    if args.steps is not None:
        config.train.steps = args.steps
    if args.epochs is not None:
        config.train.epochs, config.train.steps = args.epochs, 0
    if args.metrics_port is not None:
        config.train.metrics_port = args.metrics_port
    apply(config, parse_overrides(args.overrides))
    if not config.data.urls:
        raise UserError("no training data: pass --data URLS (e.g. shards/shard-{000000..000011}.tar)")
    return config


def run(args) -> int:
    config = resolve_config(args)
    monitor = None
    if args.monitor_data and int(os.environ.get("RANK", 0)) == 0:  # the kNN runs on rank 0 only
        from pipeline.evaluate.run import KnnMonitor

        monitor = KnnMonitor(args.monitor_data, config.views.image_size, config.views.mean, config.views.std,
                             every=args.monitor_every or config.train.diag_every)
    summary = train(config, Path(args.out), monitor)
    return SIGTERM_EXIT_CODE if summary["stopped_by_signal"] else 0


@dataclass
class Plan:
    """Step counts derived from the config and the data size."""

    per_rank_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(config: Config, urls: list[str], world: int) -> Plan:
    batch = config.optim.batch_size
    if batch % world:
        raise UserError(f"optim.batch_size={batch} is not divisible by the {world} processes")
    samples = config.data.samples_per_epoch
    if samples <= 0:
        index = stream.read_index(config.data.urls)
        if not index:
            raise UserError("cannot tell the epoch size of remote shards: set data.samples_per_epoch=N")
        samples = int(index["count"])
    steps_per_epoch = max(1, samples // batch)
    total = config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch
    if total <= 0:
        raise UserError("nothing to train: set --steps or --epochs to a positive number")
    warmup = min(total, round(config.optim.warmup_epochs * steps_per_epoch))
    return Plan(batch // world, steps_per_epoch, total, warmup)


def pick_device(config: Config) -> torch.device:
    wanted = config.train.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but torch sees no GPU")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(wanted)


def pick_data_path(config: Config, device: torch.device) -> str:
    """`train.data_path`: gpu (decode and augment on the device, gpu_views.py), cpu (in DataLoader
    workers, views.py) or auto: gpu on CUDA, else cpu. `gpu` on a CPU device runs the same code there."""
    wanted = config.train.data_path
    if wanted == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if wanted not in ("cpu", "gpu"):
        raise UserError(f"train.data_path must be auto, cpu or gpu, not {wanted!r}")
    return wanted


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (env://), in a store namespace of this restart attempt.

    torchrun's agent keeps one TCPStore for all restarts of the group (--max-restarts), and the process
    group's keys (each rank's address) carry no attempt number: a restarted rank can read the address of
    a rank from the previous attempt, which is dead, and fail to connect ("Connection refused") until the
    restarts run out. The attempt prefix gives every restart fresh keys.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store, rank, world_size = next(torch.distributed.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = torch.distributed.PrefixStore(f"barlow/attempt_{attempt}", store)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                             rank=rank, world_size=world_size)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next safe point."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received %s: checkpointing and stopping", signal.Signals(signum).name)
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when any rank's flag is set, so all ranks stop at the same step."""
    if world == 1:
        return flag
    value = torch.tensor(int(flag), device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value)


def rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def train(config: Config, run_dir: Path, monitor=None) -> dict[str, Any]:
    """`monitor`: an `evaluate.KnnMonitor`, run on rank 0 at logging steps; its accuracy goes into the record."""
    device = pick_device(config)
    init_distributed(device)
    rank, world = distributed.rank(), distributed.world_size()
    is_main = rank == 0
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.train.seed)  # same initial weights on every rank
    random.seed(config.train.seed)

    urls = stream.expand_urls(config.data.urls)
    plan = make_plan(config, urls, world)
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    on_cuda = device.type == "cuda"
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and on_cuda)
    data_path = pick_data_path(config, device)

    model: nn.Module = BarlowTwins(config.model.arch, config.model.small_stem, config.model.projector)
    if world > 1:
        model = distributed.convert_batchnorm(model)
    memory_format = torch.channels_last if on_cuda else torch.preserve_format
    model.to(device, memory_format=memory_format)
    if on_cuda and not config.train.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv algorithms once
    optimizer = build_optimizer(model, config.optim)

    step, first_crosscorr, first_crosscorr_step = 0, None, 0
    if checkpoint_path.exists():
        state = safe_load(checkpoint_path, TRAINING_FORMAT)
        if state["config"]["model"] != config.to_dict()["model"]:
            raise UserError(f"{checkpoint_path} was trained with a different model section; use a new --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0], device)
        first_crosscorr, first_crosscorr_step = state.get("crosscorr_first"), int(state.get("crosscorr_first_step", 0))
        log.info("resuming %s at step %d of %d", run_dir, step, plan.total_steps)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, run_dir / "config.yaml")
    metrics = diagnostics.MetricsLog(run_dir / "metrics.jsonl", step) if is_main else None
    gauges = None
    if config.train.metrics_port and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        gauges = diagnostics.PrometheusGauges(config.train.metrics_port)
        if monitor:
            monitor.attach(gauges)

    core = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    if config.train.compile:
        core.backbone.compile()
    transform = TwoViews(config.views) if data_path == "cpu" else None
    device_views = None if data_path == "cpu" else gpu_views.GpuTwoViews(
        config.views, torch.bfloat16 if bf16 else torch.float32, compile=config.train.compile)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def save_checkpoint(at_step: int) -> None:
        rng = [rng_state(device)]
        if world > 1:
            rng = [None] * world
            torch.distributed.all_gather_object(rng, rng_state(device))
        if is_main:
            atomic_save({
                "format": TRAINING_FORMAT, "config": config.to_dict(), "step": at_step,
                "model": core.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
                "schedule": {"total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
                             "steps_per_epoch": plan.steps_per_epoch},
                "crosscorr_first": first_crosscorr, "crosscorr_first_step": first_crosscorr_step,
            }, checkpoint_path)

    bar = tqdm(total=plan.total_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    counter = stream.CorruptCounter()
    stopped_by_signal = False
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    last_log_time, last_log_step = time.perf_counter(), step
    last_crosscorr = first_crosscorr
    model.train()
    try:
        with StopFlag() as stop:
            while step < plan.total_steps and not stopped_by_signal:
                epoch, start = divmod(step, plan.steps_per_epoch)
                steps_this_epoch = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
                batches = stream.train_loader(
                    urls, transform=transform, per_rank_batch=plan.per_rank_batch,
                    steps=steps_this_epoch,
                    start_step=start, epoch=epoch, seed=config.train.seed, rank=rank, world_size=world,
                    workers=config.data.workers, shuffle_buffer=config.data.shuffle_buffer,
                    max_corrupt_fraction=config.data.max_corrupt_fraction, pin_memory=on_cuda)
                if data_path == "gpu":  # same (view1, view2, n_seen, n_corrupt) items, built on the device
                    batches = gpu_views.GpuBatches(batches, device_views, device, seed=config.train.seed, epoch=epoch,
                                                   rank=rank, start_step=start)
                for view1, view2, n_seen, n_corrupt in batches:
                    counter.add(n_seen, n_corrupt)
                    counter.check(config.data.max_corrupt_fraction)
                    view1 = view1.to(device, non_blocking=True, memory_format=memory_format)
                    view2 = view2.to(device, non_blocking=True, memory_format=memory_format)
                    lr = set_lr(optimizer, step, plan.total_steps, plan.warmup_steps, config.optim.final_lr_fraction)
                    loss, crosscorr, z1 = training_step(model, optimizer, view1, view2, config.model.lambd, autocast)
                    nonfinite |= ~torch.isfinite(loss)
                    step += 1
                    bar.update(1)

                    log_now = step % config.train.log_every == 0 or step == plan.total_steps
                    checkpoint_now = step % config.train.checkpoint_every == 0 or step == plan.total_steps
                    if log_now or checkpoint_now:
                        if bool(nonfinite):  # the one host sync, at logging points only
                            raise UserError(
                                f"the loss became non-finite at or before step {step} (lr {lr:.3g}); the last good "
                                f"checkpoint is {checkpoint_path}: lower optim.lr_weights or check the data")
                    if log_now:
                        stopped_by_signal = any_rank(stop.raised, device, world)
                        now = time.perf_counter()
                        record = {
                            "step": step, "epoch": epoch, "loss": float(loss),
                            "on_diag": float(crosscorr.diagonal().mean()),
                            "off_diag": float(off_diagonal(crosscorr).pow(2).mean().sqrt()),
                            "lr": lr, "images_per_s": (step - last_log_step) * config.optim.batch_size / (now - last_log_time),
                            "corrupt": counter.corrupt,
                        }
                        last_log_time, last_log_step = now, step
                        last_crosscorr = crosscorr[:64, :64].float().cpu()
                        if first_crosscorr is None:
                            first_crosscorr, first_crosscorr_step = last_crosscorr, step
                        if is_main and (step % config.train.diag_every == 0 or step == plan.total_steps):
                            record.update(diagnose(core, view1.float(), z1))  # bf16 views: the eval pass runs in fp32
                        if is_main and monitor and monitor.due(step, plan.total_steps):
                            record.update(monitor(core.backbone, device))
                        if is_main:
                            metrics.write(record)
                            bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}",
                                            **(monitor.postfix() if monitor else {}))
                        if gauges:
                            gauges.update(record)
                    elif world == 1 and stop.raised:
                        stopped_by_signal = True
                    if checkpoint_now or stopped_by_signal:
                        save_checkpoint(step)
                    if stopped_by_signal:
                        break
    finally:
        bar.close()  # before any error message, so the message is the last line

    if is_main:
        if last_crosscorr is not None:
            diagnostics.plot_crosscorr(first_crosscorr, last_crosscorr, first_crosscorr_step, step,
                                       run_dir / "plots" / "crosscorr.png")
        diagnostics.plot_loss(metrics.records(), run_dir / "plots" / "loss.png")
        if not stopped_by_signal:
            save_encoder(run_dir / "encoder.pt", core.backbone, config, step)
    if gauges:
        gauges.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    summary = {"run_dir": str(run_dir), "step": step, "total_steps": plan.total_steps,
               "corrupt": counter.corrupt, "stopped_by_signal": stopped_by_signal}
    if is_main:
        log.info("%s at step %d of %d; corrupt samples skipped: %d",
                 "stopped by signal" if stopped_by_signal else "finished", step, plan.total_steps, counter.corrupt)
    return summary


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, view1: torch.Tensor, view2: torch.Tensor,
                  lambd: float, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (loss, cross-correlation, view-1 projections), all still on the device."""
    with autocast:
        z1, z2 = model(view1, view2)
    loss, crosscorr = barlow_twins_loss(z1, z2, lambd)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), crosscorr.detach(), z1.detach()


@torch.no_grad()
def diagnose(core: nn.Module, view: torch.Tensor, projections: torch.Tensor) -> dict[str, float]:
    """RankMe of eval-mode backbone embeddings of this batch, and std of normalised projections."""
    was_training = core.training
    core.backbone.eval()
    features = core.backbone(view)
    core.backbone.train(was_training)
    return {"rankme": diagnostics.rankme(features), "std": diagnostics.normalized_std(projections),
            "std_healthy": 1 / math.sqrt(projections.shape[1])}
