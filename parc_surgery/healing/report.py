"""The heal section of a conversion's report: figures at each point, each stage, targets by damage.

:class:`HealReport` is plain data. :class:`HealedReport` is the conversion's :class:`~parc_surgery.report.Report`
with that section added: its JSON gains a ``"heal"`` key (read back by ``HealedReport.from_dict``), its
Markdown a "Heal" section and its rich tables three more tables, so everything that renders or writes
reports (the CLI, ``write_report``) shows the heal without knowing about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..report import Report
from .losses import EvalPoint
from .train import StageResult

__all__ = ["HealReport", "HealedReport"]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


@dataclass(frozen=True)
class HealReport:
    """What a heal did and reached. ``points``: the student against the teacher on the held-out images
    right after conversion and after each stage; ``stages``: steps, time, images, losses per stage."""

    teacher: str
    device: str
    world_size: int
    images_train: int
    images_heldout: int
    data: str
    labelled: bool
    config: dict
    points: tuple[EvalPoint, ...]
    stages: tuple[StageResult, ...]
    seconds: float
    teacher_accuracy: float | None = None
    stopped: str | None = None
    notes: tuple[str, ...] = field(default=())

    def point(self, name: str) -> EvalPoint | None:
        return next((p for p in self.points if p.name == name), None)

    def by_damage(self) -> list[tuple[str, dict[str, float]]]:
        """Targets with their block error at each point, worst first (by the error after stage 1, else the last)."""
        names = list(self.points[0].block_errors) if self.points else []
        key_point = self.point("stage 1") or (self.points[-1] if self.points else None)
        rows = [(n, {p.name: p.block_errors[n] for p in self.points if n in p.block_errors}) for n in names]
        if key_point is not None:
            rows.sort(key=lambda r: -key_point.block_errors.get(r[0], 0.0))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "device": self.device,
            "world_size": self.world_size,
            "images_train": self.images_train,
            "images_heldout": self.images_heldout,
            "data": self.data,
            "labelled": self.labelled,
            "config": dict(self.config),
            "teacher_accuracy": self.teacher_accuracy,
            "points": [p.to_dict() for p in self.points],
            "stages": [s.to_dict() for s in self.stages],
            "seconds": self.seconds,
            "stopped": self.stopped,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HealReport:
        d = dict(d)
        d["points"] = tuple(EvalPoint.from_dict(p) for p in d["points"])
        d["stages"] = tuple(StageResult.from_dict(s) for s in d["stages"])
        d["notes"] = tuple(d.get("notes") or ())
        return cls(**d)

    # -- renderings ------------------------------------------------------------------------------------------------

    def _point_rows(self) -> list[tuple[str, ...]]:
        rows = []
        if self.teacher_accuracy is not None:
            rows.append(("teacher", "100.00 %", "0", _pct(self.teacher_accuracy), "n/a"))
        for p in self.points:
            rows.append((p.name, _pct(p.agreement), _num(p.kl), _pct(p.accuracy), _num(p.mean_block_error)))
        return rows

    def _stage_rows(self) -> list[tuple[str, ...]]:
        return [
            (f"{s.stage}: {s.name}", f"{s.steps_done}/{s.steps}", f"{s.seconds:.1f} s", str(s.images),
             str(s.trainable_params), f"{_num(s.loss_first)} -> {_num(s.loss_last)}",
             ("resumed from the work folder" if s.resumed else "") + (s.stopped or ""))
            for s in self.stages
        ]  # fmt: skip

    def _damage_rows(self) -> list[tuple[str, ...]]:
        names = [p.name for p in self.points]
        out = []
        for n, errs in self.by_damage():
            before, after = errs.get("converted"), errs.get("stage 1")
            cut = f"{before / after:.1f}x" if before is not None and after else "n/a"
            out.append((n, *(_num(errs.get(p)) for p in names), cut))
        return out

    def _headers(self) -> dict[str, tuple[str, ...]]:
        return {
            "points": ("point", "top-1 agreement", "KL(teacher, student)", "accuracy", "mean block error"),
            "stages": ("stage", "steps", "time", "images seen", "trainable params", "loss first -> last", "note"),
            "damage": ("target (worst first)", *(f"error {p.name}" for p in self.points), "cut by stage 1"),
        }

    def _summary(self) -> str:
        return (
            f"Healed on {self.images_train} unlabelled training images ({self.data}); measured on "
            f"{self.images_heldout} held-out images; teacher: {self.teacher}; {self.world_size} process(es) on "
            f"{self.device}; {self.seconds:.1f} s. Block error = sum((student - teacher)^2) / sum(teacher^2) of the "
            "block's output on the teacher's own block inputs."
        )

    def to_markdown(self) -> str:
        """The heal section alone, as Markdown."""
        return "\n".join(self.markdown_lines()).lstrip("\n") + "\n"

    def markdown_lines(self) -> list[str]:
        table = _md_table
        h = self._headers()
        lines = ["", "## Heal", "", self._summary(), ""]
        if self.stopped:
            lines += [f"**Stopped early**: {self.stopped}", ""]
        lines += table(h["points"], self._point_rows())
        lines += ["", "### Stages", ""]
        lines += table(h["stages"], self._stage_rows()) if self.stages else ["(none run)"]
        lines += ["", "### Targets by damage", ""]
        lines += table(h["damage"], self._damage_rows()) if self.points else ["(no held-out images)"]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return lines

    def rich_tables(self) -> list[Any]:
        from rich.table import Table
        from rich.text import Text

        h = self._headers()
        out = []
        for title, key, rows in (
            ("Heal: the student against the teacher (held-out images)", "points", self._point_rows()),
            ("Heal stages", "stages", self._stage_rows()),
            ("Heal: targets by damage", "damage", self._damage_rows()),
        ):
            t = Table(title=title, caption=Text(self._summary() if key == "points" else (self.stopped or "")))
            for col in h[key]:
                t.add_column(col)
            for r in rows:
                t.add_row(*(Text(c) for c in r))
            out.append(t)
        return out


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in esc),
    ]


@dataclass(frozen=True)
class HealedReport(Report):
    """A conversion's report with its heal section (``heal``)."""

    heal: HealReport | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["heal"] = None if self.heal is None else self.heal.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealedReport:
        base = Report.from_dict(data)
        heal = data.get("heal")
        fields_ = {f: getattr(base, f) for f in base.__dataclass_fields__}
        return cls(**fields_, heal=None if heal is None else HealReport.from_dict(heal))

    @classmethod
    def create(cls, report: Report, heal: HealReport) -> HealedReport:
        """``report`` (a plain or an already healed one) with ``heal`` as its heal section."""
        fields_ = {f: getattr(report, f) for f in Report.__dataclass_fields__}
        return cls(**fields_, heal=heal)

    def to_markdown(self) -> str:
        text = super().to_markdown()
        if self.heal is None:
            return text
        return text.rstrip("\n") + "\n" + "\n".join(self.heal.markdown_lines()) + "\n"

    def rich_tables(self) -> list[Any]:
        tables = super().rich_tables()
        return tables + (self.heal.rich_tables() if self.heal is not None else [])
