"""Register your own replacement block, for your own module type, and convert a model with it.

A user's network has its own block, ``DepthwiseMixer`` (a depthwise k x k conv, BatchNorm, GELU and a
1x1 conv inside a residual). This example

1. allows rules to name that class: ``parc_surgery.register_type(DepthwiseMixer)`` (rules can only
   name classes from torch / timm / torchvision / parc_surgery and registered ones);
2. registers a replacement, ``my_parc_mixer``, with ``@parc_surgery.register_block``: the depthwise conv
   becomes a height ParC on the first half of the channels and a width ParC on the second half (global
   receptive field), the rest is carried over. A registered block provides
   ``replaces`` (dotted class names it is built from), ``check_source(module, ctx)`` (refuse before
   anything is built) and ``from_module(module, ctx) -> (block, CarryRecord)`` (build, and say what
   happened to every old parameter: kept / transformed / new / dropped);
3. converts the user's ``ToyNet`` with a rule (YAML text) naming both, and prints the report.

Run: ``python examples/custom_block.py``. Importing the file twice (tests, notebooks) is safe: the
block is re-registered, not registered twice; :func:`unregister` removes both registrations.
"""

from __future__ import annotations

import torch
from torch import nn

import parc_surgery
from parc_surgery.blocks import BlockContext, CarryBuilder, CarryRecord, unregister_block
from parc_surgery.errors import UnsupportedTargetError
from parc_surgery.types import unregister_type

BLOCK_NAME = "my_parc_mixer"


# ----------------------------------------------------------------------------------------------------------------------
# The user's own model


@parc_surgery.register_type  # rules may now say `type: DepthwiseMixer`
class DepthwiseMixer(nn.Module):
    """x + pw(GELU(BN(dw(x)))) with a depthwise ``kernel_size`` x ``kernel_size`` conv."""

    def __init__(self, dim: int, kernel_size: int = 5):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw(self.act(self.norm(self.dw(x))))


class ToyNet(nn.Module):
    """Stem (stride 4), two stages of DepthwiseMixers with a strided conv between them, pooled linear head."""

    def __init__(self, num_classes: int = 10, dims: tuple[int, int] = (32, 64), depths: tuple[int, int] = (2, 3)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), nn.BatchNorm2d(dims[0]))
        self.stage1 = nn.Sequential(*[DepthwiseMixer(dims[0]) for _ in range(depths[0])])
        self.down = nn.Conv2d(dims[0], dims[1], 2, stride=2)
        self.stage2 = nn.Sequential(*[DepthwiseMixer(dims[1]) for _ in range(depths[1])])
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


# ----------------------------------------------------------------------------------------------------------------------
# The replacement block


def fold(taps: torch.Tensor, length: int) -> torch.Tensor:
    """Centred taps ``(C, 1, k)`` as a ParC kernel of ``length``: tap offset ``a`` at index ``a mod length``.

    ParC is a circular cross-correlation at offset 0 (``y[i] = sum_k w[k] x[(i + k) mod N]``), so a tap
    looking ``a`` pixels ahead goes to index ``a`` and one looking back to ``length - |a|``.
    """
    out = taps.new_zeros(*taps.shape[:-1], length)
    r = taps.shape[-1] // 2
    for j in range(taps.shape[-1]):
        out[..., (j - r) % length] += taps[..., j]
    return out


unregister_block(BLOCK_NAME)  # importing this file again replaces the earlier registration instead of failing


@parc_surgery.register_block(BLOCK_NAME)
class ParCMixer(nn.Module):
    """DepthwiseMixer with its depthwise conv replaced by height ParC (first half) ‖ width ParC (second half)."""

    replaces = (f"{DepthwiseMixer.__module__}.{DepthwiseMixer.__qualname__}",)

    def __init__(self, dim: int, kernel_hw: tuple[int, int], *, pe: bool = True, impl: str = "auto"):
        super().__init__()
        self.half = dim // 2
        self.parc_h = parc_surgery.ParC(self.half, kernel_hw[0], "height", pe=pe, impl=impl)
        self.parc_w = parc_surgery.ParC(dim - self.half, kernel_hw[1], "width", pe=pe, impl=impl)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.parc_h(x[:, : self.half]), self.parc_w(x[:, self.half :])], dim=1)
        return x + self.pw(self.act(self.norm(y)))

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Refuse (before anything is built) what this block cannot replace, saying why."""
        if not isinstance(module, DepthwiseMixer):
            raise UnsupportedTargetError(f"{BLOCK_NAME}: replaces DepthwiseMixer, not {type(module).__name__}")
        if module.dw.stride != (1, 1) or module.dw.groups != module.dw.in_channels:
            raise UnsupportedTargetError(f"{BLOCK_NAME}: the DepthwiseMixer's conv must be depthwise with stride 1")

    @classmethod
    def from_module(cls, module: DepthwiseMixer, ctx: BlockContext) -> tuple[ParCMixer, CarryRecord]:
        """Build from ``module``: norm and pw copied bit-identical, the k x k kernel folded into the ParCs."""
        block = cls(module.dw.in_channels, ctx.kernel_hw, pe=ctx.pe, impl=ctx.impl).to(module.dw.weight)
        carry = CarryBuilder()
        carry.copy(block.norm, "norm.", module.norm, "norm.")  # records each parameter as kept
        carry.copy(block.pw, "pw.", module.pw, "pw.")
        if ctx.init == "warm_start":  # else keep ParC's published (reference) initialisation
            d, dw = block.half, module.dw
            with torch.no_grad():
                for name, parc, sl, summed in (
                    ("parc_h", block.parc_h, slice(0, d), 3),
                    ("parc_w", block.parc_w, slice(d, None), 2),
                ):
                    parc.weight.copy_(fold(dw.weight[sl].sum(summed), parc.kernel_size).reshape(parc.weight.shape))
                    parc.bias.copy_(dw.bias[sl])
                    if parc.pe is not None:
                        parc.pe.zero_()
                    axis = "width" if summed == 3 else "height"
                    carry.transform(f"{name}.weight", ("dw.weight",), f"k x k kernel summed over the {axis} taps")
                    carry.transform(f"{name}.bias", ("dw.bias",), "conv bias, this half's channels")
        return block, carry.finish(block, module)  # finish() lists the new (pe) parameters; drops are declared


def unregister() -> None:
    """Remove this example's block and type registrations (tests call it to leave the registries clean)."""
    unregister_block(BLOCK_NAME)
    unregister_type(DepthwiseMixer)


# ----------------------------------------------------------------------------------------------------------------------
# A rule naming both (YAML text; a dict or a file works the same)

RULE = f"""
version: 1
name: toynet_parc
description: "ToyNet: the deep DepthwiseMixers -> {BLOCK_NAME}"
input_size: 64
targets:
  - block: {BLOCK_NAME}
    select:
      type: DepthwiseMixer
      name: "stage2.*"
    exclude:
      name: stage2.0
    options:
      pe: first
"""


def main() -> parc_surgery.Conversion:
    torch.manual_seed(0)
    model = ToyNet().eval()
    rule = parc_surgery.rule.parse_rule(RULE, source="custom_block.RULE")
    conv = parc_surgery.convert(model, rule, seed=0)
    print(conv.report.to_markdown())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before, after = model(x), conv.model.eval()(x)
    print(
        f"\nreplaced: {', '.join(t.name for t in conv.plan.targets)}; "
        f"warm start: max |converted - original| = {(after - before).abs().max():.3g} "
        f"(outputs {before.abs().max():.3g})"
    )
    return conv


if __name__ == "__main__":
    main()
