"""`barlow train`: Barlow Twins pretraining on CPU, one GPU, or many under torchrun.

The loop is the official one (two views -> backbone -> projector -> cross-correlation loss -> LARS)
plus what a production job needs: exact resume from `checkpoints/last.pt` (model, optimizer, step,
RNG states of every rank, data position), a checkpoint on SIGTERM so a preempted pod loses at most the
work since the last save, a stop with a clear message on a non-finite loss, metrics and plots.
`train()` reads top to bottom: `set_up` (device, model, optimizer, resume), the loop, `finish`;
`RunLog` writes what each logged step shows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import Config, apply, load_yaml, parse_overrides, save_yaml
from pipeline.data import gpu_views, stream
from pipeline.data.views import TwoViews
from pipeline.devices import local_rank, torch_device
from pipeline.errors import UserError
from pipeline.train import diagnostics, distributed
from pipeline.train.checkpoint import load_training, rng_state, save_encoder, save_training, set_rng_state
from pipeline.train.loss import barlow_twins_loss, off_diagonal
from pipeline.train.model import BarlowTwins
from pipeline.train.optim import build_optimizer, set_lr
from pipeline.train.presets import PRESETS

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143  # non-zero, so a Kubernetes Job restarts a preempted pod instead of finishing


def add_arguments(parser) -> None:
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument("--preset", choices=sorted(PRESETS), help="a built-in recipe")
    recipe.add_argument("--config", help="a YAML file of config sections (see config.yaml of a run)")
    parser.add_argument("--data", help="shards: path, folder, brace pattern, bucket URL or prefix (s3://, gs://, az://), "
                        "pipe:CMD or http(s); '::' joins several")
    parser.add_argument("--out", default="runs/train", help="RUN_DIR; an existing one is resumed")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total optimizer steps (overrides epochs)")
    length.add_argument("--epochs", type=int, help="total epochs of data.samples_per_epoch samples")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--monitor-data", metavar="SRC", help="labelled shards (or fashion-mnist:test) for an online kNN")
    parser.add_argument("--monitor-every", type=int, metavar="N", help="steps between kNN runs (default train.diag_every)")
    parser.add_argument("--monitor-minutes", type=float, metavar="M", help="minutes between kNN runs (instead of steps)")
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
    if args.monitor_data and distributed.launch_rank() == 0:  # the kNN runs on rank 0 only
        from pipeline.train.monitor import KnnMonitor

        monitor = KnnMonitor(args.monitor_data, config.views.image_size, config.views.mean, config.views.std,
                             every=0 if args.monitor_minutes else args.monitor_every or config.train.diag_every,
                             every_minutes=args.monitor_minutes or 0.0)
    summary = train(config, Path(args.out), monitor)
    return SIGTERM_EXIT_CODE if summary["stopped_by_signal"] else 0


@dataclass
class Plan:
    """Step counts derived from the config and the data size."""

    per_rank_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(config: Config, world: int) -> Plan:
    batch = config.optim.batch_size
    if batch % world:
        raise UserError(f"optim.batch_size={batch} is not divisible by the {world} processes")
    samples = config.data.samples_per_epoch
    if samples <= 0:
        index = stream.read_index(config.data.urls)
        if not index:
            raise UserError("cannot tell the epoch size: the shards have no index.json beside them (pipe: and http(s) "
                            "shards never do); set data.samples_per_epoch=N")
        samples = int(index["count"])
    steps_per_epoch = max(1, samples // batch)
    total = config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch
    if total <= 0:
        raise UserError("nothing to train: set --steps or --epochs to a positive number")
    warmup = min(total, round(config.optim.warmup_epochs * steps_per_epoch))
    return Plan(batch // world, steps_per_epoch, total, warmup)


def pick_data_path(config: Config, device: torch.device) -> str:
    """`train.data_path`: gpu (decode and augment on the device, gpu_views.py), cpu (in DataLoader
    workers, views.py) or auto: gpu on CUDA, else cpu. `gpu` on a CPU device runs the same code there."""
    wanted = config.train.data_path
    if wanted == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if wanted not in ("cpu", "gpu"):
        raise UserError(f"train.data_path must be auto, cpu or gpu, not {wanted!r}")
    return wanted


def compile_view_ops(config: Config, device: torch.device) -> bool:
    """`train.view_ops`: compiled (one fused torch.compile'd function after the crop), eager, or auto:
    compiled on CUDA, where it saves most of the views' time, when a C compiler is there to build Triton's
    launcher (the PyTorch runtime images have none: eager then, with a warning); eager on the CPU, where
    compiling costs more than it saves in a short run."""
    wanted = config.train.view_ops
    if wanted not in ("auto", "compiled", "eager"):
        raise UserError(f"train.view_ops must be auto, compiled or eager, not {wanted!r}")
    if wanted == "eager" or (wanted == "auto" and device.type != "cuda"):
        return False
    if has_c_compiler():
        return True
    if wanted == "compiled":
        raise UserError("train.view_ops=compiled needs a C compiler for torch.compile (none of CC, cc, gcc, clang "
                        "found): install gcc or set train.view_ops=eager")
    log.warning("no C compiler for torch.compile (CC, cc, gcc, clang): the GPU views' ops run eager, more slowly; "
                "install gcc, or set train.view_ops=eager to say so")
    return False


def has_c_compiler() -> bool:
    """What Triton (CUDA) and inductor's C++ backend (CPU) look for to build their kernels' host code."""
    return any(shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name)


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


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


@dataclass
class Run:
    """What a run sets up once: where it runs, the model and optimizer, and how batches are made."""

    config: Config
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    plan: Plan
    urls: list[str]
    core: nn.Module  # BarlowTwins: what checkpoints hold
    model: nn.Module  # core, or core in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    autocast: Any
    memory_format: torch.memory_format
    data_path: str
    views: TwoViews | gpu_views.GpuTwoViews

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_path(self.run_dir)


@dataclass
class Progress:
    """The loop's state: the step, the cross-correlation plots' endpoints, corrupt samples, the stop."""

    step: int = 0
    first_crosscorr: torch.Tensor | None = None
    first_crosscorr_step: int = 0
    last_crosscorr: torch.Tensor | None = None
    counter: stream.CorruptCounter = field(default_factory=stream.CorruptCounter)
    stopped_by_signal: bool = False


def set_up(config: Config, run_dir: Path) -> tuple[Run, Progress]:
    """Device and process group, seeded model and optimizer, then the checkpoint's state if there is one."""
    device = torch_device(config.train.device)
    distributed.init_distributed(device)
    rank, world = distributed.rank(), distributed.world_size()
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.train.seed)  # same initial weights on every rank
    random.seed(config.train.seed)
    urls = stream.expand_urls(config.data.urls)
    plan = make_plan(config, world)
    on_cuda = device.type == "cuda"
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and on_cuda)
    data_path = pick_data_path(config, device)

    core: nn.Module = BarlowTwins(config.model)
    if world > 1:
        core = distributed.convert_batchnorm(core, sync=distributed.uses_sync_batchnorm())
    memory_format = torch.channels_last if on_cuda else torch.preserve_format
    core.to(device, memory_format=memory_format)
    if on_cuda and not config.train.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv algorithms once
    optimizer = build_optimizer(core, config.optim)

    progress = Progress()
    if checkpoint_path(run_dir).exists():
        state = load_training(checkpoint_path(run_dir), config)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress.step = int(state["step"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0], device)
        progress.first_crosscorr = progress.last_crosscorr = state.get("crosscorr_first")
        progress.first_crosscorr_step = int(state.get("crosscorr_first_step", 0))
        log.info("resuming %s at step %d of %d", run_dir, progress.step, plan.total_steps)

    model = core
    if world > 1:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if on_cuda else None)
    if config.train.compile:
        core.backbone.compile()
    views = TwoViews(config.views) if data_path == "cpu" else gpu_views.GpuTwoViews(
        config.views, torch.bfloat16 if bf16 else torch.float32, compile=compile_view_ops(config, device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    run = Run(config, run_dir, device, rank, world, plan, urls, core, model, optimizer, autocast, memory_format,
              data_path, views)
    return run, progress


def epoch_batches(run: Run, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """(view1, view2, samples seen, corrupt) on the device for steps [start, end of epoch) of `epoch`."""
    config, plan = run.config, run.plan
    batches = stream.train_loader(
        run.urls, transform=run.views if run.data_path == "cpu" else None, per_rank_batch=plan.per_rank_batch,
        steps=min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch), start_step=start,
        epoch=epoch, seed=config.train.seed, rank=run.rank, world_size=run.world, workers=config.data.workers,
        shuffle_buffer=config.data.shuffle_buffer, max_corrupt_fraction=config.data.max_corrupt_fraction,
        pin_memory=run.device.type == "cuda")
    if run.data_path == "gpu":  # same items, decoded and augmented on the device
        batches = gpu_views.GpuBatches(batches, run.views, run.device, seed=config.train.seed, epoch=epoch,
                                       rank=run.rank, start_step=start)
    for view1, view2, seen, corrupt in batches:
        yield (view1.to(run.device, non_blocking=True, memory_format=run.memory_format),
               view2.to(run.device, non_blocking=True, memory_format=run.memory_format), seen, corrupt)


def train(config: Config, run_dir: Path, monitor=None) -> dict[str, Any]:
    """Train to `plan.total_steps` or a stop signal; `monitor`: a `monitor.KnnMonitor` run on rank 0."""
    run, progress = set_up(config, run_dir)
    run_log = RunLog(run, progress.step, monitor)
    lambd, plan = config.model.lambd, run.plan
    nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
    run.model.train()
    try:
        with StopFlag() as stop:
            while progress.step < plan.total_steps and not progress.stopped_by_signal:
                epoch, start = divmod(progress.step, plan.steps_per_epoch)
                for view1, view2, seen, corrupt in epoch_batches(run, epoch, start):
                    progress.counter.add(seen, corrupt)
                    progress.counter.check(config.data.max_corrupt_fraction)
                    lr = set_lr(run.optimizer, progress.step, plan.total_steps, plan.warmup_steps,
                                config.optim.final_lr_fraction)
                    loss, crosscorr, z1 = training_step(run.model, run.optimizer, view1, view2, lambd, run.autocast)
                    nonfinite |= ~torch.isfinite(loss)
                    progress.step += 1
                    step = progress.step
                    run_log.bar.update(1)
                    log_now = step % config.train.log_every == 0 or step == plan.total_steps
                    checkpoint_now = step % config.train.checkpoint_every == 0 or step == plan.total_steps
                    if (log_now or checkpoint_now) and bool(nonfinite):  # the one host sync, at these steps only
                        raise UserError(
                            f"the loss became non-finite at or before step {step} (lr {lr:.3g}); the last good "
                            f"checkpoint is {run.checkpoint_path}: lower optim.lr_weights or check the data")
                    if log_now:
                        progress.stopped_by_signal = distributed.any_rank(stop.raised, run.device)
                        run_log.write(progress, epoch, loss, crosscorr, lr, view1, z1)
                    elif run.world == 1 and stop.raised:
                        progress.stopped_by_signal = True
                    if checkpoint_now or progress.stopped_by_signal:
                        save_checkpoint(run, progress)
                    if progress.stopped_by_signal:
                        break
    finally:
        run_log.bar.close()  # before any error message, so the message is the last line
    return finish(run, progress, run_log)


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


def save_checkpoint(run: Run, progress: Progress) -> None:
    """checkpoints/last.pt, written by rank 0 with the RNG states of all ranks (a collective: every rank calls it)."""
    rng = distributed.all_gather_objects(rng_state(run.device))
    if run.is_main:
        save_training(run.checkpoint_path, config=run.config, step=progress.step, model=run.core,
                      optimizer=run.optimizer, rng=rng, first_crosscorr=progress.first_crosscorr,
                      first_crosscorr_step=progress.first_crosscorr_step)


class RunLog:
    """What a logged step shows: metrics.jsonl and the progress bar (rank 0), Prometheus gauges (local
    rank 0, with --metrics-port), collapse diagnostics and the kNN monitor (rank 0)."""

    def __init__(self, run: Run, step: int, monitor=None):
        self.run, self.monitor = run, monitor
        config = run.config
        if run.is_main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(config, run.run_dir / "config.yaml")
        self.metrics = diagnostics.MetricsLog(run.run_dir / "metrics.jsonl", step) if run.is_main else None
        self.gauges = None
        if config.train.metrics_port and local_rank() == 0:
            self.gauges = diagnostics.PrometheusGauges(config.train.metrics_port)
            if monitor:
                monitor.attach(self.gauges)
        self.bar = tqdm(total=run.plan.total_steps, initial=step, disable=not run.is_main, unit="step",
                        dynamic_ncols=True)
        self.last_time, self.last_step = time.perf_counter(), step

    def write(self, progress: Progress, epoch: int, loss: torch.Tensor, crosscorr: torch.Tensor, lr: float,
              view1: torch.Tensor, z1: torch.Tensor) -> None:
        run, step, now = self.run, progress.step, time.perf_counter()
        record = {
            "step": step, "epoch": epoch, "loss": float(loss),
            "on_diag": float(crosscorr.diagonal().mean()),
            "off_diag": float(off_diagonal(crosscorr).pow(2).mean().sqrt()),
            "lr": lr, "images_per_s": (step - self.last_step) * run.config.optim.batch_size / (now - self.last_time),
            "corrupt": progress.counter.corrupt,
        }
        self.last_time, self.last_step = now, step
        progress.last_crosscorr = crosscorr[:64, :64].float().cpu()
        if progress.first_crosscorr is None:
            progress.first_crosscorr, progress.first_crosscorr_step = progress.last_crosscorr, step
        if run.is_main and (step % run.config.train.diag_every == 0 or step == run.plan.total_steps):
            record.update(diagnose(run.core, view1.float(), z1))  # bf16 views: the eval pass runs in fp32
        if run.is_main and self.monitor and self.monitor.due(step, run.plan.total_steps):
            record.update(self.monitor(run.core.backbone, run.device))
        if run.is_main:
            self.metrics.write(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}",
                                 **(self.monitor.postfix() if self.monitor else {}))
        if self.gauges:
            self.gauges.update(record)


@torch.no_grad()
def diagnose(core: nn.Module, view: torch.Tensor, projections: torch.Tensor) -> dict[str, float]:
    """RankMe of eval-mode backbone embeddings of this batch, and std of L2-normalised projections."""
    was_training = core.training
    core.backbone.eval()
    features = core.backbone(view)
    core.backbone.train(was_training)
    return {"rankme": diagnostics.rankme(features), "std": diagnostics.normalized_std(projections),
            "std_healthy": 1 / math.sqrt(projections.shape[1])}


def finish(run: Run, progress: Progress, run_log: RunLog) -> dict[str, Any]:
    """Plots and encoder.pt (rank 0; no encoder.pt when stopped by a signal), then leave the process group."""
    if run.is_main:
        if progress.last_crosscorr is not None:
            diagnostics.plot_crosscorr(progress.first_crosscorr, progress.last_crosscorr,
                                       progress.first_crosscorr_step, progress.step,
                                       run.run_dir / "plots" / "crosscorr.png")
        records = run_log.metrics.records()
        diagnostics.plot_loss(records, run.run_dir / "plots" / "loss.png")
        if any("knn_top1" in r for r in records):
            diagnostics.plot_knn(records, run.config.optim.batch_size, run.run_dir / "plots" / "knn.png",
                                 run_log.monitor.raw_pixels_top1 if run_log.monitor else None)
        if not progress.stopped_by_signal:
            save_encoder(run.run_dir / "encoder.pt", run.core.backbone, run.config, progress.step)
    if run_log.gauges:
        run_log.gauges.close()
    if run.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    summary = {"run_dir": str(run.run_dir), "step": progress.step, "total_steps": run.plan.total_steps,
               "corrupt": progress.counter.corrupt, "stopped_by_signal": progress.stopped_by_signal}
    if run.is_main:
        log.info("%s at step %d of %d; corrupt samples skipped: %d",
                 "stopped by signal" if progress.stopped_by_signal else "finished", progress.step,
                 run.plan.total_steps, progress.counter.corrupt)
    return summary
