"""Bad input never crashes the engine: odd models, sizes, dtypes, control flow, crashing blocks, damaged files.

Every outcome is either a conversion whose checks pass or a :class:`ParcSurgeryError` saying what and why.
File damage already covered by ``test_io.py`` (truncation, flipped bytes, tampered plan / layout, foreign
safetensors, missing files and directories) is not repeated here.
"""

from __future__ import annotations

import json
import struct
import threading

import pytest
import safetensors.torch
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from toy_models import (
    DictStageNet,
    FixedSizeNet,
    HybridNet,
    ItemLoopNet,
    NoStageNet,
    OddWidthNet,
    SharedTwoSizesNet,
    SizeBranchNet,
    ToyViT,
    _bottleneck,
)

import parc_surgery as ps
from parc_surgery import checkpoint as pio
from parc_surgery.blocks import register_block, unregister_block
from parc_surgery.errors import (
    CheckpointError,
    ConfigError,
    NoMatchError,
    ParcSurgeryError,
    TraceError,
    UnsupportedTargetError,
)

LAST = {
    "version": 1,
    "name": "toy",
    "targets": [
        {
            "block": "parc_bottleneck",
            "select": {
                "type": "Bottleneck",
                "stages": [{"stage": -1, "fraction": "1/2"}, {"stage": -2, "fraction": 1}],
            },
        }
    ],
}
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _passes_or_explains(make, rule, **kw):
    """Convert; return the conversion (every check passed) or the ParcSurgeryError it raised."""
    try:
        conv = ps.convert(make(), rule, **kw)
    except ParcSurgeryError as e:
        assert str(e)
        return e
    assert conv.report.passed, conv.report.checks
    return conv


# ----------------------------------------------------------------------------------------------------------------------
# Model structure


def test_model_without_stages_or_attention():
    cands = ps.list_candidates(NoStageNet(), "convstage2parc", input_size=16)
    assert cands.stages == () and cands.attention == () and cands.selected == ()
    for rule in ("convstage2parc", "attention2parc"):
        with pytest.raises(NoMatchError, match=r"0 stage\(s\), 0 detected attention"):
            ps.convert(NoStageNet(), rule, input_size=16)


def test_a_single_block_as_the_model_and_in_a_stage():
    with pytest.raises(NoMatchError, match="selected nothing"):  # the root module itself is never a target
        ps.convert(
            _bottleneck(32, 8),
            {**LAST, "targets": [{"block": "parc_bottleneck", "select": {"type": "Bottleneck"}}]},
            input_size=8,
        )
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Sequential(_bottleneck(32, 8)), nn.Flatten(1))
    conv = ps.convert(model, "convstage2parc", input_size=8)
    assert [t.name for t in conv.plan.targets] == ["1.0"] and conv.report.passed


def test_shared_module_at_two_sizes_is_refused_by_name():
    rule = {"version": 1, "name": "s", "targets": [{"block": "parc_bottleneck", "select": {"name": "shared"}}]}
    with pytest.raises(UnsupportedTargetError, match=r"shared.*2 call sites with different input shapes"):
        ps.convert(SharedTwoSizesNet(), rule, input_size=32)


def test_stages_in_a_module_dict_with_the_generic_rule():
    conv = ps.convert(DictStageNet(), "convstage2parc", input_size=32)
    assert [t.name for t in conv.plan.targets] == ["stages.s2.1", "stages.s2.2", "stages.s3.1"]


def test_buffers_survive_persistent_or_not():
    model = DictStageNet()
    model.register_buffer("cache", torch.arange(3.0), persistent=False)
    model.stages["s3"][1].register_buffer("tag", torch.tensor([7.0]))
    new = ps.convert(model, LAST, input_size=32).model
    assert torch.equal(new.cache, model.cache) and torch.equal(new.scale, model.scale)
    assert torch.equal(new.stages["s3"][1].tag, torch.tensor([7.0]))  # adopted by the ParC block
    assert "cache" not in new.state_dict() and "stages.s3.1.tag" in new.state_dict()


def test_odd_channel_counts_are_explained():
    with pytest.raises(UnsupportedTargetError, match="odd"):
        ps.convert(
            OddWidthNet(),
            {**LAST, "targets": [{"block": "parc_bottleneck", "select": {"name": "blocks.2"}}]},
            input_size=32,
        )
    conv = ps.convert(HybridNet(), "attention2parc", input_size=16)  # odd attention width 15: split 7 + 8
    assert conv.report.passed and len(conv.plan.targets) == 4


# ----------------------------------------------------------------------------------------------------------------------
# Sizes, batch, dtypes


@settings(max_examples=6, deadline=None)
@given(h=st.integers(1, 24), w=st.integers(1, 24))
def test_any_input_size_converts_or_explains(h, w):
    res = _passes_or_explains(DictStageNet, LAST, input_size=(h, w), count=False)
    assert isinstance(res, ps.Conversion)  # strided convs pad: every size runs
    vit = _passes_or_explains(ToyViT, "attention2parc", input_size=(h, w), count=False)
    if min(h, w) < 4:  # the 4x4 patch embedding cannot run: the model's own failure, as a TraceError
        assert isinstance(vit, TraceError) and "input size" in str(vit)
    else:
        assert isinstance(vit, ps.Conversion)


@pytest.mark.parametrize("size", [1, 2, (2, 9)])
def test_tiny_and_non_square_inputs(size):
    assert ps.convert(DictStageNet(), LAST, input_size=size).report.passed
    conv = ps.convert(HybridNet(), "attention2parc", input_size=size)
    assert conv.report.passed
    hw = (size, size) if isinstance(size, int) else size
    want = tuple(-(-s // 2) for s in hw)  # after the stride-2 stem
    assert all(t.ctx.feature_size == want and t.ctx.kernel_hw == want for t in conv.plan.targets)


def test_batch_one_with_a_training_mode_batchnorm_head():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1),
        nn.Sequential(_bottleneck(32, 8), _bottleneck(32, 8)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.BatchNorm1d(32),  # fails on a batch of 1 in training mode: the engine runs in eval mode
    ).train()
    conv = ps.convert(model, "convstage2parc", input_size=16)
    assert conv.report.passed and conv.model.training


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    conv = ps.convert(DictStageNet().to(dtype), LAST, input_size=16)
    assert conv.report.passed, conv.report.checks
    assert {p.dtype for p in conv.model.parameters()} == {dtype}
    y = conv.model.eval()(torch.randn(1, 3, 16, 16, dtype=dtype))
    assert y.dtype == dtype


# ----------------------------------------------------------------------------------------------------------------------
# Control flow, failing models, crashing blocks


def test_value_dependent_models_on_cpu_and_on_meta():
    conv = ps.convert(ItemLoopNet(), "convstage2parc", input_size=32)
    assert not conv.plan.traced and conv.report.passed
    with torch.device("meta"):
        meta = ItemLoopNet()
    with pytest.raises(TraceError, match="meta device"):
        ps.convert(meta, "convstage2parc", input_size=32)


def test_size_branching_model_returning_a_dict():
    conv = ps.convert(SizeBranchNet(), "convstage2parc", input_size=32)
    assert not conv.plan.traced and conv.report.passed
    assert set(conv.model.eval()(torch.randn(1, 3, 32, 32))) == {"logits", "features"}


def test_model_raising_in_forward():
    class Broken(DictStageNet):
        def forward(self, x):
            raise KeyError("boom")

    with pytest.raises(TraceError, match="KeyError"):
        ps.convert(Broken(), LAST, input_size=32)
    with pytest.raises(TraceError, match=r"input shape \(1, 3, 48, 48\)"):
        ps.convert(FixedSizeNet(), LAST, input_size=48)


@pytest.fixture
def crashing_block():
    @register_block("test_crashing_block")
    class Crashing(nn.Module):
        replaces = ()
        mode = "build"

        @classmethod
        def check_source(cls, module, ctx):
            if cls.mode == "check":
                raise IndexError("exotic module")

        @classmethod
        def from_module(cls, module, ctx):
            raise AttributeError("no attribute 'conv9'")

    yield Crashing
    unregister_block("test_crashing_block")


def test_a_block_crashing_on_an_exotic_module_names_it(crashing_block):
    rule = {"version": 1, "name": "c", "targets": [{"block": "test_crashing_block", "select": {"name": "stages.s3.1"}}]}
    with pytest.raises(UnsupportedTargetError, match=r"stages\.s3\.1 .*could not be built.*AttributeError.*conv9"):
        ps.convert(DictStageNet(), rule, input_size=32)
    crashing_block.mode = "check"
    with pytest.raises(UnsupportedTargetError, match=r"stages\.s3\.1.*cannot check.*IndexError: exotic module"):
        ps.convert(DictStageNet(), rule, input_size=32)


def test_model_that_cannot_be_copied():
    model = DictStageNet()
    model.lock = threading.Lock()  # deepcopy refuses locks
    with pytest.raises(ConfigError, match=r"deep-copying the model.*lock"):
        ps.convert(model, LAST, input_size=32)


@SETTINGS
@given(
    value=st.one_of(
        st.text(max_size=5),
        st.floats(allow_nan=True),
        st.booleans(),
        st.integers(-5, 0),
        st.lists(st.integers(-3, 3), max_size=4).filter(lambda v: len(v) != 2 or min(v) < 1),
        st.tuples(st.booleans(), st.booleans()),
    )
)
def test_garbage_input_sizes_are_config_errors(value):
    with pytest.raises(ConfigError, match="input_size"):
        ps.convert(NoStageNet(), LAST, input_size=value)


# ----------------------------------------------------------------------------------------------------------------------
# Files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    conv = ps.convert(model, "convstage2parc", input_size=64, validate=False, count=False)
    path = tmp_path_factory.mktemp("bad") / "r18.safetensors"
    pio.save(conv, path)
    return path


def _edit_manifest(src, dst, edit):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(header["__metadata__"][pio.MANIFEST_KEY])
    edit(manifest)
    header["__metadata__"][pio.MANIFEST_KEY] = json.dumps(manifest)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_a_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, path)  # another tool's file under our extension
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        pio.load(path)


def test_empty_file_directory_and_huge_header(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        pio.load(tmp_path / "empty.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        pio.load(tmp_path / "dir.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        pio.load(tmp_path / "huge.safetensors")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["model"]["args"].update(pretrained=True), "never honoured"),
        (lambda m: m["model"]["args"].update(checkpoint_path="/etc/passwd"), "never honoured"),
        (lambda m: m["steps"][0]["rule"].update(text="!!python/object/apply:os.system ['true']"), "no longer applies"),
        (lambda m: m.update(steps="all of them"), "malformed"),
        (lambda m: m["model"].update(name="os.system"), "unknown timm model 'os.system'"),
    ],
)
def test_tampered_manifests_are_refused(saved, tmp_path, edit, match):
    bad = tmp_path / "bad.safetensors"
    _edit_manifest(saved, bad, edit)
    with pytest.raises(CheckpointError, match=match):
        pio.load(bad)


@SETTINGS
@given(data=st.data())
def test_random_header_damage_is_a_checkpoint_error(saved, tmp_path_factory, data):
    raw = bytearray(saved.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, 8 + n - 1))
        raw[i] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        model = pio.load(path)
    except CheckpointError as e:
        assert str(path.name) in str(e)
    else:  # damage that changed nothing meaningful (e.g. JSON whitespace): the model loads whole
        assert isinstance(model, nn.Module)


def test_foreign_safetensors_with_a_fake_manifest_key(tmp_path):
    path = tmp_path / "fake.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path), metadata={pio.MANIFEST_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pio.load(path)


def test_output_path_whose_parent_is_a_file(saved, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    conv = pio.load(saved)
    with pytest.raises(CheckpointError, match=r"not a directory|does not exist"):
        pio.save(conv, blocker / "m.safetensors")
