"""The deployable form of a model: ParC as the ParC-Net code shipped it, every per-size kernel computed once.

:func:`to_portable` returns a copy of a model, in eval mode, in which

* every :class:`~parc_surgery.ops.ParC` becomes a :class:`PortableParC`: its kernel resized to the axis
  length the layer sees at the export input size, its PE and bias folded into one additive term, applied as
  slice + concat (circular extension by N - 1 lines) + valid depthwise (or dense) convolution;
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

from .blocks._metaformer_eval import apply_folded, conv_layout, fold, foldable
from .blocks.metaformer import ParCMetaFormerBlock
from .errors import ConfigError
from .ops import ParC, portable_form
from .ops.functional import apply_kernel, prepare

__all__ = ["PortableMetaFormer", "PortableParC", "to_portable"]


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
        if isinstance(m, (ParC, ParCMetaFormerBlock)):

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


def to_portable(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode with its ParC layers and blocks frozen, in the portable form, at the
    sizes they see for the input ``x`` (see the module docstring). ``model`` itself is not changed."""
    out = copy.deepcopy(model).eval()
    sizes = _record_sizes(out, x)
    frozen: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()  # ParCs of frozen blocks: replaced with their block
    for name, m in out.named_modules():
        if isinstance(m, ParCMetaFormerBlock) and foldable(m) and len(sizes.get(m, ())) == 1 and id(m) not in inside:
            [(_, h, w)] = sizes[m]
            frozen.append((name, PortableMetaFormer(m, (h, w), x.dtype)))
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
