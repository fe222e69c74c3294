"""Model sources: every form parses, builds, converts, saves and loads back bit for bit; bad ones are refused.

Also the safety rule of checkpoints: a file never imports code, even when its manifest was edited to name
an importable module.
"""

from __future__ import annotations

import sys

import pytest
import torch
from source_models import (
    BUILDER,
    BUILDER_ARGS,
    CONVNEXT_ARGS,
    edit_manifest,
    logits,
    source_workdir,
    write_transformers_dir,
)

import parc_surgery as ps
from parc_surgery.errors import CheckpointError, ConfigError
from parc_surgery.sources import create_model, get_source, list_source_forms, source_of_model

SIZE = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A current directory holding the user package and a transformers model directory."""
    with source_workdir(tmp_path_factory.mktemp("sources")) as d:
        yield d


# ----------------------------------------------------------------------------------------------------------------------
# Parsing


def test_every_form_parses(workdir):
    cases = {
        "resnet18": ("timm", "resnet18"),
        "timm:resnet18": ("timm", "resnet18"),
        "torchvision:resnet18": ("torchvision", "resnet18"),
        "transformers:tiny_convnext": ("transformers", "ConvNextForImageClassification"),
        "transformers:ViTForImageClassification": ("transformers", "ViTForImageClassification"),
        BUILDER: ("builder", BUILDER),
    }
    for text, (kind, name) in cases.items():
        src = get_source(text)
        assert (src.kind, src.name) == (kind, name), text
    assert get_source("transformers:tiny_convnext").config["hidden_sizes"] == CONVNEXT_ARGS["hidden_sizes"]
    assert "userzoo" not in sys.modules  # parsing imports nothing
    assert [f for f, _, _ in list_source_forms()][:5] == [
        "NAME", "torchvision:NAME", "transformers:PATH", "transformers:CLASS", "package.module:function"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("resnet1000", {}, r"unknown timm model 'resnet1000'; did you mean: .*resnet18"),
        ("torchvision:resnet1000", {}, r"unknown torchvision model 'resnet1000'; did you mean: .*resnet18"),
        ("transformers:NoSuchModelClass", {}, "neither a directory nor a transformers model class"),
        ("a:b:c", {}, "not one of the forms"),
        ("my-pkg:build", {}, "not one of the forms"),
        ("hf-hub:timm/resnet18.a1_in1k", {}, "builds models offline"),
        ("resnet18", {"pretrained": True}, "use --pretrained"),
        (
            "transformers:ViTForImageClassification",
            {"hiden_size": 8},
            "not a field of ViTConfig; did you mean: hidden_size",
        ),
    ],
)
def test_bad_sources_name_the_form(text, args, message):
    with pytest.raises(ConfigError, match=message) as e:
        get_source(text, args)
    if "field" not in message and "pretrained" not in message:
        assert "valid forms: NAME (e.g. mobilevit_s); torchvision:NAME" in str(e.value)


def test_transformers_dir_without_config_or_with_pickled_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        get_source(f"transformers:{tmp_path / 'empty'}")
    d = write_transformers_dir(tmp_path / "pickled", weights=False)
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ConfigError, match="only pickled weights"):
        create_model(f"transformers:{d}")


def test_a_missing_builder_module_is_a_usage_error(workdir):
    with pytest.raises(ConfigError, match="no module named 'nosuch_pkg_xyz'"):
        create_model("nosuch_pkg_xyz.nets:build")
    with pytest.raises(ConfigError, match="has no 'tiny_nett'; did you mean: tiny_net"):
        create_model("userzoo.nets:tiny_nett")
    with pytest.raises(ConfigError, match="check --model-arg"):
        create_model(BUILDER, depth=3)


def test_transformers_weights_are_loaded_offline(workdir):
    from transformers import ConvNextForImageClassification

    model = create_model("transformers:tiny_convnext")
    ref = ConvNextForImageClassification.from_pretrained(str(workdir / "tiny_convnext"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
    assert source_of_model(model).config["depths"] == CONVNEXT_ARGS["depths"]


# ----------------------------------------------------------------------------------------------------------------------
# Convert, save, load: every form

FORMS = [
    ("torchvision:resnet18", {"num_classes": 10}, "resnet_parc"),
    ("transformers:ConvNextForImageClassification", CONVNEXT_ARGS, "convstage2parc"),
    ("transformers:tiny_convnext", {}, "convstage2parc"),
    (BUILDER, BUILDER_ARGS, "resnet_parc"),
]


@pytest.mark.parametrize(("spec", "args", "rule"), FORMS, ids=[f[0] for f in FORMS])
def test_every_form_converts_saves_and_loads_exactly(workdir, spec, args, rule, tmp_path):
    model = create_model(spec, **args)
    conv = ps.convert(model, rule, input_size=SIZE, validate=False, count=False, seed=1)
    assert conv.plan.targets
    path = ps.save(conv, tmp_path / "m.safetensors", seed=1)
    recorded = ps.read_manifest(path)["model"]
    src = get_source(spec, args)
    assert (recorded["kind"], recorded["name"], recorded["args"]) == (src.kind, src.name, dict(src.args))
    assert ("config" in recorded) == (src.config is not None)
    if src.kind == "builder":
        with pytest.raises(CheckpointError, match=rf"never imports code.*model=tiny_net\(...\).*--model {BUILDER}"):
            ps.load(path)
        loaded = ps.load(path, create_model(spec, **args))
    else:
        loaded = ps.load(path)
        again = ps.load(path, create_model(spec, **args))  # onto the user's own unconverted model
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), loaded.state_dict().values()))
    want, got = conv.model.state_dict(), loaded.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
    conv.model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(logits(loaded(x)), logits(conv.model(x)))


@pytest.fixture(scope="module")
def saved_builder(workdir):
    conv = ps.convert(
        create_model(BUILDER, **BUILDER_ARGS), "resnet_parc", input_size=SIZE, validate=False, count=False
    )
    return ps.save(conv, workdir / "builder.safetensors")


def test_sources_found_from_the_model_or_given(tmp_path):
    from torchvision.models import resnet18
    from transformers import ConvNextConfig, ConvNextForImageClassification

    hf = ConvNextForImageClassification(ConvNextConfig(**CONVNEXT_ARGS))  # made directly, not by create_model
    conv = ps.convert(hf, "convstage2parc", input_size=SIZE, validate=False, count=False)
    path = ps.save(conv, tmp_path / "hf.safetensors")
    recorded = ps.read_manifest(path)["model"]
    assert recorded["kind"] == "transformers" and recorded["config"]["hidden_sizes"] == CONVNEXT_ARGS["hidden_sizes"]
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(logits(ps.load(path)(x)), logits(conv.model.eval()(x)))

    conv = ps.convert(resnet18(num_classes=10), "resnet_parc", input_size=SIZE, validate=False, count=False)
    unknown = ps.save(conv, tmp_path / "tv.safetensors")  # a plain torchvision class: origin unknown
    with pytest.raises(CheckpointError, match=r"class torchvision\.models\.resnet\.ResNet.*source='torchvision"):
        ps.load(unknown)
    given = ps.save(conv, tmp_path / "tv2.safetensors", source="torchvision:resnet18", model_args={"num_classes": 10})
    with torch.no_grad():
        assert torch.equal(ps.load(given)(x), conv.model.eval()(x))


def test_load_onto_the_wrong_model_names_the_tensors(saved_builder):
    path = saved_builder
    with pytest.raises(CheckpointError, match=r"head\.2\.weight \(file \[5, 16\], model \[7, 16\]\)"):
        ps.load(path, create_model(BUILDER, width=8, num_classes=7))
    with pytest.raises(
        CheckpointError, match=r"no longer applies \(the file was saved from a userzoo\.nets\.TinyNet; "
    ):
        ps.load(path, torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


# ----------------------------------------------------------------------------------------------------------------------
# A file never runs code

_EVIL = """import pathlib
pathlib.Path(__file__).with_name("MARKER").write_text("imported")
def build(**kwargs):
    pathlib.Path(__file__).with_name("MARKER").write_text("called")
"""


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"kind": "builder", "name": "evil_mod:build", "args": {}}, r"never imports code.*--model evil_mod:build"),
        ({"kind": "timm", "name": "evil_mod:build", "args": {}}, "unknown timm model 'evil_mod:build'"),
        ({"kind": "torchvision", "name": "evil_mod", "args": {}}, "unknown torchvision model 'evil_mod'"),
        ({"kind": "transformers", "name": "evil_mod", "args": {}}, "not a transformers model class"),
        ({"kind": "module", "name": "evil_mod.Net", "args": {}}, r"source was not recorded.*model="),
        ({"kind": "exec", "name": "evil_mod:build", "args": {}}, "unknown model source kind 'exec'"),
    ],
)
def test_a_tampered_manifest_never_imports_code(saved_builder, tmp_path, monkeypatch, model, message):
    good = saved_builder
    (tmp_path / "evil_mod.py").write_text(_EVIL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable on purpose: only the loader's restraint keeps it out
    bad = tmp_path / "bad.safetensors"
    edit_manifest(good, bad, lambda m: m.update(model=model))
    with pytest.raises(CheckpointError, match=message):
        ps.load(bad)
    assert not (tmp_path / "MARKER").exists() and "evil_mod" not in sys.modules
