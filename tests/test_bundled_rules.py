"""The bundled rules reproduce the papers' networks, by the numbers, on the real timm models.

Figures (design/parc.md §5): parameters exact (ParC-Net-S within 0.1 %), MACs = FlopCounterMode FLOPs / 2 at
batch 1 in eval, counted for the spatial formulation. Conversions here skip validation (covered in
test_engine_models.py) and count MACs on the meta device, so the figures cost little time.
"""

from __future__ import annotations

import pytest
import timm
import torch

import parc_surgery as ps


def _convert(model, rule, size):
    return ps.convert(model, rule, input_size=size, validate=False)


def _meta(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw)


FIGURES = {
    # name: (builder, rule, input size, params, params tolerance (relative), G MACs, MACs tolerance (relative))
    "parcnet_s": (lambda: timm.create_model("mobilevit_s"), "vit2parc", 256, 5_037_100, 1e-3, 1.6573, 1e-2),
    "parc_resnet50": (lambda: timm.create_model("resnet50"), "resnet_parc", 224, 23_737_640, 0, 3.9415, 0),
    "parc_mobilenetv2_100": (lambda: timm.create_model("mobilenetv2_100"), "mobilenetv2_parc", 224, 3_532_136, 0,
                             0.3020, 0),
    "parc_convnext_xt": (lambda: timm.models.ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384)), "convnext_parc",
                         224, 7_412_824, 0, 1.1392, 0),
    "parc_deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224"), "vit_attention2parc", 224, 4_957_096, 0,
                       0.9132, 0),
    "parc_swin_tiny": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), "attention2parc", 224, 24_066_760,
                       0, 3.6768, 0),
}  # fmt: skip


_CONVERSIONS: dict = {}


def _conversion(name):
    if name not in _CONVERSIONS:
        build, rule, size, *_ = FIGURES[name]
        torch.manual_seed(0)
        model = build().eval()
        _CONVERSIONS[name] = (model, _convert(model, rule, size))
    return _CONVERSIONS[name]


@pytest.fixture(params=list(FIGURES))
def figure(request):
    _, _, _, params, ptol, gmacs, mtol = FIGURES[request.param]
    model, conv = _conversion(request.param)
    return request.param, model, conv, params, ptol, gmacs, mtol


def test_parameter_count(figure):
    name, _, conv, params, ptol, _, _ = figure
    got = conv.report.params_after
    if ptol:
        assert abs(got - params) / params <= ptol, (name, got)
    else:
        assert got == params, (name, got)


def test_mac_count(figure):
    name, _, conv, _, _, gmacs, mtol = figure
    got = conv.report.macs_after / 1e9
    if mtol:
        assert abs(got - gmacs) / gmacs <= mtol, (name, got)
    else:  # the table's 4 decimals
        assert round(got, 4) == gmacs, (name, got)
    if name != "parc_swin_tiny":  # Swin's ParCs run along 7-token window axes, where the FFT counts more MACs
        assert conv.report.macs_after_fft < conv.report.macs_after  # Fast-ParC counts fewer MACs


def test_weights_outside_targets_bit_identical(figure):
    _, model, conv, *_ = figure
    targets = tuple(t.name + "." for t in conv.plan.targets)
    old, new = model.state_dict(), conv.model.state_dict()
    outside = [k for k in old if not k.startswith(targets)]
    assert outside and all(torch.equal(old[k], new[k]) for k in outside)
    assert not [k for k in new if not k.startswith(targets) and k not in old]


def test_parcnet_s_structure():
    _, conv = _conversion("parcnet_s")
    assert [t.name for t in conv.plan.targets] == ["stages.2.1", "stages.3.1", "stages.4.1"]
    assert [t.ctx.kernel_hw for t in conv.plan.targets] == [(32, 32), (16, 16), (8, 8)]
    blocks = [conv.model.get_submodule(t.name) for t in conv.plan.targets]
    # §3: global widths 192 / 256 / 320 (4/3 of MobileViT-S), 2 / 4 / 3 MetaFormer blocks, PE in the first only
    assert [b.conv_1x1.out_channels for b in blocks] == [192, 256, 320]
    assert [len(b.blocks) for b in blocks] == [2, 4, 3]
    pe_params = [[sum(p.numel() for n, p in m.named_parameters() if "pe" in n) > 0 for m in b.blocks] for b in blocks]
    assert pe_params == [[True, False], [True, False, False, False], [True, False, False]]


@pytest.mark.parametrize(
    "model_name, rule, n_targets",
    [
        ("mobilevit_xxs", "vit2parc", 3),
        ("mobilevit_xs", "vit2parc", 3),
        ("mobilenetv2_050", "mobilenetv2_parc", 4),
        ("mobilenetv2_140", "mobilenetv2_parc", 4),
        ("resnet18", "resnet_parc", 2),
        ("resnet101", "resnet_parc", 13),  # layer3: 23 blocks, round(23 / 2) = 12; layer4: 1
        ("convnext_atto", "convnext_parc", 3),
        ("convnext_tiny", "convnext_parc", 4),
        ("convnext_base", "convnext_parc", 10),
        ("deit_small_patch16_224", "vit_attention2parc", 12),
        ("vit_small_patch16_224", "vit_attention2parc", 12),
        ("vit_base_patch16_224", "vit_attention2parc", 12),
    ],
)
def test_rule_works_across_the_family(model_name, rule, n_targets):
    """Planned and built on the meta device: no weights allocated, shapes checked."""
    model = _meta(model_name)
    conv = ps.convert(model, rule, count=False)
    assert len(conv.plan.targets) == n_targets
    assert conv.report.passed, conv.report.checks
    assert conv.report.params_after != conv.report.params_before


def test_basic_block_resnets_use_parc_basic_block():
    conv = ps.convert(_meta("resnet34"), "resnet_parc", count=False)
    assert {t.block for t in conv.plan.targets} == {"parc_basic_block"}
    # ResNet34: layer3 has 6 blocks (last 1/2 -> 3), layer4 has 3 (last 1/3 -> 1)
    assert [t.name for t in conv.plan.targets] == ["layer3.3", "layer3.4", "layer3.5", "layer4.2"]


def test_vit_attention2parc_carries_everything_but_attention():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    conv = ps.convert(model, "vit_attention2parc")
    old, new = model.state_dict(), conv.model.state_dict()
    kept = [k for k in old if ".attn." not in k]
    assert all(torch.equal(old[k], new[k]) for k in kept)
    assert any(k.startswith(("patch_embed", "pos_embed", "cls_token", "head", "norm")) for k in kept)
    # qkv's value rows carried into the mixer, proj kept
    for i in range(2):
        assert torch.equal(old[f"blocks.{i}.attn.proj.weight"], new[f"blocks.{i}.attn.proj.weight"])
    # the class token's output depends on every patch
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    feats = conv.model.forward_features(x)
    feats[0, 0].sum().backward()
    patch_grad = x.grad.abs().reshape(1, 3, 14, 16, 14, 16).sum((0, 1, 3, 5))
    assert bool((patch_grad > 0).all())


def test_dynamic_img_size_vit_runs_at_other_sizes():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2, dynamic_img_size=True).eval()
    conv = ps.convert(model, "vit_attention2parc")
    with torch.no_grad():
        for size in ((160, 256), (224, 224), (96, 128)):
            assert conv.model(torch.randn(1, 3, *size)).shape == (1, 1000)
