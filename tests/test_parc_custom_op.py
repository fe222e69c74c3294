"""The FFT path as a custom operator: opcheck (schema, fake tensor, autograd registration, AOT dispatch),
gradients of first and second order, the portable form, and the ops seen by torch.compile / torch.export."""

from __future__ import annotations

import pytest
import torch

from parc_surgery import ConfigError, ParC
from parc_surgery.ops import fft_correlate, fft_weight_grad, portable_form
from parc_surgery.ops.fft import adjoint_kernel


def _args(dense: bool, dim: int, *, grad: bool = True, shape=(2, 3, 5, 6)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)
    c = shape[1]
    w = torch.randn(c, c if dense else 1, x.shape[dim], generator=g, dtype=torch.float64).requires_grad_(grad)
    return x, w


def _roll_reference(x: torch.Tensor, w: torch.Tensor, dim: int, dense: bool) -> torch.Tensor:
    """y[b, o, i] = sum_k sum_c w[o, c, k] x[b, c, (i + k) mod N], as a sum of rolls (float64)."""
    y = torch.zeros(x.shape[0], w.shape[0], *x.shape[2:], dtype=torch.float64)
    for k in range(x.shape[dim]):
        xs = torch.roll(x.double(), shifts=-k, dims=dim)
        if dense:
            y += torch.einsum("oc,bchw->bohw", w[:, :, k].double(), xs)
        else:
            y += w[:, 0, k].double().view(1, -1, 1, 1) * xs
    return y


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dense", [False, True], ids=["dw", "dense"])
def test_opcheck_both_operators(dense, dim):
    x, w = _args(dense, dim)
    torch.library.opcheck(fft_correlate, (x, w, dim, dense))
    g = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(fft_weight_grad, (x, g, dim, dense))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dense", [False, True], ids=["dw", "dense"])
def test_values_gradients_and_second_order(dense, dim):
    x, w = _args(dense, dim)
    y = fft_correlate(x, w, dim, dense)
    # float64 FFT vs an N-term sum of rolls: rounding only
    torch.testing.assert_close(y, _roll_reference(x.detach(), w.detach(), dim, dense), rtol=1e-10, atol=1e-10)
    x, w = _args(dense, dim, shape=(1, 2, 3, 4))  # numerical Jacobians: small
    fn = lambda a, b: fft_correlate(a, b, dim, dense)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w), fast_mode=True)  # fast mode: random projections


def test_adjoint_kernel_is_the_transpose_of_the_correlation():
    x, w = _args(True, 2, grad=False)
    g = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    # <corr_w(x), g> == <x, corr_adj(w)(g)> (both sides are sums of the same products: rounding only)
    lhs = (fft_correlate(x, w, 2, True) * g).sum()
    rhs = (x * fft_correlate(g, adjoint_kernel(w, True).contiguous(), 2, True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_meta_and_bad_inputs():
    y = fft_correlate(torch.empty(2, 3, 5, 6, device="meta"), torch.empty(3, 1, 5, device="meta"), 2, False)
    assert y.shape == (2, 3, 5, 6) and y.is_meta
    x = torch.randn(1, 3, 5, 6)
    with pytest.raises(ConfigError, match=r"kernel \(3, 1, 6\) does not fit x"):
        fft_correlate(x, torch.randn(3, 1, 6), 2, False)
    with pytest.raises(ConfigError, match="must both be float32 or both float64"):
        fft_correlate(x, torch.randn(3, 1, 5, dtype=torch.float64), 2, False)
    with pytest.raises(ConfigError, match="dim 2 or 3"):
        fft_correlate(x, torch.randn(3, 1, 5), 1, False)


def test_fft_parc_is_one_operator_in_compiled_and_exported_graphs():
    m = ParC(4, 8, "width", impl="fft").eval()
    x = torch.randn(1, 4, 6, 8)
    gm_ops = []

    def backend(gm, inputs):
        gm_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        y = torch.compile(m, backend=backend, fullgraph=True)(x)
        ref = m(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)  # same ops, eager cache vs in-graph kernel preparation
    assert sum("fft_correlate" in t for t in gm_ops) == 2  # the input and the PE term (corr(pe) + bias)
    assert not any("fft_rfft" in t or "fft_irfft" in t for t in gm_ops)  # no complex tensors in the graph
    ep = torch.export.export(m, (x,))
    assert any("parc_surgery.fft_correlate" in str(n.target) for n in ep.graph.nodes)
    with portable_form():  # what parc_surgery.export traces: no FFT at all, slice + concat + conv
        ep = torch.export.export(m, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not any("fft" in t for t in targets) and any("conv2d" in t for t in targets)
    assert any("cat" in t for t in targets) and any("narrow" in t or "slice" in t for t in targets)
