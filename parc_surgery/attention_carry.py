"""The weights an attention hands to its ParC mixer: value rows and output projection, located by labels.

:func:`find_projection` recognises a projection among recorded aten ops (``addmm`` / ``mm`` / ``bmm`` with
one operand read from a parameter, or a ``convolution``); :func:`value_carry` and :func:`out_carry` replay
the ops between the projections, the attention core and the output projection on labels
(:mod:`parc_surgery.attention_labels`) and return :class:`Carried` records: for every entry of the mixer's
``v`` / ``proj`` weight and bias, the parameter entry it is copied from. :func:`gather` builds the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_labels import LabelReplay, Unreplayable, channel_labels, decode, label_tensor, with_stride
from .dataflow import Dataflow, OpRecord, TRef

__all__ = ["Carried", "Projection", "find_projection", "gather", "out_carry", "value_carry"]

_MM = {"mm": (0, 1, None), "addmm": (1, 2, 0), "bmm": (0, 1, None), "baddbmm": (1, 2, 0), "matmul": (0, 1, None)}
_CONV = frozenset({"convolution", "_convolution", "conv2d", "conv1d"})
_PARAM_PATH = frozenset(
    {
        "t", "view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "slice", "select", "split",
        "split_with_sizes", "chunk", "unbind", "clone", "contiguous", "alias", "detach", "unsqueeze", "squeeze",
        "cat", "_to_copy", "to", "zeros_like", "new_zeros", "lift_fresh",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Projection:
    """A recorded projection op: token operand, weight / bias operands, the output's channel dim."""

    op: OpRecord
    token: int
    weight: int
    bias: int | None
    channel_dim: int  # of the op's output
    conv: bool
    trailing_bias: int | None = None  # a bias added by a separate op after the matmul ...
    biased: int | None = None  # ... and that op's output

    @property
    def out(self) -> int:
        return self.biased if self.biased is not None else self.op.outputs[0]


@dataclass(frozen=True, eq=False)
class Carried:
    """A new weight (and bias) as labels of old parameter entries (see :mod:`parc_surgery.attention_labels`)."""

    names: tuple[str, ...]  # slot -> parameter name (relative to the replaced module)
    rows: torch.Tensor  # (out, 2) int64: per output channel, (slot, row) of the parameter row it copies
    bias: torch.Tensor | None  # (out, 2) int64: (slot, index) of its bias entry, (-1, -1) for zero; None: no bias

    def sources(self) -> list[str]:
        return [self.names[s] for s in self.rows[:, 0].unique().tolist()]

    def is_whole(self, name: str, out: int) -> bool:
        """Whether the weight is exactly parameter ``name`` (every row, in order)."""
        want = torch.stack([torch.full((out,), self.names.index(name)), torch.arange(out)], 1)
        return name in self.names and tuple(self.rows.shape) == (out, 2) and bool((self.rows == want).all())


def param_derived(flow: Dataflow, ref: int, _memo: dict | None = None) -> bool:
    """Whether ``ref`` is a parameter / buffer or computed from them by layout ops only."""
    memo = {} if _memo is None else _memo
    if ref in memo:
        return memo[ref]
    info = flow.tensors[ref]
    ok = info.param is not None
    if not ok and not info.tainted:
        op = flow.producer(ref)
        ok = op is not None and op.name in _PARAM_PATH and bool(op.inputs)
        ok = ok and all(param_derived(flow, r, memo) for r in op.inputs)
    memo[ref] = ok
    return ok


def find_projection(flow: Dataflow, op: OpRecord) -> Projection | None:
    """``op`` as a projection of a token tensor by a parameter (``None`` if it is not one)."""
    name = op.name
    if name in _MM:
        a, b, c = _MM[name]
        if len(op.args) <= b or not isinstance(op.args[a], TRef) or not isinstance(op.args[b], TRef):
            return None
        x, w = op.args[a].ref, op.args[b].ref
        bias = op.args[c].ref if c is not None and isinstance(op.args[c], TRef) else None
        if flow.tensors[x].tainted and param_derived(flow, w):
            bias = bias if bias is not None and param_derived(flow, bias) else None
            return Projection(op, x, w, bias, -1, False, *(() if bias is not None else _trailing_bias(flow, op)))
        return None
    if name in _CONV and len(op.args) >= 2 and isinstance(op.args[0], TRef) and isinstance(op.args[1], TRef):
        x, w = op.args[0].ref, op.args[1].ref
        b = op.args[2].ref if len(op.args) > 2 and isinstance(op.args[2], TRef) else None
        groups = op.args[8] if len(op.args) > 8 else 1
        if flow.tensors[x].tainted and param_derived(flow, w) and groups == 1:  # depthwise convs do not project
            return Projection(op, x, w, b, 1, True)
    return None


def _trailing_bias(flow: Dataflow, op: OpRecord) -> tuple[int | None, int | None]:
    """A bias added right after a bias-free matmul (``linear`` on a non-contiguous input): (bias, sum)."""
    out = op.outputs[0]
    for nxt in flow.ops[op.index + 1 : op.index + 4]:
        if nxt.name in ("add", "add_") and out in nxt.inputs and len(nxt.inputs) == 2:
            other = next(r for r in nxt.inputs if r != out)
            if param_derived(flow, other) and len(flow.tensors[other].shape) == 1:
                return other, nxt.outputs[0]
        if out in nxt.inputs and nxt.name not in ("view", "_unsafe_view"):
            break
        if nxt.name in ("view", "_unsafe_view") and out in nxt.inputs:
            out = nxt.outputs[0]
    return None, None


def _param_labels(flow: Dataflow, lo: int, hi: int, refs: list[int], prefix: str):
    """Label every parameter / buffer the refs are computed from: (roots, names, shapes), slot i = the i-th."""
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    roots: dict[int, torch.Tensor] = {}
    stack = list(refs)
    while stack:
        r = stack.pop()
        info = flow.tensors[r]
        if info.param is not None:
            if r not in roots:
                roots[r] = label_tensor(len(names), info.shape, info.stride)
                names.append(info.param[len(prefix) :] if info.param.startswith(prefix) else "")
                shapes.append(info.shape)
            continue
        op = flow.producer(r)
        if op is not None:
            stack.extend(op.inputs)
    return roots, names, shapes


def _matrix_rows(flow: Dataflow, p: Projection, prefix: str) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Per output channel of ``p``: the (slot, row) of the parameter its weight row is, and the (slot, index)
    of its bias ((-1, -1): zero); with the slot names. Raises :class:`Unreplayable` unless every weight row is
    one parameter row in order (a plain projection)."""
    b = p.bias if p.bias is not None else p.trailing_bias
    direct = _direct_param(flow, p.weight, p.conv)
    if direct is not None and (b is None or flow.tensors[b].param is not None):  # the usual case: no replay needed
        names = [_relative(direct[0], prefix)] + ([_relative(flow.tensors[b].param, prefix)] if b is not None else [])
        if "" in names:
            raise Unreplayable("the projection reads a parameter of another module")
        out = direct[1]
        rows = torch.stack([torch.zeros(out, dtype=torch.int64), torch.arange(out)], 1)
        bias = None if b is None else torch.stack([torch.ones(out, dtype=torch.int64), torch.arange(out)], 1)
        return names, rows, bias
    lo, hi = 0, p.op.index + 1
    roots, names, shapes = _param_labels(flow, lo, hi, [p.weight] + ([b] if b is not None else []), prefix)
    if "" in names:
        raise Unreplayable("the projection reads a parameter of another module")
    replay = LabelReplay(flow, lo, hi, roots)
    w = replay(p.weight)
    if p.conv:
        if w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or any(s != 1 for s in p.op.args[3]):
            raise Unreplayable("the projection is a spatial or strided conv, not a 1x1 projection")
        mat = w[:, :, 0, 0]
    else:
        if w.dim() != 2:
            raise Unreplayable("the projection weight is not a matrix")
        mat = w.t()
    slot, idx = decode(mat)  # (out, in)
    width = mat.shape[1]
    row = torch.div(idx[:, 0], width, rounding_mode="floor")
    want = row[:, None] * width + torch.arange(width)
    if bool((idx < 0).any()) or not bool((idx == want).all()) or not bool((slot == slot[:, :1]).all()):
        raise Unreplayable("the projection weight is not a parameter's rows in order")
    for s in slot[:, 0].unique().tolist():
        if len(shapes[s]) < 2 or _numel(shapes[s][1:]) != width:
            raise Unreplayable("the projection weight is a reshaped parameter")
    rows = torch.stack([slot[:, 0], row], 1)
    bias = None
    if b is not None:
        bslot, bidx = decode(replay(b))
        bias = torch.stack([torch.where(bidx >= 0, bslot, -1), bidx], 1)
    return names, rows, bias


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else ""


def _direct_param(flow: Dataflow, ref: int, conv: bool) -> tuple[str, int] | None:
    """(name, rows) when the weight operand is a parameter itself (conv) or its transpose (``t``, linear)."""
    info = flow.tensors[ref]
    if conv:
        if info.param is not None and len(info.shape) == 4 and info.shape[2:] == (1, 1):
            return info.param, info.shape[0]
        return None
    op = flow.producer(ref)
    if op is not None and op.name == "t" and len(op.inputs) == 1:
        src = flow.tensors[op.inputs[0]]
        if src.param is not None and len(src.shape) == 2:
            return src.param, src.shape[0]
    return None


def _numel(shape) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def value_carry(
    flow: Dataflow, lo: int, hi: int, projections: list[Projection], cores: dict, merged: int, dim: int, prefix: str
) -> Carried:
    """The mixer's ``v`` (mixer channel j = channel j of ``merged`` along ``dim``) from the value projections.

    ``merged`` is the attention's merged output (the output projection's token operand, or the module
    output); its channels are labelled by replaying the value projections' outputs through the core and the
    head merge (the core keeps each value channel: softmax(Q K^T) V mixes tokens, not channels).
    """
    roots = {p.out: label_tensor(i, flow.tensors[p.out].shape, flow.tensors[p.out].stride, dim=p.channel_dim)
             for i, p in enumerate(projections)}  # fmt: skip
    replay = _CoreReplay(flow, lo, hi, roots, cores)
    slot, idx = decode(channel_labels(replay(merged), dim))
    if bool((idx < 0).any()):
        raise Unreplayable("a merged channel has no value channel")
    names: list[str] = []
    rows, biases = [], []
    for i, p in enumerate(projections):
        pnames, prows, pbias = _matrix_rows(flow, p, prefix)
        sel = slot == i
        off = len(names)
        names.extend(pnames)
        r = prows[idx[sel]]
        rows.append((sel, r + torch.tensor([off, 0])))
        if pbias is None:
            biases = None
        elif biases is not None:
            pb = pbias[idx[sel]]
            biases.append((sel, torch.where(pb[:, :1] >= 0, pb + torch.tensor([off, 0]), pb)))
    out_rows = torch.zeros(len(slot), 2, dtype=torch.int64)
    for sel, r in rows:
        out_rows[sel] = r
    out_bias = None
    if biases is not None:
        out_bias = torch.zeros(len(slot), 2, dtype=torch.int64)
        for sel, r in biases:
            out_bias[sel] = r
    return _compact(names, out_rows, out_bias)


def out_carry(flow: Dataflow, p: Projection, prefix: str) -> Carried:
    """The mixer's ``proj`` from the output projection ``p`` (its token operand's channels = mixer channels)."""
    names, rows, bias = _matrix_rows(flow, p, prefix)
    return _compact(names, rows, bias)


def _compact(names: list[str], rows: torch.Tensor, bias: torch.Tensor | None) -> Carried:
    """Renumber slots so that each parameter name appears once."""
    uniq = list(dict.fromkeys(names))
    remap = torch.tensor([uniq.index(n) for n in names] + [-1], dtype=torch.int64)  # [-1]: slot -1 stays -1

    def fix(t):
        return None if t is None else torch.stack([remap[t[:, 0]], t[:, 1]], 1)

    return Carried(tuple(uniq), fix(rows), fix(bias))


class _CoreReplay(LabelReplay):
    """A replay that also passes value labels through attention cores (SDPA, ``softmax(...) @ V``)."""

    def __init__(self, flow, lo, hi, roots, cores):
        super().__init__(flow, lo, hi, roots)
        self.cores = cores  # op index -> the core (``.v``: value ref, ``.v_side``: operand index of V)

    def _run(self, op: OpRecord) -> None:
        core = self.cores.get(op.index)
        if core is None:
            return super()._run(op)
        v = self(core.v)
        info = self.flow.tensors[op.outputs[0]]
        # the core mixes tokens, not value channels: each output entry keeps its value channel's label
        lab = v[..., :1, :] if core.v_side == 1 else v[..., :, :1]  # out (..., Lq, D) / (..., D, Lq)
        last = v[..., -1:, :] if core.v_side == 1 else v[..., :, -1:]
        if not bool((last == lab).all()):  # mixed channels differ along the tokens (the last one is enough)
            raise Unreplayable("the value labels vary along the tokens: the channels were mixed before the core")
        self.memo[op.outputs[0]] = with_stride(lab.expand(info.shape).clone(), info.stride)


def gather(carried: Carried, params: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None):
    """Fill ``weight`` (out, in[, 1, 1]) and ``bias`` (out,) in place from ``params`` as ``carried`` says."""
    with torch.no_grad():
        if weight.is_meta:
            return
        flat = weight.view(weight.shape[0], -1)
        _copy_rows(carried.names, carried.rows, params, flat, lambda t: t.reshape(t.shape[0], -1))
        if bias is not None:
            bias.zero_()
            if carried.bias is not None:
                _copy_rows(carried.names, carried.bias, params, bias.view(-1, 1), lambda t: t.reshape(-1, 1))


def _copy_rows(names, lab: torch.Tensor, params: dict, dst: torch.Tensor, as_rows) -> None:
    for s, name in enumerate(names):
        out = torch.nonzero(lab[:, 0] == s).flatten()
        if len(out):
            src = as_rows(params[name].detach())
            rows = lab[out, 1]
            a, j, n = int(rows[0]), int(out[0]), len(out)
            if bool((rows == torch.arange(a, a + n)).all() and (out == torch.arange(j, j + n)).all()):
                dst[j : j + n].copy_(src[a : a + n])  # one run of rows (the usual case): a slice copy
            else:
                dst.index_copy_(0, out.to(dst.device), src.index_select(0, rows.to(src.device)).to(dst))
