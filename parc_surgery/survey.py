"""The survey of a model before any change: copy it, probe and trace the copy, find stages, plan the rule's targets.

:func:`parc_surgery.convert` and :func:`parc_surgery.list_candidates` both start here: the engine works on a deep
copy (:func:`copy_model`) with the user's hooks detached (:func:`user_hooks_detached`), probes and traces it
(:func:`survey_model`), then matches and plans each rule target once (:func:`plan_survey`,
:func:`checked_plan`). :func:`guard_phase` turns an unexpected failure of one phase into the package's error
naming that phase.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import get_block_spec, list_blocks
from .errors import ConfigError, NoMatchError, ParcSurgeryError
from .inputs import example_input
from .match import select_candidates
from .ops import ParC
from .plan import PlanResult, plan_targets, refusal_error
from .probe import ProbeResult, probe_model, trace_model
from .rule import Rule
from .stages import Stage, find_stages
from .types import type_name_matches

__all__ = [
    "Survey",
    "check_model",
    "checked_plan",
    "copy_model",
    "guard_phase",
    "list_replaceable",
    "no_match_error",
    "plan_survey",
    "survey_model",
    "user_hooks_detached",
]


@contextlib.contextmanager
def guard_phase(what: str, error: type[ParcSurgeryError]):
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


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``: everything the engine does happens on it."""
    with guard_phase("deep-copying the model (the engine works on a copy, never on the model itself)", ConfigError):
        return copy.deepcopy(model)


def check_model(model) -> None:
    """Raise :class:`ConfigError` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def list_replaceable(model: nn.Module) -> list[tuple[str, str, tuple[str, ...]]]:
    """(module name, class name, blocks that replace it) for every module some registered block replaces."""
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
class Survey:
    """A probed, traced copy of the model at one input size (the engine's starting point)."""

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
def user_hooks_detached(model: nn.Module):
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


def survey_model(work: nn.Module, size: tuple[int, int]) -> Survey:
    """Probe and trace ``work`` (the engine's own copy of the user's model)."""
    x = example_input(work, size)
    probe = probe_model(work, x)
    gm, why = trace_model(work)
    leaves: tuple[type, ...] = ()
    if gm is None:  # retry with the replaceable blocks as leaves (their own forwards may not trace)
        leaves = tuple({type(work.get_submodule(n)) for n, _, _ in list_replaceable(work)})
        if leaves and trace_model(work, leaves)[0] is not None:
            gm, why = True, f"traced with {len(leaves)} candidate block type(s) as leaves"
    return Survey(work, size, x, probe, find_stages(work, probe), gm is not None, why, leaves)


def no_match_error(rule: Rule, survey: Survey, diags, model_name: str, extra: str = "") -> NoMatchError:
    """The "selected nothing" error: each target's diagnostics and where to look next."""
    lines = "\n  ".join(d.describe() for d in diags)
    return NoMatchError(
        f"rule {rule.name!r} selected nothing in {model_name} at input {survey.size[0]}x{survey.size[1]}"
        f"{extra}:\n  {lines}\n"
        f"The model has {len(survey.stages)} stage(s), {len(survey.probe.attention)} detected attention "
        f"module(s). Run parc_surgery.list_candidates(model, rule) (CLI: parc-convert MODEL --rule RULE --inspect) "
        "to see its stages, replaceable blocks and what the rule selects."
    )


def plan_survey(rule: Rule, survey: Survey, *, impl=None, init=None) -> PlanResult:
    """match (each target's candidates) -> plan (each candidate planned and checked once)."""
    candidates = select_candidates(survey.work, rule, survey.probe, survey.stages)
    return plan_targets(survey.work, rule, survey.probe, candidates, impl=impl, init=init)


def checked_plan(rule: Rule, survey: Survey, model_name: str, *, impl, init) -> PlanResult:
    """:func:`plan_survey`, raising when a refusal stands or nothing was selected."""
    result = plan_survey(rule, survey, impl=impl, init=init)
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
        raise no_match_error(rule, survey, result.diagnostics, model_name, extra)
    return result
