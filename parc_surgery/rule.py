"""Conversion rules: frozen dataclasses, versioned YAML loading and validation, bundled rules.

A rule says *what* to replace (``select``/``exclude``: class names, qualified names, stage
fractions, detected attention) and *with which block* (a name in the block registry), plus
block options. Rules are YAML read with a safe loader (:mod:`parc_surgery._yaml`): a rule file is
data and can neither import nor execute anything; class names resolve through the allow-list in
:mod:`parc_surgery.types`. Every problem is a :class:`RuleError` naming the file, line, field
path (``targets[0].select.stages[1].fraction``), the bad value and the fix.

Example::

    version: 1
    name: resnet_parc
    targets:
      - block: parc_bottleneck
        select:
          type: [Bottleneck, BasicBlock]
          stages:
            - {stage: -2, fraction: 1/2}
            - {stage: -1, fraction: 1/3}
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path as FsPath
from typing import Any, Literal

import yaml

from ._yaml import MAX_BYTES, Path, decode_rule_bytes, load_yaml
from .errors import RuleError
from .rule_check import (
    RULE_VERSION,
    SELECTOR_KEYS,
    STAGE_SPEC_KEYS,
    FieldReader,
    check_block,
    check_options,
    check_rule,
    check_rule_header,
    check_selector,
    check_stage_spec,
    check_target,
    check_version,
)

__all__ = [
    "RULE_VERSION",
    "Rule",
    "Selector",
    "StageSpec",
    "Target",
    "TargetOptions",
    "get_rule_text",
    "list_rules",
    "load_rule",
    "parse_rule",
]


@dataclass(frozen=True)
class StageSpec:
    """Blocks of the given stages (index into the discovered stages, or container name): the last ``fraction``.

    ``stages`` may be given as one index / name; ``fraction`` as a Fraction, a number or ``"a/b"``.
    """

    stages: tuple[int | str, ...]
    fraction: Fraction = Fraction(1)
    include_first: bool = False

    def __post_init__(self) -> None:
        check_stage_spec(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stages[0] if len(self.stages) == 1 else list(self.stages),
            "fraction": _fraction_out(self.fraction),
            "include_first": self.include_first,
        }


@dataclass(frozen=True)
class Selector:
    """Criteria a module must all meet (AND); empty tuples / ``False`` mean "not given", and one must be given.

    ``types`` / ``names`` may be given as one string.
    """

    types: tuple[str, ...] = ()
    exact: bool = False
    names: tuple[str, ...] = ()
    stages: tuple[StageSpec, ...] = ()
    attention: bool = False

    def __post_init__(self) -> None:
        check_selector(self, StageSpec)

    @property
    def is_empty(self) -> bool:
        return not (self.types or self.names or self.stages or self.attention)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.types:
            out["type"] = _one_or_list(self.types)
            out["exact"] = self.exact
        if self.names:
            out["name"] = _one_or_list(self.names)
        if self.stages:
            out["stages"] = [s.to_dict() for s in self.stages]
        if self.attention:
            out["attention"] = True
        return out


@dataclass(frozen=True)
class TargetOptions:
    """How the selected modules are replaced; ``block_options`` are (key, value) pairs sorted by key.

    ``kernel_size`` may be given as one int, ``block_options`` as a mapping.
    """

    kernel_size: Literal["auto"] | tuple[int, int] = "auto"
    pe: Literal["all", "first", "none"] = "all"
    impl: Literal["auto", "spatial", "fft"] = "auto"
    init: Literal["warm_start", "reference"] = "warm_start"
    width_mult: float | None = None
    block_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        check_options(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernel_size": self.kernel_size if self.kernel_size == "auto" else list(self.kernel_size),
            "pe": self.pe,
            "impl": self.impl,
            "init": self.init,
            "width_mult": self.width_mult,
            "block_options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.block_options},
        }


@dataclass(frozen=True)
class Target:
    """One replacement: modules matching ``select`` and not ``exclude`` become ``block`` (a registered block).

    ``line`` is where the target starts in its file (``None`` for dicts); not part of equality.
    """

    block: str
    select: Selector
    exclude: Selector | None = None
    options: TargetOptions = TargetOptions()
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_target(self, Selector, TargetOptions)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block": self.block, "select": self.select.to_dict()}
        if self.exclude is not None:
            out["exclude"] = self.exclude.to_dict()
        out["options"] = self.options.to_dict()
        return out


@dataclass(frozen=True)
class Rule:
    """A validated rule. ``source`` (file or ``<dict>``) and ``text`` (the YAML) are not part of equality."""

    version: int
    name: str
    description: str
    targets: tuple[Target, ...]
    input_size: tuple[int, int] | None = None
    source: str | None = field(default=None, compare=False, repr=False)
    text: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_rule(self, Target)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`load_rule` turns back into an equal rule."""
        out: dict[str, Any] = {"version": self.version, "name": self.name, "description": self.description}
        if self.input_size is not None:
            out["input_size"] = list(self.input_size)
        out["targets"] = [t.to_dict() for t in self.targets]
        return out

    def to_yaml(self) -> str:
        """YAML text that :func:`parse_rule` turns back into an equal rule."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)


def _one_or_list(values: tuple) -> Any:
    return values[0] if len(values) == 1 else list(values)


def _fraction_out(f: Fraction) -> int | str:
    return f.numerator if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


# ----------------------------------------------------------------------------------------------------------------------
# From YAML / dict data: the structure (keys, lists) is read here; every value is checked by the dataclasses above,
# whose errors ``FieldReader.fields`` relocates to the file, line and field path.

_STAGE_KEYS = ("stage", "fraction", "include_first")
_SELECTOR_KEYS = ("type", "exact", "name", "stages", "attention")
_OPTION_KEYS = ("kernel_size", "pe", "impl", "init", "width_mult", "block_options")
_TARGET_KEYS = ("block", "select", "exclude", "options")
_RULE_KEYS = ("version", "name", "description", "input_size", "targets")


def _stage_spec(ctx: FieldReader, value: Any, path: Path) -> StageSpec:
    m = ctx.mapping(value, path, _STAGE_KEYS, required=("stage",))
    with ctx.fields(path, STAGE_SPEC_KEYS):
        return StageSpec(m["stage"], m.get("fraction", Fraction(1)), m.get("include_first", False))


def _selector(ctx: FieldReader, value: Any, path: Path) -> Selector:
    m = ctx.mapping(value, path, _SELECTOR_KEYS)
    for key, what in (("type", "a class name"), ("name", "a module name")):
        if key in m:  # in a file, an empty list is a mistake rather than "not given"
            ctx.items(m[key], (*path, key), what)
    stages_value = m.get("stages", [])
    if not isinstance(stages_value, (list, tuple)):
        raise ctx.error((*path, "stages"), "expected a list of stage selections (- stage: -1)", stages_value)
    if "stages" in m and not stages_value:
        raise ctx.error((*path, "stages"), "expected a non-empty list of stage selections", stages_value)
    stages = tuple(_stage_spec(ctx, v, (*path, "stages", i)) for i, v in enumerate(stages_value))
    with ctx.fields(path, SELECTOR_KEYS):
        return Selector(
            types=m.get("type", ()),
            exact=m.get("exact", False),
            names=m.get("name", ()),
            stages=stages,
            attention=m.get("attention", False),
        )


def _options(ctx: FieldReader, value: Any, path: Path) -> TargetOptions:
    if value is None:
        return TargetOptions()
    m = ctx.mapping(value, path, _OPTION_KEYS)
    with ctx.fields(path):
        return TargetOptions(**m)


def _target(ctx: FieldReader, value: Any, path: Path) -> Target:
    m = ctx.mapping(value, path, _TARGET_KEYS, required=("block", "select"))
    block = check_block(ctx, m["block"], (*path, "block"))
    select = _selector(ctx, m["select"], (*path, "select"))
    exclude = None if m.get("exclude") is None else _selector(ctx, m["exclude"], (*path, "exclude"))
    options = _options(ctx, m.get("options"), (*path, "options"))
    with ctx.fields(path):
        return Target(block, select, exclude, options, line=ctx.lines.get(path))


def _rule(data: Any, *, source: str, lines: Mapping[Path, int] | None = None, text: str | None = None) -> Rule:
    ctx = FieldReader(source, lines)
    if not isinstance(data, Mapping):
        raise ctx.error((), "a rule must be a mapping with version, name and targets", data)
    if "version" not in data:
        raise ctx.error(("version",), "required key 'version' is missing", hint=f"add 'version: {RULE_VERSION}'")
    version = check_version(ctx, data["version"])  # first: a newer format may have keys this version does not know
    m = ctx.mapping(data, (), _RULE_KEYS, required=("name", "targets"))
    name, description, input_size = check_rule_header(ctx, m["name"], m.get("description"), m.get("input_size"))
    targets = m["targets"]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ctx.error(("targets",), "expected a non-empty list of targets (- block: ...)", targets)
    parsed = tuple(_target(ctx, t, ("targets", i)) for i, t in enumerate(targets))
    with ctx.fields(()):
        return Rule(version, name, description, parsed, input_size, source=source, text=text)


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def parse_rule(text: str, *, source: str = "<string>") -> Rule:
    """Validate YAML ``text`` into a :class:`Rule`; ``source`` names it in error messages."""
    data, lines = load_yaml(text, source=source)
    return _rule(data, source=source, lines=lines, text=text)


@functools.cache
def _bundled_dir() -> Any:
    """The folder of bundled rules: the ``parc_surgery.rules`` resource, else ``<repo>/rules`` in a checkout."""
    try:
        from importlib.resources import files

        folder = files("parc_surgery.rules")
        if any(p.name.endswith(".yaml") for p in folder.iterdir()):
            return folder
    except (ModuleNotFoundError, TypeError, OSError):
        pass
    return FsPath(__file__).resolve().parent.parent / "rules"


def list_rules() -> list[str]:
    """Names of the bundled rules, sorted."""
    folder = _bundled_dir()
    try:
        return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    except OSError:
        return []


def get_rule_text(name: str) -> str:
    """The YAML text of the bundled rule ``name``."""
    names = list_rules()
    if name not in names:
        raise RuleError(
            f"no bundled rule named {name!r}.{_close_hint(str(name), names)} Bundled rules: {_listing(names)}"
        )
    return decode_rule_bytes((_bundled_dir() / f"{name}.yaml").read_bytes(), source=f"{name}.yaml")


def _close_hint(word: str, names: list[str]) -> str:
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "(none found)"


def _read_file(path: FsPath, shown: str) -> str:
    try:
        if not path.exists():
            names = list_rules()
            newline = " (to parse YAML text, use parse_rule)" if "\n" in shown else ""
            hint = _close_hint(FsPath(shown).stem, names)
            raise RuleError(
                f"rule file {shown[:200]!r} not found{newline}, and it is not a bundled rule.{hint} "
                f"Bundled rules: {_listing(names)} (list_rules())"
            )
        if not path.is_file():
            raise RuleError(f"{shown}: not a regular file")
        if path.stat().st_size > MAX_BYTES:
            raise RuleError(
                f"{shown}: rule file is too large ({path.stat().st_size:,} bytes; the limit is {MAX_BYTES:,})"
            )
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except RuleError:
        raise
    except OSError as e:
        raise RuleError(f"{shown}: cannot read rule file ({e.strerror or e})") from None
    except ValueError as e:  # e.g. embedded NUL in the path
        raise RuleError(f"{shown[:200]!r}: not a usable path ({e})") from None
    return decode_rule_bytes(data, source=shown)


def load_rule(rule: str | os.PathLike | Mapping[str, Any] | Rule) -> Rule:
    """A validated :class:`Rule` from a bundled rule name, a YAML file path, a dict, or a Rule (returned as is).

    A string is a bundled rule name when it has no path separator and no ``.yaml``/``.yml`` suffix
    and names a bundled rule; otherwise it is a path.
    """
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, Mapping):
        return _rule(rule, source="<dict>")
    if isinstance(rule, (str, os.PathLike)):
        try:
            shown = os.fspath(rule)
        except TypeError as e:
            raise RuleError(f"load_rule: not a usable path: {e}") from None
        if not isinstance(shown, str):
            raise RuleError(f"load_rule: path must be str, got {type(shown).__name__}")
        looks_like_name = not any(s in shown for s in ("/", "\\", os.sep)) and not shown.endswith((".yaml", ".yml"))
        if isinstance(rule, str) and looks_like_name and shown in list_rules():
            text = get_rule_text(shown)
            return parse_rule(text, source=str(_bundled_dir() / f"{shown}.yaml"))
        text = _read_file(FsPath(shown), shown)
        return parse_rule(text, source=shown)
    raise RuleError(f"load_rule: expected a bundled rule name, a path, a dict or a Rule, got {type(rule).__name__}")
