"""The two asymmetric augmented views of Barlow Twins (BYOL's recipe, docs/method.md).

View 1 and view 2 differ only in the probabilities of blur and solarize. Everything is parameterised
by `ViewConfig` (image size, crop scale, per-view probabilities), so 32-px Fashion-MNIST and 224-px
ImageNet run the same code. The ops work on uint8 tensors (faster than float or PIL) and convert to
standardised float32 at the end. Randomness comes only from the global torch RNG, which the data
loader seeds per sample, so a resumed run draws the same views.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import ViewConfig


def blur_kernel_size(image_size: int) -> int:
    """About 10 % of the image side and odd, as in BYOL (23 px at 224 px); at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def view_transform(cfg: ViewConfig, index: int) -> v2.Compose:
    """The augmentation pipeline of view `index` (0 or 1): uint8 CHW tensor -> float32 CHW."""
    return v2.Compose([
        v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply([v2.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        v2.RandomGrayscale(cfg.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(cfg.image_size), sigma=tuple(cfg.blur_sigma))],
                       p=cfg.blur_p[index]),
        v2.RandomSolarize(threshold=128, p=cfg.solarize_p[index]),  # 128 of 255 on uint8
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(cfg.mean), list(cfg.std)),
    ])


def to_rgb_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image (any mode) or a uint8 CHW tensor with 1 or 3 channels -> uint8 RGB CHW tensor."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return v2.functional.pil_to_tensor(image)
    if image.ndim == 2:
        image = image.unsqueeze(0)
    return image.repeat(3, 1, 1) if image.shape[0] == 1 else image


class TwoViews:
    """Callable: image -> (view1, view2), two float32 CHW tensors of `cfg.image_size`, standardised."""

    def __init__(self, cfg: ViewConfig):
        self.cfg = cfg
        self.view1 = view_transform(cfg, 0)
        self.view2 = view_transform(cfg, 1)

    def __call__(self, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = to_rgb_tensor(image)
        return self.view1(image), self.view2(image)
