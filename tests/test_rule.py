"""Rules: bundled files, round trips, located error messages, allow-listed types, fractions, wheel install."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import timm.models.resnet
import torchvision.models.resnet
from torch import nn

from parc_surgery import types as ptypes
from parc_surgery.blocks import list_blocks, register_block, unregister_block
from parc_surgery.errors import ConfigError, RuleError
from parc_surgery.rule import (
    Rule,
    Selector,
    StageSpec,
    Target,
    TargetOptions,
    get_rule_text,
    list_rules,
    load_rule,
    parse_rule,
)

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "rules").glob("*.yaml"))
DUMMY = "dummy_rule_block"


class _DummyBlock(nn.Module):
    @classmethod
    def from_module(cls, module, ctx):
        raise NotImplementedError

    @classmethod
    def check_source(cls, module, ctx):
        return None


@pytest.fixture(scope="module", autouse=True)
def dummy_block():
    register_block(DUMMY)(_DummyBlock)
    yield DUMMY
    unregister_block(DUMMY)


def rule_text(*target_lines: str, head: str = "version: 1\nname: t\n") -> str:
    """A rule with one target whose body lines (indented under '- ') follow the block line."""
    body = "".join(f"    {line}\n" for line in target_lines)
    return f"{head}targets:\n  - block: {DUMMY}\n{body}"


# ---------------------------------------------------------------------------------------------------------------------
# Bundled rules


def test_bundled_rule_names_match_files():
    assert RULE_FILES, "rules/ holds no YAML files"
    assert list_rules() == [p.stem for p in RULE_FILES]
    assert not (REPO / "rules" / ".keep").exists()


@pytest.mark.parametrize("path", RULE_FILES, ids=[p.stem for p in RULE_FILES])
def test_bundled_rule_loads_and_round_trips(path):
    text = path.read_text()
    assert text.startswith("# "), "each rule file starts with a header comment saying what it replaces and why"
    by_name = load_rule(path.stem)
    by_path = load_rule(path)
    assert by_name == by_path
    assert by_name.name == path.stem and by_name.version == 1
    assert get_rule_text(path.stem) == text and by_name.text == text
    assert by_name.description
    for target in by_name.targets:
        assert target.block in list_blocks()
        assert not target.select.is_empty
    assert load_rule(by_name.to_dict()) == by_name
    assert parse_rule(by_name.to_yaml()) == by_name
    assert parse_rule(by_name.to_yaml()).to_yaml() == by_name.to_yaml()


def test_bundled_rule_contents():
    half, third = Fraction(1, 2), Fraction(1, 3)
    deep = (StageSpec((-2,), half, False), StageSpec((-1,), third, False))

    vit = load_rule("vit2parc")
    (t,) = vit.targets
    assert (t.block, t.select.types, t.options.pe, t.options.init) == (
        "parcnet",
        ("MobileVitBlock", "transformers.models.mobilevit.modeling_mobilevit.MobileViTLayer"),
        "all",
        "warm_start",
    )
    assert t.options.kernel_size == "auto" and t.options.width_mult == pytest.approx(4 / 3, rel=1e-9)

    resnet = load_rule("resnet_parc")
    assert [(t.block, t.select.types) for t in resnet.targets] == [
        ("parc_bottleneck", ("Bottleneck",)),
        ("parc_basic_block", ("BasicBlock",)),
    ]
    assert all(t.select.stages == deep and t.options.pe == "all" for t in resnet.targets)

    mnv2 = load_rule("mobilenetv2_parc")
    (t,) = mnv2.targets
    assert t.block == "parc_inverted_residual" and t.options.pe == "first"
    assert t.select.stages == (StageSpec(("blocks.3",), half), StageSpec(("blocks.4", "blocks.5"), third))

    (t,) = load_rule("convnext_parc").targets
    assert t.block == "parc_convnext" and set(t.select.types) == {"ConvNeXtBlock", "CNBlock"}
    assert t.select.stages == (StageSpec((-2, -1), third),) and t.options.pe == "all"

    (t,) = load_rule("vit_attention2parc").targets
    assert t.block == "parc_token_mixer" and t.select.attention
    assert t.select.types == ("timm.models.vision_transformer.Attention",)

    plain, generic = load_rule("attention2parc").targets
    assert plain.block == "parc_token_mixer" and plain.select.attention and plain.select.exact
    assert plain.select.types == ("timm.layers.attention.Attention",)
    assert generic.select == Selector(attention=True) and generic.block == "parc_mixer"

    conv = load_rule("convstage2parc")
    assert [t.block for t in conv.targets] == [
        "parc_bottleneck",
        "parc_basic_block",
        "parc_inverted_residual",
        "parc_convnext",
        "parc_conv",
    ]
    assert all(t.select.stages == deep for t in conv.targets)


def test_target_lines_point_at_the_target():
    text = (REPO / "rules" / "convstage2parc.yaml").read_text().splitlines()
    expected = [i + 1 for i, line in enumerate(text) if line.lstrip().startswith("- block:")]
    assert [t.line for t in load_rule("convstage2parc").targets] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Dataclasses and round trips


def test_dataclasses_are_frozen_and_use_tuples():
    rule = parse_rule(rule_text("select: {type: [Bottleneck, CNBlock], name: [a, 'b.*']}"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.targets[0].select.types = ()  # type: ignore[misc]
    assert isinstance(rule.targets, tuple) and isinstance(rule.targets[0].select.types, tuple)
    assert rule.targets[0].select.names == ("a", "b.*")
    assert hash(rule) == hash(load_rule(rule.to_dict()))


def test_full_schema_round_trip():
    text = rule_text(
        "select:",
        "  type: [Bottleneck, timm.models.resnet.BasicBlock]",
        "  exact: true",
        "  name: ['layer3.*', 're:^layer4\\.[0-9]$']",
        "  stages:",
        "    - {stage: -2, fraction: 0.5}",
        "    - {stage: [layer4, 1], fraction: 2/3, include_first: true}",
        "exclude:",
        "  name: layer4.0",
        "options:",
        "  kernel_size: [7, 9]",
        "  pe: first",
        "  impl: fft",
        "  init: reference",
        "  width_mult: 2",
        "  block_options: {z: 1, a: [1, 2.5, x, null], flag: true}",
        head="version: 1\nname: full\ndescription: every field\ninput_size: [256, 320]\n",
    )
    rule = parse_rule(text, source="full.yaml")
    expected = Rule(
        version=1,
        name="full",
        description="every field",
        input_size=(256, 320),
        targets=(
            Target(
                block=DUMMY,
                select=Selector(
                    types=("Bottleneck", "timm.models.resnet.BasicBlock"),
                    exact=True,
                    names=("layer3.*", r"re:^layer4\.[0-9]$"),
                    stages=(StageSpec((-2,), Fraction(1, 2)), StageSpec(("layer4", 1), Fraction(2, 3), True)),
                ),
                exclude=Selector(names=("layer4.0",)),
                options=TargetOptions(
                    kernel_size=(7, 9),
                    pe="first",
                    impl="fft",
                    init="reference",
                    width_mult=2.0,
                    block_options=(("a", (1, 2.5, "x", None)), ("flag", True), ("z", 1)),
                ),
            ),
        ),
    )
    assert rule == expected
    assert rule.source == "full.yaml" and rule.text == text
    assert rule.targets[0].line == text.splitlines().index(f"  - block: {DUMMY}") + 1 == 6
    assert load_rule(rule.to_dict()) == rule
    assert parse_rule(rule.to_yaml()) == rule
    assert isinstance(rule.targets[0].options.width_mult, float)


def test_defaults_and_scalar_shorthands():
    rule = parse_rule(rule_text("select: {type: Bottleneck, stages: [{stage: -1}]}", "options: {kernel_size: 5}"))
    (t,) = rule.targets
    assert t.exclude is None and rule.description == "" and rule.input_size is None
    assert t.select.stages == (StageSpec((-1,), Fraction(1), False),)
    assert t.options == TargetOptions(kernel_size=(5, 5))
    assert TargetOptions() == TargetOptions("auto", "all", "auto", "warm_start", None, ())
    assert parse_rule(rule_text("select: {name: a}", "exclude: null", "options: null")).targets[0].exclude is None
    assert load_rule(
        {"version": 1, "name": "n", "input_size": 224, "targets": [{"block": DUMMY, "select": {"name": "a"}}]}
    ).input_size == (224, 224)


def test_yaml_merge_keys_and_anchors():
    text = (
        "version: 1\nname: m\ntargets:\n"
        f"  - block: {DUMMY}\n    select: &sel {{type: Bottleneck}}\n    options: &opt {{pe: none, impl: fft}}\n"
        f"  - block: {DUMMY}\n    select: *sel\n    options:\n      <<: *opt\n      impl: spatial\n"
    )
    a, b = parse_rule(text).targets
    assert a.select == b.select
    assert (a.options.pe, a.options.impl, b.options.pe, b.options.impl) == ("none", "fft", "none", "spatial")


def test_selector_is_never_empty():
    with pytest.raises(RuleError, match=r"^Selector: needs at least one criterion"):
        Selector()
    assert not Selector(attention=True).is_empty and not Selector(names=("a",)).is_empty
    assert not Selector(stages=(StageSpec((-1,)),)).is_empty and not Selector(types=("Conv2d",)).is_empty


# ---------------------------------------------------------------------------------------------------------------------
# Fractions


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1/2", Fraction(1, 2)),
        ("'2/4'", Fraction(1, 2)),
        ("' 1 / 3 '", Fraction(1, 3)),
        ("1", Fraction(1)),
        ("0.5", Fraction(1, 2)),
        ("0.3333333333", Fraction(1, 3)),
        ("'0.25'", Fraction(1, 4)),
        ("'.75'", Fraction(3, 4)),
        ("1/1000", Fraction(1, 1000)),
        ("0.6667", Fraction(2, 3)),
    ],
)
def test_fraction_parsing(value, expected):
    rule = parse_rule(rule_text(f"select: {{stages: [{{stage: -1, fraction: {value}}}]}}"))
    assert rule.targets[0].select.stages[0].fraction == expected


def test_fraction_from_python_values():
    def frac(v):
        d = {
            "version": 1,
            "name": "f",
            "targets": [{"block": DUMMY, "select": {"stages": [{"stage": 0, "fraction": v}]}}],
        }
        return load_rule(d).targets[0].select.stages[0].fraction

    assert frac(Fraction(2, 7)) == Fraction(2, 7)
    assert frac(1 / 3) == Fraction(1, 3)
    assert frac(1) == 1
    for bad in (True, 0, -1, 2, Fraction(3, 2), float("nan"), float("inf"), "1/0", "-1/2", None, [0.5]):
        with pytest.raises(RuleError, match=r"<dict>: targets\[0\]\.select\.stages\[0\]\.fraction: "):
            frac(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Error messages: file, line, field path, value, fix

BLOCK_LINE = 4  # rule_text(): line of "- block:"; its body starts on line 5

ERROR_CASES = [
    # (rule text, line, field path, text that must appear: the value and/or the fix)
    (
        rule_text("select:", "  stages:", "    - stage: -2", "    - stage: -1", "      fraction: 3/2"),
        9,
        "targets[0].select.stages[1].fraction",
        "got '3/2'",
    ),
    (
        rule_text("select: {stages: [{stage: -1, fraction: -0.5}]}"),
        5,
        "targets[0].select.stages[0].fraction",
        "got -0.5",
    ),
    (
        rule_text("select: {stages: [{stage: -1, fraction: 1/0}]}"),
        5,
        "targets[0].select.stages[0].fraction",
        "zero denominator, got '1/0'",
    ),
    (rule_text("select: {stages: [{stage: -1, fraction: 0}]}"), 5, "targets[0].select.stages[0].fraction", "got 0"),
    (rule_text("select: {stages: [{stage: yes}]}"), 5, "targets[0].select.stages[0].stage", "got True"),
    (
        rule_text("select: {stages: [{stage: -1, include_first: 1}]}"),
        5,
        "targets[0].select.stages[0].include_first",
        "expected true or false, got 1",
    ),
    (rule_text("select: {stages: {stage: -1}}"), 5, "targets[0].select.stages", "expected a list"),
    (rule_text("select: {stages: []}"), 5, "targets[0].select.stages", "non-empty"),
    (rule_text("select: {stages: [{fraction: 1/2}]}"), 5, "targets[0].select.stages[0].stage", "required key 'stage'"),
    (
        rule_text("select: {type: Bottleneck}", "exlcude: {name: a}"),
        6,
        "targets[0].exlcude",
        "unknown key 'exlcude' (did you mean 'exclude'?",
    ),
    (rule_text("select: {typ: Bottleneck}"), 5, "targets[0].select.typ", "did you mean 'type'?"),
    (
        rule_text("select: {type: Bottleneck}", "options: {kernal_size: 3}"),
        6,
        "targets[0].options.kernal_size",
        "did you mean 'kernel_size'?",
    ),
    (
        rule_text("select: {type: Bottleneck}", "options: {pe: frist}"),
        6,
        "targets[0].options.pe",
        "got 'frist'. Did you mean 'first'?",
    ),
    (
        rule_text("select: {type: Bottleneck}", "options: {impl: ftt}"),
        6,
        "targets[0].options.impl",
        "Did you mean 'fft'?",
    ),
    (
        rule_text("select: {type: Bottleneck}", "options: {init: warmstart}"),
        6,
        "targets[0].options.init",
        "Did you mean 'warm_start'?",
    ),
    (
        rule_text("select: {type: Bottleneck}", "options: {kernel_size: 0}"),
        6,
        "targets[0].options.kernel_size",
        "got 0",
    ),
    (
        rule_text("select: {type: Bottleneck}", "options: {kernel_size: [3, yes]}"),
        6,
        "targets[0].options.kernel_size[1]",
        "expected an integer, got True",
    ),
    (
        rule_text("select: {type: Bottleneck}", "options: {kernel_size: [3, 3, 3]}"),
        6,
        "targets[0].options.kernel_size",
        "got [3, 3, 3]",
    ),
    (
        rule_text("select: {type: Bottleneck}", "options: {width_mult: -1}"),
        6,
        "targets[0].options.width_mult",
        "got -1",
    ),
    (rule_text("select: {type: Bottleneck}", "options: {width_mult: .nan}"), 6, "targets[0].options.width_mult", "nan"),
    (
        rule_text("select: {type: Bottleneck}", "options: {block_options: {a: {b: 1}}}"),
        6,
        "targets[0].options.block_options.a",
        "must be scalars",
    ),
    (rule_text("select: {type: Botleneck}"), 5, "targets[0].select.type", "Did you mean 'Bottleneck'"),
    (rule_text("select: {type: [Bottleneck, os.system]}"), 5, "targets[0].select.type[1]", "outside the allow-list"),
    (rule_text("select: {type: 'Bottle neck'}"), 5, "targets[0].select.type", "is not a class name"),
    (rule_text("select: {type: 3}"), 5, "targets[0].select.type", "got 3"),
    (rule_text("select: {type: []}"), 5, "targets[0].select.type", "got []"),
    (rule_text("select: {name: 're:(('}"), 5, "targets[0].select.name", "invalid regular expression"),
    (rule_text("select: {name: 're:'}"), 5, "targets[0].select.name", "empty regular expression"),
    (rule_text("select: {name: ''}"), 5, "targets[0].select.name", "got ''"),
    (rule_text("select: {}"), 5, "targets[0].select", "needs at least one criterion"),
    (rule_text("select: {attention: false}"), 5, "targets[0].select", "needs at least one criterion"),
    (rule_text("select: {exact: true, name: a}"), 5, "targets[0].select.exact", "only applies to 'type'"),
    (rule_text("select: {attention: 'yes'}"), 5, "targets[0].select.attention", "got 'yes'"),
    (rule_text("select: {name: a}", "exclude: {}"), 6, "targets[0].exclude", "needs at least one criterion"),
    (rule_text("exclude: {name: a}"), BLOCK_LINE, "targets[0].select", "required key 'select' is missing"),
    (rule_text("select: [a]"), 5, "targets[0].select", "expected a mapping"),
    (
        "version: 1\nname: t\ntargets:\n  - block: parc_botleneck\n    select: {name: a}\n",
        4,
        "targets[0].block",
        "got 'parc_botleneck'. Did you mean 'parc_bottleneck'?",
    ),
    ("version: 1\nname: t\ntargets:\n  - block: 7\n    select: {name: a}\n", 4, "targets[0].block", "got 7"),
    ("version: 1\nname: t\ntargets:\n  - select: {name: a}\n", 4, "targets[0].block", "required key 'block'"),
    ("version: 1\nname: t\ntargets: []\n", 3, "targets", "non-empty list"),
    ("version: 1\nname: t\ntargets: {block: x}\n", 3, "targets", "non-empty list"),
    ("version: 1\nname: t\n", 1, "targets", "required key 'targets'"),
    ("version: 1\nname: ''\ntargets: []\n", 2, "name", "got ''"),
    ("version: 1\nname: t\ndescription: 5\ntargets: []\n", 3, "description", "got 5"),
    ("version: 1\nname: t\ninput_size: [224]\ntargets: []\n", 3, "input_size", "got [224]"),
    ("version: 1\nname: t\ninput_size: 99999999\ntargets: []\n", 3, "input_size", "got 99999999"),
    ("version: 1\nnmae: t\ntargets: []\n", 2, "nmae", "did you mean 'name'?"),
    ("version: 2\nname: t\nnew_field: 1\n", 1, "version", "newer than this parc-surgery reads (version 1). upgrade"),
    ("version: yes\nname: t\n", 1, "version", "got True"),
    ("version: 0\nname: t\n", 1, "version", "got 0"),
    ("version: '1'\nname: t\n", 1, "version", "got '1'"),
    ("name: t\ntargets: []\n", 1, "version", "add 'version: 1'"),
    ("- version: 1\n", 1, "(top level)", "must be a mapping"),
]


@pytest.mark.parametrize(("text", "line", "field", "detail"), ERROR_CASES)
def test_error_names_file_line_field_value(text, line, field, detail):
    with pytest.raises(RuleError) as info:
        parse_rule(text, source="bad.yaml")
    msg = str(info.value)
    assert msg.startswith(f"bad.yaml:{line}: {field}: "), msg
    assert detail in msg, msg


def test_error_from_file_names_the_path(tmp_path):
    path = tmp_path / "my_rule.yaml"
    path.write_text(rule_text("select: {stages: [{stage: -1, fraction: 5/4}]}"))
    with pytest.raises(RuleError, match=re.escape(f"{path}:5: targets[0].select.stages[0].fraction: ")):
        load_rule(path)
    with pytest.raises(RuleError, match=re.escape(f"{path}:5: ")):
        load_rule(str(path))


def test_dict_errors_have_no_line():
    d = {"version": 1, "name": "d", "targets": [{"block": DUMMY, "select": {"name": ["a", 3]}}]}
    with pytest.raises(RuleError, match=re.escape("<dict>: targets[0].select.name[1]: ") + ".*got 3"):
        load_rule(d)
    with pytest.raises(RuleError, match=r"keys must be strings"):
        load_rule({"version": 1, "name": "d", 1: 2})
    with pytest.raises(RuleError, match=r"expected a bundled rule name, a path, a dict or a Rule, got int"):
        load_rule(3)  # type: ignore[arg-type]


def test_errors_are_config_errors():
    assert issubclass(RuleError, ConfigError)
    with pytest.raises(ValueError):
        parse_rule("version: 1\n")


# ---------------------------------------------------------------------------------------------------------------------
# load_rule argument handling and files


def test_bundled_name_vs_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet_parc").write_text(rule_text("select: {name: local}", head="version: 1\nname: local\n"))
    assert load_rule("resnet_parc").name == "resnet_parc"  # a bundled name wins over a file in the cwd
    assert load_rule("./resnet_parc").name == "local"  # a path separator makes it a path
    assert load_rule(Path("resnet_parc")).name == "local"  # PathLike is always a path
    (tmp_path / "mine.yml").write_text(rule_text("select: {name: x}", head="version: 1\nname: mine\n"))
    assert load_rule("mine.yml").name == "mine"
    rule = load_rule("vit2parc")
    assert load_rule(rule) is rule


def test_missing_rule_lists_bundled_names_and_suggests():
    with pytest.raises(RuleError) as info:
        load_rule("resnet_parcc")
    msg = str(info.value)
    assert "not found" in msg and "Did you mean 'resnet_parc'?" in msg
    assert all(name in msg for name in list_rules())
    with pytest.raises(RuleError, match=r"not found.*Bundled rules: .*vit2parc"):
        load_rule("/no/such/dir/rule.yaml")
    with pytest.raises(RuleError, match=re.escape("no bundled rule named 'vit2parcc'. Did you mean 'vit2parc'")):
        get_rule_text("vit2parcc")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "rule file is empty"),
        (b"# only a comment\n", "rule file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"),
        (b"version: 1\nname: \xff\xfe\n", r"rule\.yaml:2: rule file is not valid UTF-8"),
        (b"version: 1\nname: a\x07b\n", r"rule\.yaml:2: invalid character"),
        (b"version: 1\n" + b"#" * 1_000_001, "too large"),
        (b"version: 1\nname: t\n---\nversion: 1\n", r"rule\.yaml:3: invalid YAML: expected a single document"),
        (b"version: 1\n  name: [t\n", r"rule\.yaml:\d+: invalid YAML"),
        (b"version: 1\nversion: 1\n", r"rule\.yaml:2: duplicate key 'version'"),
    ],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "rule.yaml"
    path.write_bytes(content)
    with pytest.raises(RuleError, match=match):
        load_rule(path)


def test_directory_is_not_a_rule(tmp_path):
    with pytest.raises(RuleError, match="not a regular file"):
        load_rule(tmp_path)


def test_utf8_bom_and_unicode_are_fine(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_bytes(
        b"\xef\xbb\xbf" + rule_text("select: {name: a}", head="version: 1\nname: t\ndescription: \u00e9\n").encode()
    )
    assert load_rule(path).description == "\u00e9"


# ---------------------------------------------------------------------------------------------------------------------
# Allow-listed types


class LocalModule(nn.Module):
    pass


class Bottleneck(nn.Module):  # same bare name as timm's, but defined here: not allowed unless registered
    pass


class MyResBlock(timm.models.resnet.Bottleneck):  # a user subclass of an allowed class
    pass


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen", "tests.test_rule.LocalModule"])
def test_dotted_paths_outside_allow_list_are_refused(name):
    assert not ptypes.is_allowed_type_name(name)
    with pytest.raises(RuleError, match=re.escape(f"targets[0].select.type: {name!r} is outside the allow-list")):
        parse_rule(rule_text(f"select: {{type: {name}}}"))


def test_bad_type_names():
    for bad in ("", "1abc", "a..b", "a.b.", "x y", "os.system()", "__import__('os')"):
        assert not ptypes.is_allowed_type_name(bad)
        with pytest.raises(RuleError):
            ptypes.validate_type_name(bad)
    assert ptypes.is_allowed_type_name("Anything") and ptypes.is_allowed_type_name("torch.nn.Conv2d")
    with pytest.raises(RuleError, match="LocalModule"):
        parse_rule(rule_text("select: {type: LocalModule}"))


def test_type_name_matches():
    tv_bottleneck = torchvision.models.resnet.Bottleneck
    timm_bottleneck = timm.models.resnet.Bottleneck
    for cls in (tv_bottleneck, timm_bottleneck):
        assert ptypes.type_name_matches(cls, "Bottleneck")
        assert ptypes.type_name_matches(cls, "Bottleneck", exact=True)
        assert ptypes.type_name_matches(cls, "torch.nn.Module")  # via the MRO
        assert not ptypes.type_name_matches(cls, "torch.nn.Module", exact=True)
        assert not ptypes.type_name_matches(cls, "BasicBlock")
    assert ptypes.type_name_matches(timm_bottleneck, "timm.models.resnet.Bottleneck")
    assert not ptypes.type_name_matches(tv_bottleneck, "timm.models.resnet.Bottleneck")
    assert ptypes.type_name_matches(nn.Conv2d, "torch.nn.Conv2d")  # a re-export resolves through sys.modules
    assert ptypes.type_name_matches(nn.Conv2d, "torch.nn.modules.conv.Conv2d")
    assert not ptypes.type_name_matches(nn.Conv2d, "torch.nn.Conv1d")
    # subclasses defined outside the allow-list match through their allowed bases, never by themselves
    assert ptypes.type_name_matches(MyResBlock, "Bottleneck")
    assert not ptypes.type_name_matches(MyResBlock, "Bottleneck", exact=True)
    assert not ptypes.type_name_matches(MyResBlock, "MyResBlock")
    assert not ptypes.type_name_matches(Bottleneck, "Bottleneck")
    assert not ptypes.type_name_matches(object, "object") and not ptypes.type_name_matches(int, "builtins.int")


def test_register_type_allows_user_classes():
    name = f"{LocalModule.__module__}.LocalModule"
    try:
        assert ptypes.register_type(LocalModule) is LocalModule
        assert ptypes.is_allowed_type_name(name)
        assert ptypes.type_name_matches(LocalModule, "LocalModule", exact=True)
        assert ptypes.type_name_matches(LocalModule, name)
        rule = parse_rule(rule_text(f"select: {{type: [LocalModule, {name}]}}"))
        assert rule.targets[0].select.types == ("LocalModule", name)
    finally:
        ptypes.unregister_type(LocalModule)
    assert not ptypes.type_name_matches(LocalModule, "LocalModule")
    with pytest.raises(RuleError, match="outside the allow-list"):
        parse_rule(rule_text(f"select: {{type: {name}}}"))
    with pytest.raises(ConfigError, match=r"nn\.Module subclass"):
        ptypes.register_type(int)  # type: ignore[arg-type]


def test_known_type_names_cover_model_zoos():
    table = ptypes.known_type_names()
    assert "timm.models.resnet.Bottleneck" in table["Bottleneck"]
    assert "torchvision.models.resnet.Bottleneck" in table["Bottleneck"]
    assert "CNBlock" in table and "MobileVitBlock" in table and "Conv2d" in table
    assert all(ptypes.is_allowed_class(c) for entries in table.values() for c in entries.values())


def test_rule_sources_never_use_unsafe_loading():
    for name in ("rule.py", "_yaml.py", "types.py"):
        src = (REPO / "parc_surgery" / name).read_text()
        for banned in (
            "yaml.load(",
            "unsafe_load",
            "FullLoader",
            "UnsafeLoader",
            "yaml.Loader",
            "import_module",
            "eval(",
            "exec(",
        ):
            assert banned not in src, f"{name} uses {banned}"


# ---------------------------------------------------------------------------------------------------------------------
# Installed wheel


_WHEEL_PROBE = """
import json, parc_surgery, parc_surgery.rule as r
print(json.dumps({"file": parc_surgery.__file__, "rules": r.list_rules(),
                  "dicts": {n: r.load_rule(n).to_dict() for n in r.list_rules()},
                  "source": r.load_rule("vit2parc").source}))
"""


def test_rules_load_from_an_installed_wheel(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "parc_surgery", src / "parc_surgery", ignore=ignore)
    shutil.copytree(REPO / "rules", src / "rules", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", src / "pyproject.toml")
    readme = REPO / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.exists() else "parc-surgery\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("parc_surgery-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    assert sorted(p.stem for p in (site / "parc_surgery" / "rules").glob("*.yaml")) == list_rules()
    out = subprocess.run(
        [sys.executable, "-c", _WHEEL_PROBE],
        env={**env, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site.resolve())
    assert Path(got["source"]).resolve().is_relative_to((site / "parc_surgery" / "rules").resolve())
    assert got["rules"] == list_rules()
    assert got["dicts"] == json.loads(json.dumps({n: load_rule(n).to_dict() for n in list_rules()}))
