"""The attention corpus (tests/attention_corpus.py) and library models that are not timm's, through the engine.

Each model converts and validates (every check of the report passes), keeps its output structure and its
class, and ``list_candidates`` shows what is selected; attention computed inline in a block's forward is
rewritten in the block's graph with its norms and MLP intact. The forms that cannot be rewritten are refused
with the reason, in ``convert`` and in ``list_candidates``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from attention_corpus import (
    BranchyViT,
    CrossViT,
    DictViT,
    EncoderViT,
    InlineViT,
    MaskedViT,
    MHAViT,
    NoGridNet,
    SelfMaskedViT,
)
from torch import nn

import parc_surgery as ps
from parc_surgery.blocks.attention_mixer import ParCMixer


def _run(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


CASES = {
    # name: (builder, rule, input size, expected targets)
    "inline_softmax_cls": (lambda: InlineViT(sdpa=False, cls_token=True), "attention2parc", 32, ["blocks.0",
                                                                                                 "blocks.1"]),
    "inline_sdpa_no_cls": (lambda: InlineViT(sdpa=True, cls_token=False), "attention2parc", 32, ["blocks.0",
                                                                                                 "blocks.1"]),
    "mha_batch_first": (lambda: MHAViT(batch_first=True), "attention2parc", 32, ["blocks.0.attn", "blocks.1.attn"]),
    "mha_seq_first": (lambda: MHAViT(batch_first=False), "attention2parc", 32, ["blocks.0.attn", "blocks.1.attn"]),
    "transformer_encoder": (lambda: EncoderViT(), "attention2parc", 32,
                            ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]),
    "dict_output_qkv": (lambda: DictViT(), "attention2parc", 32, ["attns.0", "attns.1"]),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, rule, size, names = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    before = copy.deepcopy(model.state_dict())
    return request.param, model, before, ps.convert(model, rule, input_size=size), names, size


def test_converted_and_validated(case):
    _, model, before, conv, names, size = case
    assert [t.name for t in conv.plan.targets] == names
    assert conv.report.passed, [c for c in conv.report.checks if not c.passed]
    assert type(conv.model) is type(model)
    now = model.state_dict()  # the user's model is untouched
    assert all(torch.equal(before[k], now[k]) for k in before)
    x = torch.randn(2, 3, size, size)
    y0, y1 = _run(model, x), _run(conv.model, x)
    assert type(y1) is type(y0)
    if isinstance(y0, dict):
        assert y1.keys() == y0.keys() and all(y1[k].shape == y0[k].shape for k in y0)
    else:
        assert y1.shape == y0.shape


def test_everything_outside_the_attention_is_bit_identical(case):
    _, model, _, conv, names, _ = case
    old, new = model.state_dict(), conv.model.state_dict()
    for t in conv.plan.targets:
        rec = conv.carry[t.name]
        replaced = {o for _, o in rec.kept} | {o for _, olds, _ in rec.transformed for o in olds} | set(rec.dropped)
        inside = [k for k in old if k.startswith(t.name + ".")]
        gone = [k for k in inside if k not in new]
        assert set(k[len(t.name) + 1 :] for k in gone) <= replaced, gone
    outside = [k for k in old if not any(k.startswith(n + ".") for n in names)]
    assert outside and all(torch.equal(old[k], new[k]) for k in outside)


def test_list_candidates_explains(case):
    _name, model, _, conv, names, size = case
    cands = ps.list_candidates(model, conv.rule, input_size=size)
    assert [t.name for t in cands.selected] == names
    assert set(names) <= set(cands.attention)
    text = str(cands)
    assert all(n in text for n in names)


# ----------------------------------------------------------------------------------------------------------------------
# Inline attention: rewritten in the block's graph, its norms and MLP intact


def test_inline_block_keeps_mlp_and_norms_and_computes_the_same_around_the_mixer():
    torch.manual_seed(0)
    model = InlineViT(sdpa=False, cls_token=True).eval()
    conv = ps.convert(model, "attention2parc", input_size=32)
    blk, src = conv.model.blocks[0], model.blocks[0]
    assert isinstance(blk, torch.fx.GraphModule)
    assert {n for n, _ in blk.named_children()} == {"norm1", "proj", "norm2", "fc1", "fc2", "parc_mixer"}
    for k in ("norm1.weight", "proj.weight", "proj.bias", "norm2.weight", "fc1.weight", "fc2.weight", "gamma1"):
        assert torch.equal(blk.get_parameter(k), src.get_parameter(k)), k
    assert torch.equal(blk.parc_mixer.v.weight, src.qkv.weight[64:96])  # the value rows of the fused qkv
    rec = conv.carry["blocks.0"]
    assert "qkv.weight" in {o for _, olds, _ in rec.transformed for o in olds} and not rec.dropped
    assert {c.name for c in conv.report.checks if c.passed} >= {"preserved", "output_shape", "traced_vs_eager"}
    assert any("GraphModule" in n and "blocks.0" in n for n in conv.report.notes)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():  # the block computes x + g * proj(mixer(norm1(x))), then its own MLP, exactly
        h = x + src.gamma1 * src.proj(blk.parc_mixer(src.norm1(x)))
        want = h + src.fc2(F.gelu(src.fc1(src.norm2(h))))
        torch.testing.assert_close(blk(x), want, rtol=0, atol=0)


def test_inline_attention_of_a_forward_that_does_not_trace_is_refused():
    with pytest.raises(ps.NoMatchError, match=r"blocks\.0.*does not trace with torch\.fx"):
        ps.convert(BranchyViT(), "attention2parc", input_size=32)


# ----------------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention: module swap with its call signature and return structure


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_swap(batch_first):
    torch.manual_seed(0)
    model = MHAViT(batch_first=batch_first).eval()
    conv = ps.convert(model, "attention2parc", input_size=32)
    mixer, src = conv.model.blocks[0].attn, model.blocks[0].attn
    assert isinstance(mixer, ParCMixer) and type(conv.model.blocks[0]).__name__ == "MHABlock"
    assert mixer.layout == ("tokens" if batch_first else "tokens_first") and mixer.num_prefix_tokens == 1
    assert torch.equal(mixer.v.weight, src.in_proj_weight[64:]) and torch.equal(mixer.v.bias, src.in_proj_bias[64:])
    assert torch.equal(mixer.proj.weight, src.out_proj.weight)
    x = torch.randn(17, 2, 32) if not batch_first else torch.randn(2, 17, 32)
    out, weights = mixer(x, x, x)
    assert out.shape == x.shape and weights is None
    with pytest.raises(ps.ConfigError, match="self-attention"):
        mixer(x, x.clone(), x)
    with pytest.raises(ps.ConfigError, match="attn_mask"):
        mixer(x, x, x, attn_mask=torch.zeros(17, 17))


# ----------------------------------------------------------------------------------------------------------------------
# What cannot be rewritten: the reason, in convert and in list_candidates


REFUSED = {
    "cross_attention": (CrossViT, r"attn.*cross-attention: its keys come from"),
    "mask_from_the_input": (MaskedViT, r"attn.*masked by .* computed from the model input"),
    "mask_computed_inside_from_tokens": (SelfMaskedViT, r"attn.*masked by .* computed from the model input"),
    "no_2d_grid": (NoGridNet, r"attn.*13 tokens that form no 2-D grid"),
    "forward_does_not_trace": (BranchyViT, r"blocks\.0.*does not trace with torch\.fx"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_the_reason(name):
    build, why = REFUSED[name]
    torch.manual_seed(0)
    model = build()
    with pytest.raises(ps.NoMatchError, match=why):  # attention2parc's generic block leaves it out: nothing left
        ps.convert(model, "attention2parc", input_size=32)
    strict = {"version": 1, "name": "strict", "targets": [{"block": "parc_token_mixer", "select": {"attention": True}}]}
    with pytest.raises(ps.UnsupportedTargetError, match=why):  # a block that does not skip: the refusal stands
        ps.convert(model, strict, input_size=32)
    cands = ps.list_candidates(model, "attention2parc", input_size=32)
    import re

    assert re.search(why, str(cands), re.S), str(cands)


def test_plain_attributes_of_the_source_never_shadow_the_mixers_modules():
    """timm's Twins sets ``self.norm = None`` on its attention; the mixer's own ``norm`` module must stay."""
    torch.manual_seed(0)
    model = DictViT().eval()
    for attn in model.attns:
        attn.norm = None
        attn.resolution = 8
    conv = ps.convert(model, "attention2parc", input_size=32)
    assert conv.report.passed
    mixer = conv.model.attns[0]
    assert isinstance(mixer.norm, nn.Identity) and mixer.resolution == 8


def test_rewritten_models_save_and_load(tmp_path):
    """A block rewritten in its graph and a swapped nn.MultiheadAttention come back from a checkpoint exactly."""
    from parc_surgery.checkpoint import load, save

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for name, model in (("inline", InlineViT().eval()), ("mha", MHAViT(batch_first=False).eval())):
        conv = ps.convert(model, "attention2parc", input_size=32)
        path = save(conv, tmp_path / f"{name}.safetensors")
        again = load(path, model=model)
        assert torch.equal(_run(again, x), _run(conv.model, x)), name  # the same weights, the same graph
