"""The supervised ceiling's pieces: its augmentation, its clock-driven schedule, a short real fit."""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.evaluate.supervised import PAD, cosine_lr, shift_and_flip, train_supervised


def test_shift_and_flip_moves_each_image_by_at_most_the_padding():
    images = torch.randint(1, 256, (32, 3, 12, 12), dtype=torch.uint8)  # no zeros: padding shows as 0
    out = shift_and_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    for image, result in zip(padded, out):
        candidates = [image[:, y:y + 12, x:x + 12] for y in range(2 * PAD + 1) for x in range(2 * PAD + 1)]
        assert any(torch.equal(result, c) or torch.equal(result, c.flip(-1)) for c in candidates)
    assert not torch.equal(out, images)


def test_cosine_lr_warms_up_then_decays_to_zero_on_the_clock():
    assert cosine_lr(0.1, 0, 100) == 0
    assert abs(cosine_lr(0.1, 3, 100) - 0.1) < 1e-9  # end of the 3 % warm-up
    assert cosine_lr(0.1, 50, 100) < cosine_lr(0.1, 20, 100) < 0.1
    assert abs(cosine_lr(0.1, 100, 100)) < 1e-9 and abs(cosine_lr(0.1, 500, 100)) < 1e-9


def test_train_supervised_learns_separable_classes_within_its_minutes():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    images = torch.randint(0, 60, (200, 3, 16, 16), generator=generator, dtype=torch.uint8)
    images[labels == 1] += 150  # bright vs dark: learnable in seconds
    result = train_supervised(ModelConfig("resnet10", small_stem=True, stem_stride=2, projector="8"), images, labels,
                              images[:100], labels[:100], minutes=0.25, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=32)
    assert result["top1"] >= 0.9 and result["steps"] > 20
    assert 0.24 <= result["train_minutes"] <= 0.3
