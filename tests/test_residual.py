"""Residual blocks found by structure (parc_surgery.residual): the conv a ParC replaces, or why there is none."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from corpus_convnets import Bottleneck, HelperBlock, InvertedResidual, ResBlock
from torch import nn

from parc_surgery.blocks import BlockContext, get_block
from parc_surgery.errors import UnsupportedTargetError
from parc_surgery.residual import find_residual

tv = torchvision.models


class _TwoUnits(nn.Module):
    """Two residual units in one block, each with a spatial conv: ambiguous."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = x + self.a(x)
        return y + self.b(y)


class _MixerThenMlp(nn.Module):
    """MetaFormer-style: a conv token mixer unit, then an MLP unit (no spatial conv): the first unit's conv."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.fc1 = nn.Conv2d(4, 8, 1)
        self.fc2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = x + self.dw(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Parallel(nn.Module):
    """x + a(x) + b(x): the second branch shapes the output outside the residual path found first."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 5, padding=2)

    def forward(self, x):
        return x + self.a(x) + self.b(x)


class _ParallelSum(nn.Module):
    """x.add_(a(x) + b(x)): in-place method add, parallel branches."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x.clone().add_(self.a(x) + self.b(x))


class _NoShortcut(nn.Module):
    """conv(x) + conv(x): two branches, neither is the input or a projection of it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x) + torch.ones(1)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # a branch on values: torch.fx cannot trace it
            return x + self.b(self.a(x))
        return x


FOUND = {
    # block -> (conv replaced, path convs, shortcut)
    "user basic (+)": (lambda: ResBlock(8, 8), "conv2", ("conv1", "conv2"), "identity"),
    "user basic, projection": (lambda: ResBlock(8, 16, 2), "conv2", ("conv1", "conv2"),
                               "projection through shortcut.0, shortcut.1"),
    "user bottleneck (+=)": (lambda: Bottleneck(16, 16), "conv2", ("conv2",), "identity"),
    "user inverted residual (torch.add)": (lambda: InvertedResidual(8, 8), "block.3", ("block.3",), "identity"),
    "user helper method": (lambda: HelperBlock(8, 8), "dw", ("dw",), "identity"),
    "metaformer units": (_MixerThenMlp, "dw", ("dw",), "identity"),
    "tv BasicBlock": (lambda: tv.resnet18().layer3[1], "conv2", ("conv1", "conv2"), "identity"),
    "tv MBConv": (lambda: tv.efficientnet_b0().features[6][1], "block.1.0", ("block.1.0",), "identity"),
    "tv ResBottleneckBlock": (lambda: tv.regnet_y_400mf().trunk_output.block3[1], "f.b.0", ("f.b.0",), "identity"),
    "timm ConvNeXtBlock (Identity shortcut module)": (
        lambda: timm.create_model("convnext_atto").stages[2].blocks[1], "conv_dw", ("conv_dw",), "identity"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FOUND))
def test_residual_conv_found(case):
    build, conv, path, shortcut = FOUND[case]
    form = find_residual(build())
    assert (form.conv, form.path, form.shortcut, form.problem) == (conv, path, shortcut, None)
    assert f"replaces {conv}" in form.describe()


REFUSED = {
    "not residual": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)),
                     "no residual add"),
    "no shortcut": (_NoShortcut, "no residual add"),
    "two units": (_TwoUnits, "2 residual adds with spatial convs"),
    "parallel branches": (_Parallel, r"spatial convs outside its residual path \(b\)"),
    "parallel convs, add_": (_ParallelSum, r"ends in 2 parallel spatial convs"),
    "does not trace": (_DataDependent, "does not trace with torch.fx"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_is_not_one_residual_conv_says_why(case):
    build, why = REFUSED[case]
    form = find_residual(build())
    assert form.conv is None
    assert re.search(why, form.problem), form.problem


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (_DataDependent, r"it has 2 spatial convs \(a, b\) and its forward does not trace with torch\.fx"),
        (_TwoUnits, r"it has 2 spatial convs \(a, b\) and 2 residual adds with spatial convs"),
    ],
)
def test_parc_conv_refuses_with_the_form_found(build, why):
    module = build()
    with pytest.raises(UnsupportedTargetError, match=why) as e:
        get_block("parc_conv").check_source(module, BlockContext((8, 8)))
    assert str(e.value).startswith(f"parc_conv: cannot replace {type(module).__module__}.")


def test_parc_conv_takes_a_selected_conv_itself_but_not_a_1x1():
    get_block("parc_conv").check_source(ResBlock(8, 8).conv1, BlockContext((8, 8)))
    with pytest.raises(UnsupportedTargetError, match="1x1 conv"):
        get_block("parc_conv").check_source(nn.Conv2d(8, 8, 1), BlockContext((8, 8)))
