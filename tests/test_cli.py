"""``parc-convert`` (and ``python -m parc_surgery``): outputs, files written or not, and every exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from parc_surgery import api
from parc_surgery import checkpoint as ckpt
from parc_surgery.blocks import CarryRecord, register_block, unregister_block
from parc_surgery.cli import cli
from parc_surgery.errors import ValidationError

R18 = ["resnet18", "--rule", "resnet_parc", "--model-arg", "num_classes=10"]


def run(args: list[str], cwd=None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, args, catch_exceptions=False)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, request):
    """One real conversion through the CLI with --output and --report; captures the Conversion it saved."""
    d = tmp_path_factory.mktemp("cli")
    captured = {}
    real_save = ckpt.save

    def spy(obj, path, **kw):
        captured["conv"] = obj
        return real_save(obj, path, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt, "save", spy)
    try:
        result = run([*R18, "--input-size", "64", "-o", str(d / "m.safetensors"), "--report", str(d / "r.json")])
    finally:
        mp.undo()
    return result, d, captured["conv"]


# ----------------------------------------------------------------------------------------------------------------------
# Success


def test_success_prints_plan_and_audit_and_writes_files(converted):
    result, d, conv = converted
    assert result.exit_code == 0, result.output
    assert "Plan: resnet18 with resnet_parc @ 64x64" in result.stdout
    assert "layer3.1" in result.stdout and "Checks (8/8 passed)" in result.stdout
    assert "wrote model" in result.stderr and "wrote report" in result.stderr
    report = json.loads((d / "r.json").read_text())
    assert report["passed"] is True and report["model"] == "resnet18" and report["input_size"] == [64, 64]
    assert report["macs_after"] < report["macs_before"]
    assert [t["name"] for t in report["targets"]] == [t.name for t in conv.plan.targets]


def test_output_round_trip_is_exact(converted):
    _, d, conv = converted
    loaded = ckpt.load(d / "m.safetensors")
    x = torch.randn(2, 3, 64, 64)
    conv.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), conv.model(x))
    assert ckpt.read_manifest(d / "m.safetensors")["model"] == {
        "kind": "timm", "name": "resnet18", "args": {"num_classes": 10}
    }  # fmt: skip


def test_existing_output_needs_force(converted):
    _, d, _ = converted
    path = d / "m.safetensors"
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    result = run([*R18, "--input-size", "64", "-o", str(path)])
    assert result.exit_code == 1
    assert "--force" in result.stderr and "exists already" in result.stderr
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_existing_report_needs_force(converted):
    _, d, _ = converted
    path = d / "r.json"
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    result = run([*R18, "--input-size", "64", "--report", str(path)])
    assert result.exit_code == 1
    assert "--force" in result.stderr and "exists already" in result.stderr
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_saved_file_audit_check_onnx_and_force(converted):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    _, d, _ = converted
    copy = d / "copy.safetensors"
    copy.write_bytes(b"old")
    args = [str(d / "m.safetensors"), "--check-onnx", "--no-count", "--report", str(d / "audit.md"), "-o", str(copy)]
    assert run(args).exit_code == 1 and copy.read_bytes() == b"old"  # exists: refused without --force
    result = run([*args, "--force"])
    assert result.exit_code == 0, result.output
    md = (d / "audit.md").read_text()
    assert "| onnx | PASS |" in md and "pure convolution: yes" in md and "| loads | PASS |" in md
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ckpt.load(copy)(x), ckpt.load(d / "m.safetensors")(x))


def test_dry_run_writes_nothing(tmp_path):
    out, rep = tmp_path / "m.safetensors", tmp_path / "r.md"
    result = run(
        ["vit_base_patch16_224", "--rule", "vit_attention2parc", "--dry-run", "-o", str(out), "--report", str(rep)]
    )
    assert result.exit_code == 0, result.output
    assert "blocks.11.attn" in result.stdout and "meta device" in result.stdout
    assert "would be written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_inspect_and_two_number_input_size():
    result = run(["mobilevit_xxs", "--rule", "vit2parc", "--inspect", "--input-size", "64", "96"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "mobilevit_xxs @ 64x96" in out
    assert "Replaceable blocks" in out and "Attention token mixers (9)" in out
    assert "Selected by the rule (3)" in out and "stages.4.1" in out


def test_list_rules_and_help():
    result = run(["--list-rules"])
    assert result.exit_code == 0
    assert all(name in result.stdout for name in ("vit2parc", "resnet_parc", "convnext_parc", "vit_attention2parc"))
    help_text = run(["--help"]).stdout
    assert "Exit codes:" in help_text and "3  the rule selected nothing" in help_text


# ----------------------------------------------------------------------------------------------------------------------
# Exit codes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*R18, "--impl", "fastest"], "Invalid value for '--impl'"),
        (["resnet18"], "missing option --rule"),
        ([], "missing argument MODEL"),
        (["resnet19", "--rule", "resnet_parc"], "did you mean: resnet18"),
        ([*R18, "--input-size", "64x"], "--input-size"),
        ([*R18, "--model-arg", "num_classes"], "KEY=VALUE"),
        ([*R18, "--model-arg", "checkpoint_path=/x.pth"], "checkpoint_path"),
        ([*R18, "--report", "r.txt"], ".json or .md"),
        (["missing.safetensors"], "no such file"),
    ],
)
def test_usage_errors_exit_2(args, message):
    result = run(args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_bad_rule_file_exits_2(tmp_path):
    rule = tmp_path / "bad.yaml"
    rule.write_text("version: 1\nname: bad\ntargets:\n  - block: parc_bottleneck\n    selct: {type: Bottleneck}\n")
    result = run(["resnet18", "--rule", str(rule), "--input-size", "32"])
    assert result.exit_code == 2
    assert "bad.yaml" in result.stderr and "did you mean 'select'?" in result.stderr


def test_nothing_matched_exits_3():
    result = run(["resnet18", "--rule", "vit2parc", "--input-size", "32"])
    assert result.exit_code == 3
    assert "selected nothing" in result.stderr and "--inspect" in result.stderr


class _NanBlock(nn.Module):
    """Replaces a BasicBlock with one that keeps shapes but outputs NaN: the 'finite' check must fail."""

    replaces = ("timm.models.resnet.BasicBlock",)

    def forward(self, x):
        return x * float("nan")

    @classmethod
    def check_source(cls, module, ctx) -> None:
        return None

    @classmethod
    def from_module(cls, module, ctx):
        return cls(), CarryRecord(dropped=tuple(n for n, _ in module.named_parameters()))


@pytest.fixture
def nan_rule(tmp_path):
    register_block("test_nan_block")(_NanBlock)  # registered only for this test: the registry is global
    rule = tmp_path / "nan.yaml"
    rule.write_text("version: 1\nname: nan\ntargets:\n  - block: test_nan_block\n    select: {name: layer4.1}\n")
    try:
        yield rule
    finally:
        unregister_block("test_nan_block")


def test_failed_check_exits_4_writes_report_not_model(tmp_path, nan_rule):
    out, rep = tmp_path / "m.safetensors", tmp_path / "r.json"
    result = run(
        ["resnet18", "--rule", str(nan_rule), "--input-size", "32", "--no-count", "-o", str(out), "--report", str(rep)]
    )
    assert result.exit_code == 4, result.output
    assert "Check failed" in result.stderr and "finite" in result.stderr
    assert not out.exists()
    report = json.loads(rep.read_text())
    assert report["passed"] is False
    assert "finite" in [c["name"] for c in report["checks"] if not c["passed"]]


def test_validation_error_exits_4_and_other_errors_exit_1(monkeypatch):
    def invalid(*args, **kwargs):
        raise ValidationError("converted model disagrees")

    monkeypatch.setattr(api, "convert", invalid)
    result = run([*R18, "--input-size", "32"])
    assert result.exit_code == 4 and "converted model disagrees" in result.stderr

    def crash(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(api, "convert", crash)
    result = run([*R18, "--input-size", "32"])
    assert result.exit_code == 1
    assert "RuntimeError: kaboom" in result.stderr and "--debug" in result.stderr and "Traceback" not in result.stderr
    result = run([*R18, "--input-size", "32", "--debug"])
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_output_in_missing_directory_exits_1(tmp_path):
    result = run([*R18, "--input-size", "32", "-o", str(tmp_path / "no" / "m.safetensors")])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr and "no" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# As a real process


def _procs(runs: dict[str, list[str]], cwd) -> dict[str, tuple[int, str, str]]:
    """Run several ``python -m parc_surgery`` processes at once (each one pays for importing torch and timm)."""
    procs = {
        k: subprocess.Popen(
            [sys.executable, "-m", "parc_surgery", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, args in runs.items()
    }
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = (p.returncode, stdout, stderr)
    return out


def test_as_a_real_process_every_exit_code(tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    res = _procs(
        {
            "ok": ["resnet18", "--rule", "resnet_parc", "--input-size", "32", "--no-count", "-o", "m.safetensors"],
            "exists": ["resnet18", "--rule", "resnet_parc", "--input-size", "32", "-o", "taken.safetensors"],
            "usage": ["resnet19", "--rule", "resnet_parc"],
            "nomatch": ["resnet18", "--rule", "vit2parc", "--input-size", "32"],
        },
        tmp_path,
    )
    code, stdout, stderr = res["ok"]
    assert code == 0, stderr
    assert "Checks (8/8 passed)" in stdout and "\x1b[" not in stdout  # no colour codes in a pipe
    model = ckpt.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 1000)
    code, _, stderr = res["exists"]
    assert code == 1 and "--force" in stderr and (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    code, _, stderr = res["usage"]
    assert code == 2 and "resnet18" in stderr and "Traceback" not in stderr
    code, _, stderr = res["nomatch"]
    assert code == 3 and "selected nothing" in stderr and "Traceback" not in stderr
