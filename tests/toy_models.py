"""Toy models for engine tests: ModuleDict stages, a shared module, data-dependent control flow."""

from __future__ import annotations

import torch
from timm.models.resnet import Bottleneck
from torch import nn


def _bottleneck(inplanes: int, planes: int, stride: int = 1) -> Bottleneck:
    down = None
    if stride != 1 or inplanes != planes * 4:
        down = nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
        )
    return Bottleneck(inplanes, planes, stride=stride, downsample=down)


class DictStageNet(nn.Module):
    """Stages held in an nn.ModuleDict, each a Sequential of timm Bottlenecks; a buffer on the model."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.ModuleDict(
            {
                "s1": nn.Sequential(_bottleneck(16, 8), _bottleneck(32, 8)),
                "s2": nn.Sequential(_bottleneck(32, 16, 2), _bottleneck(64, 16), _bottleneck(64, 16)),
                "s3": nn.Sequential(_bottleneck(64, 16, 2), _bottleneck(64, 16)),
            }
        )
        self.register_buffer("scale", torch.tensor(1.5))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x.mean((2, 3)) * self.scale)


class SharedBlockNet(nn.Module):
    """One Bottleneck object registered under two names and called twice at the same size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        shared = _bottleneck(32, 8)
        self.blocks = nn.Sequential(_bottleneck(32, 8), shared, shared)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DataDependentNet(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace it; forward hooks still work."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_bottleneck(32, 8), _bottleneck(32, 8), _bottleneck(32, 8))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > -1e9:  # data-dependent branch
            x = self.blocks(x)
        return self.head(x.mean((2, 3)))


class FixedSizeNet(nn.Module):
    """Only runs at 32x32 (a flatten into a fixed Linear)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_bottleneck(32, 8), _bottleneck(32, 8))
        self.head = nn.Linear(32 * 16 * 16, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).flatten(1))
