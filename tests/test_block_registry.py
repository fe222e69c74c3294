"""Every registered block, from ``list_blocks()``: built from a toy source, forward, backward, fx-traced == eager,
and a carry record that accounts for every parameter of the source. A new block gets all of this by adding
one entry to ``SOURCES`` (the test refuses a registered block without one).

The toy sources are the small sources the block tests already use (timm / torchvision blocks at small widths,
``tests/toy_models.TokenAttention``), on 8x8 maps or 16 tokens so the whole module runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torchvision
from timm.layers.attention import Attention
from timm.models.mobilevit import MobileVitBlock
from torch import nn
from toy_models import TokenAttention

from parc_surgery.blocks import BlockContext, get_block_spec, list_blocks
from parc_surgery.carry import CarryRecord
from parc_surgery.ops.parc import use_impl
from parc_surgery.probe import trace_model


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]  # the toy source
    in_shape: tuple[int, ...]  # the source's input
    ctx: dict = field(default_factory=dict)  # BlockContext fields besides feature_size and source shapes


SOURCES: dict[str, Case] = {
    "parc_basic_block": Case(lambda: timm.models.resnet.BasicBlock(16, 16), (2, 16, 8, 8)),
    "parc_bottleneck": Case(lambda: timm.models.resnet.Bottleneck(32, 8), (2, 32, 8, 8)),
    "parc_conv": Case(lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), (2, 8, 8, 8)),
    "parc_convnext": Case(lambda: timm.models.convnext.ConvNeXtBlock(16), (2, 16, 8, 8)),
    "parc_inverted_residual": Case(
        lambda: torchvision.models.mobilenetv2.InvertedResidual(16, 16, 1, 2), (2, 16, 8, 8)
    ),
    "parc_mixer": Case(lambda: TokenAttention(8), (2, 16, 8)),
    "parc_token_mixer": Case(lambda: Attention(16, num_heads=2), (2, 16, 16)),
    "parcnet": Case(
        lambda: MobileVitBlock(16, 16, transformer_dim=24, transformer_depth=1, patch_size=2, num_heads=2),
        (2, 16, 8, 8),
    ),
}


def test_every_registered_block_has_a_toy_source():
    assert set(SOURCES) == set(list_blocks())


def _build(name: str) -> tuple[nn.Module, nn.Module, CarryRecord, torch.Tensor]:
    case = SOURCES[name]
    torch.manual_seed(0)
    src = case.build().eval()
    x = torch.randn(case.in_shape)
    with torch.no_grad():
        y = src(x)
    hw = (4, 4) if len(case.in_shape) == 3 else tuple(case.in_shape[-2:])
    ctx = BlockContext(
        feature_size=hw,
        source_in_shape=tuple(x.shape),
        source_out_shape=tuple(y.shape),
        num_tokens=case.in_shape[1] if len(case.in_shape) == 3 else None,
        num_prefix_tokens=0 if len(case.in_shape) == 3 else None,
        **case.ctx,
    )
    spec = get_block_spec(name)
    spec.check_source(src, ctx)
    block, record = spec.from_module(src, ctx)
    return src, block, record, x


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_block_forward_backward(name):
    src, block, _, x = _build(name)
    block.train()
    y = block(x)
    assert y.shape == src(x).shape and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    params = dict(block.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_block_fx_trace_matches_eager(name):
    _, block, _, x = _build(name)
    block.eval()
    gm, why = trace_model(block)
    assert gm is not None, f"{name} does not trace: {why}"
    with use_impl(block, "spatial"), use_impl(gm, "spatial"):
        # with autograd on, eager takes each block's reference forward: the traced graph runs the same aten ops
        # in the same order (ParC on its spatial path, a depthwise conv), so the outputs are bit-identical
        torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)
        with torch.no_grad():
            # without grad, eager may take an inference fast path (blocks/_metaformer_eval.py: the same function
            # with BatchNorms folded and ParC steps fused, so a different float rounding): float32 tolerance
            y = block(x)
            torch.testing.assert_close(gm(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_block_carry_covers_every_source_parameter(name):
    src, block, record, _ = _build(name)
    accounted = {old for _, old in record.kept} | set(record.dropped)
    accounted |= {old for _, olds, _ in record.transformed for old in olds}
    src_params = {n for n, _ in src.named_parameters()}
    assert src_params - accounted == set(), f"{name}: source parameters with no carry entry"
    # and the record names only real tensors on both sides
    new_params = {n for n, _ in block.named_parameters()}
    assert {new for new, _ in record.kept} <= new_params | {n for n, _ in block.named_buffers()}
    assert set(record.new) <= new_params
