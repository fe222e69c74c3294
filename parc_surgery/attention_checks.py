"""The refusals of attention form detection: masks, extra outputs, inline regions read from outside.

:mod:`parc_surgery.attention_form` reads what an attention computes; the checks here decide whether a ParC
mixer can stand in for it, and word the refusal (:func:`refusal`) or the note when it can with a caveat.
"""

from __future__ import annotations

from torch.utils import _pytree as pytree

from .attention_ops import Core, OpGraph
from .dataflow import METADATA_OPS, Dataflow, ModuleCall, Opaque, TRef
from .errors import UnsupportedTargetError

__all__ = ["check_masks", "check_outputs", "describe_ref", "inline_region", "refusal"]


def refusal(name: str, type_name: str, why: str) -> UnsupportedTargetError:
    """The refusal of attention ``name`` (a ``type_name``) because ``why``."""
    return UnsupportedTargetError(f"{name} ({type_name}): {why}")


def describe_ref(flow: Dataflow, ref: int) -> str:
    """A recorded tensor in words: its shape and the op (and module) that made it."""
    info = flow.tensors[ref]
    op = flow.producer(ref)
    return f"a {tuple(info.shape)} tensor" + (f" from {op.name} in {op.owner or 'the model'}" if op else "")


def check_masks(g: OpGraph, cores: list[Core], t: int, x: int, name: str, kind_name: str) -> tuple[str, ...]:
    """Refuse a mask computed from the model input; note (and ignore) one from the architecture alone."""
    notes = []
    for c in cores:
        for m in c.masks:
            if g.tainted(m):
                if g.leaves(m, {t, x}) - {t, x} or _compares(g, m):
                    why = f"its attention scores are masked by {describe_ref(g.flow, m)} computed from the model input"
                    raise refusal(name, kind_name, why + "; ParC mixes every token and has no notion of a mask")
            elif not _from_parameters(g.flow, m):
                notes.append(
                    f"a mask computed from the architecture alone ({tuple(g.flow.tensors[m].shape)}, e.g. Swin's "
                    "shifted-window mask) is ignored: ParC mixes the whole grid it is given"
                )
    return tuple(dict.fromkeys(notes))


_COMPARISONS = frozenset({"lt", "gt", "le", "ge", "eq", "ne", "logical_not", "logical_and", "logical_or", "isinf",
                          "isnan", "masked_fill", "where"})  # fmt: skip


def _compares(g: OpGraph, ref: int) -> bool:
    """Whether ``ref`` is computed (within the call) by comparing token values: a mask, not a learned score term."""
    return any(g.flow.ops[i].name in _COMPARISONS for i in g.backward_ops([ref]))


def _from_parameters(flow: Dataflow, ref: int) -> bool:
    """Whether ``ref`` is computed from an ``nn.Parameter`` (a learned relative position bias), not only from
    buffers and constants (a mask)."""
    stack, seen = [ref], set()
    while stack:
        r = stack.pop()
        if r in seen:
            continue
        seen.add(r)
        info = flow.tensors[r]
        if info.param is not None and not info.buffer:
            return True
        op = flow.producer(r)
        if op is not None and op.name not in METADATA_OPS:  # ``x.new_zeros(...)`` reads only x's shape
            stack.extend(i for i in op.inputs if not flow.tensors[i].tainted)
    return False


def check_outputs(call: ModuleCall, y: int, name: str, kind_name: str) -> tuple[str, ...]:
    """Refuse non-tensor outputs besides ``y``; note further tensor outputs (returned as ``None``)."""
    leaves = pytree.tree_leaves(call.output)
    odd = [v for v in leaves if not isinstance(v, TRef) and v is not None]
    if odd:
        what = ", ".join(v.type_name if isinstance(v, Opaque) else repr(v) for v in odd[:3])
        raise refusal(name, kind_name, f"it returns {what} besides its output; a ParC mixer cannot produce that. "
                      "Exclude it")  # fmt: skip
    extra = [v for v in leaves if isinstance(v, TRef) and v.ref != y]
    if extra:
        return (f"{len(extra)} further tensor output(s) (attention weights) are returned as None",)
    return ()


def inline_region(g: OpGraph, t: int, merged: int, name: str, kind_name: str) -> set[int]:
    """Ops between ``t`` and ``merged``; refused when something outside reads one of their results."""
    desc_refs = g.forward([t])
    region = {i for i in g.backward_ops([merged]) if any(r in desc_refs for r in g.flow.ops[i].outputs)}
    made = {r for i in region for r in g.flow.ops[i].outputs}
    for r in made - {merged}:
        for op in g.users.get(r, ()):
            in_place = op.func._schema.is_mutable and set(op.outputs) <= made  # writes a region tensor (``add_``)
            if op.index not in region and op.name not in METADATA_OPS and not in_place:
                raise refusal(name, kind_name, f"the inline attention's intermediate {describe_ref(g.flow, r)} is also "
                              f"read by {op.name} in {op.owner or 'the model'} (a projection shared with other "
                              "computation, or attention weights used elsewhere); only a self-contained attention "
                              "can be rewritten")  # fmt: skip
    return region
