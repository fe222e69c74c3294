"""The legacy (TorchScript) ONNX exporter records ParC (in the portable conv form, whatever its impl) as it runs."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from parc_surgery import ParC

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("n", [8, 16, 40])  # the sizes of the three spatial layouts eager would take
@pytest.mark.parametrize("axis", ["height", "width"])
def test_legacy_onnx_export_of_parc_equals_eager(n, axis, tmp_path):
    torch.manual_seed(0)
    m = ParC(8, n, axis, pe=True, bias=True, impl="spatial").eval()
    path = str(tmp_path / "parc.onnx")
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(2, 8, n, n),), path, dynamo=False, opset_version=18)
        x = torch.randn(2, 8, n, n)  # a new input: a graph that dropped the computation fails here
        ref = m(x)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()], "the exported graph does not read its input"
    y = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
