"""Rendering for the CLI: rich tables of a plan, of discovery results, of the bundled rules and model sources.

:class:`Ui` puts tables on stdout and progress and messages on stderr (spinners and timings only on a
terminal, no colour codes in a pipe). A report draws its own tables (``Report.rich_tables``).
"""

from __future__ import annotations

import contextlib
import time

from .errors import ParcSurgeryError

__all__ = ["Ui", "candidate_tables", "plan_table", "rules_table", "sources_table"]


class Ui:
    """Tables on stdout; progress and messages on stderr (spinner and timings only on a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.out = Console(soft_wrap=False)
        self.err = Console(stderr=True)
        if not self.out.is_terminal:
            self.out = Console(width=200, soft_wrap=False, color_system=None)
        if not self.err.is_terminal:
            self.err = Console(stderr=True, width=200, color_system=None, highlight=False)

    @contextlib.contextmanager
    def step(self, text: str):
        if not self.err.is_terminal:
            yield
            return
        t = time.perf_counter()
        with self.err.status(f"{text} ..."):
            yield
        self.err.print(f"[green]✓[/green] {text} [dim]({time.perf_counter() - t:.1f} s)[/dim]")

    def note(self, text: str) -> None:
        self.err.print(text, markup=False, highlight=False)

    def tables(self, tables: list) -> None:
        for t in tables:
            self.out.print(t)


def _shape(s) -> str:
    return "x".join(map(str, s)) if s else "?"


def plan_table(plan):
    """One row per planned target: block, replaced type, shapes, feature and kernel size, PE, impl, init."""
    from rich.table import Table

    t = Table(title=f"Plan: {plan.model} with {plan.rule} @ {plan.input_size[0]}x{plan.input_size[1]}")
    for col in ("target", "block", "replaces", "in -> out", "feature", "kernel", "PE", "impl", "init"):
        t.add_column(col)
    for p in plan.targets:
        shapes = f"{_shape(p.in_shape)} -> {_shape(p.out_shape)}"
        kh, kw = p.ctx.kernel_hw
        fh, fw = p.ctx.feature_size
        t.add_row(
            p.name, p.block, p.source_type.rsplit(".", 1)[-1], shapes, f"{fh}x{fw}", f"{kh}x{kw}",
            "yes" if p.ctx.pe else "no", p.ctx.impl, p.ctx.init,
        )  # fmt: skip
    if plan.notes:
        t.caption = "; ".join(plan.notes)
    return t


def candidate_tables(c) -> list:
    """Stages, replaceable blocks, attention token mixers and (with a rule) its selection, of ``list_candidates``."""
    from rich.table import Table
    from rich.text import Text

    h, w = c.input_size
    stages = Table(title=f"{c.model} @ {h}x{w}: stages (fx trace: {c.traced_text})")
    for col in ("stage", "container", "blocks", "channels", "feature"):
        stages.add_column(col)
    for s in c.stages:
        feat = "x".join(map(str, s.feature_size or ())) or "?"
        stages.add_row(str(s.index), s.container, str(len(s.blocks)), str(s.channels), feat)
    blocks = Table(title=f"Replaceable blocks ({len(c.blocks)})")
    for col in ("module", "type", "replaceable by"):
        blocks.add_column(col)
    for name, typ, by in c.blocks:
        blocks.add_row(name, typ, ", ".join(by))
    attention = Table(title=f"Attention token mixers ({len(c.attention)})")
    attention.add_column("module")
    for name in c.attention:
        attention.add_row(name)
    out = [stages, blocks, attention]
    if c.selected is not None:
        sel = Table(title=f"Selected by the rule ({len(c.selected)})")
        for col in ("target", "block", "feature", "kernel", "PE", "stage"):
            sel.add_column(col)
        for t in c.selected:
            fh, fw = t.ctx.feature_size
            kh, kw = t.ctx.kernel_hw
            stage = "" if t.stage is None else str(t.stage)
            sel.add_row(t.name, t.block, f"{fh}x{fw}", f"{kh}x{kw}", "yes" if t.ctx.pe else "no", stage)
        if c.diagnostics:
            sel.caption = "\n".join(d.describe() for d in c.diagnostics)
        out.append(sel)
        if c.refused:  # what the rule selected but a block cannot replace, and why
            ref = Table(title=f"Selected but not replaceable ({len(c.refused)})")
            for col in ("module", "block", "outcome", "why"):
                ref.add_column(col)
            for x in c.refused:
                ref.add_row(Text(x.name), Text(x.block), "left out" if x.lenient else "error", Text(x.reason))
            out.append(ref)
    return out


def rules_table():
    """The bundled rules and their descriptions."""
    from rich.table import Table

    from .rule import list_rules, load_rule

    t = Table(title="Bundled rules")
    t.add_column("rule")
    t.add_column("description")
    for name in list_rules():
        try:
            desc = load_rule(name).description
        except ParcSurgeryError as e:
            desc = f"(invalid: {e})"
        t.add_row(name, desc)
    return t


def sources_table():
    """The MODEL forms (:func:`parc_surgery.sources.list_source_forms`)."""
    from rich.table import Table

    from .sources import list_source_forms

    t = Table(title="Model sources (MODEL; --model-arg KEY=VALUE passes arguments)")
    for col in ("form", "example", "builds"):
        t.add_column(col)
    for row in list_source_forms():
        t.add_row(*row)
    return t
