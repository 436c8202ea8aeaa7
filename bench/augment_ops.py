"""Batched augmentation on one device: our `gpu_views` ops vs `kornia.augmentation` on the same batch.

Both build the two Barlow Twins views (crop 0.08-1 + resize, flip, jitter 0.8, grayscale 0.2, blur
1.0/0.1, solarize 0.0/0.2, standardize) from the same N decoded images. kornia needs one same-sized
float batch, so the batch here is same-sized and kornia's timing includes the uint8 -> float step;
ours takes the list of decoded images as the training path does. Also timed: the batched decode of the
same images as JPEG (quality 90) and ours per stage. Writes bench/results/augment_ops-<device>-<date>.json.

    python bench/augment_ops.py                                  # CPU smoke: 16 images 160x120 -> 112 px
    python bench/augment_ops.py --batch 256 --height 375 --width 500 --size 224 --compile   # the GPU measurement

kornia is optional (pip install kornia); without it that part is recorded as skipped.

Figures (ms for both views of the batch, median; lower is better):
- CPU smoke, 1 thread of a shared 2-core machine, torch 2.14.1, kornia 0.9.0, 16 images 160x120 ->
  112 px, fp32, two runs: ours 52 / 63 ms (colour jitter 28-30 of it, crop 11), kornia 62 / 53 ms
  (resample crop) and 59 / 47 ms (slice crop): a tie within the noise of that machine, which says
  nothing about a GPU.
- H200 (256 images 500x375 -> 224 px, bf16 out, torch 2.11, kornia 0.9.0): ours 37.5 ms (crop 17.7,
  colour jitter 11.3, blur 5.2), kornia 31.6 ms (resample crop) and 45.3 ms (slice crop); nvJPEG
  decode of the batch 8.3 ms. Record: results/augment_ops-NVIDIA-H200-2026-11-27.json.
Those figures predate the crop's single roi_align over the packed batch (it was one per image) and the
compiled ops after the crop. Ours is still the default: it takes the variable-sized decoded images directly
(kornia needs one same-sized tensor, so a pad or resize pass first, not timed here) and adds no dependency.
`--compile` also times ours with the ops after the crop compiled (`ours_compiled_ms`, as
`train.view_ops=compiled`; null without the flag).
"""

from __future__ import annotations

import argparse
import datetime
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import RESULTS, write_record  # noqa: E402  (also puts the repo on sys.path)
from pipeline.data import gpu_views as G  # noqa: E402
from pipeline.config import ViewConfig  # noqa: E402
from pipeline.data.views import blur_kernel_size  # noqa: E402



def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def milliseconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def photo_batch(n: int, height: int, width: int) -> list[bytes]:
    """n JPEGs (quality 90) of smooth random scenes, all height x width."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(n):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(low).resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def kornia_views(cfg: ViewConfig, crop_mode: str):
    """The two views as kornia AugmentationSequentials, or None when kornia is not installed."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    kernel = blur_kernel_size(cfg.image_size)

    def view(index: int):
        ops = [
            K.RandomResizedCrop((cfg.image_size, cfg.image_size), scale=tuple(cfg.crop_scale), cropping_mode=crop_mode),
            K.RandomHorizontalFlip(p=cfg.flip_p),
            K.ColorJitter(*cfg.jitter, p=cfg.jitter_p),
            K.RandomGrayscale(p=cfg.grayscale_p),
        ]
        if cfg.blur_p[index] > 0:
            ops.append(K.RandomGaussianBlur((kernel, kernel), tuple(cfg.blur_sigma), p=cfg.blur_p[index]))
        if cfg.solarize_p[index] > 0:
            ops.append(K.RandomSolarize(thresholds=(0.5, 0.5), additions=(0.0, 0.0), p=cfg.solarize_p[index]))
        ops.append(K.Normalize(torch.tensor(cfg.mean), torch.tensor(cfg.std)))
        return K.AugmentationSequential(*ops)

    return view(0), view(1)


def stage_times(images: list[torch.Tensor], cfg: ViewConfig, device: torch.device, repeats: int) -> dict[str, float]:
    """Ours, stage by stage, for both views (ms)."""
    generator = G.step_generator(device, 0)
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.float32, device=device)
    params = [G.draw_params(sizes, cfg, v, generator) for v in (0, 1)]
    crops = G.resized_crops(images, [p.boxes for p in params], cfg.image_size)
    kernel = blur_kernel_size(cfg.image_size)
    stages = {
        "draw_params": lambda: [G.draw_params(sizes, cfg, v, generator) for v in (0, 1)],
        "crop_resize": lambda: G.resized_crops(images, [p.boxes for p in params], cfg.image_size),
        "flip": lambda: [G.flip(crops[v], params[v].flip) for v in (0, 1)],
        "color_jitter": lambda: [G.color_jitter(crops[v], params[v].jitter, params[v].factors, params[v].order)
                                 for v in (0, 1)],
        "grayscale": lambda: [G.grayscale(crops[v], params[v].gray) for v in (0, 1)],
        "blur": lambda: [G.gaussian_blur(crops[v], params[v].sigma, kernel, params[v].blur)
                         for v in (0, 1) if cfg.blur_p[v] > 0],
        "solarize": lambda: [G.solarize(crops[v], params[v].solarize) for v in (0, 1) if cfg.solarize_p[v] > 0],
        "normalize": lambda: [G.standardize(crops[v], cfg.mean, cfg.std) for v in (0, 1)],
    }
    return {name: round(milliseconds(fn, device, repeats), 2) for name, fn in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--size", type=int, default=112, help="output view size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable figures on a shared machine)")
    parser.add_argument("--compile", action="store_true", help="also time ours with the ops after the crop compiled")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    cfg = ViewConfig(image_size=args.size)
    encoded = [torch.frombuffer(bytearray(raw), dtype=torch.uint8)
               for raw in photo_batch(args.batch, args.height, args.width)]
    images, failed = G.decode_batch(encoded, device)
    assert not failed
    record: dict = {
        "device": torch.cuda.get_device_name(device) if on_cuda else f"cpu-{torch.get_num_threads()}threads",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "batch": args.batch, "input": [args.height, args.width], "size": args.size, "dtype": str(dtype),
        "unit": "ms for both views of the batch (median)",
    }

    record["decode_ms"] = round(milliseconds(lambda: G.decode_batch(encoded, device), device, args.repeats), 2)
    views = G.GpuTwoViews(cfg, dtype)
    record["ours_ms"] = round(milliseconds(lambda: views(images, G.step_generator(device, 0)), device, args.repeats), 2)
    record["ours_compiled_ms"] = None
    if args.compile:
        compiled = G.GpuTwoViews(cfg, dtype, compile=True)
        record["ours_compiled_ms"] = round(milliseconds(lambda: compiled(images, G.step_generator(device, 0)), device,
                                                        args.repeats), 2)
    record["ours_stages_ms"] = stage_times(images, cfg, device, args.repeats)
    print(f"decode {record['decode_ms']:.1f} ms, ours {record['ours_ms']:.1f} ms (compiled: {record['ours_compiled_ms']}; "
          f"{record['ours_stages_ms']})")

    batch = torch.stack(images)
    for mode in ("resample", "slice"):
        pipelines = kornia_views(cfg, mode)
        key = f"kornia_{mode}_ms"
        if pipelines is None:
            record[key] = None
            record["kornia"] = "skipped: kornia is not installed"
            continue
        import kornia

        record["kornia"] = kornia.__version__
        pipelines = [p.to(device) for p in pipelines]

        def run_kornia() -> None:
            x = batch.float().div_(255)
            for pipeline in pipelines:
                pipeline(x).to(dtype).contiguous(memory_format=torch.channels_last)

        record[key] = round(milliseconds(run_kornia, device, args.repeats), 2)
        print(f"kornia ({mode} crop) {record[key]:.1f} ms")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = record["device"].replace(" ", "-")
    path = out / f"augment_ops-{name}-{record['date']}.json"
    write_record(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
