"""Outputs as data: every tensor leaf is validated and the converted model must return the same structure."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

import parc_surgery as ps
from parc_surgery.blocks import CarryBuilder, ReplacementBlock, register_block, unregister_block
from parc_surgery.outputs import output_structure, tensor_leaves

Pair = namedtuple("Pair", "logits aux")


def test_leaves_and_structure_of_nested_outputs():
    t = torch.zeros(2, 3)
    out = {"a": (t, None, [t[:1]]), "b": Pair(t, 4)}
    assert [p for p, _ in tensor_leaves(out)] == ["output['a'][0]", "output['a'][2][0]", "output['b'][0]"]
    assert output_structure(out) == "dict(a=tuple(Tensor(2), None, list(Tensor(2))), b=Pair(Tensor(2), int))"
    mo = ImageClassifierOutputWithNoAttention(logits=t)  # None fields are not keys of a ModelOutput
    assert output_structure(mo) == "ImageClassifierOutputWithNoAttention(logits=Tensor(2))"
    assert [p for p, _ in tensor_leaves(mo)] == ["output['logits']"]
    assert output_structure(t) != output_structure(t[0])  # ranks are part of the structure


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class _FeatNet(nn.Module):
    """Returns a dict whose value is the last block's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.body = nn.Sequential(_Body(), _Body())

    def forward(self, x):
        h = self.stem(x)
        return {"feat": self.body[1](self.body[0](h)), "pooled": h.mean((2, 3))}


@pytest.fixture
def tuple_block():
    @register_block("test_tuple_block")
    class _Tuple(ReplacementBlock):
        """Replaces a module with one returning ``(out, None)``: the model's output structure changes."""

        def __init__(self, src):
            super().__init__()
            self.src = src

        def forward(self, x):
            return self.src(x), None

        @classmethod
        def check_source(cls, module, ctx):
            return None

        @classmethod
        def from_module(cls, module, ctx):
            b = CarryBuilder()
            block = cls(module)
            b.kept.extend((f"src.{n}", n) for n, _ in module.named_parameters())
            return block, b.finish(block, module)

    yield
    unregister_block("test_tuple_block")


def test_a_changed_output_structure_fails_the_check(tuple_block):
    rule = {"version": 1, "name": "t", "targets": [{"block": "test_tuple_block", "select": {"name": "body.1"}}]}
    with pytest.raises(ps.ValidationError, match="output_structure") as e:
        ps.convert(_FeatNet(), rule, input_size=16)
    conv = e.value.conversion
    checks = {c.name: c for c in conv.report.checks}
    assert not checks["output_structure"].passed and checks["preserved"].passed
    assert "dict(feat=tuple(Tensor(4), None), pooled=Tensor(2)) != original dict(feat=Tensor(4), pooled=Tensor(2))" in (
        checks["output_structure"].detail
    )


def test_every_tensor_leaf_is_compared():
    rule = {"version": 1, "name": "t", "targets": [{"block": "parc_conv", "select": {"name": "body.1"}}]}
    conv = ps.convert(_FeatNet(), rule, input_size=16)
    checks = {c.name: c for c in conv.report.checks}
    assert conv.report.passed
    assert "all 2 output tensors keep their shapes" in checks["output_shape"].detail
    assert checks["output_structure"].detail.endswith("dict(feat=Tensor(4), pooled=Tensor(2))")
