"""Safe, bounded YAML loading for rule files, keeping the line of every value.

Rule files are data. This loader composes the YAML node graph with a ``yaml.SafeLoader`` subclass
and builds plain Python values itself, so nothing is ever constructed from a tag: any tag other than
the core ones (``str``, ``int``, ``float``, ``bool``, ``null``, ``seq``, ``map``) is refused, as are
binary or non-UTF-8 input, files over :data:`MAX_BYTES`, nesting deeper than :data:`MAX_DEPTH`,
alias expansions over :data:`MAX_NODES` values (billion laughs), recursive aliases, duplicate keys
and over-long numbers. Every failure is a :class:`~parc_surgery.errors.RuleError` naming the source
and line.

``load_yaml`` returns the value and a ``lines`` map from a path (tuple of keys and indices) to the
1-based line where that key or item starts; rule validation uses it to point at the bad field.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import RuleError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "Path", "decode_rule_bytes", "format_path", "load_yaml"]

MAX_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 20_000
_MAX_NUMBER_CHARS = 40

Path = tuple[str | int, ...]

_TAG = "tag:yaml.org,2002:"
_TEXT_TAGS = {_TAG + t for t in ("str", "timestamp", "value", "merge")}  # kept as their text
_SCALAR_TAGS = _TEXT_TAGS | {_TAG + t for t in ("int", "float", "bool", "null")}
_MERGE_TAG = _TAG + "merge"


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _SafeLineLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting while composing (before Python's recursion limit)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def decode_rule_bytes(data: bytes, *, source: str) -> str:
    """UTF-8 text of a rule file's bytes, refusing oversized and binary input."""
    if len(data) > MAX_BYTES:
        raise RuleError(f"{source}: rule file is too large ({len(data):,} bytes; the limit is {MAX_BYTES:,})")
    if b"\x00" in data:
        raise RuleError(f"{source}: rule file looks binary (it contains NUL bytes); rules are UTF-8 YAML text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RuleError(
            f"{source}:{line}: rule file is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
            "save it as UTF-8 text"
        ) from None


def load_yaml(text: str, *, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse one YAML document into plain values, and the line of every key/item path."""
    if not isinstance(text, str):
        raise RuleError(f"{source}: rule text must be str, got {type(text).__name__}")
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise RuleError(f"{source}: rule text is too large (the limit is {MAX_BYTES:,} bytes)")
    loader = None
    try:
        loader = _SafeLineLoader(text)
        node = loader.get_single_node()
    except _TooDeep as e:
        raise RuleError(f"{source}:{e.line}: YAML is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise RuleError(f"{where}: invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as e:
        line = text[: max(e.position, 0)].count("\n") + 1
        raise RuleError(
            f"{source}:{line}: invalid character {chr(e.character)!r} ({e.character:#x}) in rule text; "
            "rules are printable UTF-8 YAML"
        ) from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise RuleError(f"{source}: invalid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise RuleError(f"{source}: rule file is empty; a rule needs at least 'version', 'name' and 'targets'")
    lines: dict[Path, int] = {(): node.start_mark.line + 1}
    builder = _Builder(loader, source)
    return builder.build(node, (), lines, 0), lines


class _Builder:
    """Turns composed nodes into dict/list/scalars, within a depth and expanded-size budget."""

    def __init__(self, constructor: yaml.SafeLoader, source: str) -> None:
        self.constructor = constructor
        self.source = source
        self.budget = MAX_NODES

    def fail(self, node: Node, message: str) -> RuleError:
        return RuleError(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def build(self, node: Node, path: Path, lines: dict[Path, int], depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise self.fail(node, f"YAML expands to more than {MAX_NODES:,} values (alias bomb?); refusing it")
        if depth > MAX_DEPTH:
            raise self.fail(node, f"YAML is nested too deeply (more than {MAX_DEPTH} levels, or a recursive alias)")
        if isinstance(node, ScalarNode):
            return self.scalar(node)
        if isinstance(node, SequenceNode):
            self.check_tag(node, _TAG + "seq")
            out = []
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                out.append(self.build(item, (*path, i), lines, depth + 1))
            return out
        if isinstance(node, MappingNode):
            self.check_tag(node, _TAG + "map")
            return self.mapping(node, path, lines, depth)
        raise self.fail(node, f"unsupported YAML node {type(node).__name__}")  # pragma: no cover

    def check_tag(self, node: Node, expected: str) -> None:
        if node.tag != expected:
            raise self.fail(
                node,
                f"YAML tag {node.tag.replace(_TAG, '!!')!r} is not allowed in rule files "
                "(rules are plain data: no tags, no Python objects)",
            )

    def scalar(self, node: ScalarNode) -> Any:
        tag = node.tag
        if tag not in _SCALAR_TAGS:
            self.check_tag(node, _TAG + "str")
        if tag in _TEXT_TAGS:
            return node.value
        if tag in (_TAG + "int", _TAG + "float") and len(node.value) > _MAX_NUMBER_CHARS:
            raise self.fail(node, f"number {node.value[:20]!r}... is too long ({len(node.value)} characters)")
        try:
            return {
                _TAG + "int": self.constructor.construct_yaml_int,
                _TAG + "float": self.constructor.construct_yaml_float,
                _TAG + "bool": self.constructor.construct_yaml_bool,
                _TAG + "null": self.constructor.construct_yaml_null,
            }[tag](node)
        except (ValueError, OverflowError, KeyError, yaml.YAMLError) as e:
            raise self.fail(node, f"cannot read {node.value!r} as {tag.replace(_TAG, '')}: {e}") from None

    def key(self, node: Node) -> str:
        if not isinstance(node, ScalarNode):
            raise self.fail(node, "mapping keys must be plain names, not lists or mappings")
        if node.tag not in _SCALAR_TAGS:
            self.check_tag(node, _TAG + "str")
        return node.value

    def mapping(self, node: MappingNode, path: Path, lines: dict[Path, int], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = self.key(key_node)
            if key in out:
                raise self.fail(key_node, f"duplicate key {key[:60]!r} at {format_path(path) or 'top level'}")
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, (*path, key), lines, depth + 1)
        # YAML merge keys (``<<: *defaults``): explicit keys win, then earlier merged mappings.
        for value_node in merges:
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for src in sources:
                if not isinstance(src, MappingNode):
                    raise self.fail(src, "a merge key '<<' takes a mapping or a list of mappings")
                sub_lines: dict[Path, int] = {}
                merged = self.build(src, path, sub_lines, depth + 1)
                for k, v in merged.items():
                    if k not in out:
                        out[k] = v
                        for p, ln in sub_lines.items():
                            if p[: len(path) + 1] == (*path, k):
                                lines.setdefault(p, ln)
        return out


def format_path(path: Path) -> str:
    """``("targets", 0, "select")`` -> ``"targets[0].select"``."""
    out = ""
    for p in path:
        p = p if isinstance(p, int) or len(str(p)) <= 60 else f"{str(p)[:57]}..."
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
