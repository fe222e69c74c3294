"""Warm-start folding of the ParC-ConvNet blocks: a k x k conv's kernel folded into the two ParC halves.

**Warm start** (``init="warm_start"``, the default): the replaced conv's kernel is folded into the two
ParC kernels of a :class:`ParCSplit` so that the new block starts close to the old one on smooth
features. For the height ParC (first half of the channels) the 2-D kernel is summed over its width
taps; tap offset ``a`` (``-r..+r`` for a centred ``k x k`` kernel) is placed at stored index
``a mod K`` (the offset-0 ParC convention: ``y[i] = sum_k w[k] x[(i + k) mod N]``), zeros elsewhere,
and taps that collide when ``K < k`` are summed. The width ParC (second half) likewise sums over the
height taps. Dense (ResNet) kernels keep only the within-half blocks ``W[:d, :d]`` / ``W[d:, d:]``:
the halves of a ParCSplit never mix. The conv bias (if any) is split over the two ParC biases (else
zero) and the position embeddings start at zero. The fold is exact for features constant along the
summed axis and, at the base size, away from the borders (circular instead of zero padding).
``init="reference"`` keeps the published initialisation of :class:`parc_surgery.ops.ParC`.

The conv swap itself (a copy of the source block with the conv replaced) is :mod:`parc_surgery.blocks.conv_swap`.
"""

from __future__ import annotations

import torch
from torch import nn

from .parc_split import ParCSplit

__all__ = ["INITS", "conv_origin", "dotted_name", "fold_conv_weight", "fold_taps", "keeps_size", "split_from_conv"]

INITS = ("warm_start", "reference")


def dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_dynamic_same(conv: nn.Module) -> bool:
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    return isinstance(conv, (Conv2dSame, Conv2dSameExport))


def conv_origin(conv: nn.Conv2d) -> tuple[int, int]:
    """Per axis, the kernel tap index that lands on the output pixel's own position (= the left padding)."""
    if _is_dynamic_same(conv) or conv.padding == "same":
        return tuple((k - 1) // 2 for k in conv.kernel_size)  # stride 1: total padding k-1, left half
    if conv.padding == "valid":
        return (0, 0)
    return tuple(conv.padding)


def keeps_size(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` (stride 1) keeps the spatial size: 'same' padding, or ``2 * padding == kernel - 1``."""
    if _is_dynamic_same(conv) or conv.padding == "same":
        return True
    if conv.padding == "valid":
        return tuple(conv.kernel_size) == (1, 1)
    return all(2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size))


def fold_taps(w: torch.Tensor, length: int, origin: int) -> torch.Tensor:
    """Taps along the last dim of ``w`` (tap ``j`` at offset ``j - origin``) placed at index ``offset mod length``.

    Taps landing on the same index (``length`` shorter than the kernel) are summed; other entries are zero.
    """
    out = w.new_zeros(*w.shape[:-1], length)
    for j in range(w.shape[-1]):
        out[..., (j - origin) % length] += w[..., j]
    return out


def fold_conv_weight(weight: torch.Tensor, length: int, axis: str, origin: tuple[int, int]) -> torch.Tensor:
    """A 2-D conv weight ``(O, I, kh, kw)`` folded into a ParC kernel of ``length`` along ``axis``.

    ``height``: summed over the width taps, returns ``(O, I, length, 1)``; ``width``: summed over the
    height taps, returns ``(O, I, 1, length)``.
    """
    if axis == "height":
        return fold_taps(weight.sum(dim=3), length, origin[0]).unsqueeze(3)
    return fold_taps(weight.sum(dim=2), length, origin[1]).unsqueeze(2)


@torch.no_grad()
def split_from_conv(
    conv: nn.Conv2d, kernel_hw: tuple[int, int], *, dense: bool, pe: bool, impl: str, init: str
) -> ParCSplit:
    """A biased :class:`ParCSplit` replacing ``conv`` (same device and dtype), initialised per ``init``."""
    w = conv.weight
    split = ParCSplit(
        conv.out_channels, kernel_hw, dense=dense, pe=pe, bias=True, impl=impl, device=w.device, dtype=w.dtype
    )
    if init == "reference":
        return split
    d = split.half
    origin = conv_origin(conv)
    halves = (w[:d, :d], w[d:, d:]) if dense else (w[:d], w[d:])
    for parc, w_half, b_slice in zip((split.parc_h, split.parc_w), halves, (slice(0, d), slice(d, None))):
        parc.weight.copy_(fold_conv_weight(w_half, parc.kernel_size, parc.axis, origin))
        if conv.bias is not None:
            parc.bias.copy_(conv.bias[b_slice])
        else:
            parc.bias.zero_()
        if parc.pe is not None:
            parc.pe.zero_()
    return split
