"""Bad-rule fuzzing: whatever a rule file or dict holds, loading gives a Rule or a RuleError, fast, and runs nothing."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from parc_surgery.blocks import register_block, unregister_block
from parc_surgery.errors import RuleError
from parc_surgery.rule import Rule, get_rule_text, list_rules, load_rule, parse_rule

BLOCK = "fuzz_rule_block"
HEAD = f"version: 1\nname: t\ntargets:\n  - block: {BLOCK}\n"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = [
    "version", "name", "description", "input_size", "targets", "block", "select", "exclude", "options", "type",
    "exact", "stages", "stage", "fraction", "include_first", "attention", "kernel_size", "pe", "impl", "init",
    "width_mult", "block_options",
]  # fmt: skip
WORDS = [BLOCK, "Bottleneck", "CNBlock", "torch.nn.Conv2d", "os.system", "auto", "all", "first", "none", "fft",
         "spatial", "warm_start", "reference", "1/2", "1/3", "3/2", "1/0", "-1/2", "0.5", "layer3.*", "re:^a", "re:(",
         "blocks.3", "", "yes", "!!python/object/apply:os.system"]  # fmt: skip


class _FuzzBlock(nn.Module):
    @classmethod
    def from_module(cls, module, ctx):
        raise NotImplementedError

    @classmethod
    def check_source(cls, module, ctx):
        return None


@pytest.fixture(scope="module", autouse=True)
def fuzz_block():
    register_block(BLOCK)(_FuzzBlock)
    yield
    unregister_block(BLOCK)


def outcome(fn, *args, **kwargs):
    """The Rule, or the RuleError; anything else fails the test."""
    try:
        result = fn(*args, **kwargs)
    except RuleError as e:
        assert str(e), "a RuleError must say something"
        return e
    assert isinstance(result, Rule)
    return result


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=25,
)

VALID = {
    "version": 1,
    "name": "fuzz",
    "input_size": [224, 224],
    "targets": [
        {
            "block": BLOCK,
            "select": {"type": ["Bottleneck"], "name": "layer3.*", "stages": [{"stage": -1, "fraction": "1/2"}]},
            "exclude": {"name": ["layer3.0"]},
            "options": {"kernel_size": "auto", "pe": "first", "width_mult": 1.5, "block_options": {"k": 1}},
        }
    ],
}
PATHS = [
    (), ("version",), ("name",), ("input_size",), ("targets",), ("targets", 0), ("targets", 0, "block"),
    ("targets", 0, "select"), ("targets", 0, "select", "type"), ("targets", 0, "select", "name"),
    ("targets", 0, "select", "stages"), ("targets", 0, "select", "stages", 0),
    ("targets", 0, "select", "stages", 0, "stage"), ("targets", 0, "select", "stages", 0, "fraction"),
    ("targets", 0, "select", "attention"), ("targets", 0, "select", "exact"), ("targets", 0, "exclude"),
    ("targets", 0, "options"), ("targets", 0, "options", "kernel_size"), ("targets", 0, "options", "pe"),
    ("targets", 0, "options", "impl"), ("targets", 0, "options", "init"), ("targets", 0, "options", "width_mult"),
    ("targets", 0, "options", "block_options"), ("targets", 0, "options", "block_options", "k"),
]  # fmt: skip


def _replace(data, path, value):
    if not path:
        return value
    data = dict(data) if isinstance(data, dict) else list(data)
    data[path[0]] = _replace(data.get(path[0]) if isinstance(data, dict) else data[path[0]], path[1:], value)
    return data


def _yaml_safe(value) -> bool:
    """Values whose YAML dump reads back as the same data (nan never compares equal; huge ints are refused)."""
    if isinstance(value, float):
        return not math.isnan(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return len(str(value)) <= 40
    if isinstance(value, dict):
        return all(isinstance(k, str) and _yaml_safe(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_yaml_safe(v) for v in value)
    return True


def test_valid_base_rule_loads():
    rule = load_rule(VALID)
    assert rule.targets[0].block == BLOCK and parse_rule(yaml.safe_dump(VALID)) == rule


PLAUSIBLE = [
    None, True, False, 1, -1, 3, 0.5, "1/2", "auto", "all", "first", "fft", "reference", "t", "a.*", BLOCK,
    "Bottleneck", ["Bottleneck", "CNBlock"], [7, 9], {"name": "a"}, [{"stage": 0}], {"k": [1, "x"]}, {},
]  # fmt: skip


@FUZZ
@given(path=st.sampled_from(PATHS), value=st.one_of(st.sampled_from(PLAUSIBLE), values))
def test_fuzzed_field_gives_rule_or_rule_error(path, value):
    data = _replace(VALID, path, value)
    from_dict = outcome(load_rule, data)
    if _yaml_safe(data):
        from_yaml = outcome(parse_rule, yaml.safe_dump(data), source="fuzz.yaml")
        assert type(from_dict) is type(from_yaml)
        if isinstance(from_dict, Rule):
            assert from_dict == from_yaml
        else:
            assert str(from_yaml).startswith("fuzz.yaml")


@FUZZ
@given(value=values)
def test_fuzzed_structures_give_rule_or_rule_error(value):
    outcome(load_rule, value) if isinstance(value, dict) else None
    outcome(parse_rule, yaml.safe_dump(value) if _yaml_safe(value) else repr(value))


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzzed_text_gives_rule_or_rule_error(text):
    outcome(parse_rule, text)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzzed_bytes_give_rule_or_rule_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "rule.yaml"
    path.write_bytes(data)
    outcome(load_rule, path)


@FUZZ
@given(name=st.sampled_from(sorted(list_rules())), edits=st.lists(st.tuples(st.integers(0, 2000), st.sampled_from(
    ["", ":", "-", " ", "\n", "[", "]", "{", "&a", "*a", "!!", "<<: ", "'", "\t", "\x00", "1/0", "yes"]
)), min_size=1, max_size=4), drop=st.integers(0, 3))  # fmt: skip
def test_mutated_bundled_rules_give_rule_or_rule_error(name, edits, drop):
    text = get_rule_text(name)
    for pos, piece in edits:
        pos %= len(text) + 1
        text = text[:pos] + piece + text[pos + drop :]
    outcome(parse_rule, text)


# ---------------------------------------------------------------------------------------------------------------------
# Explicit attacks


def _assert_fast_rule_error(text_or_path, seconds: float = 10.0, match: str | None = None):
    start = time.perf_counter()
    fn = load_rule if isinstance(text_or_path, Path) else parse_rule
    with pytest.raises(RuleError, match=match):
        fn(text_or_path)
    assert time.perf_counter() - start < seconds


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system [{cmd}]",
        "!!python/object/apply:subprocess.call [[sh, -c, {cmd}]]",
        "!!python/object/new:subprocess.Popen [[sh, -c, {cmd}]]",
        '!!python/object/apply:builtins.exec ["import os; os.system({cmd})"]',
        "!!python/name:os.system",
        "!!python/module:os",
        "!<tag:yaml.org,2002:python/object/apply:os.system> [{cmd}]",
        "!custom {cmd}",
    ],
)
@pytest.mark.parametrize("where", ["top", "name", "key", "type", "block_options"])
def test_tags_never_execute(tmp_path, payload, where):
    canary = tmp_path / "canary"
    cmd = f"'touch {canary}'"
    tagged = payload.format(cmd=cmd)
    text = {
        "top": f"{tagged}\n",
        "name": f"version: 1\nname: {tagged}\ntargets: [{{block: {BLOCK}, select: {{name: a}}}}]\n",
        "key": f"version: 1\n? {tagged}\n: 1\n",
        "type": f"version: 1\nname: t\ntargets:\n  - block: {BLOCK}\n    select:\n      type: {tagged}\n",
        "block_options": (
            f"version: 1\nname: t\ntargets:\n  - block: {BLOCK}\n    select: {{name: a}}\n"
            f"    options:\n      block_options:\n        x: {tagged}\n"
        ),
    }[where]
    _assert_fast_rule_error(text, match="tag .* is not allowed|invalid YAML|mapping keys")
    assert not canary.exists()


def test_binary_empty_and_huge_files(tmp_path):
    cases = {
        "binary.yaml": (bytes(range(256)) * 4, "binary"),
        "latin1.yaml": ("version: 1\nname: caf\u00e9\n".encode("latin-1"), "not valid UTF-8"),
        "empty.yaml": (b"", "empty"),
        "blank.yaml": (b"\n\n   \n", "empty"),
        "huge.yaml": (b"version: 1\nname: x\ndescription: '" + b"a" * 1_100_000 + b"'\n", "too large"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        _assert_fast_rule_error(tmp_path / name, match=match)
    _assert_fast_rule_error("a: '" + "b" * 1_100_000 + "'", match="too large")


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000 + "]" * 10_000,
        "{a: " * 10_000 + "1" + "}" * 10_000,
        "".join(" " * i + "- \n" for i in range(0, 1200, 2)),
        "".join(" " * i + f"k{i}:\n" for i in range(0, 1200, 2)),
        "version: 1\nname: " + "[" * 10_000,
    ],
    ids=["flow-seq", "flow-map", "block-seq", "block-map", "unclosed"],
)
def test_deep_nesting_is_refused(text):
    _assert_fast_rule_error(text, match="nested too deeply|invalid YAML")


def test_deep_nesting_in_dicts_and_cycles_are_refused():
    deep: list = []
    node = deep
    for _ in range(10_000):
        node.append([])
        node = node[0]
    cyclic: list = []
    cyclic.append(cyclic)
    for value in (deep, cyclic):
        data = _replace(VALID, ("targets", 0, "options", "block_options", "k"), value)
        start = time.perf_counter()
        with pytest.raises(RuleError, match=r"block_options\.k"):
            load_rule(data)
        assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fraction", "1.0e+400"),
        ("fraction", "1e400"),
        ("fraction", "-.inf"),
        ("fraction", ".nan"),
        ("fraction", "9" * 5000),
        ("fraction", "1" + "0" * 39),
        ("fraction", "'" + "1" * 50 + "/" + "3" * 50 + "'"),
        ("stage", "9" * 30),
        ("stage", "-" + "9" * 30),
    ],
)
def test_huge_numbers_are_refused(field, value):
    stage, fraction = (value, 1) if field == "stage" else (-1, value)
    text = (
        f"version: 1\nname: n\ntargets:\n  - block: {BLOCK}\n    select:\n      stages:\n"
        f"        - stage: {stage}\n          fraction: {fraction}\n"
    )
    _assert_fast_rule_error(text, match=r"<string>:(7|8): ")


def test_huge_numbers_elsewhere():
    for text in (
        f"version: {'9' * 5000}\nname: x\n",
        "version: 1.0e+400\nname: x\n",
        f"version: 1\nname: t\ninput_size: {'9' * 30}\ntargets: []\n",
        f"{HEAD}    select: {{name: a}}\n    options: {{width_mult: 1.0e+400}}\n",
        f"{HEAD}    select: {{name: a}}\n    options: {{kernel_size: {'7' * 39}}}\n",
    ):
        _assert_fast_rule_error(text)


def test_alias_bombs_are_refused():
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        levels.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + ", ".join([f"*{prev}"] * 10) + "]")
    laughs = "\n".join(levels) + "\n"
    _assert_fast_rule_error(laughs, match="alias bomb")
    # a bomb hidden in a field that is otherwise valid
    bomb_in_options = laughs.replace("a: &a", "_a: &a") + (
        f"version: 1\nname: t\ntargets:\n  - block: {BLOCK}\n    select: {{name: a}}\n"
        "    options: {block_options: {k: *j}}\n"
    )
    _assert_fast_rule_error(bomb_in_options, match="alias bomb")
    _assert_fast_rule_error("a: &a [*a]\n", match="recursive alias|nested too deeply")
    _assert_fast_rule_error("a: &a {b: *a}\n", match="recursive alias|nested too deeply")
    _assert_fast_rule_error("a: *undefined\n", match="invalid YAML")


def test_bools_where_ints_or_strings_are_expected():
    head = f"version: 1\nname: t\ntargets:\n  - block: {BLOCK}\n"
    for text, field in [
        ("version: yes\nname: t\n", "version"),
        (head + "    select: {stages: [{stage: on}]}\n", "stage"),
        (head + "    select: {name: a}\n    options: {kernel_size: yes}\n", "kernel_size"),
        (head + "    select: {name: a}\n    options: {pe: no}\n", "pe"),
        (head + "    select: {name: a}\n    options: {width_mult: true}\n", "width_mult"),
        (head + "    select: {type: yes}\n", "type"),
        (head.replace(BLOCK, "true") + "    select: {name: a}\n", "block"),
    ]:
        _assert_fast_rule_error(text, match=rf"<string>:\d+: [\w\[\]\.]*{field}\b.*got True|{field}.*got False")
