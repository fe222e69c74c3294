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

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.fx
from timm.layers import register_notrace_module, trunc_normal_
from torch import nn

from ..errors import ConfigError
from .functional import (
    AXES,
    IMPLS,
    Axis,
    Form,
    Impl,
    apply_kernel,
    check_input,
    is_portable,
    portable_ops_only,
    prepare,
    resize_kernel,
    split_pe,
)

__all__ = [
    "FFT_MIN_LENGTH",
    "FFT_MIN_LENGTH_DENSE",
    "ParC",
    "choose_impl",
    "resolve_impl",
    "use_impl",
]

# Crossovers for impl="auto": the FFT path is used from these axis lengths up (float32/64).
# Measured with benchmarks/bench_parc_op.py --crossover --clock cpu (commands and tables in
# benchmarks/README.md, "ParC operator") on a 2-vCPU Xeon (Sapphire Rapids, AVX-512,
# torch 2.14 + MKL), 2 threads, batch 8, interleaved rounds, median process CPU time (the machine was shared):
#   depthwise, forward:  width  FFT/spatial 0.99-1.05 at N=112..224 (C=64/256), 0.84-0.99 at 256, 0.58-0.74 at 448+;
#                        height 1.36 at 256, 1.11 at 384-448, 1.02 at 512, 0.90 at 640 (C=16; the strided H
#                        transform is ~1.5x slower than the contiguous W one);
#   depthwise, fwd+bwd:  width 1.28-1.87 up to 256, 1.01 at 448, 0.91 at 512; height 1.19-1.85 up to 1024
#                        (never faster; from 1024 FFT anyway: the circulant, C*N^2 floats, gets too large);
#   dense (both passes): 1.4-2.4 at N <= 7, 0.96-1.15 at N=10..14 (C=64), 0.74-0.88 at N=14 (C=128/256),
#                        0.36-0.56 at N=28 (C=128/256).
# With the spatial path as circulant GEMMs, depthwise FFT only pays off for very long lines on CPU; the
# FFT wins early for dense kernels (a per-frequency channel matmul instead of an N-tap dense conv).
FFT_MIN_LENGTH: dict[tuple[str, bool], int] = {  # depthwise: (axis, grad) -> length
    ("width", False): 256,
    ("height", False): 512,
    ("width", True): 512,
    ("height", True): 1024,
}
FFT_MIN_LENGTH_DENSE = 14


def choose_impl(
    n: int,
    *,
    axis: str = "height",
    channels: int | None = None,
    dense: bool = False,
    dtype: torch.dtype = torch.float32,
    grad: bool = False,
) -> str:
    """Pick ``"spatial"`` or ``"fft"`` for an axis of length ``n`` from the measured crossovers.

    ``grad``: whether the call records a graph for backward (the FFT backward is relatively slower).
    Half-precision inputs always get ``spatial`` (CPU FFTs need float32/64; the FFT path would upcast).
    ``channels`` is accepted for future rules; the measured crossovers barely depend on it.
    """
    if axis not in AXES:
        raise ConfigError(f"choose_impl: axis must be one of {AXES}, got {axis!r}")
    if dtype not in (torch.float32, torch.float64):
        return "spatial"
    threshold = FFT_MIN_LENGTH_DENSE if dense else FFT_MIN_LENGTH[(axis, bool(grad))]
    return "fft" if n >= threshold else "spatial"


_DENSE_CONV_MAX = 32  # dense ParC lines up to this length run as the reference conv in compiled inference
_TAPS_MAX = 32  # depthwise ParC lines up to this length run as shifted multiply-adds in compiled inference,
_TAPS_MAX_NUMEL = 1 << 18  # on inputs of at most this many elements


def resolve_impl(
    impl: str, x: torch.Tensor, weight: torch.Tensor, axis: str, dense: bool, *, taps: bool = True
) -> Form:
    """The form one call runs: ``conv`` inside :func:`~parc_surgery.ops.functional.portable_form` or a
    TorchScript trace (``torch.jit.trace``, the legacy ONNX exporter), else
    ``impl`` itself, or for ``auto`` what :func:`choose_impl` picks for this call's size, dtype and autograd,
    changed in a compiled graph without autograd (``torch.compile`` for inference, where the circulant GEMMs run
    as one small GEMM per channel): a depthwise ``spatial`` becomes ``taps`` for lines of at most ``_TAPS_MAX``
    on inputs of at most ``_TAPS_MAX_NUMEL`` elements (shifted multiply-adds that inductor fuses with the
    circular extension, the offset and the following BatchNorm / activation: 0.36-0.85x the time of the ``conv``
    form for one ParC at 7-32 pixel lines, batch 1 and 8, one thread, but 1.47x at 56 along the width; on the whole
    of ParC-MobileNetV2, 0.96 vs 0.88x its baseline's speed compiled at batch 1, but 0.93 vs 0.95x at batch 8,
    where its maps hold 0.6-0.9 M elements, and 0.91 vs 0.95x with freezing) and ``conv`` otherwise. Not under
    ``torch.export``, which keeps ``conv``, nor with ``taps=False``, which the ParC-MetaFormer fast path passes for
    its chained steps (ParC-Net-S compiled, batch 1, two threads: 1.04x MobileViT-S's speed with ``taps`` there,
    1.26x with ``conv``; the loss is at its 32-long lines, 1.24x with ``taps`` up to 16; why was not
    investigated: perhaps inductor inlining one step's sums into the next step's reads). A dense kernel on a line
    of at most ``_DENSE_CONV_MAX`` becomes ``conv`` (the reference valid convolution, which oneDNN runs on
    channels-last maps, against the FFT operator's per-frequency products: ParC-ResNet50 compiled, batch 1,
    34.8 vs 41.4 ms with two threads, 68.2 vs 72.9 ms with one)."""
    if impl not in IMPLS:
        raise ConfigError(f"ParC: impl must be one of {IMPLS}, got {impl!r}")
    if is_portable() or torch.jit.is_tracing():  # the TorchScript tracer (legacy ONNX export) records views of
        return "conv"  # the circulant's cat(w, w) with wrong shapes; the portable form traces as it runs
    if impl == "auto":
        n = x.shape[2] if axis == "height" else x.shape[3]
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        form = choose_impl(n, axis=axis, channels=weight.shape[0], dense=dense, dtype=x.dtype, grad=grad)
        if not grad and torch.compiler.is_compiling():
            short = n <= _TAPS_MAX and x.numel() <= _TAPS_MAX_NUMEL
            if taps and form == "spatial" and not dense and short and not portable_ops_only():
                return "taps"
            if form == "spatial" or (dense and n <= _DENSE_CONV_MAX):
                return "conv"
        return form
    return impl


def _parc_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    pe: torch.Tensor | None,
    bias: torch.Tensor | None,
    axis: str,
    dense: bool,
    impl: str,
) -> torch.Tensor:
    check_input(x, weight.shape[0], axis)
    form = resolve_impl(impl, x, weight, axis, dense)
    n = x.shape[2] if axis == "height" else x.shape[3]
    x, pe = split_pe(x, pe, n, axis)
    kernel, offset = prepare(weight, pe, bias, n, axis, dense, form, x.dtype)
    return apply_kernel(x, kernel, offset, axis, dense, form)


# A leaf for torch.fx: the traced graph holds one call to _parc_forward, so nothing that depends on
# the input size (axis length, resized kernels, impl choice) is baked into a traced module.
torch.fx.wrap("_parc_forward")

_CACHE_SIZE = 8  # (impl, N, dtype, device) entries kept per module


@register_notrace_module  # a leaf in timm's fx feature extraction: opaque, size-independent, cacheable
class ParC(nn.Module):
    """Position-aware circular convolution along one axis.

    ``y[i] = sum_k w[k] * (x + pe)[(i + k) mod N] + b`` along ``axis`` (offset-0 circular
    cross-correlation, the ParC-Net convention), with kernel and PE resized from ``kernel_size`` to the
    input's own length N along that axis at every call.

    Two implementations compute the same function: ``spatial`` multiplies each line by the kernel's
    (N, N) circulant matrix (batched GEMMs, O(N^2) per line), ``fft`` is Fast-ParC (O(N log N) per
    line, computed in float32/64). On CPU the GEMMs win for depthwise kernels up to N ~ 256 (width) /
    512 (height) and FFT wins for dense kernels from N ~ 14. ``auto`` picks per call from the actual
    size with :func:`choose_impl`, whose crossovers were measured with ``benchmarks/bench_parc_op.py``.
    The FFT path is one custom operator (``torch.ops.parc_surgery.fft_correlate``, :mod:`parc_surgery.ops.fft`)
    with a fake implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` and
    ``torch.export`` capture either path whole. Exports use a third form of the same function,
    the portable ``conv`` (slice + concat + depthwise conv; :func:`~parc_surgery.ops.functional.portable_form`).

    Eval-mode cache: when the module is in eval mode and no gradient is needed (``torch.no_grad()``,
    ``torch.inference_mode()`` or frozen parameters), the resized kernel in its prepared form (circulant
    matrix, or the resized kernel for the FFT path) and the folded PE + bias term are cached per (impl, N,
    dtype, device) and reused until a parameter changes (tracked by its version counter and storage), the
    module is moved, reloaded or put back in training mode. Not used while tracing (fx, ``torch.compile``,
    ``torch.export``, ``torch.jit``) nor on the meta device: a compiled graph prepares the kernel in the
    graph (``torch._inductor.config.freezing`` folds that work once). In-place edits through ``.data``
    bypass the version counter: call :meth:`clear_cache` after those.

    Args:
        channels: input (= output) channels.
        kernel_size: base kernel / PE length K (usually the feature size at the model's input size).
        axis: the axis the kernel runs along: ``"height"`` (a (K, 1) kernel mixing one column, the ECCV
            paper's "ParC-V") or ``"width"`` (a (1, K) kernel mixing one row, "ParC-H").
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
        self._kernel_cache: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: PyTorch's default conv init for kernel and bias, PE per ``pe_init``."""
        self.clear_cache()
        if self.weight.is_meta:  # no values to initialise (a dry run builds on the meta device)
            return
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
        self.clear_cache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_cache(x):
            return self._forward_cached(x)
        return _parc_forward(x, self.weight, self.pe, self.bias, self.axis, self.dense, self.impl)

    # ----- eval-mode kernel cache -----
    def _params(self) -> list[torch.Tensor]:
        return [p for p in (self.weight, self.pe, self.bias) if p is not None]

    def _use_cache(self, x: torch.Tensor) -> bool:
        if self.training or not isinstance(x, torch.Tensor) or isinstance(x, torch.fx.Proxy):
            return False
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return False
        params = self._params()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return False
        return not (x.is_meta or any(p.is_meta or p.is_inference() for p in params))

    def _forward_cached(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.weight.shape[0], self.axis)
        impl = resolve_impl(self.impl, x, self.weight, self.axis, self.dense)
        n = x.shape[2] if self.axis == "height" else x.shape[3]
        x, pe = split_pe(x, self.pe, n, self.axis)
        # inference-mode tensors cannot be saved for backward: keep those entries apart
        key = (impl, n, x.dtype, x.device, torch.is_inference_mode_enabled(), pe is None)
        stamp = tuple((id(p), p.data_ptr(), p._version) for p in self._params())
        entry = self._kernel_cache.get(key)
        if entry is None or entry[0] != stamp:
            if len(self._kernel_cache) >= _CACHE_SIZE:
                self._kernel_cache.clear()
            kernel, offset = prepare(self.weight, pe, self.bias, n, self.axis, self.dense, impl, x.dtype)
            entry = self._kernel_cache[key] = (stamp, kernel, offset)
        return apply_kernel(x, entry[1], entry[2], self.axis, self.dense, impl)

    def clear_cache(self) -> None:
        """Drop the eval-mode kernel cache (needed only after in-place edits through ``.data``)."""
        self._kernel_cache = {}

    def train(self, mode: bool = True) -> ParC:
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # deepcopy / pickle: never carry cached tensors
        state = super().__getstate__()
        state["_kernel_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_kernel_cache", {})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # ParC weights saved at another base length load here resampled to this module's length.
        self.clear_cache()
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

    def constant_line_response(self, v: torch.Tensor, n: int) -> torch.Tensor:
        """This ParC's output for an input that is constant along its axis (of length ``n``), from the per-line
        values ``v`` (``(B, C, H, 1)`` for a width ParC, ``(B, C, 1, W)`` for a height one): ``v * sum(taps)``
        plus the folded PE / bias term, without building the map. Depthwise only."""
        if self.dense:
            raise ConfigError("ParC.constant_line_response: only for depthwise ParC (dense=False)")
        taps = resize_kernel(self.weight.to(v.dtype), n, self.axis).flatten(1).sum(1)
        y = v * taps.view(1, -1, 1, 1)
        _, offset = prepare(self.weight, self.pe, self.bias, n, self.axis, False, "conv", v.dtype)
        return y if offset is None else y + offset

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, axis={self.axis!r}, pe={self.pe is not None}, "
            f"bias={self.bias is not None}, dense={self.dense}, impl={self.impl!r}"
        )


@contextlib.contextmanager
def use_impl(model: nn.Module, impl: str | None) -> Iterator[None]:
    """Run every ``ParC`` in ``model`` with ``impl`` inside the context (``None``: leave them as they are)."""
    mods = [m for m in model.modules() if isinstance(m, ParC)] if impl is not None else []
    old = [m.impl for m in mods]
    for m in mods:
        m.impl = impl
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            m.impl = o
