"""``parc_conv``: the spatial conv of *any* residual conv block (or a selected conv itself) becomes ParC halves.

For conv blocks without a dedicated ParC block (user ConvNets, torchvision's MobileNetV2 / EfficientNet /
RegNet blocks, ``transformers``' ResNet / ConvNeXt / MobileNetV2 layers, timm's ByobNet / RegNet / CSP /
DLA / ... blocks), :class:`ParCConv` finds the conv to replace and swaps it for a
:class:`~parc_surgery.blocks.parc_split.ParCSplit` inside a copy of the block, exactly like the dedicated
ParC-ConvNet blocks do (:mod:`parc_surgery.blocks.conv_swap`: the block's own class and forward run
unchanged). Which conv:

* a selected ``nn.Conv2d`` itself (``type: Conv2d`` with ``stages:`` selects the convs inside the stage
  blocks): it becomes the ParCSplit;
* a block whose graph shows a residual structure (:mod:`parc_surgery.residual`: its input, or a projection of
  it, added to a path holding spatial convs): the last spatial conv on that path; the engine reads the
  block's fx graph once and passes it as ``ctx.residual``;
* otherwise a block's only spatial (k x k, k > 1) ``nn.Conv2d``.

A dense conv (``groups=1``) becomes a dense ParCSplit (ParC-ResNet's choice), a depthwise conv a depthwise one
(ParC-MobileNetV2 / ParC-ConvNeXt's), a grouped conv (``1 < groups < C``, ResNeXt / RegNet) a depthwise one:
a dense one would cost ``C^2 K / 2`` parameters, far more than the grouped conv it replaces; its warm start
folds the kernel summed over each group's input channels (exact for inputs constant across a group).

It is *lenient* (``skip_unsupported``): a generic rule selects it for whole stages, and modules it cannot
replace (no spatial conv, several without a residual structure, a forward that does not trace when that is
needed to tell, strided, dilated, channel-changing, odd width, a block that changes the feature size) are left
out with the reason instead of failing the conversion.
"""

from __future__ import annotations

from torch import nn

from ..residual import find_residual, spatial_convs
from ._registry import BlockContext, register_block
from .conv_swap import ParCConvBlock
from .parc_split import ParCSplit

__all__ = ["ParCConv", "find_spatial_conv"]


def find_spatial_conv(module: nn.Module, ctx: BlockContext | None = None) -> str:
    """The qualified name inside ``module`` of the conv :class:`ParCConv` replaces (``""``: ``module`` itself).

    Raises :class:`~parc_surgery.errors.UnsupportedTargetError` saying why when there is none to choose.
    """
    if isinstance(module, nn.Conv2d):
        if max(module.kernel_size) == 1:
            raise ParCConv.refusal(module, "it is a 1x1 conv (channel mixing only); ParC replaces spatial convs")
        return ""
    if any(isinstance(m, ParCSplit) for m in module.modules()):
        raise ParCConv.refusal(module, "it already holds a ParCSplit")
    convs = spatial_convs(module)
    if not convs:
        raise ParCConv.refusal(module, "it has no spatial nn.Conv2d (kernel > 1x1) to replace")
    form = ctx.residual if ctx is not None and ctx.residual is not None else None
    if form is None and len(convs) > 1:
        form = find_residual(module)
    if form is not None and form.conv is not None:
        return form.conv
    if len(convs) == 1:
        return convs[0][0]
    names = ", ".join(n for n, _ in convs[:4])
    raise ParCConv.refusal(
        module,
        f"it has {len(convs)} spatial convs ({names}) and {form.problem if form else 'no residual structure'}; "
        "the conv to replace is ambiguous",
    )


@register_block("parc_conv")
class ParCConv(ParCConvBlock):
    """Any residual conv block (or a conv) with its spatial conv replaced by a biased :class:`ParCSplit`.

    ``from_module(source, ctx)`` returns a copy of ``source`` (its own class) with the conv swapped, or the
    ParCSplit itself when ``source`` is the conv; ``source`` is never mutated. See the module docstring.
    """

    replaces = ()  # any block: selected by stage / name / type in a rule
    skip_unsupported = True
    uses_residual = True
    dense = None  # follow the conv: dense for groups=1, else depthwise
    conv_role = "spatial conv"

    @classmethod
    def conv_path(cls, module: nn.Module, ctx: BlockContext) -> str:
        return find_spatial_conv(module, ctx)

    @classmethod
    def source_problem(cls, module: nn.Module, ctx: BlockContext) -> str | None:
        a, b = ctx.source_in_shape, ctx.source_out_shape
        if a is not None and b is not None and (len(a) != 4 or len(b) != 4 or tuple(a[2:]) != tuple(b[2:])):
            return (
                f"it maps {tuple(a)} to {tuple(b)}; only (B, C, H, W) blocks that keep the spatial size can be "
                "replaced (ParC kernels are sized from the block's input)"
            )
        return None
