"""ONNX export check: converted models export, run in onnxruntime, match eager, and are pure convolution."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from parc_surgery import onnx_check  # noqa: E402
from parc_surgery.api import convert  # noqa: E402
from parc_surgery.errors import ConfigError, ValidationError  # noqa: E402
from parc_surgery.ops import ParC  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10)
    return convert(model, "vit2parc", input_size=SIZE, impl="fft", validate=False, count=False).model


class _Attention(nn.Module):
    """softmax(Q K^T) V over the pixels of a small map: what a pure-convolution census must flag."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = (q @ k.transpose(1, 2)).softmax(-1)
        return (a @ v).mean(1)


def test_converted_model_exports_matches_and_is_pure_convolution(converted, tmp_path):
    converted.train()
    path = tmp_path / "m.onnx"
    r = onnx_check.check_onnx(converted, SIZE, path=path)
    assert r.exporter == "dynamo" and r.parc_impl.startswith("portable")
    assert r.matches and r.max_abs_diff <= r.tolerance
    assert r.pure_convolution and r.softmax == 0 and r.attention_matmuls == ()
    assert r.op_counts["Conv"] > 20 and "Softmax" not in r.op_counts
    # ParC in the portable form the official code shipped: slice + concat + conv, never DFT or Pad(mode=wrap)
    assert r.forbidden == () and "DFT" not in r.op_counts and "Pad" not in r.op_counts
    assert r.op_counts["Slice"] > 0 and r.op_counts["Concat"] > 0
    assert path.is_file() and r.path == str(path)
    assert sum(r.op_counts.values()) == len(onnx.load(str(path)).graph.node)
    # the model is left as it was: training flag and ParC impls
    assert converted.training
    assert {m.impl for m in converted.modules() if isinstance(m, ParC)} == {"fft"}
    check = r.to_check()
    assert check.name == "onnx" and check.passed and "pure convolution: yes" in check.detail


def test_attention_is_not_pure_convolution(tmp_path):
    torch.manual_seed(0)
    r = onnx_check.check_onnx(_Attention(), 6)
    assert r.matches
    assert r.softmax == 1 and len(r.attention_matmuls) == 2
    assert not r.pure_convolution and "pure convolution: no" in r.summary()
    assert r.parc_impl.startswith("n/a")


def test_falls_back_to_the_legacy_exporter(monkeypatch):
    real = onnx_check._export

    def no_dynamo(model, x, path, *, dynamo, opset):  # (model: the portable copy)
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable")
        return real(model, x, path, dynamo=dynamo, opset=opset)

    monkeypatch.setattr(onnx_check, "_export", no_dynamo)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ParC(4, 8, "height", impl="fft"), ParC(4, 8, "width"))
    r = onnx_check.check_onnx(model, (8, 12))
    assert r.exporter == "legacy" and r.matches and r.pure_convolution and r.forbidden == ()
    assert len(r.attempts) == 1 and "dynamo exporter unavailable" in r.attempts[0]
    assert {m.impl for m in model.modules() if isinstance(m, ParC)} == {"fft", "auto"}  # the model is unchanged


def test_every_exporter_failing_is_a_validation_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnx_check, "_export", broken)
    with pytest.raises(ValidationError, match=r"every exporter:\n  - dynamo exporter.*boom\n  - legacy exporter"):
        onnx_check.check_onnx(nn.Conv2d(3, 3, 1), 4)


def test_missing_onnx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r'pip install "parc-surgery\[onnx\]"'):
        onnx_check.check_onnx(nn.Conv2d(3, 3, 1), 4)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="input_size"):
        onnx_check.check_onnx(nn.Conv2d(3, 3, 1), 0)
    with torch.device("meta"):
        model = nn.Conv2d(3, 3, 1)
    with pytest.raises(ConfigError, match="meta device"):
        onnx_check.check_onnx(model, 4)
