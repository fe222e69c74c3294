"""The surgery engine on toy models: selection, precedence, plan-check-rewrite, errors, guarantees."""

from __future__ import annotations

import copy

import pytest
import torch
from toy_models import DataDependentNet, DictStageNet, FixedSizeNet, SharedBlockNet

import parc_surgery as ps
from parc_surgery import NoMatchError, ParC, TraceError, UnsupportedTargetError


def _rule(select: dict, *, block: str = "parc_bottleneck", exclude: dict | None = None, **options) -> dict:
    target = {"block": block, "select": select}
    if exclude:
        target["exclude"] = exclude
    if options:
        target["options"] = options
    return {"version": 1, "name": "toy", "targets": [target]}


LAST_HALF = _rule({"type": "Bottleneck", "stages": [{"stage": -1, "fraction": "1/2"}, {"stage": -2, "fraction": 1}]})


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return DictStageNet()


@pytest.fixture(scope="module")
def toy_conversion(toy):
    return ps.convert(toy, LAST_HALF, input_size=32)


def test_selects_last_fraction_and_skips_strided_first(toy_conversion):
    names = [t.name for t in toy_conversion.plan.targets]
    # s3: 2 blocks, last 1/2 -> s3.1; s2: 3 blocks, fraction 1 but s2.0 is strided -> s2.1, s2.2
    assert names == ["stages.s2.1", "stages.s2.2", "stages.s3.1"]
    assert all(c.passed for c in toy_conversion.report.checks), toy_conversion.report.checks


def test_result_keeps_class_and_untouched_weights(toy, toy_conversion):
    new = toy_conversion.model
    assert type(new) is DictStageNet and new is not toy
    old_sd, new_sd = toy.state_dict(), new.state_dict()
    replaced = tuple(t.name + "." for t in toy_conversion.plan.targets)
    outside = [k for k in old_sd if not k.startswith(replaced)]
    assert outside and all(torch.equal(old_sd[k], new_sd[k]) for k in outside)
    assert any(isinstance(m, ParC) for m in new.modules())
    assert not any(isinstance(m, ParC) for m in toy.modules())


def test_report_records_targets_and_carry(toy_conversion):
    rep = toy_conversion.report
    assert rep.params_before == ps.count_params(DictStageNet())
    assert rep.params_after == ps.count_params(toy_conversion.model)
    assert [t.name for t in rep.targets] == [t.name for t in toy_conversion.plan.targets]
    for t in rep.targets:
        assert t.kept > 0 and t.new + t.transformed > 0
        assert t.params_before != t.params_after
    d = rep.to_dict()
    assert {"params_before", "params_after", "macs_before", "macs_after", "input_size", "targets", "checks"} <= set(d)


def test_input_model_untouched_including_flags_and_hooks():
    torch.manual_seed(1)
    model = DictStageNet().train()
    calls = []
    handle = model.stages["s3"][1].register_forward_hook(lambda m, a, o: calls.append(1))
    before = _snapshot(model)
    hooks_before = {k: dict(v._forward_hooks) for k, v in model.named_modules()}
    ps.convert(model, LAST_HALF, input_size=32)
    assert _same(before, _snapshot(model))
    assert model.training and all(m.training for m in model.modules())
    assert {k: dict(v._forward_hooks) for k, v in model.named_modules()} == hooks_before
    assert calls == []  # the user's model was never run
    handle.remove()


def test_failed_conversion_leaves_model_untouched():
    model = DictStageNet()
    before = _snapshot(model)
    bad = _rule({"name": "stages.s2.0"})  # strided block: parc_bottleneck cannot replace it
    with pytest.raises(UnsupportedTargetError, match=r"stages\.s2\.0"):
        ps.convert(model, bad, input_size=32)
    assert _same(before, _snapshot(model))


def test_no_match_points_to_list_candidates(toy):
    with pytest.raises(NoMatchError, match="list_candidates") as e:
        ps.convert(toy, "vit2parc", input_size=32)
    assert "MobileVitBlock" in str(e.value) and "vit2parc" in str(e.value)


def test_already_converted_model_is_refused_clearly(toy_conversion):
    with pytest.raises(NoMatchError, match="already"):
        ps.convert(toy_conversion.model, LAST_HALF, input_size=32)


def test_exclude_and_first_target_wins(toy):
    rule = {
        "version": 1,
        "name": "two",
        "targets": [
            {"block": "parc_bottleneck", "select": {"name": "stages.s2.*"}, "exclude": {"name": "stages.s2.0"}},
            {"block": "parc_bottleneck", "select": {"name": ["stages.s2.1", "stages.s3.1"]}},
        ],
    }
    plan = ps.convert(toy, rule, input_size=32, validate=False, count=False).plan
    assert [(t.name, t.target_index) for t in plan.targets] == [
        ("stages.s2.1", 0),
        ("stages.s2.2", 0),
        ("stages.s3.1", 1),
    ]


def test_regex_names_and_pe_first(toy):
    rule = _rule({"name": r"re:stages\.s[23]\.[12]"}, pe="first")
    plan = ps.convert(toy, rule, input_size=32, validate=False, count=False).plan
    assert [t.name for t in plan.targets] == ["stages.s2.1", "stages.s2.2", "stages.s3.1"]
    assert [t.ctx.pe for t in plan.targets] == [True, False, True]


def test_kernel_auto_is_feature_size(toy_conversion):
    kernels = {t.name: t.ctx.kernel_hw for t in toy_conversion.plan.targets}
    assert kernels == {"stages.s2.1": (8, 8), "stages.s2.2": (8, 8), "stages.s3.1": (4, 4)}


def test_deterministic_weights_for_a_seed(toy):
    a = ps.convert(toy, LAST_HALF, input_size=32, init="reference", seed=3, validate=False, count=False)
    b = ps.convert(toy, LAST_HALF, input_size=32, init="reference", seed=3, validate=False, count=False)
    c = ps.convert(toy, LAST_HALF, input_size=32, init="reference", seed=4, validate=False, count=False)
    assert _same(a.model.state_dict(), b.model.state_dict())
    assert not _same(a.model.state_dict(), c.model.state_dict())


def test_shared_module_replaced_once_and_stays_shared():
    torch.manual_seed(0)
    model = SharedBlockNet()
    conv = ps.convert(model, _rule({"name": ["blocks.1", "blocks.2"]}), input_size=32)
    assert [t.aliases for t in conv.plan.targets] == [("blocks.1", "blocks.2")]
    assert conv.model.blocks[1] is conv.model.blocks[2]
    assert conv.report.passed


def test_data_dependent_model_uses_hooks():
    torch.manual_seed(0)
    conv = ps.convert(DataDependentNet(), _rule({"type": "Bottleneck", "stages": [{"stage": 0}]}), input_size=32)
    assert not conv.plan.traced
    checks = {c.name: c for c in conv.report.checks}
    assert checks["traced_vs_eager"].passed and "n/a" in checks["traced_vs_eager"].detail
    assert [t.name for t in conv.plan.targets] == ["blocks.0", "blocks.1", "blocks.2"]


def test_model_failing_at_input_size_is_a_trace_error():
    with pytest.raises(TraceError, match="input size"):
        ps.convert(FixedSizeNet(), _rule({"type": "Bottleneck"}), input_size=48)
    conv = ps.convert(FixedSizeNet(), _rule({"type": "Bottleneck"}), input_size=32)
    checks = {c.name: c for c in conv.report.checks}
    assert "n/a" in checks["output_shape_non_square"].detail


def test_bad_arguments_are_config_errors(toy):
    with pytest.raises(ps.ConfigError, match="input_size"):
        ps.convert(toy, LAST_HALF, input_size=(0, 3))
    with pytest.raises(ps.ConfigError, match="needed"):
        ps.convert(toy, LAST_HALF)  # a plain nn.Module has no pretrained_cfg
    with pytest.raises(ps.ConfigError, match="impl"):
        ps.convert(toy, LAST_HALF, input_size=32, impl="fast")
    with pytest.raises(ps.ConfigError, match=r"nn\.Module"):
        ps.convert("resnet50", LAST_HALF)


def test_list_candidates(toy):
    cands = ps.list_candidates(toy, LAST_HALF, input_size=32)
    assert [s.container for s in cands.stages] == ["stages.s1", "stages.s2", "stages.s3"]
    assert [s.feature_size for s in cands.stages] == [(16, 16), (8, 8), (4, 4)]
    assert len(cands.blocks) == 7 and all("parc_bottleneck" in b for _, _, b in cands.blocks)
    assert [t.name for t in cands.selected] == ["stages.s2.1", "stages.s2.2", "stages.s3.1"]
    assert "stages.s3" in str(cands)


def test_weights_load_across_base_lengths(toy):
    small = ps.convert(toy, LAST_HALF, input_size=32, validate=False, count=False).model
    big = ps.convert(toy, LAST_HALF, input_size=64, validate=False, count=False).model
    big.load_state_dict(copy.deepcopy(small.state_dict()))  # ParC kernels resampled 8 -> 16, 4 -> 8
    w = big.stages["s3"][1].conv2.parc_h.weight if hasattr(big.stages["s3"][1].conv2, "parc_h") else None
    parcs = [m for m in big.modules() if isinstance(m, ParC)]
    assert parcs and all(m.weight.shape[2 if m.axis == "height" else 3] == m.kernel_size for m in parcs)
    assert w is None or w.shape[2] == 8
