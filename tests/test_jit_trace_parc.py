"""``torch.jit.trace`` (the legacy ONNX exporter's tracer) records every ParC path, the in-place one included."""

from __future__ import annotations

import pytest
import torch

from parc_surgery import ParC


@pytest.mark.parametrize("n", [8, 16, 40, 64])  # short, broadcast and (n >= 32, no grad) in-place GEMM layouts
@pytest.mark.parametrize("axis", ["height", "width"])
def test_jit_traced_parc_equals_eager(n, axis):
    torch.manual_seed(0)
    m = ParC(8, n, axis, pe=True, bias=True, impl="spatial").eval()
    with torch.no_grad():
        traced = torch.jit.trace(m, torch.randn(2, 8, n, n), check_trace=False)
        x = torch.randn(2, 8, n, n)  # a new input: a graph that ignored its input would fail here
        torch.testing.assert_close(traced(x), m(x), atol=1e-5, rtol=1e-5)
