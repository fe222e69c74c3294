"""Inference fast path of the ParC-MetaFormer block: the same function in about half the ops.

In eval mode with no gradient, :class:`~parc_surgery.blocks.metaformer.ParCMetaFormerBlock` computes
exactly (to float rounding) what its reference forward computes, rearranged:

* the token mixer is affine in its input, and its linear part is ``W(H(s * x))`` on *all* channels:
  per channel, a circular correlation along height and one along width commute (they act on different
  axes), so half 1's height-then-width and half 2's width-then-height are one height step and one width
  step over the whole map, with the pre-norm BatchNorm scales ``s`` folded into the height kernels. Its
  constant part (PEs, BN shifts, ParC biases pushed through the correlations) is one map, computed from
  one column / one row per half (it is constant along one axis before the second ParC). So: two ParC
  steps instead of four, no split, no concatenation, no BN pass; with ``fft`` along both axes (eager) the
  two steps are one ``rfft2`` round trip (Fast-ParC's fused 2-D form); with both steps on ``spatial`` the
  residual is added by the width step's GEMM (``baddbmm``);
* the FFN's pre-norm BatchNorm is folded into its first 1x1 conv and the channel attention's BatchNorms
  into its two 1x1 convs (run as ``linear`` on the pooled vector); dropouts are identities in eval. The
  FFN's 1x1 convs run through oneDNN on a channels-last copy of the map, the hardswish fused into the first
  (float32 on CPU: 2.0-2.3x faster than a GEMM at ParC-Net-S's shapes, where ATen's own 1x1 convolution is
  a BLAS GEMM on one thread and a channels-first oneDNN one on more); otherwise as batched GEMMs over the
  flattened map (as a transformer's ``nn.Linear`` does).

The ParC-Net paper chose BatchNorm over LayerNorm for this reason: it folds away at inference.

Two ways to run it:

* eager: the folded weights are cached per block (outside the module, so ``deepcopy``, pickling and state
  dicts never see them) per (input size, dtype, device, ParC impls) and rebuilt when any parameter or buffer
  of the block changes (version counter / storage), as the ParC kernel cache does; the steps as above;
* traced by ``torch.compile`` / ``torch.export`` (and eager inside
  :func:`~parc_surgery.ops.functional.portable_form`): no cache and no per-call bookkeeping: the folds are
  ordinary ops on the parameters inside the graph (inductor's ``freezing`` computes them once), and with impl
  ``auto`` both ParC steps as slice + concat + depthwise conv (the portable form exports use). The FFN and
  channel attention run as plain 1x1 convs in exports and with ``freezing`` (inductor prepacks their
  constant weights for oneDNN), else the FFN as in eager through oneDNN's channels-last 1x1 convolution.

Anything unusual (training mode, autograd, fx or TorchScript tracing, the meta device, half precision,
hooks on a submodule, swapped-out submodules, ParC pairs on different impls, a dispatch mode such as MAC
counting or probing) takes the reference forward, so MAC counts and probes see the published formulation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..ops import ParC, resize_kernel, resolve_impl
from ..ops.functional import SHORT_LINE, apply_kernel, fold_pe_enabled, is_portable, portable_ops_only, prepare

__all__ = [
    "apply_folded",
    "bn_affine",
    "bn_foldable",
    "conv_layout",
    "fast_forward",
    "fold",
    "foldable",
    "onednn_ok",
    "reference_forward",
]

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> {key: (stamp, folded)}
_CACHE_SIZE = 8


_ENABLED = [True]

_CONV_POINTWISE = (
    getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None
)
_ONEDNN_POINTWISE = _CONV_POINTWISE is not None


def _compiled_onednn(x: torch.Tensor) -> bool:
    """In a ``torch.compile`` trace: whether the FFN takes oneDNN's channels-last 1x1 convolution. Not in an
    export (``torch.export``, :func:`~parc_surgery.ops.functional.portable_form`: portable ops only), nor with
    inductor's ``freezing``, which prepacks the plain convolutions' constant weights itself (and fuses them
    better than this op: measured ParC-Net-S 1 thread batch 1, 24.9 ms plain convs vs 26.8 ms this op)."""
    from torch._inductor import config as inductor_config

    if portable_ops_only() or inductor_config.freezing:
        return False
    return onednn_ok(x)


@contextlib.contextmanager
def reference_forward() -> Iterator[None]:
    """Within this context every ParC-MetaFormer block runs its reference forward (to compare or to time it)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def bn_foldable(bn) -> bool:
    """A plain ``nn.BatchNorm2d`` with running statistics: in eval an affine map (:func:`bn_affine`)."""
    return type(bn) is nn.BatchNorm2d and bn.running_mean is not None and bn.running_var is not None


def foldable(block) -> bool:
    """Whether the block has the layout :func:`fold` assumes (no submodule swapped for another kind)."""
    ffn, ca = block.ffn, block.ca
    parcs = (block.parc_1_h, block.parc_2_w, block.parc_1_w, block.parc_2_h)
    return (
        all(type(p) is ParC and not p.dense for p in parcs)
        and all(bn_foldable(b) for b in (block.norm_1, block.norm_2, ffn.norm, ca.bn1, ca.bn2))
        and type(ffn.fc1) is nn.Conv2d
        and type(ffn.fc2) is nn.Conv2d
        and type(ffn.act) is nn.Hardswish
        and type(ffn.drop1) is nn.Dropout
        and type(ffn.drop2) is nn.Dropout
        and type(ca.pool) is nn.AdaptiveAvgPool2d
        and ca.pool.output_size in (1, (1, 1))
        and type(ca.reduce) is nn.Conv2d
        and type(ca.expand) is nn.Conv2d
        and type(ca.act) is nn.Hardswish
        and type(ca.gate) is nn.Hardsigmoid
        and block.parc_1_h.impl == block.parc_2_h.impl
        and block.parc_1_w.impl == block.parc_2_w.impl
    )


def _input_ok(block, x) -> bool:
    if not _ENABLED[-1] or not fold_pe_enabled():  # MAC counting adds the PEs unfolded: the reference ops count
        return False
    return x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and not x.is_meta and x.shape[1] == block.dim


def _traced_ok(block, x) -> bool:
    """Whether a ``torch.compile`` / ``torch.export`` trace takes the fast path: the block in eval mode, no autograd
    (``torch.no_grad()`` / ``torch.inference_mode()``), the layout :func:`fold` assumes. Read from a few flags
    only: every value read becomes a guard checked on each call of the compiled model (a scan of every
    submodule's hooks and parameters cost more than the rest of the guards together). Under compile, hooks
    registered on the block's submodules do not run on this path."""
    return not block.training and not torch.is_grad_enabled() and _input_ok(block, x) and foldable(block)


def _scan(block, x) -> tuple | None:
    """Eager: ``None`` when the fast path cannot run, else the stamp the cached folds must match.

    One pass over the block's modules: every one in eval mode, no hooks below the block, no parameter that
    needs a gradient; the stamp holds each module's type, each BatchNorm's eps and each tensor's identity,
    storage and version counter, so swapping a submodule or editing a weight in place invalidates the cache.
    """
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.jit.is_scripting() or _global_hooks():
        return None
    if is_in_torch_dispatch_mode() or not _input_ok(block, x):  # MAC counting, probing: the reference ops
        return None
    grad = torch.is_grad_enabled()
    stamp: list = []
    for m in block.modules():
        if m.training or (m is not block and (m._forward_hooks or m._forward_pre_hooks)):
            return None
        stamp.append(type(m))
        if isinstance(m, nn.BatchNorm2d):
            stamp.append(m.eps)
        for t in m._parameters.values():
            if t is not None:
                if grad and t.requires_grad:
                    return None
                stamp.append((id(t), t.data_ptr(), t._version))
        for t in m._buffers.values():
            if t is not None:
                stamp.append((id(t), t.data_ptr(), t._version))
    return tuple(stamp)


def bn_affine(bn: nn.BatchNorm2d, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel in eval (running statistics)."""
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def _constant_map(block, h: int, w: int, dt: torch.dtype) -> torch.Tensor:
    """The token mixer's output for a zero input, ``(1, D, H, W)``, in O(D (H + W)) work: half 1 sees PE + BN
    shift, constant along the width, so its height ParC runs on one column and its width ParC is a tap sum
    plus the ParC's own PE term; half 2 the same with the axes swapped. (The reference mixer on a zero map
    computes the same, at the cost of a whole forward of the mixer.)"""
    d = block.half
    s1, t1 = bn_affine(block.norm_1, dt)
    s2, t2 = bn_affine(block.norm_2, dt)
    a1, a2 = t1.view(1, d, 1, 1), t2.view(1, d, 1, 1)
    if block.pe_1 is not None:
        a1 = a1 + s1.view(1, d, 1, 1) * resize_kernel(block.pe_1.to(dt), h, "height")  # (1, d, H, 1)
        a2 = a2 + s2.view(1, d, 1, 1) * resize_kernel(block.pe_2.to(dt), w, "width")  # (1, d, 1, W)
    c1 = block.parc_1_w.constant_line_response(block.parc_1_h(a1.expand(1, d, h, 1)), w)
    c2 = block.parc_2_h.constant_line_response(block.parc_2_w(a2.expand(1, d, 1, w)), h)
    return torch.cat([c1.expand(1, d, h, w), c2.expand(1, d, h, w)], dim=1)


def fold(block, x: torch.Tensor, *, fuse_fft: bool) -> dict:
    """Every tensor the fast path uses, for inputs shaped like ``x``: a pure function of the block's tensors.

    ``fuse_fft``: with ``fft`` along both axes, one 2-D spectrum ``spec2`` (complex) instead of two kernels.
    """
    h, w = x.shape[2], x.shape[3]
    dt = x.dtype
    s1, _ = bn_affine(block.norm_1, dt)
    s2, _ = bn_affine(block.norm_2, dt)
    scale = torch.cat([s1, s2]).view(-1, 1, 1, 1)
    wh = torch.cat([block.parc_1_h.weight, block.parc_2_h.weight]).to(dt) * scale  # (D, 1, K_h, 1)
    ww = torch.cat([block.parc_1_w.weight, block.parc_2_w.weight]).to(dt)  # (D, 1, 1, K_w)
    impl_h = resolve_impl(block.parc_1_h.impl, x, wh, "height", False, taps=False)  # chained steps: see resolve_impl
    impl_w = resolve_impl(block.parc_1_w.impl, x, ww, "width", False, taps=False)
    out: dict = {"impl_h": impl_h, "impl_w": impl_w}
    if fuse_fft and impl_h == "fft" and impl_w == "fft":  # one 2-D transform: product of both conjugate spectra
        kh = resize_kernel(wh, h, "height").flatten(1)  # (D, H)
        kw = resize_kernel(ww, w, "width").flatten(1)  # (D, W)
        out["spec2"] = torch.fft.fft(kh, dim=-1).conj()[:, :, None] * torch.fft.rfft(kw, dim=-1).conj()[:, None, :]
    else:
        out["kh"] = prepare(wh, None, None, h, "height", False, impl_h, dt)[0]
        out["kw"] = prepare(ww, None, None, w, "width", False, impl_w, dt)[0]
    out["const"] = _constant_map(block, h, w, dt)
    ffn, ca = block.ffn, block.ca
    fs, ft = bn_affine(ffn.norm, dt)
    w1 = ffn.fc1.weight.to(dt)
    b1 = w1.flatten(1) @ ft
    out["w1"] = (w1 * fs.view(1, -1, 1, 1)).flatten(1)
    out["b1"] = (b1 if ffn.fc1.bias is None else b1 + ffn.fc1.bias.to(dt))[:, None]
    out["w2"] = ffn.fc2.weight.to(dt).flatten(1)
    out["b2"] = None if ffn.fc2.bias is None else ffn.fc2.bias.to(dt)[:, None]
    for conv, bn, tag in ((ca.reduce, ca.bn1, "r"), (ca.expand, ca.bn2, "e")):
        s, t = bn_affine(bn, dt)
        wt = conv.weight.to(dt).flatten(1) * s[:, None]
        out[f"w{tag}"] = wt
        out[f"b{tag}"] = t if conv.bias is None else t + s * conv.bias.to(dt)
    return out


def _folded(block, x: torch.Tensor, stamp: tuple) -> dict | None:
    key = (
        x.shape[2],
        x.shape[3],
        x.dtype,
        x.device,
        block.parc_1_h.impl,
        block.parc_1_w.impl,
        torch.is_inference_mode_enabled(),
        is_portable(),
    )
    entries = _CACHE.get(block)
    if entries is None:
        entries = _CACHE[block] = {}
    entry = entries.get(key)
    if entry is None or entry[0] != stamp:
        if len(entries) >= _CACHE_SIZE:
            entries.clear()
        ok = foldable(block)  # the stamp holds the module types: checked again whenever one changes
        with torch.no_grad():
            entry = entries[key] = (stamp, conv_layout(fold(block, x, fuse_fft=True)) if ok else None)
    return entry[1]


def _spatial_mixer(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:
    """``x + W(H(x))`` with both ParC steps as circulant GEMMs per image, the residual added by the width
    GEMM itself (``baddbmm``): one pass over the map fewer than correlating and adding apart (measured 1-14 %
    faster for the token mixer at ParC-Net-S's shapes, batch 1 and 8, except lines of at most
    ``SHORT_LINE`` at batch > 1, where :func:`~parc_surgery.ops.functional.apply_kernel`'s one GEMM per
    channel over the batch wins: 8x8 maps at batch 8, 0.38 vs 0.31 ms)."""
    z = torch.empty_like(x)
    for i in range(x.shape[0]):
        torch.baddbmm(x[i], torch.bmm(kh, x[i]), kw, out=z[i])  # (C, H, H) @ (C, H, W), then @ (C, W, W)
    return z


def _pointwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 conv as one batched GEMM ``(O, C) @ (B, C, H*W)`` (where :func:`onednn_ok` is false): on CPU
    1.1-3x faster than ``F.conv2d``'s channels-first oneDNN 1x1 conv at the block's shapes (measured at batch 1
    and 8, 8x8 to 32x32 maps, 192-640 channels; the worst case for the conv, C 192 -> 384 at 32x32, 1.4 ms vs
    0.47 ms at batch 1)."""
    bsz, c, h, wd = x.shape
    xv = x.reshape(bsz, c, h * wd)
    wb = w.flatten(1).expand(bsz, -1, -1)  # (either layout of :func:`fold` / :func:`conv_layout`)
    y = torch.bmm(wb, xv) if b is None else torch.baddbmm(b.view(-1, 1), wb, xv)
    return y.view(bsz, -1, h, wd)


def _mixer(x: torch.Tensor, f: dict, *, eager: bool) -> torch.Tensor:
    """Residual plus the linear part of the token mixer (the constant map is added by the caller)."""
    if "spec2" in f:
        h, w = x.shape[2], x.shape[3]
        return torch.fft.irfft2(torch.fft.rfft2(x).mul_(f["spec2"]), s=(h, w)).add_(x)
    spatial = f["impl_h"] == f["impl_w"] == "spatial"
    if spatial and eager and x.is_contiguous() and (x.shape[0] == 1 or min(x.shape[2:]) > SHORT_LINE):
        return _spatial_mixer(x, f["kh"], f["kw"])
    z = apply_kernel(x, f["kh"], None, "height", False, f["impl_h"])
    return apply_kernel(z, f["kw"], None, "width", False, f["impl_w"]).add_(x)


def conv_layout(f: dict) -> dict:
    """``f`` (:func:`fold`) with the FFN and channel-attention weights as 1x1-conv kernels ``(O, C, 1, 1)`` and
    biases ``(O,)``: the layout :func:`apply_folded` takes with ``portable=True`` (exporters and edge delegates
    such as XNNPACK want convolution weights that are constants, not views computed in the graph) or
    ``onednn=True``, and the one the eager cache holds."""
    out = dict(f)
    for w, b in (("w1", "b1"), ("w2", "b2"), ("wr", "br"), ("we", "be")):
        out[w] = f[w][:, :, None, None]
        out[b] = None if f[b] is None else f[b].reshape(-1)
    return out


def onednn_ok(x: torch.Tensor) -> bool:
    """Whether the FFN's 1x1 convolutions can run through oneDNN on channels-last maps: a float32 CPU tensor
    and a PyTorch built with oneDNN (every x86 / ARM wheel)."""
    return _ONEDNN_POINTWISE and x.dtype == torch.float32 and x.device.type == "cpu"


def _ffn_onednn(z: torch.Tensor, f: dict) -> torch.Tensor:
    """The FFN (``fc2(hardswish(fc1(z)))``, norm folded) as two oneDNN 1x1 convolutions on channels-last maps,
    the hardswish fused into the first. At ParC-Net-S's shapes, one thread, 2.0-2.3x faster than the same
    products as GEMMs (ATen's 1x1 convolution and ``bmm`` both run them through BLAS there)."""
    zc = z.contiguous(memory_format=torch.channels_last)
    h = _CONV_POINTWISE(zc, f["w1"], f["b1"], (0, 0), (1, 1), (1, 1), 1, "hardswish", [], "")
    return _CONV_POINTWISE(h, f["w2"], f["b2"], (0, 0), (1, 1), (1, 1), 1, "none", [], "")


def apply_folded(x: torch.Tensor, f: dict, *, eager: bool, portable: bool, onednn: bool = False) -> torch.Tensor:
    """The block's output from its folded tensors ``f``: :func:`fold`'s, in :func:`conv_layout` for ``portable``
    and ``onednn`` (the GEMM form takes either layout).

    ``eager``: the in-place / ``out=`` layouts measured fastest in eager mode (not for traced graphs);
    ``portable``: every matrix product as a convolution, all maps 4-D (what exports get);
    ``onednn``: the FFN through oneDNN's 1x1 convolution on channels-last maps (:func:`onednn_ok`).
    """
    z = _mixer(x, f, eager=eager).add_(f["const"])  # residual + token mixer
    if portable:  # 1x1 convolutions on 4-D maps: what every runtime and delegate fuses best
        y = F.conv2d(F.hardswish(F.conv2d(z, f["w1"], f["b1"])), f["w2"], f["b2"])
        g = F.hardswish(F.conv2d(y.mean((2, 3), keepdim=True), f["wr"], f["br"]))
        return torch.addcmul(z, y, F.hardsigmoid(F.conv2d(g, f["we"], f["be"])))
    if onednn:
        y = _ffn_onednn(z, f)
    else:
        y = _pointwise(F.hardswish(_pointwise(z, f["w1"], f["b1"]), inplace=True), f["w2"], f["b2"])
    g = F.hardswish(F.linear(y.mean((2, 3)), f["wr"].flatten(1), f["br"]))
    g = F.hardsigmoid(F.linear(g, f["we"].flatten(1), f["be"]))
    return torch.addcmul(z, y, g[:, :, None, None])


def fast_forward(block, x: torch.Tensor) -> torch.Tensor | None:
    """The block's output through the folded inference path, or ``None`` when the reference forward must run."""
    if not isinstance(x, torch.Tensor):
        return None
    if torch.compiler.is_compiling():  # torch.compile / torch.export: folds in the graph, no cache
        if not _traced_ok(block, x):
            return None
        # with impl "auto" the ParC steps as convolutions (resolve_impl); the FFN through oneDNN's channels-last
        # 1x1 conv, or with freezing as plain 1x1 convs, which inductor prepacks for oneDNN
        f = conv_layout(fold(block, x, fuse_fft=False))
        if _compiled_onednn(x):
            return apply_folded(x, f, eager=False, portable=False, onednn=True)
        return apply_folded(x, f, eager=False, portable=True)
    stamp = _scan(block, x)
    f = None if stamp is None else _folded(block, x, stamp)
    if f is None:
        return None
    portable = is_portable()
    return apply_folded(x, f, eager=True, portable=portable, onednn=not portable and onednn_ok(x))
