"""The FLOP formulas :mod:`parc_surgery.flops` adds to torch's ``FlopCounterMode``, and which ops are real work.

:data:`FORMULAS` maps each aten op torch counts nothing for (FFTs, complex products, the CPU fused-attention
kernels, ``mv`` / ``dot`` / ``addbmm``) to its formula; the conventions are listed in :mod:`parc_surgery.flops`.
:func:`is_compute_op` tells an op that looks like real work (matmul, conv, FFT, attention, linear algebra,
recurrent layers) from bookkeeping, so an op without a formula is reported rather than counted as 0;
:class:`OpRecorder` records the ops that actually execute.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ops import fft as _registers_fft_correlate  # noqa: F401  (the custom op must exist for FORMULAS)

__all__ = ["FORMULAS", "OpRecorder", "fft_flops", "is_compute_op"]

aten = torch.ops.aten

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


def _fft_correlate_flop(x_shape, w_shape, dim, dense, *args, out_shape=None, **kwargs) -> int:
    """``parc_surgery::fft_correlate``: rfft of the input lines and kernels, the spectral product, irfft."""
    n, other = int(x_shape[dim]), int(x_shape[5 - dim])
    batch, c_out, c_in = int(x_shape[0]), int(w_shape[0]), int(w_shape[1])
    product = (8 * c_in if dense else 6) * batch * c_out * (n // 2 + 1) * other  # complex (multiply-)adds
    transforms = fft_flops(x_shape, [dim], real=True) + fft_flops(w_shape, [2], real=True)
    return transforms + fft_flops(out_shape, [dim], real=True) + product


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
        torch.ops.parc_surgery.fft_correlate: _fft_correlate_flop,  # Fast-ParC's custom operator (ops/fft.py)
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


FORMULAS = _formulas()
"""The FLOP formulas torch lacks, by aten op: ``FlopCounterMode(custom_mapping=FORMULAS)``."""

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


class OpRecorder(TorchDispatchMode):
    """Counts calls per op; entered *below* FlopCounterMode it sees the ops that actually execute."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[Any, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        self.calls[packet] = self.calls.get(packet, 0) + 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
