"""The examples in examples/, run on a tiny budget so they cannot go stale.

The DDP fine-tuning example runs as a real two-process ``torchrun`` job (gloo on CPU); the others are
imported and their ``main`` called in-process. The custom block example's registrations are removed
afterwards so the block and type registries are left as the other tests expect them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import parc_surgery
from parc_surgery.blocks import is_block
from parc_surgery.ops import ParC

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _import_example(name: str):
    spec = importlib.util.spec_from_file_location(f"parc_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses / type names resolve through sys.modules
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# finetune_ddp.py: a real torchrun job with two processes


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "finetune_ddp.py"),
        "--model-args",
        json.dumps({"channels": [8, 16, 32, 64]}),
        "--image-size",
        "32",
        "--pretrain-steps",
        "3",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout, json.loads((out / "results.json").read_text()), out


def test_ddp_runs_two_ranks_and_compares_both_inits(ddp_run):
    stdout, result, _ = ddp_run
    assert result["world_size"] == 2
    assert result["backend"] in ("gloo", "nccl")
    rows = {r["init"]: r for r in result["rows"]}
    assert set(rows) == {"warm_start", "reference", None}
    for init in ("warm_start", "reference"):
        r = rows[init]
        assert 0.0 <= r["acc_converted"] <= 1.0 and 0.0 <= r["acc_finetuned"] <= 1.0
        assert 0.0 < r["loss_converted"] < 100 and 0.0 < r["loss_finetuned"] < 100
        assert r["targets"] == ["layer3.1", "layer4.1"]  # resnet_parc on resnet18
    # only rank 0 prints: the table appears once
    assert stdout.count("| model | test acc. (loss) after conversion") == 1
    assert stdout.count("world size 2") == 1


def test_ddp_saved_models_reload_with_equal_accuracy(ddp_run):
    _, result, out = ddp_run
    assert result["reload_equal"] is True
    for init in ("warm_start", "reference"):
        reload = next(r for r in result["rows"] if r["init"] == init)["reload"]
        assert reload["acc_reloaded"] == reload["acc_in_memory"]
        assert reload["max_abs_logit_diff"] == 0.0
        # the file is a real parc-surgery safetensors file: reload it here too
        model = parc_surgery.load(out / f"resnet18_{init}.safetensors")
        assert sum(isinstance(m, ParC) for m in model.modules()) == 4  # 2 blocks x (height, width)


# ----------------------------------------------------------------------------------------------------------------------
# export_onnx.py


def test_export_onnx_matches_eager_in_onnxruntime(tmp_path, capsys):
    example = _import_example("export_onnx")
    argv = ["--model", "resnet18", "--model-args", '{"channels": [8, 16, 32, 64]}', "--rule", "resnet_parc",
            "--input-size", "32", "--out", str(tmp_path), "--skip-original"]  # fmt: skip
    summary = example.main(argv)
    r = summary["converted"]
    assert r["matches"] and r["max_abs_diff"] <= r["tolerance"]
    assert r["parc_impl"].startswith("portable") and r["op_counts"]["Conv"] > 0 and r["forbidden"] == []
    assert r["pure_convolution"] and r["softmax"] == 0
    assert (tmp_path / "converted.onnx").is_file() and "original" not in summary
    assert json.loads((tmp_path / "results.json").read_text())["converted"] == r
    out = capsys.readouterr().out
    assert "| op | converted |" in out and "| Conv | " in out


# ----------------------------------------------------------------------------------------------------------------------
# custom_rule.yaml


def test_custom_rule_names_every_field_and_converts_resnet18():
    rule = parc_surgery.load_rule(EXAMPLES / "custom_rule.yaml")
    text = (EXAMPLES / "custom_rule.yaml").read_text()
    fields = (
        "version:",
        "name:",
        "description:",
        "input_size:",
        "targets:",
        "block:",
        "select:",
        "type:",
        "exact:",
        "stages:",
        "stage:",
        "fraction:",
        "include_first:",
        "attention:",
        "exclude:",
        "options:",
        "kernel_size:",
        "pe:",
        "impl:",
        "init:",
        "width_mult:",
        "block_options:",
    )
    for f in fields:
        assert f"\n{f}" in text or f" {f}" in text, f"custom_rule.yaml does not show {f}"
    assert rule.input_size == (224, 224) and len(rule.targets) == 2
    assert rule.targets[0].exclude is not None and rule.targets[0].select.names

    model = timm.create_model("resnet18", pretrained=False, channels=(8, 16, 32, 64))  # slim: same blocks, faster
    conv = parc_surgery.convert(model, rule)  # at the rule's input size, 224
    assert conv.report.passed
    got = {t.name: (t.ctx.kernel_hw, t.ctx.pe, t.ctx.impl, t.ctx.init) for t in conv.plan.targets}
    assert got == {
        "layer3.1": ((14, 14), True, "auto", "warm_start"),
        "layer4.1": ((7, 7), False, "spatial", "reference"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# custom_block.py


@pytest.fixture
def custom_block():
    example = _import_example("custom_block")
    try:
        yield example
    finally:
        example.unregister()


def test_custom_block_converts_the_toy_model(custom_block, capsys):
    assert is_block(custom_block.BLOCK_NAME)
    conv = custom_block.main()
    out = capsys.readouterr().out
    assert "all checks passed" in out and custom_block.BLOCK_NAME in out
    assert [t.name for t in conv.plan.targets] == ["stage2.1", "stage2.2"]  # stage2.0 excluded by the rule
    assert [t.ctx.pe for t in conv.plan.targets] == [True, False]  # pe: first
    assert all(isinstance(conv.model.get_submodule(t.name), custom_block.ParCMixer) for t in conv.plan.targets)
    rec = conv.carry["stage2.1"]
    assert {n for n, _ in rec.kept} == {"norm.weight", "norm.bias", "pw.weight", "pw.bias"}
    assert {n for n, _, _ in rec.transformed} == {"parc_h.weight", "parc_h.bias", "parc_w.weight", "parc_w.bias"}
    assert set(rec.new) == {"parc_h.pe", "parc_w.pe"} and rec.dropped == ()


def test_custom_block_warm_start_is_exact_on_constant_rows(custom_block):
    """Warm start: on features constant along the summed axis, the ParCs equal the k x k conv away from the border."""
    torch.manual_seed(0)
    mixer = custom_block.DepthwiseMixer(8).eval()
    ctx = parc_surgery.BlockContext(feature_size=(12, 12), pe=False)
    block, _ = custom_block.ParCMixer.from_module(mixer, ctx)
    # channels 0:4 (height ParC) constant along width, channels 4:8 (width ParC) constant along height
    x = torch.cat([torch.randn(1, 4, 12, 1).expand(-1, -1, -1, 12), torch.randn(1, 4, 1, 12).expand(-1, -1, 12, -1)], 1)
    with torch.no_grad():
        want = mixer.dw(x)  # zero padding: compare where the 5x5 window lies inside the map
        got = torch.cat([block.parc_h(x[:, :4]), block.parc_w(x[:, 4:])], 1)
    torch.testing.assert_close(got[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2], atol=1e-5, rtol=1e-5)
    assert (got - want).abs().max() > 1e-3  # the borders differ: ParC is circular, the conv zero-padded


def test_custom_block_imports_twice_and_unregisters(custom_block):
    again = _import_example("custom_block")  # re-registers instead of failing on the duplicate name
    assert parc_surgery.get_block(custom_block.BLOCK_NAME) is again.ParCMixer
    again.unregister()
    assert not is_block(custom_block.BLOCK_NAME)
