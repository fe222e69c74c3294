"""Rules built in Python validate themselves, with the messages of the YAML path (issue 13).

Every rule dataclass checks its fields in ``__post_init__``: a ``Rule`` is valid however it was made, and
``load_rule(Rule(...))`` needs no separate check.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import pytest
import timm

import parc_surgery as ps
from parc_surgery.errors import RuleError
from parc_surgery.rule import Rule, Selector, StageSpec, Target, TargetOptions, load_rule, parse_rule

SEL = Selector(names=("layer3.*",))


def _yaml_error(option_line: str, select: str = "{name: 'layer3.*'}") -> str:
    text = f"version: 1\nname: t\ntargets:\n  - block: parc_bottleneck\n    select: {select}\n{option_line}"
    with pytest.raises(RuleError) as info:
        parse_rule(text, source="bad.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Selector(), "Selector: needs at least one criterion: type, name, stages or attention: true"),
        (lambda: Target("parc_bottleneck", Selector()), "Selector: needs at least one criterion"),
        (
            lambda: TargetOptions(pe="sometimes"),
            "TargetOptions: pe: expected one of all, first, none, got 'sometimes'",
        ),
        (
            lambda: TargetOptions(impl="ffft"),
            "TargetOptions: impl: expected one of auto, spatial, fft, got 'ffft'. Did you mean 'fft'?",
        ),
        (
            lambda: TargetOptions(init="warmstart"),
            "TargetOptions: init: expected one of warm_start, reference, got 'warmstart'. Did you mean 'warm_start'?",
        ),
        (lambda: TargetOptions(kernel_size=0), "TargetOptions: kernel_size: expected 'auto' or a kernel length"),
        (lambda: TargetOptions(width_mult=-1), "TargetOptions: width_mult: expected null or a number in (0, 64]"),
        (lambda: TargetOptions(block_options={"a": {"b": 1}}), "TargetOptions: block_options.a: block options must be"),
        (lambda: StageSpec((-1,), Fraction(3, 2)), "StageSpec: fraction: expected a fraction in (0, 1]"),
        (lambda: StageSpec(()), "StageSpec: stages: expected a stage index or container name or a non-empty list"),
        (lambda: StageSpec(True), "StageSpec: stages: expected a stage index (0-based, -1 = last), got True"),
        (lambda: Selector(types=("os.system",)), "Selector: types[0]: 'os.system' is outside the allow-list"),
        (lambda: Selector(names=("re:((",)), "Selector: names[0]: invalid regular expression"),
        (lambda: Selector(names=("a",), exact=True), "Selector: exact: 'exact' only applies to 'type'"),
        (lambda: Selector(stages=({"stage": -1},)), "Selector: stages[0]: expected a StageSpec"),
        (lambda: Target("parc_botleneck", SEL), "Target: block: not a registered block, got 'parc_botleneck'"),
        (lambda: Target("parc_bottleneck", "layer3.*"), "Target: select: expected a Selector, got 'layer3.*'"),
        (lambda: Target("parc_bottleneck", SEL, options={"pe": "all"}), "Target: options: expected a TargetOptions"),
        (lambda: Rule(1, "r", "", ()), "Rule: targets: expected a non-empty list of targets"),
        (lambda: Rule(2, "r", "", (Target("parc_bottleneck", SEL),)), "Rule: version: rule format version 2 is newer"),
        (lambda: Rule(1, "a\nb", "", (Target("parc_bottleneck", SEL),)), "Rule: name: expected a single-line"),
        (lambda: Rule(1, "r", "", (Target("parc_bottleneck", SEL),), input_size=(224,)), "Rule: input_size:"),
    ],
)
def test_bad_fields_raise_rule_error_at_construction(build, message):
    with pytest.raises(RuleError) as info:
        build()
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("build", "yaml_line", "yaml_field"),
    [
        (lambda: TargetOptions(pe="sometimes"), "    options: {pe: sometimes}\n", "options.pe"),
        (lambda: TargetOptions(impl="ffft"), "    options: {impl: ffft}\n", "options.impl"),
        (
            lambda: TargetOptions(kernel_size=(3, True)),
            "    options: {kernel_size: [3, yes]}\n",
            "options.kernel_size[1]",
        ),
        (lambda: TargetOptions(width_mult=float("nan")), "    options: {width_mult: .nan}\n", "options.width_mult"),
    ],
)
def test_python_and_yaml_messages_agree(build, yaml_line, yaml_field):
    with pytest.raises(RuleError) as info:
        build()
    py = str(info.value)
    yml = _yaml_error(yaml_line)
    # the same problem, bad value and allowed values; YAML adds file:line and the full path
    assert yml.startswith(f"bad.yaml:6: targets[0].{yaml_field}: ")
    assert py.removeprefix("TargetOptions: ") == yml.removeprefix("bad.yaml:6: targets[0].options.")


def test_yaml_keeps_file_line_and_its_own_key_names():
    yml = _yaml_error("", select="{type: [Bottleneck, os.system]}")
    assert yml.startswith("bad.yaml:5: targets[0].select.type[1]: 'os.system' is outside the allow-list"), yml
    with pytest.raises(RuleError) as info:
        Selector(types=("Bottleneck", "os.system"))
    py = str(info.value)
    assert py.startswith("Selector: types[1]: 'os.system' is outside the allow-list"), py


def test_python_values_are_normalised_like_yaml():
    built = Rule(
        version=1,
        name=" deep ",
        description=None,  # type: ignore[arg-type]
        targets=[
            Target(
                "parc_bottleneck",
                Selector(types="Bottleneck", stages=[StageSpec(-2, "1/2"), StageSpec(-1, 1 / 3)]),  # type: ignore
                options=TargetOptions(kernel_size=7, width_mult=2, block_options={"z": [1, 2], "a": True}),  # type: ignore
            )
        ],
        input_size=64,  # type: ignore[arg-type]
    )
    (t,) = built.targets
    assert built.name == "deep" and built.description == "" and built.input_size == (64, 64)
    assert isinstance(built.targets, tuple) and isinstance(t.select.stages, tuple)
    assert t.select.types == ("Bottleneck",)
    assert t.select.stages == (StageSpec((-2,), Fraction(1, 2)), StageSpec((-1,), Fraction(1, 3)))
    assert t.options.kernel_size == (7, 7) and t.options.width_mult == 2.0 and isinstance(t.options.width_mult, float)
    assert t.options.block_options == (("a", True), ("z", (1, 2)))
    assert hash(built) == hash(load_rule(built.to_dict()))
    assert load_rule(built) is built and load_rule(built.to_dict()) == built == parse_rule(built.to_yaml())


def test_replace_revalidates():
    opts = TargetOptions()
    with pytest.raises(RuleError, match=re.escape("TargetOptions: pe: expected one of all, first, none")):
        dataclasses.replace(opts, pe="sometimes")
    rule = load_rule("resnet_parc")
    with pytest.raises(RuleError, match="Rule: targets"):
        dataclasses.replace(rule, targets=())


def test_convert_with_a_python_rule():
    sel = Selector(types=("Bottleneck",), stages=(StageSpec((-1,), Fraction(1, 3)),))
    rule = Rule(1, "py", "", (Target("parc_bottleneck", sel, options=TargetOptions(impl="fft")),))
    model = timm.create_model("resnet26", pretrained=False, num_classes=4)
    conv = ps.convert(model, rule, input_size=64, validate=False, count=False)
    assert [t.name for t in conv.plan.targets] == ["layer4.1"]
    assert conv.plan.targets[0].ctx.impl == "fft"
