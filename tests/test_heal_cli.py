"""``parc-convert MODEL --rule R --heal DIR``: the heal runs between conversion and audit; its usage errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from heal_helpers import write_folder

import parc_surgery as ps
from parc_surgery.cli import cli

SLIM = ["resnet18", "--rule", "resnet_parc", "--model-arg", "channels=[8,16,32,64]", "--model-arg", "num_classes=4",
        "--input-size", "32", "--no-count"]  # fmt: skip


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_images")
    write_folder(root, n=24)
    return root


def test_heal_from_the_cli_writes_a_healed_model_and_report(folder, tmp_path):
    out, report = tmp_path / "m.safetensors", tmp_path / "r.md"
    heal = ["--heal", str(folder), "--heal-steps", "2", "--heal-images", "16", "--heal-batch-size", "8"]
    args = [*SLIM, *heal, "--heal-device", "cpu", "--heal-work-dir", str(tmp_path / "work"), "-o", str(out)]
    args += ["--report", str(report)]
    result = run(args)
    assert result.exit_code == 0, result.output
    assert "Heal stages" in result.output and "targets by damage" in result.output
    text = report.read_text()
    assert "## Heal" in text and "Healed on 16 unlabelled training images" in text
    assert (tmp_path / "work" / "stage2.safetensors").is_file()
    healed = ps.load(out)  # the saved weights are the healed ones: stage 2's checkpoint holds the same tensors
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "work" / "stage2.safetensors")
    state = healed.state_dict()
    assert all(k not in state or state[k].equal(v) for k, v in saved.items()) and "layer3.1.conv1.weight" in saved


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--heal-steps", "3"], "--heal-steps apply to --heal DIR"),
        (["--heal", "{missing}"], "does not exist"),
        (["--heal", "{folder}", "--dry-run"], "cannot run with --dry-run"),
    ],
)
def test_heal_usage_errors(folder, tmp_path, extra, match):
    extra = [e.format(missing=tmp_path / "none", folder=folder) for e in extra]
    result = run([*SLIM, *extra])
    assert result.exit_code == 2
    assert match in result.output
