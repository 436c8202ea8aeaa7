"""The supervised ceiling: the same backbone trained with labels for the same minutes.

What the self-supervised numbers are measured against: the backbone plus a linear head, cross-entropy
on the labelled training images, random shifts (4-px zero padding) and horizontal flips, SGD with
Nesterov momentum. The learning rate follows a cosine over the clock, not over a step count, so the
schedule ends when the minutes do on any machine. Its test accuracy is the `supervised_linear` baseline
of bench/quality.py: how far labels get in the same time.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.data.labelled import iter_labelled
from pipeline.data.stream import CorruptCounter
from pipeline.train.model import build_backbone

PAD = 4
WARMUP_FRACTION = 0.03  # of the minutes: a linear ramp, as the usual 1 epoch of 30


def labelled_tensors(src: str, size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, size, size] images and int64 [N] labels of SRC, preprocessed as evaluation reads them."""
    pairs = list(iter_labelled(src, size, CorruptCounter(), limit))
    return torch.from_numpy(np.stack([image for image, _ in pairs])), torch.tensor([label for _, label in pairs])


def shift_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of uint8 [B, C, S, S] shifted by up to PAD pixels (zero fill) and flipped with p=0.5."""
    batch, channels, size, _ = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    offsets = torch.randint(0, 2 * PAD + 1, (2, batch, 1), generator=generator)
    grid = torch.arange(size).view(1, size)
    rows, cols = offsets[0] + grid, offsets[1] + grid  # [B, S] each
    shifted = padded[torch.arange(batch).view(-1, 1, 1, 1), torch.arange(channels).view(1, -1, 1, 1),
                     rows.view(batch, 1, size, 1), cols.view(batch, 1, 1, size)]
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), shifted.flip(-1), shifted)


def cosine_lr(base: float, elapsed: float, total: float) -> float:
    """The learning rate at `elapsed` of `total` seconds: linear warm-up, then cosine to zero."""
    warmup = WARMUP_FRACTION * total
    if elapsed < warmup:
        return base * elapsed / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (elapsed - warmup) / (total - warmup))))


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize, batch_size: int = 1024) -> float:
    model.eval()
    hits = sum(int((model(normalize(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum())
               for i in range(0, len(images), batch_size))
    return hits / len(images)


def train_supervised(model_config: ModelConfig, train_images: torch.Tensor, train_labels: torch.Tensor,
                     test_images: torch.Tensor, test_labels: torch.Tensor, minutes: float, mean, std, *,
                     batch_size: int = 256, lr: float = 0.1, weight_decay: float = 5e-4, seed: int = 0) -> dict[str, Any]:
    """Train backbone + linear head on uint8 [N, 3, S, S] images for `minutes`; test top-1 and the run's figures."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    backbone, dim = build_backbone(model_config)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    model = nn.Sequential(backbone, nn.Linear(dim, classes)).to(memory_format=torch.channels_last)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - mean_t) / std_t).contiguous(memory_format=torch.channels_last)

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                                lr=lr, momentum=0.9, nesterov=True)
    total, steps, seen = minutes * 60, 0, 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < total:
        order = torch.randperm(len(train_images), generator=generator)
        for first in range(0, len(order) - batch_size + 1, batch_size):
            elapsed = time.perf_counter() - start
            if elapsed >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, elapsed, total)
            index = order[first:first + batch_size]
            model.train()
            loss = F.cross_entropy(model(normalize(shift_and_flip(train_images[index], generator))), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps, seen = steps + 1, seen + batch_size
    train_seconds = time.perf_counter() - start
    return {"top1": accuracy(model, test_images, test_labels, normalize), "steps": steps,
            "epochs": round(seen / len(train_images), 2), "train_minutes": round(train_seconds / 60, 2),
            "images_per_s": round(seen / train_seconds, 1), "final_loss": round(loss.item(), 4) if steps else None,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
