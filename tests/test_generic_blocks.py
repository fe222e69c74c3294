"""The generic fallbacks and the engine features behind them: parc_mixer, parc_conv, fall-through, lenient skips."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_models import (
    Attention2dToy,
    ChannelsLastAttention,
    GroupedStageNet,
    HybridNet,
    LatentPool,
    MaskArgNet,
    OddWidthNet,
    TokenAttention,
    ToyViT,
    TupleAttentionNet,
    _bottleneck,
)

import parc_surgery as ps
from parc_surgery import NoMatchError, ParC
from parc_surgery.blocks import BlockContext, get_block
from parc_surgery.blocks.attention_mixer import ParCMixer
from parc_surgery.blocks.token_mixer import infer_layout
from parc_surgery.probe import example_input, probe_model, trace_model


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def vit_conv():
    torch.manual_seed(0)
    return ps.convert(ToyViT(), "attention2parc", input_size=32)


@pytest.fixture(scope="module")
def hybrid_conv():
    torch.manual_seed(0)
    return ps.convert(HybridNet(), "attention2parc", input_size=32)


# ----------------------------------------------------------------------------------------------------------------------
# Detection


def test_softmax_module_child_and_pooling_are_told_apart():
    probe = probe_model(ToyViT().eval(), torch.randn(1, 3, 32, 32))
    # TokenAttention's softmax is an nn.Softmax child: still its own op; LatentPool reduces the tokens
    assert probe.attention == ("blocks.0.attn", "blocks.1.attn")
    assert probe.other_attention == ("pool",)
    cands = ps.list_candidates(ToyViT(), "attention2parc", input_size=32)
    assert cands.other_attention == ("pool",) and "not token mixers" in str(cands)
    assert [t.name for t in cands.selected] == ["blocks.0.attn", "blocks.1.attn"]


def test_default_none_arguments_are_traced_as_called():
    model = MaskArgNet().eval()
    gm, why = trace_model(model)
    assert gm is not None, why
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_eval(gm, x), _eval(model, x))


# ----------------------------------------------------------------------------------------------------------------------
# parc_mixer


def test_tokens_with_prefix_and_grid_hint(vit_conv):
    assert [(t.name, t.block) for t in vit_conv.plan.targets] == [
        ("blocks.0.attn", "parc_mixer"),
        ("blocks.1.attn", "parc_mixer"),
    ]
    assert vit_conv.report.passed, vit_conv.report.checks
    mixer = vit_conv.model.blocks[0].attn
    assert isinstance(mixer, ParCMixer) and mixer.layout == "tokens" and mixer.num_prefix_tokens == 1
    assert mixer.kernel_hw == (8, 8)
    assert isinstance(vit_conv.model.pool, type(ToyViT().pool))  # the pooling attention is left alone
    # a non-square input: the grid comes from the (H, W) the block passes along, not from a guess
    seen = []
    h = mixer.parc_1_h.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[2:])))
    _eval(vit_conv.model, torch.randn(1, 3, 24, 40))
    h.remove()
    assert seen == [(6, 10)]


def test_value_rows_and_projection_are_carried(vit_conv):
    torch.manual_seed(0)
    src = ToyViT()  # the same weights as the fixture's
    attn, mixer = src.blocks[1].attn, vit_conv.model.blocks[1].attn
    d = attn.proj.in_features
    assert torch.equal(mixer.v.weight, attn.qkv.weight[2 * d :]) and torch.equal(mixer.v.bias, attn.qkv.bias[2 * d :])
    assert torch.equal(mixer.proj.weight, attn.proj.weight)
    rec = vit_conv.carry["blocks.1.attn"]
    assert ("proj.weight", "proj.weight") in rec.kept
    assert [n for n, _, _ in rec.transformed] == ["v.weight", "v.bias"]
    assert set(rec.new) == {f"parc_{i}.{p}" for i in ("1_h", "1_w", "2_w", "2_h") for p in ("weight", "pe")}
    assert all(torch.count_nonzero(p.pe) == 0 for p in mixer.modules() if isinstance(p, ParC))  # warm start


def test_nchw_and_odd_width_nhwc_layouts(hybrid_conv):
    assert hybrid_conv.report.passed, hybrid_conv.report.checks
    layouts = [(m.layout, m.attn_dim) for m in hybrid_conv.model.modules() if isinstance(m, ParCMixer)]
    assert layouts == [("nchw", 16), ("nchw", 16), ("nhwc", 15), ("nhwc", 15)]
    mixer = hybrid_conv.model.nhwc[0]
    assert (mixer.parc_1_h.weight.shape[0], mixer.parc_2_h.weight.shape[0]) == (7, 8)  # odd width: 7 + 8
    rec = hybrid_conv.carry["nchw.0"]
    assert any(n == "proj.weight" and "1x1 conv" in how for n, _, how in rec.transformed)


def test_layout_inference_and_refusals():
    assert infer_layout(Attention2dToy(8), (1, 8, 4, 5)) == "nchw"
    assert infer_layout(ChannelsLastAttention(5), (1, 4, 4, 5)) == "nhwc"
    assert infer_layout(TokenAttention(8), (1, 17, 8)) == "tokens"
    with pytest.raises(ps.UnsupportedTargetError, match="5-D"):
        infer_layout(TokenAttention(8), (1, 2, 3, 4, 8))
    # attention pooling (fewer tokens out than in) is no token mixer
    ctx = BlockContext((4, 4), source_in_shape=(1, 17, 8))
    with pytest.raises(ps.UnsupportedTargetError, match="no attention token mixer"):
        ParCMixer.check_source(LatentPool(8), ctx)
    ParCMixer.check_source(TokenAttention(8), BlockContext((4, 4)))  # probed on (1, 16, 8) tokens


def test_prime_token_count_falls_back_to_a_line():
    ctx = BlockContext((4, 4), source_in_shape=(2, 16, 8), source_out_shape=(2, 16, 8))
    block, _ = ParCMixer.from_module(TokenAttention(8), ctx)
    y = _eval(block, torch.randn(2, 7, 8))  # 7 patch tokens: no 2-D grid near 4x4
    assert y.shape == (2, 7, 8) and torch.isfinite(y).all()


def test_tuple_returning_attention_is_left_out_with_a_reason():
    with pytest.raises(NoMatchError, match=r"left out.*it returns 8, 8 besides its output"):
        ps.convert(TupleAttentionNet(), "attention2parc", input_size=32)


# ----------------------------------------------------------------------------------------------------------------------
# parc_conv, custom stage modules, fall-through


def test_grouped_blocks_in_custom_stages():
    torch.manual_seed(0)
    model = GroupedStageNet()
    conv = ps.convert(model, "convstage2parc", input_size=32)
    assert [(s.container, len(s.blocks)) for s in conv.plan.stages] == [("s1", 2), ("s2", 3)]
    assert [(t.name, t.block) for t in conv.plan.targets] == [("s1.b2", "parc_conv"), ("s2.b3", "parc_conv")]
    assert conv.report.passed, conv.report.checks
    split = conv.model.s2.b3.conv2
    assert not split.dense  # grouped -> depthwise
    src = model.s2.b3.conv2.weight  # (16, 4, 3, 3), 4 groups
    w_h = src[:8].sum(dim=1).sum(dim=2)  # summed over the group's inputs, then over the width taps
    want = torch.zeros(8, 8)
    for j in range(3):
        want[:, (j - 1) % 8] += w_h[:, j]
    assert torch.allclose(split.parc_h.weight[:, 0, :, 0], want, atol=1e-6)
    assert torch.equal(conv.model.s2.b3.conv1.weight, model.s2.b3.conv1.weight)


def test_refused_module_falls_through_to_a_later_target():
    grouped = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), _bottleneck(32, 8), _bottleneck(32, 8))
    grouped[2].conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)  # parc_bottleneck: dense only
    rule = {
        "version": 1,
        "name": "ft",
        "targets": [
            {"block": "parc_bottleneck", "select": {"name": ["1", "2"]}},
            {"block": "parc_conv", "select": {"name": "2"}},
        ],
    }
    plan = ps.convert(grouped, rule, input_size=32).plan
    assert [(t.name, t.block) for t in plan.targets] == [("1", "parc_bottleneck"), ("2", "parc_conv")]
    with pytest.raises(ps.UnsupportedTargetError, match=r"grouped"):  # no later target: the refusal stands
        ps.convert(grouped, {**rule, "targets": rule["targets"][:1]}, input_size=32)


def test_lenient_block_leaves_out_odd_widths_with_the_reasons():
    with pytest.raises(NoMatchError) as e:
        ps.convert(OddWidthNet(), "convstage2parc", input_size=32)
    assert "left out" in str(e.value) and "odd" in str(e.value)


def test_parc_conv_refuses_blocks_without_exactly_one_spatial_conv():
    ctx = BlockContext((4, 4), kernel_size=(4, 4))
    cls = get_block("parc_conv")
    with pytest.raises(ps.UnsupportedTargetError, match="no spatial"):
        cls.check_source(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()), ctx)
    with pytest.raises(ps.UnsupportedTargetError, match="2 spatial convs"):
        cls.check_source(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)), ctx)
    ok = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    cls.check_source(ok, ctx)
    moved = BlockContext((4, 4), source_in_shape=(1, 4, 8, 8), source_out_shape=(1, 4, 4, 4))
    with pytest.raises(ps.UnsupportedTargetError, match="keep the spatial size"):
        cls.check_source(ok, moved)


def test_generic_blocks_keep_batch_rows_independent(vit_conv, hybrid_conv):
    for conv in (vit_conv, hybrid_conv):
        x = example_input(conv.model, (32, 32), batch=3)
        full = _eval(conv.model, x)
        one = _eval(conv.model, x[1:2])
        assert torch.allclose(full[1:2], one, atol=1e-5)


class _ReadsResolution(nn.Module):
    """Reads a plain attribute of its attention (EfficientViT's ``attn.resolution``) in its forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = TokenAttention(8)
        self.attn.resolution = 4

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.attn(t).mean(1) * self.attn.resolution


def test_plain_attributes_of_the_source_stay_readable():
    conv = ps.convert(_ReadsResolution(), "attention2parc", input_size=16)
    assert isinstance(conv.model.attn, ParCMixer) and conv.model.attn.resolution == 4
    assert conv.report.passed


class _ConvBn(nn.Sequential):
    """A block that is a Sequential subclass (timm ConvNorm / torchvision Conv2dNormActivation style)."""

    def __init__(self, c: int):
        super().__init__(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


class _IteratesItsBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.body = nn.Sequential(_ConvBn(8), _ConvBn(8), _ConvBn(8))

    def forward(self, x):
        x = self.stem(x)
        for blk in self.body:
            x = x + blk(x) / len(blk)  # the caller uses the container's own methods
        return x.mean((2, 3))


def test_container_subclass_blocks_keep_their_class():
    torch.manual_seed(0)
    model = _IteratesItsBlocks()
    conv = ps.convert(model, "convstage2parc", input_size=16)
    assert [(t.name, t.block) for t in conv.plan.targets] == [("body.2", "parc_conv")]
    assert conv.report.passed, conv.report.checks
    new = conv.model.body[2]
    assert type(new) is _ConvBn and type(new[0]).__name__ == "ParCSplit"
    assert torch.equal(new[1].weight, model.body[2][1].weight)
