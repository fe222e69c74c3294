"""Finding a rule's targets in a model: type, qualified name, stage fraction, detected attention.

Precedence (one rule, documented once):

1. Within a target, a module is selected when it meets *every* criterion given under ``select``
   (type AND name AND stages AND attention) and neither it nor a module around it meets every criterion
   given under ``exclude`` (excluding a module excludes everything inside it).
2. Targets are tried in file order; a module already taken by an earlier target, or inside or around
   one, is not taken again (the earlier target wins). A module the target's block refuses (its
   ``check_source``) is left to the later targets; if none of them takes it, it stays with its first
   target (so the conversion reports the refusal), unless a target whose block skips what it cannot
   replace (a lenient, generic fallback block) selected it too, which leaves it out with a note. This rule
   needs the blocks' verdicts, so :func:`parc_surgery.plan.plan_targets` applies it, planning and checking
   each candidate once; this module only finds each target's candidates (rules 1, 3, 4).
3. Within a target, when a module and one of its descendants are both selected, the outermost wins.
4. A stage selection ``fraction: f`` takes the last ``round(n * f)`` blocks (at least one) of each
   named stage; the stage's first block is left out when it changes the feature shape (the strided /
   widening block), unless ``include_first: true``. It matches those blocks and every module inside
   them: alone it selects the blocks (rule 3), and together with ``type: Conv2d`` (or a name) it selects
   the convs (the matching modules) *inside* the blocks of those stage fractions.

Names match exactly, as shell globs (``*``, ``?``, ``[...]``), or as full regular expressions with a
``re:`` prefix. Types match a class name or dotted path anywhere in the module's MRO (subclasses
included) unless ``exact: true``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

from torch import nn

from .ops import ParC
from .probe import ProbeResult
from .rule import Rule, Selector
from .stages import Stage
from .types import type_name_matches

__all__ = ["Selection", "TargetCandidates", "TargetDiagnostic", "count_from_fraction", "select_candidates"]


@dataclass(frozen=True)
class Selection:
    name: str
    aliases: tuple[str, ...]
    target_index: int
    stage: int | None  # index of the stage the module is a block of
    position: int | None  # its index within that stage


@dataclass
class TargetDiagnostic:
    """Why a target selected what it did (or nothing): per-criterion counts, notes."""

    target_index: int
    block: str
    criteria: list[tuple[str, int]] = field(default_factory=list)  # (criterion description, modules matching)
    selected: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = ", ".join(f"{c} -> {n} module(s)" for c, n in self.criteria) or "no criteria"
        s = f"targets[{self.target_index}] (block {self.block!r}): {parts}; selected {self.selected}"
        if self.notes:
            s += " (" + "; ".join(self.notes) + ")"
        return s


def count_from_fraction(n: int, fraction) -> int:
    """How many trailing blocks of an ``n``-block stage a fraction selects: round half up, at least 1."""
    if n <= 0:
        return 0
    return max(1, min(n, math.floor(n * fraction + 0.5)))


def _name_matches(pattern: str, names: tuple[str, ...]) -> bool:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.fullmatch(n) for n in names)
    if any(ch in pattern for ch in "*?["):
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)
    return pattern in names


def _type_matches(mod: nn.Module, type_name: str, exact: bool) -> bool:
    if exact:
        cls = type(mod)
        return type_name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
    return type_name_matches(type(mod), type_name)


def _resolve_stages(ref, stages: list[Stage]) -> list[Stage]:
    if isinstance(ref, int):
        if -len(stages) <= ref < len(stages):
            return [stages[ref]]
        return []
    return [s for s in stages if s.container == ref or s.container.split("[")[0] == ref]


def _stage_members(sel: Selector, stages: list[Stage]) -> dict[str, tuple[int, int]]:
    members: dict[str, tuple[int, int]] = {}
    for spec in sel.stages:
        for ref in spec.stages:
            for st in _resolve_stages(ref, stages):
                k = count_from_fraction(len(st.blocks), spec.fraction)
                start = len(st.blocks) - k
                if start == 0 and st.first_changes_shape and not spec.include_first:
                    start = 1
                for pos in range(start, len(st.blocks)):
                    members[st.blocks[pos]] = (st.index, pos)
    return members


def _criteria(sel: Selector, modules: dict[str, nn.Module], probe: ProbeResult, stages: list[Stage]):
    """(description, set of matching canonical names, count shown) for each criterion given in ``sel``.

    A stage selection matches the selected blocks *and every module inside them*: with no other criterion the
    blocks win (rule 3, outermost), with ``type: Conv2d`` (or a name pattern) the modules inside them that match.
    """
    out = []
    if sel.types:
        hit = {n for n, m in modules.items() if any(_type_matches(m, t, sel.exact) for t in sel.types)}
        out.append((f"type {list(sel.types)}" + (" (exact)" if sel.exact else ""), hit, len(hit)))
    if sel.names:
        hit = {n for n in modules if any(_name_matches(p, probe.aliases.get(n, (n,))) for p in sel.names)}
        out.append((f"name {list(sel.names)}", hit, len(hit)))
    if sel.stages:
        members = set(_stage_members(sel, stages)) & set(modules)
        prefixes = tuple(f"{m}." for m in members)
        hit = members | {n for n in modules if n.startswith(prefixes)} if members else set()
        desc = "; ".join(
            f"stage {list(s.stages)} last {s.fraction}" + (" incl. first" if s.include_first else "")
            for s in sel.stages
        )
        out.append((f"stages [{desc}] of {len(stages)} found (blocks)", hit, len(members)))
    if sel.attention:
        hit = set(probe.attention) & set(modules)
        out.append(("attention (detected by tracing)", hit, len(hit)))
    return out


@dataclass
class TargetCandidates:
    """One rule target's candidates: the modules it selects on its own, outermost first, in call order."""

    target_index: int
    block: str
    selections: list[Selection]
    diagnostic: TargetDiagnostic


def _parents(name: str):
    """``a.b.c`` -> ``a.b``, ``a``."""
    while "." in name:
        name = name.rsplit(".", 1)[0]
        yield name


def _holds_parc(mod: nn.Module) -> bool:
    return any(isinstance(m, ParC) for m in mod.modules())


def select_candidates(model: nn.Module, rule: Rule, probe: ProbeResult, stages: list[Stage]) -> list[TargetCandidates]:
    """Each target's candidates in ``model`` (precedence rules 1, 3 and 4; rule 2 is applied by the plan).

    Pure: nothing is checked or built. Modules that never ran in the probe's forward, and modules that already
    hold ParC layers (a converted model), are left out with a note in the target's diagnostic.
    """
    modules: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if n}
    stage_of: dict[str, tuple[int, int]] = {}
    for st in stages:
        for pos, b in enumerate(st.blocks):
            stage_of[b] = (st.index, pos)
    out: list[TargetCandidates] = []
    for ti, target in enumerate(rule.targets):
        diag = TargetDiagnostic(ti, target.block)
        crit = _criteria(target.select, modules, probe, stages)
        diag.criteria = [(d, k) for d, _, k in crit]
        chosen = set(modules)
        for _, hit, _ in crit:
            chosen &= hit
        if target.exclude is not None and not target.exclude.is_empty:
            excluded = set(modules)
            for _, hit, _ in _criteria(target.exclude, modules, probe, stages):
                excluded &= hit
            # excluding a module excludes everything inside it
            excluded |= {n for n in chosen if any(n.startswith(e + ".") for e in excluded)}
            if chosen & excluded:
                diag.notes.append(f"{len(chosen & excluded)} excluded")
            chosen -= excluded
        uncalled = sorted(n for n in chosen if not probe.called(n))
        if uncalled:
            diag.notes.append(f"{len(uncalled)} never ran in the forward pass: {', '.join(uncalled[:3])}")
            chosen -= set(uncalled)
        ordered = sorted(chosen, key=lambda n: probe.calls[n].order)
        # outermost wins within a target
        outer = [n for n in ordered if not any(n.startswith(o + ".") for o in ordered if o != n)]
        done = [n for n in outer if _holds_parc(modules[n])]
        if done:
            diag.notes.append(f"{len(done)} already hold ParC layers and were left as they are")
        sels = []
        for n in outer:
            if n in done:
                continue
            st = stage_of.get(n) or next((stage_of[p] for p in _parents(n) if p in stage_of), None)
            sels.append(Selection(n, probe.aliases.get(n, (n,)), ti, st[0] if st else None, st[1] if st else None))
        out.append(TargetCandidates(ti, target.block, sels, diag))
    return out
