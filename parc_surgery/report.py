"""The audit record of one conversion: what was replaced, params and MACs before/after, which checks passed.

``Report`` is plain data (frozen dataclasses) with three renderings: JSON (``to_json``, read back by
``from_dict``), Markdown (``to_markdown``) and rich tables (``rich_tables``, used by the CLI).
:func:`write_report` writes JSON or Markdown by the file suffix, atomically. Units are explicit
everywhere: MACs are multiply-accumulates (FLOPs / 2), batch 1, eval mode (see :mod:`parc_surgery.flops`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ._atomic import atomic_target
from .errors import CheckpointError, ConfigError

__all__ = ["Check", "Report", "TargetReport", "format_count", "format_macs", "format_params", "write_report"]

REPORT_FORMAT = "parc-surgery-report"
REPORT_VERSION = 1
DEFAULT_UNITS = "MACs = multiply-accumulates (FLOPs/2), batch 1, eval"


def format_count(n: int | float | None, unit: str = "") -> str:
    """``5037100 -> "5.0371 M"``, ``1657300000, "MACs" -> "1.6573 G MACs"``; ``None -> "n/a"``."""
    if n is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            text = f"{n / scale:.4f} {prefix}"
            break
    else:
        text = f"{n:,}" if isinstance(n, int) else f"{n:.4f}"
    return f"{text} {unit}".rstrip() if unit else text


def format_params(n: int | None) -> str:
    """Parameters, e.g. ``"5.0371 M"``."""
    return format_count(n)


def format_macs(n: int | None) -> str:
    """MACs, e.g. ``"1.6573 G MACs"``."""
    return format_count(n, "MACs") if n is not None else "n/a"


def _ratio(before: int | None, after: int | None) -> str:
    if before is None or after is None or before == 0:
        return "n/a"
    r = after / before
    return f"{r:.4f}x ({(r - 1) * 100:+.2f}%)"


@dataclass(frozen=True)
class Check:
    """One verification of the converted model (shape, finiteness, traced == eager, ...)."""

    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class TargetReport:
    """One replaced module: its block, sizes before/after and what happened to its weights.

    kept / transformed / new / dropped: parameter counts from the block's carry record (tensors, not
    elements); ``carry`` the record itself as a dict (``CarryRecord.to_dict()``), or ``None``.
    """

    name: str
    block: str
    source_type: str
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    kept: int = 0
    transformed: int = 0
    new: int = 0
    dropped: int = 0
    carry: dict | None = None


@dataclass(frozen=True)
class Report:
    """The audit of one conversion (``model`` converted by ``rule`` at ``input_size``)."""

    model: str
    rule: str
    input_size: tuple[int, int]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    macs_after_fft: int | None
    targets: tuple[TargetReport, ...]
    checks: tuple[Check, ...]
    uncounted_ops: dict
    units: str = DEFAULT_UNITS
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Whether every check passed (vacuously true with no checks)."""
        return all(c.passed for c in self.checks)

    # -- dict / JSON -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` reads it back to an equal ``Report``."""
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "model": self.model,
            "rule": self.rule,
            "input_size": list(self.input_size),
            "units": self.units,
            "passed": self.passed,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_after_fft": self.macs_after_fft,
            "targets": [{f.name: getattr(t, f.name) for f in fields(TargetReport)} for t in self.targets],
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks],
            "uncounted_ops": dict(self.uncounted_ops),
            "notes": list(self.notes),
        }

    def to_json(self, *, indent: int = 2) -> str:
        """The report as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output (e.g. a parsed JSON report file)."""
        if not isinstance(data, dict):
            raise ConfigError(f"Report.from_dict: expected a dict, got {type(data).__name__}")
        fmt = data.get("format", REPORT_FORMAT)
        version = data.get("version", REPORT_VERSION)
        if fmt != REPORT_FORMAT:
            raise ConfigError(f"Report.from_dict: 'format' is {fmt!r}, expected {REPORT_FORMAT!r}")
        if not isinstance(version, int) or version > REPORT_VERSION:
            raise ConfigError(
                f"Report.from_dict: report version {version!r} is newer than this parc-surgery reads "
                f"({REPORT_VERSION}); upgrade parc-surgery"
            )
        try:
            targets = tuple(_build(TargetReport, t, "targets[]") for t in data["targets"])
            checks = tuple(_build(Check, c, "checks[]") for c in data["checks"])
            return cls(
                model=data["model"],
                rule=data["rule"],
                input_size=tuple(data["input_size"]),
                params_before=data["params_before"],
                params_after=data["params_after"],
                macs_before=data.get("macs_before"),
                macs_after=data.get("macs_after"),
                macs_after_fft=data.get("macs_after_fft"),
                targets=targets,
                checks=checks,
                uncounted_ops=dict(data.get("uncounted_ops") or {}),
                units=data.get("units", DEFAULT_UNITS),
                notes=tuple(data.get("notes") or ()),
            )
        except KeyError as e:
            raise ConfigError(f"Report.from_dict: missing key {e.args[0]!r}") from None

    # -- renderings --------------------------------------------------------------------------

    def _summary_rows(self) -> list[tuple[str, str, str, str]]:
        rows = [
            ("params", format_params(self.params_before), format_params(self.params_after),
             _ratio(self.params_before, self.params_after)),
            ("MACs", format_macs(self.macs_before), format_macs(self.macs_after),
             _ratio(self.macs_before, self.macs_after)),
        ]  # fmt: skip
        if self.macs_after_fft is not None:
            rows.append(
                ("MACs, ParC as FFT", format_macs(self.macs_before), format_macs(self.macs_after_fft),
                 _ratio(self.macs_before, self.macs_after_fft))
            )  # fmt: skip
        return rows

    _TARGET_HEADER = ("target", "block", "source type", "params before", "params after", "MACs before",
                      "MACs after", "kept", "transformed", "new", "dropped")  # fmt: skip

    def _target_rows(self) -> list[tuple[str, ...]]:
        return [
            (t.name, t.block, t.source_type, format_params(t.params_before), format_params(t.params_after),
             format_macs(t.macs_before), format_macs(t.macs_after), str(t.kept), str(t.transformed), str(t.new),
             str(t.dropped))
            for t in self.targets
        ]  # fmt: skip

    def _title(self) -> str:
        h, w = self.input_size
        return f"{self.model} converted by {self.rule} @ {h}x{w}"

    def to_markdown(self) -> str:
        """A human-readable Markdown report: summary, targets, checks, uncounted ops, notes."""

        def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
            esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
            return [
                "| " + " | ".join(header) + " |",
                "|" + "|".join("---" for _ in header) + "|",
                *("| " + " | ".join(r) + " |" for r in esc),
            ]

        verdict = "all checks passed" if self.passed else "SOME CHECKS FAILED"
        lines = [f"# {self._title()}", "", f"Result: **{verdict}**. Units: {self.units}.", "", "## Summary", ""]
        lines += table(("", "before", "after", "after / before"), self._summary_rows())
        lines += ["", f"## Targets ({len(self.targets)})", ""]
        lines += table(self._TARGET_HEADER, self._target_rows()) if self.targets else ["(none)"]
        lines += ["", f"## Checks ({sum(c.passed for c in self.checks)}/{len(self.checks)} passed)", ""]
        check_rows = [(c.name, "PASS" if c.passed else "FAIL", c.detail) for c in self.checks]
        lines += table(("check", "result", "detail"), check_rows) if self.checks else ["(none)"]
        if self.uncounted_ops:
            lines += ["", "## Uncounted ops", "", "Compute-like ops that ran with no FLOP formula (not in the MACs):"]
            lines += [""]
            lines += [f"- `{op}`: {n} call(s)" for op, n in sorted(self.uncounted_ops.items())]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"

    def rich_tables(self) -> list[Any]:
        """``rich.table.Table`` objects: summary (params/MACs before, after, ratio), targets, checks.

        Cell text is plain (never parsed as rich markup), so names with brackets print as they are.
        """
        from rich.table import Table
        from rich.text import Text

        caption = f"Units: {self.units}."
        if self.uncounted_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.uncounted_ops.items()))
            caption += f" Not in the MACs (no formula): {ops}."
        summary = Table(title=Text(self._title()), caption=Text(caption), min_width=min(len(caption) + 4, 118))
        for col in ("", "before", "after", "after / before"):
            summary.add_column(col, justify="right" if col else "left")
        for row in self._summary_rows():
            summary.add_row(*(Text(c) for c in row))

        targets = Table(title=f"Targets ({len(self.targets)})", caption="carry: kept / transformed / new / dropped")
        for col in ("target", "block", "source type", "params", "MACs", "carry"):
            targets.add_column(col, justify="left" if col in ("target", "block", "source type") else "right")
        for t in self.targets:
            macs = (
                "n/a"
                if t.macs_before is None and t.macs_after is None
                else (f"{format_count(t.macs_before)} -> {format_count(t.macs_after)}")
            )
            targets.add_row(
                Text(t.name),
                Text(t.block),
                Text(t.source_type.rsplit(".", 1)[-1]),
                f"{format_params(t.params_before)} -> {format_params(t.params_after)}",
                macs,
                f"{t.kept}/{t.transformed}/{t.new}/{t.dropped}",
            )

        checks = Table(title=f"Checks ({sum(c.passed for c in self.checks)}/{len(self.checks)} passed)")
        for col in ("check", "result", "detail"):
            checks.add_column(col)
        for c in self.checks:
            verdict = Text("PASS", style="green") if c.passed else Text("FAIL", style="bold red")
            checks.add_row(Text(c.name), verdict, Text(c.detail))
        return [summary, targets, checks]


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"Report.from_dict: each entry of {where} must be a dict, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"Report.from_dict: unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"Report.from_dict: bad entry in {where}: {e}") from None


def write_report(report: Report, path: str | os.PathLike) -> Path:
    """Write ``report`` as JSON (``.json``) or Markdown (``.md``), atomically; returns the path.

    The text is rendered first, then written to a temporary file in the same directory and moved over
    ``path`` with ``os.replace``: on any failure no partial file is left and an existing file is untouched.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        render = report.to_json
    elif suffix == ".md":
        render = report.to_markdown
    else:
        raise ConfigError(
            f"write_report: unsupported suffix {path.suffix or '(none)'!r} in {str(path)!r}; "
            "use .json (machine-readable) or .md (Markdown)"
        )
    text = render()
    directory = path.parent
    if not directory.is_dir():
        raise CheckpointError(f"write_report: directory {str(directory)!r} does not exist; create it first")
    try:
        with atomic_target(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"write_report: cannot write {str(path)!r}: {e}") from e
    return path
