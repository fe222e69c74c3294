"""The tool's guarantees, one test each.

1. The input model is unchanged after any conversion, successful or not (parameters, buffers, version
   counters, training flags, requires_grad, hooks, attributes), and it is never run.
2. Output files appear whole or not at all; an existing file is never clobbered without ``force``, and a
   failed forced write leaves the old file intact.
3. Only safetensors are read for weights: nothing is unpickled while loading or converting.
4. A rule can name classes only from the allow-list, and naming one never imports anything.
5. Deterministic: the same model, rule and seed give bit-identical converted weights.
"""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import safetensors.torch
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from toy_models import DictStageNet, FixedSizeNet, HybridNet, OddWidthNet, ToyViT

import parc_surgery as ps
from parc_surgery import checkpoint as pio
from parc_surgery.errors import CheckpointError, ParcSurgeryError, RuleError

LAST = {
    "version": 1,
    "name": "toy",
    "targets": [{"block": "parc_bottleneck", "select": {"type": "Bottleneck", "stages": [{"stage": -1}]}}],
}


def _state(model: nn.Module) -> dict:
    """Everything a conversion could touch on the user's model."""
    return {
        "tensors": {k: (v.detach().clone(), v._version) for k, v in model.state_dict(keep_vars=True).items()},
        "objects": [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()],
        "grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            {a: dict(getattr(m, a)) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")}
            for m in model.modules()
        ],
        "attrs": [sorted(vars(m)) for m in model.modules()],
        "modules": [(n, id(m)) for n, m in model.named_modules()],
    }


def _same(a: dict, b: dict) -> bool:
    ta, tb = a.pop("tensors"), b.pop("tensors")
    ok = ta.keys() == tb.keys() and all(torch.equal(ta[k][0], tb[k][0]) and ta[k][1] == tb[k][1] for k in ta)
    return ok and a == b


def _prepared(make):
    torch.manual_seed(0)
    model = make()
    model.train()
    list(model.modules())[2].eval()  # a mixed pattern of training flags
    next(iter(model.parameters())).requires_grad_(False)
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append("fwd"))
    model.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    list(model.modules())[-1].register_forward_hook(lambda m, a, o: calls.append("leaf"))
    return model, calls


CASES = [  # model, rule, input size, what happens
    (DictStageNet, LAST, 32, None),
    (DictStageNet, "convstage2parc", 32, None),
    (HybridNet, "attention2parc", 16, None),
    (ToyViT, "attention2parc", 16, None),
    (DictStageNet, "attention2parc", 32, ps.NoMatchError),
    (
        OddWidthNet,
        {**LAST, "targets": [{"block": "parc_bottleneck", "select": {"name": "blocks.1"}}]},
        32,
        ps.UnsupportedTargetError,
    ),
    (FixedSizeNet, LAST, 48, ps.TraceError),
    (DictStageNet, {"version": 1, "name": "bad", "targets": []}, 32, RuleError),
]


@pytest.mark.parametrize(("make", "rule", "size", "error"), CASES)
def test_input_model_unchanged_after_any_conversion(make, rule, size, error):
    model, calls = _prepared(make)
    before = _state(model)
    if error is None:
        conv = ps.convert(model, rule, input_size=size, seed=1)
        assert conv.model is not model and conv.report.passed
        assert not set(map(id, conv.model.parameters())) & set(map(id, model.parameters()))
    else:
        with pytest.raises(error):
            ps.convert(model, rule, input_size=size)
    try:  # discovery never touches the model either, whatever it finds
        ps.list_candidates(model, rule, input_size=size)
    except ParcSurgeryError as e:
        assert error is not None and isinstance(e, (ps.TraceError, RuleError))
    assert _same(before, _state(model))
    assert calls == []  # the user's model (and its hooks) never ran


def test_input_model_unchanged_when_validation_fails(monkeypatch):
    import parc_surgery.api as api
    from parc_surgery.report import Check

    monkeypatch.setattr(api, "validate_model", lambda *a, **k: [Check("forced", False, "forced failure")])
    model, calls = _prepared(DictStageNet)
    before = _state(model)
    with pytest.raises(ps.ValidationError, match="forced") as e:
        ps.convert(model, LAST, input_size=32)
    assert e.value.conversion.model is not model
    assert _same(before, _state(model)) and calls == []


# ----------------------------------------------------------------------------------------------------------------------
# Files


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    return ps.convert(model, "convstage2parc", input_size=64, validate=False, count=False)


@pytest.fixture(scope="module")
def saved(conv, tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "m.safetensors"
    pio.save(conv, path)
    return path


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_forced_write_keeps_the_old_file_and_leaves_nothing(conv, saved, tmp_path, monkeypatch, exc):
    target = tmp_path / "m.safetensors"
    target.write_bytes(saved.read_bytes())
    old = (target.read_bytes(), os.stat(target).st_mtime_ns)

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises((CheckpointError, KeyboardInterrupt)):
        pio.save(conv, target, force=True)
    assert (target.read_bytes(), os.stat(target).st_mtime_ns) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


def test_written_file_is_whole_or_absent(conv, tmp_path):
    target = tmp_path / "new.safetensors"
    pio.save(conv, target)
    assert pio.read_manifest(target)["tensors"]["count"] == len(safetensors.torch.load_file(str(target)))
    with pytest.raises(CheckpointError, match="exists already"):
        pio.save(conv, target)  # no force: refused before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.safetensors"]


# ----------------------------------------------------------------------------------------------------------------------
# Nothing is unpickled


def test_nothing_is_unpickled_while_loading_or_converting(saved, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    for mod, name in (
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (pickle, "_Unpickler"),
        (torch, "load"),
    ):
        monkeypatch.setattr(mod, name, refuse)
    model = pio.load(saved)
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 10)
    conv = ps.convert(timm.create_model("resnet18", pretrained=False, num_classes=10), "convstage2parc", input_size=64)
    pio.save(conv, tmp_path / "again.safetensors")
    # a pickle file under the safetensors name is refused without being unpickled
    with open(tmp_path / "pickle.safetensors", "wb") as f:
        pickle.Pickler(f).dump({"w": [1, 2, 3]})
    with pytest.raises(CheckpointError):
        pio.load(tmp_path / "pickle.safetensors")


# ----------------------------------------------------------------------------------------------------------------------
# Allow-list


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(
        ["os.system", "builtins.eval", "subprocess.Popen", "pickle.loads", "toy_models.DictStageNet", "DictStageNet"]
    )
    | st.from_regex(r"[a-z]{1,6}\.[a-z]{1,6}\.[A-Z][a-z]{1,6}", fullmatch=True).filter(
        lambda n: not n.startswith(("torch.", "timm.", "torchvision."))
    )
)
def test_rules_name_only_allow_listed_classes(name):
    parts = name.split(".")[:-1]
    named = {".".join(parts[: i + 1]) for i in range(len(parts))} - set(sys.modules)
    rule = {"version": 1, "name": "x", "targets": [{"block": "parc_bottleneck", "select": {"type": name}}]}
    with pytest.raises(RuleError, match=r"allow-list|no nn.Module class"):
        ps.convert(DictStageNet(), rule, input_size=32)
    assert not named & set(sys.modules)  # no module a rule names is imported


def test_a_local_class_never_matches_an_allowed_name():
    class Bottleneck(nn.Module):  # the bare name of timm's class, defined outside the allow-list
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv2(x)

    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(Bottleneck(), Bottleneck()))
    rule = {"version": 1, "name": "b", "targets": [{"block": "parc_conv", "select": {"type": "Bottleneck"}}]}
    with pytest.raises(ps.NoMatchError, match=r"type \['Bottleneck'\] -> 0 module"):
        ps.convert(model, rule, input_size=8)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize(
    ("name", "kwargs", "rule", "size"),
    [
        ("resnet18", {"num_classes": 10}, "convstage2parc", 64),
        ("vit_tiny_patch16_224", {"img_size": 64, "num_classes": 10}, "attention2parc", 64),
        ("edgenext_xx_small", {"num_classes": 10}, "attention2parc", 64),
    ],
)
def test_same_model_rule_and_seed_give_bit_identical_weights(name, kwargs, rule, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)

    def run(seed: int, noise: int):
        torch.manual_seed(noise)  # the global RNG state must not matter
        c = ps.convert(model, rule, input_size=size, init="reference", seed=seed, validate=False, count=False)
        return c.model.state_dict()

    a, b, c = run(5, 0), run(5, 123), run(6, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    new = [k for k in a if "parc" in k]
    assert new and any(not torch.equal(a[k], c[k]) for k in new)
