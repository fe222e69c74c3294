"""ParC-ConvNeXt block (ParC-Net, ECCV 2022, ParC-ConvNets): a ConvNeXt block with a depthwise ParCSplit.

``parc_convnext`` replaces timm's ``ConvNeXtBlock`` and torchvision's ``CNBlock``: the 7x7
depthwise conv (timm ``conv_dw``, torchvision ``block[0]``) becomes a depthwise :class:`ParCSplit`
(height ParC on the first half of the channels ‖ width ParC on the second half) with bias and PE
per the rule; the conv bias is carried into the ParC biases. Norm, MLP, layer scale (``gamma`` /
``layer_scale``), shortcut and drop path are kept: the result is a copy of the source block (its own class and forward).
ParC-ConvNeXt replaces the last third of the last two stages (``stages.2.blocks.6-8`` with K = 14
at 224, ``stages.3.blocks.2`` with K = 7 for depths 3/3/9/3), PE in every replaced block.

Strided or channel-changing blocks (a ``shortcut`` downsample) cannot be replaced
(:class:`UnsupportedTargetError`).

Warm start vs reference init, measured: relative output error ``||block(x) - source(x)|| /
||source(x)||`` (ConvNeXt-XT = timm ``ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))``,
random init with the layer scale set to 1 so the residual branch shows, eval, batch 2, mean of 5
seeds; "smooth" input is an N(0, 1) 4x4 field bilinearly upsampled): ``stages.2.blocks.6`` at 14x14,
K = 14: i.i.d. input 0.104 (warm start) vs 0.113 (reference), smooth 0.096 vs 0.148;
``stages.3.blocks.2`` at 7x7, K = 7: i.i.d. 0.21 vs 0.23, smooth 0.24 vs 0.30. With the init layer
scale (1e-6) both are below 1e-6; relative to the residual branch ``source(x) - x`` (14x14): i.i.d.
1.30 vs 1.38, smooth 0.87 vs 1.38. On i.i.d. input a 1-D fold keeps only ~1/k of a random k x k
kernel's correlation; on smooth features it is close (exact for lines, see ``_fold``).
"""

from __future__ import annotations

from torch import nn

from ._registry import BlockContext, register_block
from .conv_swap import ParCConvBlock

__all__ = ["ParCConvNeXtBlock"]


@register_block("parc_convnext")
class ParCConvNeXtBlock(ParCConvBlock):
    """ConvNeXt block with its 7x7 depthwise conv replaced by a depthwise, biased :class:`ParCSplit`.

    ``from_module(source, ctx)`` returns a copy of ``source`` with its depthwise conv swapped
    (:class:`parc_surgery.blocks.conv_swap.ParCConvBlock`).
    """

    replaces = ("timm.models.convnext.ConvNeXtBlock", "torchvision.models.convnext.CNBlock")
    dense = False
    conv_role = "depthwise conv"

    @classmethod
    def conv_path(cls, module: nn.Module, ctx: BlockContext) -> str:
        if isinstance(getattr(module, "block", None), nn.Sequential):  # torchvision CNBlock
            return "block.0"
        return "conv_dw"

    @classmethod
    def source_problem(cls, module: nn.Module, ctx: BlockContext) -> str | None:
        shortcut = getattr(module, "shortcut", None)
        if shortcut is not None and not isinstance(shortcut, nn.Identity):
            return "its shortcut resamples (stride or channel change); only identity-shortcut blocks can be replaced"
        return None
