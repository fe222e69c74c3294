"""The published ParC models under timm names: ``timm.create_model("parcnet_s")`` after ``import parc_surgery``."""

from __future__ import annotations

import pytest
import timm
import torch

import parc_surgery
import parc_surgery.timm_models  # a no-op once parc_surgery's __init__ imports it
from parc_surgery import checkpoint as pio
from parc_surgery.errors import ConfigError
from parc_surgery.ops import ParC

# Published parameter counts (design notes §5); the converted models must reproduce them within 0.1%.
PUBLISHED_PARAMS = {
    "parcnet_s": 5.0371e6,
    "parc_resnet50": 23.7376e6,
    "parc_mobilenetv2_100": 3.5321e6,
    "parc_convnext_xt": 7.4128e6,
}
NAMES = [
    "parcnet_s",
    "parc_mobilevit_xs",
    "parc_mobilevit_xxs",
    "parc_resnet50",
    "parc_mobilenetv2_100",
    "parc_convnext_xt",
    "parc_deit_tiny_patch16_224",
]


def _meta(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_every_name_is_registered_with_timm():
    assert parc_surgery.__name__ == "parc_surgery"
    assert set(NAMES) <= set(timm.list_models("parc*"))
    cfg = timm.models.get_pretrained_cfg("parcnet_s")
    assert cfg.input_size == (3, 256, 256) and not cfg.has_weights


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_meta_with_parc_layers(name):
    model = _meta(name)
    assert model.pretrained_cfg["architecture"] == name
    assert any(isinstance(m, ParC) for m in model.modules())
    assert all(p.device.type == "meta" for p in model.parameters())
    if name in PUBLISHED_PARAMS:
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 1e-3, (name, n)


def test_created_model_is_in_train_mode_throughout():
    # timm returns models in train mode; the conversion's eval-mode probe must not leave any module in eval
    model = timm.create_model("parc_mobilevit_xxs", num_classes=3)
    assert all(m.training for m in model.modules())
    assert model.eval() is model and not any(m.training for m in model.modules())


def test_parcnet_s_is_fewer_params_than_mobilevit_s():
    base = sum(p.numel() for p in _meta("mobilevit_s").parameters())
    parc = sum(p.numel() for p in _meta("parcnet_s").parameters())
    assert base == 5_578_632 and parc < base


def test_pretrained_is_refused_with_a_way_out():
    with pytest.raises(
        ConfigError, match=r"no pretrained weights.*parc_surgery\.convert\(timm\.create_model\('mobilevit_s'"
    ):
        timm.create_model("parcnet_s", pretrained=True)
    with pytest.raises(ConfigError, match=r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("parc_resnet50", pretrained=True)


def test_kwargs_pass_through_and_model_runs():
    model = timm.create_model("parc_mobilevit_xxs", num_classes=10).eval()
    assert model.num_classes == 10 and model._model_args == {"num_classes": 10}
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 10) and torch.isfinite(y).all()


def test_img_size_sets_the_planned_size():
    model = _meta("parc_deit_tiny_patch16_224", img_size=96)
    assert model.pretrained_cfg["input_size"] == (3, 96, 96)
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, ParC)}
    assert kernels == {96 // 16}


def test_save_and_load_a_registered_model(tmp_path):
    model = timm.create_model("parc_mobilevit_xxs", num_classes=5).eval()
    path = pio.save(model, tmp_path / "p.safetensors")
    m = pio.read_manifest(path)
    assert m["model"] == {"kind": "timm", "name": "parc_mobilevit_xxs", "args": {"num_classes": 5}} and m["steps"] == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(pio.load(path)(x), model(x))
