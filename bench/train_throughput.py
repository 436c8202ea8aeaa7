"""Training throughput: image pairs/s of (a) the training step on synthetic device-resident tensors,
(b) end to end from JPEG WebDataset shards through the real loader and CPU views (N workers), and
(c) end to end from the same shards through the GPU data path (workers read bytes; decode and views
on the device, gpu_views.py), in one run on one device.

The ratios b/a and c/a say how much each data path starves the model, c/b what the GPU path gains.
Also recorded: the fraction of the time the loop waits for the next batch (`data_wait_fraction`; the
GPU path's target is <= 0.05, i.e. c/a >= 0.95), whether the GPU views' ops were compiled (`view_ops`,
`--view-ops`, default as `train.view_ops`: compiled on CUDA), and the GPU memory peak.

`--compile` also measures torch.compile of the training step (the backbone, as `train.compile`): (a) runs
eager, then compiled, and the record's `compile` holds both steps/s, their ratio and the first compiled
step's seconds (the compilation); (b) and (c) then run compiled, against the compiled (a).
Writes bench/results/train_throughput-<device>-<date>.json.

    python bench/train_throughput.py                      # CPU: fmnist model at 32 px
    python bench/train_throughput.py --preset imagenet --batch 256 --image-size 224   # one GPU, bf16
    python bench/train_throughput.py --preset imagenet --batch 256 --image-size 224 --steps 50 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import RESULTS, commit, device_label, write_record  # noqa: E402  (also puts the repo on sys.path)
from pipeline.data import gpu_views, stream  # noqa: E402
from pipeline.config import Config, apply  # noqa: E402
from pipeline.train.model import BarlowTwins  # noqa: E402
from pipeline.train.optim import build_optimizer, set_lr  # noqa: E402
from pipeline.train.presets import PRESETS  # noqa: E402
from pipeline.train.loop import compile_view_ops, training_step  # noqa: E402
from pipeline.data.views import TwoViews  # noqa: E402


def source_photos() -> list[np.ndarray]:
    """Real photographs from scikit-image's bundled data when installed, else smooth synthetic scenes."""
    try:
        from skimage import data

        names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
        photos = [getattr(data, n)() for n in names]
        return [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]
    except Exception:  # noqa: BLE001 - any failure means "no bundled photos here"
        rng = np.random.default_rng(0)
        photos = []
        for _ in range(6):
            low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            photos.append(np.asarray(Image.fromarray(low).resize((1024, 768), Image.BICUBIC)))
        return photos


def source_photos_are_real() -> bool:
    try:
        import skimage.data  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def write_jpeg_shards(out: Path, count: int, per_shard: int = 256) -> None:
    """ImageNet-like JPEGs: random crops of the photos resized to about 500x375, quality 90."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    photos = source_photos()
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for i in range(count):
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            size = (int(rng.integers(440, 560)), int(rng.integers(330, 420)))
            image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            writer.write({"__key__": f"{i:07d}", "jpg": buffer.getvalue(), "cls": str(i % 10).encode()})
    (out / "index.json").write_text(json.dumps({"count": count}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, batches, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds for `steps` steps after `warmup`, and the fraction of that spent waiting for data."""
    iterator = iter(batches)
    for _ in range(warmup):
        step_fn(*next(iterator))
    synchronize(device)
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(iterator)
        waited += time.perf_counter() - before
        step_fn(*batch)
    synchronize(device)
    return time.perf_counter() - start, waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=64, help="batch on this one device")
    parser.add_argument("--image-size", type=int, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shards", help="existing JPEG shards (default: generate them in a temp dir)")
    parser.add_argument("--images", type=int, default=4096, help="JPEGs to generate (the streams resample them)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the training step with torch.compile (the backbone); (b) and (c) run compiled")
    parser.add_argument("--view-ops", default="auto", choices=("auto", "compiled", "eager"),
                        help="the GPU views' ops after the crop, as train.view_ops (auto: compiled on CUDA)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    device = torch.device(args.device)
    config = Config()
    apply(config, PRESETS[args.preset])
    config.optim.batch_size = args.batch
    if args.image_size:
        config.views.image_size = args.image_size
    size = config.views.image_size
    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last if on_cuda else torch.preserve_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    model = BarlowTwins(config.model).to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, config.optim)
    set_lr(optimizer, 10, 100, 10, config.optim.final_lr_fraction)
    config.train.view_ops = args.view_ops
    compile_views = compile_view_ops(config, device)

    def reset_peak() -> None:
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_cuda else None

    def step(view1: torch.Tensor, view2: torch.Tensor, *counts) -> None:
        view1 = view1.to(device, non_blocking=True, memory_format=memory_format)
        view2 = view2.to(device, non_blocking=True, memory_format=memory_format)
        training_step(model, optimizer, view1, view2, config.model.lambd, autocast)

    total = args.warmup + args.steps
    synthetic = [torch.randn(args.batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
                 for _ in range(2)]

    def time_synthetic() -> float:
        seconds, _ = time_steps(step, (synthetic for _ in range(total)), args.warmup, args.steps, device)
        return args.batch * args.steps / seconds

    synthetic_pairs = eager_pairs = time_synthetic()
    print(f"(a) synthetic tensors: {synthetic_pairs:.1f} pairs/s")
    compiled = None
    if args.compile:
        model.backbone.compile()
        start = time.perf_counter()
        step(*synthetic)  # compiles the forward and backward
        synchronize(device)
        first_step = time.perf_counter() - start
        synthetic_pairs = time_synthetic()
        compiled = {"eager_steps_per_s": round(eager_pairs / args.batch, 3),
                    "compiled_steps_per_s": round(synthetic_pairs / args.batch, 3),
                    "compiled_over_eager": round(synthetic_pairs / eager_pairs, 3),
                    "first_compiled_step_s": round(first_step, 1)}
        print(f"(a) compiled: {synthetic_pairs:.1f} pairs/s ({compiled['compiled_over_eager']:.2f} of eager's "
              f"speed; first step {first_step:.0f} s)")
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None

    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(args.shards) if args.shards else Path(tmp) / "shards"
        if not args.shards:
            write_jpeg_shards(shard_dir, count=min(args.images, args.batch * total + args.batch * max(args.workers, 1)))
        urls = stream.expand_urls(str(shard_dir))

        def loader(transform):
            return stream.train_loader(
                urls, transform=transform, per_rank_batch=args.batch, steps=total, start_step=0, epoch=0, seed=0,
                rank=0, world_size=1, workers=args.workers, shuffle_buffer=256, max_corrupt_fraction=0.01,
                pin_memory=on_cuda)

        seconds, waited = time_steps(step, loader(TwoViews(config.views)), args.warmup, args.steps, device)
        cpu_pairs = args.batch * args.steps / seconds
        cpu_wait = waited / seconds
        print(f"(b) JPEG shards, CPU views, {args.workers} workers: {cpu_pairs:.1f} pairs/s "
              f"(data wait {100 * cpu_wait:.0f} % of the time)")
        print(f"ratio b/a: {cpu_pairs / synthetic_pairs:.2f}")

        reset_peak()
        views = gpu_views.GpuTwoViews(config.views, torch.bfloat16 if on_cuda else torch.float32, compile=compile_views)
        batches = gpu_views.GpuBatches(loader(None), views, device, seed=0, epoch=0, rank=0, start_step=0)
        seconds, waited = time_steps(step, batches, args.warmup, args.steps, device)
        gpu_pairs = args.batch * args.steps / seconds
        gpu_wait = waited / seconds
        gpu_peak = peak_gib()
    print(f"(c) JPEG shards, GPU views ({args.workers} workers reading bytes): {gpu_pairs:.1f} pairs/s "
          f"(data wait {100 * gpu_wait:.0f} % of the time)")
    print(f"ratio c/a: {gpu_pairs / synthetic_pairs:.2f}, c/b: {gpu_pairs / cpu_pairs:.2f}")

    name = device_label(device.type == "cuda")
    record = {
        "device": name, "commit": commit(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "python": platform.python_version(),
        "model": config.model.arch, "small_stem": config.model.small_stem, "projector": config.model.projector,
        "image_size": size, "batch": args.batch, "precision": "bf16" if on_cuda else "fp32",
        "steps": args.steps, "workers": args.workers,
        "synthetic": {"pairs_per_s": round(synthetic_pairs, 2), "steps_per_s": round(synthetic_pairs / args.batch, 3)},
        "cpu_views": {"pairs_per_s": round(cpu_pairs, 2), "data_wait_fraction": round(cpu_wait, 3)},
        "cpu_views_over_synthetic": round(cpu_pairs / synthetic_pairs, 3),
        "gpu_memory_peak_gib": round(peak_memory, 2) if peak_memory is not None else None,
        "gpu_views": {"pairs_per_s": round(gpu_pairs, 2), "data_wait_fraction": round(gpu_wait, 3),
                      "gpu_memory_peak_gib": gpu_peak},
        "gpu_views_over_synthetic": round(gpu_pairs / synthetic_pairs, 3),
        "gpu_views_over_cpu_views": round(gpu_pairs / cpu_pairs, 3),
        "compile": compiled,  # None: eager only (no --compile); (a), (b), (c) ran compiled when set
        "view_ops": "compiled" if compile_views else "eager",
        "photos": "scikit-image" if source_photos_are_real() else "synthetic scenes (scikit-image not installed)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_throughput-{name}-{record['date']}.json"
    write_record(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
