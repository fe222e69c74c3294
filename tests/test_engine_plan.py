"""The data path without a loop (probe -> stages -> match -> plan -> rewrite) and the declared block contract."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from toy_models import DictStageNet, GroupedStageNet

import parc_surgery as ps
from parc_surgery.blocks import BlockContext, ReplacementBlock, get_block_spec, register_block, unregister_block
from parc_surgery.blocks.bottleneck import ParCBottleneck
from parc_surgery.errors import ConfigError


@pytest.fixture
def counting_block():
    """parc_bottleneck with its check_source / from_module calls counted per module name."""
    calls: dict[str, list[str]] = {"check": [], "build": []}

    @register_block("test_counting_bottleneck")
    class Counting(ParCBottleneck):
        @classmethod
        def check_source(cls, module, ctx):
            calls["check"].append(type(module).__name__)
            super().check_source(module, ctx)

        @classmethod
        def from_module(cls, module, ctx):
            calls["build"].append(type(module).__name__)
            return super().from_module(module, ctx)

    yield calls
    unregister_block("test_counting_bottleneck")


def _rule(*targets) -> dict:
    return {"version": 1, "name": "t", "targets": list(targets)}


def test_each_candidate_is_checked_once(counting_block):
    # stages.s2.0 is strided: refused by the block (checked once), then taken by nobody -> the error names it
    rule = _rule({"block": "test_counting_bottleneck", "select": {"name": "stages.s[23].*"}})
    with pytest.raises(ps.UnsupportedTargetError, match=r"stages\.s2\.0.*stride"):
        ps.convert(DictStageNet(), rule, input_size=32)
    assert len(counting_block["check"]) == 5 and counting_block["build"] == []
    counting_block["check"].clear()
    ok = _rule(
        {"block": "test_counting_bottleneck", "select": {"name": "stages.s[23].*"}, "exclude": {"name": "*.0"}},
    )
    conv = ps.convert(DictStageNet(), ok, input_size=32, validate=False, count=False)
    assert [t.name for t in conv.plan.targets] == ["stages.s2.1", "stages.s2.2", "stages.s3.1"]
    assert len(counting_block["check"]) == 3 and len(counting_block["build"]) == 3


def test_refusal_falls_through_and_pe_first_counts_accepted_targets(counting_block):
    # target 0 refuses the strided s2.0 (strict), target 1 (lenient parc_conv) cannot take it either: left out
    rule = _rule(
        {"block": "test_counting_bottleneck", "select": {"name": "stages.s2.*"}, "options": {"pe": "first"}},
        {"block": "parc_conv", "select": {"name": "stages.s2.0"}},
    )
    conv = ps.convert(DictStageNet(), rule, input_size=32, validate=False, count=False)
    assert [(t.name, t.ctx.pe) for t in conv.plan.targets] == [("stages.s2.1", True), ("stages.s2.2", False)]
    assert any("left out" in n and "stages.s2.0" in n for n in conv.plan.notes), conv.plan.notes
    cands = ps.list_candidates(DictStageNet(), rule, input_size=32)
    assert [(x.name, x.lenient) for x in cands.refused] == [("stages.s2.0", True)]
    assert "stride" in cands.refused[0].reason and "stages.s2.0" in str(cands)


def test_list_candidates_shows_the_refusal_convert_raises():
    rule = _rule({"block": "parc_bottleneck", "select": {"name": "stages.s2.0"}})
    cands = ps.list_candidates(DictStageNet(), rule, input_size=32)
    assert cands.selected == () and [x.name for x in cands.refused] == ["stages.s2.0"]
    with pytest.raises(ps.UnsupportedTargetError) as e:
        ps.convert(DictStageNet(), rule, input_size=32)
    assert cands.refused[0].reason in str(e.value)
    assert cands.to_dict()["refused"][0]["left_out"] is False


def test_engine_facts_are_typed_context_fields():
    conv = ps.convert(GroupedStageNet(), "convstage2parc", input_size=32, validate=False, count=False)
    for t in conv.plan.targets:
        assert t.ctx.source_in_shape == t.in_shape and t.ctx.source_out_shape == t.out_shape
        assert t.ctx.options == {} and t.ctx.num_tokens is None  # the rule's block_options only
    assert "source_in_shape" not in conv.plan.to_dict()["targets"][0]["options"]


def test_declared_contract_is_read_once_at_registration():
    spec = get_block_spec("parc_conv")
    assert spec.skip_unsupported and spec.attach is None and spec.replaces == ()
    assert get_block_spec("parc_token_mixer").attach is not None
    assert not get_block_spec("parc_bottleneck").skip_unsupported
    assert issubclass(spec.cls, ReplacementBlock) and spec.cls.block_name == "parc_conv"


class _Plain(nn.Module):  # the protocol without the base class
    replaces = ("torch.nn.modules.conv.Conv2d",)
    skip_unsupported = True

    @classmethod
    def check_source(cls, module, ctx):
        return None

    @classmethod
    def from_module(cls, module, ctx):
        return cls(), ps.CarryRecord()


def test_plain_module_blocks_and_bad_declarations():
    register_block("test_plain_block")(_Plain)
    try:
        spec = get_block_spec("test_plain_block")
        assert spec.skip_unsupported and spec.replaces == _Plain.replaces and spec.attach is None
    finally:
        unregister_block("test_plain_block")

    class BadReplaces(_Plain):
        replaces = "torch.nn.Conv2d"  # a string, not a tuple

    class BadLenient(_Plain):
        skip_unsupported = "yes"

    class NoBuild(ReplacementBlock):
        @classmethod
        def check_source(cls, module, ctx):
            return None

    for cls, match in ((BadReplaces, "replaces must be a tuple"), (BadLenient, "must be a bool")):
        with pytest.raises(ConfigError, match=match):
            register_block("test_bad_block")(cls)
    assert not ps.blocks.is_block("test_bad_block")
    register_block("test_no_build")(NoBuild)  # the base class supplies the method, which says what is missing
    try:
        with pytest.raises(NotImplementedError, match="from_module"):
            get_block_spec("test_no_build").from_module(nn.Conv2d(2, 2, 3), BlockContext((4, 4)))
    finally:
        unregister_block("test_no_build")


def test_plan_is_deterministic_across_calls():
    torch.manual_seed(0)
    model = DictStageNet()
    a = ps.list_candidates(model, "convstage2parc", input_size=32)
    b = ps.list_candidates(model, "convstage2parc", input_size=32)
    assert [t.to_dict() for t in a.selected] == [t.to_dict() for t in b.selected]


def test_register_tokens_declared_by_the_model_size_the_grid():
    """NaFlexViT embeds patches with a Linear (no ``grid_size``) and puts 4 register tokens first: the model's own
    ``num_prefix_tokens`` tells the 64 patch tokens of 128 px apart (8 x 8), not a guess that refuses 68 tokens."""
    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", embed_dim=64, depth=2, num_heads=2, num_classes=4).eval()
    assert model.num_prefix_tokens == 4
    conv = ps.convert(model, "attention2parc", input_size=128, count=False)
    assert conv.report.passed and len(conv.plan.targets) == 2
    assert all(t.ctx.feature_size == (8, 8) and t.ctx.num_prefix_tokens == 4 for t in conv.plan.targets)
