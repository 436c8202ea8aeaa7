"""gpu_views.py on CPU tensors: each op against torchvision's functional op, the recipe's probabilities
and ranges over many draws, per-step determinism, batched decoding, the raw-bytes stream and training.

Tolerances (float32, images in [0, 1]):
- brightness, contrast, saturation, hue, grayscale, blur, standardize: max abs diff 1e-5 (rounding only);
  flip and solarize: exact.
- one roi_align over the packed batch vs one per image (the same boxes): 1e-4 (coordinate rounding).
- crop + resize vs `resized_crop(..., BILINEAR, antialias=True)`: upscaling matches to 1e-5 except the
  outer 2 output pixels of a crop inside the image (roi_align reads the real neighbours past the box
  edge where torchvision clamps to the crop; max 0.06 there); downscaling averages roi_align's box of
  bilinear samples instead of torchvision's triangle filter: mean abs diff <= 0.01, max <= 0.05.
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.config import ViewConfig
from pipeline.data import gpu_views as G
from pipeline.data import stream
from pipeline.errors import UserError
from pipeline.train.checkpoint import TRAINING_FORMAT, safe_load

CPU = torch.device("cpu")
EXACT = 1e-5


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Photo-like float images in [0, 1]: bicubic upsampling of a coarse random grid."""
    low = torch.rand(n, 3, 6, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    image = (smooth_images(1, size[1], size[0], seed)[0] * 255).round().to(torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).convert(mode)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg(seed: int) -> bytes:
    """A JPEG cut in half: PIL can read its header (it passes the worker's check) but not its pixels."""
    raw = jpeg_bytes(seed, (160, 120))
    return raw[: len(raw) // 2]


def as_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def pil_decode(raw: bytes) -> torch.Tensor:
    return TF.pil_to_tensor(Image.open(io.BytesIO(raw)).convert("RGB"))


def within_binomial_bound(hits: int, n: int, p: float) -> bool:
    """|hits/n - p| within 4.5 standard deviations; exact for p in {0, 1}."""
    return abs(hits / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- each op vs torchvision


def test_pixel_ops_match_torchvision_for_fixed_parameters():
    x = smooth_images(4, 24, 32)
    everyone = torch.ones(4, dtype=torch.bool)
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    hues = torch.tensor([-0.1, -0.02, 0.05, 0.1])
    sigmas = torch.tensor([0.1, 0.6, 1.3, 2.0])
    cases = [
        (G.blend_op(x, torch.full((4,), G.BRIGHTNESS), factors, everyone), [TF.adjust_brightness(x[i], float(factors[i])) for i in range(4)]),
        (G.blend_op(x, torch.full((4,), G.CONTRAST), factors, everyone), [TF.adjust_contrast(x[i], float(factors[i])) for i in range(4)]),
        (G.blend_op(x, torch.full((4,), G.SATURATION), factors, everyone), [TF.adjust_saturation(x[i], float(factors[i])) for i in range(4)]),
        (G.adjust_hue(x, hues), [TF.adjust_hue(x[i], float(hues[i])) for i in range(4)]),
        (G.grayscale(x, everyone), [TF.rgb_to_grayscale(x[i], num_output_channels=3) for i in range(4)]),
        (G.gaussian_blur(x, sigmas, 7, everyone), [TF.gaussian_blur(x[i], [7, 7], [float(sigmas[i])] * 2) for i in range(4)]),
        (G.standardize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         [TF.normalize(x[i], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) for i in range(4)]),
    ]
    for index, (ours, theirs) in enumerate(cases):
        assert (ours - torch.stack(theirs)).abs().max() <= EXACT, f"case {index}"
    assert torch.equal(G.flip(x, everyone), TF.horizontal_flip(x))
    assert torch.equal(G.solarize(x, everyone), TF.solarize(x, 128 / 255))
    # a False mask leaves the sample untouched, bit for bit
    nobody = torch.zeros(4, dtype=torch.bool)
    for op in (lambda m: G.flip(x, m), lambda m: G.grayscale(x, m), lambda m: G.solarize(x, m),
               lambda m: G.gaussian_blur(x, sigmas, 7, m)):
        assert torch.equal(op(nobody), x)


@pytest.mark.parametrize("box, size", [((0, 0, 48, 36), 64), ((5, 3, 41, 30), 56), ((0, 10, 20, 36), 32),
                                       ((0, 0, 48, 36), 20), ((10, 6, 34, 30), 12), ((2, 1, 47, 35), 30)])
def test_resized_crop_matches_torchvision_bilinear(box, size):
    image = (smooth_images(1, 36, 48, seed=3)[0] * 255).round().to(torch.uint8)
    x0, y0, x1, y1 = box
    ours = G.resized_crops([image], [torch.tensor([box], dtype=torch.float32)], size)[0][0]
    theirs = TF.resized_crop(image.float() / 255, y0, x0, y1 - y0, x1 - x0, [size, size],
                             interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    diff = (ours - theirs).abs()
    if size >= max(x1 - x0, y1 - y0):  # upscaling: the same bilinear interpolation...
        # ...except in the outer 2 output pixels, where torchvision clamps to the crop and roi_align
        # reads the real neighbours (none past the image border, so a whole-image crop matches fully)
        assert diff[:, 2:-2, 2:-2].max() <= EXACT
        assert diff.max() <= (EXACT if box == (0, 0, 48, 36) else 0.06)
    else:  # downscaling: roi_align averages a box of bilinear samples, torchvision a triangle filter
        assert diff.mean() <= 0.01 and diff.max() <= 0.05, (diff.mean(), diff.max())


def per_image_crop(image: torch.Tensor, box: list[float], size: int) -> torch.Tensor:
    """The reference: one roi_align on this image alone, its last row and column repeated."""
    from torchvision.ops import roi_align

    padded = torch.cat([image, image[..., -1:]], dim=-1)
    padded = torch.cat([padded, padded[..., -1:, :]], dim=-2).unsqueeze(0).float()
    return roi_align(padded, torch.tensor([[0.0, *box]]), output_size=size, sampling_ratio=-1, aligned=True)[0] / 255


def test_one_roi_align_for_the_batch_equals_a_crop_per_image(monkeypatch):
    # noise, not smooth images: a sample that read a neighbour on the canvas would show
    generator = torch.Generator().manual_seed(4)
    shapes = [(36, 48), (20, 70), (64, 12), (36, 48), (7, 9), (50, 50)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]
    whole = torch.tensor([[0, 0, w, h] for h, w in shapes], dtype=torch.float32)  # every edge of every image
    drawn = G.sample_crop_boxes(torch.tensor(shapes, dtype=torch.float32), (0.08, 1.0), generator)
    for size, limit in ((16, G.CANVAS_VALUES), (40, G.CANVAS_VALUES), (16, 3 * 52 * 52)):  # down, up, 4 canvases
        monkeypatch.setattr(G, "CANVAS_VALUES", limit)
        assert len(G.canvas_groups(images)) == (1 if limit > 3 * 52 * 52 else 4)
        crops = G.resized_crops(images, [whole, drawn], size)
        assert [c.shape for c in crops] == [(len(shapes), 3, size, size)] * 2
        for view, boxes in enumerate((whole, drawn)):
            for i, image in enumerate(images):
                expected = per_image_crop(image, boxes[i].tolist(), size)
                # float32 sample coordinates shifted by the image's place on the canvas round differently:
                # ~1e-5 of a pixel, times a neighbour difference of up to 1 (noise)
                assert (crops[view][i] - expected).abs().max() <= 1e-4, (size, view, i)


def test_canvas_cells_do_not_overlap_and_repeat_each_images_edge():
    shapes = [(30, 40), (5, 100), (60, 8), (30, 40), (1, 1), (12, 13)] * 3
    cells, height, width = G.shelf_offsets([(h + 2, w + 2) for h, w in shapes])
    taken = torch.zeros(height, width, dtype=torch.int)
    for (h, w), (x, y) in zip(shapes, cells):
        taken[y : y + h + 2, x : x + w + 2] += 1
    assert taken.max() == 1
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in shapes]
    canvas, origins = G.pack(images)
    assert origins.tolist() == [[x + 1.0, y + 1.0] for x, y in cells]
    for image, (x, y) in zip(images, cells):
        h, w = image.shape[-2:]
        cell = canvas[0, :, y : y + h + 2, x : x + w + 2]
        # the image with its edge pixels repeated once all round: replicate padding
        assert torch.equal(cell, torch.nn.functional.pad(image.float()[None], (1, 1, 1, 1), mode="replicate")[0])


def test_color_jitter_applies_each_samples_ops_in_its_own_order():
    import itertools

    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per sample
    n = len(orders)
    x = smooth_images(n, 16, 16, seed=5)
    factors = torch.tensor([[1.35, 0.65, 1.15, 0.08]]).repeat(n, 1)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ours = G.color_jitter(x, torch.ones(n, dtype=torch.bool), factors, orders)
    for i in range(n):
        expected = x[i]
        for op in orders[i].tolist():
            expected = ops[op](expected, float(factors[i, op]))
        assert (ours[i] - expected).abs().max() <= EXACT, orders[i].tolist()
    assert torch.equal(G.color_jitter(x, torch.zeros(n, dtype=torch.bool), factors, orders), x)
    # the order matters for these factors, so the test above can tell orders apart
    assert (ours[0] - ours[-1]).abs().max() > 0.01


# ---------------------------------------------------------------- the recipe over many draws


def test_crop_boxes_follow_random_resized_crop():
    n = 20000
    for height, width in ((375, 500), (30, 700)):  # 30x700: most tries fail -> the centre-crop fallback
        sizes = torch.tensor([[height, width]] * n, dtype=torch.float32)
        boxes = G.sample_crop_boxes(sizes, (0.08, 1.0), torch.Generator().manual_seed(0))
        x0, y0, x1, y1 = boxes.unbind(1)
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
        assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision's crop
        w, h = x1 - x0, y1 - y0
        torch.manual_seed(0)
        reference = torch.tensor([v2.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                                  for _ in range(4000)], dtype=torch.float32)  # (top, left, h, w)
        ours_area, ref_area = (w * h / (height * width)), reference[:, 2] * reference[:, 3] / (height * width)
        ours_ratio, ref_ratio = (w / h).log(), (reference[:, 3] / reference[:, 2]).log()
        for ours, ref in ((ours_area, ref_area), (ours_ratio, ref_ratio)):
            grid = torch.linspace(0.05, 0.95, 19)
            # two-sample quantile agreement: 4000 reference draws give about +-0.02 in these units
            assert (ours.quantile(grid) - ref.quantile(grid)).abs().max() < 0.03, (height, width)
        fits = (ours_area >= 0.08 - 0.01) & (ours_area <= 1.0) & (ours_ratio.abs() <= math.log(4 / 3) + 0.02)
        fallback = (w == round(height * 4 / 3)) & (h == height)
        assert (fits | fallback).all()
        # offsets uniform over the valid range (mean position 1/2 where there is room to move)
        room = width - w
        position = x0[room > 0] / room[room > 0]
        assert abs(position.mean() - 0.5) < 0.02 and position.min() >= 0 and position.max() <= 1


def test_per_op_probabilities_and_parameter_ranges_match_the_recipe():
    cfg = ViewConfig()
    n = 20000
    sizes = torch.tensor([[300, 400]] * n, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    for view in (0, 1):
        params = G.draw_params(sizes, cfg, view, generator)
        expected = {"flip": cfg.flip_p, "jitter": cfg.jitter_p, "gray": cfg.grayscale_p,
                    "blur": cfg.blur_p[view], "solarize": cfg.solarize_p[view]}
        for name, p in expected.items():
            hits = int(getattr(params, name).sum())
            assert within_binomial_bound(hits, n, p), f"view {view + 1} {name}: {hits}/{n}, p = {p}"
        b, c, s, h = cfg.jitter
        for column, (low, high) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
            values = params.factors[:, column]
            assert values.min() >= low and values.max() <= high
            assert abs(values.mean() - (low + high) / 2) < 0.01 * (high - low) * 2
            assert values.min() < low + 0.01 * (high - low) and values.max() > high - 0.01 * (high - low)
        assert params.sigma.min() >= cfg.blur_sigma[0] and params.sigma.max() <= cfg.blur_sigma[1]
        assert abs(params.sigma.mean() - sum(cfg.blur_sigma) / 2) < 0.02
        assert torch.equal(params.order.sort(1).values, torch.arange(4).expand(n, 4))  # permutations
        counts = torch.bincount((params.order * torch.tensor([64, 16, 4, 1])).sum(1), minlength=256)
        counts = counts[counts > 0]
        assert len(counts) == 24 and all(within_binomial_bound(int(k), n, 1 / 24) for k in counts)


def probe_image(size: int) -> torch.Tensor:
    """Left half a 0/60 pixel checkerboard, right half constant 200 (uint8 RGB): blur flattens the
    board, solarize (>= 128) turns 200 into 55 and leaves the board, a flip swaps the halves."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.where(cols < size // 2, (rows + cols) % 2 * 60, torch.full_like(rows, 200))
    return image.to(torch.uint8).expand(3, size, size).contiguous()


def effects(views: torch.Tensor) -> torch.Tensor:
    """[N, 3] booleans (blurred, solarized, flipped) of views of the probe image, in 0..1 units."""
    size = views.shape[-1]
    pixels = views[:, 0] * 255
    left, right = pixels[:, :, : size // 2], pixels[:, :, size // 2:]
    flipped = left.mean((1, 2)) > right.mean((1, 2))
    board = torch.where(flipped.view(-1, 1, 1), right, left)[:, :, 2:-2]
    plain = torch.where(flipped.view(-1, 1, 1), left, right)
    return torch.stack([board.std((1, 2)) < 10, plain.mean((1, 2)) < 128, flipped], dim=1)


def test_both_views_differ_as_specified():
    size, n = 32, 1500
    # Isolate the ops we read: whole-image crop (identity resize), no jitter or grayscale, sigma >= 1 so
    # every blur shows, mean 0 / std 1 so views are pixels / 255. Blur 1.0/0.1, solarize 0.0/0.2.
    cfg = ViewConfig(image_size=size, crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_sigma=(1.0, 2.0),
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert cfg.blur_p == (1.0, 0.1) and cfg.solarize_p == (0.0, 0.2)
    image = probe_image(size)
    view1, view2 = G.GpuTwoViews(cfg)([image] * n, torch.Generator().manual_seed(2))
    for index, view in enumerate((view1, view2)):
        counts = effects(view).sum(0).tolist()
        for hits, p, name in zip(counts, (cfg.blur_p[index], cfg.solarize_p[index], cfg.flip_p),
                                 ("blur", "solarize", "flip")):
            assert within_binomial_bound(int(hits), n, p), f"view {index + 1} {name}: {hits}/{n}, p = {p}"
    # the detector itself: all ops off -> no marks
    off = ViewConfig(image_size=size, crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, flip_p=0.0,
                     blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    plain, _ = G.GpuTwoViews(off)([image] * 4, torch.Generator().manual_seed(0))
    assert not effects(plain).any() and torch.allclose(plain * 255, image.float().expand(4, 3, size, size), atol=1e-3)


# ---------------------------------------------------------------- determinism and output format


def test_views_are_deterministic_per_step_seed_and_leave_the_global_rng_alone():
    images = [(smooth_images(1, h, w, seed=h)[0] * 255).to(torch.uint8) for h, w in ((40, 56), (64, 48), (33, 33))]
    views = G.GpuTwoViews(ViewConfig(image_size=24))
    before = torch.get_rng_state()
    first = views(images, G.step_generator(CPU, 0, 1, 0, 7))
    again = views(images, G.step_generator(CPU, 0, 1, 0, 7))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in ((0, 1, 0, 8), (0, 2, 0, 7), (0, 1, 1, 7), (1, 1, 0, 7)):  # step, epoch, rank, seed
        assert not torch.equal(views(images, G.step_generator(CPU, *other))[0], first[0]), other
    assert not torch.equal(first[0], first[1])  # two different views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_is_channels_last_in_the_requested_dtype(dtype):
    images = [torch.randint(0, 256, (3, 20 + i, 30), dtype=torch.uint8) for i in range(3)]
    for view in G.GpuTwoViews(ViewConfig(image_size=16), dtype)(images, torch.Generator().manual_seed(0)):
        assert view.shape == (3, 3, 16, 16) and view.dtype == dtype and torch.isfinite(view.float()).all()
        assert view.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- decoding


def test_decode_batch_matches_pil_and_replaces_what_cannot_be_decoded():
    good = [jpeg_bytes(1, (40, 30)), jpeg_bytes(2, (25, 31), mode="L"), jpeg_bytes(3, (16, 16), fmt="PNG"),
            jpeg_bytes(4, (20, 12), fmt="PNG", mode="RGBA"), jpeg_bytes(5, (9, 7), fmt="WEBP")]
    truncated = truncated_jpeg(6)
    batch = good[:2] + [truncated] + good[2:]
    images, failed = G.decode_batch([as_tensor(raw) for raw in batch], CPU)
    assert failed == [2] and len(images) == len(batch)
    for image, raw in zip(images[:2] + images[3:], good):
        expected = pil_decode(raw)
        assert image.dtype == torch.uint8 and image.shape == expected.shape
        assert (image.int() - expected.int()).abs().max() <= 1  # libjpeg-turbo in both, PIL for the rest
    assert torch.equal(images[2], images[3])  # the failed slot holds the next good image
    images, failed = G.decode_batch([as_tensor(truncated), as_tensor(b"\xff\xd8\xffnot a jpeg")], CPU)
    assert images == [] and failed == [0, 1]


# ---------------------------------------------------------------- the raw-bytes stream and GpuBatches


def write_tar(path: Path, members: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in members:
            writer.write(sample)
    return str(path)


@pytest.fixture
def jpeg_shards(tmp_path) -> list[str]:
    """Two shards of 9 and 14 JPEGs of varying sizes, labels 0-2; a non-image and a truncated JPEG."""
    urls, seed = [], 0
    for shard, size in enumerate((9, 14)):
        members = []
        for _ in range(size):
            members.append({"__key__": f"{seed:05d}", "jpg": jpeg_bytes(seed, (30 + seed, 24 + seed % 5)),
                            "cls": str(seed % 3).encode()})
            seed += 1
        urls.append(write_tar(tmp_path / f"shard-{shard:06d}.tar", members))
    members = [{"__key__": "bad-bytes", "jpg": b"not an image"}, {"__key__": "truncated", "jpg": truncated_jpeg(99)}]
    urls.append(write_tar(tmp_path / "shard-broken.tar", members))
    return urls


def raw_loader(urls, **overrides):
    options = dict(transform=None, per_rank_batch=5, steps=6, start_step=0, epoch=0, seed=3, rank=0, world_size=1,
                   workers=2, shuffle_buffer=8, max_corrupt_fraction=0.5, min_samples=1000)
    return stream.train_loader(urls, **{**options, **overrides})


def test_raw_stream_reads_the_same_samples_as_the_cpu_stream(jpeg_shards):
    urls = jpeg_shards[:2]
    raw = list(raw_loader(urls, workers=1))
    decoded = list(raw_loader(urls, workers=1, transform=lambda image: (TF.pil_to_tensor(image).float().mean((1, 2)),) * 2))
    assert len(raw) == len(decoded) == 6
    for batch, cpu in zip(raw, decoded):
        assert isinstance(batch, stream.EncodedBatch) and len(batch.sizes) == 5 and batch.sizes.sum() == len(batch.data)
        assert batch.labels.tolist() and set(batch.labels.tolist()) <= {0, 1, 2}
        means = torch.stack([pil_decode(bytes(e.tolist())).float().mean((1, 2)) for e in G.split_encoded(batch.data, batch.sizes)])
        assert torch.equal(means, cpu[0]) and (batch.seen, batch.corrupt) == tuple(cpu[2:])
    resumed = list(raw_loader(urls, workers=1, start_step=2))
    assert all(torch.equal(a.data, b.data) and a.seen == b.seen for a, b in zip(raw[2:], resumed))


def test_gpu_batches_count_corrupt_samples_and_resume_identically(jpeg_shards):
    cfg = ViewConfig(image_size=16)

    def batches(start_step):
        return G.GpuBatches(raw_loader(jpeg_shards, start_step=start_step), G.GpuTwoViews(cfg), CPU, seed=3, epoch=0,
                            rank=0, start_step=start_step)

    full, resumed = list(batches(0)), list(batches(2))
    assert len(full) == 6 and len(resumed) == 4 and len(batches(2)) == 4
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]
    for view1, view2, seen, corrupt in full:
        assert view1.shape == view2.shape == (5, 3, 16, 16) and not torch.equal(view1, view2)
    # Corrupt = what the workers found (not an image) + what only the decoder finds (the truncated JPEG,
    # which passes the header check). Both are read off the raw stream, which is deterministic.
    truncated = truncated_jpeg(99)
    raw = list(raw_loader(jpeg_shards))
    in_workers = sum(batch.corrupt for batch in raw)
    in_decoder = sum(bytes(e.tolist()) == truncated for batch in raw for e in G.split_encoded(batch.data, batch.sizes))
    assert in_workers > 0 and in_decoder > 0, "seed 3 draws the broken shard"
    assert sum(b[3] for b in full) == in_workers + in_decoder
    assert sum(b[2] for b in full) == sum(batch.seen for batch in raw) == 6 * 5 + in_workers


def test_gpu_batches_build_one_batch_ahead_and_stop_cleanly_when_left_early(jpeg_shards):
    import threading

    raw = list(raw_loader(jpeg_shards))
    built: list[int] = []

    class Recording(G.GpuBatches):
        def build(self, batch, step):
            result = super().build(batch, step)
            built.append(step)
            return result

    batches = iter(Recording(raw, G.GpuTwoViews(ViewConfig(image_size=16)), CPU, seed=3, epoch=0, rank=0,
                             start_step=0))
    next(batches)  # step 0 handed over; step 1 waits in the queue, step 2 is built and waits to be put
    deadline = time.monotonic() + 30
    while len(built) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert built == [0, 1, 2]  # ahead of the consumer, but no further than the queue allows
    batches.close()  # the consumer leaves early
    assert not any(t.name == "gpu-views" for t in threading.enumerate())
    assert built == [0, 1, 2]


def test_every_sample_of_a_batch_gets_its_own_views(tmp_path):
    urls = [write_tar(tmp_path / "same.tar", [{"__key__": f"{i:02d}", "jpg": jpeg_bytes(0, (40, 40))} for i in range(8)])]
    (view1, _, _, _), = G.GpuBatches(raw_loader(urls, steps=1, per_rank_batch=8, workers=0),
                                     G.GpuTwoViews(ViewConfig(image_size=16)), CPU, seed=0, epoch=0, rank=0, start_step=0)
    assert len({tuple(v.flatten().tolist()) for v in view1}) == 8  # one image, eight different views


def test_all_undecodable_batch_stops_with_one_sentence(tmp_path):
    truncated = truncated_jpeg(7)
    urls = [write_tar(tmp_path / "bad.tar", [{"__key__": f"{i:02d}", "jpg": truncated} for i in range(4)])]
    batches = G.GpuBatches(raw_loader(urls, steps=1, per_rank_batch=4, workers=0), G.GpuTwoViews(ViewConfig(image_size=16)),
                           CPU, seed=0, epoch=0, rank=0, start_step=0)
    with pytest.raises(UserError, match="none of the 4 images of step 0 could be decoded"):
        list(batches)


@pytest.mark.slow  # inductor compiles both views' functions once on the CPU (~50 s on 2 cores)
def test_compiled_view_ops_equal_the_eager_ones_for_fixed_parameters(jpeg_shards):
    cfg = ViewConfig(image_size=24)
    images = [(smooth_images(1, h, w, seed=h)[0] * 255).to(torch.uint8) for h, w in ((40, 56), (64, 48), (33, 33))] * 3
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    params = [G.draw_params(sizes, cfg, view, generator) for view in (0, 1)]
    for p in params:  # every op on for some samples and off for others
        p.jitter[:4], p.gray[:2], p.blur[::2], p.solarize[1::2] = True, True, True, True
    crops = G.resized_crops(images, [p.boxes for p in params], 24)
    compiled = torch.compile(G.make_view, dynamic=False)
    for view in (0, 1):
        eager = G.make_view(crops[view], params[view], cfg, view, torch.float32)
        fused = compiled(crops[view], params[view], cfg, view, torch.float32)
        assert fused.is_contiguous(memory_format=torch.channels_last)
        assert (fused - eager).abs().max() <= 1e-4  # in standardized units (x / 0.225): rounding only
    # the same through GpuBatches, whose producer thread runs (and here compiles) the views
    def batches(compile: bool):
        return G.GpuBatches(raw_loader(jpeg_shards, steps=2), G.GpuTwoViews(cfg, compile=compile), CPU, seed=3,
                            epoch=0, rank=0, start_step=0)

    for (a1, a2, *counts_a), (b1, b2, *counts_b) in zip(batches(False), batches(True), strict=True):
        assert counts_a == counts_b and (a1 - b1).abs().max() <= 1e-4 and (a2 - b2).abs().max() <= 1e-4


def test_view_ops_choice(monkeypatch, caplog):
    import shutil

    from pipeline.config import Config
    from pipeline.train.loop import compile_view_ops

    cuda = torch.device("cuda")
    config = Config()
    assert shutil.which("cc") or shutil.which("gcc"), "this machine builds compiled kernels"
    assert not compile_view_ops(config, CPU) and compile_view_ops(config, cuda)
    config.train.view_ops = "compiled"
    assert compile_view_ops(config, CPU)
    config.train.view_ops = "eager"
    assert not compile_view_ops(config, cuda)
    config.train.view_ops = "fused"
    with pytest.raises(UserError, match="train.view_ops must be auto, compiled or eager"):
        compile_view_ops(config, CPU)
    # no C compiler (as in the PyTorch runtime images): auto falls back to eager and says so, compiled refuses
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    config.train.view_ops = "auto"
    assert not compile_view_ops(config, cuda) and "no C compiler" in caplog.text
    config.train.view_ops = "compiled"
    with pytest.raises(UserError, match="train.view_ops=compiled needs a C compiler"):
        compile_view_ops(config, cuda)


# ---------------------------------------------------------------- training through the gpu data path


def test_data_path_choice():
    from pipeline.config import Config
    from pipeline.train.loop import pick_data_path

    config = Config()
    assert config.train.data_path == "auto"
    assert pick_data_path(config, CPU) == "cpu" and pick_data_path(config, torch.device("cuda")) == "gpu"
    config.train.data_path = "gpu"
    assert pick_data_path(config, CPU) == "gpu"
    config.train.data_path = "dali"
    with pytest.raises(UserError, match="train.data_path must be auto, cpu or gpu"):
        pick_data_path(config, CPU)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def barlow(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_gpu_data_path_trains_and_resumes_bit_identically_on_cpu(fmnist_shards, tmp_path):
    common = ["train", "--preset", "tiny", "--data", str(fmnist_shards), "--steps", "6", "train.data_path=gpu",
              "data.workers=0", "train.checkpoint_every=100", "train.deterministic=true"]
    reference = barlow(*common, "--out", str(tmp_path / "reference"))
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    process = barlow(*common, "--out", str(interrupted))
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    stopped_at = safe_load(interrupted / "checkpoints" / "last.pt", TRAINING_FORMAT)["step"]
    assert 3 <= stopped_at < 6
    resumed = barlow(*common, "--out", str(interrupted))
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming" in stderr, stderr[-3000:]

    expected = safe_load(tmp_path / "reference/checkpoints/last.pt", TRAINING_FORMAT)
    actual = safe_load(interrupted / "checkpoints/last.pt", TRAINING_FORMAT)
    assert expected["config"]["train"]["data_path"] == "gpu" and actual["step"] == 6
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, actual["model"][name]), f"{name} differs after resume"


# ---------------------------------------------------------------- on a GPU (the same code as above, on CUDA)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_and_views_match_the_cpu_ones(compile):
    cuda = torch.device("cuda")
    encoded = [as_tensor(jpeg_bytes(seed, (64 + seed, 48))) for seed in range(6)] + [as_tensor(jpeg_bytes(9, fmt="PNG"))]
    on_cpu, failed_cpu = G.decode_batch(encoded, CPU)
    on_gpu, failed_gpu = G.decode_batch(encoded, cuda)  # nvJPEG for the JPEGs, PIL for the PNG
    assert failed_cpu == failed_gpu == []
    for a, b in zip(on_cpu, on_gpu):
        assert b.device.type == "cuda" and a.shape == b.shape
        # nvJPEG upsamples chroma without libjpeg's "fancy" filter: on these small, busy test images the
        # mean difference measured 5.4 (of 255) on an H200; swapped channels give 44-53, a 3-px shift 27-30.
        assert (a.float() - b.cpu().float()).abs().mean() < 8.0
    # fixed parameters, drawn once on the CPU: the device must not change the result
    cfg = ViewConfig(image_size=32)
    sizes = torch.tensor([image.shape[-2:] for image in on_cpu], dtype=torch.float32)
    params = G.draw_params(sizes, cfg, 0, torch.Generator().manual_seed(0))
    crops = G.resized_crops(on_cpu, [params.boxes], 32)[0]
    expected = G.augment(crops, params, cfg, 0)
    moved = G.ViewParams(**{name: value.to(cuda) for name, value in vars(params).items()})
    augment = torch.compile(G.augment, dynamic=False) if compile else G.augment  # what make_view runs
    crops_gpu = G.resized_crops([image.to(cuda) for image in on_cpu], [moved.boxes], 32)[0]
    assert (crops_gpu.cpu() - crops).abs().max() < 1e-4
    assert (augment(crops_gpu, moved, cfg, 0).cpu() - expected).abs().max() < 1e-3
    # the views of a step: bf16, channels_last, on the device, the same for the same step seed
    views = G.GpuTwoViews(cfg, torch.bfloat16, compile=compile)
    first = views(on_gpu, G.step_generator(cuda, 0, 0, 0, 3))
    again = views(on_gpu, G.step_generator(cuda, 0, 0, 0, 3))
    for a, b in zip(first, again):
        assert a.is_cuda and a.dtype == torch.bfloat16 and a.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, b)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gpu_batches_overlap_safely_and_resume(jpeg_shards, compile):
    cuda = torch.device("cuda")

    def batches(start_step):
        return G.GpuBatches(raw_loader(jpeg_shards, start_step=start_step, pin_memory=True),
                            G.GpuTwoViews(ViewConfig(image_size=16), torch.bfloat16, compile=compile), cuda, seed=3,
                            epoch=0, rank=0, start_step=start_step)

    full = [(a.float().cpu(), b.float().cpu(), *rest) for a, b, *rest in batches(0)]  # consumed on the main stream
    resumed = [(a.float().cpu(), b.float().cpu(), *rest) for a, b, *rest in batches(2)]
    assert len(full) == 6 and len(resumed) == 4
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]
