"""The one place that orchestrates a conversion: probe -> stages -> match -> plan -> rewrite -> audit -> validate.

``convert(model, rule)`` never touches the user's model: it works on a deep copy. ``match`` finds each rule
target's candidates (pure sets); ``plan`` plans and checks every candidate once, recording refusals; only
after every target has been planned and checked does ``rewrite`` build the replacement blocks and swap them in.
``list_candidates(model, rule)`` is the discovery tool every "nothing matched" error points to. The phases
before any change (copy, probe, trace, match, plan) are :mod:`parc_surgery.survey`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .candidates import Candidates
from .carry import CarryRecord
from .errors import ConfigError, TraceError, UnsupportedTargetError, ValidationError
from .flops import count_macs, count_macs_impls, count_params
from .inputs import example_input, resolve_input_size
from .module_state import module_state_kept
from .plan import Plan
from .preserved import check_preserved
from .probe import get_timm_leaves
from .report import Check, Report, TargetReport
from .rewrite import apply_plan, rewrite_notes
from .rule import Rule, load_rule
from .survey import (
    check_model,
    checked_plan,
    copy_model,
    guard_phase,
    list_replaceable,
    plan_survey,
    survey_model,
    user_hooks_detached,
)
from .validate import eval_forward, second_size, validate_model
from .vocab import IMPLS, INITS

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
    # the user's model this was converted from (a reference, never modified): heal()'s default teacher
    original: nn.Module | None = field(default=None, repr=False, compare=False)


def get_model_name(model: nn.Module) -> str:
    """The name the report uses: timm's architecture name, else the model's class name."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


def list_candidates(model: nn.Module, rule: RuleLike | None = None, *, input_size=None) -> Candidates:
    """Discovery: the model's stages, replaceable blocks, attention token mixers and, with a rule, its selection.

    Never modifies ``model`` (it probes a deep copy). A rule that selects nothing is reported in the
    diagnostics here rather than raised.
    """
    check_model(model)
    r = load_rule(rule) if rule is not None else None
    size = resolve_input_size(model, input_size, r)
    work = copy_model(model)
    with user_hooks_detached(work), guard_phase("probing the model", TraceError):
        survey = survey_model(work, size)
    name = get_model_name(model)
    selected, diags, refused = None, (), ()
    if r is not None:
        with guard_phase("selecting the rule's targets", UnsupportedTargetError):
            result = plan_survey(r, survey)
            selected, diags = tuple(result.targets), tuple(result.diagnostics)
            refused = (*result.refused, *result.skipped)
    return Candidates(
        name,
        size,
        tuple(survey.stages),
        tuple(list_replaceable(survey.work)),
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
    check_model(model)
    if impl is not None and impl not in IMPLS:
        raise ConfigError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if init is not None and init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    r = load_rule(rule)
    size = resolve_input_size(model, input_size, r)
    name = model_name or get_model_name(model)
    work = copy_model(model)  # everything happens on this copy; the user's model is never run or touched
    with user_hooks_detached(work), guard_phase("converting the model", UnsupportedTargetError):
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
    with guard_phase("probing the model", TraceError):
        survey = survey_model(work, size)
    with guard_phase("planning the conversion", UnsupportedTargetError):
        planned = checked_plan(r, survey, name, impl=impl, init=init)
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
    leaves = (*get_timm_leaves()[0], *survey.leaf_types)
    was_leaf = [t.name for t in targets if leaves and isinstance(work.get_submodule(t.name), tuple(leaves))]

    carry = apply_plan(work, targets, seed=seed)
    notes.extend(rewrite_notes(work, targets))
    leaf_types = tuple({*survey.leaf_types, *(type(work.get_submodule(n)) for n in was_leaf)})

    # one meta pass for both ParC formulations (spatial: the papers' count; fft: Fast-ParC)
    after_by_impl, why_a = _macs(work, size, fn=count_macs_impls) if count else (None, "")
    after, after_fft = (after_by_impl["spatial"], after_by_impl["fft"]) if after_by_impl else (None, None)
    with guard_phase("checking that nothing of the input was lost", ValidationError):
        checks: list[Check] = [check_preserved(original, work, targets, carry)]  # always on
    if validate:
        with guard_phase("validating the converted model", ValidationError), module_state_kept(work):
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
    conv = Conversion(work, plan, report, carry, r, original=original)
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
