"""``parc_conv``: the one spatial conv of *any* residual conv block becomes a ParCSplit (generic fallback).

For conv blocks without a dedicated ParC block (timm's ByobNet / RegNet / CSP / DLA / ... blocks, ResNeXt's
grouped bottlenecks, MBConv variants), :class:`ParCConv` finds the block's single spatial (k x k, k > 1)
``nn.Conv2d`` and swaps it for a :class:`~parc_surgery.blocks.parc_split.ParCSplit` exactly like the dedicated
ParC-ConvNet blocks do (:class:`~parc_surgery.blocks._fold.ParCConvBlock`: a deep copy of the block whose
forward is the source class's own):

* a dense conv (``groups=1``) becomes a dense ParCSplit (ParC-ResNet's choice);
* a depthwise conv (``groups=C``) becomes a depthwise ParCSplit (ParC-MobileNetV2 / ParC-ConvNeXt's);
* a grouped conv (``1 < groups < C``, ResNeXt / RegNet) becomes a depthwise ParCSplit: a dense one would
  cost ``C^2 K / 2`` parameters, far more than the grouped conv it replaces. Its warm start folds the
  kernel summed over each group's input channels (exact for inputs constant across a group's channels).

A block that is itself a container subclass (timm's ``ConvNorm``, torchvision's ``Conv2dNormActivation``)
is replaced by a copy of itself with the conv swapped, so the container's own forward and methods stay.

It is *lenient* (``skip_unsupported``): a generic rule selects it for whole stages, and blocks it cannot
replace (no or several spatial convs, strided, dilated, channel-changing, odd width, a block that
changes the feature size) are left out with a note instead of failing the conversion.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedTargetError
from ._carry import CarryBuilder, CarryRecord
from ._fold import INITS, ParCConvBlock, _keeps_size, dotted_name
from ._registry import BlockContext, register_block
from .parc_split import ParCSplit

__all__ = ["ParCConv", "find_spatial_conv"]


def find_spatial_conv(module: nn.Module) -> tuple[str, nn.Conv2d]:
    """The qualified name and module of ``module``'s only spatial ``nn.Conv2d`` (a kernel side > 1).

    Raises :class:`UnsupportedTargetError` when there is none or more than one, or when the block already
    holds ParC layers.
    """
    what = dotted_name(type(module))
    if any(isinstance(m, ParCSplit) for m in module.modules()):
        raise UnsupportedTargetError(f"parc_conv: the {what} already holds a ParCSplit")
    convs = [(n, m) for n, m in module.named_modules() if n and isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    if not convs:
        raise UnsupportedTargetError(f"parc_conv: the {what} has no spatial nn.Conv2d (kernel > 1x1) to replace")
    if len(convs) > 1:
        names = ", ".join(n for n, _ in convs[:4])
        raise UnsupportedTargetError(
            f"parc_conv: the {what} has {len(convs)} spatial convs ({names}); parc_conv replaces blocks with exactly "
            "one, which must be unambiguous"
        )
    return convs[0]


def _depthwise_twin(conv: nn.Conv2d) -> nn.Conv2d:
    """A depthwise conv like the grouped ``conv``, its kernel summed over each group's input channels."""
    c = conv.out_channels
    dw = nn.Conv2d(
        c,
        c,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=c,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        dw.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            dw.bias.copy_(conv.bias)
    return dw


@register_block("parc_conv")
class ParCConv(ParCConvBlock):
    """Any conv block with its one spatial conv replaced by a biased :class:`ParCSplit` (see the module docstring).

    Build with ``ParCConv(source, kernel_hw=(K_h, K_w), pe=True, impl="auto", init="warm_start")`` or
    ``from_module(source, ctx)``; ``source`` is never mutated. Extra forward arguments are passed through to
    the source class's forward.
    """

    replaces = ()  # any block: selected by stage / name / type in a rule
    skip_unsupported = True
    conv_role = "spatial conv"

    def __init__(
        self,
        source: nn.Module,
        *,
        kernel_hw: tuple[int, int],
        pe: bool = True,
        impl: str = "auto",
        init: str = "warm_start",
    ):
        self._check(source, kernel_hw, init)
        path, conv = find_spatial_conv(source)
        grouped = 1 < conv.groups < conv.out_channels
        self.dense = conv.groups == 1  # read by ParCConvBlock.__init__ (may be replaced by a source attribute)
        if grouped:
            source = copy.deepcopy(source)
            source.set_submodule(path, _depthwise_twin(conv))
        super().__init__(source, kernel_hw=kernel_hw, pe=pe, impl=impl, init=init)
        self.parc_grouped = grouped

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._source_forward(self, x, *args, **kwargs)

    @classmethod
    def conv_path(cls, module: nn.Module) -> str:
        return find_spatial_conv(module)[0]

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Refuse (UnsupportedTargetError) what cannot be replaced, including a block that changes the size."""
        cls._check(module, ctx.kernel_hw, ctx.init)
        a, b = ctx.source_in_shape, ctx.source_out_shape
        if a is not None and b is not None and (len(a) != 4 or len(b) != 4 or tuple(a[2:]) != tuple(b[2:])):
            raise UnsupportedTargetError(
                f"parc_conv: the {dotted_name(type(module))} maps {tuple(a)} to {tuple(b)}; only (B, C, H, W) blocks "
                "that keep the spatial size can be replaced (ParC kernels are sized from the block's input)"
            )

    @classmethod
    def _check(cls, module: nn.Module, kernel_hw, init: str) -> None:
        if init not in INITS:
            raise ConfigError(f"parc_conv: init must be one of {INITS}, got {init!r}")
        if (
            not isinstance(kernel_hw, (tuple, list))
            or len(kernel_hw) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernel_hw)
        ):
            raise ConfigError(f"parc_conv: kernel_hw must be two positive ints (K_h, K_w), got {kernel_hw!r}")
        path, conv = find_spatial_conv(module)
        what = f"parc_conv: cannot replace {dotted_name(type(module))}: its spatial conv {path!r}"
        c = conv.out_channels
        if tuple(conv.stride) != (1, 1):
            raise UnsupportedTargetError(f"{what} has stride {tuple(conv.stride)} (ParC keeps the spatial size)")
        if tuple(conv.dilation) != (1, 1):
            raise UnsupportedTargetError(f"{what} is dilated (dilation={tuple(conv.dilation)})")
        if conv.in_channels != c:
            raise UnsupportedTargetError(f"{what} maps {conv.in_channels} to {c} channels; ParC keeps the count")
        if c % 2:
            raise UnsupportedTargetError(f"{what} has {c} channels, an odd count; ParCSplit needs an even one")
        if not _keeps_size(conv):
            raise UnsupportedTargetError(
                f"{what} has padding {conv.padding} for kernel {tuple(conv.kernel_size)}: it changes the size"
            )
        if conv.padding_mode != "zeros":
            raise UnsupportedTargetError(f"{what} pads with {conv.padding_mode!r}; only zero-padded convs are folded")

    @classmethod
    def from_module(cls, module: nn.Module, ctx: BlockContext) -> tuple[ParCConv, CarryRecord]:
        """Build the block from ``module``: every other parameter kept bit-identical, the conv folded or new."""
        block = cls(module, kernel_hw=ctx.kernel_hw, pe=ctx.pe, impl=ctx.impl, init=ctx.init)
        path = block.parc_path
        conv = module.get_submodule(path)
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # a container subclass (timm ConvNorm, torchvision Conv2dNormActivation): its forward and its callers
            # use the container's own methods, so the replacement is a copy of it with the conv swapped
            twin = copy.deepcopy(module)
            twin.set_submodule(path, block.get_submodule(path))
            block = twin
        builder = CarryBuilder()
        for name, _ in module.named_parameters():
            if not name.startswith(path + "."):
                builder.kept.append((name, name))
        if ctx.init == "warm_start":
            split = block.get_submodule(path)
            grouped = 1 < conv.groups < conv.out_channels
            d = split.half
            kh, kw = conv.kernel_size
            if split.dense:
                part = "within-half block [{s}, {s}] of the kernel"
            elif grouped:
                part = (
                    f"channels [{{s}}] of the kernel summed over each group's {conv.in_channels // conv.groups} inputs"
                )
            else:
                part = "channels [{s}] of the kernel"
            for axis, sl, other in (("h", f"0:{d}", "width"), ("w", f"{d}:{2 * d}", "height")):
                builder.transform(
                    f"{path}.parc_{axis}.weight",
                    (f"{path}.weight",),
                    f"folded {part.format(s=sl)} ({kh}x{kw}): summed over the {other} taps, tap offset a at index "
                    f"a mod K",
                )
                if conv.bias is not None:
                    builder.transform(f"{path}.parc_{axis}.bias", (f"{path}.bias",), f"conv bias, channels [{sl}]")
        return block, builder.finish(block, module)
