"""Shared machinery of the ParC-ConvNet blocks: warm-start folding and the conv swap.

**Warm start** (``init="warm_start"``, the default): the replaced conv's kernel is folded into the two
ParC kernels of a :class:`ParCSplit` so that the new block starts close to the old one on smooth
features. For the height ParC (first half of the channels) the 2-D kernel is summed over its width
taps; tap offset ``a`` (``-r..+r`` for a centred ``k x k`` kernel) is placed at stored index
``a mod K`` (the offset-0 ParC convention: ``y[i] = sum_k w[k] x[(i + k) mod N]``), zeros elsewhere,
and taps that collide when ``K < k`` are summed. The width ParC (second half) likewise sums over the
height taps. Dense (ResNet) kernels keep only the within-half blocks ``W[:d, :d]`` / ``W[d:, d:]``:
the halves of a ParCSplit never mix. The conv bias (if any) is split over the two ParC biases (else
zero) and the position embeddings start at zero. The fold is exact for features constant along the
summed axis and, at the base size, away from the borders (circular instead of zero padding).
``init="reference"`` keeps the published initialisation of :class:`parc_surgery.ops.ParC`.

**Conv swap** (:class:`ParCConvBlock`): a block is a deep copy of the source block (same submodules,
parameters, buffers and attributes, under the same names) with one conv swapped for a ParCSplit;
its ``forward`` *is* the source class's own ``forward``, so every behaviour of the source (drop
path, SE, layer scale, shortcut, activations) is kept exactly. Hooks registered on the source block
itself are not carried over.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedTargetError
from ._carry import CarryBuilder, CarryRecord
from ._registry import ReplacementBlock
from .parc_split import ParCSplit

__all__ = ["INITS", "ParCConvBlock", "conv_origin", "dotted_name", "fold_conv_weight", "fold_taps", "split_from_conv"]

INITS = ("warm_start", "reference")

# nn.Module's own bookkeeping (hook dicts, ...): not adopted from the source, except these.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_ADOPTED_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"})


def dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_dynamic_same(conv: nn.Module) -> bool:
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    return isinstance(conv, (Conv2dSame, Conv2dSameExport))


def conv_origin(conv: nn.Conv2d) -> tuple[int, int]:
    """Per axis, the kernel tap index that lands on the output pixel's own position (= the left padding)."""
    if _is_dynamic_same(conv) or conv.padding == "same":
        return tuple((k - 1) // 2 for k in conv.kernel_size)  # stride 1: total padding k-1, left half
    if conv.padding == "valid":
        return (0, 0)
    return tuple(conv.padding)


def _keeps_size(conv: nn.Conv2d) -> bool:
    if _is_dynamic_same(conv) or conv.padding == "same":
        return True
    if conv.padding == "valid":
        return tuple(conv.kernel_size) == (1, 1)
    return all(2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size))


def fold_taps(w: torch.Tensor, length: int, origin: int) -> torch.Tensor:
    """Taps along the last dim of ``w`` (tap ``j`` at offset ``j - origin``) placed at index ``offset mod length``.

    Taps landing on the same index (``length`` shorter than the kernel) are summed; other entries are zero.
    """
    out = w.new_zeros(*w.shape[:-1], length)
    for j in range(w.shape[-1]):
        out[..., (j - origin) % length] += w[..., j]
    return out


def fold_conv_weight(weight: torch.Tensor, length: int, axis: str, origin: tuple[int, int]) -> torch.Tensor:
    """A 2-D conv weight ``(O, I, kh, kw)`` folded into a ParC kernel of ``length`` along ``axis``.

    ``height``: summed over the width taps, returns ``(O, I, length, 1)``; ``width``: summed over the
    height taps, returns ``(O, I, 1, length)``.
    """
    if axis == "height":
        return fold_taps(weight.sum(dim=3), length, origin[0]).unsqueeze(3)
    return fold_taps(weight.sum(dim=2), length, origin[1]).unsqueeze(2)


@torch.no_grad()
def split_from_conv(
    conv: nn.Conv2d, kernel_hw: tuple[int, int], *, dense: bool, pe: bool, impl: str, init: str
) -> ParCSplit:
    """A biased :class:`ParCSplit` replacing ``conv`` (same device and dtype), initialised per ``init``."""
    w = conv.weight
    split = ParCSplit(
        conv.out_channels, kernel_hw, dense=dense, pe=pe, bias=True, impl=impl, device=w.device, dtype=w.dtype
    )
    if init == "reference":
        return split
    d = split.half
    origin = conv_origin(conv)
    halves = (w[:d, :d], w[d:, d:]) if dense else (w[:d], w[d:])
    for parc, w_half, b_slice in zip((split.parc_h, split.parc_w), halves, (slice(0, d), slice(d, None))):
        parc.weight.copy_(fold_conv_weight(w_half, parc.kernel_size, parc.axis, origin))
        if conv.bias is not None:
            parc.bias.copy_(conv.bias[b_slice])
        else:
            parc.bias.zero_()
        if parc.pe is not None:
            parc.pe.zero_()
    return split


def _split_carry(builder: CarryBuilder, path: str, conv: nn.Conv2d, split: ParCSplit) -> None:
    kh, kw = conv.kernel_size
    d = split.half
    for parc, sl, other in ((split.parc_h, f"0:{d}", "width"), (split.parc_w, f"{d}:{2 * d}", "height")):
        part = f"within-half block [{sl}, {sl}]" if split.dense else f"channels [{sl}]"
        builder.transform(
            f"{path}.{'parc_h' if parc.axis == 'height' else 'parc_w'}.weight",
            (f"{path}.weight",),
            f"folded {part} of the {kh}x{kw} kernel: summed over the {other} taps, tap offset a placed at "
            f"index a mod {parc.kernel_size} along {parc.axis}",
        )
        if conv.bias is not None:
            builder.transform(
                f"{path}.{'parc_h' if parc.axis == 'height' else 'parc_w'}.bias",
                (f"{path}.bias",),
                f"conv bias, channels [{sl}]",
            )


class ParCConvBlock(ReplacementBlock):
    """Base of the ParC-ConvNet blocks: a source block whose spatial conv is replaced by a :class:`ParCSplit`.

    Subclasses set ``replaces`` (dotted source class names), ``dense`` and ``conv_role`` and define
    ``conv_path(module)`` (where the conv is) and optionally ``source_problem(module)`` (a reason the
    source cannot be replaced beyond the conv checks, or ``None``).

    Built from a source module: ``Block(source, kernel_hw=(K_h, K_w), pe=True, impl="auto",
    init="warm_start")``; ``source`` is deep-copied, never mutated. The state dict has the source's
    names, with ``<conv>.weight`` / ``<conv>.bias`` replaced by ``<conv>.parc_h.*`` / ``<conv>.parc_w.*``.
    """

    replaces: tuple[str, ...] = ()
    dense: bool = False
    conv_role: str = "conv"

    def __init__(
        self,
        source: nn.Module,
        *,
        kernel_hw: tuple[int, int],
        pe: bool = True,
        impl: str = "auto",
        init: str = "warm_start",
    ):
        super().__init__()
        self._check(source, kernel_hw, init)
        path = self.conv_path(source)
        twin = copy.deepcopy(source)
        split = split_from_conv(
            twin.get_submodule(path), tuple(kernel_hw), dense=self.dense, pe=pe, impl=impl, init=init
        )
        twin.set_submodule(path, split)
        for key, value in twin.__dict__.items():
            if key in _ADOPTED_INTERNALS or key not in _MODULE_INTERNALS:
                self.__dict__[key] = value
        self.source_type = dotted_name(type(source))
        self.parc_path = path
        self._source_forward = type(source).forward  # a plain function, called with this block as self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._source_forward(self, x)

    # --- what a subclass defines -------------------------------------------------------------------
    @classmethod
    def conv_path(cls, module: nn.Module) -> str:
        raise NotImplementedError

    @classmethod
    def source_problem(cls, module: nn.Module) -> str | None:
        return None

    # --- the registry protocol ---------------------------------------------------------------------
    @classmethod
    def check_source(cls, module: nn.Module, ctx) -> None:
        """Raise :class:`UnsupportedTargetError` if ``module`` can't be replaced (``ConfigError`` for a bad ``ctx``)."""
        cls._check(module, ctx.kernel_hw, ctx.init)

    @classmethod
    def from_module(cls, module: nn.Module, ctx) -> tuple[ParCConvBlock, CarryRecord]:
        """Build the block from ``module`` with ``ctx.kernel_hw``, ``ctx.pe``, ``ctx.impl``, ``ctx.init``."""
        block = cls(module, kernel_hw=ctx.kernel_hw, pe=ctx.pe, impl=ctx.impl, init=ctx.init)
        path = block.parc_path
        builder = CarryBuilder()
        for name, _ in module.named_parameters():
            if not name.startswith(path + "."):
                builder.kept.append((name, name))  # deep-copied, bit-identical
        if ctx.init == "warm_start":
            _split_carry(builder, path, module.get_submodule(path), block.get_submodule(path))
        return block, builder.finish(block, module)

    @classmethod
    def _check(cls, module: nn.Module, kernel_hw, init: str) -> None:
        name = cls.block_name or cls.__name__
        if init not in INITS:
            raise ConfigError(f"{name}: init must be one of {INITS}, got {init!r}")
        if (
            not isinstance(kernel_hw, (tuple, list))
            or len(kernel_hw) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernel_hw)
        ):
            raise ConfigError(f"{name}: kernel_hw must be two positive ints (K_h, K_w), got {kernel_hw!r}")
        src = dotted_name(type(module))
        if not {dotted_name(c) for c in type(module).__mro__} & set(cls.replaces):
            raise UnsupportedTargetError(
                f"{name}: cannot replace a {src}; it replaces {', '.join(cls.replaces)} (parc_surgery.list_blocks())"
            )

        def refuse(reason: str) -> UnsupportedTargetError:
            return UnsupportedTargetError(f"{name}: cannot replace {src}: {reason}")

        try:
            path = cls.conv_path(module)
            conv = module.get_submodule(path)
        except (AttributeError, IndexError, TypeError) as e:
            raise refuse(f"its {cls.conv_role} was not found where expected ({e})") from None
        what = f"its {cls.conv_role} {path!r}"
        if not isinstance(conv, nn.Conv2d):
            raise refuse(f"{what} is a {dotted_name(type(conv))}, not an nn.Conv2d")
        if tuple(conv.stride) != (1, 1):
            raise refuse(
                f"{what} has stride {tuple(conv.stride)}; ParC keeps the spatial size, so a strided (downsampling) "
                f"block cannot be replaced; select the stride-1 blocks (ParC never replaces a stage's first block)"
            )
        if tuple(conv.dilation) != (1, 1):
            raise refuse(f"{what} is dilated (dilation={tuple(conv.dilation)}); only undilated convs can be replaced")
        c = conv.out_channels
        if conv.in_channels != c:
            raise refuse(f"{what} maps {conv.in_channels} to {c} channels; ParC keeps the channel count")
        if cls.dense and conv.groups != 1:
            raise refuse(f"{what} is grouped (groups={conv.groups}); the dense ParC replacement needs groups=1")
        if not cls.dense and conv.groups != c:
            raise refuse(f"{what} is not depthwise (groups={conv.groups}, {c} channels); expected groups={c}")
        if c % 2:
            raise refuse(
                f"{what} has {c} channels, an odd count; ParCSplit splits the channels into a height half "
                f"and a width half, so the count must be even"
            )
        if not _keeps_size(conv):
            raise refuse(f"{what} has padding {conv.padding} for kernel {tuple(conv.kernel_size)}: it changes the size")
        problem = cls.source_problem(module)
        if problem:
            raise refuse(problem)
