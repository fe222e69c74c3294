"""The one place that orchestrates a conversion: probe -> stages -> match -> plan -> rewrite -> audit -> validate.

``convert(model, rule)`` never touches the user's model: it works on a deep copy. ``match`` finds each rule
target's candidates (pure sets); ``plan`` plans and checks every candidate once, recording refusals; only
after every target has been planned and checked does ``rewrite`` build the replacement blocks and swap them in.
``list_candidates(model, rule)`` is the discovery tool every "nothing matched" error points to.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import CarryRecord, get_block_spec, list_blocks
from .candidates import Candidates
from .errors import (
    ConfigError,
    NoMatchError,
    ParcSurgeryError,
    TraceError,
    UnsupportedTargetError,
    ValidationError,
)
from .flops import count_macs, count_macs_impls, count_params
from .match import select_candidates
from .module_state import module_state_kept
from .ops import ParC
from .plan import Plan, PlanResult, plan_targets, refusal_error
from .preserved import check_preserved
from .probe import ProbeResult, _timm_leaves, example_input, probe_model, trace_model
from .report import Check, Report, TargetReport
from .rewrite import apply_plan, rewrite_notes
from .rule import Rule, load_rule
from .stages import Stage, find_stages
from .types import type_name_matches
from .validate import eval_forward, second_size, validate_model

__all__ = ["Candidates", "Conversion", "convert", "get_model_name", "list_candidates", "resolve_input_size"]

RuleLike = Rule | str | os.PathLike | dict


@dataclass
class Conversion:
    """The result of :func:`convert`: the new model, the plan that built it and the audit report."""

    model: nn.Module
    plan: Plan
    report: Report
    carry: dict[str, CarryRecord] = field(default_factory=dict)
    rule: Rule | None = None


def get_model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


def _as_hw(value, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{what} must be a positive int or (H, W) of positive ints, got {value!r}")


def resolve_input_size(model: nn.Module, input_size=None, rule: Rule | None = None) -> tuple[int, int]:
    """The input size to plan at: given, else the rule's, else timm's ``pretrained_cfg``."""
    if input_size is not None:
        return _as_hw(input_size, "input_size")
    if rule is not None and rule.input_size is not None:
        return _as_hw(rule.input_size, "rule input_size")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return _as_hw(tuple(cfg["input_size"])[-2:], "pretrained_cfg input_size")
    raise ConfigError(
        f"input_size is needed for a {type(model).__name__} (it has no timm pretrained_cfg): "
        "pass input_size=(H, W) (CLI: --input-size H W)"
    )


@contextlib.contextmanager
def _guard(what: str, error: type[ParcSurgeryError]):
    """Turn an unexpected exception of one phase into ``error`` saying which phase met it (user errors pass)."""
    try:
        yield
    except (ParcSurgeryError, MemoryError):
        raise
    except Exception as e:
        raise error(
            f"{what} failed: {type(e).__name__}: {e}. The input model is unchanged; this model / rule combination "
            "is not supported (please report it with the model and rule)."
        ) from e


def _copy(model: nn.Module) -> nn.Module:
    with _guard("deep-copying the model (the engine works on a copy, never on the model itself)", ConfigError):
        return copy.deepcopy(model)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _replaceable(model: nn.Module) -> list[tuple[str, str, tuple[str, ...]]]:
    out = []
    blocks = [(b, get_block_spec(b).replaces) for b in list_blocks()]
    for name, mod in model.named_modules():
        if not name:
            continue
        hits = tuple(b for b, reps in blocks if any(type_name_matches(type(mod), r) for r in reps))
        if hits:
            out.append((name, type(mod).__name__, hits))
    return out


@dataclass
class _Survey:
    work: nn.Module
    size: tuple[int, int]
    x: torch.Tensor
    probe: ProbeResult
    stages: list[Stage]
    traced: bool
    trace_note: str
    leaf_types: tuple[type, ...] = ()


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextlib.contextmanager
def _user_hooks_detached(model: nn.Module):
    """Detach the (deep-copied) user hooks while the engine runs the copy; put them back afterwards.

    The copy shares hook *functions* with the user's model, so running them would touch the user's state.
    """
    stash = []
    for m in model.modules():
        saved = {a: dict(getattr(m, a)) for a in _HOOK_DICTS if getattr(m, a, None)}
        if saved:
            stash.append((m, saved))
            for a in saved:
                getattr(m, a).clear()
    try:
        yield
    finally:
        for m, saved in stash:
            for a, d in saved.items():
                getattr(m, a).update(d)


def _survey(work: nn.Module, size: tuple[int, int]) -> _Survey:
    """Probe and trace ``work`` (the engine's own copy of the user's model)."""
    x = example_input(work, size)
    probe = probe_model(work, x)
    gm, why = trace_model(work)
    leaves: tuple[type, ...] = ()
    if gm is None:  # retry with the replaceable blocks as leaves (their own forwards may not trace)
        leaves = tuple({type(work.get_submodule(n)) for n, _, _ in _replaceable(work)})
        if leaves and trace_model(work, leaves)[0] is not None:
            gm, why = True, f"traced with {len(leaves)} candidate block type(s) as leaves"
    return _Survey(work, size, x, probe, find_stages(work, probe), gm is not None, why, leaves)


def _no_match(rule: Rule, survey: _Survey, diags, model_name: str, extra: str = "") -> NoMatchError:
    lines = "\n  ".join(d.describe() for d in diags)
    return NoMatchError(
        f"rule {rule.name!r} selected nothing in {model_name} at input {survey.size[0]}x{survey.size[1]}"
        f"{extra}:\n  {lines}\n"
        f"The model has {len(survey.stages)} stage(s), {len(survey.probe.attention)} detected attention "
        f"module(s). Run parc_surgery.list_candidates(model, rule) (CLI: parc-convert MODEL --rule RULE --inspect) "
        "to see its stages, replaceable blocks and what the rule selects."
    )


def _plan(rule: Rule, survey: _Survey, *, impl=None, init=None) -> PlanResult:
    """match (each target's candidates) -> plan (each candidate planned and checked once)."""
    candidates = select_candidates(survey.work, rule, survey.probe, survey.stages)
    return plan_targets(survey.work, rule, survey.probe, candidates, impl=impl, init=init)


def _checked_plan(rule: Rule, survey: _Survey, model_name: str, *, impl, init) -> PlanResult:
    """:func:`_plan`, raising when a refusal stands or nothing was selected."""
    result = _plan(rule, survey, impl=impl, init=init)
    if result.refused:
        raise refusal_error(result.refused, len(result.targets))
    if not result.targets:
        n_parc = sum(isinstance(m, ParC) for m in survey.work.modules())
        extra = (
            f" (the model looks already converted: it holds {n_parc} ParC layer(s); converting it again is "
            "refused, convert the original model instead)"
            if n_parc
            else ""
        )
        raise _no_match(rule, survey, result.diagnostics, model_name, extra)
    return result


def list_candidates(model: nn.Module, rule: RuleLike | None = None, *, input_size=None) -> Candidates:
    """Discovery: the model's stages, replaceable blocks, attention token mixers and, with a rule, its selection.

    Never modifies ``model`` (it probes a deep copy). A rule that selects nothing is reported in the
    diagnostics here rather than raised.
    """
    _check_model(model)
    r = load_rule(rule) if rule is not None else None
    size = resolve_input_size(model, input_size, r)
    work = _copy(model)
    with _user_hooks_detached(work), _guard("probing the model", TraceError):
        survey = _survey(work, size)
    name = get_model_name(model)
    selected, diags, refused = None, (), ()
    if r is not None:
        with _guard("selecting the rule's targets", UnsupportedTargetError):
            result = _plan(r, survey)
            selected, diags = tuple(result.targets), tuple(result.diagnostics)
            refused = (*result.refused, *result.skipped)
    return Candidates(
        name,
        size,
        tuple(survey.stages),
        tuple(_replaceable(survey.work)),
        survey.probe.attention,
        survey.traced,
        survey.trace_note,
        selected,
        tuple(diags),
        survey.probe.other_attention,
        refused,
    )


def _macs(model, size, fn=count_macs, **kw) -> tuple[Any, str]:
    try:  # on the meta device: shapes only, nothing is computed, the model is not moved
        return fn(model, size, device="meta", **kw), ""
    except Exception as e:  # counting must never sink a conversion; the report says why
        return None, f"MACs not counted: {type(e).__name__}: {e}"


def convert(
    model: nn.Module,
    rule: RuleLike,
    *,
    input_size: int | tuple[int, int] | None = None,
    impl: str | None = None,
    init: str | None = None,
    seed: int = 0,
    validate: bool = True,
    count: bool = True,
    strict: bool = True,
    model_name: str | None = None,
) -> Conversion:
    """Convert ``model`` with ``rule`` and return a :class:`Conversion` (new model, plan, report).

    Args:
        model: any ``nn.Module`` (timm, torchvision or your own); never modified.
        rule: a bundled rule name (``parc_surgery.list_rules()``), a YAML path, a dict or a :class:`Rule`.
        input_size: (H, W) or one int; default: the rule's, else timm's ``pretrained_cfg`` input size.
        impl: override every target's ParC implementation (``spatial`` / ``fft`` / ``auto``).
        init: override every target's initialisation (``warm_start`` / ``reference``).
        seed: seeds the new weights: the same model, rule and seed give bit-identical weights.
        validate: run the checks of :mod:`parc_surgery.validate` and record them in the report. The ``preserved``
            check (:mod:`parc_surgery.preserved`: every input tensor kept bit-identical or in a carry record) runs
            always.
        count: count MACs before/after (FlopCounterMode, spatial formulation; FFT too).
        strict: raise :class:`ValidationError` (carrying ``.conversion``) if a check fails.
        model_name: name used in the report (default: timm's architecture name or the class name).

    Raises:
        RuleError, NoMatchError, UnsupportedTargetError, TraceError, ValidationError, ConfigError.
    """
    _check_model(model)
    if impl is not None and impl not in ("spatial", "fft", "auto"):
        raise ConfigError(f"impl must be 'spatial', 'fft' or 'auto', got {impl!r}")
    if init is not None and init not in ("warm_start", "reference"):
        raise ConfigError(f"init must be 'warm_start' or 'reference', got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    r = load_rule(rule)
    size = resolve_input_size(model, input_size, r)
    name = model_name or get_model_name(model)
    work = _copy(model)  # everything happens on this copy; the user's model is never run or touched
    with _user_hooks_detached(work), _guard("converting the model", UnsupportedTargetError):
        return _convert(
            work,
            r,
            size,
            name,
            original=model,
            impl=impl,
            init=init,
            seed=seed,
            validate=validate,
            count=count,
            strict=strict,
        )


def _convert(work, r, size, name, *, original, impl, init, seed, validate, count, strict) -> Conversion:
    with _guard("probing the model", TraceError):
        survey = _survey(work, size)
    with _guard("planning the conversion", UnsupportedTargetError):
        planned = _checked_plan(r, survey, name, impl=impl, init=init)
    targets, notes = planned.targets, list(planned.notes)
    if planned.skipped:
        notes.append(
            f"{len(planned.skipped)} selected module(s) left out (the lenient block cannot replace them): "
            + "; ".join(f"{x.name}: {x.reason}" for x in planned.skipped[:5])
        )

    # reference outputs and counts of the original, taken on the copy before any swap
    x2 = example_input(work, second_size(size))
    ref = ref2 = None
    if validate:
        ref = survey.probe.raw_output  # the probe ran the unconverted copy in eval mode without grad
        with module_state_kept(work):  # a forward at another size may change a stateful model
            ref2 = eval_forward(work, x2)
    params_before = count_params(work)
    per_target_before = {t.name: count_params(work.get_submodule(t.name)) for t in targets}
    before, why_b = _macs(work, size) if count else (None, "")

    # modules that were fx leaves (timm's not-traceable modules) stay leaves once replaced
    leaves = (*_timm_leaves()[0], *survey.leaf_types)
    was_leaf = [t.name for t in targets if leaves and isinstance(work.get_submodule(t.name), tuple(leaves))]

    carry = apply_plan(work, targets, seed=seed)
    notes.extend(rewrite_notes(work, targets))
    leaf_types = tuple({*survey.leaf_types, *(type(work.get_submodule(n)) for n in was_leaf)})

    # one meta pass for both ParC formulations (spatial: the papers' count; fft: Fast-ParC)
    after_by_impl, why_a = _macs(work, size, fn=count_macs_impls) if count else (None, "")
    after, after_fft = (after_by_impl["spatial"], after_by_impl["fft"]) if after_by_impl else (None, None)
    with _guard("checking that nothing of the input was lost", ValidationError):
        checks: list[Check] = [check_preserved(original, work, targets, carry)]  # always on
    if validate:
        with _guard("validating the converted model", ValidationError), module_state_kept(work):
            checks += validate_model(
                work,
                targets,
                x=survey.x,
                x2=x2,
                ref=ref,
                ref2=ref2,
                original_traced=survey.traced,
                leaf_types=leaf_types,
            )
    plan = Plan(
        name, r.name, size, tuple(targets), tuple(survey.stages), survey.traced, survey.trace_note, tuple(notes)
    )
    treports = []
    for t in targets:
        rec = carry[t.name]
        treports.append(
            TargetReport(
                name=t.name,
                block=t.block,
                source_type=t.source_type,
                params_before=per_target_before[t.name],
                params_after=count_params(work.get_submodule(t.name)),
                macs_before=before.macs_of(t.name) if before else None,
                macs_after=after.macs_of(t.name) if after else None,
                kept=len(rec.kept),
                transformed=len(rec.transformed),
                new=len(rec.new),
                dropped=len(rec.dropped),
                carry=rec.to_dict(),
            )
        )
    uncounted = {}
    for c in (before, after):
        if c is not None:
            uncounted.update(c.uncounted)
    report_notes = list(notes) + [w for w in (why_b, why_a) if w]
    if not survey.traced:
        report_notes.append(f"torch.fx could not trace the model ({survey.trace_note}); forward hooks were used")
    report = Report(
        model=name,
        rule=r.name,
        input_size=size,
        params_before=params_before,
        params_after=count_params(work),
        macs_before=before.macs if before else None,
        macs_after=after.macs if after else None,
        macs_after_fft=after_fft.macs if after_fft else None,
        targets=tuple(treports),
        checks=tuple(checks),
        uncounted_ops=uncounted,
        notes=tuple(report_notes),
    )
    conv = Conversion(work, plan, report, carry, r)
    if strict and not report.passed:
        failed = [c for c in checks if not c.passed]
        err = ValidationError(
            f"{len(failed)} check(s) failed on the converted {name}: "
            + "; ".join(f"{c.name}: {c.detail}" for c in failed)
            + ". The input model is unchanged; pass strict=False to get the conversion anyway."
        )
        err.conversion = conv
        raise err
    return conv
