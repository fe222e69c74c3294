"""The ``preserved`` check: nothing of the input model is lost without a target saying so.

For every entry of the input model's ``state_dict`` (parameters and persistent buffers, under every name a
shared module has), one of:

* it is named in exactly one target's carry record (kept, a source of a transformed tensor, or dropped;
  buffers kept / dropped), the record's names being relative to the target and mapped here to the model
  under each of the target's names; or
* the converted model holds a bit-identical tensor (same shape, dtype and values) under the same name.

Anything else fails the check, naming the tensors: a block that deleted part of what it replaced without
declaring it (a whole transformer block replaced by an attention mixer loses its MLP and norms), or a rewrite
that changed a tensor outside the targets. A record naming a tensor the module does not have, or naming one
tensor both carried and dropped, fails it too. On the meta device values cannot be compared: shape and dtype
are, and the detail says so. Always on: one pass over the names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .blocks import CarryRecord
from .report import Check

__all__ = ["check_preserved", "record_sources"]

_SHOW = 6


def record_sources(rec: CarryRecord) -> tuple[set[str], set[str]]:
    """(carried, dropped): the old names a record accounts for, relative to the replaced module."""
    carried = {o for _, o in rec.kept} | {o for _, olds, _ in rec.transformed for o in olds}
    carried |= {o for _, o in rec.buffers_kept}
    return carried, set(rec.dropped) | set(rec.buffers_dropped)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return True
    return torch.equal(a.detach(), b.detach())


def check_preserved(
    original: nn.Module,
    converted: nn.Module,
    targets,
    carry: Mapping[str, CarryRecord],
) -> Check:
    """The ``preserved`` :class:`~parc_surgery.report.Check` (see the module docstring).

    Args:
        original: the user's input model (never modified).
        converted: the converted model.
        targets: the planned targets (``name``, ``aliases``).
        carry: each target's carry record, by target name.
    """
    old = original.state_dict(keep_vars=True)
    new = converted.state_dict(keep_vars=True)
    owner: dict[str, str] = {}  # model-level old name -> the target whose record accounts for it
    problems: list[str] = []
    for t in targets:
        rec = carry.get(t.name)
        if rec is None:
            problems.append(f"{t.name}: no carry record")
            continue
        carried, dropped = record_sources(rec)
        both = sorted(carried & dropped)
        if both:
            problems.append(f"{t.name}: its record both carries and drops {', '.join(both[:_SHOW])}")
        for alias in t.aliases:
            for rel in carried | dropped:
                name = f"{alias}.{rel}"
                if name not in old:
                    problems.append(f"{t.name}: its record names {rel!r}, which the module does not have")
                    break
                if owner.setdefault(name, t.name) != t.name:
                    problems.append(f"{name} is in the records of both {owner[name]} and {t.name}")
    lost, changed = [], []
    for name, tensor in old.items():
        if name in owner:
            continue
        if name not in new:
            lost.append(name)
        elif not _same(tensor, new[name]):
            changed.append(name)
    meta = any(v.is_meta for v in old.values())
    if lost:
        problems.append(f"{len(lost)} tensor(s) gone and in no carry record: {_listed(lost)}")
    if changed:
        problems.append(f"{len(changed)} tensor(s) changed and in no carry record: {_listed(changed)}")
    if problems:
        return Check("preserved", False, "; ".join(problems))
    n_rec = sum(1 for n in old if n in owner)
    how = "same shape and dtype (meta device: values not compared)" if meta else "bit-identical"
    return Check(
        "preserved",
        True,
        f"all {len(old)} input tensors accounted for: {len(old) - n_rec} {how} at their place, {n_rec} in the "
        f"targets' carry records",
    )


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more
