"""``ParC``: position-aware circular convolution along one axis (ParC-Net, ECCV 2022; Fast-ParC).

A depthwise (or dense, channel-mixing) 1-D convolution along ``height`` or ``width`` whose kernel is
as long as the feature map, with circular padding and a learned position embedding added first.
Kernel and PE are stored at a base length ``kernel_size`` and resized to each input's own axis length,
so any input size (square or not) works.

Two implementations compute the same function (see :mod:`parc_surgery.ops.functional`):
``spatial`` (a valid conv over the circularly extended map, O(N^2) per line) and ``fft``
(Fast-ParC, O(N log N)); ``auto`` picks per call from the actual sizes (:func:`choose_impl`).

Direction names follow the axis the kernel runs along: ``axis="height"`` has a (K, 1) kernel and mixes
the pixels of one column (the ECCV paper's "ParC-V"); ``axis="width"`` has a (1, K) kernel and mixes
one row ("ParC-H").
"""

from __future__ import annotations

import math

import torch
import torch.fx
from timm.layers import trunc_normal_
from torch import nn

from ..errors import ConfigError
from .functional import AXES, IMPLS, Axis, Impl, parc_conv, resize_kernel

__all__ = ["FFT_MIN_LENGTH", "ParC", "choose_impl"]

# Crossover for impl="auto": the FFT path is used from this axis length up.
# Placeholder until measured by benchmarks/bench_parc_op.py (see the comment there).
FFT_MIN_LENGTH = 28


def choose_impl(n: int, *, dense: bool = False, dtype: torch.dtype = torch.float32) -> str:
    """Pick ``spatial`` or ``fft`` for an axis of length ``n`` (the crossover in ``FFT_MIN_LENGTH``)."""
    if dtype not in (torch.float32, torch.float64):
        return "spatial"
    return "fft" if n >= FFT_MIN_LENGTH else "spatial"


def _parc_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    pe: torch.Tensor | None,
    bias: torch.Tensor | None,
    axis: str,
    dense: bool,
    impl: str,
) -> torch.Tensor:
    if impl == "auto":
        n = x.shape[2] if axis == "height" else x.shape[3]
        impl = choose_impl(n, dense=dense, dtype=x.dtype)
    return parc_conv(x, weight, pe, bias, axis, dense, impl)


# A leaf for torch.fx: the traced graph holds one call to _parc_forward, so nothing that depends on
# the input size (axis length, resized kernels, impl choice) is baked into a traced module.
torch.fx.wrap("_parc_forward")


class ParC(nn.Module):
    """Position-aware circular convolution along one axis.

    Args:
        channels: input (= output) channels.
        kernel_size: base kernel / PE length K (usually the feature size at the model's input size).
        axis: the axis the kernel runs along, ``"height"`` or ``"width"``.
        pe: add a learned per-channel position embedding (length K, resized) before the conv.
        bias: add a per-channel bias after the conv.
        dense: channel-mixing kernels ``(C, C, K)`` instead of depthwise ``(C, 1, K)``.
        impl: ``"spatial"``, ``"fft"`` or ``"auto"``.
        pe_init: ``"trunc_normal"`` (std 0.02, ParC-ConvNets) or ``"normal"`` (N(0, 1), ParC-Net blocks).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        axis: Axis = "height",
        *,
        pe: bool = True,
        bias: bool = True,
        dense: bool = False,
        impl: Impl = "auto",
        pe_init: str = "trunc_normal",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"ParC: channels must be a positive int, got {channels!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ConfigError(f"ParC: kernel_size must be a positive int (the base length), got {kernel_size!r}")
        if axis not in AXES:
            raise ConfigError(f"ParC: axis must be one of {AXES} (the axis the kernel runs along), got {axis!r}")
        if impl not in IMPLS:
            raise ConfigError(f"ParC: impl must be one of {IMPLS}, got {impl!r}")
        if pe_init not in ("trunc_normal", "normal"):
            raise ConfigError(f"ParC: pe_init must be 'trunc_normal' or 'normal', got {pe_init!r}")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.kernel_size = kernel_size
        self.axis = axis
        self.dense = bool(dense)
        self.impl = impl
        self.pe_init = pe_init
        k_shape = (kernel_size, 1) if axis == "height" else (1, kernel_size)
        self.weight = nn.Parameter(torch.empty(channels, channels if dense else 1, *k_shape, **dd))
        self.bias = nn.Parameter(torch.empty(channels, **dd)) if bias else None
        self.pe = nn.Parameter(torch.empty(1, channels, *k_shape, **dd)) if pe else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: PyTorch's default conv init for kernel and bias, PE per ``pe_init``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.pe is not None:
            if self.pe_init == "normal":
                nn.init.normal_(self.pe, 0.0, 1.0)
            else:
                trunc_normal_(self.pe, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _parc_forward(x, self.weight, self.pe, self.bias, self.axis, self.dense, self.impl)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # ParC weights saved at another base length load here resampled to this module's length.
        dim = 2 if self.axis == "height" else 3
        for name in ("weight", "pe"):
            key = prefix + name
            t = state_dict.get(key)
            own = getattr(self, name)
            if t is None or own is None or t.dim() != 4 or t.shape == own.shape:
                continue
            same_other = all(t.shape[i] == own.shape[i] for i in range(4) if i != dim)
            if same_other:
                state_dict[key] = resize_kernel(t.to(own.dtype), self.kernel_size, self.axis)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, axis={self.axis!r}, pe={self.pe is not None}, "
            f"bias={self.bias is not None}, dense={self.dense}, impl={self.impl!r}"
        )
