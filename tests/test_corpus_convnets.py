"""convstage2parc on ConvNets that are not timm's: user classes, torchvision, ``transformers`` (small, no weights).

For each: converted and validated (every check, ``preserved`` and ``output_structure`` included), the output
structure unchanged (tensor / tuple / dict / ``ModelOutput``), the replaced blocks still of their own class
with the spatial conv swapped, the input untouched, and ``list_candidates`` explaining the selection.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from corpus_convnets import HelperBlock, basic_net, bottleneck_net, helper_net, inverted_residual_net
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

import parc_surgery as ps
from parc_surgery.blocks.parc_split import ParCSplit

tv = torchvision.models


def _hf_resnet(layer_type: str):
    cfg = ResNetConfig(hidden_sizes=[16, 32, 64, 128], embedding_size=16, depths=[2, 2, 2, 2], layer_type=layer_type,
                       num_labels=10)  # fmt: skip
    return ResNetForImageClassification(cfg)


# name -> (builder, input size, expected (target, block) names with the conv each swaps)
CORPUS = {
    "user_basic": (basic_net, 32, [("stages.1.1", "parc_conv", "conv2"), ("stages.2.2", "parc_conv", "conv2")]),
    "user_bottleneck_dict": (lambda: bottleneck_net(out="dict"), 32,
                             [("stages.1.1", "parc_conv", "conv2"), ("stages.2.2", "parc_conv", "conv2")]),
    "user_inverted_residual_tuple": (lambda: inverted_residual_net(out="tuple"), 32,
                                     [("stages.1.1", "parc_conv", "block.3"), ("stages.2.2", "parc_conv", "block.3")]),
    "user_helper_method": (helper_net, 32, [("stages.1.1", "parc_conv", "dw"), ("stages.2.2", "parc_conv", "dw")]),
    "tv_mobilenet_v2": (lambda: tv.mobilenet_v2(weights=None, width_mult=0.5), 64,
                        [(f"features.{i}", "parc_inverted_residual", "conv.1.0") for i in (12, 13, 16)]),
    "tv_efficientnet_b0": (lambda: tv.efficientnet_b0(weights=None), 64,
                           [(f"features.6.{i}", "parc_conv", "block.1.0") for i in (2, 3)]),
    "tv_convnext_tiny": (lambda: tv.convnext_tiny(weights=None), 64,
                         [(f"features.5.{i}", "parc_convnext", "block.0") for i in range(4, 9)]
                         + [("features.7.2", "parc_convnext", "block.0")]),
    "tv_regnet_y_400mf": (lambda: tv.regnet_y_400mf(weights=None), 64,
                          [(f"trunk_output.block3.block3-{i}", "parc_conv", "f.b.0") for i in (3, 4, 5)]
                          + [(f"trunk_output.block4.block4-{i}", "parc_conv", "f.b.0") for i in (4, 5)]),
    "hf_convnext": (lambda: ConvNextForImageClassification(
                        ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 3, 2], num_labels=10)), 64,
                    [("convnext.encoder.stages.2.layers.1", "parc_conv", "dwconv"),
                     ("convnext.encoder.stages.2.layers.2", "parc_conv", "dwconv"),
                     ("convnext.encoder.stages.3.layers.1", "parc_conv", "dwconv")]),
    "hf_resnet_bottleneck": (lambda: _hf_resnet("bottleneck"), 64,
                             [(f"resnet.encoder.stages.{i}.layers.1", "parc_conv", "layer.1.convolution")
                              for i in (2, 3)]),
    "hf_resnet_basic": (lambda: _hf_resnet("basic"), 64,
                        [(f"resnet.encoder.stages.{i}.layers.1", "parc_conv", "layer.1.convolution") for i in (2, 3)]),
    "hf_mobilenet_v2": (lambda: MobileNetV2ForImageClassification(
                            MobileNetV2Config(depth_multiplier=0.35, num_labels=10, image_size=64, tf_padding=False)),
                        64, [(f"mobilenet_v2.layer.{i}", "parc_conv", "conv_3x3.convolution") for i in (10, 11, 14)]),
}  # fmt: skip

_CACHE: dict = {}


def _hf_mobilenet_v2_tf_padding():
    return MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.35, num_labels=10, image_size=64))


def sweep_entries() -> list[dict]:
    """The corpus for ``benchmarks/corpus_sweep.py`` (the non-timm table of ``benchmarks/zoo_sweep.md``)."""
    entries = [
        {"name": name, "build": build, "rule": "convstage2parc", "size": size,
         "source": name.split("_")[0].replace("tv", "torchvision").replace("hf", "transformers"), "expect": "convert"}
        for name, (build, size, _) in CORPUS.items()
    ]  # fmt: skip
    entries.append({"name": "hf_mobilenet_v2_tf_padding", "build": _hf_mobilenet_v2_tf_padding,
                    "rule": "convstage2parc", "size": 64, "source": "transformers", "expect": "refuse"})  # fmt: skip
    return entries


@pytest.fixture(scope="module", params=list(CORPUS))
def case(request):
    name = request.param
    if name not in _CACHE:
        build, size, expect = CORPUS[name]
        torch.manual_seed(0)
        model = build().eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _CACHE[name] = (model, before, ps.convert(model, "convstage2parc", input_size=size), size, expect)
    return (name, *_CACHE[name])


def test_converted_and_every_check_passes(case):
    _, _, _, conv, _, expect = case
    assert [(t.name, t.block) for t in conv.plan.targets] == [(n, b) for n, b, _ in expect]
    checks = {c.name: c for c in conv.report.checks}
    assert set(checks) == {"preserved", "output_shape", "output_structure", "target_shapes",
                           "output_shape_non_square", "finite", "spatial_vs_fft", "traced_vs_eager"}  # fmt: skip
    assert all(c.passed for c in checks.values()), [c for c in checks.values() if not c.passed]
    assert "accounted for" in checks["preserved"].detail


def test_blocks_keep_their_class_with_the_conv_swapped(case):
    _, model, before, conv, _, expect = case
    for name, _, path in expect:
        old, new = model.get_submodule(name), conv.model.get_submodule(name)
        assert type(new) is type(old) and new is not old
        assert isinstance(new.get_submodule(path), ParCSplit) and isinstance(old.get_submodule(path), torch.nn.Conv2d)
    now = model.state_dict()  # the input model is untouched
    assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)
    assert type(conv.model) is type(model)


def test_output_structure_unchanged(case):
    _, model, _, conv, size, _ = case
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a, b = model(x), copy.deepcopy(conv.model).eval()(x)
    assert type(a) is type(b)
    if isinstance(a, dict):  # dict and transformers ModelOutput (an ordered dict)
        assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    elif isinstance(a, tuple):
        assert len(a) == len(b) and all(u.shape == v.shape for u, v in zip(a, b))
    else:
        assert a.shape == b.shape


def test_list_candidates_explains_the_selection(case):
    _, model, _, _, size, expect = case
    cands = ps.list_candidates(model, "convstage2parc", input_size=size)
    assert [(t.name, t.block) for t in cands.selected] == [(n, b) for n, b, _ in expect]
    text = str(cands)
    for n, block, path in expect:
        assert n in text
        if block == "parc_conv":  # the residual structure read from the block's graph
            t = next(t for t in cands.selected if t.name == n)
            assert t.ctx.residual.conv == path and t.ctx.residual.problem is None
            assert f"{n} -> parc_conv" in text and f"replaces {path}" in text
    assert "stages:" in text and f"selected by the rule: {len(expect)}" in text


def test_a_block_calling_its_own_helper_method_runs_its_own_forward():
    """Regression (issue 13): the conv blocks used to run the source's forward on another class, so
    ``x + self._mix(x)`` raised AttributeError; the replacement is now a copy of the block itself."""
    torch.manual_seed(0)
    model = helper_net().eval()
    conv = ps.convert(model, "convstage2parc", input_size=32)
    new = conv.model.stages[2][2]
    assert type(new) is HelperBlock and isinstance(new.dw, ParCSplit)
    x = torch.randn(1, 8, 4, 4).repeat(1, 4, 1, 1)
    with torch.no_grad():
        assert new._mix(x).shape == x.shape  # its own helper, on its own class
        assert torch.equal(new.scale, model.stages[2][2].scale)


def test_tf_padding_mobilenet_v2_is_refused_with_the_reason():
    model = _hf_mobilenet_v2_tf_padding()
    why = r"left out.*conv_3x3\.convolution' has padding \(0, 0\).*changes the size"
    with pytest.raises(ps.NoMatchError, match=why):
        ps.convert(model.eval(), "convstage2parc", input_size=64)
    cands = ps.list_candidates(model, "convstage2parc", input_size=64)
    assert cands.selected == () and cands.refused and all("changes the size" in r.reason for r in cands.refused)


CONVS_IN_LAST_STAGE = {
    "version": 1,
    "name": "convs",
    "targets": [{"block": "parc_conv", "select": {"type": "Conv2d", "stages": [{"stage": -1, "fraction": "1/3"}]},
                 "options": {"pe": "first"}}],
}  # fmt: skip


def test_type_conv2d_with_stages_selects_the_convs_inside_those_blocks():
    torch.manual_seed(0)
    model = basic_net().eval()  # last stage: stages.2.{0,1,2}; its last third is stages.2.2
    conv = ps.convert(model, CONVS_IN_LAST_STAGE, input_size=32)
    assert [t.name for t in conv.plan.targets] == ["stages.2.2.conv1", "stages.2.2.conv2"]
    assert [t.ctx.pe for t in conv.plan.targets] == [True, False]  # pe: first counts per stage, not per conv
    assert conv.report.passed
    block = conv.model.stages[2][2]
    assert type(block) is type(model.stages[2][2])
    assert isinstance(block.conv1, ParCSplit) and isinstance(block.conv2, ParCSplit)
    assert isinstance(conv.model.stages[2][1].conv1, torch.nn.Conv2d)  # outside the fraction: untouched
    rec = conv.carry["stages.2.2.conv1"]
    assert {n for n, _, _ in rec.transformed} == {"parc_h.weight", "parc_w.weight"}


def test_type_conv2d_with_stages_leaves_out_1x1_and_channel_changing_convs():
    torch.manual_seed(0)
    conv = ps.convert(bottleneck_net().eval(), CONVS_IN_LAST_STAGE, input_size=32)
    assert [t.name for t in conv.plan.targets] == ["stages.2.2.conv2"]  # conv1 / conv3 are 1x1
    assert any("conv1" in n and "1x1 conv" in n for n in conv.plan.notes), conv.plan.notes
