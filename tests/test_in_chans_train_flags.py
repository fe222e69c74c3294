"""Input channels inferred once, and every module's train / eval flag kept (issue 13).

* ``in_chans``: one helper (:func:`parc_surgery.inputs.get_in_chans`) feeds the probe, the MAC counter,
  validation, the CLI audit and the ONNX check; 1- and 4-channel models convert.
* train flags: ``Conversion.model`` has every module's flag of the input model (mixed flags too), replacement
  blocks the flag of the module they replace; every eval-mode pass of the engine restores each module's flag.
"""

from __future__ import annotations

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import parc_surgery as ps
from parc_surgery.cli import cli
from parc_surgery.errors import ConfigError
from parc_surgery.flops import count_macs
from parc_surgery.inputs import get_in_chans
from parc_surgery.probe import example_input, probe_model
from parc_surgery.train_flags import eval_mode, get_train_flags, set_train_flags
from parc_surgery.validate import eval_forward

# ----------------------------------------------------------------------------------------------------------------------
# in_chans


@pytest.mark.parametrize("chans", [1, 4])
def test_resnet50_with_other_input_channels_converts(chans):
    model = timm.create_model("resnet50", pretrained=False, in_chans=chans, num_classes=8)
    assert model.pretrained_cfg["input_size"][0] == 3  # timm keeps the default cfg: the weights must be read
    conv = ps.convert(model, "resnet_parc", input_size=64)  # probe, MAC counts and every check
    assert conv.report.passed, conv.report.to_markdown()
    assert conv.report.macs_before is not None and conv.report.macs_after is not None
    assert [t.name for t in conv.plan.targets] == ["layer3.3", "layer3.4", "layer3.5", "layer4.2"]
    assert get_in_chans(conv.model) == chans
    assert conv.model.pretrained_cfg["input_size"][0] == 3  # the user's cfg is left as it was
    y = conv.model.eval()(torch.randn(1, chans, 64, 64))
    assert y.shape == (1, 8)


def test_one_answer_for_every_consumer():
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=4)
    assert get_in_chans(model) == 1
    assert example_input(model, (32, 32)).shape == (1, 1, 32, 32)
    assert count_macs(model, 32).macs == count_macs(model, 32, in_chans=1).macs  # counted on a 1-channel input


def test_sources_in_order():
    class NoConv(nn.Module):
        def __init__(self, **attrs):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.__dict__.update(attrs)

        def forward(self, x):
            return self.fc(x)

    # timm's first_conv wins over a conv registered earlier (a head conv listed before the stem)
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(64, 10, 1)
            self.stem = nn.Conv2d(2, 64, 3)
            self.pretrained_cfg = {"first_conv": "stem", "input_size": (3, 32, 32)}

    assert get_in_chans(HeadFirst()) == 2
    assert get_in_chans(nn.Sequential(nn.Conv2d(5, 2, 1))) == 5
    assert get_in_chans(nn.Sequential(ps.ParC(6, 8, "height"))) == 6
    assert get_in_chans(NoConv(in_chans=7, pretrained_cfg={"input_size": (2, 8, 8)})) == 7
    assert get_in_chans(NoConv(pretrained_cfg={"input_size": (2, 8, 8)})) == 2
    assert get_in_chans(NoConv(), default=3) == 3
    with pytest.raises(ConfigError, match="pass in_chans"):
        get_in_chans(NoConv())
    with pytest.raises(ConfigError, match="in_chans"):
        count_macs(NoConv(), 4)


def test_cli_converts_and_audits_a_one_channel_model(tmp_path):
    """The CLI audit of a saved file and its ONNX check build a 1-channel input too."""
    out = tmp_path / "gray.safetensors"
    args = ["resnet18", "--rule", "resnet_parc", "--model-arg", "in_chans=1", "--model-arg", "num_classes=3"]
    result = CliRunner().invoke(cli, [*args, "--input-size", "64", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    audit = CliRunner().invoke(cli, [str(out), "--input-size", "64", "--check-onnx"], catch_exceptions=False)
    assert audit.exit_code == 0, audit.output
    assert "NOT finite" not in audit.output and "FAIL" not in audit.output


# ----------------------------------------------------------------------------------------------------------------------
# Train / eval flags


def _mixed_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    model.train()
    model.layer1.eval()  # frozen: its BatchNorms must not update
    model.layer3[1].eval()  # a block that gets replaced, in eval mode
    model.layer2[0].bn1.eval()  # one lone frozen norm
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("validate", [True, False])
def test_converted_model_keeps_every_module_flag(validate):
    model = _mixed_resnet18()
    before = _flags(model)
    conv = ps.convert(model, "resnet_parc", input_size=64, validate=validate, count=validate)
    assert _flags(model) == before  # the user's model is untouched
    targets = [t.name for t in conv.plan.targets]
    assert targets == ["layer3.1", "layer4.1"]
    after = _flags(conv.model)
    inside = [n for n in after if any(n == t or n.startswith(t + ".") for t in targets)]
    for name, flag in after.items():
        if name not in inside:
            assert flag == before[name], name
    for t in targets:  # a replacement block and all its modules take the flag of the module they replace
        assert {after[n] for n in inside if n == t or n.startswith(t + ".")} == {before[t]}, t
    assert after["layer3.1"] is False and after["layer4.1"] is True
    assert after[""] is True and after["layer1.0.bn1"] is False and after["layer2.0.bn1"] is False
    assert after["layer2.0.bn2"] is True


def test_eval_model_with_a_training_submodule():
    model = _mixed_resnet18().eval()
    model.layer4.train()
    conv = ps.convert(model, "resnet_parc", input_size=64, validate=False, count=False)
    flags = _flags(conv.model)
    assert flags[""] is False and flags["layer1.0"] is False
    assert all(f for n, f in flags.items() if n.startswith("layer4"))


def test_every_eval_pass_restores_each_flag():
    model = _mixed_resnet18()
    before = _flags(model)
    x = example_input(model, (32, 32))
    probe_model(model, x)
    assert _flags(model) == before
    count_macs(model, 32)
    assert _flags(model) == before
    assert eval_forward(model, x) is not None
    assert _flags(model) == before
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert _flags(model) == before
    saved = get_train_flags(model)
    model.train()
    set_train_flags(saved)
    assert _flags(model) == before


def test_onnx_check_restores_each_flag():
    pytest.importorskip("onnxruntime")
    from parc_surgery.onnx_check import check_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.train()
    model[1].eval()
    before = _flags(model)
    check_onnx(model, 16)
    assert _flags(model) == before


class SpaceToDepthNet(nn.Module):
    """A stem that changes the channel count before the first conv (tresnet's space-to-depth)."""

    def __init__(self, cfg: dict | None = None):
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        if cfg is not None:
            self.pretrained_cfg = cfg

    def forward(self, x):
        x = self.conv(nn.functional.pixel_unshuffle(x, 2))
        return self.head(x.mean((2, 3)))


def test_a_first_conv_not_fed_by_the_input_does_not_decide():
    """Regression: reading the weights first made tresnet / csatv2 fail at (1, 48|64, H, W) in the zoo sweep."""
    timm_like = SpaceToDepthNet({"first_conv": "conv", "input_size": (3, 32, 32)})
    assert get_in_chans(timm_like) == 3
    assert get_in_chans(SpaceToDepthNet(), default=3) == 3  # the default is tried when the weights' answer fails
    assert get_in_chans(SpaceToDepthNet()) == 12  # nothing else tells
    assert count_macs(timm_like, 32).macs == count_macs(timm_like, 32, in_chans=3).macs


def test_tresnet_stem_converts():
    model = timm.create_model("tresnet_m", pretrained=False, num_classes=4).eval()
    assert get_in_chans(model) == 3
    conv = ps.convert(model, "convstage2parc", input_size=64, count=False)
    assert conv.report.passed and conv.plan.targets
