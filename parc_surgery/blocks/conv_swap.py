"""The conv swap of the ParC-ConvNets: a copy of the source block with its spatial conv replaced by ParC halves.

:class:`ParCConvBlock` is the base of every ParC-ConvNet block (``parc_bottleneck``, ``parc_basic_block``,
``parc_inverted_residual``, ``parc_convnext``, ``parc_conv``). ``from_module`` deep-copies the source block
and replaces one conv (``set_submodule``) with a biased :class:`~parc_surgery.blocks.parc_split.ParCSplit`, folded
from the conv per ``ctx.init`` (:mod:`parc_surgery.blocks._fold`). The result is an instance of the
source's own class: its ``forward``, its helper methods, its attributes and anything its callers read run
unchanged (drop path, SE, layer scale, shortcut, activations); every tensor outside the conv is
bit-identical under its own name. The swapped ParCSplit takes the conv's training flag; the copy keeps
every other module's. Hooks follow ``copy.deepcopy`` (the engine detaches the user's hooks while it works,
so a converted model has none on the new block).

A subclass says where the conv is (``conv_path``), whether its ParC is dense (``dense``: ``True`` needs a
``groups=1`` conv, ``False`` a depthwise one, ``None`` follows the conv, a grouped conv becoming depthwise)
and what else it refuses (``source_problem``). The state dict keeps the source's names with
``<conv>.weight`` / ``<conv>.bias`` replaced by ``<conv>.parc_h.*`` / ``<conv>.parc_w.*``.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedTargetError
from ._carry import CarryBuilder, CarryRecord
from ._fold import INITS, dotted_name, keeps_size, split_from_conv
from ._registry import BlockContext, ReplacementBlock
from .parc_split import ParCSplit

__all__ = ["ParCConvBlock", "conv_problem", "swap_conv"]


def _check_context(name: str, kernel_hw, init: str) -> None:
    if init not in INITS:
        raise ConfigError(f"{name}: init must be one of {INITS}, got {init!r}")
    if (
        not isinstance(kernel_hw, (tuple, list))
        or len(kernel_hw) != 2
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernel_hw)
    ):
        raise ConfigError(f"{name}: kernel_hw must be two positive ints (K_h, K_w), got {kernel_hw!r}")


def conv_problem(conv: nn.Module, what: str, *, dense: bool | None) -> str | None:
    """Why ``conv`` cannot become a ParCSplit (``None`` if it can); ``what`` names it (``its 3x3 conv 'conv2'``)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{what} is a {dotted_name(type(conv))}, not an nn.Conv2d"
    if tuple(conv.stride) != (1, 1):
        return (
            f"{what} has stride {tuple(conv.stride)}; ParC keeps the spatial size, so a strided (downsampling) "
            f"block cannot be replaced; select the stride-1 blocks (ParC never replaces a stage's first block)"
        )
    if tuple(conv.dilation) != (1, 1):
        return f"{what} is dilated (dilation={tuple(conv.dilation)}); only undilated convs can be replaced"
    c = conv.out_channels
    if conv.in_channels != c:
        return f"{what} maps {conv.in_channels} to {c} channels; ParC keeps the channel count"
    if dense is True and conv.groups != 1:
        return f"{what} is grouped (groups={conv.groups}); the dense ParC replacement needs groups=1"
    if dense is False and conv.groups != c:
        return f"{what} is not depthwise (groups={conv.groups}, {c} channels); expected groups={c}"
    if c % 2:
        return (
            f"{what} has {c} channels, an odd count; ParCSplit splits the channels into a height half "
            f"and a width half, so the count must be even"
        )
    if not keeps_size(conv):
        return f"{what} has padding {conv.padding} for kernel {tuple(conv.kernel_size)}: it changes the size"
    if conv.padding_mode != "zeros":
        return f"{what} pads with {conv.padding_mode!r}; only zero-padded convs are folded"
    return None


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


def swap_conv(source: nn.Module, path: str, ctx: BlockContext, *, dense: bool | None) -> tuple[nn.Module, CarryRecord]:
    """A deep copy of ``source`` with its conv at ``path`` (``""``: ``source`` is the conv) replaced by a ParCSplit.

    ``source`` is never mutated. Returns the copy (the ParCSplit itself when ``path`` is ``""``) and its carry
    record: every other parameter kept under its own name, the conv folded (``warm_start``: ``transformed``)
    or ``dropped`` (``reference``); the position embeddings (and the biases of a bias-free conv) are ``new``.
    Parameters of a conv subclass beyond weight / bias (timm's ``ScaledStdConv2d`` gain) are ``dropped``: the
    fold reads the raw kernel, not the kernel its own forward computes from them.
    """
    conv = source.get_submodule(path) if path else source
    grouped = 1 < conv.groups < conv.out_channels
    is_dense = conv.groups == 1 if dense is None else dense
    split = split_from_conv(
        _depthwise_twin(conv) if grouped else conv,
        tuple(ctx.kernel_hw),
        dense=is_dense,
        pe=ctx.pe,
        impl=ctx.impl,
        init=ctx.init,
    )
    split.train(conv.training)
    if path:
        twin = copy.deepcopy(source, memo={id(conv): conv})  # the conv itself is not copied: it is replaced
        twin.set_submodule(path, split)
    else:
        twin = split
    prefix = f"{path}." if path else ""
    builder = CarryBuilder()
    for name, _ in source.named_parameters():
        if path and not name.startswith(prefix):
            builder.kept.append((name, name))  # deep-copied, bit-identical
    if ctx.init == "warm_start":
        _split_carry(builder, prefix, conv, split, grouped)
        # a conv subclass's own parameters (timm ScaledStdConv2d's weight-standardisation gain) have no ParC
        # counterpart: the fold reads the raw kernel, and they are declared dropped
        builder.drop(*(f"{prefix}{n}" for n, _ in conv.named_parameters() if n not in ("weight", "bias")))
    else:
        builder.drop(*(f"{prefix}{n}" for n, _ in conv.named_parameters()))
    return twin, builder.finish(twin, source)


def _split_carry(builder: CarryBuilder, prefix: str, conv: nn.Conv2d, split: ParCSplit, grouped: bool) -> None:
    kh, kw = conv.kernel_size
    d = split.half
    for axis, sl, other in (("h", f"0:{d}", "width"), ("w", f"{d}:{2 * d}", "height")):
        if split.dense:
            part = f"within-half block [{sl}, {sl}] of the kernel"
        elif grouped:
            part = f"channels [{sl}] of the kernel summed over each group's {conv.in_channels // conv.groups} inputs"
        else:
            part = f"channels [{sl}] of the kernel"
        builder.transform(
            f"{prefix}parc_{axis}.weight",
            (f"{prefix}weight",),
            f"folded {part} ({kh}x{kw}): summed over the {other} taps, tap offset a placed at index a mod "
            f"{split.kernel_hw[0 if axis == 'h' else 1]} along {'height' if axis == 'h' else 'width'}",
        )
        if conv.bias is not None:
            builder.transform(f"{prefix}parc_{axis}.bias", (f"{prefix}bias",), f"conv bias, channels [{sl}]")


class ParCConvBlock(ReplacementBlock):
    """Base of the ParC-ConvNet blocks: the source block, copied, with one conv swapped for a ParCSplit.

    Subclasses set ``replaces`` (dotted source class names; empty: any), ``dense`` and ``conv_role`` and define
    ``conv_path(module, ctx)`` (where the conv is; may raise :meth:`refusal`) and optionally
    ``source_problem(module, ctx)`` (a further reason to refuse, or ``None``). Not instantiated: ``from_module``
    returns an instance of the source's class.
    """

    dense: ClassVar[bool | None] = False
    conv_role: ClassVar[str] = "conv"

    @classmethod
    def conv_path(cls, module: nn.Module, ctx: BlockContext) -> str:
        raise NotImplementedError(f"{cls.__qualname__} must define conv_path(module, ctx)")

    @classmethod
    def source_problem(cls, module: nn.Module, ctx: BlockContext) -> str | None:
        return None

    @classmethod
    def refusal(cls, module: nn.Module, reason: str) -> UnsupportedTargetError:
        """The error refusing ``module`` for ``reason``: ``<block>: cannot replace <class>: <reason>``."""
        name = cls.block_name or cls.__name__
        return UnsupportedTargetError(f"{name}: cannot replace {dotted_name(type(module))}: {reason}")

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Raise :class:`UnsupportedTargetError` if ``module`` can't be replaced (``ConfigError`` for a bad ``ctx``)."""
        cls.checked_path(module, ctx)

    @classmethod
    def from_module(cls, module: nn.Module, ctx: BlockContext) -> tuple[nn.Module, CarryRecord]:
        """A copy of ``module`` with its conv swapped (see :func:`swap_conv`), with ``ctx``'s kernel, PE, impl, init."""
        return swap_conv(module, cls.checked_path(module, ctx), ctx, dense=cls.dense)

    @classmethod
    def checked_path(cls, module: nn.Module, ctx: BlockContext) -> str:
        """The path of the conv to swap, after every check (raises what :meth:`check_source` raises)."""
        name = cls.block_name or cls.__name__
        _check_context(name, ctx.kernel_hw, ctx.init)
        src = dotted_name(type(module))
        if cls.replaces and not {dotted_name(c) for c in type(module).__mro__} & set(cls.replaces):
            raise UnsupportedTargetError(
                f"{name}: cannot replace a {src}; it replaces {', '.join(cls.replaces)} (parc_surgery.list_blocks())"
            )
        try:
            path = cls.conv_path(module, ctx)
            conv = module.get_submodule(path) if path else module
        except (AttributeError, IndexError, TypeError) as e:
            raise cls.refusal(module, f"its {cls.conv_role} was not found where expected ({e})") from None
        what = f"its {cls.conv_role} {path!r}" if path else "it"
        problem = conv_problem(conv, what, dense=cls.dense) or cls.source_problem(module, ctx)
        if problem:
            raise cls.refusal(module, problem)
        return path
