"""Fast-ParC as a PyTorch custom operator: circular cross-correlation along one axis through real FFTs.

``torch.ops.parc_surgery.fft_correlate(x, weight, dim, dense)`` computes, for every line of ``x`` along
``dim`` (2: height, 3: width) and every output channel ``o``::

    y[b, o, i] = sum_k sum_c w[o, c, k] * x[b, c, (i + k) mod N]      (dense: c over all input channels)
    y[b, o, i] = sum_k       w[o, 0, k] * x[b, o, (i + k) mod N]      (depthwise)

as ``irfft(rfft(x) * conj(rfft(w)), n=N)``, with ``weight`` of shape ``(C_out, C_in or 1, N)`` already at the
axis length. Being one operator (with a fake implementation for shape propagation and an autograd formula)
makes the FFT path opaque to ``torch.compile``, ``torch.export`` and AOT autograd: the complex intermediates
never enter a graph, nothing breaks it, and inductor calls the operator as one extern kernel.

Backward is two more correlations, each through an operator of this file, so gradients of any order exist:

* ``grad_x``: correlation of ``grad`` with the adjoint kernel ``w_adj[c, o, k] = w[o, c, (-k) mod N]``
  (a circular *convolution* with ``w``; for depthwise kernels the channel swap is the identity);
* ``grad_w``: ``fft_weight_grad(x, grad)``: ``gw[o, c, k] = sum_{b, lines, i} grad[b, o, i] x[b, c, (i + k) mod N]``.

Inputs must share one dtype, float32 or float64 (callers upcast half precision); outputs have it too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["adjoint_kernel", "fft_correlate", "fft_weight_grad"]


def _check(x: Tensor, w: Tensor, dim: int, dense: bool, name: str) -> None:
    if dim not in (2, 3) or x.dim() != 4 or w.dim() != 3:
        raise ConfigError(
            f"{name}: expects x (B, C, H, W), a kernel (C_out, C_in or 1, N) and dim 2 or 3; got x "
            f"{tuple(x.shape)}, kernel {tuple(w.shape)}, dim {dim}"
        )
    if x.dtype not in (torch.float32, torch.float64) or w.dtype != x.dtype:
        raise ConfigError(f"{name}: x and kernel must both be float32 or both float64, got {x.dtype} and {w.dtype}")
    if w.shape[-1] != x.shape[dim] or w.shape[1] != (x.shape[1] if dense else 1):
        raise ConfigError(
            f"{name}: kernel {tuple(w.shape)} does not fit x {tuple(x.shape)} along dim {dim} (dense={dense}): "
            f"it must be (C_out, {x.shape[1] if dense else 1}, {x.shape[dim]})"
        )


def _spectrum_product(xf: Tensor, kf: Tensor, dim: int, dense: bool) -> Tensor:
    """``xf`` (B, C, F, W) / (B, C, H, F) times the per-frequency kernel ``kf`` (C_out, C_in or 1, F)."""
    if dense:
        return torch.einsum("bcfw,ocf->bofw" if dim == 2 else "bchf,ocf->bohf", xf, kf)
    s = kf[:, 0, :, None] if dim == 2 else kf[:, 0, None, :]
    return xf.mul_(s)  # xf is a fresh temporary


@torch.library.custom_op("parc_surgery::fft_correlate", mutates_args=())
def fft_correlate(x: Tensor, weight: Tensor, dim: int, dense: bool) -> Tensor:
    """Circular cross-correlation of ``x`` with ``weight`` along ``dim`` through real FFTs (see the module doc)."""
    _check(x, weight, dim, dense, "fft_correlate")
    n = x.shape[dim]
    xf = torch.fft.rfft(x, dim=dim)
    # conj_physical, not the lazy conj() view: multiplied in place, the view gave wrong results under AOT
    # autograd (torch 2.14; torch.library.opcheck's test_aot_dispatch_dynamic caught it)
    kf = torch.fft.rfft(weight, dim=-1).conj_physical()
    return torch.fft.irfft(_spectrum_product(xf, kf, dim, dense), n=n, dim=dim).contiguous()


@fft_correlate.register_fake
def _(x: Tensor, weight: Tensor, dim: int, dense: bool) -> Tensor:
    _check(x, weight, dim, dense, "fft_correlate")
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@torch.library.custom_op("parc_surgery::fft_weight_grad", mutates_args=())
def fft_weight_grad(x: Tensor, grad: Tensor, dim: int, dense: bool) -> Tensor:
    """The gradient of :func:`fft_correlate` with respect to its kernel: ``(C_out, C_in or 1, N)``."""
    n = x.shape[dim]
    other = 3 if dim == 2 else 2
    xf = torch.fft.rfft(x, dim=dim)
    gf = torch.fft.rfft(grad, dim=dim).conj_physical()
    if dense:  # sum over the batch and the other axis of conj(G[b, o]) X[b, c], per frequency
        eq = "bcfw,bofw->ocf" if dim == 2 else "bchf,bohf->ocf"
        zf = torch.einsum(eq, xf, gf)
    else:
        zf = (xf * gf).sum(dim=(0, other))[:, None, :]  # (C, 1, F)
    return torch.fft.irfft(zf, n=n, dim=-1).contiguous()


@fft_weight_grad.register_fake
def _(x: Tensor, grad: Tensor, dim: int, dense: bool) -> Tensor:
    return x.new_empty((grad.shape[1], x.shape[1] if dense else 1, x.shape[dim]))


def adjoint_kernel(weight: Tensor, dense: bool) -> Tensor:
    """``w_adj[c, o, k] = w[o, c, (-k) mod N]``: correlating with it is the adjoint of correlating with ``w``."""
    w = torch.roll(torch.flip(weight, dims=(-1,)), 1, dims=-1)
    return w.transpose(0, 1) if dense else w


def _setup_context(ctx, inputs, output) -> None:
    x, weight, dim, dense = inputs
    ctx.save_for_backward(x, weight)
    ctx.dim, ctx.dense = dim, dense


def _correlate_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = fft_correlate(grad, adjoint_kernel(weight, ctx.dense).contiguous(), ctx.dim, ctx.dense)
    if ctx.needs_input_grad[1]:
        gw = fft_weight_grad(x, grad, ctx.dim, ctx.dense)
    return gx, gw, None, None


def _weight_grad_backward(ctx, ggw: Tensor):
    # fft_weight_grad(x, g) is bilinear: its cotangent ``ggw`` (a kernel) maps back through two correlations
    x, grad = ctx.saved_tensors
    ggw = ggw.contiguous()
    gx = gg = None
    if ctx.needs_input_grad[0]:
        gx = fft_correlate(grad, adjoint_kernel(ggw, ctx.dense).contiguous(), ctx.dim, ctx.dense)
    if ctx.needs_input_grad[1]:
        gg = fft_correlate(x, ggw, ctx.dim, ctx.dense)
    return gx, gg, None, None


fft_correlate.register_autograd(_correlate_backward, setup_context=_setup_context)
fft_weight_grad.register_autograd(_weight_grad_backward, setup_context=_setup_context)
