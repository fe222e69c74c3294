"""A ViT written the way people write one: each block computes attention *inline* in its own forward.

``InlineBlock.forward`` runs the qkv projection, softmax(Q K^T) V (or ``F.scaled_dot_product_attention``), the
output projection and then the MLP, all in one method, so no submodule is "the attention". Patch 4 on a
32 x 32 input: an 8 x 8 grid plus a class token (``cls=False``: none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InlineBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 2, *, sdpa: bool = False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class InlineViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2, *, num_classes: int = 10, sdpa: bool = False, cls: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos = nn.Parameter(torch.randn(1, 64 + int(cls), dim) * 0.02)
        self.blocks = nn.Sequential(*[InlineBlock(dim, sdpa=sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = self.norm(self.blocks(t + self.pos))
        return self.head(t[:, 0] if self.cls_token is not None else t.mean(1))
