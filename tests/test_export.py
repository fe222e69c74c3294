"""parc_surgery.export and ``parc-convert --export``: ONNX, OpenVINO and ExecuTorch files of every bundled
conversion, ParC in the portable form (slice + concat + depthwise conv), run in each runtime, equal to eager;
atomic writes, no overwrite without force, nothing written on failure, missing runtimes named."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import parc_surgery
from parc_surgery import CheckpointError, ConfigError, ParC, ValidationError
from parc_surgery import exporter as exp
from parc_surgery.blocks.metaformer import ParCMetaFormerBlock
from parc_surgery.blocks.parc_split import ParCSplit
from parc_surgery.cli import cli
from parc_surgery.export_portable import PortableMetaFormer, PortableParC, PortableParCSplit, to_portable
from parc_surgery.export_runtimes import FORMATS, get_runtime

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("executorch")

SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte"}
SIZE = 64
BUNDLED = {  # the registered conversions, small: 10 classes, 64x64 inputs
    "parc_mobilevit_xxs": {},
    "parc_mobilevit_xs": {},
    "parcnet_s": {},
    "parc_resnet50": {},
    "parc_mobilenetv2_100": {},
    "parc_convnext_xt": {},
    "parc_deit_tiny_patch16_224": {"img_size": SIZE},
}
ATOL = 1e-4  # the bound (relative to max(1, max |eager output|))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **BUNDLED[name]).eval()


def _forbidden(fmt: str, ops: dict) -> list[str]:
    bad = {"onnx": ("DFT", "STFT"), "openvino": ("DFT", "IDFT", "RDFT", "IRDFT"), "executorch": ("fft",)}[fmt]
    return [op for op in ops if any(b in op for b in bad)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n == "parc_mobilevit_xxs" else pytest.mark.slow) for n in BUNDLED]
)
def test_every_format_on_every_bundled_conversion(name, fmt, tmp_path):
    model = _model(name)
    model.train()  # exported in eval, handed back in training mode
    path = tmp_path / f"m{SUFFIX[fmt]}"
    r = parc_surgery.export(model, fmt, path, input_size=SIZE)
    assert model.training and all(m.training for m in model.modules())
    assert r.matches and r.max_abs_diff <= r.tolerance and r.forbidden == ()
    assert r.parc_layers == sum(isinstance(m, ParC) for m in model.modules()) > 0
    assert [Path(f).name for f in r.files] == [p.name for p in exp.export_paths(path, fmt)]
    assert all(Path(f).is_file() for f in r.files)
    assert sorted(os.listdir(tmp_path)) == sorted(Path(f).name for f in r.files)  # no temporary left behind
    assert not _forbidden(fmt, r.ops)
    if fmt == "onnx":  # ParC as the official code shipped it
        assert "Pad" not in r.ops and r.ops["Slice"] > 0 and r.ops["Concat"] > 0 and r.ops["Conv"] > 0
    if fmt == "executorch":
        assert r.ops.get("XnnpackBackend", 0) >= 1
    # the written file again, on another input: nothing of the export input is baked into the graph
    model.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    got = get_runtime(fmt).load([Path(f) for f in r.files], None)(x)[0]
    with torch.no_grad():
        ref = model(x)
    assert float((got - ref).abs().max()) <= ATOL * max(1.0, float(ref.abs().max()))


def test_conversion_object_batch_and_summary(tmp_path):
    conv = parc_surgery.convert(timm.create_model("mobilevit_xxs", num_classes=5), "vit2parc", input_size=64,
                                validate=False, count=False)  # fmt: skip
    r = parc_surgery.export(conv, "onnx", tmp_path / "c.onnx", batch=2)
    assert r.input_shape == (2, 3, 64, 64)  # the conversion's planned input size
    check = r.to_check()
    assert check.name == "export_onnx" and check.passed and "slice + concat + depthwise conv" in check.detail
    assert json.loads(json.dumps(r.to_dict()))["ops"] == r.ops


def test_refuses_to_overwrite_and_force_replaces(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ParC(4, 8, "height", impl="fft"))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="exists already; pass force=True"):
        parc_surgery.export(model, "onnx", path, input_size=8)
    assert path.read_bytes() == b"keep me"
    parc_surgery.export(model, "onnx", path, input_size=8, force=True)
    assert path.read_bytes() != b"keep me"
    ov_bin = tmp_path / "o.bin"  # OpenVINO writes two files: either existing one blocks the export
    ov_bin.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"o\.bin"):
        parc_surgery.export(model, "openvino", tmp_path / "o.xml", input_size=8)
    assert not (tmp_path / "o.xml").exists()


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ParC(4, 8, "width"))
    rt = get_runtime("onnx")
    monkeypatch.setattr(rt, "load", lambda files, threads: lambda x: [torch.zeros(1, 4, 8, 8)])
    with pytest.raises(ValidationError, match="nothing written"):
        parc_surgery.export(model, "onnx", tmp_path / "m.onnx", input_size=8)
    assert os.listdir(tmp_path) == []


def test_missing_runtime_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match=r'pip install "parc-surgery\[openvino\]"'):
        parc_surgery.export(nn.Conv2d(3, 3, 1), "openvino", tmp_path / "m.xml", input_size=4)
    monkeypatch.setitem(sys.modules, "executorch", None)
    result = CliRunner().invoke(cli, ["resnet18", "--rule", "resnet_parc", "--export", "executorch"])
    assert result.exit_code == 2 and 'pip install "parc-surgery[executorch]"' in result.output


def test_bad_arguments(tmp_path):
    m = nn.Conv2d(3, 3, 1)
    with pytest.raises(ConfigError, match="format must be one of"):
        parc_surgery.export(m, "tflite", tmp_path / "m.tflite", input_size=4)
    with pytest.raises(ConfigError, match=r"written to a \.pte file"):
        parc_surgery.export(m, "executorch", tmp_path / "m.onnx", input_size=4)
    with pytest.raises(ConfigError, match="batch"):
        parc_surgery.export(m, "onnx", tmp_path / "m.onnx", input_size=4, batch=0)
    with pytest.raises(ConfigError, match="input_size is needed"):
        parc_surgery.export(m, "onnx", tmp_path / "m.onnx")
    with pytest.raises(CheckpointError, match="does not exist"):
        parc_surgery.export(m, "onnx", tmp_path / "no" / "m.onnx", input_size=4)
    with torch.device("meta"):
        meta = nn.Conv2d(3, 3, 1)
    with pytest.raises(ConfigError, match="meta device"):
        parc_surgery.export(meta, "onnx", tmp_path / "m.onnx", input_size=4)
    assert os.listdir(tmp_path) == []


def test_portable_form_freezes_per_size_and_refuses_other_sizes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), ParCMetaFormerBlock(16, 6, pe=True, ca_reduction=4)).eval()
    twice = nn.ModuleDict({"p": ParC(8, 6, "width", impl="fft")})
    x = torch.randn(1, 3, 6, 6)
    d = to_portable(model, x)
    assert isinstance(d[1], PortableMetaFormer) and isinstance(model[1], ParCMetaFormerBlock)  # a copy
    with torch.no_grad():
        torch.testing.assert_close(d(x), model(x), rtol=1e-5, atol=1e-5)  # folded vs the eager fast path
    with pytest.raises(ConfigError, match=r"frozen for inputs of size \(6, 6\).*export again"):
        d(torch.randn(1, 3, 6, 8))

    class TwoSizes(nn.Module):  # one ParC called at two widths: kept as a ParC (resized in the graph)
        def __init__(self):
            super().__init__()
            self.m = twice

        def forward(self, z):
            return self.m["p"](z).mean() + self.m["p"](z[..., :4]).mean()

    d2 = to_portable(TwoSizes(), torch.randn(1, 8, 5, 6))
    assert isinstance(d2.m["p"], ParC)
    d3 = to_portable(nn.Sequential(nn.Identity(), ParC(8, 6, "height")), torch.randn(1, 8, 5, 6))
    assert isinstance(d3[1], PortableParC) and d3[1].n == 5


def _random_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn_like(t))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    return bn


class _SplitThenNorm(nn.Module):
    def __init__(self, split, bn, *, reuse=False):
        super().__init__()
        self.split, self.bn, self.reuse = split, bn, reuse

    def forward(self, x):
        y = self.split(x)
        return torch.relu(self.bn(y) + (y if self.reuse else 0))


@pytest.mark.parametrize(("dense", "pe"), [(False, True), (False, False), (True, True)])
def test_portable_split_folds_the_batchnorm_it_feeds(dense, pe):
    """A ParCSplit whose output feeds only a BatchNorm: the norm folded into its kernels and offset (conv biases
    without PE, one position map with it); kept apart when the split's output is used twice. Same function."""
    torch.manual_seed(0)
    for reuse, offsets_as in ((False, "map"), (False, "lines"), (True, "map")):
        split = ParCSplit(8, (6, 5), dense=dense, pe=pe)
        model = _SplitThenNorm(split, _random_bn(nn.BatchNorm2d(8)), reuse=reuse).double().eval()
        x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
        d = to_portable(model, x, offsets_as=offsets_as)
        assert isinstance(d.split, PortableParCSplit) and isinstance(model.split, ParCSplit)  # a copy
        assert isinstance(d.bn, nn.Identity if not reuse else nn.BatchNorm2d)
        assert (d.split.bias_h is None) == pe
        assert (d.split.offset is not None, d.split.off_h is not None) == (
            pe and offsets_as == "map",
            pe and offsets_as == "lines",
        )
        with torch.no_grad():
            torch.testing.assert_close(d(x), model(x), rtol=1e-10, atol=1e-10)  # float64: rounding only
        with pytest.raises(ConfigError, match=r"frozen for inputs of size \(6, 5\)"):
            d(torch.randn(2, 8, 6, 6, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"offsets_as must be one of \('map', 'lines'\), got 'grid'"):
        to_portable(model, x, offsets_as="grid")


def test_portable_inverted_residual_keeps_the_activation():
    """timm's BatchNormAct2d after the ParC-MobileNetV2 split: the norm folded, its activation kept."""
    torch.manual_seed(0)
    model = _model("parc_mobilenetv2_100")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn(m)
    x = torch.randn(1, 3, SIZE, SIZE)
    d = to_portable(model, x)
    blocks = [b for b in d.modules() if isinstance(getattr(b, "conv_dw", None), PortableParCSplit)]
    assert len(blocks) == sum(isinstance(m, ParCSplit) for m in model.modules()) > 0
    assert all(not isinstance(b.bn2, nn.BatchNorm2d) and isinstance(b.bn2.act, nn.ReLU6) for b in blocks)
    with torch.no_grad():
        ref = model(x)
        # float32, folded vs unfolded BatchNorm: rounding, relative to the output's scale
        assert float((d(x) - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_cli_export(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p.onnx"
    args = ["mobilevit_xxs", "--rule", "vit2parc", "--input-size", "64", "--model-arg", "num_classes=4", "--no-count"]
    result = runner.invoke(cli, [*args, "--export", "onnx", "--export-path", str(out), "--report",
                                 str(tmp_path / "r.json")], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file() and "wrote onnx export" in result.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "r.json").read_text())["checks"]}
    assert checks["export_onnx"]["passed"] and "Slice" in checks["export_onnx"]["detail"]
    again = runner.invoke(cli, [*args, "--export", "onnx", "--export-path", str(out)])
    assert again.exit_code == 1 and "exists already" in again.output  # refused before converting
    usage = runner.invoke(cli, [*args, "--export-path", str(out)])
    assert usage.exit_code == 2 and "--export-path needs --export" in usage.output
    dry = runner.invoke(cli, [*args, "--export", "onnx", "--dry-run"])
    assert dry.exit_code == 2 and "--dry-run" in dry.output
    bad = runner.invoke(cli, [*args, "--export", "onnx", "--export-path", str(tmp_path / "p.pte")])
    assert bad.exit_code == 2 and "written to a .onnx file" in bad.output
