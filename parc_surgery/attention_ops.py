"""Attention cores in a recorded op graph: SDPA ops, and softmax(Q Kᵀ) V found by dataflow.

:class:`OpGraph` is the op graph of one module call (:mod:`parc_surgery.dataflow`): producers, users,
closures, layout roots and the projections a tensor is computed from. :func:`find_cores` finds every
attention core in it: an SDPA op, or a softmax fed by a matmul of two token tensors (Q Kᵀ) whose output
feeds a matmul with a third (V); softmaxes feeding one value matmul (differential attention) make one core.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention_carry import Projection, find_projection, param_derived
from .attention_labels import LAYOUT_OPS
from .dataflow import METADATA_OPS, Dataflow, TRef

__all__ = ["MATMUL_OPS", "SOFTMAX_OPS", "Core", "OpGraph", "find_cores", "is_sdpa_op"]

_PASS = frozenset({"clamp", "clamp_min", "clamp_max", "hardtanh", "native_dropout", "dropout"})

SOFTMAX_OPS = frozenset({"_softmax", "softmax", "_safe_softmax", "_log_softmax"})
MATMUL_OPS = frozenset({"mm", "bmm", "matmul", "baddbmm", "addmm", "einsum", "_unsafe_view_mm"})
_OPERANDS = {"addmm": (1, 2), "baddbmm": (1, 2)}  # else (0, 1)


def is_sdpa_op(name: str) -> bool:
    return "scaled_dot_product" in name or name.startswith("_flash_attention") or name.startswith("_efficient_att")


@dataclass(frozen=True)
class Core:
    op: int  # index of the SDPA op / the value matmul
    q: int
    k: int
    v: int
    out: int
    v_side: int  # operand index of V in the value matmul: 1 for P @ V (and SDPA), 0 for V @ P
    masks: tuple[int, ...] = ()  # tensors entering the scores besides Q and K (bias tables, masks)


def _operands(op) -> tuple[int, int] | None:
    a, b = _OPERANDS.get(op.name, (0, 1))
    if len(op.args) > b and isinstance(op.args[a], TRef) and isinstance(op.args[b], TRef):
        return op.args[a].ref, op.args[b].ref
    return None


class OpGraph:
    """The ops of one call: producers, users, closures."""

    def __init__(self, flow: Dataflow, lo: int, hi: int):
        self.flow, self.lo, self.hi = flow, lo, hi
        self.ops = flow.ops[lo:hi]
        self.users = flow.users(self.ops)

    def producer(self, ref: int):
        op = self.flow.producer(ref)
        return op if op is not None and self.lo <= op.index < self.hi else None

    def tainted(self, ref: int) -> bool:
        return self.flow.tensors[ref].tainted

    def forward(self, refs, *, skip=lambda op: False) -> set[int]:
        """Refs reachable from ``refs`` through ops not skipped."""
        seen, stack = set(refs), list(refs)
        while stack:
            for op in self.users.get(stack.pop(), ()):
                if op.name in METADATA_OPS or skip(op):
                    continue
                for r in op.outputs:
                    if r not in seen:
                        seen.add(r)
                        stack.append(r)
        return seen

    def backward_ops(self, refs) -> set[int]:
        """Indices of the ops the refs are computed by (within the call)."""
        seen: set[int] = set()
        stack = list(refs)
        while stack:
            op = self.producer(stack.pop())
            if op is not None and op.index not in seen:
                seen.add(op.index)
                stack.extend(op.inputs)
        return seen

    def leaves(self, ref: int, stop: set[int]) -> set[int]:
        """The token tensors ``ref`` is computed from: refs in ``stop`` or made outside the call (tainted only)."""
        out, seen, stack = set(), set(), [ref]
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            op = None if r in stop else self.producer(r)
            if op is None:
                out.add(r)
            else:
                stack.extend(i for i in op.inputs if self.tainted(i))
        return out

    def layout_root(self, ref: int) -> int:
        """Walk back through layout ops with one token input (reshape, permute, pad, window partition, ...) and
        value-preserving ones (dtype casts, clamps, dropout)."""
        while True:
            op = self.producer(ref)
            if op is None or (op.name not in LAYOUT_OPS and op.name not in _PASS):
                return ref
            ins = [i for i in op.inputs if self.tainted(i)]
            if len(ins) != 1 or op.name in ("cat", "stack"):
                return ref
            ref = ins[0]

    def projections(self, ref: int) -> tuple[list[Projection], set[int]]:
        """The projections ``ref`` is computed from (not walking past them) and the other token leaves reached."""
        found, leaves, seen, stack = {}, set(), set(), [ref]
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            op = self.producer(r)
            if op is None:
                leaves.add(r)
                continue
            p = find_projection(self.flow, op)
            if p is not None:
                found[op.index] = p
            else:
                stack.extend(i for i in op.inputs if self.tainted(i))
        return [found[i] for i in sorted(found)], leaves


def find_cores(flow: Dataflow, lo: int, hi: int) -> list[Core]:
    """Every attention core among the ops ``[lo, hi)``: SDPA ops and softmax(Q Kᵀ) V, one per value matmul."""
    g = OpGraph(flow, lo, hi)
    cores: dict[int, Core] = {}
    for op in g.ops:
        if is_sdpa_op(op.name) and len(op.args) >= 3 and all(isinstance(a, TRef) for a in op.args[:3]):
            mask = op.kwargs.get("attn_mask", op.args[3] if len(op.args) > 3 else None)
            masks = (mask.ref,) if isinstance(mask, TRef) else ()
            q, k, v = (a.ref for a in op.args[:3])
            cores[op.index] = Core(op.index, q, k, v, op.outputs[0], 1, masks)
        elif op.name in SOFTMAX_OPS and op.inputs:
            score = _score(g, op.inputs[0])
            value = _value(g, op.outputs[0])
            if score is None or value is None:
                continue
            (q, k, masks), (m2, v, side) = score, value
            old = cores.get(m2.index)
            masks = tuple(dict.fromkeys((old.masks if old else ()) + masks))
            cores[m2.index] = Core(m2.index, q, k, v, m2.outputs[0], side, masks)
    return [cores[i] for i in sorted(cores)]


def _score(g: OpGraph, ref: int):
    """Walk back from a softmax's input to the matmul of Q and Kᵀ; the other inputs met on the way.

    Q and K are token tensors; keys computed from parameters alone (a learned memory) are accepted here so that
    the form can name the cross-attention (a matmul with a parameter itself, such as relative position logits,
    is not the score matmul)."""
    seen, stack, visited, fallback = set(), [ref], [], None
    while stack:
        r = stack.pop(0)
        op = g.producer(r)
        if op is None or op.index in seen:
            continue
        seen.add(op.index)
        pair = _operands(op) if op.name in MATMUL_OPS else None
        if pair is not None and all(g.tainted(x) for x in pair):
            return _score_result(visited, op, pair)
        if pair is not None and fallback is None and any(g.tainted(x) for x in pair):
            other = pair[1] if g.tainted(pair[0]) else pair[0]
            if not param_derived(g.flow, other):
                fallback = (list(visited), op, pair)
        visited.append(op)
        stack.extend(i for i in op.inputs if g.tainted(i))
    return _score_result(*fallback) if fallback else None


def _score_result(visited, op, pair):
    made = {o for v in visited for o in v.outputs}
    masks = tuple(i for v in visited for i in v.inputs if i not in made and i != op.outputs[0])
    return pair[0], pair[1], masks


def _value(g: OpGraph, ref: int):
    """Walk forward from a softmax's output to the matmul with V; (op, V, V's operand index)."""
    derived, stack = {ref}, [ref]
    while stack:
        for op in g.users.get(stack.pop(0), ()):
            pair = _operands(op) if op.name in MATMUL_OPS else None
            if pair is not None:
                a, b = pair
                # V: another tensor than the attention map, not a parameter (talking heads' weights mix heads)
                if a in derived and b not in derived and not param_derived(g.flow, b):
                    return op, b, 1
                if b in derived and a not in derived and not param_derived(g.flow, a):
                    return op, a, 0
            for o in op.outputs:
                if o not in derived and len(derived) < 256:
                    derived.add(o)
                    stack.append(o)
    return None
