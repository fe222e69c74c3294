"""``parc-convert`` with every model source form: convert, save, reload bit for bit, audit, inspect, dry run.

The transformers directory and the user's builder package are written by the tests into a temporary
directory, which is the current directory while the CLI runs (a builder is imported from there).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from source_models import (
    BUILDER,
    BUILDER_ARGS,
    CONVNEXT_ARGS,
    logits,
    source_workdir,
)

import parc_surgery as ps
from parc_surgery import checkpoint as ckpt
from parc_surgery.cli import cli
from parc_surgery.sources import create_model

SIZE = "32"


def _margs(args: dict) -> list[str]:
    return [x for k, v in args.items() for x in ("--model-arg", f"{k}={json.dumps(v)}")]


FORMS = {  # id: (MODEL, args, rule)
    "torchvision": ("torchvision:resnet18", {"num_classes": 10}, "resnet_parc"),
    "transformers-dir": ("transformers:tiny_convnext", {}, "convstage2parc"),
    "transformers-class": ("transformers:ConvNextForImageClassification", CONVNEXT_ARGS, "convstage2parc"),
    "builder": (BUILDER, BUILDER_ARGS, "resnet_parc"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A current directory holding the user package and a transformers model directory."""
    with source_workdir(tmp_path_factory.mktemp("sources")) as d:
        yield d


def run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_converts_saves_reloads_and_audits(workdir, form, monkeypatch):
    spec, args, rule = FORMS[form]
    out, rep, audit = workdir / f"{form}.safetensors", workdir / f"{form}.json", workdir / f"{form}-audit.json"
    captured = {}
    real_save = ckpt.save

    def spy(obj, path, **kw):
        captured["conv"] = obj
        return real_save(obj, path, **kw)

    monkeypatch.setattr(ckpt, "save", spy)
    result = run([spec, *_margs(args), "--rule", rule, "--input-size", SIZE, "-o", str(out), "--report", str(rep)])
    assert result.exit_code == 0, result.output
    assert f"Plan: {spec} with {rule} @ 32x32" in result.stdout and "wrote model" in result.stderr
    assert json.loads(rep.read_text())["passed"] is True

    # reloads bit for bit (a builder's file only onto the user's model, as the file never imports code)
    conv = captured["conv"]
    loaded = ps.load(out, create_model(spec, **args)) if form == "builder" else ps.load(out)
    want, got = conv.model.eval().state_dict(), loaded.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(logits(loaded(x)), logits(conv.model(x)))

    # the saved file audited from the CLI, with ONNX
    base = ["--model", spec, *_margs(args)] if form == "builder" else []
    result = run([str(out), *base, "--check-onnx", "--no-count", "--report", str(audit)])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(audit.read_text())["checks"]}
    assert set(checks) == {"loads", "runs", "runs_non_square", "onnx"}
    assert all(c["passed"] for c in checks.values()), checks
    assert "digests" in checks["loads"]["detail"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_inspects_and_dry_runs(workdir, form, tmp_path):
    spec, args, rule = FORMS[form]
    result = run([spec, *_margs(args), "--rule", rule, "--input-size", SIZE, "--inspect"])
    assert result.exit_code == 0, result.output
    assert "Selected by the rule" in result.stdout and "stages" in result.stdout
    target = tmp_path / "m.safetensors"
    result = run([spec, *_margs(args), "--rule", rule, "--input-size", SIZE, "--dry-run", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert "meta device" in result.stdout and "would be written" in result.stderr
    assert not target.exists()


def test_a_builder_file_needs_model(workdir):
    conv = ps.convert(create_model(BUILDER, **BUILDER_ARGS), "resnet_parc", input_size=32, validate=False, count=False)
    path = ps.save(conv, workdir / "needs_model.safetensors")
    result = run([str(path)])
    assert result.exit_code == 1
    assert "never imports code" in result.stderr and f"--model {BUILDER}" in result.stderr
    result = run([str(path), "--model", BUILDER, *_margs(BUILDER_ARGS), "--dry-run"])  # shapes only, on meta
    assert result.exit_code == 0, result.output
    assert "architecture rebuilt on the meta device" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["torchvision:resnet1000", "--rule", "resnet_parc"], "unknown torchvision model 'resnet1000'"),
        (["transformers:NoSuchModelClass", "--rule", "resnet_parc"], "neither a directory nor"),
        (["a:b:c", "--rule", "resnet_parc"], "not one of the forms"),
        (["nosuch_pkg_xyz.nets:build", "--rule", "resnet_parc"], "no module named 'nosuch_pkg_xyz'"),
        (["transformers:ConvNextForImageClassification", "--pretrained", "--rule", "x"], "timm and torchvision"),
        (["resnet18", "--model", BUILDER, "--rule", "resnet_parc"], "--model gives the unconverted model"),
    ],
)
def test_bad_sources_exit_2_and_list_the_forms(workdir, args, message):
    result = run(args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    if "forms" in message or "unknown" in message or "neither" in message:
        assert "valid forms: NAME (e.g. mobilevit_s); torchvision:NAME" in result.stderr


def test_list_sources_and_help_show_the_forms():
    result = run(["--list-sources"])
    assert result.exit_code == 0
    for form in ("torchvision:NAME", "transformers:PATH", "transformers:CLASS", "package.module:function"):
        assert form in result.stdout
    assert "package.module:function" in run(["--help"]).stdout
