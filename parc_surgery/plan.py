"""The conversion plan: every target resolved to a block, a feature size and options, then checked.

``build_plan`` turns selections into :class:`PlannedTarget` records (nothing is built yet);
``check_plan`` asks each block whether it can replace its module (:func:`target_problem`) and raises
one :class:`UnsupportedTargetError` listing every problem, before anything is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from .attention_form import AttentionForm, attention_form_or_error, resolve_grid
from .blocks import BlockContext, get_block
from .errors import ParcSurgeryError, UnsupportedTargetError
from .match import Selection
from .probe import ProbeResult
from .rule import Rule
from .stages import Stage

__all__ = ["Plan", "PlannedTarget", "build_plan", "check_plan", "target_problem", "token_grid"]


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

    Uses timm's patch embedding ``grid_size`` where present, else the most square factorization of the
    tokens left after 0..8 prefix tokens.
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


def build_plan(
    model: nn.Module,
    rule: Rule,
    probe: ProbeResult,
    stages: list[Stage],
    selections: list[Selection],
    *,
    model_name: str,
    input_size: tuple[int, int],
    impl: str | None = None,
    init: str | None = None,
) -> list[PlannedTarget]:
    targets = []
    first_seen: set[tuple[int, int | None]] = set()
    for sel in selections:
        t = rule.targets[sel.target_index]
        opts = t.options
        mod = model.get_submodule(sel.name)
        rec = probe.calls[sel.name]
        feat, extra = _feature_size(model, rec.in_shape, mod)
        form = attention_form_or_error(model, probe, sel.name) if sel.name in probe.attention else None
        if isinstance(form, AttentionForm):  # the attention's own tokens (MHA's may be (N, B, C))
            try:
                n = form.num_tokens
                feat, prefix, patch = resolve_grid(form, _token_grid(model, n) if n else ((1, 1), 0, False))
                extra = {"num_tokens": n, "num_prefix_tokens": prefix, "patch_grid": patch} if n else {}
            except UnsupportedTargetError as e:
                form = e
        if opts.pe == "all":
            pe = True
        elif opts.pe == "none":
            pe = False
        else:  # first selected block of each stage (per target)
            key = (sel.target_index, sel.stage if sel.stage is not None else -1 - len(first_seen))
            pe = key not in first_seen
            first_seen.add(key)
        kernel = None if opts.kernel_size == "auto" else tuple(opts.kernel_size)
        options = dict(opts.block_options)
        options.update(extra)
        # what the probe saw the module do: blocks that size themselves from it read these
        options["source_in_shape"] = rec.in_shape
        options["source_out_shape"] = rec.out_shape
        if form is not None:
            options["attention"] = form
        ctx = BlockContext(
            feature_size=feat,
            kernel_size=kernel,
            pe=pe,
            impl=impl or opts.impl,
            init=init or opts.init,
            width_mult=opts.width_mult,
            options=options,
        )
        cls = type(mod)
        targets.append(
            PlannedTarget(
                sel.name,
                sel.aliases,
                t.block,
                f"{cls.__module__}.{cls.__qualname__}",
                rec.in_shape,
                rec.out_shape,
                sel.stage,
                sel.target_index,
                ctx,
            )
        )
    return targets


def target_problem(model: nn.Module, t: PlannedTarget, probe: ProbeResult) -> str | None:
    """Why ``t``'s block cannot replace its module (``None`` if it can); never raises.

    Refused for any block: a module whose output is not one tensor (a tuple / dict: the replacement returns one
    tensor) and a shared module run at several input shapes. Otherwise the block's ``check_source`` decides.
    """
    mod = model.get_submodule(t.name)
    rec = probe.calls[t.name]
    kind = t.source_type.rsplit(".", 1)[-1]
    if rec.out_tensor and not all(rec.out_tensor) and "attention" not in t.ctx.options:
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
        get_block(t.block).check_source(mod, t.ctx)
    except ParcSurgeryError as e:
        return f"{t.name}: {e}"
    except Exception as e:  # a block's check failing unexpectedly is still the target's problem
        return f"{t.name}: block {t.block!r} cannot check this {kind} ({type(e).__name__}: {e})"
    return None


def check_plan(model: nn.Module, targets: list[PlannedTarget], probe: ProbeResult) -> None:
    """Ask every block whether it can replace its module (:func:`target_problem`); raise one error listing all."""
    problems = [p for p in (target_problem(model, t, probe) for t in targets) if p]
    if problems:
        raise UnsupportedTargetError(
            f"{len(problems)} of {len(targets)} selected module(s) cannot be replaced; nothing was changed:\n  - "
            + "\n  - ".join(problems)
            + "\nNarrow the rule (exclude / name / type) to leave them out; see parc_surgery.list_candidates(model)."
        )
