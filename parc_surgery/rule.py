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
import math
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path as FsPath
from typing import Any, Literal

import yaml

from ._yaml import MAX_BYTES, Path, decode_rule_bytes, format_path, load_yaml
from .errors import RuleError
from .types import validate_type_name

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

RULE_VERSION = 1
_MAX_SIZE = 16384  # largest input size / kernel length accepted
_MAX_STAGE_INDEX = 10_000
_PE = ("all", "first", "none")
_IMPL = ("auto", "spatial", "fft")
_INIT = ("warm_start", "reference")


@dataclass(frozen=True)
class StageSpec:
    """Blocks of the given stages (index into the discovered stages, or container name): the last ``fraction``."""

    stages: tuple[int | str, ...]
    fraction: Fraction = Fraction(1)
    include_first: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stages[0] if len(self.stages) == 1 else list(self.stages),
            "fraction": _fraction_out(self.fraction),
            "include_first": self.include_first,
        }


@dataclass(frozen=True)
class Selector:
    """Criteria a module must all meet (AND); empty tuples / ``False`` mean "not given"."""

    types: tuple[str, ...] = ()
    exact: bool = False
    names: tuple[str, ...] = ()
    stages: tuple[StageSpec, ...] = ()
    attention: bool = False

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
    """How the selected modules are replaced; ``block_options`` are (key, value) pairs sorted by key."""

    kernel_size: Literal["auto"] | tuple[int, int] = "auto"
    pe: Literal["all", "first", "none"] = "all"
    impl: Literal["auto", "spatial", "fft"] = "auto"
    init: Literal["warm_start", "reference"] = "warm_start"
    width_mult: float | None = None
    block_options: tuple[tuple[str, Any], ...] = ()

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
    """One replacement: modules matching ``select`` and not ``exclude`` become ``block``.

    ``line`` is where the target starts in its file (``None`` for dicts); not part of equality.
    """

    block: str
    select: Selector
    exclude: Selector | None = None
    options: TargetOptions = TargetOptions()
    line: int | None = field(default=None, compare=False)

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
# Validation


_MISSING = object()
_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlevel = 3


class _Ctx:
    """Source name and line table; builds located error messages."""

    def __init__(self, source: str, lines: Mapping[Path, int] | None) -> None:
        self.source = source
        self.lines = lines or {}

    def line(self, path: Path) -> int | None:
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return None

    def error(self, path: Path, problem: str, value: Any = _MISSING, hint: str = "") -> RuleError:
        line = self.line(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        msg = f"{where}: {format_path(path) or '(top level)'}: {problem}"
        if value is not _MISSING:
            msg += f", got {_repr.repr(value)}"
        return RuleError(msg + (f". {hint}" if hint else ""))

    # -- typed readers ---------------------------------------------------------------------------------------------

    def mapping(self, value: Any, path: Path, keys: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, Mapping):
            raise self.error(path, "expected a mapping (key: value lines)", value)
        for key in value:
            if not isinstance(key, str):
                raise self.error(path, f"keys must be strings, found key {key!r}")
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}? " if close else ""
                shown = _repr.repr(key)
                raise self.error((*path, key), f"unknown key {shown} ({hint}valid keys: {', '.join(keys)})")
        for key in required:
            if key not in value:
                raise self.error((*path, key), f"required key {key!r} is missing")
        return dict(value)

    def boolean(self, value: Any, path: Path) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, "expected true or false", value)
        return value

    def integer(self, value: Any, path: Path, lo: int, hi: int, what: str = "an integer") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"expected {what}", value)
        if not lo <= value <= hi:
            raise self.error(path, f"expected {what} in [{lo}, {hi}]", value)
        return int(value)

    def string(self, value: Any, path: Path, what: str = "a non-empty string") -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(path, f"expected {what}", value)
        return value

    def choice(self, value: Any, path: Path, choices: tuple[str, ...]) -> str:
        if isinstance(value, str) and value in choices:
            return value
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5) if isinstance(value, str) else []
        hint = f"Did you mean {close[0]!r}?" if close else ""
        raise self.error(path, f"expected one of {', '.join(choices)}", value, hint)

    def items(self, value: Any, path: Path, what: str) -> list[tuple[Path, Any]]:
        """A scalar or a non-empty list, as (path, item) pairs."""
        if isinstance(value, (list, tuple)):
            if not value:
                raise self.error(path, f"expected {what} or a non-empty list of them", value)
            return [((*path, i), v) for i, v in enumerate(value)]
        return [(path, value)]

    def size(self, value: Any, path: Path, what: str) -> tuple[int, int]:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise self.error(path, f"expected {what} as an integer or [H, W]", value)
            return tuple(self.integer(v, (*path, i), 1, _MAX_SIZE) for i, v in enumerate(value))  # type: ignore
        n = self.integer(value, path, 1, _MAX_SIZE, f"{what} (an integer or [H, W])")
        return (n, n)


_FRACTION_RE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d{1,9})\s*$")
_DECIMAL_RE = re.compile(r"^\s*(\d{1,9}(\.\d{0,12})?|\.\d{1,12})\s*$")
_FRACTION_HELP = "a fraction in (0, 1]: a number such as 0.5 or a string 'a/b' such as 1/3"


def _fraction(ctx: _Ctx, value: Any, path: Path) -> Fraction:
    if isinstance(value, bool):
        raise ctx.error(path, f"expected {_FRACTION_HELP}", value)
    if isinstance(value, Fraction):
        f = value
    elif isinstance(value, int):
        f = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ctx.error(path, f"expected {_FRACTION_HELP}", value)
        f = Fraction(value).limit_denominator(1000)
    elif isinstance(value, str) and (m := _FRACTION_RE.match(value)):
        if int(m.group(2)) == 0:
            raise ctx.error(path, "zero denominator", value, "Write a fraction such as 1/3")
        f = Fraction(int(m.group(1)), int(m.group(2)))
    elif isinstance(value, str) and _DECIMAL_RE.match(value):
        f = Fraction(value.strip()).limit_denominator(1000)
    else:
        raise ctx.error(path, f"expected {_FRACTION_HELP}", value)
    if not 0 < f <= 1:
        raise ctx.error(path, f"expected {_FRACTION_HELP}", value)
    return f


def _stage_spec(ctx: _Ctx, value: Any, path: Path) -> StageSpec:
    m = ctx.mapping(value, path, ("stage", "fraction", "include_first"), required=("stage",))
    stages: list[int | str] = []
    for p, v in ctx.items(m["stage"], (*path, "stage"), "a stage index or container name"):
        if isinstance(v, str):
            stages.append(ctx.string(v, p, "a stage container name such as 'layer3'"))
        else:
            stages.append(ctx.integer(v, p, -_MAX_STAGE_INDEX, _MAX_STAGE_INDEX, "a stage index (0-based, -1 = last)"))
    fraction = _fraction(ctx, m["fraction"], (*path, "fraction")) if "fraction" in m else Fraction(1)
    include_first = ctx.boolean(m.get("include_first", False), (*path, "include_first"))
    return StageSpec(tuple(stages), fraction, include_first)


_SELECTOR_KEYS = ("type", "exact", "name", "stages", "attention")


def _selector(ctx: _Ctx, value: Any, path: Path) -> Selector:
    m = ctx.mapping(value, path, _SELECTOR_KEYS)
    types: list[str] = []
    for p, v in ctx.items(m["type"], (*path, "type"), "a class name") if "type" in m else ():
        name = ctx.string(v, p, "a class name such as 'Bottleneck' or 'timm.models.resnet.Bottleneck'")
        if len(name) > 300:
            raise ctx.error(p, "class name is too long (more than 300 characters)", name)
        try:
            validate_type_name(name.strip())
        except RuleError as e:
            raise ctx.error(p, str(e)) from None
        types.append(name.strip())
    names: list[str] = []
    for p, v in ctx.items(m["name"], (*path, "name"), "a module name") if "name" in m else ():
        pattern = ctx.string(v, p, "a module name, glob ('layer3.*') or 're:<regex>'")
        if pattern.startswith("re:"):
            if not pattern[3:]:
                raise ctx.error(p, "empty regular expression after 're:'", pattern)
            try:
                re.compile(pattern[3:])
            except (re.error, RecursionError, OverflowError, ValueError) as e:
                raise ctx.error(p, f"invalid regular expression ({e})", pattern) from None
        names.append(pattern)
    stages_value = m.get("stages", [])
    if not isinstance(stages_value, (list, tuple)):
        raise ctx.error((*path, "stages"), "expected a list of stage selections (- stage: -1)", stages_value)
    if "stages" in m and not stages_value:
        raise ctx.error((*path, "stages"), "expected a non-empty list of stage selections", stages_value)
    stages = tuple(_stage_spec(ctx, v, (*path, "stages", i)) for i, v in enumerate(stages_value))
    exact = ctx.boolean(m.get("exact", False), (*path, "exact"))
    if exact and not types:
        raise ctx.error((*path, "exact"), "'exact' only applies to 'type'; add a type or remove exact")
    attention = ctx.boolean(m.get("attention", False), (*path, "attention"))
    sel = Selector(tuple(types), exact, tuple(names), stages, attention)
    if sel.is_empty:
        raise ctx.error(path, "needs at least one criterion: type, name, stages or attention: true", dict(m) or value)
    return sel


def _block_option_value(ctx: _Ctx, value: Any, path: Path, nested: bool = False) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ctx.error(path, "expected a finite number", value)
        return value
    if isinstance(value, (list, tuple)) and not nested:
        return tuple(_block_option_value(ctx, v, (*path, i), True) for i, v in enumerate(value))
    raise ctx.error(path, "block options must be scalars (string, number, true/false, null) or lists of them", value)


def _options(ctx: _Ctx, value: Any, path: Path) -> TargetOptions:
    if value is None:
        return TargetOptions()
    keys = ("kernel_size", "pe", "impl", "init", "width_mult", "block_options")
    m = ctx.mapping(value, path, keys)
    kernel: Literal["auto"] | tuple[int, int] = "auto"
    if "kernel_size" in m and not (isinstance(m["kernel_size"], str) and m["kernel_size"] == "auto"):
        kernel = ctx.size(m["kernel_size"], (*path, "kernel_size"), "'auto' or a kernel length")
    width_mult = m.get("width_mult")
    if width_mult is not None:
        p = (*path, "width_mult")
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)):
            raise ctx.error(p, "expected null or a number > 0", width_mult)
        if not (math.isfinite(width_mult) and 0 < width_mult <= 64):
            raise ctx.error(p, "expected null or a number in (0, 64]", width_mult)
        width_mult = float(width_mult)
    bo_path = (*path, "block_options")
    bo = {} if m.get("block_options") is None else m["block_options"]
    if not isinstance(bo, Mapping):
        raise ctx.error(bo_path, "expected a mapping of option names to values", bo)
    for k in bo:
        if not isinstance(k, str) or not k:
            raise ctx.error(bo_path, f"option names must be non-empty strings, found {k!r}")
    block_options = tuple(sorted((k, _block_option_value(ctx, v, (*bo_path, k))) for k, v in bo.items()))
    return TargetOptions(
        kernel_size=kernel,
        pe=ctx.choice(m.get("pe", "all"), (*path, "pe"), _PE),  # type: ignore[arg-type]
        impl=ctx.choice(m.get("impl", "auto"), (*path, "impl"), _IMPL),  # type: ignore[arg-type]
        init=ctx.choice(m.get("init", "warm_start"), (*path, "init"), _INIT),  # type: ignore[arg-type]
        width_mult=width_mult,
        block_options=block_options,
    )


def _target(ctx: _Ctx, value: Any, path: Path, blocks: list[str]) -> Target:
    m = ctx.mapping(value, path, ("block", "select", "exclude", "options"), required=("block", "select"))
    block = m["block"]
    if not isinstance(block, str) or block not in blocks:
        close = difflib.get_close_matches(str(block), blocks, n=1, cutoff=0.5) if isinstance(block, str) else []
        hint = f"Did you mean {close[0]!r}? " if close else ""
        known = ", ".join(blocks) if blocks else "none are registered"
        raise ctx.error(
            (*path, "block"), "not a registered block", block, f"{hint}Registered blocks: {known} (list_blocks())"
        )
    select = _selector(ctx, m["select"], (*path, "select"))
    exclude = None if m.get("exclude") is None else _selector(ctx, m["exclude"], (*path, "exclude"))
    options = _options(ctx, m.get("options"), (*path, "options"))
    return Target(block, select, exclude, options, line=ctx.lines.get(path))


_RULE_KEYS = ("version", "name", "description", "input_size", "targets")


def _rule(data: Any, *, source: str, lines: Mapping[Path, int] | None = None, text: str | None = None) -> Rule:
    ctx = _Ctx(source, lines)
    if not isinstance(data, Mapping):
        raise ctx.error((), "a rule must be a mapping with version, name and targets", data)
    if "version" not in data:
        raise ctx.error(("version",), "required key 'version' is missing", hint=f"add 'version: {RULE_VERSION}'")
    version = ctx.integer(data["version"], ("version",), 1, 2**31, "a format version number")
    if version > RULE_VERSION:
        raise ctx.error(
            ("version",),
            f"rule format version {version} is newer than this parc-surgery reads (version {RULE_VERSION})",
            hint="upgrade parc-surgery, or rewrite the rule for version 1",
        )
    m = ctx.mapping(data, (), _RULE_KEYS, required=("name", "targets"))
    name = ctx.string(m["name"], ("name",), "a non-empty, single-line rule name")
    if "\n" in name or len(name) > 200:
        raise ctx.error(("name",), "expected a single-line rule name of at most 200 characters", name)
    description = "" if m.get("description") is None else m["description"]
    if not isinstance(description, str):
        raise ctx.error(("description",), "expected a string", description)
    input_size = None if m.get("input_size") is None else ctx.size(m["input_size"], ("input_size",), "an input size")
    targets = m["targets"]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ctx.error(("targets",), "expected a non-empty list of targets (- block: ...)", targets)
    from .blocks import list_blocks  # lazy: blocks import torch models; rule parsing must not depend on order

    blocks = list_blocks()
    parsed = tuple(_target(ctx, t, ("targets", i), blocks) for i, t in enumerate(targets))
    return Rule(version, name.strip(), description, parsed, input_size, source=source, text=text)


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
