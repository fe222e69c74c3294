"""The ``preserved`` check: every input tensor is bit-identical at its place or in exactly one carry record."""

from __future__ import annotations

import copy

import pytest
import torch
from corpus_inline_vit import InlineViT
from torch import nn
from toy_models import DictStageNet

import parc_surgery as ps
import parc_surgery.api as api
from parc_surgery.blocks import CarryBuilder, ReplacementBlock, register_block, unregister_block
from parc_surgery.preserved import check_preserved

S31 = {"version": 1, "name": "t", "targets": [{"block": "test_preserved_block", "select": {"name": "stages.s3.1"}}]}


def _checks(conv) -> dict:
    return {c.name: c for c in conv.report.checks}


@pytest.fixture
def block_with():
    """Register ``test_preserved_block`` whose from_module is the given function, for one test."""

    def register(build):
        @register_block("test_preserved_block")
        class _Block(ReplacementBlock):
            @classmethod
            def check_source(cls, module, ctx):
                return None

            @classmethod
            def from_module(cls, module, ctx):
                return build(module, ctx)

        return _Block

    yield register
    unregister_block("test_preserved_block")


def _gutted(module, ctx):
    """A copy of the Bottleneck whose bn2 is deleted (Identity), with a record that does not say so."""
    twin = copy.deepcopy(module)
    twin.bn2 = nn.Identity()
    b = CarryBuilder()
    b.kept.extend((n, n) for n, _ in twin.named_parameters())
    return twin, b.finish(twin, module)


def test_a_block_deleting_an_unrecorded_submodule_fails_naming_the_tensors(block_with):
    block_with(_gutted)
    model = DictStageNet()
    with pytest.raises(ps.ValidationError, match="preserved") as e:
        ps.convert(model, S31, input_size=32)
    msg = str(e.value)
    for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert f"stages.s3.1.bn2.{t}" in msg
    assert "stages.s3.1.conv2" not in msg  # kept, bit-identical
    conv = ps.convert(model, S31, input_size=32, strict=False)  # the conversion, with the failed check
    assert not _checks(conv)["preserved"].passed and _checks(conv)["output_shape"].passed


def test_the_same_edit_declared_passes(block_with):
    block_with(_gutted_declared)  # the record drops bn2's parameters and buffers
    assert _checks(ps.convert(DictStageNet(), S31, input_size=32))["preserved"].passed


def _gutted_declared(module, ctx):
    twin, _ = _gutted(module, ctx)
    b = CarryBuilder()
    b.kept.extend((n, n) for n, _ in twin.named_parameters())
    b.drop(*(f"bn2.{n}" for n in module.bn2.state_dict()))
    rec = b.finish(twin, module)
    assert set(rec.buffers_dropped) == {"bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked"}
    assert set(rec.dropped) == {"bn2.weight", "bn2.bias"}
    return twin, rec


def test_parameters_dropped_but_buffers_forgotten_fail(block_with):
    def params_only(module, ctx):  # declares every parameter dropped, says nothing of the BN running stats
        return nn.Identity(), ps.CarryRecord(dropped=tuple(n for n, _ in module.named_parameters()))

    block_with(params_only)
    with pytest.raises(ps.ValidationError, match=r"stages\.s3\.1\.bn1\.running_mean"):
        ps.convert(DictStageNet(), S31, input_size=32)


def test_a_record_naming_a_missing_or_contradictory_tensor_fails(block_with):
    def bad_record(module, ctx):
        b = CarryBuilder()
        b.drop("conv9.weight", *(n for n in module.state_dict()))
        return nn.Identity(), b.finish(nn.Identity(), module)

    block_with(bad_record)
    with pytest.raises(ps.ValidationError, match=r"names 'conv9\.weight', which the module does not have"):
        ps.convert(DictStageNet(), S31, input_size=32)

    def both(module, ctx):
        b = CarryBuilder()
        b.kept.append(("conv1.weight", "conv1.weight"))
        b.drop(*module.state_dict())
        return copy.deepcopy(module), b.finish(module, module)

    unregister_block("test_preserved_block")
    block_with(both)
    with pytest.raises(ps.ValidationError, match=r"both carries and drops conv1\.weight"):
        ps.convert(DictStageNet(), S31, input_size=32)


def test_a_tensor_changed_outside_every_target_fails(monkeypatch):
    real = api.apply_plan

    def leaky(model, targets, **kw):  # a rewrite that also touches a tensor no target owns
        carry = real(model, targets, **kw)
        with torch.no_grad():
            model.head.bias.add_(1.0)
        return carry

    monkeypatch.setattr(api, "apply_plan", leaky)
    rule = {"version": 1, "name": "t", "targets": [{"block": "parc_bottleneck", "select": {"name": "stages.s3.1"}}]}
    with pytest.raises(ps.ValidationError, match=r"1 tensor\(s\) changed and in no carry record: head\.bias"):
        ps.convert(DictStageNet(), rule, input_size=32, validate=False)


def test_preserved_runs_on_every_conversion_and_counts(block_with):
    rule = {"version": 1, "name": "t", "targets": [{"block": "parc_bottleneck", "select": {"name": "stages.s3.1"}}]}
    model = DictStageNet()
    for validate in (True, False):
        conv = ps.convert(model, rule, input_size=32, validate=validate)
        check = _checks(conv)["preserved"]
        n = len(model.state_dict())
        assert check.passed and f"all {n} input tensors accounted for" in check.detail
    # the carry record of the conv swap: every parameter outside conv2 kept, conv2 folded
    rec = conv.carry["stages.s3.1"]
    assert {o for _, o in rec.kept} == {n for n, _ in model.stages["s3"][1].named_parameters()} - {"conv2.weight"}
    assert {o for _, olds, _ in rec.transformed for o in olds} == {"conv2.weight"}
    ref = ps.convert(model, rule, input_size=32, init="reference", validate=False)
    assert ref.carry["stages.s3.1"].dropped == ("conv2.weight",)


def test_shared_module_records_map_to_every_name():
    from toy_models import SharedBlockNet

    rule = {"version": 1, "name": "t", "targets": [{"block": "parc_bottleneck", "select": {"name": "blocks.1"}}]}
    model = SharedBlockNet()
    conv = ps.convert(model, rule, input_size=32, init="reference")
    assert conv.plan.targets[0].aliases == ("blocks.1", "blocks.2")
    assert _checks(conv)["preserved"].passed
    # blocks.2.conv2.weight (the same tensor under the second name) is accounted by the record too
    check = check_preserved(model, conv.model, conv.plan.targets[:0], {})
    assert not check.passed and "blocks.1.conv2.weight" in check.detail and "blocks.2.conv2.weight" in check.detail


@pytest.mark.parametrize("sdpa", [False, True], ids=["softmax", "sdpa"])
def test_inline_attention_block_replaced_whole_is_caught(sdpa):
    """A ViT block that computes attention inline is detected as the attention; replacing it whole with a token
    mixer (what the engine did before it rewrote the attention region of the block's graph) deletes its MLP and
    norms, and ``preserved`` names them. The engine now replaces only the attention region: ``preserved``
    passes with the MLP in place (attn14's corpus tests cover the rewrite itself)."""
    torch.manual_seed(0)
    model = InlineViT(sdpa=sdpa).eval()
    conv = ps.convert(model, "attention2parc", input_size=32)
    assert _checks(conv)["preserved"].passed
    assert torch.equal(conv.model.state_dict()["blocks.0.mlp.0.weight"], model.state_dict()["blocks.0.mlp.0.weight"])
    whole = copy.deepcopy(conv.model)
    whole.blocks[0] = whole.blocks[0].parc_mixer  # the block replaced whole by its token mixer, as before
    attention = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")  # what the old mixer declared dropped
    records = {t.name: ps.blocks.CarryRecord(dropped=attention) for t in conv.plan.targets}
    check = check_preserved(model, whole, conv.plan.targets, records)
    assert not check.passed
    assert "blocks.0.mlp.0.weight" in check.detail and "blocks.0.norm1.weight" in check.detail


def test_conv_blocks_keep_every_other_tensor_bit_identical():
    rule = {"version": 1, "name": "t", "targets": [{"block": "parc_bottleneck", "select": {"name": "stages.s3.1"}}]}
    model = DictStageNet()
    conv = ps.convert(model, rule, input_size=32, validate=False, count=False)
    old, new = model.state_dict(), conv.model.state_dict()
    assert set(old) - set(new) == {"stages.s3.1.conv2.weight"}
    assert all(torch.equal(old[k], new[k]) for k in old if k != "stages.s3.1.conv2.weight")
    assert type(conv.model.stages["s3"][1]) is type(model.stages["s3"][1])  # the source's class, not the block's


def test_a_conv_subclass_s_own_parameters_are_declared_dropped():
    """timm's ScaledStdConv2d (NFNets) has a gain beyond weight / bias: the swap declares it dropped."""
    from timm.layers import ScaledStdConv2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ScaledStdConv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), Block(), Block()).eval()
    rule = {"version": 1, "name": "t", "targets": [{"block": "parc_conv", "select": {"name": "2"}}]}
    conv = ps.convert(model, rule, input_size=16)
    rec = conv.carry["2"]
    assert rec.dropped == ("conv.gain",)
    assert {o for _, olds, _ in rec.transformed for o in olds} == {"conv.weight", "conv.bias"}
    assert _checks(conv)["preserved"].passed and conv.report.passed
