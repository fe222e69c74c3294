"""Functional ParC: kernel/PE resizing and the two equivalent implementations.

Convention (ParC-Net reference): offset-0 circular cross-correlation along one axis,

    y[i] = sum_k w[k] * x[(i + k) mod N]  (+ b)

with a kernel as long as the axis (N). Weights use the layout of the reference convs:
``(C_out, C_in / groups, K, 1)`` for a ``height`` ParC (the kernel runs along H and mixes one
column) and ``(C_out, C_in / groups, 1, K)`` for a ``width`` ParC. Position embeddings are
``(1, C, K, 1)`` / ``(1, C, 1, K)``. Stored lengths K are resized to the instance length N by 1-D
linear interpolation with ``align_corners=True`` (end taps kept, no renormalisation).

Two implementations of the same function, each split into *prepare* (kernel only, cacheable) and
*apply* (per input):

* spatial: the correlation as a matrix product with the (N, N) circulant matrix of the kernel,
  ``C[i, j] = w[(j - i) mod N]`` — O(N^2) per line like the reference formulation (concatenate ``x``
  with its first N-1 rows and run a valid conv) but through batched GEMMs: 1.3-10x faster than that
  conv on CPU (benchmarks/README.md). Dense (channel-mixing) kernels keep the reference conv (their
  circulant would be ``C_out * C_in * N^2`` large).
* fft (Fast-ParC): ``irfft(rfft(x) * conj(rfft(w)), n=N)`` — O(N log N) per line. ``conj`` makes it a
  cross-correlation; ``n=N`` keeps odd N exact. Dense kernels multiply per frequency by a
  (C_out, C_in) complex matrix. Computed in float32/float64 (half inputs are upcast). It runs as one
  custom operator (:mod:`parc_surgery.ops.fft`), so ``torch.compile`` / ``torch.export`` keep it in the graph.
* conv (the *portable* form, what the official ParC-Net code shipped): concatenate ``x`` with its first N-1
  lines along the axis (slice + concat) and run a valid (depthwise) convolution with the length-N kernel.
  Every exporter and edge runtime has these three ops; :func:`portable_form` makes every ParC use it
  (:func:`parc_surgery.export` does, so no ``DFT`` or ``Pad(mode=wrap)`` reaches an exported graph).
* taps (depthwise only, for ``torch.compile``): the same valid correlation over the circularly extended map
  written as N shifted multiply-adds, which inductor fuses into one loop with the extension, the offset and
  whatever pointwise work follows (the next BatchNorm and activation), where ``conv`` is an external call
  between copies. Never exported (:func:`~parc_surgery.ops.resolve_impl` picks it only in compiled inference).

The position embedding is added before the correlation and the bias after; since the correlation is
linear, both fold into one additive term ``offset = corr(pe) + bias`` (per channel, along the axis),
computed once per kernel, which saves a full pass over the input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..vocab import IMPLS, Impl
from .fft import fft_correlate

Axis = Literal["height", "width"]
Form = Literal["spatial", "fft", "conv", "taps"]  # what an impl resolves to for one call (``conv``: the portable form)

AXES = ("height", "width")
FORMS = ("spatial", "fft", "conv", "taps")
SHORT_LINE = 8  # lines up to this length: one GEMM per channel over the whole batch (see _apply_spatial)

__all__ = [
    "AXES",
    "FORMS",
    "IMPLS",
    "SHORT_LINE",
    "Axis",
    "Form",
    "Impl",
    "add_pe",
    "apply_kernel",
    "circulant",
    "circular_conv",
    "fold_pe_enabled",
    "is_portable",
    "parc_conv",
    "parc_fft",
    "parc_spatial",
    "portable_form",
    "portable_ops_only",
    "prepare",
    "prepare_kernel",
    "resize_kernel",
    "split_pe",
    "unfolded_pe",
]


def _dim(axis: str) -> int:
    return 2 if axis == "height" else 3


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ConfigError(f"ParC: axis must be one of {AXES} (the axis the kernel runs along), got {axis!r}")


def _check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ConfigError(f"ParC: impl must be one of {allowed}, got {impl!r}")


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32  # FFTs need float32/64


def resize_kernel(t: torch.Tensor, n: int, axis: Axis) -> torch.Tensor:
    """Resize a 4-D kernel or PE along ``axis`` to length ``n`` (linear, ``align_corners=True``).

    Returns ``t`` itself when it already has length ``n``.
    """
    dim = _dim(axis)
    if t.shape[dim] == n:
        return t
    size = (n, 1) if axis == "height" else (1, n)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)


def add_pe(x: torch.Tensor, pe: torch.Tensor, axis: Axis) -> torch.Tensor:
    """``x`` plus the position embedding ``pe`` resized to ``x``'s own length along ``axis``."""
    pe = resize_kernel(pe, x.shape[_dim(axis)], axis)
    return x + (pe if pe.dtype == x.dtype else pe.to(x.dtype))


def circulant(w: torch.Tensor) -> torch.Tensor:
    """``(..., N) -> (..., N, N)`` with ``out[..., i, j] = w[..., (j - i) mod N]``.

    Row ``i`` holds the taps that produce output ``i`` of the offset-0 cross-correlation, so
    ``y = circulant(w) @ x`` correlates ``x`` (a column of length N) circularly with ``w``. Built from views of
    ``cat(w, w)`` (row ``i`` is the window starting at ``N - i``) and one flip: no index tensor, so a compiled
    graph with frozen weights folds the whole circulant into a constant (an ``arange`` would not be folded).
    """
    n = w.shape[-1]
    return torch.cat([w, w], dim=-1).unfold(-1, n, 1)[..., 1:, :].flip(-2)


def prepare_kernel(weight: torch.Tensor, axis: Axis, dense: bool, impl: Form) -> torch.Tensor:
    """Turn a length-N weight into what :func:`apply_kernel` consumes (cacheable: depends on the kernel only).

    spatial, depthwise: the circulant ``(C, N, N)`` (transposed for ``width``); spatial, dense, conv and taps: the
    weight itself; fft: the weight as ``(C_out, C_in or 1, N)`` (the custom operator transforms it).
    """
    if impl == "fft":
        return weight.flatten(2)
    if dense or impl in ("conv", "taps"):
        return weight
    mat = circulant(weight.flatten(1))  # (C, N, N): y_col = mat @ x_col
    # width: y_row = x_row @ mat^T, stored contiguous for the GEMM
    return mat if axis == "height" else mat.transpose(1, 2).contiguous()


# Spatial GEMM layouts (measured, see benchmarks/README.md "ParC operator"):
# * without autograd, lines from _LONG_LINE up: one batched (C, N, N) GEMM per image, written in place;
# * lines up to SHORT_LINE, or much longer than the other axis: one GEMM per channel over all lines of the
#   batch (few wide GEMMs beat B*C tiny ones; costs a copy of x and y, but never a kernel per image);
# * otherwise one (N, N) GEMM per (image, channel) through a broadcast matmul (which copies the kernel to
#   (B, C, N, N): as large as x for square maps).
_LONG_LINE = 32


def _add(y: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    if offset is None:
        return y
    if offset.dtype != y.dtype:  # (no cast node at all otherwise: exported graphs stay free of copies)
        offset = offset.to(y.dtype)
    return y + offset if torch.is_grad_enabled() else y.add_(offset)


def _apply_spatial(
    x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor | None, axis: str, dense: bool
) -> torch.Tensor:
    b, c, h, w = x.shape
    height = axis == "height"
    n = h if height else w
    if dense:  # the reference formulation: valid conv over the circularly extended map
        return _apply_conv(x, kernel, offset, axis, dense)
    # A strided input (a channel slice of a batch, a token sequence viewed as a map) is copied once: the GEMMs
    # would copy it anyway, and slowly (ViT mixer maps, (1, 192, 14, 14) with channels-last strides: 0.51 ms
    # per call as given, 0.06 ms contiguous, 0.15 ms through the FFT path, which reads strides natively).
    x = x.contiguous()
    # (not while tracing: graphs hold no ``out=`` writes into views, and per-image loops would be unrolled)
    traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if n >= _LONG_LINE and not torch.is_grad_enabled() and not traced:
        y = torch.empty_like(x)
        for i in range(b):
            if height:
                torch.matmul(kernel, x[i], out=y[i])
            else:
                torch.matmul(x[i], kernel, out=y[i])
        return _add(y, offset)
    if n <= SHORT_LINE or n > 2 * (w if height else h):  # the offset goes into the GEMM
        if height:  # (C, H, H) @ (C, H, B*W)
            off = None if offset is None else offset.to(x.dtype).view(c, -1, 1)
            xt = x.permute(1, 2, 0, 3).reshape(c, h, b * w)
            y = torch.bmm(kernel, xt) if off is None else torch.baddbmm(off, kernel, xt)
            return y.view(c, h, b, w).permute(2, 0, 1, 3).contiguous()
        off = None if offset is None else offset.to(x.dtype).view(c, 1, -1)
        xt = x.transpose(0, 1).reshape(c, b * h, w)  # (C, B*H, W) @ (C, W, W)
        y = torch.bmm(xt, kernel) if off is None else torch.baddbmm(off, xt, kernel)
        return y.view(c, b, h, w).transpose(0, 1).contiguous()
    y = torch.matmul(kernel, x) if height else torch.matmul(x, kernel)
    return _add(y, offset)


def _circular_extend(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` followed by its first N - 1 lines along ``dim`` (slice + concat): ``2N - 1`` lines."""
    n = x.shape[dim]
    return torch.cat([x, x.narrow(dim, 0, n - 1)], dim=dim) if n > 1 else x


def circular_conv(
    x: torch.Tensor, kernel: torch.Tensor, axis: Axis, dense: bool, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The portable form: slice + concat (circular extension by N - 1 lines) + valid (depthwise) conv with
    ``bias`` (``(C_out,)``) as the convolution's own bias; ``kernel`` already length N and of ``x``'s dtype."""
    return F.conv2d(_circular_extend(x, _dim(axis)), kernel, bias, groups=1 if dense else x.shape[1])


def _apply_conv(
    x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor | None, axis: str, dense: bool
) -> torch.Tensor:
    return _add(circular_conv(x, kernel, axis, dense), offset)


def _apply_taps(x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor | None, axis: str) -> torch.Tensor:
    """Depthwise: ``sum_k w[:, k] * xp[k : k + N]`` over the circularly extended map ``xp`` (see the module
    docstring); the same products and sums as :func:`_apply_conv`, as elementwise work a compiler can fuse."""
    dim = _dim(axis)
    n = x.shape[dim]
    xp = _circular_extend(x, dim)
    taps = kernel.reshape(kernel.shape[0], n)
    y = xp.narrow(dim, 0, n) * taps[:, 0].view(1, -1, 1, 1)
    for k in range(1, n):
        y = y + xp.narrow(dim, k, n) * taps[:, k].view(1, -1, 1, 1)
    return _add(y, offset)


def apply_kernel(
    x: torch.Tensor,
    kernel: torch.Tensor,
    offset: torch.Tensor | None,
    axis: Axis,
    dense: bool,
    impl: Form,
) -> torch.Tensor:
    """Correlate ``x`` with a prepared kernel and add ``offset`` (broadcastable: bias or folded PE + bias).

    The result has ``x``'s dtype; ``kernel``/``offset`` must already have it for ``spatial`` and ``conv``.
    """
    if impl == "fft":
        y = fft_correlate(x.to(kernel.dtype), kernel, _dim(axis), dense)
        return _add(y, offset).to(x.dtype)
    if impl == "conv" or (impl == "taps" and dense):
        return _apply_conv(x, kernel, offset, axis, dense)
    if impl == "taps":
        return _apply_taps(x, kernel, offset, axis)
    return _apply_spatial(x, kernel, offset, axis, dense)


_FOLD_PE = [True]
_PORTABLE = [False]


@contextlib.contextmanager
def unfolded_pe() -> Iterator[None]:
    """Within this context ParC adds the PE to its input (the papers' formulation) instead of folding
    ``corr(pe)`` into the output offset. Same function; used when counting MACs, so the per-size
    preparation (done once per input size and cached in eval) is not counted as per-input work."""
    _FOLD_PE.append(False)
    try:
        yield
    finally:
        _FOLD_PE.pop()


def fold_pe_enabled() -> bool:
    """False inside :func:`unfolded_pe`."""
    return _FOLD_PE[-1]


@contextlib.contextmanager
def portable_form() -> Iterator[None]:
    """Within this context every ParC runs in the portable ``conv`` form (slice + concat + depthwise conv),
    whatever its ``impl``: the form exporters and edge runtimes get (:func:`parc_surgery.export`)."""
    _PORTABLE.append(True)
    try:
        yield
    finally:
        _PORTABLE.pop()


def is_portable() -> bool:
    """True inside :func:`portable_form`."""
    return _PORTABLE[-1]


def portable_ops_only() -> bool:
    """True inside :func:`portable_form` or a ``torch.export`` trace: only ops every exporter and runtime has
    (no oneDNN-specific op, no rewrite that only pays off under inductor)."""
    return _PORTABLE[-1] or torch.compiler.is_exporting()


def split_pe(x: torch.Tensor, pe: torch.Tensor | None, n: int, axis: Axis) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, pe)`` to use: unchanged when folding, else ``(x + resized pe, None)``."""
    if pe is None or _FOLD_PE[-1]:
        return x, pe
    return x + resize_kernel(pe, n, axis).to(x.dtype), None


def prepare(
    weight: torch.Tensor,
    pe: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
    axis: Axis,
    dense: bool,
    impl: Form,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize stored weight/PE to length ``n`` and build ``(kernel, offset)`` for inputs of ``dtype``.

    ``offset`` folds the PE (correlated with the kernel) and the bias into one tensor broadcastable to
    the output: ``corr(x + pe) + b == corr(x) + (corr(pe) + b)``.
    """
    # prepare in float32/float64 (never in half precision), in float64 when the input is float64
    cdt = _fft_dtype(dtype) if impl == "fft" else _fft_dtype(torch.promote_types(weight.dtype, dtype))
    kernel = prepare_kernel(resize_kernel(weight.to(cdt), n, axis), axis, dense, impl)
    offset = None
    if pe is not None:
        # corr(pe): the PE is constant along the other axis, so correlate it as a 1-pixel-wide map
        p = resize_kernel(pe.to(cdt), n, axis)
        offset = apply_kernel(p, kernel, None, axis, dense, impl)  # (1, C_out, N, 1) / (1, C_out, 1, N)
    if bias is not None:
        b = bias.to(cdt).view(1, -1, 1, 1)
        offset = b if offset is None else offset + b
    if impl != "fft":  # the FFT path computes in cdt and casts its result instead
        kernel = kernel.to(dtype)
        offset = None if offset is None else offset.to(dtype)
    return kernel, offset


def parc_spatial(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, axis: Axis, dense: bool = False
) -> torch.Tensor:
    """Circular cross-correlation in the spatial domain (circulant GEMM); ``weight`` already length N."""
    _check_axis(axis)
    kernel = prepare_kernel(weight, axis, dense, "spatial").to(x.dtype)
    offset = None if bias is None else bias.view(1, -1, 1, 1)
    return apply_kernel(x, kernel, offset, axis, dense, "spatial")


def parc_fft(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, axis: Axis, dense: bool = False
) -> torch.Tensor:
    """Fast-ParC: the same function as :func:`parc_spatial` through real FFTs along ``axis``."""
    _check_axis(axis)
    kernel = prepare_kernel(weight.to(_fft_dtype(x.dtype)), axis, dense, "fft")
    offset = None if bias is None else bias.view(1, -1, 1, 1)
    return apply_kernel(x, kernel, offset, axis, dense, "fft")


def check_input(x: torch.Tensor, channels: int, axis: str) -> None:
    """Raise :class:`ConfigError` unless ``x`` is a non-empty ``(B, channels, H, W)`` tensor."""
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
    impl: Form,
) -> torch.Tensor:
    """Full ParC: resize kernel/PE to the input's own axis length, add PE, correlate, add bias.

    ``impl`` must already be resolved (``spatial``, ``fft``, the portable ``conv`` or ``taps``); see
    :func:`parc_surgery.ops.choose_impl`.
    """
    _check_axis(axis)
    _check_impl(impl, FORMS)
    check_input(x, weight.shape[0], axis)
    x, pe = split_pe(x, pe, x.shape[_dim(axis)], axis)
    kernel, offset = prepare(weight, pe, bias, x.shape[_dim(axis)], axis, dense, impl, x.dtype)
    return apply_kernel(x, kernel, offset, axis, dense, impl)
