"""The conversion plan: every candidate resolved to a block, a feature size and options, and checked once.

:func:`plan_targets` takes each rule target's candidates (:func:`parc_surgery.match.select_candidates`),
applies the cross-target precedence (rule 2 of :mod:`parc_surgery.match`), and for each candidate builds
its :class:`PlannedTarget` (:func:`plan_target`: nothing is built yet) and asks the block whether it can
replace the module (:func:`target_problem`), once. Refusals are recorded (:class:`Refusal`): the engine
raises one :class:`UnsupportedTargetError` listing those that stand (:func:`refusal_error`) before
anything is touched, and ``list_candidates`` shows them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from .attention_form import AttentionForm, attention_form_or_error
from .attention_grid import resolve_grid
from .blocks import BlockContext, get_block_spec
from .errors import ParcSurgeryError, UnsupportedTargetError
from .match import Selection, TargetCandidates, TargetDiagnostic
from .probe import ProbeResult
from .residual import find_residual
from .rule import Rule
from .stages import Stage

__all__ = [
    "Plan",
    "PlanResult",
    "PlannedTarget",
    "Refusal",
    "plan_target",
    "plan_targets",
    "refusal_error",
    "target_problem",
    "token_grid",
]


@dataclass(frozen=True)
class PlannedTarget:
    name: str
    aliases: tuple[str, ...]
    block: str
    source_type: str
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    stage: int | None
    target_index: int
    ctx: BlockContext

    def to_dict(self) -> dict:
        c = self.ctx
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "block": self.block,
            "source_type": self.source_type,
            "in_shape": list(self.in_shape) if self.in_shape else None,
            "out_shape": list(self.out_shape) if self.out_shape else None,
            "stage": self.stage,
            "target_index": self.target_index,
            "feature_size": list(c.feature_size),
            "kernel_size": list(c.kernel_hw),
            "pe": c.pe,
            "impl": c.impl,
            "init": c.init,
            "width_mult": c.width_mult,
            "residual": c.residual.describe() if c.residual is not None else None,
            "attention": c.attention.describe() if hasattr(c.attention, "describe") else None,
            "options": {k: v for k, v in c.options.items() if isinstance(v, (int, float, str, bool, type(None)))},
        }


@dataclass(frozen=True)
class Plan:
    model: str
    rule: str
    input_size: tuple[int, int]
    targets: tuple[PlannedTarget, ...]
    stages: tuple[Stage, ...] = ()
    traced: bool = False
    trace_note: str = ""
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "rule": self.rule,
            "input_size": list(self.input_size),
            "traced": self.traced,
            "trace_note": self.trace_note,
            "targets": [t.to_dict() for t in self.targets],
            "notes": list(self.notes),
        }


def token_grid(model: nn.Module, n_tokens: int) -> tuple[tuple[int, int], int]:
    """(grid, prefix token count) for a token sequence of length ``n_tokens`` in ``model``.

    Uses timm's patch embedding ``grid_size`` where present, then the model's own ``num_prefix_tokens`` (timm's
    attribute) when the tokens after them are a square count, else the most square factorization of the tokens
    left after 0..8 prefix tokens.
    """
    grid, prefix, _ = _token_grid(model, n_tokens)
    return grid, prefix


def _token_grid(model: nn.Module, n_tokens: int) -> tuple[tuple[int, int], int, bool]:
    """:func:`token_grid` and whether the grid is the patch embedding's (else it was guessed)."""
    for m in model.modules():
        grid = getattr(m, "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) for g in grid):
            prefix = n_tokens - grid[0] * grid[1]
            if 0 <= prefix <= 16:
                return (int(grid[0]), int(grid[1])), prefix, True
    declared = getattr(model, "num_prefix_tokens", None)  # timm's convention (class / register tokens)
    if isinstance(declared, int) and not isinstance(declared, bool) and 0 <= declared <= 16:
        r = math.isqrt(n_tokens - declared) if n_tokens > declared else 0
        if r > 1 and r * r == n_tokens - declared:
            return (r, r), declared, True
    for prefix in range(0, 9):
        n = n_tokens - prefix
        r = math.isqrt(n)
        if n > 0 and r * r == n:
            return (r, r), prefix, False
    return (1, n_tokens), 0, False


def _feature_size(
    model: nn.Module, shape: tuple[int, ...] | None, module: nn.Module | None = None
) -> tuple[tuple[int, int], dict]:
    if shape is None:
        return (1, 1), {}
    if len(shape) == 4:
        if module is not None and _channels_last(module, shape):
            return (int(shape[1]), int(shape[2])), {}
        return (int(shape[2]), int(shape[3])), {}
    if len(shape) == 3:
        grid, prefix, patch = _token_grid(model, int(shape[1]))
        return grid, {"num_tokens": int(shape[1]), "num_prefix_tokens": prefix, "patch_grid": patch}
    return (1, 1), {}


def _channels_last(module: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether a 4-D input is (B, H, W, C): the module's first projection takes ``shape[-1]`` features."""
    from .blocks.token_mixer import infer_layout

    try:
        return infer_layout(module, shape) == "nhwc"
    except ParcSurgeryError:
        return False


def _context(
    model: nn.Module, rule: Rule, probe: ProbeResult, sel: Selection, *, pe: bool, impl: str | None, init: str | None
) -> BlockContext:
    target = rule.targets[sel.target_index]
    opts = target.options
    rec = probe.calls[sel.name]
    mod = model.get_submodule(sel.name)
    feat, tokens = _feature_size(model, rec.in_shape, mod)
    spec = get_block_spec(target.block)
    residual = None
    if spec.uses_residual and not isinstance(mod, nn.Conv2d):
        residual = find_residual(mod)  # the block's fx graph, read once per target
    form = None
    if spec.uses_attention and sel.name in probe.attention:
        form = attention_form_or_error(model, probe, sel.name)  # what the attention computes, read once
    if isinstance(form, AttentionForm):  # sized from the attention's own tokens ((N, B, C) for some MHA)
        try:
            n = form.num_tokens
            feat, prefix, patch = resolve_grid(form, _token_grid(model, n) if n else ((1, 1), 0, False))
            tokens = {"num_tokens": n, "num_prefix_tokens": prefix, "patch_grid": patch} if n else {}
        except UnsupportedTargetError as e:
            form = e
    return BlockContext(
        feature_size=feat,
        kernel_size=None if opts.kernel_size == "auto" else tuple(opts.kernel_size),
        pe=pe,
        impl=impl or opts.impl,
        init=init or opts.init,
        width_mult=opts.width_mult,
        options=dict(opts.block_options),
        source_in_shape=rec.in_shape,
        source_out_shape=rec.out_shape,
        attention=form,
        residual=residual,
        **tokens,
    )


def plan_target(
    model: nn.Module,
    rule: Rule,
    probe: ProbeResult,
    sel: Selection,
    *,
    pe: bool = True,
    impl: str | None = None,
    init: str | None = None,
) -> PlannedTarget:
    """One selection resolved to its block, feature size and options (nothing is checked or built)."""
    cls = type(model.get_submodule(sel.name))
    rec = probe.calls[sel.name]
    return PlannedTarget(
        sel.name,
        sel.aliases,
        rule.targets[sel.target_index].block,
        f"{cls.__module__}.{cls.__qualname__}",
        rec.in_shape,
        rec.out_shape,
        sel.stage,
        sel.target_index,
        _context(model, rule, probe, sel, pe=pe, impl=impl, init=init),
    )


@dataclass(frozen=True)
class Refusal:
    """A candidate a block cannot replace: who refused it and why (:func:`target_problem`)."""

    name: str
    block: str
    target_index: int
    reason: str
    lenient: bool  # the block skips what it cannot replace: left out with a note, not an error

    def describe(self) -> str:
        fate = "left out" if self.lenient else "cannot be replaced"
        return f"{self.name} ({self.block}, targets[{self.target_index}]): {fate}: {self.reason}"


@dataclass
class PlanResult:
    """What :func:`plan_targets` decided: the checked targets, the refusals that stand, the notes."""

    targets: list[PlannedTarget]
    refused: list[Refusal]  # modules no target could replace (the conversion fails on them)
    skipped: list[Refusal]  # refused by a lenient block and taken by no other target (left out)
    diagnostics: list[TargetDiagnostic]
    notes: list[str]


def _overlaps(name: str, others) -> bool:
    return any(name == o or name.startswith(o + ".") or o.startswith(name + ".") for o in others)


def plan_targets(
    model: nn.Module,
    rule: Rule,
    probe: ProbeResult,
    candidates: list[TargetCandidates],
    *,
    impl: str | None = None,
    init: str | None = None,
) -> PlanResult:
    """Plan and check every candidate once, applying precedence rule 2 of :mod:`parc_surgery.match`.

    Targets are taken in rule order; within a target, candidates in call order. A candidate overlapping a
    module already taken is skipped; otherwise it is planned (:func:`plan_target`) and checked
    (:func:`target_problem`). Accepted: it is taken. Refused by a lenient block: left out (a later target may
    still take it). Refused otherwise: left to the later targets, and recorded as a refusal if none takes it.
    ``pe: first`` gives the PE to the first *accepted* target of each stage (per rule target).
    """
    taken: list[str] = []
    targets: list[PlannedTarget] = []
    pending: dict[str, tuple[Refusal, TargetDiagnostic]] = {}  # refused by a strict block, left to later targets
    skipped: dict[str, Refusal] = {}
    first_seen: set[tuple[int, int]] = set()
    diags = []
    for tc in candidates:
        diag = tc.diagnostic
        mode = rule.targets[tc.target_index].options.pe
        spec = get_block_spec(tc.block)
        clash = [s for s in tc.selections if _overlaps(s.name, taken)]
        if clash:
            diag.notes.append(f"{len(clash)} already taken by an earlier target")
        left_out: list[str] = []
        for sel in tc.selections:
            if _overlaps(sel.name, taken):
                continue
            key = (tc.target_index, sel.stage if sel.stage is not None else -1 - len(first_seen))
            pe = mode == "all" or (mode == "first" and key not in first_seen)
            t = plan_target(model, rule, probe, sel, pe=pe, impl=impl, init=init)
            why = target_problem(model, t, probe)
            if why is None:
                targets.append(t)
                taken.append(sel.name)
                first_seen.add(key)
                diag.selected += 1
                pending.pop(sel.name, None)
                skipped.pop(sel.name, None)
            elif spec.skip_unsupported:  # final, also for a module an earlier strict target refused
                earlier = pending.pop(sel.name, None)
                reason = why + (f" (and {earlier[0].reason})" if earlier else "")
                skipped[sel.name] = Refusal(sel.name, tc.block, tc.target_index, reason, True)
                left_out.append(reason)
            else:
                pending.setdefault(sel.name, (Refusal(sel.name, tc.block, tc.target_index, why, False), diag))
        if left_out:
            diag.notes.append(f"{len(left_out)} left out (the block cannot replace them): " + "; ".join(left_out[:3]))
        diags.append(diag)
    # refused modules no later target took stay with their first target: the conversion reports why
    refused = []
    for name, (r, diag) in pending.items():
        if not _overlaps(name, taken):
            refused.append(r)
            diag.selected += 1
    notes = [f"targets[{d.target_index}] selected nothing: {d.describe()}" for d in diags if d.selected == 0]
    gone = {r.name for r in refused}
    return PlanResult(targets, refused, [r for r in skipped.values() if r.name not in gone], diags, notes)


def target_problem(model: nn.Module, t: PlannedTarget, probe: ProbeResult) -> str | None:
    """Why ``t``'s block cannot replace its module (``None`` if it can); never raises.

    Refused for any block: a module whose output is not one tensor (a tuple / dict: the replacement returns one
    tensor) and a shared module run at several input shapes. Otherwise the block's ``check_source`` decides.
    """
    mod = model.get_submodule(t.name)
    rec = probe.calls[t.name]
    kind = t.source_type.rsplit(".", 1)[-1]
    if rec.out_tensor and not all(rec.out_tensor) and t.ctx.attention is None:  # attention blocks return it
        return (
            f"{t.name} ({kind}): the module returns a tuple / list / dict, not one tensor; a replacement block "
            "returns one tensor, so its callers would break. Exclude it."
        )
    if len(set(rec.in_shapes)) > 1:
        return (
            f"{t.name} ({kind}): the module is shared and runs at {len(rec.in_shapes)} call sites with different "
            f"input shapes {sorted(set(rec.in_shapes), key=str)}; a ParC block is sized for one feature size. "
            "Unshare it or exclude it."
        )
    try:
        get_block_spec(t.block).check_source(mod, t.ctx)
    except ParcSurgeryError as e:
        return f"{t.name}: {e}"
    except Exception as e:  # a block's check failing unexpectedly is still the target's problem
        return f"{t.name}: block {t.block!r} cannot check this {kind} ({type(e).__name__}: {e})"
    return None


def refusal_error(refused: list[Refusal], n_targets: int) -> UnsupportedTargetError:
    """One :class:`UnsupportedTargetError` listing every refusal that stands; nothing was changed."""
    total = n_targets + len(refused)
    return UnsupportedTargetError(
        f"{len(refused)} of {total} selected module(s) cannot be replaced; nothing was changed:\n  - "
        + "\n  - ".join(r.reason for r in refused)
        + "\nNarrow the rule (exclude / name / type) to leave them out; see parc_surgery.list_candidates(model)."
    )
