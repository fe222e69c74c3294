"""``parcnet``: the ParC-Net block that replaces one MobileViT block (ParC-Net, ECCV 2022), design notes §3.

ParC-Net-S is MobileViT-S with each MobileViT block's transformer swapped for ParC-MetaFormer blocks
(:mod:`parc_surgery.blocks.metaformer`) at 4/3 of the transformer width, and a few layout changes.
"""

from __future__ import annotations

import copy
import math

import torch
from timm.layers import ConvNormAct, make_divisible
from timm.models.mobilevit import MobileVitBlock
from torch import nn

from ..carry import CarryBuilder, CarryRecord
from ..errors import UnsupportedTargetError
from ..helpers import as_kernel_hw
from ..ops.functional import portable_ops_only
from ._registry import BlockContext, ReplacementBlock, register_block
from .metaformer import ParCMetaFormerBlock, init_conv_fan_out

__all__ = ["ParCNetBlock"]

DEFAULT_WIDTH_MULT = 4 / 3  # ParC-Net-S global widths relative to MobileViT-S's transformer widths


@register_block("parcnet")
class ParCNetBlock(ReplacementBlock):
    """ParC-Net block: local convs, ParC-MetaFormer blocks, projection back and fusion with the input.

    For input channels ``c_in``, output channels ``c`` and global width ``D``::

        conv_kxk:    kxk conv c_in -> D, groups gcd(D, c_in), BN, SiLU
        conv_1x1:    1x1 conv D -> D (no bias, no norm, no act)
        blocks:      n ParC-MetaFormer blocks of width D (PE only in the first), then norm = BatchNorm(D)
        conv_proj:   1x1 conv D -> c, groups gcd(D, c), BN, SiLU
        conv_fusion: kxk conv (c + c_in) -> c, BN, SiLU on cat(global, input)   (None: output = conv_proj)

    Unlike MobileViT it works on the full-resolution map (no unfolding into patches) and fuses
    ``cat(global, input)`` where MobileViT fuses ``cat(input, global)``.

    Built from a timm ``MobileVitBlock`` by :meth:`from_module` (``D = make_divisible(width_mult * d, 8)``
    for transformer width ``d``; ``width_mult`` defaults to 4/3, ParC-Net-S; 1.0 keeps MobileViT's
    widths). MobileViT blocks built with ``no_fusion=True`` are supported: the replacement has no
    fusion conv either.
    """

    replaces = (
        "timm.models.mobilevit.MobileVitBlock",
        "transformers.models.mobilevit.modeling_mobilevit.MobileViTLayer",
    )

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        dim: int,
        *,
        depth: int,
        kernel_hw: tuple[int, int] | int,
        pe: bool = True,
        kernel_size: int = 3,
        fusion: bool = True,
        ffn_ratio: float = 2,
        drop: float = 0.1,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        kernel_hw = as_kernel_hw(kernel_hw, type(self).__name__)
        cna = {"norm_layer": nn.BatchNorm2d, "act_layer": nn.SiLU, **dd}
        self.conv_kxk = ConvNormAct(in_chs, dim, kernel_size, groups=math.gcd(dim, in_chs), **cna)
        self.conv_1x1 = nn.Conv2d(dim, dim, 1, bias=False, **dd)
        self.blocks = nn.Sequential(
            *[
                ParCMetaFormerBlock(dim, kernel_hw, pe=pe and i == 0, ffn_ratio=ffn_ratio, drop=drop, impl=impl, **dd)
                for i in range(depth)
            ]
        )
        self.norm = nn.BatchNorm2d(dim, **dd)
        self.conv_proj = ConvNormAct(dim, out_chs, 1, groups=math.gcd(dim, out_chs), **cna)
        self.conv_fusion = ConvNormAct(in_chs + out_chs, out_chs, kernel_size, **cna) if fusion else None
        for m in (self.conv_kxk, self.conv_1x1, self.conv_proj, self.conv_fusion):
            if m is not None:
                init_conv_fan_out(m)
        self.downsampling_layer: nn.Module | None = None  # a transformers MobileViTLayer's strided first block

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Accept a MobileViT (v1) block (timm ``MobileVitBlock``, ``transformers`` ``MobileViTLayer``) with a
        stride-1 local conv and a transformer of >= 1 blocks."""
        src = _MobileViTParts.of(module)
        if src is None:
            raise UnsupportedTargetError(
                f"parcnet replaces MobileViT (v1) blocks (timm MobileVitBlock, transformers MobileViTLayer), not "
                f"{type(module).__name__}; select the model's MobileViT blocks (e.g. mobilevit_s 'stages.2.1', "
                f"'stages.3.1', 'stages.4.1')"
            )
        if tuple(src.kxk.stride) != (1, 1):
            raise UnsupportedTargetError(
                f"parcnet: MobileViT block with a strided local conv (stride {tuple(src.kxk.stride)}) is not supported"
            )
        if src.depth < 1:
            raise UnsupportedTargetError("parcnet: the MobileViT block has an empty transformer (depth 0)")
        d = src.c1x1.out_channels
        dim = _global_width(d, ctx)
        if dim % 2:
            raise UnsupportedTargetError(
                f"parcnet: global width {dim} (transformer width {d} x width_mult {_width_mult(ctx):g}) is odd; "
                f"the ParC-MetaFormer blocks split it into two halves: choose a width_mult giving an even width"
            )
        if dim < 16:
            raise UnsupportedTargetError(
                f"parcnet: global width {dim} (transformer width {d} x width_mult {_width_mult(ctx):g}) is too "
                f"small for the ParC-MetaFormer channel attention (needs >= 16); raise width_mult"
            )
        as_kernel_hw(_kernel(src, ctx), "parcnet (BlockContext.kernel_size)")

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, ctx: BlockContext) -> tuple[ParCNetBlock, CarryRecord]:
        """Build the ParC-Net block replacing ``module`` (never mutated) and carry what has a counterpart.

        Carried: the fusion conv with its input halves swapped (``transformed``: MobileViT fuses
        ``cat(input, global)``, ParC-Net ``cat(global, input)``), the fusion and projection BatchNorms
        (``kept``, with running statistics), and the local conv / its BN and the 1x1 conv when their
        shapes happen to match (only with unusual widths). Everything else (transformer, LayerNorm,
        the grouped local and projection convs) has no counterpart: ``dropped`` / ``new``. A
        ``transformers`` ``MobileViTLayer`` holds the stage's strided inverted residual too: it is kept, as
        ``downsampling_layer``, and runs first.

        ``ctx.init``: MobileViT has no convolution that could be folded into a ParC kernel, so
        ``warm_start`` and ``reference`` give the same result: the published initialisation for every
        new part (PE N(0, 1), ParC kernels U(-1/sqrt(K), 1/sqrt(K)), convs N(0, 2/fan_out), BN 1/0).
        """
        cls.check_source(module, ctx)
        src = _MobileViTParts.of(module)
        p = next(module.parameters())
        c_in = src.kxk.in_channels
        c_out = src.proj[0].out_channels
        d = src.c1x1.out_channels
        dim = _global_width(d, ctx)
        fusion = src.fusion is not None
        block = cls(
            c_in,
            c_out,
            dim,
            depth=src.depth,
            kernel_hw=_kernel(src, ctx),
            pe=ctx.pe,
            kernel_size=src.kxk.kernel_size[0],
            fusion=fusion,
            impl=ctx.impl,
            device=p.device,
            dtype=p.dtype,
        )
        block.train(module.training)
        carry = CarryBuilder()
        if src.down is not None:
            block.downsampling_layer = copy.deepcopy(src.down)
            carry.copy(block.downsampling_layer, "downsampling_layer.", src.down, "downsampling_layer.")
        pairs = ((block.conv_kxk.conv, block.conv_kxk.bn, src.kxk, src.kxk_bn, "conv_kxk"),
                 (block.conv_1x1, None, src.c1x1, None, "conv_1x1"))  # fmt: skip
        for conv, bn, old, old_bn, name in pairs:
            if _same_shapes(conv, old) and (bn is None) == (old_bn is None):
                carry.copy(conv, f"{name}.conv." if bn is not None else f"{name}.", old, src.names[old])
                if bn is not None:
                    carry.copy(bn, f"{name}.bn.", old_bn, src.names[old_bn])
        pconv, pbn = src.proj
        if _same_shapes(block.conv_proj.conv, pconv):
            carry.copy(block.conv_proj.conv, "conv_proj.conv.", pconv, src.names[pconv])
        carry.copy(block.conv_proj.bn, "conv_proj.bn.", pbn, src.names[pbn])
        if fusion:
            fconv, fbn = src.fusion
            w = fconv.weight
            block.conv_fusion.conv.weight.copy_(torch.cat([w[:, c_in:], w[:, :c_in]], dim=1))
            carry.transform(
                "conv_fusion.conv.weight",
                [src.names[fconv] + "weight"],
                f"input channel halves swapped: MobileViT fuses cat(input[{c_in}], global[{c_out}]), "
                f"ParC-Net fuses cat(global, input)",
            )
            carry.copy(block.conv_fusion.bn, "conv_fusion.bn.", fbn, src.names[fbn])
        # the whole MobileViT block is replaced by design: what has no counterpart is dropped (transformer, ...)
        return block, carry.finish(block, module, drop_unused=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsampling_layer is not None:
            x = self.downsampling_layer(x)
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        x = self.norm(self.blocks(x))
        x = self._project(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat([x, shortcut], dim=1))
        return x

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``conv_proj(x)``. In a ``torch.compile`` trace for inference (not an export) its grouped 1x1 conv,
        ``gcd(D, c)`` groups of ``D / groups`` inputs and one output each (ParC-Net-S: 2 inputs per output), runs as
        a multiply and a sum over each group's inputs, which inductor fuses with the BatchNorm and SiLU into one
        pass: ATen's convolution runs such a conv as one tiny GEMM per group (96-160 per block; measured 1 ms of
        compiled ParC-Net-S's 37 ms at batch 1, one thread). Same function, same parameters."""
        proj = self.conv_proj
        conv = proj.conv
        if (
            torch.compiler.is_compiling()
            and not torch.is_grad_enabled()  # inference only (autograd keeps the convolution's own backward)
            and not portable_ops_only()
            and type(proj) is ConvNormAct
            and getattr(proj, "aa", None) is None
            and type(conv) is nn.Conv2d
            and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == conv.out_channels > 1
            and conv.bias is None
        ):
            b, _, h, w = x.shape
            o, k = conv.out_channels, conv.in_channels // conv.groups
            return proj.bn((x.view(b, o, k, h, w) * conv.weight.view(1, o, k, 1, 1)).sum(2))
        return proj(x)


class _MobileViTParts:
    """The parts of a MobileViT (v1) block, whichever library built it, with their names inside it."""

    def __init__(self, module, down, kxk, kxk_bn, c1x1, depth, proj, fusion):
        self.down, self.kxk, self.kxk_bn, self.c1x1, self.depth, self.proj, self.fusion = (
            down, kxk, kxk_bn, c1x1, depth, proj, fusion,
        )  # fmt: skip
        self.names = {m: n + "." for n, m in module.named_modules() if n}

    @classmethod
    def of(cls, module: nn.Module) -> _MobileViTParts | None:
        if isinstance(module, MobileVitBlock):
            f = module.conv_fusion
            return cls(module, None, module.conv_kxk.conv, module.conv_kxk.bn, module.conv_1x1,
                       len(module.transformer), (module.conv_proj.conv, module.conv_proj.bn),
                       None if f is None else (f.conv, f.bn))  # fmt: skip
        if type(module).__name__ == "MobileViTLayer" and type(module).__module__.startswith("transformers."):

            def cna(m):
                return m.convolution, getattr(m, "normalization", None)

            kxk, kxk_bn = cna(module.conv_kxk)
            return cls(module, module.downsampling_layer, kxk, kxk_bn, module.conv_1x1.convolution,
                       len(module.transformer.layer), cna(module.conv_projection), cna(module.fusion))  # fmt: skip
        return None


def _kernel(src: _MobileViTParts, ctx: BlockContext) -> tuple[int, int]:
    """``kernel_size: auto`` is the feature size the ParC blocks see: after a strided downsampling layer, halved."""
    if ctx.kernel_size is not None or src.down is None:
        return ctx.kernel_hw
    out = ctx.source_out_shape
    if out is not None and len(out) == 4:
        return int(out[2]), int(out[3])
    return tuple(max(1, -(-k // 2)) for k in ctx.kernel_hw)


def _width_mult(ctx: BlockContext) -> float:
    return DEFAULT_WIDTH_MULT if ctx.width_mult is None else float(ctx.width_mult)


def _global_width(d: int, ctx: BlockContext) -> int:
    m = _width_mult(ctx)
    return d if m == 1.0 else make_divisible(m * d, 8)


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    pa = dict(a.named_parameters()) | dict(a.named_buffers())
    pb = dict(b.named_parameters()) | dict(b.named_buffers())
    return pa.keys() == pb.keys() and all(pa[k].shape == pb[k].shape for k in pa) and _same_conv(a, b)


def _same_conv(a: nn.Module, b: nn.Module) -> bool:
    """Convs compute the same kind of map only with equal groups (shape alone can coincide otherwise)."""
    return not isinstance(a, nn.Conv2d) or (a.groups, a.stride, a.padding) == (b.groups, b.stride, b.padding)
