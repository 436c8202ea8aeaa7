"""The GPU data path: decode a whole batch on the training device and build both views there.

The CPU path (`views.py`) decodes and augments one image at a time in DataLoader workers; at ImageNet
sizes that starves a GPU, since one CPU thread decodes far fewer JPEGs per second than a GPU trains on. Here the workers only read encoded
bytes (`stream.train_loader(transform=None)`), and the main process

1. decodes the batch at once: `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA) for
   JPEGs, PIL on the CPU for other formats and for JPEGs nvJPEG refuses (CMYK, broken streams);
2. builds both views with batched ops whose parameters are random PER SAMPLE: random resized crop
   (boxes drawn exactly like `RandomResizedCrop`, all images packed onto one canvas and resampled by ONE
   `torchvision.ops.roi_align` call for the batch and both views), flip, colour jitter (per-sample factors
   in a per-sample random order), grayscale, Gaussian blur with a per-sample sigma (separable grouped
   convolution), solarize, standardize (per-channel mean and std); with `compile=True` (the default on
   CUDA, `train.view_ops`) everything after the crop is one `torch.compile`d function;
3. returns channels_last tensors, bf16 for bf16 runs (CUDA), fp32 otherwise.

`GpuBatches` does all of this one batch ahead in a producer thread, on a side CUDA stream, while the
training step runs (the stream rules are in its docstring).

All random draws come from one `torch.Generator` on the device, seeded from (seed, epoch, rank, step),
so a resumed run draws the same views (and the CPU tests see the same code path as a GPU run).

Differences from `views.py`, on purpose: the resize is bilinear with area sampling (roi_align's
adaptive sampling grid, an antialiasing box filter) instead of bicubic-antialiased, and the ops work
on float images, so intermediate values are not rounded to uint8. `tests/test_gpu_views.py` states
the tolerances against torchvision's functional ops.

Why our own ops rather than `kornia.augmentation`: kornia needs one same-sized input tensor, so the
variable-sized decoded images would first need a pad or resize pass. `bench/augment_ops.py` times both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import ViewConfig
from pipeline.data.stream import derive_seed
from pipeline.data.views import blur_kernel_size

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
CROP_TRIES = 10  # RandomResizedCrop's tries before the centre-crop fallback
SOLARIZE_THRESHOLD = 128 / 255  # views.py solarizes uint8 at 128
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's ops, in the order of ViewConfig.jitter
DONE = object()  # GpuBatches' producer: no more batches
# Values of one crop canvas (float32: 1 GiB). A batch of ImageNet photos (256 x ~110k pixels x 3) fits in one;
# the cap bounds memory for camera-sized images and keeps offsets far from roi_align's 32-bit index range.
CANVAS_VALUES = 2**28


# ---------------------------------------------------------------- decoding


def split_encoded(data: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """The packed bytes of a raw batch (see `stream.pack_encoded`) as one 1-D uint8 tensor per image."""
    return list(torch.split(data, sizes.tolist()))


def _decode_with_pil(encoded: torch.Tensor) -> torch.Tensor:
    """Any format PIL reads -> uint8 RGB CHW (CPU). Raises on undecodable bytes."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(encoded.numpy().tobytes())) as image:
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # Deprecated in torchvision 0.29 in favour of torchcodec, still the batched nvJPEG entry point
        # on the torchvision releases we support (0.21-0.29).
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                category=DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _decode_one(encoded: torch.Tensor, device: torch.device, is_jpeg: bool) -> torch.Tensor | None:
    """One image: the device decoder for a JPEG, else (or when it fails) PIL; None when nothing can."""
    if is_jpeg:
        try:
            return _decode_jpegs([encoded], device)[0]
        except RuntimeError:
            pass  # e.g. CMYK or a broken stream: PIL below decides
    try:
        return _decode_with_pil(encoded).to(device, non_blocking=True)
    except Exception:  # noqa: BLE001 - PIL raises many types on bad bytes
        return None


def decode_batch(encoded: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """Decode a batch to uint8 RGB CHW images on `device`; returns (images, indices that failed).

    JPEGs go through one batched `decode_jpeg` call (nvJPEG on CUDA); if that call fails, each image
    is retried alone so one bad stream costs one sample. A failed sample's slot holds a copy of the
    next good image (the batch size must stay the same on every rank); the caller counts it corrupt.
    """
    is_jpeg = [bytes(e[:3].tolist()) == JPEG_MAGIC for e in encoded]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    if jpegs:
        try:
            for i, image in zip(jpegs, _decode_jpegs([encoded[i] for i in jpegs], device)):
                images[i] = image
        except RuntimeError:
            for i in jpegs:
                images[i] = _decode_one(encoded[i], device, True)
    for i, j in enumerate(is_jpeg):
        if not j:
            images[i] = _decode_one(encoded[i], device, False)
    failed = [i for i, image in enumerate(images) if image is None]
    if len(failed) == len(images):
        return [], failed
    for i in failed:
        images[i] = next(images[(i + k) % len(images)] for k in range(1, len(images))
                         if images[(i + k) % len(images)] is not None)
    return images, failed


# ---------------------------------------------------------------- random parameters


@dataclass
class ViewParams:
    """Per-sample parameters of one view of a batch of N images (all tensors on the device)."""

    boxes: torch.Tensor  # [N, 4] crop (x0, y0, x1, y1) in pixel-edge coordinates
    flip: torch.Tensor  # [N] bool
    jitter: torch.Tensor  # [N] bool: colour jitter applied
    factors: torch.Tensor  # [N, 4] brightness, contrast, saturation, hue factors
    order: torch.Tensor  # [N, 4] long: a permutation of the four jitter ops
    gray: torch.Tensor  # [N] bool
    blur: torch.Tensor  # [N] bool
    sigma: torch.Tensor  # [N] blur sigma
    solarize: torch.Tensor  # [N] bool


def step_generator(device: torch.device, *ident: object) -> torch.Generator:
    """The generator for one step's views, seeded from e.g. (seed, epoch, rank, step)."""
    return torch.Generator(device=device).manual_seed(derive_seed("gpu-views", *ident))


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync: a copy from pageable memory would wait for the
    stream, one from pinned memory does not."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _constant(values: list[float], device: torch.device) -> torch.Tensor:
    """A small float32 constant on `device` (inside torch.compile a plain graph constant)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    return _to_device(torch.tensor(values, dtype=torch.float32), device)


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def sample_crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], generator: torch.Generator,
                      ratio: tuple[float, float] = RATIO) -> torch.Tensor:
    """RandomResizedCrop's box for every image, vectorised: `sizes` [N, 2] (height, width) -> [N, 4].

    As torchvision: up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)), rounded to
    whole pixels, the first that fits wins; the offset is uniform over the valid positions; when no
    try fits, the centre crop clamped to the ratio range.
    """
    n, device = len(sizes), sizes.device
    height, width = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    area = height * width * _uniform(scale[0], scale[1], (n, CROP_TRIES), generator, device)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (n, CROP_TRIES), generator, device))
    crop_w = torch.round(torch.sqrt(area * aspect))  # round half to even, like Python's round()
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first try that fits
    crop_w, crop_h = crop_w.gather(1, first), crop_h.gather(1, first)

    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    found = fits.any(1, keepdim=True)
    crop_w = torch.where(found, crop_w, fallback_w)
    crop_h = torch.where(found, crop_h, fallback_h)

    u = torch.rand((n, 2), generator=generator, device=device)
    top = torch.where(found, torch.floor(u[:, 0:1] * (height - crop_h + 1)).clamp(max=height - crop_h),
                      torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, 1:2] * (width - crop_w + 1)).clamp(max=width - crop_w),
                       torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.cat([left, top, left + crop_w, top + crop_h], dim=1)


def draw_params(sizes: torch.Tensor, cfg: ViewConfig, view: int, generator: torch.Generator) -> ViewParams:
    """Draw view `view` (0 or 1) of the recipe for every image; `sizes` [N, 2] (height, width)."""
    n, device = len(sizes), sizes.device

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) < p

    boxes = sample_crop_boxes(sizes, tuple(cfg.crop_scale), generator)
    flip = coin(cfg.flip_p)
    jitter = coin(cfg.jitter_p)
    b, c, s, h = cfg.jitter
    low = [max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h]
    span = _constant([high - lo for lo, high in zip(low, [1 + b, 1 + c, 1 + s, h])], device)
    factors = _constant(low, device) + span * torch.rand((n, 4), generator=generator, device=device)
    order = torch.rand((n, 4), generator=generator, device=device).argsort(1)  # uniform permutations
    gray = coin(cfg.grayscale_p)
    blur = coin(cfg.blur_p[view])
    sigma = _uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], (n,), generator, device)
    solarize = coin(cfg.solarize_p[view])
    return ViewParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solarize)


# ---------------------------------------------------------------- batched ops (float images in [0, 1])


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, 1], to broadcast over an NCHW batch."""
    return values.reshape(-1, 1, 1, 1)


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """cat(arange(s, s + n) for s, n in zip(starts, lengths)) without a Python loop (CPU int64)."""
    first = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - first, lengths) + torch.arange(int(lengths.sum()))


def shelf_offsets(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int, int]:
    """Where each (height, width) image goes on one canvas: ([(x, y)], canvas height, canvas width).

    Shelf packing, tallest first: left to right on a shelf as wide as the widest image or the square root of the
    total area, whichever is larger, then the next shelf below. For 256 photos of 330-420 x 440-560 px the
    canvas is 8 % larger than the images, with one 4000 x 3000 px among them 21 %: an outlier costs about its
    own pixels, not N times them as padding every image to the largest would.
    """
    width = max(max(w for _, w in sizes), math.ceil(math.sqrt(sum(h * w for h, w in sizes))))
    offsets: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    x = y = shelf = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0]):
        h, w = sizes[i]
        if x + w > width:
            x, y, shelf = 0, y + shelf, 0
        offsets[i] = (x, y)
        x, shelf = x + w, max(shelf, h)
    return offsets, y + shelf, width


def _edge_copies(along_start: torch.Tensor, along_length: torch.Tensor, first: torch.Tensor, end: torch.Tensor):
    """Indices that repeat each image's first and last line (column or row) one step outward:
    (positions along the line, destination lines, source lines), CPU int64."""
    def per_line(values: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(values, along_length)

    along = _ranges(along_start, along_length).repeat(2)
    return along, torch.cat([per_line(first - 1), per_line(end)]), torch.cat([per_line(first), per_line(end - 1)])


def pack(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 CHW images of any sizes -> (float canvas [1, C, H, W], [N, 2] image origins (x, y) on the device).

    Each image sits in its own (h + 2) x (w + 2) cell whose border repeats the image's edge pixels: roi_align
    then clamps at an image's edges as it does at a tensor's (and as `interpolate` does), and never reads a
    neighbour (its bilinear samples stay within half a pixel of the box, so at most one pixel outside the
    image). One copy kernel per image, two index kernels for all the borders; the canvas is zeroed, so no
    uninitialised value can reach a sum.
    """
    device = images[0].device
    sizes = [tuple(image.shape[-2:]) for image in images]
    cells, height, width = shelf_offsets([(h + 2, w + 2) for h, w in sizes])
    origins = [(x + 1, y + 1) for x, y in cells]
    canvas = torch.zeros((images[0].shape[0], height, width), dtype=torch.float32, device=device)
    for image, (h, w), (x, y) in zip(images, sizes, origins):
        canvas[:, y : y + h, x : x + w] = image
    (hs, ws), (xs, ys) = torch.tensor(sizes).T, torch.tensor(origins).T
    rows, dst, src = (_to_device(t, device) for t in _edge_copies(ys, hs, xs, xs + ws))
    canvas[:, rows, dst] = canvas[:, rows, src]  # left and right columns
    cols, dst, src = (_to_device(t, device) for t in _edge_copies(xs - 1, ws + 2, ys, ys + hs))
    canvas[:, dst, cols] = canvas[:, src, cols]  # then top and bottom rows, corners included
    return canvas.unsqueeze(0), _to_device(torch.tensor(origins, dtype=torch.float32), device)


def canvas_groups(images: list[torch.Tensor]) -> list[slice]:
    """Consecutive groups of images whose cells hold at most CANVAS_VALUES values together (an image above it
    alone): one group for a batch of ordinary photos, several for a batch of camera-sized ones."""
    limit, groups, start, total = CANVAS_VALUES, [], 0, 0
    for i, image in enumerate(images):
        values = image.shape[0] * (image.shape[-2] + 2) * (image.shape[-1] + 2)
        if total + values > limit and i > start:
            groups.append(slice(start, i))
            start, total = i, 0
        total += values
    return groups + [slice(start, len(images))]


def resized_crops(images: list[torch.Tensor], boxes: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Crop every image at each view's box and resize to `size` x `size`: uint8 CHW -> float [0, 1] NCHW.

    One roi_align for the whole batch and both views: the images are packed onto one canvas (`pack`) and each
    box is shifted by its image's offset. `aligned=True` puts pixel centres at half-integers as in
    torchvision's resize; the adaptive sampling grid averages ceil(box / size) bilinear samples per output
    pixel along each side, which antialiases downscaling. Batches of very large images take one canvas per
    `canvas_groups` group, so a canvas stays within CANVAS_VALUES.
    """
    from torchvision.ops import roi_align

    groups = canvas_groups(images)
    per_group = []
    for group in groups:
        canvas, offsets = pack(images[group])
        shifted = torch.cat([b[group] + offsets.repeat(1, 2) for b in boxes])  # [views * n, 4] on the canvas
        rois = torch.cat([shifted.new_zeros(len(shifted), 1), shifted], dim=1)
        crops = roi_align(canvas, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        per_group.append(crops.div_(255).chunk(len(boxes)))
    if len(groups) == 1:
        return list(per_group[0])
    return [torch.cat([crops[view] for crops in per_group]) for view in range(len(boxes))]


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(mask), x.flip(-1), x)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB batch, [N, 1, H, W] (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def grayscale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(mask), to_grayscale(x).expand_as(x), x)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with a per-sample ratio: factor * x + (1 - factor) * other, clamped to [0, 1].
    As one lerp (other + factor * (x - other)): one fused pass instead of three."""
    return torch.lerp(other.expand_as(x), x, _per_sample(factor)).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb_to_hsv (Pillow's formula) on an NCHW batch; hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc  # grey pixels: hue and saturation 0, no division by zero
    span = maxc - minc
    s = span / torch.where(flat, torch.ones_like(maxc), maxc)
    span = torch.where(flat, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_hsv` in closed form: channel n = v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6 for n = 5, 3, 1; the same values as torchvision's sector lookup, without gather."""
    h, s, v = hsv.unbind(1)
    n = torch.arange(5.0, 0.0, -2.0, device=hsv.device).view(1, 3, 1, 1)  # 5, 3, 1: made on the device
    k = torch.remainder(n + 6 * h.unsqueeze(1), 6)
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * weight


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `factor` (in turns, per sample), as torchvision's adjust_hue."""
    h, s, v = rgb_to_hsv(x).unbind(1)
    h = torch.remainder(h + factor.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=1))


def blend_op(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation per sample (`op` [N]); inactive samples get factor 1 (identity).

    The three are one blend against a different `other`: black, the mean luma, or the luma image.
    """
    gray = to_grayscale(x)
    is_contrast, is_saturation = _per_sample(op == CONTRAST).to(x.dtype), _per_sample(op == SATURATION).to(x.dtype)
    other = gray * is_saturation + gray.mean((1, 2, 3), keepdim=True) * is_contrast  # black for brightness
    return _blend(x, other, torch.where(active, factor, torch.ones_like(factor)))


def color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors [N, 4] applied in a per-sample order [N, 4] where `apply`.

    Hue (the costly op) runs once: every blend op placed before a sample's hue runs in a first sweep
    over positions 0-2, then hue, then the blend ops placed after it in a second sweep over positions
    1-3. That is 6 cheap blends and 1 hue instead of 4 of each for a position-by-position evaluation,
    and no host sync (no boolean indexing).
    """
    hue_at = (order == HUE).to(torch.uint8).argmax(1)
    out = x
    for after in (False, True):
        if after:
            out = adjust_hue(out, torch.where(apply, factors[:, HUE], torch.zeros_like(factors[:, HUE])))
        for position in range(1, 4) if after else range(3):
            op = order[:, position]
            placed = position > hue_at if after else position < hue_at
            factor = factors.gather(1, op.unsqueeze(1)).squeeze(1)
            out = blend_op(out, op, factor, apply & placed & (op != HUE))
    return torch.where(_per_sample(apply), out, x)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[N] sigmas -> [N, kernel_size] normalised 1-D Gaussians, as torchvision's _get_gaussian_kernel1d."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, kernel_size, device=sigma.device)
    return torch.softmax(-(x / sigma.unsqueeze(1)).pow(2), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int, mask: torch.Tensor) -> torch.Tensor:
    """Blur sample i with sigma[i] where mask[i]: two grouped 1-D convolutions (one group per sample
    and channel), reflect padding as torchvision's gaussian_blur."""
    n, c, height, width = x.shape
    kernel = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # [N*C, k]
    pad = kernel_size // 2
    planes = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    planes = F.conv2d(planes, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return torch.where(_per_sample(mask), planes.view(n, c, height, width), x)


def solarize(x: torch.Tensor, mask: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    return torch.where(_per_sample(mask) & (x >= threshold), 1 - x, x)


def standardize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = _constant(list(mean), x.device).to(x.dtype).view(1, -1, 1, 1)
    std_t = _constant(list(std), x.device).to(x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def augment(crops: torch.Tensor, params: ViewParams, cfg: ViewConfig, view: int) -> torch.Tensor:
    """Everything after the crop, in views.py's order; ops whose probability is 0 are skipped outright."""
    x = flip(crops, params.flip)
    if cfg.jitter_p > 0:
        x = color_jitter(x, params.jitter, params.factors, params.order)
    if cfg.grayscale_p > 0:
        x = grayscale(x, params.gray)
    if cfg.blur_p[view] > 0:
        x = gaussian_blur(x, params.sigma, blur_kernel_size(cfg.image_size), params.blur)
    if cfg.solarize_p[view] > 0:
        x = solarize(x, params.solarize)
    return standardize(x, cfg.mean, cfg.std)


# ---------------------------------------------------------------- the two views of a batch


def make_view(crops: torch.Tensor, params: ViewParams, cfg: ViewConfig, view: int, dtype: torch.dtype) -> torch.Tensor:
    """`augment`, then the training input's dtype and channels_last layout (one fused pass when compiled)."""
    return augment(crops, params, cfg, view).to(dtype).contiguous(memory_format=torch.channels_last)


class GpuTwoViews:
    """Callable: (decoded uint8 RGB CHW images on one device, generator) -> (view1, view2), each
    [N, 3, S, S] channels_last in `dtype`.

    `compile=True` runs everything after the crop through `torch.compile`, which fuses the ~100
    elementwise passes of jitter, grayscale, solarize, standardize and the cast into a few kernels (the
    batch shape is fixed, so it compiles once per view); blur's convolutions stay cuDNN's.
    """

    def __init__(self, cfg: ViewConfig, dtype: torch.dtype = torch.float32, compile: bool = False):
        self.cfg = cfg
        self.dtype = dtype
        self.make_view = torch.compile(make_view, dynamic=False) if compile else make_view

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = images[0].device
        sizes = _to_device(torch.tensor([image.shape[-2:] for image in images], dtype=torch.float32), device)
        params = [draw_params(sizes, self.cfg, view, generator) for view in (0, 1)]
        crops = resized_crops(images, [p.boxes for p in params], self.cfg.image_size)
        view1, view2 = (self.make_view(crops[v], params[v], self.cfg, v, self.dtype) for v in (0, 1))
        return view1, view2


class GpuBatches:
    """Training batches like `stream.TrainLoader`'s, (view1, view2, n_seen, n_corrupt), built on `device`
    from a raw-bytes loader (`stream.train_loader(transform=None)`), one batch ahead of the consumer.

    A producer thread reads batch k + 1, decodes it and builds its views while the caller runs step k; on
    CUDA it does so on its own side stream. Stream rules (docs/method.md, "GPU views and CPU views"):
    the producer records an event on the side stream after each batch, and the consumer's stream waits on
    that event before the batch is handed over (`wait_event`, no host sync); the two views are then
    `record_stream`ed on the consumer's stream, so the caching allocator does not give their memory back to
    the side stream while the consumer's kernels may still read it. Everything else a batch allocates is
    made and used on the side stream only. On the CPU the same thread runs without streams. The views of a
    step depend only on its seed, never on which thread made them or when.
    """

    def __init__(self, encoded, views: GpuTwoViews, device: torch.device, *, seed: int, epoch: int, rank: int,
                 start_step: int, ahead: int = 1):
        self.encoded = encoded
        self.views = views
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the producer needs the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.seed, self.epoch, self.rank, self.start_step = seed, epoch, rank, start_step
        self.ahead = ahead  # finished batches waiting in the queue (one more is being built)

    def __len__(self) -> int:
        return len(self.encoded)

    def build(self, batch, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Decode and augment one raw batch with the views of `step`; returns (view1, view2, failed decodes)."""
        images, failed = decode_batch(split_encoded(batch.data, batch.sizes), self.device)
        for index in failed:
            log.warning("sample %d of step %d could not be decoded; counted corrupt, replaced by another",
                        index, step)
        if not images:
            from pipeline.errors import UserError

            raise UserError(f"none of the {len(failed)} images of step {step} could be decoded")
        generator = step_generator(self.device, self.seed, self.epoch, self.rank, step)
        view1, view2 = self.views(images, generator)
        return view1, view2, len(failed)

    def _produce(self, ready: queue.Queue, stop: threading.Event) -> None:
        """The producer thread: every batch as (view1, view2, seen, corrupt, CUDA event or None), then DONE;
        an exception is put in the queue for the consumer to raise."""

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            side = None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # per thread: nvJPEG and new streams use the current device
                side = torch.cuda.Stream(self.device)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for step, batch in enumerate(self.encoded, start=self.start_step):
                    view1, view2, failed = self.build(batch, step)
                    event = None
                    if side is not None:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((view1, view2, batch.seen, batch.corrupt + failed, event)):
                        return
            put(DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    def __iter__(self):
        ready: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(ready, stop), name="gpu-views", daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                view1, view2, seen, corrupt, event = item
                if event is not None:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(event)
                    view1.record_stream(consumer)
                    view2.record_stream(consumer)
                yield view1, view2, seen, corrupt
        finally:
            stop.set()  # a consumer that stops early: the producer ends after the batch it is building
            producer.join()
