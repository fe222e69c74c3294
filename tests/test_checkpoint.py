"""Checkpoints of timm conversions: exact round trips, manifests, refusals and damaged files (other sources:
test_sources.py)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from source_models import edit_manifest
from torch import nn

from parc_surgery import api
from parc_surgery import checkpoint as ckpt
from parc_surgery.api import convert
from parc_surgery.errors import CheckpointError
from parc_surgery.manifest import prepare_tensors
from parc_surgery.ops import ParC

SIZE = 64


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    return convert(model, "resnet_parc", input_size=SIZE, validate=False, count=False, seed=3)


@pytest.fixture(scope="module")
def saved(conv, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "r18.safetensors"
    ckpt.save(conv, path, seed=3)
    return path


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_with_header(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# ----------------------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_outputs_equal_exactly(conv, saved, x):
    loaded = ckpt.load(saved)
    assert not loaded.training
    assert torch.equal(_out(loaded, x), _out(conv.model, x))
    want, got = conv.model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert sum(isinstance(m, ParC) for m in loaded.modules()) == sum(isinstance(m, ParC) for m in conv.model.modules())


def test_manifest_records_how_to_rebuild(conv, saved):
    m = ckpt.read_manifest(saved)
    assert m["format_version"] == ckpt.MANIFEST_VERSION
    assert m["model"] == {"kind": "timm", "name": "resnet18", "args": {"num_classes": 10}}
    assert m["model_class"] == "timm.models.resnet.ResNet"
    (step,) = m["steps"]
    assert step["rule"]["name"] == "resnet_parc" and "parc_basic_block" in step["rule"]["text"]
    assert step["input_size"] == [SIZE, SIZE] and step["seed"] == 3
    assert [t["name"] for t in step["plan"]["targets"]] == [t.name for t in conv.plan.targets]
    assert set(m["versions"]) >= {"parc_surgery", "torch", "timm", "safetensors"}
    assert m["versions"]["torch"] == torch.__version__
    assert m["tensors"]["count"] == len(conv.model.state_dict())
    assert len(m["tensors"]["data_sha256"]) == 64


def test_round_trip_keeps_parc_impl_and_fft_model(x):
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=7)
    c = convert(model, "vit2parc", input_size=SIZE, impl="fft", validate=False, count=False)
    parcs = [m for m in c.model.modules() if isinstance(m, ParC)]
    parcs[0].impl = "spatial"  # a change made after conversion is restored too
    with tempfile.TemporaryDirectory() as d:
        path = ckpt.save(c, os.path.join(d, "m.safetensors"))
        loaded = ckpt.load(path)
    impls = [m.impl for m in loaded.modules() if isinstance(m, ParC)]
    assert impls == [m.impl for m in parcs] and impls[0] == "spatial" and impls[1] == "fft"
    assert torch.equal(_out(loaded, x[:1]), _out(c.model, x[:1]))


def test_loaded_model_converts_further_and_records_both_steps(saved, x, tmp_path):
    loaded = ckpt.load(saved)
    rule = {"version": 1, "name": "layer2", "targets": [{"block": "parc_basic_block", "select": {"name": "layer2.1"}}]}
    c2 = convert(loaded, rule, input_size=SIZE, validate=False, count=False)
    path = ckpt.save(c2, tmp_path / "two.safetensors")
    m = ckpt.read_manifest(path)
    assert [s["rule"]["name"] for s in m["steps"]] == ["resnet_parc", "layer2"]
    assert torch.equal(_out(ckpt.load(path), x), _out(c2.model, x))


def test_converting_twice_in_memory_is_refused_at_save(conv, tmp_path):
    rule = {"version": 1, "name": "layer2", "targets": [{"block": "parc_basic_block", "select": {"name": "layer2.1"}}]}
    c2 = convert(conv.model, rule, input_size=SIZE, validate=False, count=False)
    with pytest.raises(CheckpointError, match="converted twice in memory"):
        ckpt.save(c2, tmp_path / "chain.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_tied_tensors_are_stored_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # the same module under two names

    tensors, shared = prepare_tensors(Tied())
    assert set(tensors) == {"a.weight", "a.bias"}
    assert shared == {"b.weight": "a.weight", "b.bias": "a.bias"}


# ----------------------------------------------------------------------------------------------------------------------
# Refusals when writing


def test_existing_file_is_not_overwritten_without_force(conv, saved, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(saved.read_bytes())
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    with pytest.raises(CheckpointError, match="force=True"):
        ckpt.save(conv, path)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    ckpt.save(conv, path, seed=3, force=True)
    assert ckpt.read_manifest(path)["steps"][0]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_missing_directory(conv, tmp_path):
    target = tmp_path / "nope" / "m.safetensors"
    with pytest.raises(CheckpointError, match=r"nope.*does not exist"):
        ckpt.save(conv, target)
    assert not (tmp_path / "nope").exists()


def test_read_only_directory(conv, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the OS refuse the way it would for a user

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(ro))

        monkeypatch.setattr("parc_surgery._atomic.tempfile.mkstemp", refuse)
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=r"ro/m\.safetensors.*Permission denied"):
            ckpt.save(conv, ro / "m.safetensors")
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


def test_failed_write_leaves_no_partial_file(conv, tmp_path, monkeypatch):
    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.save(conv, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_bad_source_or_forbidden_args_are_refused(conv, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint_path"):
        ckpt.save(conv, tmp_path / "m.safetensors", source="resnet18", model_args={"checkpoint_path": "x"})
    with pytest.raises(CheckpointError, match=r"unknown timm model 'resnet1000'.*valid forms"):
        ckpt.save(conv, tmp_path / "m.safetensors", source="resnet1000")
    with pytest.raises(CheckpointError, match="not both"):
        ckpt.save(conv, tmp_path / "m.safetensors", source="resnet18", model_name="resnet18")
    assert list(tmp_path.iterdir()) == []


def test_a_source_that_contradicts_the_model_is_refused(conv, tmp_path):
    # resnet34 has more blocks: its tensors outside the replaced modules are not this model's
    with pytest.raises(CheckpointError, match=r"'resnet34' .* does not have this model's tensors.*layer1\.2"):
        ckpt.save(conv, tmp_path / "m.safetensors", source="resnet34", model_args={"num_classes": 10})
    with pytest.raises(CheckpointError, match=r"fc\.bias"):  # the right model, the wrong head
        ckpt.save(conv, tmp_path / "m.safetensors", source="resnet18")
    assert list(tmp_path.iterdir()) == []


def test_saving_runs_no_conversion(conv, tmp_path, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("save ran a conversion")

    monkeypatch.setattr(api, "convert", no_conversion)
    path = ckpt.save(conv, tmp_path / "m.safetensors", seed=3)
    assert ckpt.read_manifest(path)["steps"][0]["seed"] == 3


def test_a_file_that_reads_back_wrong_is_not_written(conv, tmp_path, monkeypatch):
    real = safetensors.torch.save_file

    def flaky_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raw = bytearray(Path(filename).read_bytes())
        raw[-3] ^= 0x01  # one bit of the last tensor flipped on its way to disk
        Path(filename).write_bytes(bytes(raw))

    monkeypatch.setattr(safetensors.torch, "save_file", flaky_disk)
    with pytest.raises(CheckpointError, match="read back differs"):
        ckpt.save(conv, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_any_module_saves_and_loads_through_model(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    path = ckpt.save(net, tmp_path / "m.safetensors")
    m = ckpt.read_manifest(path)
    assert m["model"] == {"kind": "module", "name": "torch.nn.modules.container.Sequential", "args": {}}
    with pytest.raises(CheckpointError, match=r"source was not recorded.*model="):
        ckpt.load(path)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    loaded = ckpt.load(path, fresh)
    x = torch.randn(5, 3)
    assert torch.equal(loaded(x), net(x))
    assert not torch.equal(fresh[0].weight, net[0].weight)  # the model passed is left as it was
    with pytest.raises(CheckpointError, match=r"0\.weight \(file \[4, 3\], model \[4, 5\]\)"):
        ckpt.load(path, nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_format_1_files_still_load(saved, tmp_path, x):
    old = tmp_path / "v1.safetensors"

    def to_v1(m):
        m.update(format_version=1)
        m["model"] = {"name": m["model"]["name"], "args": m["model"]["args"]}
        del m["model_class"]

    edit_manifest(saved, old, to_v1)
    assert torch.equal(_out(ckpt.load(old), x), _out(ckpt.load(saved), x))


# ----------------------------------------------------------------------------------------------------------------------
# Damaged and foreign files


def test_truncated_file(saved, tmp_path):
    bad = tmp_path / "cut.safetensors"
    raw = saved.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.load(bad)


def test_flipped_tensor_byte_is_detected(saved, tmp_path):
    bad = tmp_path / "flip.safetensors"
    raw = bytearray(saved.read_bytes())
    raw[-5] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the manifest's digest"):
        ckpt.load(bad)


def test_tampered_plan_is_detected(saved, tmp_path):
    bad = tmp_path / "plan.safetensors"

    def edit(m):
        m["steps"][0]["plan"]["targets"][0]["name"] = "layer2.1"

    edit_manifest(saved, bad, edit)
    with pytest.raises(CheckpointError, match="different plan"):
        ckpt.load(bad)


def test_tampered_tensor_list_is_detected(saved, tmp_path):
    bad = tmp_path / "layout.safetensors"
    header, data = _header(saved)
    assert header["fc.bias"]["shape"] == [10]
    header["fc.bias"]["shape"] = [2, 5]  # same bytes, another shape: a valid safetensors file
    _write_with_header(bad, header, data)
    with pytest.raises(CheckpointError, match=r"names, shapes, dtypes\) do not match"):
        ckpt.load(bad)


def test_newer_manifest_version_is_refused(saved, tmp_path):
    bad = tmp_path / "new.safetensors"
    edit_manifest(saved, bad, lambda m: m.update(format_version=ckpt.MANIFEST_VERSION + 1))
    with pytest.raises(CheckpointError, match="newer parc-surgery"):
        ckpt.read_manifest(bad)


def test_unknown_model_in_manifest(saved, tmp_path):
    bad = tmp_path / "model.safetensors"
    edit_manifest(saved, bad, lambda m: m["model"].update(name="no_such_model_xyz"))
    with pytest.raises(CheckpointError, match="unknown timm model 'no_such_model_xyz'"):
        ckpt.load(bad)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"not a parc-surgery file.*parc-convert --output"):
        ckpt.load(path)


def test_not_a_safetensors_file_and_missing_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 3 + b"hello world")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt.load(path)
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.load(tmp_path / "missing.safetensors")
