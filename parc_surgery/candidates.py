"""What :func:`parc_surgery.list_candidates` found: stages, replaceable blocks, attention, a rule's selection.

``Candidates`` is plain data with a text rendering (``str``) and ``to_dict``; the CLI draws it as tables
(:func:`parc_surgery.render.candidate_tables`). With a rule it holds the planned targets, each target's
diagnostic, and the refusals: what the rule selected but a block cannot replace, and why (the reasons a
conversion raises, or notes as left out for a lenient block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .match import TargetDiagnostic
from .plan import PlannedTarget, Refusal
from .stages import Stage

__all__ = ["Candidates"]


@dataclass(frozen=True)
class Candidates:
    """What :func:`list_candidates` found: stages, replaceable blocks, attention mixers, a rule's selection."""

    model: str
    input_size: tuple[int, int]
    stages: tuple[Stage, ...]
    blocks: tuple[tuple[str, str, tuple[str, ...]], ...]  # (name, type, registered blocks that replace it)
    attention: tuple[str, ...]
    traced: bool
    trace_note: str
    selected: tuple[PlannedTarget, ...] | None = None
    diagnostics: tuple[TargetDiagnostic, ...] = ()
    other_attention: tuple[str, ...] = ()  # attention that is no token mixer (pooling, class attention)
    refused: tuple[Refusal, ...] = ()  # selected modules a block cannot replace, and why

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "traced": self.traced,
            "trace_note": self.trace_note,
            "stages": [s.to_dict() for s in self.stages],
            "blocks": [{"name": n, "type": t, "replaceable_by": list(b)} for n, t, b in self.blocks],
            "attention": list(self.attention),
            "other_attention": list(self.other_attention),
            "selected": None if self.selected is None else [t.to_dict() for t in self.selected],
            "diagnostics": [d.describe() for d in self.diagnostics],
            "refused": [
                {
                    "name": x.name,
                    "block": x.block,
                    "target_index": x.target_index,
                    "reason": x.reason,
                    "left_out": x.lenient,
                }
                for x in self.refused
            ],
        }

    def __str__(self) -> str:
        lines = [f"{self.model} at {self.input_size[0]}x{self.input_size[1]} (fx trace: {self.traced_text})"]
        lines.append("stages:")
        for s in self.stages:
            feat = "x".join(map(str, s.feature_size or ()))
            lines.append(f"  [{s.index}] {s.container}: {len(s.blocks)} blocks, {s.channels} ch, {feat}")
        lines.append(f"replaceable blocks: {len(self.blocks)}")
        for n, t, b in self.blocks:
            lines.append(f"  {n} ({t}) -> {', '.join(b)}")
        lines.append(f"attention token mixers: {len(self.attention)}")
        for n in self.attention:
            lines.append(f"  {n}")
        if self.other_attention:
            lines.append(f"other attention (fewer tokens out than in: not token mixers): {len(self.other_attention)}")
            lines.extend(f"  {n}" for n in self.other_attention)
        if self.selected is not None:
            lines.append(f"selected by the rule: {len(self.selected)}")
            for t in self.selected:
                form = f"; {t.ctx.residual.describe()}" if t.ctx.residual is not None else ""
                form += f"; {t.ctx.attention.describe()}" if hasattr(t.ctx.attention, "describe") else ""
                lines.append(f"  {t.name} -> {t.block} (kernel {t.ctx.kernel_hw}, pe={t.ctx.pe}){form}")
            for d in self.diagnostics:
                lines.append(f"  {d.describe()}")
            if self.refused:
                lines.append(f"selected but not replaceable: {len(self.refused)}")
                lines.extend(f"  {x.describe()}" for x in self.refused)
        return "\n".join(lines)

    @property
    def traced_text(self) -> str:
        return "ok" if self.traced else f"failed, forward hooks used ({self.trace_note})"
