"""ParC-ResNet blocks (ParC-Net, ECCV 2022, ParC-ConvNets): ResNet blocks whose 3x3 conv is a dense ParCSplit.

``parc_bottleneck`` replaces timm's / torchvision's ``Bottleneck``: ``conv2`` (the 3x3) becomes a
:class:`ParCSplit` with *dense* (channel-mixing within each half) ParC, bias, and PE per the rule;
``conv1/bn1/act1, bn2, drop_block/act2/aa, conv3/bn3, se, act3, downsample, drop_path`` are kept:
the result is a copy of the source block (its own class and forward, :mod:`.conv_swap`).
ParC-ResNet50 replaces ``layer3.3-5`` (K = 14 at 224)
and ``layer4.2`` (K = 7).

``parc_basic_block`` applies the same rule to ``BasicBlock`` (ResNet18/34): its second 3x3 conv
(``conv2``, never strided) becomes the dense ParCSplit; blocks that downsample (strided ``conv1`` or
an anti-aliasing ``aa`` layer) are refused, like all first blocks of a stage.

Strided, grouped (ResNeXt) and dilated ``conv2`` cannot be replaced (:class:`UnsupportedTargetError`).

Warm start vs reference init, measured: relative output error ``||block(x) - source(x)|| /
||source(x)||`` (timm ``resnet50``, random init, BN statistics and affines randomised, eval, batch 2,
mean of 5 seeds; "smooth" input is an N(0, 1) 4x4 field bilinearly upsampled to the feature size):
``layer3.3`` at 14x14, K = 14: i.i.d. input 0.65 (warm start) vs 0.72 (reference), smooth 0.55 vs 0.72;
``layer4.2`` at 7x7, K = 7: i.i.d. 0.65 vs 0.70, smooth 0.58 vs 0.69. The warm start cannot get close
for a dense conv: the cross-half blocks (half of the 3x3 weights) have no counterpart in a ParCSplit.
"""

from __future__ import annotations

from torch import nn

from ._registry import BlockContext, register_block
from .conv_swap import ParCConvBlock

__all__ = ["ParCBasicBlock", "ParCBottleneck"]


def _downsamples_through_aa(module: nn.Module) -> str | None:
    aa = getattr(module, "aa", None)
    if aa is not None and not isinstance(aa, nn.Identity):
        return (
            f"it downsamples through its anti-aliasing layer 'aa' ({type(aa).__name__}); ParC keeps the spatial "
            f"size, so a downsampling block cannot be replaced"
        )
    return None


@register_block("parc_bottleneck")
class ParCBottleneck(ParCConvBlock):
    """ResNet bottleneck with its 3x3 ``conv2`` replaced by a dense, biased :class:`ParCSplit`.

    ``from_module(source, ctx)`` returns a copy of ``source`` with ``conv2`` swapped
    (:class:`parc_surgery.blocks.conv_swap.ParCConvBlock`).
    """

    replaces = ("timm.models.resnet.Bottleneck", "torchvision.models.resnet.Bottleneck")
    dense = True
    conv_role = "3x3 conv"

    @classmethod
    def conv_path(cls, module: nn.Module, ctx: BlockContext) -> str:
        return "conv2"

    @classmethod
    def source_problem(cls, module: nn.Module, ctx: BlockContext) -> str | None:
        return _downsamples_through_aa(module)


@register_block("parc_basic_block")
class ParCBasicBlock(ParCConvBlock):
    """ResNet basic block with its second 3x3 conv (``conv2``) replaced by a dense, biased :class:`ParCSplit`.

    Only stride-1 blocks: the ParC kernels are sized from the block's input, which is ``conv2``'s input
    only when ``conv1`` does not downsample.
    """

    replaces = ("timm.models.resnet.BasicBlock", "torchvision.models.resnet.BasicBlock")
    dense = True
    conv_role = "second 3x3 conv"

    @classmethod
    def conv_path(cls, module: nn.Module, ctx: BlockContext) -> str:
        return "conv2"

    @classmethod
    def source_problem(cls, module: nn.Module, ctx: BlockContext) -> str | None:
        conv1 = getattr(module, "conv1", None)
        stride = tuple(getattr(conv1, "stride", (1, 1)))
        if stride != (1, 1):
            return (
                f"its first conv 'conv1' has stride {stride}; ParC keeps the spatial size, so a strided "
                f"(downsampling) block cannot be replaced; select the stride-1 blocks of the stage"
            )
        return _downsamples_through_aa(module)
