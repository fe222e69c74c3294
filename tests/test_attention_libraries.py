"""Attention of torchvision and Hugging Face ``transformers`` vision models through the engine (no weights).

Small configurations of the same classes (torchvision's ``VisionTransformer`` / ``SwinTransformer``, the
classes behind ``vit_b_16`` / ``swin_t``; ``transformers`` ViT, DeiT, Swin, MobileViT): each converts and
validates, keeps its class and its output structure (a ``transformers`` ``ModelOutput`` stays one), and
``list_candidates`` shows the selection. The full-size ``vit_b_16`` / ``swin_t`` run in the slow tests, and
``transformers``' MobileViT-S becomes ParC-Net-S with exactly the parameters timm's ``mobilevit_s`` gives.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import parc_surgery as ps
from parc_surgery.blocks.attention_mixer import ParCMixer

transformers = pytest.importorskip("transformers")


def _hf(config: str, model: str, **kw):
    return getattr(transformers, model)(getattr(transformers, config)(**kw))


_MVIT = {"image_size": 64, "hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 16, 24, 32, 40, 48, 96]}

CASES = {
    # name: (builder, rule, input size, expected targets)
    "tv_vit": (lambda: VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10), "attention2parc", 32,
               [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]),
    "tv_swin": (lambda: SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=10), "attention2parc", 32,
                ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn", "features.3.1.attn"]),
    "hf_vit": (lambda: _hf("ViTConfig", "ViTForImageClassification", hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=10),
               "attention2parc", 32, ["vit.layers.0.attention", "vit.layers.1.attention"]),
    "hf_deit": (lambda: _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                            patch_size=8, num_labels=10),
                "attention2parc", 32, ["deit.layers.0.attention", "deit.layers.1.attention"]),
    # at 32 px the second stage's 4x4 map equals the window: transformers' Swin resizes its window on the fly
    "hf_swin": (lambda: _hf("SwinConfig", "SwinForImageClassification", embed_dim=16, depths=[2, 2],
                            num_heads=[2, 2], window_size=4, image_size=32, patch_size=4, num_labels=10),
                "attention2parc", 32,
                [f"swin.encoder.layers.{i}.blocks.{j}.attention" for i in (0, 1) for j in (0, 1)]),
    "hf_mobilevit": (lambda: _hf("MobileViTConfig", "MobileViTForImageClassification", num_labels=10, **_MVIT),
                     "vit2parc", 64, [f"mobilevit.encoder.layer.{i}" for i in (2, 3, 4)]),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, rule, size, names = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    return request.param, model, ps.convert(model, rule, input_size=size), names, size


def test_converted_validated_same_class_and_outputs(case):
    _name, model, conv, names, size = case
    assert [t.name for t in conv.plan.targets] == names
    assert conv.report.passed, [c for c in conv.report.checks if not c.passed]
    assert type(conv.model) is type(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y0, y1 = model(x), conv.model(x)
    assert type(y1) is type(y0)
    if isinstance(y0, torch.Tensor):
        assert y1.shape == y0.shape
    else:  # a transformers ModelOutput: the same fields, the same shapes
        assert y1.keys() == y0.keys() and all(y1[k].shape == y0[k].shape for k in y0 if y0[k] is not None)
    cands = ps.list_candidates(model, conv.rule, input_size=size)
    assert [t.name for t in cands.selected] == names


def test_transformers_attention_returns_its_tuple():
    torch.manual_seed(0)
    build, rule, size, _ = CASES["hf_vit"]
    model = build().eval()
    conv = ps.convert(model, rule, input_size=size)
    attn, src = conv.model.vit.layers[0].attention, model.vit.layers[0].attention
    assert isinstance(attn, ParCMixer) and type(conv.model.vit.layers[0]).__name__ == "ViTLayer"
    assert torch.equal(attn.v.weight, src.v_proj.weight) and torch.equal(attn.proj.weight, src.o_proj.weight)
    rec = conv.carry["vit.layers.0.attention"]
    assert ("v.weight", "v_proj.weight") in rec.kept and ("proj.weight", "o_proj.weight") in rec.kept
    assert {"q_proj.weight", "k_proj.weight"} <= set(rec.dropped)
    out = attn(torch.randn(2, 17, 32), None)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, 17, 32) and out[1] is None
    with pytest.raises(ps.ConfigError, match="attention_mask"):
        attn(torch.randn(2, 17, 32), torch.zeros(2, 1, 17, 17))


def test_distillation_and_class_tokens_are_prefix_tokens():
    torch.manual_seed(0)
    build, rule, size, _ = CASES["hf_deit"]
    conv = ps.convert(build().eval(), rule, input_size=size)
    assert [t.ctx.num_prefix_tokens for t in conv.plan.targets] == [2, 2]
    assert all(t.ctx.feature_size == (4, 4) for t in conv.plan.targets)


def test_shifted_window_mask_is_ignored_and_said_so():
    build, rule, size, _ = CASES["tv_swin"]
    conv = ps.convert(build().eval(), rule, input_size=size)
    assert any("features.1.1.attn" in n and "shifted-window mask" in n for n in conv.report.notes)


def test_transformers_mobilevit_s_gives_parcnet_s():
    """MobileViTForImageClassification with its default config (1000 labels: MobileViT-S) -> ParC-Net-S, with
    exactly the parameters of timm's mobilevit_s conversion (planned and built on the meta device)."""
    with torch.device("meta"):
        hf = _hf("MobileViTConfig", "MobileViTForImageClassification", num_labels=1000)
        tm = timm.create_model("mobilevit_s")
    a = ps.convert(hf, "vit2parc", input_size=256, validate=False, count=False)
    b = ps.convert(tm, "vit2parc", input_size=256, validate=False, count=False)
    assert a.report.params_before == b.report.params_before == 5_578_632
    assert a.report.params_after == b.report.params_after == 5_037_088  # 5.0371 M
    blk = a.model.mobilevit.encoder.layer[2]
    assert type(blk).__name__ == "ParCNetBlock" and blk.downsampling_layer is not None  # the stage's strided block
    assert [b.conv_1x1.out_channels for b in (a.model.mobilevit.encoder.layer[i] for i in (2, 3, 4))] == [192, 256, 320]


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("vit_b_16", 64), ("swin_t", 64)])
def test_full_size_torchvision_models(name, size):
    torch.manual_seed(0)
    kw = {"image_size": size} if name == "vit_b_16" else {}
    model = getattr(torchvision.models, name)(weights=None, **kw).eval()
    conv = ps.convert(model, "attention2parc", input_size=size, count=False)
    assert conv.report.passed, [c for c in conv.report.checks if not c.passed]
    assert len(conv.plan.targets) == 12 and type(conv.model) is type(model)
