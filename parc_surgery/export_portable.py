"""The deployable form of a model: ParC as the ParC-Net code shipped it, every per-size kernel computed once.

:func:`to_portable` returns a copy of a model, in eval mode, in which

* every :class:`~parc_surgery.ops.ParC` becomes a :class:`PortableParC`: its kernel resized to the axis
  length the layer sees at the export input size, its PE and bias folded into one additive term, applied as
  slice + concat (circular extension by N - 1 lines) + valid depthwise (or dense) convolution;
* every :class:`~parc_surgery.blocks.parc_split.ParCSplit` (the ParC-ConvNets' conv swap) becomes a
  :class:`PortableParCSplit`: both halves frozen as above, and the BatchNorm that alone consumes its output (an
  eval ``nn.BatchNorm2d``, or timm's ``BatchNormAct2d``, whose dropout and activation stay) folded into its kernels
  and offset, which then are the convolutions' own biases, or one ``(1, C, H, W)`` map added after the halves'
  concat when position embeddings make them depend on position (the dataflow is read from a ``torch.fx`` trace of
  the model; no fold where it does not trace). Measured on ParC-MobileNetV2 at batch 1 in onnxruntime (three
  scratch A/B runs, interleaved, on a noisy machine): 0.76-0.83x -> 0.84-0.87x its baseline's speed with two
  threads, 0.89x -> 0.92-0.93x with one; in OpenVINO and ExecuTorch within the noise;
* every ParC-MetaFormer block becomes a :class:`PortableMetaFormer`: its inference fast path
  (:mod:`parc_surgery.blocks._metaformer_eval`: BatchNorms folded, the four ParC steps merged into one height
  and one width step) with the folded tensors stored as buffers, ParC steps in the same portable form and the
  FFN / channel attention as 1x1 convolutions and GEMMs.

Nothing that depends only on weights is left for a runtime to compute, and nothing an exporter or edge
runtime lacks is used: no FFT (``DFT``), no circular padding (``Pad(mode=wrap)``), no complex tensors. The
frozen modules run at the recorded size only (another size raises :class:`~parc_surgery.errors.ConfigError`);
a ParC that runs at several sizes in one forward keeps its module and runs in the portable form with its
kernel resized in the graph (:func:`~parc_surgery.ops.functional.portable_form`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks._metaformer_eval import apply_folded, bn_affine, bn_foldable, conv_layout, fold, foldable
from .blocks.metaformer import ParCMetaFormerBlock
from .blocks.parc_split import ParCSplit
from .errors import ConfigError
from .ops import ParC, portable_form
from .ops.functional import apply_kernel, circular_conv, prepare
from .probe import trace_model

__all__ = ["OFFSET_LAYOUTS", "PortableMetaFormer", "PortableParC", "PortableParCSplit", "to_portable"]

# How a frozen ParCSplit adds a position-dependent offset; which one a runtime gets is in its registry entry
# (parc_surgery.export_runtimes). Measured on ParC-MobileNetV2, batch 1, 1 and 2 threads, in a scratch A/B
# (interleaved, one process per setting): onnxruntime runs "map" 2-12 % faster than "lines" (its broadcasting
# Add over the innermost axis is slow), OpenVINO and ExecuTorch/XNNPACK run "lines" 1-5 % faster.
OFFSET_LAYOUTS = ("map", "lines")


def _check_offsets_as(owner: str, offsets_as: str) -> None:
    if offsets_as not in OFFSET_LAYOUTS:
        raise ConfigError(f"{owner}: offsets_as must be one of {OFFSET_LAYOUTS}, got {offsets_as!r}")


def _check_size(owner: str, x: torch.Tensor, size: tuple[int, ...], dims: tuple[int, ...]) -> None:
    got = tuple(x.shape[d] for d in dims)
    if got != size:
        raise ConfigError(
            f"{owner} was frozen for inputs of size {size} along dims {dims} (the export input size), got {got}; "
            f"export again at this input size (parc_surgery.export(..., input_size=...))"
        )


class PortableParC(nn.Module):
    """A ParC frozen at one axis length: ``conv(concat(x, x[:N-1]), kernel) + offset`` (slice + concat + conv)."""

    def __init__(self, parc: ParC, n: int, dtype: torch.dtype):
        super().__init__()
        self.axis = parc.axis
        self.dense = parc.dense
        self.n = n
        with torch.no_grad():
            kernel, offset = prepare(parc.weight, parc.pe, parc.bias, n, parc.axis, parc.dense, "conv", dtype)
        self.register_buffer("kernel", kernel.detach().clone())
        self.register_buffer("offset", None if offset is None else offset.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 2 if self.axis == "height" else 3
        _check_size(type(self).__name__, x, (self.n,), (dim,))
        return apply_kernel(x, self.kernel, self.offset, self.axis, self.dense, "conv")

    def extra_repr(self) -> str:
        return f"axis={self.axis!r}, n={self.n}, dense={self.dense}"


class PortableParCSplit(nn.Module):
    """A ParCSplit frozen at one feature size ``(H, W)``, with an optional per-channel affine map after it (the
    BatchNorm it feeds): ``cat(conv_h(x[:, :d]), conv_w(x[:, d:])) + offset`` in the portable form, the affine
    folded into the kernels, the offset into the convolutions' biases when it is per channel. A position-dependent
    offset (PE) is added ``offsets_as``: ``"map"``, one ``(1, C, H, W)`` map after the concat, or ``"lines"``,
    each half's ``(1, d, H, 1)`` / ``(1, d, 1, W)`` lines before it (see :data:`OFFSET_LAYOUTS`)."""

    def __init__(self, split: ParCSplit, hw: tuple[int, int], dtype: torch.dtype, affine=None, offsets_as: str = "map"):
        super().__init__()
        _check_offsets_as(type(self).__name__, offsets_as)
        self.hw = hw
        self.half = split.half
        self.dense = split.dense
        kernels, offsets = [], []
        with torch.no_grad():
            for parc, sl in ((split.parc_h, slice(0, split.half)), (split.parc_w, slice(split.half, None))):
                n = hw[0] if parc.axis == "height" else hw[1]
                kernel, offset = prepare(parc.weight, parc.pe, parc.bias, n, parc.axis, parc.dense, "conv", dtype)
                if offset is None:
                    offset = kernel.new_zeros(1, kernel.shape[0], 1, 1)
                if affine is not None:
                    scale, shift = (t[sl].to(dtype) for t in affine)
                    kernel = kernel * scale.view(-1, 1, 1, 1)
                    offset = offset * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
                kernels.append(kernel)
                offsets.append(offset)
            per_channel = all(o.shape[2:] == (1, 1) for o in offsets)
            for axis, kernel, offset in zip(("h", "w"), kernels, offsets):
                self.register_buffer(f"kernel_{axis}", kernel.detach().clone())
                self.register_buffer(f"bias_{axis}", offset.flatten().detach().clone() if per_channel else None)
                lines = not per_channel and offsets_as == "lines"
                self.register_buffer(f"off_{axis}", offset.detach().clone() if lines else None)
            full = (
                None if per_channel or offsets_as == "lines" else torch.cat([o.expand(1, -1, *hw) for o in offsets], 1)
            )
            self.register_buffer("offset", None if full is None else full.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(type(self).__name__, x, self.hw, (2, 3))
        d = self.half
        if self.off_h is not None:
            yh = circular_conv(x[:, :d], self.kernel_h, "height", self.dense) + self.off_h
            return torch.cat([yh, circular_conv(x[:, d:], self.kernel_w, "width", self.dense) + self.off_w], dim=1)
        y = torch.cat(
            [
                circular_conv(x[:, :d], self.kernel_h, "height", self.dense, self.bias_h),
                circular_conv(x[:, d:], self.kernel_w, "width", self.dense, self.bias_w),
            ],
            dim=1,
        )
        return y if self.offset is None else y + self.offset

    def extra_repr(self) -> str:
        return f"hw={self.hw}, dense={self.dense}, position_offset={self.offset is not None or self.off_h is not None}"


class _ActAfterNorm(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded away: dropout, then activation."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.drop, self.act = bn.drop, bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _norm_rest(bn: nn.Module) -> nn.Module | None:
    """What replaces ``bn`` once folded (``None``: not foldable): nothing for an eval ``nn.BatchNorm2d``; dropout
    and activation for timm's ``BatchNormAct2d``."""
    if bn_foldable(bn):
        return nn.Identity()
    from timm.layers import BatchNormAct2d

    if type(bn) is BatchNormAct2d and bn.running_mean is not None and bn.running_var is not None:
        return _ActAfterNorm(bn)
    return None


def _norms_after_splits(model: nn.Module) -> dict[str, str]:
    """``{ParCSplit path: BatchNorm path}`` for each ParCSplit called once whose output feeds nothing but one
    BatchNorm called once (from a ``torch.fx`` trace of ``model`` with both as leaves; empty if it does not trace)."""
    norm_types = (nn.BatchNorm2d,)  # timm's BatchNormAct2d is a subclass
    if not any(isinstance(m, ParCSplit) for m in model.modules()):
        return {}
    gm, _ = trace_model(model, leaf_types=(ParCSplit, *norm_types))
    if gm is None:
        return {}
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = {}
    for target, nodes in calls.items():
        if len(nodes) != 1 or not isinstance(model.get_submodule(target), ParCSplit):
            continue
        users = list(nodes[0].users)
        if len(users) != 1 or users[0].op != "call_module" or len(calls[users[0].target]) != 1:
            continue
        if users[0].args[:1] == (nodes[0],) and isinstance(model.get_submodule(users[0].target), norm_types):
            pairs[target] = users[0].target
    return pairs


class PortableMetaFormer(nn.Module):
    """A ParC-MetaFormer block frozen at one feature size: its folded inference path in the portable form."""

    def __init__(self, block: ParCMetaFormerBlock, hw: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.hw = hw
        probe = torch.zeros(1, block.dim, *hw, dtype=dtype, device=block.ffn.fc1.weight.device)
        with torch.no_grad(), portable_form():
            folded = conv_layout(fold(block, probe, fuse_fft=False))
        self.names = tuple(k for k, v in folded.items() if isinstance(v, torch.Tensor) or v is None)
        for k in self.names:
            self.register_buffer(k, None if folded[k] is None else folded[k].detach().clone())
        self.impls = {k: v for k, v in folded.items() if isinstance(v, str)}  # "conv" for both steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(type(self).__name__, x, self.hw, (2, 3))
        f = {k: getattr(self, k) for k in self.names}
        f.update(self.impls)
        return apply_folded(x, f, eager=False, portable=True)

    def extra_repr(self) -> str:
        return f"hw={self.hw}"


def _record_sizes(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, set[tuple[int, ...]]]:
    """The (C, H, W) each ParC and ParC-MetaFormer block of ``model`` sees in one eager forward of ``x``."""
    seen: dict[nn.Module, set[tuple[int, ...]]] = {}
    handles = []
    for m in model.modules():
        if isinstance(m, (ParC, ParCSplit, ParCMetaFormerBlock)):

            def hook(mod, args, _seen=seen):
                if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                    _seen.setdefault(mod, set()).add(tuple(args[0].shape[1:]))

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def to_portable(model: nn.Module, x: torch.Tensor, *, offsets_as: str = "map") -> nn.Module:
    """A copy of ``model`` in eval mode with its ParC layers and blocks frozen, in the portable form, at the
    sizes they see for the input ``x`` (see the module docstring); ``offsets_as``: how frozen ParCSplits add
    position offsets (:class:`PortableParCSplit`). ``model`` itself is not changed."""
    _check_offsets_as("to_portable", offsets_as)
    out = copy.deepcopy(model).eval()
    sizes = _record_sizes(out, x)
    frozen: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()  # ParCs of frozen blocks: replaced with their block
    for name, m in out.named_modules():
        if isinstance(m, ParCMetaFormerBlock) and foldable(m) and len(sizes.get(m, ())) == 1 and id(m) not in inside:
            [(_, h, w)] = sizes[m]
            frozen.append((name, PortableMetaFormer(m, (h, w), x.dtype)))
            inside.update(id(p) for p in m.modules())
    norms = _norms_after_splits(out)
    for name, m in out.named_modules():
        if isinstance(m, ParCSplit) and id(m) not in inside and len(sizes.get(m, ())) == 1:
            [(_, h, w)] = sizes[m]
            bn = out.get_submodule(norms[name]) if name in norms else None
            rest = None if bn is None else _norm_rest(bn)
            affine = None if rest is None else bn_affine(bn, x.dtype)
            frozen.append((name, PortableParCSplit(m, (h, w), x.dtype, affine, offsets_as)))
            if rest is not None:
                frozen.append((norms[name], rest))
            inside.update(id(p) for p in m.modules())
    for name, m in out.named_modules():
        if isinstance(m, ParC) and id(m) not in inside and len(sizes.get(m, ())) == 1:
            [(_, h, w)] = sizes[m]
            frozen.append((name, PortableParC(m, h if m.axis == "height" else w, x.dtype)))
    for name, new in frozen:
        if not name:  # the model is itself a ParC / block
            return new
        out.set_submodule(name, new)
    return out
