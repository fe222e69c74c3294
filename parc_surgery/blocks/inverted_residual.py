"""ParC-MobileNetV2 block (ParC-Net, ECCV 2022, ParC-ConvNets): an inverted residual with a depthwise ParCSplit.

``parc_inverted_residual`` replaces timm's ``InvertedResidual`` (MobileNetV2 / EfficientNet MBConv)
and torchvision's MobileNetV2 ``InvertedResidual``: the depthwise conv (timm ``conv_dw``,
torchvision ``conv[-3][0]``) becomes a depthwise :class:`ParCSplit` (height ParC on the first half
of the channels ‖ width ParC on the second half) with bias, and PE per the rule. Everything else
(pointwise conv, ``bn1``, ``bn2`` after the depthwise conv, SE, ``conv_pwl``, ``bn3``, skip, drop
path) is kept: the result is a copy of the source block (its own class and forward).
ParC-MobileNetV2 replaces ``blocks.3.2``,
``3.3``, ``4.2`` (K = 14 at 224) and ``5.2`` (K = 7), with PE in the first ParC block of each stage.

Strided depthwise convs, anti-aliased or space-to-depth blocks and grouped (non-depthwise) convs
cannot be replaced (:class:`UnsupportedTargetError`).

Warm start vs reference init, measured: relative output error ``||block(x) - source(x)|| /
||source(x)||`` (timm ``mobilenetv2_100``, random init, BN statistics and affines randomised, eval,
batch 2, mean of 5 seeds; "smooth" input is an N(0, 1) 4x4 field bilinearly upsampled): ``blocks.4.2``
at 14x14, K = 14, PE: i.i.d. input 0.69 (warm start) vs 0.80 (reference), smooth 0.34 vs 0.83;
``blocks.3.2``: i.i.d. 0.73 vs 0.80, smooth 0.34 vs 0.81.
"""

from __future__ import annotations

from torch import nn

from ._fold import dotted_name
from ._registry import BlockContext, register_block
from .conv_swap import ParCConvBlock

__all__ = ["ParCInvertedResidual"]


@register_block("parc_inverted_residual")
class ParCInvertedResidual(ParCConvBlock):
    """Inverted residual with its depthwise conv replaced by a depthwise, biased :class:`ParCSplit`.

    ``from_module(source, ctx)`` returns a copy of ``source`` with its depthwise conv swapped
    (:class:`parc_surgery.blocks.conv_swap.ParCConvBlock`).
    """

    replaces = (
        "timm.models._efficientnet_blocks.InvertedResidual",
        "torchvision.models.mobilenetv2.InvertedResidual",
    )
    dense = False
    conv_role = "depthwise conv"

    @classmethod
    def conv_path(cls, module: nn.Module, ctx: BlockContext) -> str:
        if isinstance(getattr(module, "conv", None), nn.Sequential):  # torchvision: [pw], dw, pwl, bn
            return f"conv.{len(module.conv) - 3}.0"
        return "conv_dw"

    @classmethod
    def source_problem(cls, module: nn.Module, ctx: BlockContext) -> str | None:
        if getattr(module, "conv_s2d", None) is not None:
            return "it downsamples with a space-to-depth conv 'conv_s2d'; ParC keeps the spatial size"
        aa = getattr(module, "aa", None)
        if aa is not None and not isinstance(aa, nn.Identity):
            return (
                f"it downsamples through its anti-aliasing layer 'aa' ({dotted_name(type(aa))}); "
                f"ParC keeps the spatial size"
            )
        return None
