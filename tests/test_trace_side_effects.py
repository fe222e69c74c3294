"""A symbolic trace leaves no fx Proxy behind in a module's own caches (timm's EfficientFormerV2 pattern)."""

from __future__ import annotations

import torch
from torch import nn

import parc_surgery as ps
from parc_surgery.probe import trace_model


class CachedBias(nn.Module):
    """Caches a computed bias per device in eval, as timm's ``Attention2d.get_attention_biases`` does."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(c))
        self.cache: dict[str, torch.Tensor] = {}
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        if self.training:
            b = self.bias * 2
        else:
            key = str(x.device)
            if key not in self.cache:
                self.cache[key] = self.bias * 2
            b = self.cache[key]
        return x + self.conv(x) + b[None, :, None, None]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[CachedBias() for _ in range(4)])

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_tracing_twice_reads_no_proxy_of_the_first_trace():
    block = CachedBias().eval()
    for _ in range(2):  # the second trace would read the first trace's cached Proxy
        gm, why = trace_model(block)
        assert gm is not None, why
        assert block.cache == {}  # the trace's cache entry was undone
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)  # same ops in the same order: bit-identical


def test_eval_model_with_trace_time_caches_converts():
    torch.manual_seed(0)
    net = Net().eval()  # eval: the blocks fill their caches when traced
    conv = ps.convert(net, "convstage2parc", input_size=32)
    assert conv.report.passed
    assert len(conv.plan.targets) >= 1
    assert all(b.cache == {} or all(isinstance(v, torch.Tensor) for v in b.cache.values()) for b in net.blocks)


class WithConstant(nn.Module):
    """A tensor made in forward: the tracer stores it on the root as ``_tensor_constant0``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + torch.ones(1)


def test_the_graph_keeps_the_tracers_constants_and_the_model_does_not():
    m = WithConstant()
    before = set(vars(m))
    gm, why = trace_model(m)
    assert gm is not None, why
    assert set(vars(m)) == before  # nothing left on the user's module
    assert hasattr(gm, "_tensor_constant0")
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)  # same ops in the same order: bit-identical
