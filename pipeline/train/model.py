"""The backbone (torchvision ResNet, fc removed) and the Barlow Twins projector."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from pipeline.config import ModelConfig
from pipeline.errors import UserError

ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")


def build_backbone(model: ModelConfig) -> tuple[nn.Module, int]:
    """A randomly initialised ResNet backbone and its feature dimension.

    `zero_init_residual=True` as in the paper. The small stem (3x3 conv, no max-pool) keeps spatial
    resolution for images of 64 px or less, as on CIFAR; with `stem_stride=2` it halves it once, which
    quarters the cost. resnet10 is ResNet-18 with one block per stage (for 2-core CPUs).
    """
    if model.arch not in ARCHS:
        raise UserError(f"unknown arch {model.arch!r}; choose one of {', '.join(ARCHS)}")
    if model.stem_stride not in (1, 2):
        raise UserError(f"model.stem_stride must be 1 or 2, not {model.stem_stride}")
    if model.arch == "resnet10":
        backbone = ResNet(BasicBlock, [1, 1, 1, 1], zero_init_residual=True)
    else:
        backbone = getattr(torchvision.models, model.arch)(weights=None, zero_init_residual=True)
    dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    if model.small_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=model.stem_stride, padding=1, bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    return backbone, dim


def build_projector(spec: str, in_dim: int) -> nn.Sequential:
    """`8192-8192-8192` -> Linear-BN-ReLU blocks and a last bias-free Linear, as in the paper."""
    try:
        sizes = [in_dim] + [int(s) for s in spec.split("-")]
    except ValueError:
        raise UserError(f"projector spec must look like 8192-8192-8192, not {spec!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise UserError(f"projector spec must look like 8192-8192-8192, not {spec!r}")
    layers: list[nn.Module] = []
    for inp, out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(inp, out, bias=False), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Backbone + projector; `forward` maps both views to projector outputs in one pass."""

    def __init__(self, model: ModelConfig):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(model)
        self.projector = build_projector(model.projector, self.feature_dim)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Two backbone calls, not one on the concatenation: BatchNorm statistics stay per view,
        # as in the official implementation.
        return self.projector(self.backbone(view1)), self.projector(self.backbone(view2))
