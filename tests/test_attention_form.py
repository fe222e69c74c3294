"""Reading an attention from the recorded dataflow: where the value rows are, module or inline, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parc_surgery.attention_carry import gather
from parc_surgery.attention_form import find_attention_form
from parc_surgery.errors import UnsupportedTargetError
from parc_surgery.probe import probe_model


class _Net(nn.Module):
    """Tokens (1, 1 + 16, C) from a 4x4 patch grid with a class token, then ``layer``."""

    def __init__(self, layer: nn.Module, dim: int = 12):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.layer = layer

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.layer(torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1))


def _form(layer: nn.Module, name: str = "layer"):
    torch.manual_seed(0)
    net = _Net(layer).eval()
    probe = probe_model(net, torch.randn(1, 3, 16, 16))
    return net, probe, find_attention_form(net.get_submodule(name), probe, name)


class HeadInterleaved(nn.Module):
    """qkv rows grouped per head as [q_h; k_h; v_h] (MaxViT's layout), SDPA."""

    def __init__(self, dim: int = 12, heads: int = 3):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.h, 3 * self.d).transpose(1, 2).chunk(3, dim=3)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class CatBias(nn.Module):
    """BEiT's fused qkv without a bias, fed cat(q_bias, zeros, v_bias) as its bias."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        return self.proj((q @ k.transpose(1, 2)).softmax(-1) @ v)


def _mixer_v(form, module):
    v = nn.Linear(form.dim, form.attn_dim, bias=form.value.bias is not None)
    gather(form.value, dict(module.named_parameters()), v.weight, v.bias)
    return v


def test_per_head_interleaved_value_rows():
    net, _, form = _form(HeadInterleaved())
    assert form.kind == "module" and form.layout == "tokens" and form.attn_dim == 12
    w = net.layer.qkv.weight
    # head h's value rows are [h * 12 + 8, h * 12 + 12): 3 heads of 4 channels, [q; k; v] inside each head
    want = torch.cat([w[h * 12 + 8 : h * 12 + 12] for h in range(3)])
    v = _mixer_v(form, net.layer)
    assert torch.equal(v.weight, want)
    assert torch.equal(v.bias, torch.cat([net.layer.qkv.bias[h * 12 + 8 : h * 12 + 12] for h in range(3)]))
    assert form.proj is not None and form.proj.is_whole("proj.weight", 12)


def test_value_bias_assembled_from_a_cat_of_parameters():
    net, _, form = _form(CatBias())
    v = _mixer_v(form, net.layer)
    assert torch.equal(v.weight, net.layer.qkv.weight[24:]) and torch.equal(v.bias, net.layer.v_bias)
    assert set(form.value.names) >= {"qkv.weight", "v_bias"}


def test_token_grid_and_prefix_from_the_dataflow():
    _, _, form = _form(HeadInterleaved())
    assert (form.grid, form.num_prefix_tokens, form.num_tokens) == ((4, 4), 1, 17)


class ResidualInside(HeadInterleaved):
    def forward(self, x):
        return x + super().forward(x)


class ParallelMLP(HeadInterleaved):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, x):
        return super().forward(x) + self.fc(x)


class Gated(HeadInterleaved):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(12, 12)

    def forward(self, x):
        return super().forward(x) * self.gate(x).sigmoid()


@pytest.mark.parametrize(
    "layer, kind",
    [(HeadInterleaved, "module"), (Gated, "module"), (ResidualInside, "inline"), (ParallelMLP, "inline")],
)
def test_module_or_inline(layer, kind):
    _, _, form = _form(layer())
    assert form.kind == kind


class LearnedQueries(nn.Module):
    """Keys and values from a learned memory (Perceiver style): cross-attention."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.memory = nn.Parameter(torch.randn(1, 5, dim))
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)

    def forward(self, x):
        k, v = self.kv(self.memory).chunk(2, -1)
        return (self.q(x) @ k.transpose(1, 2)).softmax(-1) @ v


def test_keys_from_parameters_alone_are_cross_attention():
    with pytest.raises(UnsupportedTargetError, match="computed from parameters alone"):
        _form(LearnedQueries())
