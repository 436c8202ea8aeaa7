"""The GPU data path: decode a whole batch on the training device and build both views there.

The CPU path (`views.py`) decodes and augments one image at a time in DataLoader workers; at ImageNet
sizes that starves a GPU, since one CPU thread decodes far fewer JPEGs per second than a GPU trains on. Here the workers only read encoded
bytes (`stream.train_loader(transform=None)`), and the main process

1. decodes the batch at once: `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA) for
   JPEGs, PIL on the CPU for other formats and for JPEGs nvJPEG refuses (CMYK, broken streams);
2. builds both views with batched ops whose parameters are random PER SAMPLE: random resized crop
   (boxes drawn exactly like `RandomResizedCrop`, resampled with `torchvision.ops.roi_align`), flip,
   colour jitter (per-sample factors in a per-sample random order), grayscale, Gaussian blur with a
   per-sample sigma (separable grouped convolution), solarize, standardize (per-channel mean and std);
3. returns channels_last tensors, bf16 for bf16 runs (CUDA), fp32 otherwise.

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

import logging
import math
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


def _constant(values: list[float], device: torch.device) -> torch.Tensor:
    """A small float32 constant on `device` without a host sync: a copy from pageable memory would wait
    for the stream, one from pinned memory does not."""
    constant = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        constant = constant.pin_memory()
    return constant.to(device, non_blocking=True)


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


def _replicate_last_row_and_column(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] -> [C, H + 1, W + 1] with the last row and column repeated (two cats: F.pad's replicate
    mode costs ~50x more per call on CPU, and this runs once per image)."""
    image = torch.cat([image, image[..., -1:]], dim=-1)
    return torch.cat([image, image[..., -1:, :]], dim=-2)


def resized_crops(images: list[torch.Tensor], boxes: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Crop every image at each view's box and resize to `size` x `size`: uint8 CHW -> float [0, 1] NCHW.

    One roi_align per image covers all views (its rois share the source). `aligned=True` puts pixel
    centres at half-integers as in torchvision's resize; the adaptive sampling grid averages
    ceil(box / size) bilinear samples per output pixel along each side, which antialiases downscaling.
    A one-pixel replicated border makes samples past the last pixel centre clamp to the edge, as
    `interpolate` does.
    """
    from torchvision.ops import roi_align

    views = len(boxes)
    per_image = torch.stack(boxes, dim=1)  # [N, views, 4]
    rois = torch.cat([per_image.new_zeros(per_image.shape[:2] + (1,)), per_image], dim=2)
    crops = []
    for image, image_rois in zip(images, rois):
        padded = _replicate_last_row_and_column(image).unsqueeze(0).float()
        crops.append(roi_align(padded, image_rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True))
    stacked = torch.cat(crops).div_(255).unflatten(0, (len(images), views))
    return [stacked[:, v] for v in range(views)]


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


class GpuTwoViews:
    """Callable: (decoded uint8 RGB CHW images on one device, generator) -> (view1, view2), each
    [N, 3, S, S] channels_last in `dtype`.

    `compile=True` runs everything after the crop through `torch.compile`, which fuses the ~100
    elementwise passes of jitter, grayscale, solarize and standardize into a few kernels (the batch
    shape is fixed, so it compiles once per view).
    """

    def __init__(self, cfg: ViewConfig, dtype: torch.dtype = torch.float32, compile: bool = False):
        self.cfg = cfg
        self.dtype = dtype
        self.augment = torch.compile(augment, dynamic=False) if compile else augment

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = images[0].device
        sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.float32)
        if device.type == "cuda":
            sizes = sizes.pin_memory()
        sizes = sizes.to(device, non_blocking=True)
        params = [draw_params(sizes, self.cfg, view, generator) for view in (0, 1)]
        crops = resized_crops(images, [p.boxes for p in params], self.cfg.image_size)
        view1, view2 = (self.augment(crops[v], params[v], self.cfg, v).to(self.dtype).contiguous(
            memory_format=torch.channels_last) for v in (0, 1))
        return view1, view2


class GpuBatches:
    """Training batches like `stream.TrainLoader`'s, (view1, view2, n_seen, n_corrupt), built on `device`
    from a raw-bytes loader (`stream.train_loader(transform=None)`).

    Overlap on CUDA: the caller enqueues step k and then asks for batch k + 1; its decode (nvJPEG on its
    own stream, the host waiting on it) and augmentation (on a side stream) run while step k is still
    on the GPU. The main stream waits for the side stream only when batch k + 1 is handed over. The
    DataLoader workers keep the next batches' bytes ready (pinned when `pin_memory`).
    """

    def __init__(self, encoded, views: GpuTwoViews, device: torch.device, *, seed: int, epoch: int, rank: int,
                 start_step: int):
        self.encoded = encoded
        self.views = views
        self.device = torch.device(device)
        self.seed, self.epoch, self.rank, self.start_step = seed, epoch, rank, start_step

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

    def __iter__(self):
        on_cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if on_cuda else None
        for step, batch in enumerate(self.encoded, start=self.start_step):
            if side is None:
                view1, view2, failed = self.build(batch, step)
            else:
                with torch.cuda.stream(side):
                    view1, view2, failed = self.build(batch, step)
                main = torch.cuda.current_stream(self.device)
                main.wait_stream(side)
                view1.record_stream(main)  # made on the side stream, used on the main one
                view2.record_stream(main)
            yield view1, view2, batch.seen, batch.corrupt + failed
