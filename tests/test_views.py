"""The two asymmetric views: per-view probabilities over many draws, shapes, inputs, RNG source."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ViewConfig
from pipeline.data.views import TwoViews, blur_kernel_size

SIZE = 32


def probe_image() -> torch.Tensor:
    """Left half a pixel checkerboard of 0/60, right half constant 200 (uint8 RGB, SIZE x SIZE).

    Each op leaves its own mark: blur flattens the checkerboard, solarize (>= 128 inverted) turns the
    200 half into 55 but leaves the checkerboard alone, a flip swaps the halves.
    """
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    image = torch.where(cols < SIZE // 2, (rows + cols) % 2 * 60, torch.full_like(rows, 200))
    return image.to(torch.uint8).expand(3, SIZE, SIZE).contiguous()


def effects(view: torch.Tensor) -> tuple[bool, bool, bool]:
    """(blurred, solarized, flipped) read off a view of the probe image, in 0..255 units."""
    pixels = view[0] * 255
    left, right = pixels[:, : SIZE // 2], pixels[:, SIZE // 2 :]
    flipped = left.mean() > right.mean()
    board = (right if flipped else left)[:, 2:-2]  # away from the seam, where blur mixes the halves
    plain = left if flipped else right
    return bool(board.std() < 10), bool(plain.mean() < 128), bool(flipped)  # unblurred std is ~30


def within_binomial_bound(hits: int, n: int, p: float) -> bool:
    """|hits/n - p| within 4.5 standard deviations (two-sided ~7e-6 false alarms); exact for p in {0, 1}."""
    return abs(hits / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


def test_view_probabilities_over_many_draws():
    # Isolate the ops whose effects we read: full-image crop (identity resize), no jitter/grayscale,
    # sigma >= 1 so every blur is visible, mean 0 / std 1 so outputs are pixels / 255.
    # Blur and solarize probabilities are the paper's defaults of ViewConfig.
    cfg = ViewConfig(image_size=SIZE, crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0,
                     blur_sigma=(1.0, 2.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert cfg.blur_p == (1.0, 0.1) and cfg.solarize_p == (0.0, 0.2) and cfg.flip_p == 0.5
    two_views = TwoViews(cfg)
    image = probe_image()
    n = 1500
    counts = np.zeros((2, 3), dtype=int)  # view x (blurred, solarized, flipped)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small images: threads cost more than they save
    try:
        for _ in range(n):
            for index, view in enumerate(two_views(image)):
                counts[index] += effects(view)
    finally:
        torch.set_num_threads(threads)
    expected = [(cfg.blur_p[i], cfg.solarize_p[i], cfg.flip_p) for i in range(2)]
    for index in range(2):
        for hits, p, name in zip(counts[index], expected[index], ("blur", "solarize", "flip")):
            assert within_binomial_bound(int(hits), n, p), f"view {index + 1} {name}: {hits}/{n}, p = {p}"


def test_probe_detects_each_effect():
    """The detector itself: no op -> nothing, each op alone -> only its mark."""
    base = dict(image_size=SIZE, crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, flip_p=0.0,
                blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0), blur_sigma=(1.0, 2.0),
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    cases = {
        (False, False, False): {},
        (True, False, False): {"blur_p": (1.0, 1.0)},
        (False, True, False): {"solarize_p": (1.0, 1.0)},
        (False, False, True): {"flip_p": 1.0},
    }
    for marks, change in cases.items():
        views = TwoViews(ViewConfig(**{**base, **change}))(probe_image())
        assert [effects(v) for v in views] == [marks, marks], change


@pytest.mark.parametrize("size", [32, 224])
def test_output_shapes_and_dtype(size):
    cfg = ViewConfig(image_size=size)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8))
    view1, view2 = TwoViews(cfg)(rgb)
    for view in (view1, view2):
        assert view.shape == (3, size, size) and view.dtype == torch.float32
        assert torch.isfinite(view).all()
    assert not torch.equal(view1, view2)  # two independent draws


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_inputs_become_three_channel_views(mode):
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    for view in TwoViews(ViewConfig(image_size=SIZE))(gray.convert(mode)):
        assert view.shape == (3, SIZE, SIZE) and view.dtype == torch.float32


def test_single_channel_tensor_input():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    for view in TwoViews(ViewConfig(image_size=SIZE))(image):
        assert view.shape == (3, SIZE, SIZE)


def test_views_depend_only_on_the_torch_rng():
    two_views = TwoViews(ViewConfig(image_size=SIZE))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    draws = []
    for python_seed in (1, 2):
        random.seed(python_seed)  # the `random` module must not matter
        torch.manual_seed(7)
        draws.append(two_views(image))
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    torch.manual_seed(8)
    assert not torch.equal(two_views(image)[0], draws[0][0])


def test_blur_kernel_is_about_a_tenth_and_odd():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 9 and blur_kernel_size(32) == 3
