"""Counting MACs and parameters: torch's ``FlopCounterMode`` plus the formulas it lacks.

Unit: **MACs = multiply-accumulates = FLOPs / 2** (batch 1, eval mode, ``torch.no_grad``), the unit
of the figures in ``design/parc.md`` §5. ``FlopCounterMode`` counts matmuls, convolutions and the
CUDA attention kernels with dense textbook formulas (``2 * m * n * k`` FLOPs; bias, norms,
activations and other elementwise work are not counted). It counts nothing for FFTs and misses the
CPU fused-attention kernel, so this module adds (FLOPs, real-valued):

* FFTs (``aten._fft_r2c``, ``aten._fft_c2r``, ``aten._fft_c2c``): the usual radix-2 convention. A
  transform of total length ``N`` (the product of the transformed dims; a multi-dim FFT is the
  row-column product, so ``sum_d (N / N_d) * c * N_d * log2(N_d) = c * N * log2(N)``) costs
  ``c * N * log2(N)`` with ``c = 5`` for a complex FFT and ``c = 2.5`` for a real one (``r2c``, and
  ``c2r`` measured on its real output), times the number of transforms (the product of the other
  dims). NB: used for any ``N``, not just powers of two; the ``1/N`` normalisation is elementwise
  and not counted; each call is rounded to the nearest FLOP.
* Complex products. An elementwise complex x complex multiply (``aten.mul``) is 6 real FLOPs per
  output element (4 mul + 2 add), complex x real 2; real elementwise products stay uncounted, as in
  torch. Matmuls (``mm``, ``bmm``, ``addmm``, ``baddbmm``) of complex operands are torch's count
  times 4 (a complex multiply-accumulate is 8 real FLOPs), times 2 when one operand is real.
  ``einsum`` is counted through the ``bmm`` it lowers to.
* Fused attention missed on CPU (``aten._scaled_dot_product_flash_attention_for_cpu`` and the other
  SDPA variants without a torch formula): ``2*B*H*L*S*E`` (``Q K^T``) + ``2*B*H*L*S*Ev`` (``A V``),
  torch's own SDPA formula; the softmax is not counted. ``aten._native_multi_head_attention`` (the
  ``nn.MultiheadAttention`` fast path) adds its in/out projections: ``2*B*E^2*(L + 2S)`` +
  ``2*B*L*E^2``.
* ``mv``, ``addmv``, ``dot``, ``vdot``: ``2 * m * n`` / ``2 * n``; ``addbmm``: as ``bmm``.

ParC layers are counted in the papers' formulation: the position embedding is added to the input
(:func:`parc_surgery.ops.functional.unfolded_pe`), not folded into a per-size output offset as the
runtime does (that preparation runs once per input size and is cached in eval). Kernel resizing is
weight preparation too and is not counted.

Every executed op is recorded; an op that looks like real work (matmul, conv, FFT, attention,
linear algebra, recurrent layers, ...) but has no formula is listed in ``MacCount.uncounted``
instead of silently counting 0.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError, NoMatchError, TraceError
from .inputs import get_in_chans
from .ops.functional import IMPLS, unfolded_pe
from .ops.parc import ParC
from .train_flags import get_train_flags, set_train_flags

__all__ = [
    "MacCount",
    "count_macs",
    "count_macs_impls",
    "count_params",
    "fft_flops",
    "is_compute_op",
]

aten = torch.ops.aten


@dataclass(frozen=True)
class MacCount:
    """The result of :func:`count_macs`.

    macs: total multiply-accumulates (``flops // 2``).
    flops: total FLOPs from the formulas (torch's and this module's).
    per_module: MACs per module, keyed by the qualified name from ``model.named_modules()``; the
        whole model is ``""`` (there is no ``"Global"`` key: the total is ``macs``). Every module of
        the model has an entry (0 when it ran no counted op, or did not run).
    uncounted: compute-like ops that ran with no formula, ``"aten.op_name" -> calls``.
    input_size: (H, W) of the input.
    batch: batch size of the input.
    per_op: MACs per op, ``"aten.op_name" -> MACs``.
    """

    macs: int
    flops: int
    per_module: dict[str, int]
    uncounted: dict[str, int]
    input_size: tuple[int, int]
    batch: int = 1
    per_op: dict[str, int] = field(default_factory=dict)

    def macs_of(self, name: str) -> int:
        """MACs attributed to the module with qualified name ``name`` (``""`` = whole model)."""
        try:
            return self.per_module[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(self.per_module), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise NoMatchError(
                f"macs_of: no module named {name!r} in the counted model.{hint} "
                "Names are those of model.named_modules(); '' is the whole model."
            ) from None


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of ``module``; a parameter shared by several submodules counts once."""
    seen: set[int] = set()
    total = 0
    for _, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ---------------------------------------------------------------------------------------------
# formulas (FLOPs). Shape formulas get tensor shapes (torch's shape_wrapper); ``_raw`` ones get the
# tensors themselves (they need dtypes) and are marked with ``_get_raw`` for FlopCounterMode.


def _raw(fn):
    fn._get_raw = True
    return fn


def fft_flops(shape: tuple[int, ...] | torch.Size, dims: tuple[int, ...] | list[int], *, real: bool) -> int:
    """FLOPs of FFTs over ``dims`` of a signal of ``shape``: ``c * N * log2(N) * batch``, ``c`` 2.5 real / 5 complex.

    ``shape`` is the shape of the real signal for a real FFT (input of ``rfft``, output of ``irfft``).
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    dims = sorted({d % nd for d in dims}) if nd else []
    n = math.prod(shape[d] for d in dims)
    if n <= 1:
        return 0
    transforms = math.prod(shape) // n
    c = 2.5 if real else 5.0
    return round(c * n * math.log2(n) * transforms)


def _fft_r2c_flop(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return fft_flops(x_shape, dim, real=True)


def _fft_c2r_flop(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return fft_flops(out_shape, dim, real=True)


def _fft_c2c_flop(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return fft_flops(x_shape, dim, real=False)


def _sdpa_flops(q_shape, k_shape, v_shape) -> int:
    # q (..., H, L, E), k (..., Hkv, S, E), v (..., Hkv, S, Ev); GQA: kv heads broadcast to H
    *lead, l_q, e = q_shape
    s, ev = k_shape[-2], v_shape[-1]
    bh = math.prod(lead)
    return 2 * bh * l_q * s * e + 2 * bh * l_q * s * ev


def _sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(q_shape, k_shape, v_shape)


def _native_mha_flop(q_shape, k_shape, v_shape, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    # batch-first (B, L, E) query, (B, S, E) key/value; heads of E / num_head
    b, l_q, e = q_shape
    s = k_shape[1]
    proj = 2 * b * e * e * (l_q + 2 * s) + 2 * b * l_q * e * e
    return proj + 4 * b * l_q * s * e


def _mv_flop(a_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape
    return 2 * m * n


def _addmv_flop(self_shape, a_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv_flop(a_shape, x_shape)


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a_shape)


def _addbmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[-1]


def _is_complex(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_complex()
    return isinstance(x, complex)


def _complex_factor(a: Any, b: Any) -> int:
    """Real FLOPs per real-counted FLOP: 4 for complex x complex, 2 for complex x real, 1 for real."""
    ca, cb = _is_complex(a), _is_complex(b)
    return 4 if ca and cb else 2 if ca or cb else 1


@_raw
def _complex_mul_flop(a, b, *args, out_val=None, **kwargs) -> int:
    # NB: real elementwise products are not counted (torch's convention); complex ones are real work
    if not isinstance(out_val, torch.Tensor) or not out_val.is_complex():
        return 0
    per_element = 6 if _is_complex(a) and _is_complex(b) else 2
    return per_element * out_val.numel()


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


@_raw
def _mm_flop(a, b, *args, out_val=None, **kwargs) -> int:
    m, k = _shape(a)
    return 2 * m * k * _shape(b)[1] * _complex_factor(a, b)


@_raw
def _addmm_flop(bias, a, b, *args, out_val=None, **kwargs) -> int:
    return _mm_flop(a, b)


@_raw
def _bmm_flop(a, b, *args, out_val=None, **kwargs) -> int:
    bs, m, k = _shape(a)
    return 2 * bs * m * k * _shape(b)[2] * _complex_factor(a, b)


@_raw
def _baddbmm_flop(bias, a, b, *args, out_val=None, **kwargs) -> int:
    return _bmm_flop(a, b)


def _formulas() -> dict[Any, Any]:
    table: dict[Any, Any] = {
        aten._fft_r2c: _fft_r2c_flop,
        aten._fft_c2r: _fft_c2r_flop,
        aten._fft_c2c: _fft_c2c_flop,
        aten.mul: _complex_mul_flop,
        aten.mul_: _complex_mul_flop,
        aten.mm: _mm_flop,
        aten.addmm: _addmm_flop,
        aten.bmm: _bmm_flop,
        aten.baddbmm: _baddbmm_flop,
        aten.mv: _mv_flop,
        aten.addmv: _addmv_flop,
        aten.dot: _dot_flop,
        aten.vdot: _dot_flop,
        aten.addbmm: _addbmm_flop,
    }
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math_for_mps",
    ):
        if hasattr(aten, name):
            table[getattr(aten, name)] = _sdpa_flop
    if hasattr(aten, "_native_multi_head_attention"):
        table[aten._native_multi_head_attention] = _native_mha_flop
    return table


_FORMULAS = _formulas()

# ---------------------------------------------------------------------------------------------
# which executed ops look like real work

_COMPUTE_TOKENS = frozenset(
    ("mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot", "vdot", "inner", "outer", "ger",
     "addr", "einsum", "tensordot", "kron", "linear", "bilinear", "cdist", "fft", "ifft", "rfft", "irfft", "hfft",
     "ihfft", "r2c", "c2r", "c2c", "stft", "istft", "attention", "attn", "sdpa", "linalg", "cholesky", "inverse",
     "svd", "qr", "lu", "solve", "eig", "eigh", "eigvals", "lstsq", "pinv", "det", "slogdet", "triangular", "lstm",
     "gru", "rnn")
)  # fmt: skip
_NOT_COMPUTE_TOKENS = frozenset(("check", "checks", "errors", "shape", "size", "stride"))  # bookkeeping ops
_COMPUTE_PREFIXES = ("conv", "fft", "matmul", "linalg", "attention", "cholesky", "svd")


def is_compute_op(name: str) -> bool:
    """Whether an op name (``"aten.bmm"``, ``"mylib::fused_conv"``) looks like matmul/conv/FFT/attention work."""
    tokens = [t for t in re.split(r"[.:]+", name)[-1].lower().split("_") if t]
    if any(t in _NOT_COMPUTE_TOKENS for t in tokens):
        return False
    return any(
        t in _COMPUTE_TOKENS or (t.startswith(_COMPUTE_PREFIXES) and not t.startswith("convert")) for t in tokens
    )


class _OpRecorder(TorchDispatchMode):
    """Counts calls per op; entered *below* FlopCounterMode it sees the ops that actually execute."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[Any, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        self.calls[packet] = self.calls.get(packet, 0) + 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------


def _as_size(input_size: tuple[int, int] | int) -> tuple[int, int]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if ok(input_size):
        return (input_size, input_size)
    if isinstance(input_size, (tuple, list)) and len(input_size) == 2 and all(ok(v) for v in input_size):
        return (int(input_size[0]), int(input_size[1]))
    raise ConfigError(
        f"count_macs: input_size must be a positive int or an (H, W) pair of positive ints, got {input_size!r}"
    )


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _device_swaps(model: nn.Module, device: torch.device) -> list[tuple[dict, str, Any, Any]]:
    """(owner dict, key, original, copy on ``device``) for every tensor of every module object, once."""
    swaps = []
    copies: dict[int, Any] = {}  # tied tensors get one shared copy
    seen: set[int] = set()
    with torch.no_grad():
        for m in model.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is None or t.device == device:
                        continue
                    c = copies.get(id(t))
                    if c is None:
                        c = t.detach().to(device)
                        c = nn.Parameter(c, requires_grad=False) if isinstance(t, nn.Parameter) else c
                        copies[id(t)] = c
                    swaps.append((store, k, t, c))
    return swaps


@contextlib.contextmanager
def _swapped(swaps: list[tuple[dict, str, Any, Any]]) -> Iterator[None]:
    for store, k, _, c in swaps:
        store[k] = c
    try:
        yield
    finally:
        for store, k, t, _ in swaps:
            store[k] = t


def _model_device(model: nn.Module) -> torch.device:
    for _, t in _tensors(model):
        return t.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for _, t in _tensors(model):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextlib.contextmanager
def _counting_state(model: nn.Module, parc_impl: str | None) -> Iterator[None]:
    """Eval mode and (optionally) one ParC implementation for the count; everything restored afterwards."""
    flags = get_train_flags(model)
    impls = [(m, m.impl) for m in model.modules() if isinstance(m, ParC)] if parc_impl is not None else []
    try:
        model.eval()
        for m, _ in impls:
            m.impl = parc_impl
        yield
    finally:
        set_train_flags(flags)
        for m, impl in impls:
            m.impl = impl


def count_macs(
    model: nn.Module,
    input_size: tuple[int, int] | int,
    *,
    batch: int = 1,
    in_chans: int | None = None,
    parc_impl: str | None = "spatial",
    device: str | torch.device | None = None,
) -> MacCount:
    """Count the MACs (FLOPs / 2) of one forward of ``model`` on a ``(batch, in_chans, H, W)`` input.

    Args:
        model: the model; left as it was (training flags and ParC ``impl`` restored, weights untouched).
        input_size: ``(H, W)`` or one int for a square input.
        batch: batch size (the papers' figures are batch 1).
        in_chans: input channels; default from the model (see :func:`parc_surgery.inputs.get_in_chans`).
        parc_impl: run every :class:`~parc_surgery.ParC` with this ``impl`` while counting
            (``"spatial"``, the formulation the papers count; ``"fft"`` for Fast-ParC); ``None`` keeps each
            module's own setting.
        device: where to run. Default: the model's device. ``"meta"`` counts without computing anything:
            parameters and buffers are swapped for detached copies on that device, module by module (each
            module object once, so shared modules and tied weights work), and put back afterwards
            (the model itself is not moved). Any other device than the model's works the same way, with copies.
    """
    size = _as_size(input_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"count_macs: batch must be a positive int, got {batch!r}")
    if in_chans is not None and (isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1):
        raise ConfigError(f"count_macs: in_chans must be a positive int or None, got {in_chans!r}")
    if parc_impl is not None and parc_impl not in IMPLS:
        raise ConfigError(f"count_macs: parc_impl must be one of {IMPLS} or None, got {parc_impl!r}")
    chans = in_chans if in_chans is not None else get_in_chans(model, input_size=size)
    try:
        target = torch.device(device) if device is not None else _model_device(model)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"count_macs: device {device!r} is not a torch device ({e})") from e

    shape = (batch, chans, *size)
    dtype = _model_dtype(model)
    if target.type == "meta":
        x = torch.empty(shape, dtype=dtype, device=target)
    else:
        gen = torch.Generator().manual_seed(0)  # a private generator: the global RNG is left alone
        x = torch.randn(shape, generator=gen, dtype=dtype).to(target)

    swaps = _device_swaps(model, target)
    recorder = _OpRecorder()
    counter = FlopCounterMode(display=False, custom_mapping=_FORMULAS)
    with _counting_state(model, parc_impl):
        try:
            with recorder, counter, torch.no_grad(), _swapped(swaps), unfolded_pe():
                model(x)
        except (ConfigError, NoMatchError):
            raise
        except Exception as e:
            raise TraceError(
                f"count_macs: {type(model).__name__} failed on an input of shape {shape} on {target}: "
                f"{type(e).__name__}: {e}"
            ) from e

    counts = counter.get_flop_counts()
    total = counts.get("Global", {})
    flops = int(sum(total.values()))
    per_op = {str(op): int(v) // 2 for op, v in total.items() if v}

    root = type(model).__name__
    per_module = dict.fromkeys((name for name, _ in model.named_modules()), 0)
    for key, ops in counts.items():
        if key == "Global":
            continue
        if key == root:
            fqn = ""
        elif key.startswith(root + "."):
            fqn = key[len(root) + 1 :]
        else:  # a module outside the model's hierarchy (built during forward): its class name
            fqn = key
        per_module[fqn] = per_module.get(fqn, 0) + int(sum(ops.values())) // 2

    registry = counter.flop_registry
    uncounted = {str(op): n for op, n in recorder.calls.items() if op not in registry and is_compute_op(str(op))}
    return MacCount(
        macs=flops // 2,
        flops=flops,
        per_module=per_module,
        uncounted=dict(sorted(uncounted.items())),
        input_size=size,
        batch=batch,
        per_op=dict(sorted(per_op.items())),
    )


def count_macs_impls(
    model: nn.Module,
    input_size: tuple[int, int] | int,
    impls: tuple[str, ...] = ("spatial", "fft"),
    *,
    batch: int = 1,
    in_chans: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, MacCount]:
    """:func:`count_macs` with every ParC on each impl of ``impls``, for the price of about one pass.

    The whole model is counted once, every ParC on ``impls[0]``, recording each ParC call's input shape.
    A ParC's ops depend only on its configuration, its input shape and its impl, so the count for another
    impl replaces each call's own count: one small pass per distinct (ParC configuration, shape, impl).
    Totals (``macs``, ``flops``) equal those of separate :func:`count_macs` passes; per-module and per-op
    figures to within rounding (1 MAC per ParC call), except that a ParC module shared by several parents
    is attributed to the parents of its last name. Returns ``{impl: MacCount}``.
    """
    impls = tuple(impls)
    if not impls or any(i not in IMPLS for i in impls):
        raise ConfigError(f"count_macs_impls: impls must be a non-empty tuple of {IMPLS}, got {impls!r}")
    parcs = {id(m): m for m in model.modules() if isinstance(m, ParC)}
    calls: list[tuple[ParC, tuple[int, ...]]] = []

    def record(m, args):
        if args and isinstance(args[0], torch.Tensor):
            calls.append((m, tuple(args[0].shape)))

    handles = [m.register_forward_pre_hook(record) for m in parcs.values()]
    try:
        first = count_macs(model, input_size, batch=batch, in_chans=in_chans, parc_impl=impls[0], device=device)
    finally:
        for h in handles:
            h.remove()
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in parcs:
            names[id(m)] = name  # a shared module is counted under its last name, as FlopCounterMode does
    target = torch.device(device) if device is not None else _model_device(model)
    memo: dict[tuple, MacCount] = {}

    def one(m: ParC, shape: tuple[int, ...], impl: str) -> MacCount:
        key = (type(m), tuple(m.weight.shape), m.weight.dtype, m.kernel_size, m.axis, m.dense,
               m.pe is not None, m.bias is not None, shape, impl)  # fmt: skip
        if key not in memo:
            b, c, h, w = shape
            memo[key] = count_macs(m, (h, w), batch=b, in_chans=c, parc_impl=impl, device=target)
        return memo[key]

    out = {impls[0]: first}
    for impl in impls[1:]:
        if impl in out:
            continue
        flops = first.flops
        per_op = dict(first.per_op)
        per_module = dict(first.per_module)
        uncounted = dict(first.uncounted)
        for m, shape in calls:
            a, b = one(m, shape, impls[0]), one(m, shape, impl)
            flops += b.flops - a.flops
            for table, sa, sb in ((per_op, a.per_op, b.per_op), (uncounted, a.uncounted, b.uncounted)):
                for op in {*sa, *sb}:
                    table[op] = table.get(op, 0) + sb.get(op, 0) - sa.get(op, 0)
            parts = names[id(m)].split(".") if names[id(m)] else []
            for i in range(len(parts) + 1):  # the ParC and every module above it
                k = ".".join(parts[:i])
                per_module[k] = per_module.get(k, 0) + b.macs - a.macs
        out[impl] = replace(
            first,
            macs=flops // 2,
            flops=flops,
            per_module=per_module,
            uncounted={k: v for k, v in sorted(uncounted.items()) if v > 0},
            per_op={k: v for k, v in sorted(per_op.items()) if v > 0},
        )
    return out
