"""The engine on real timm / torchvision models (pretrained=False, small inputs, built once per module)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision

import parc_surgery as ps
from parc_surgery import ParC

CASES = {
    # model builder, rule, input size, expected target names
    "resnet50": (lambda: timm.create_model("resnet50"), "resnet_parc", 128,
                 ["layer3.3", "layer3.4", "layer3.5", "layer4.2"]),
    "tv_resnet50": (lambda: torchvision.models.resnet50(weights=None), "resnet_parc", 128,
                    ["layer3.3", "layer3.4", "layer3.5", "layer4.2"]),
    "mobilenetv2_100": (lambda: timm.create_model("mobilenetv2_100"), "mobilenetv2_parc", 128,
                        ["blocks.3.2", "blocks.3.3", "blocks.4.2", "blocks.5.2"]),
    "convnext_atto": (lambda: timm.create_model("convnext_atto"), "convnext_parc", 128,
                      ["stages.2.blocks.4", "stages.2.blocks.5", "stages.3.blocks.1"]),
    "mobilevit_xxs": (lambda: timm.create_model("mobilevit_xxs"), "vit2parc", 128,
                      ["stages.2.1", "stages.3.1", "stages.4.1"]),
    "deit_tiny_patch16_224": (lambda: timm.create_model("deit_tiny_patch16_224", depth=4), "vit_attention2parc", 224,
                              [f"blocks.{i}.attn" for i in range(4)]),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, rule, size, names = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = ps.convert(model, rule, input_size=size)
    return request.param, model, before, conv, names, size


def test_targets_and_checks(case):
    _, _, _, conv, names, _ = case
    assert [t.name for t in conv.plan.targets] == names
    failed = [c for c in conv.report.checks if not c.passed]
    assert not failed, failed
    assert {c.name for c in conv.report.checks} >= {
        "output_shape",
        "output_shape_non_square",
        "finite",
        "target_shapes",
        "spatial_vs_fft",
        "traced_vs_eager",
    }


def test_input_untouched_and_outside_weights_identical(case):
    _, model, before, conv, names, _ = case
    now = model.state_dict()
    assert before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)
    assert not any(isinstance(m, ParC) for m in model.modules())
    new_sd = conv.model.state_dict()
    prefixes = tuple(n + "." for n in names)
    outside = [k for k in before if not k.startswith(prefixes)]
    assert outside and all(torch.equal(before[k], new_sd[k]) for k in outside)
    assert type(conv.model) is type(model)


def test_user_class_api_keeps_working(case):
    _, model, _, conv, _, size = case
    new = copy.deepcopy(conv.model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = new(x)
        if hasattr(new, "forward_features"):
            feats = new.forward_features(x)
            assert torch.allclose(new.forward_head(feats), y, atol=1e-5)
            assert new.pretrained_cfg == model.pretrained_cfg
            assert new.feature_info == model.feature_info
    if hasattr(new, "reset_classifier"):
        new.reset_classifier(5)
        with torch.no_grad():
            assert new(x).shape == (1, 5)


def test_report_counts(case):
    _, model, _, conv, names, _ = case
    rep = conv.report
    assert rep.params_before == ps.count_params(model)
    assert rep.params_after == ps.count_params(conv.model)
    assert rep.macs_before and rep.macs_after and rep.macs_after_fft
    assert [t.name for t in rep.targets] == names
    delta = sum(t.params_after - t.params_before for t in rep.targets)
    assert rep.params_after - rep.params_before == delta


def test_backward_reaches_parc(case):
    _, _, _, conv, _, size = case
    new = copy.deepcopy(conv.model).train()
    for m in new.modules():  # timm zero-inits the last norm of residual branches: undo so grads are nonzero
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            torch.nn.init.ones_(m.weight)
    new(torch.randn(2, 3, size, size)).sum().backward()
    parcs = [m for m in new.modules() if isinstance(m, ParC)]
    assert parcs and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in parcs)


def test_list_candidates_on_real_model(case):
    name, model, _, conv, names, size = case
    cands = ps.list_candidates(model, conv.rule, input_size=size)
    assert [t.name for t in cands.selected] == names
    assert cands.stages
    if name.startswith("deit"):
        assert list(cands.attention) == names
