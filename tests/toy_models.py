"""Toy models for engine tests: ModuleDict stages, a shared module, data-dependent control flow."""

from __future__ import annotations

import torch
from timm.models.resnet import Bottleneck
from torch import nn


def _bottleneck(inplanes: int, planes: int, stride: int = 1) -> Bottleneck:
    down = None
    if stride != 1 or inplanes != planes * 4:
        down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
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


# ----------------------------------------------------------------------------------------------------------------------
# Bad-input and generic-block models (tests/test_bad_input.py, test_guarantees.py, test_generic_blocks.py)


class NoStageNet(nn.Module):
    """A stem and a head: no block container anywhere, no attention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


class OddWidthNet(nn.Module):
    """Bottlenecks whose 3x3 conv has 7 channels (odd): no ParCSplit can replace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 28, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_bottleneck(28, 7), _bottleneck(28, 7), _bottleneck(28, 7))
        self.head = nn.Linear(28, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SharedTwoSizesNet(nn.Module):
    """One Bottleneck object run at two resolutions (16x16 and 8x8 for a 32x32 input)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.shared = _bottleneck(32, 8)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_bottleneck(32, 8), _bottleneck(32, 8))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.shared(self.stem(x))
        x = self.shared(self.down(x))
        return self.head(self.blocks(x).mean((2, 3)))


class ItemLoopNet(nn.Module):
    """Reads a tensor value (``.item()``) to decide how often to run its blocks: no meta device, no fx."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_bottleneck(32, 8), _bottleneck(32, 8))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(1 + int(x.abs().mean().item() < 0)):
            x = self.blocks(x)
        return self.head(x.mean((2, 3)))


class SizeBranchNet(nn.Module):
    """Branches on the input size (fx cannot trace it) and returns a dict."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_bottleneck(32, 8), _bottleneck(32, 8))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] >= 4:
            x = self.blocks(x)
        return {"logits": self.head(x.mean((2, 3))), "features": x}


class TokenAttention(nn.Module):
    """(B, N, C) self-attention with its own softmax module; reads an optional (H, W) it is given."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw=None, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class LatentPool(nn.Module):
    """Attention pooling: a learned query attends to every token, (B, N, C) -> (B, C): no token mixer."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.kv = nn.Linear(dim, 2 * dim)

    def forward(self, x):
        k, v = self.kv(x).chunk(2, dim=-1)
        attn = (self.query.expand(x.shape[0], -1, -1) @ k.transpose(1, 2)).softmax(-1)
        return (attn @ v)[:, 0]


class TokenBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x, hw=None):
        x = x + self.attn(self.norm(x), hw)
        return x + self.mlp(x)


class ToyViT(nn.Module):
    """Patch embedding, a class token, (B, N, C) attention blocks given the grid, attention pooling head."""

    def __init__(self, dim: int = 16, depth: int = 2, patch: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList([TokenBlock(dim) for _ in range(depth)])
        self.pool = LatentPool(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.patch_embed(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x, hw)
        return self.head(self.pool(x))


class Attention2dToy(nn.Module):
    """(B, C, H, W) attention with 1x1 conv projections (timm Attention2d style)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
        attn = (q.transpose(1, 2) @ k).softmax(-1)
        return self.proj((v @ attn.transpose(1, 2)).reshape(b, c, h, w))


class ChannelsLastAttention(nn.Module):
    """(B, H, W, C) attention with linear projections (MaxViT AttentionCl style); odd width allowed."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        shape = x.shape
        q, k, v = self.qkv(x.flatten(1, 2)).chunk(3, dim=-1)
        out = (q @ k.transpose(1, 2)).softmax(-1) @ v
        return self.proj(out).reshape(shape)


class TupleAttention(nn.Module):
    """Returns (tokens, grid), like MViT's attention: one tensor out is not enough for its caller."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj((q @ k.transpose(1, 2)).softmax(-1) @ v), hw


class HybridNet(nn.Module):
    """A conv stem, then (B, C, H, W) attention blocks, then (B, H, W, C) attention blocks of odd width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.nchw = nn.ModuleList([Attention2dToy(16), Attention2dToy(16)])
        self.to15 = nn.Conv2d(16, 15, 1)
        self.nhwc = nn.ModuleList([ChannelsLastAttention(15), ChannelsLastAttention(15)])
        self.head = nn.Linear(15, 4)

    def forward(self, x):
        x = self.stem(x)
        for m in self.nchw:
            x = x + m(x)
        x = self.to15(x).permute(0, 2, 3, 1)
        for m in self.nhwc:
            x = x + m(x)
        return self.head(x.mean((1, 2)))


class TupleAttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.ModuleList([TupleAttention(8), TupleAttention(8)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.patch_embed(x)
        hw = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            y, hw = blk(x, hw)
            x = x + y
        return self.head(x.mean(1))


class GroupedBlock(nn.Module):
    """1x1 -> grouped 3x3 -> 1x1 with a residual: a ResNeXt / RegNet-like block of its own class."""

    def __init__(self, dim: int, width: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, dim, 1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        return self.act(x + self.conv3(y))


class GroupedStage(nn.Module):
    """A stage module of its own class holding b1..bn (timm RegStage style), not an nn.Sequential."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", GroupedBlock(dim, 16, groups=4))

    def forward(self, x):
        for blk in self.children():
            x = blk(x)
        return x


class GroupedStageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.s1 = GroupedStage(24, 2)
        self.down = nn.Conv2d(24, 24, 3, stride=2, padding=1)
        self.s2 = GroupedStage(24, 3)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        x = self.s2(self.down(self.s1(self.stem(x))))
        return self.head(x.mean((2, 3)))


class MaskArgNet(nn.Module):
    """``forward(x, mask=None)`` branching on the mask (Hiera style): traced with the default."""

    def __init__(self):
        super().__init__()
        self.inner = DictStageNet()

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.inner(x)
