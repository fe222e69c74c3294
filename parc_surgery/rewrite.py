"""Applying a checked plan: build every replacement block first, then swap them in.

Works on the model it is given (the engine always passes its own deep copy, never the user's model).
New weights are drawn from a seeded generator, so the same model, rule and seed give bit-identical
converted weights. A block that fails to build from its module raises :class:`UnsupportedTargetError`
naming the module (the engine's copy is then discarded).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import CarryRecord, get_block_spec
from .errors import UnsupportedTargetError
from .plan import PlannedTarget

__all__ = ["apply_plan", "rewrite_notes"]


def apply_plan(model: nn.Module, targets: list[PlannedTarget] | tuple, *, seed: int = 0) -> dict[str, CarryRecord]:
    """Swap each target of ``model`` for its block; returns the carry record per target name."""
    built: list[tuple[PlannedTarget, nn.Module, CarryRecord]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for t in targets:
            src = model.get_submodule(t.name)
            try:
                block, record = get_block_spec(t.block).from_module(src, t.ctx)
            except Exception as e:  # a block meeting a module it did not expect: name both
                raise UnsupportedTargetError(
                    f"{t.name} ({t.source_type}): block {t.block!r} could not be built from it: "
                    f"{type(e).__name__}: {e}. Exclude the module from the rule."
                ) from e
            block.train(src.training)
            built.append((t, block, record))
    by_block: dict[str, list[tuple[str, nn.Module]]] = {}
    for t, block, _ in built:
        for alias in t.aliases:
            model.set_submodule(alias, block)
        by_block.setdefault(t.block, []).append((t.name, block))
    for name, placements in by_block.items():
        spec = get_block_spec(name)
        if spec.attach is not None:
            try:
                spec.attach(model, placements)
            except Exception as e:
                raise UnsupportedTargetError(
                    f"{spec.cls.__qualname__}.attach could not connect {len(placements)} block(s) "
                    f"({', '.join(n for n, _ in placements[:3])}) to the model: {type(e).__name__}: {e}"
                ) from e
    return {t.name: rec for t, _, rec in built}


def rewrite_notes(model: nn.Module, targets: list[PlannedTarget] | tuple) -> list[str]:
    """What the report must say about how attention targets were rewritten (after :func:`apply_plan`).

    A block whose attention was computed inline in its own forward is now a ``torch.fx.GraphModule`` (only the
    attention region of its graph was replaced); and each attention's own notes (masks ignored, attention
    weights no longer returned, projections not carried).
    """
    from torch.fx import GraphModule

    from .attention_form import AttentionForm

    notes = []
    for t in targets:
        form = t.ctx.attention
        if not isinstance(form, AttentionForm):
            continue
        if form.kind == "inline" and isinstance(model.get_submodule(t.name), GraphModule):
            kind = t.source_type.rsplit(".", 1)[-1]
            notes.append(
                f"{t.name} ({kind}) is now a torch.fx GraphModule: its attention was computed inline in its forward, "
                "so only that region of its graph was replaced by a ParC mixer (parc_mixer); its other nodes, "
                "submodules and parameter names are kept"
            )
        notes.extend(f"{t.name}: {n}" for n in form.notes)
    return notes
