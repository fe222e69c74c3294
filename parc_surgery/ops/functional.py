"""Functional ParC: kernel/PE resizing and the two equivalent implementations.

Convention (ParC-Net reference): offset-0 circular cross-correlation along one axis,

    y[i] = sum_k w[k] * x[(i + k) mod N]  (+ b)

with a kernel as long as the axis (N). Weights use the layout of the reference convs:
``(C_out, C_in / groups, K, 1)`` for a ``height`` ParC (the kernel runs along H and mixes one
column) and ``(C_out, C_in / groups, 1, K)`` for a ``width`` ParC. Position embeddings are
``(1, C, K, 1)`` / ``(1, C, 1, K)``. Stored lengths K are resized to the instance length N by 1-D
linear interpolation with ``align_corners=True`` (end taps kept, no renormalisation).

* ``parc_spatial`` concatenates ``x`` with its first N-1 rows/columns and runs a valid conv:
  O(N^2) per line, fastest for short axes.
* ``parc_fft`` (Fast-ParC) computes ``irfft(rfft(x) * conj(rfft(w)), n=N)``: O(N log N) per line,
  faster for long axes. ``conj`` makes it a cross-correlation; ``n=N`` keeps odd N exact.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError

Axis = Literal["height", "width"]
Impl = Literal["spatial", "fft", "auto"]

AXES = ("height", "width")
IMPLS = ("spatial", "fft", "auto")

__all__ = ["AXES", "IMPLS", "Axis", "Impl", "parc_conv", "parc_fft", "parc_spatial", "resize_kernel"]


def _dim(axis: str) -> int:
    return 2 if axis == "height" else 3


def resize_kernel(t: torch.Tensor, n: int, axis: Axis) -> torch.Tensor:
    """Resize a 4-D kernel or PE along ``axis`` to length ``n`` (linear, ``align_corners=True``).

    Returns ``t`` itself when it already has length ``n``.
    """
    dim = _dim(axis)
    if t.shape[dim] == n:
        return t
    size = (n, 1) if axis == "height" else (1, n)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)


def parc_spatial(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, axis: Axis, dense: bool = False
) -> torch.Tensor:
    """Circular cross-correlation as a valid conv over ``cat(x, x[:N-1])``; weight already length N."""
    dim = _dim(axis)
    n = x.shape[dim]
    xp = torch.cat([x, x.narrow(dim, 0, n - 1)], dim=dim) if n > 1 else x
    groups = 1 if dense else x.shape[1]
    return F.conv2d(xp, weight, bias, groups=groups)


def parc_fft(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, axis: Axis, dense: bool = False
) -> torch.Tensor:
    """Fast-ParC: the same function as :func:`parc_spatial` through real FFTs along ``axis``."""
    in_dtype = x.dtype
    if in_dtype not in (torch.float32, torch.float64):  # CPU FFTs need float32/64
        x, weight = x.float(), weight.float()
    dim = _dim(axis)
    n = x.shape[dim]
    xf = torch.fft.rfft(x, n=n, dim=dim)
    # kernel as (C_out, C_in/g, F) spectra, conjugated: cross-correlation, not convolution
    w = weight.flatten(2)
    wf = torch.fft.rfft(w, n=n, dim=-1).conj()
    if dense:
        eq = "bifw,oif->bofw" if axis == "height" else "bihf,oif->bohf"
        yf = torch.einsum(eq, xf, wf)
    else:
        wf = wf[:, 0]  # (C, F)
        yf = xf * (wf[:, :, None] if axis == "height" else wf[:, None, :])
    y = torch.fft.irfft(yf, n=n, dim=dim)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    return y.to(in_dtype)


def _check_input(x: torch.Tensor, channels: int, axis: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"ParC(axis={axis!r}): input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ConfigError(
            f"ParC(axis={axis!r}): input must be 4-D (batch, channels, height, width); "
            f"got shape {tuple(x.shape)}. Reshape tokens to a (B, C, H, W) grid first."
        )
    if x.shape[1] != channels:
        raise ConfigError(
            f"ParC(axis={axis!r}): input has {x.shape[1]} channels (dim 1) but the module was built "
            f"for channels={channels}; pass tensors with {channels} channels or build ParC({x.shape[1]}, ...)."
        )
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ConfigError(
            f"ParC(axis={axis!r}): input spatial size {tuple(x.shape[2:])} is empty; height and width must be >= 1."
        )


def parc_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    pe: torch.Tensor | None,
    bias: torch.Tensor | None,
    axis: Axis,
    dense: bool,
    impl: Literal["spatial", "fft"],
) -> torch.Tensor:
    """Full ParC: resize kernel/PE to the input's own axis length, add PE, correlate, add bias.

    ``impl`` must already be resolved (``spatial`` or ``fft``); see :func:`parc_surgery.ops.choose_impl`.
    """
    channels = weight.shape[0]
    _check_input(x, channels, axis)
    n = x.shape[_dim(axis)]
    w = resize_kernel(weight, n, axis)
    if pe is not None:
        x = x + resize_kernel(pe, n, axis).to(x.dtype)
    if impl == "fft":
        return parc_fft(x, w, bias, axis, dense)
    return parc_spatial(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype), axis, dense)
