"""Validation of rule fields, shared by the rule dataclasses and the YAML / dict loader.

Every rule dataclass (:class:`~parc_surgery.rule.Rule`, ``Target``, ``Selector``, ``StageSpec``,
``TargetOptions``) checks and normalises its own fields in ``__post_init__`` with the functions here, so a
rule is valid however it was made: from YAML, from a dict, or in Python. A bad field raises
:class:`FieldError` (a :class:`~parc_surgery.errors.RuleError`) naming the class, the field, the bad value
and what is allowed::

    TargetOptions(pe="sometimes")
    # RuleError: TargetOptions: pe: expected one of all, first, none, got 'sometimes'

The YAML loader builds the same dataclasses inside :meth:`FieldReader.fields`, which re-raises such an
error with the file, the line and the full field path, in the rule file's own key names::

    rule.yaml:9: targets[0].options.pe: expected one of all, first, none, got 'sometimes'
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
import reprlib
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

from ._yaml import Path, format_path
from .errors import RuleError
from .types import validate_type_name

__all__ = [
    "RULE_VERSION",
    "FieldError",
    "FieldReader",
    "check_block",
    "check_options",
    "check_rule",
    "check_rule_header",
    "check_selector",
    "check_stage_spec",
    "check_target",
    "check_version",
]

RULE_VERSION = 1
MAX_SIZE = 16384  # largest input size / kernel length accepted
MAX_STAGE_INDEX = 10_000
PE_CHOICES = ("all", "first", "none")
IMPL_CHOICES = ("auto", "spatial", "fft")
INIT_CHOICES = ("warm_start", "reference")
# the rule file's key for a dataclass field, where the two differ
SELECTOR_KEYS = {"types": "type", "names": "name"}
STAGE_SPEC_KEYS = {"stages": "stage"}

_MISSING = object()
_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlevel = 3

_FRACTION_RE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d{1,9})\s*$")
_DECIMAL_RE = re.compile(r"^\s*(\d{1,9}(\.\d{0,12})?|\.\d{1,12})\s*$")
_FRACTION_HELP = "a fraction in (0, 1]: a number such as 0.5 or a string 'a/b' such as 1/3"


def _message(where: str, path: Path, problem: str, value: Any, hint: str, top: str = "(top level): ") -> str:
    msg = f"{where}: {format_path(path) + ': ' if path else top}{problem}"
    if value is not _MISSING:
        msg += f", got {_repr.repr(value)}"
    return msg + (f". {hint}" if hint else "")


class FieldError(RuleError):
    """A bad field of a rule dataclass; ``path`` is relative to the object (field names), kept for relocation."""

    def __init__(self, owner: str, path: Path, problem: str, value: Any = _MISSING, hint: str = "") -> None:
        super().__init__(_message(owner, path, problem, value, hint, top=""))
        self.path, self.problem, self.value, self.hint = path, problem, value, hint


class FieldReader:
    """Typed readers that raise located errors.

    ``FieldReader("TargetOptions")`` (no ``lines``) raises :class:`FieldError` with paths relative to that
    object; ``FieldReader(source, lines)`` (the YAML loader) raises plain :class:`RuleError` naming the
    source, the line and the full path.
    """

    def __init__(self, source: str, lines: Mapping[Path, int] | None = None, *, located: bool = True) -> None:
        self.source = source
        self.lines = lines or {}
        self.located = located

    @classmethod
    def of(cls, obj: Any) -> FieldReader:
        """The reader a dataclass's ``__post_init__`` uses: errors name its class."""
        return cls(type(obj).__name__, located=False)

    def line(self, path: Path) -> int | None:
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return None

    def error(self, path: Path, problem: str, value: Any = _MISSING, hint: str = "") -> RuleError:
        if not self.located:
            return FieldError(self.source, path, problem, value, hint)
        line = self.line(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        return RuleError(_message(where, path, problem, value, hint))

    @contextlib.contextmanager
    def fields(self, path: Path, keys: Mapping[str, str] | None = None) -> Iterator[None]:
        """Re-raise a dataclass's :class:`FieldError` at ``path`` (its field renamed by ``keys``), located."""
        try:
            yield
        except FieldError as e:
            sub = e.path
            if sub and keys and sub[0] in keys:
                sub = (keys[sub[0]], *sub[1:])  # type: ignore[index]
            raise self.error((*path, *sub), e.problem, e.value, e.hint) from None

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

    def items(self, value: Any, path: Path, what: str, *, optional: bool = False) -> list[tuple[Path, Any]]:
        """A scalar or a non-empty list, as (path, item) pairs; ``optional``: an empty list gives none."""
        if isinstance(value, (list, tuple)):
            if not value and not optional:
                raise self.error(path, f"expected {what} or a non-empty list of them", value)
            return [((*path, i), v) for i, v in enumerate(value)]
        return [(path, value)]

    def size(self, value: Any, path: Path, what: str) -> tuple[int, int]:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise self.error(path, f"expected {what} as an integer or [H, W]", value)
            return tuple(self.integer(v, (*path, i), 1, MAX_SIZE) for i, v in enumerate(value))  # type: ignore
        n = self.integer(value, path, 1, MAX_SIZE, f"{what} (an integer or [H, W])")
        return (n, n)

    def fraction(self, value: Any, path: Path) -> Fraction:
        if isinstance(value, bool):
            raise self.error(path, f"expected {_FRACTION_HELP}", value)
        if isinstance(value, Fraction):
            f = value
        elif isinstance(value, int):
            f = Fraction(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise self.error(path, f"expected {_FRACTION_HELP}", value)
            f = Fraction(value).limit_denominator(1000)
        elif isinstance(value, str) and (m := _FRACTION_RE.match(value)):
            if int(m.group(2)) == 0:
                raise self.error(path, "zero denominator", value, "Write a fraction such as 1/3")
            f = Fraction(int(m.group(1)), int(m.group(2)))
        elif isinstance(value, str) and _DECIMAL_RE.match(value):
            f = Fraction(value.strip()).limit_denominator(1000)
        else:
            raise self.error(path, f"expected {_FRACTION_HELP}", value)
        if not 0 < f <= 1:
            raise self.error(path, f"expected {_FRACTION_HELP}", value)
        return f

    def instances(self, value: Any, path: Path, cls: type, what: str) -> tuple:
        """A list or tuple of ``cls`` instances, as a tuple."""
        if not isinstance(value, (list, tuple)):
            raise self.error(path, f"expected a list of {what}", value)
        for i, v in enumerate(value):
            if not isinstance(v, cls):
                raise self.error((*path, i), f"expected a {cls.__name__}", v)
        return tuple(value)


def _set(obj: Any, **values: Any) -> None:
    for k, v in values.items():
        object.__setattr__(obj, k, v)  # frozen dataclasses: normalised once, in __post_init__


# ----------------------------------------------------------------------------------------------------------------------
# Per dataclass


def check_stage_spec(spec: Any) -> None:
    """``StageSpec``: stage indices or container names (one or a non-empty list), a fraction in (0, 1]."""
    r = FieldReader.of(spec)
    stages: list[int | str] = []
    for p, v in r.items(spec.stages, ("stages",), "a stage index or container name"):
        if isinstance(v, str):
            stages.append(r.string(v, p, "a stage container name such as 'layer3'"))
        else:
            stages.append(r.integer(v, p, -MAX_STAGE_INDEX, MAX_STAGE_INDEX, "a stage index (0-based, -1 = last)"))
    fraction = r.fraction(spec.fraction, ("fraction",))
    include_first = r.boolean(spec.include_first, ("include_first",))
    _set(spec, stages=tuple(stages), fraction=fraction, include_first=include_first)


def _type_names(r: FieldReader, value: Any) -> tuple[str, ...]:
    out: list[str] = []
    for p, v in r.items(value, ("types",), "a class name", optional=True):
        name = r.string(v, p, "a class name such as 'Bottleneck' or 'timm.models.resnet.Bottleneck'")
        if len(name) > 300:
            raise r.error(p, "class name is too long (more than 300 characters)", name)
        try:
            validate_type_name(name.strip())
        except RuleError as e:
            raise r.error(p, str(e)) from None
        out.append(name.strip())
    return tuple(out)


def _name_patterns(r: FieldReader, value: Any) -> tuple[str, ...]:
    out: list[str] = []
    for p, v in r.items(value, ("names",), "a module name", optional=True):
        pattern = r.string(v, p, "a module name, glob ('layer3.*') or 're:<regex>'")
        if pattern.startswith("re:"):
            if not pattern[3:]:
                raise r.error(p, "empty regular expression after 're:'", pattern)
            try:
                re.compile(pattern[3:])
            except (re.error, RecursionError, OverflowError, ValueError) as e:
                raise r.error(p, f"invalid regular expression ({e})", pattern) from None
        out.append(pattern)
    return tuple(out)


def check_selector(sel: Any, stage_cls: type) -> None:
    """``Selector``: class names (allow-listed), name patterns, ``stage_cls`` items; at least one criterion."""
    r = FieldReader.of(sel)
    types = _type_names(r, sel.types)
    names = _name_patterns(r, sel.names)
    stages = r.instances(sel.stages, ("stages",), stage_cls, "stage selections (- stage: -1)")
    exact = r.boolean(sel.exact, ("exact",))
    if exact and not types:
        raise r.error(("exact",), "'exact' only applies to 'type'; add a type or remove exact")
    attention = r.boolean(sel.attention, ("attention",))
    if not (types or names or stages or attention):
        raise r.error((), "needs at least one criterion: type, name, stages or attention: true")
    _set(sel, types=types, names=names, stages=stages, exact=exact, attention=attention)


def _block_option_value(r: FieldReader, value: Any, path: Path, nested: bool = False) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise r.error(path, "expected a finite number", value)
        return value
    if isinstance(value, (list, tuple)) and not nested:
        return tuple(_block_option_value(r, v, (*path, i), True) for i, v in enumerate(value))
    raise r.error(path, "block options must be scalars (string, number, true/false, null) or lists of them", value)


def _block_options(r: FieldReader, value: Any) -> tuple[tuple[str, Any], ...]:
    path: Path = ("block_options",)
    if value is None:
        pairs: list = []
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        pairs = list(value)  # the normalised form: (name, value) pairs
    else:
        raise r.error(path, "expected a mapping of option names to values", value)
    seen: set[str] = set()
    for k, _ in pairs:
        if not isinstance(k, str) or not k:
            raise r.error(path, f"option names must be non-empty strings, found {k!r}")
        if k in seen:
            raise r.error(path, f"option {k!r} is given twice")
        seen.add(k)
    return tuple(sorted((k, _block_option_value(r, v, (*path, k))) for k, v in pairs))


def check_options(opts: Any) -> None:
    """``TargetOptions``: kernel ``'auto'`` / K / (H, W), pe / impl / init choices, width_mult, block options."""
    r = FieldReader.of(opts)
    kernel = opts.kernel_size
    if not (isinstance(kernel, str) and kernel == "auto"):
        kernel = r.size(kernel, ("kernel_size",), "'auto' or a kernel length")
    width_mult = opts.width_mult
    if width_mult is not None:
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)):
            raise r.error(("width_mult",), "expected null or a number > 0", width_mult)
        if not (math.isfinite(width_mult) and 0 < width_mult <= 64):
            raise r.error(("width_mult",), "expected null or a number in (0, 64]", width_mult)
        width_mult = float(width_mult)
    block_options = _block_options(r, opts.block_options)
    _set(
        opts,
        kernel_size=kernel,
        pe=r.choice(opts.pe, ("pe",), PE_CHOICES),
        impl=r.choice(opts.impl, ("impl",), IMPL_CHOICES),
        init=r.choice(opts.init, ("init",), INIT_CHOICES),
        width_mult=width_mult,
        block_options=block_options,
    )


def check_block(r: FieldReader, block: Any, path: Path = ("block",)) -> str:
    """A registered block name (``parc_surgery.list_blocks()``)."""
    from .blocks import list_blocks  # lazy: blocks import torch models; rule parsing must not depend on order

    blocks = list_blocks()
    if not isinstance(block, str) or block not in blocks:
        close = difflib.get_close_matches(str(block), blocks, n=1, cutoff=0.5) if isinstance(block, str) else []
        hint = f"Did you mean {close[0]!r}? " if close else ""
        known = ", ".join(blocks) if blocks else "none are registered"
        raise r.error(path, "not a registered block", block, f"{hint}Registered blocks: {known} (list_blocks())")
    return block


def check_target(target: Any, selector_cls: type, options_cls: type) -> None:
    """``Target``: a registered block, a ``selector_cls`` select, an optional exclude, ``options_cls`` options."""
    r = FieldReader.of(target)
    check_block(r, target.block)
    if not isinstance(target.select, selector_cls):
        raise r.error(("select",), f"expected a {selector_cls.__name__}", target.select)
    if target.exclude is not None and not isinstance(target.exclude, selector_cls):
        raise r.error(("exclude",), f"expected None or a {selector_cls.__name__}", target.exclude)
    if not isinstance(target.options, options_cls):
        raise r.error(("options",), f"expected a {options_cls.__name__}", target.options)
    if target.line is not None:
        r.integer(target.line, ("line",), 1, 2**31, "a line number or None")


def check_version(r: FieldReader, version: Any) -> int:
    version = r.integer(version, ("version",), 1, 2**31, "a format version number")
    if version > RULE_VERSION:
        raise r.error(
            ("version",),
            f"rule format version {version} is newer than this parc-surgery reads (version {RULE_VERSION})",
            hint="upgrade parc-surgery, or rewrite the rule for version 1",
        )
    return version


def check_rule_header(
    r: FieldReader, name: Any, description: Any, input_size: Any
) -> tuple[str, str, tuple[int, int] | None]:
    """A rule's name (single line, stripped), description (``None`` -> ``""``) and optional input size."""
    name = r.string(name, ("name",), "a non-empty, single-line rule name")
    if "\n" in name or len(name) > 200:
        raise r.error(("name",), "expected a single-line rule name of at most 200 characters", name)
    description = "" if description is None else description
    if not isinstance(description, str):
        raise r.error(("description",), "expected a string", description)
    size = None if input_size is None else r.size(input_size, ("input_size",), "an input size")
    return name.strip(), description, size


def check_rule(rule: Any, target_cls: type) -> None:
    """``Rule``: a known format version, a name, a non-empty list of ``target_cls`` targets."""
    r = FieldReader.of(rule)
    version = check_version(r, rule.version)
    name, description, size = check_rule_header(r, rule.name, rule.description, rule.input_size)
    if not isinstance(rule.targets, (list, tuple)) or not rule.targets:
        raise r.error(("targets",), "expected a non-empty list of targets (- block: ...)", rule.targets)
    targets = r.instances(rule.targets, ("targets",), target_cls, "targets")
    _set(rule, version=version, name=name, description=description, input_size=size, targets=targets)
