"""What a detected attention computes, read from the probe's recorded dataflow: the form a rewrite replaces.

The probe knows which module's own forward runs an attention. Here the aten ops of its first call are read
as a graph (:mod:`parc_surgery.dataflow`):

* **cores**: an SDPA op, or a softmax fed by a matmul of two token tensors (Q Kᵀ) whose result feeds a
  matmul with a third (V);
* **token input** ``T``: the tensor the query projection reads (walked back through layout ops). Keys and
  values must be computed from ``T`` too (directly, or through strided / pooled projections as in PVT);
  keys or values from another tensor are cross-attention, refused;
* **output**: from the cores through the head merge to the output projection, if any.

The module *is* an attention (``kind="module"``: swap the module) when ``T`` is its input up to layout ops
(reshape, permute, padding, window partition, ...), no path from its input to its output avoids the cores
(no residual or parallel MLP) and at most one projection follows them. Otherwise the attention is computed
*inline* in a larger forward (``kind="inline"``: a block that also runs its norms and MLP), and
:mod:`parc_surgery.graph_attention` replaces only the region from ``T`` to the output projection's input.
Masks: one computed from the architecture alone (Swin's shifted-window mask) is ignored and noted; one
computed from the model input is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .attention_carry import Carried, Projection, find_projection, out_carry, param_derived, value_carry
from .attention_grid import find_token_grid
from .attention_labels import Unreplayable
from .attention_ops import Core, OpGraph, find_cores
from .dataflow import METADATA_OPS, Dataflow, ModuleCall, Opaque, TRef
from .errors import UnsupportedTargetError

if TYPE_CHECKING:
    from .probe import ProbeResult

__all__ = ["AttentionForm", "attention_form_or_error", "find_attention_form", "form_of_module"]

Layout = Literal["tokens", "tokens_first", "nchw", "nhwc"]


@dataclass(frozen=True, eq=False)
class AttentionForm:
    """One detected attention as the rewrite sees it (names relative to the module ``name``)."""

    name: str
    type_name: str
    kind: Literal["module", "inline"]
    layout: Layout
    token_shape: tuple[int, ...]  # the token input T as it arrives (in ``layout``)
    dim: int  # channels of T
    attn_dim: int  # channels of the merged attention output (the mixer's width)
    out_dim: int  # channels the replacement returns (module: the module's; inline: attn_dim)
    value: Carried | None  # the mixer's v, or None (new)
    proj: Carried | None  # the mixer's proj (module kind), or None (new / kept in place)
    q_params: tuple[str, ...]  # weights of the projections reading T (locate T in an fx graph)
    proj_param: str | None  # weight of the output projection (inline: locate its input in an fx graph)
    consumed: tuple[str, ...]  # parameters / buffers the replaced computation reads
    call: ModuleCall  # the first recorded call: signature and output structure
    shapes: dict  # ref -> shape of every tensor in ``call`` (arguments and outputs)
    notes: tuple[str, ...] = ()
    grid: tuple[int, int] | None = None  # the (H, W) map the tokens were flattened from, if the dataflow shows it
    num_prefix_tokens: int | None = None  # tokens ahead of that grid (class / register / distillation tokens)

    def describe(self) -> str:
        """One line for ``list_candidates`` and the plan: what is replaced, and how."""
        shape = "x".join(map(str, self.token_shape))
        if self.kind == "inline":
            how = f"attention inline in the block's forward ({self.layout} {shape}): its graph region is rewritten"
        else:
            how = f"attention module ({self.layout} {shape}): swapped for a ParC mixer with its call signature"
        carried = [f"value rows of {', '.join(self.value.sources())}"] if self.value is not None else []
        carried += [f"output projection {', '.join(self.proj.sources())}"] if self.proj is not None else []
        return how + ("; carries the " + " and the ".join(carried) if carried else "")

    @property
    def num_tokens(self) -> int | None:
        """Tokens per sequence (token layouts)."""
        if self.layout == "tokens":
            return int(self.token_shape[1])
        return int(self.token_shape[0]) if self.layout == "tokens_first" else None


def _refuse(name: str, type_name: str, why: str) -> UnsupportedTargetError:
    return UnsupportedTargetError(f"{name} ({type_name}): {why}")


def _layout(module: nn.Module, flow: Dataflow, ref: int, g: OpGraph, first: Projection | None) -> Layout | None:
    """The layout of the token tensor ``ref``; a 4-D one is (B, C, H, W) when the projection reading it is a conv
    or takes ``shape[1]`` features (after a flatten / permute), else (B, H, W, C)."""
    shape = flow.tensors[ref].shape
    if len(shape) == 3:
        batch_first = getattr(module, "batch_first", True)
        return "tokens_first" if isinstance(module, nn.MultiheadAttention) and not batch_first else "tokens"
    if len(shape) != 4 or first is None:
        return None
    if first.conv:
        return "nchw"
    c = flow.tensors[first.token].shape[-1]
    if shape[1] == c and shape[3] != c:
        return "nchw"
    if shape[3] == c and shape[1] != c:
        return "nhwc"
    moved = any(op.name in ("permute", "transpose") for op in g.ops if ref in op.inputs)
    return "nchw" if moved else "nhwc"


def _gates(g: OpGraph, op, derived: set[int]) -> bool:
    """Whether ``op``'s result only multiplies the attention's result (a gate), never adds to it."""
    stack, seen = list(op.outputs), set()
    while stack:
        for u in g.users.get(stack.pop(), ()):
            if u.index in seen:
                continue
            seen.add(u.index)
            if any(i in derived for i in u.inputs):
                if u.name not in ("mul", "mul_"):
                    return False
                continue
            stack.extend(u.outputs)
    return bool(seen)


def _on_tokens_with_params(g: OpGraph, op, derived: set[int]) -> bool:
    """A computation on the tokens with parameters (a norm, a projection) that does not read the attention's result."""
    tainted = [r for r in op.inputs if g.tainted(r)]
    if not tainted or any(r in derived for r in tainted) or op.name in METADATA_OPS:
        return False
    return any(not g.tainted(r) and param_derived(g.flow, r) for r in op.inputs)


def _channels(shape: tuple[int, ...], layout: Layout) -> int:
    return int(shape[1]) if layout == "nchw" else int(shape[-1])


def _describe(flow: Dataflow, ref: int) -> str:
    info = flow.tensors[ref]
    op = flow.producer(ref)
    return f"a {tuple(info.shape)} tensor" + (f" from {op.name} in {op.owner or 'the model'}" if op else "")


def find_attention_form(module: nn.Module, probe: ProbeResult, name: str) -> AttentionForm:
    """The :class:`AttentionForm` of the attention module ``name`` detected by the probe; raises
    :class:`UnsupportedTargetError` naming the module, the form found and why it cannot be rewritten.

    The label replay runs on the CPU, whatever default device the caller set (``with torch.device("meta")``).
    """
    with torch.device("cpu"):
        return _find_attention_form(module, probe, name)


def _find_attention_form(module: nn.Module, probe: ProbeResult, name: str) -> AttentionForm:
    kind_name = f"{type(module).__module__}.{type(module).__qualname__}"
    rec = probe.calls.get(name)
    if rec is None or not rec.call_args:
        raise _refuse(name, kind_name, "it never ran in the forward pass")
    call = rec.call_args[0]
    flow, (lo, hi) = probe.flow, call.ops
    g = OpGraph(flow, lo, hi)
    ins, outs = call.tensor_refs(), call.output_refs()
    if not ins or not outs:
        raise _refuse(name, kind_name, "it does not take and return tensors")
    x, y = ins[0], outs[0]
    cores = find_cores(flow, lo, hi)
    if not cores:
        raise _refuse(name, kind_name, "softmax and matmuls run in its forward, but no softmax(Q Kᵀ) V dataflow")
    first_q, q_leaves = g.projections(cores[0].q)
    roots = {g.layout_root(p.token) for p in first_q} or q_leaves
    if len(roots) != 1:
        raise _refuse(name, kind_name, f"its queries are computed from {len(roots)} different tensors")
    t = roots.pop()
    core_outs = {c.out for c in cores}
    for c in cores:
        for what, ref in (("queries", c.q), ("keys", c.k), ("values", c.v)):
            leaves = g.leaves(ref, {t} | core_outs)
            if not leaves and g.tainted(t):
                raise _refuse(
                    name, kind_name, f"cross-attention: its {what} are computed from parameters alone (learned "
                    "queries / a memory), not from the token input; ParC mixes one token sequence with itself",
                )  # fmt: skip
            other = leaves - {t} - core_outs
            if other:
                raise _refuse(
                    name,
                    kind_name,
                    f"cross-attention: its {what} come from {_describe(flow, other.pop())}, not from "
                    f"the token input {tuple(flow.tensors[t].shape)} the queries are computed from; ParC mixes one "
                    "token sequence with itself",
                )
    notes = _check_masks(g, cores, t, x, name, kind_name)
    derived = g.forward(core_outs)
    core_ops = {c.op for c in cores}
    before_cores = g.backward_ops([r for c in cores for r in (c.q, c.k, c.v, *c.masks)])
    after = [
        p for op in g.ops
        if (p := find_projection(flow, op)) is not None and p.token in derived and op.index not in before_cores
    ]  # fmt: skip
    qkv_ops = {p.op.index for c in cores for r in (c.q, c.k, c.v) for p in g.projections(r)[0]}
    # a path from the input to the output around the attention (a residual, a parallel MLP), or computation on
    # the tokens neither feeding nor following the attention: the module is more than an attention
    bypass = y in g.forward(
        [x],
        skip=lambda op: op.index in core_ops or op.index in qkv_ops
        or (op.name in ("mul", "mul_") and any(i in derived for i in op.inputs)),
    )  # fmt: skip
    inside = derived | g.forward([r for i in qkv_ops for r in flow.ops[i].outputs])  # after the projections
    side = [
        op for op in g.ops
        if op.index not in before_cores and _on_tokens_with_params(g, op, inside) and not _gates(g, op, derived)
    ]  # fmt: skip
    exact = not bypass and not side and len(after) <= 1 and y in derived
    proj = min(after, key=lambda p: p.op.index) if after else None
    src = x if exact else t  # the mixer's input: the module's input when it replaces the module
    layout = _layout(module, flow, src, g, first_q[0] if first_q else None)
    if layout is None:
        shape = tuple(flow.tensors[src].shape)
        raise _refuse(name, kind_name, f"its token input {shape} is not (B, N, C), (B, C, H, W) or (B, H, W, C)")
    dim = _channels(flow.tensors[src].shape, layout)
    if exact:
        merged, mdim = (proj.token, proj.channel_dim) if proj else (y, 1 if layout == "nchw" else -1)
        same_rank = len(flow.tensors[y].shape) == len(flow.tensors[x].shape)
        out_dim = _channels(flow.tensors[y].shape, layout) if same_rank else 0
        notes += _check_outputs(call, y, name, kind_name)
        if not call.args or call.args[0] != TRef(x):
            raise _refuse(name, kind_name, "its token input is not its first positional argument")
        region_ops = set(range(lo, hi))
    else:
        if proj is None:
            raise _refuse(name, kind_name, "the attention is computed inline in its forward together with other "
                          "computation, and no output projection follows it to rewrite up to")  # fmt: skip
        merged, mdim = proj.token, proj.channel_dim
        region_ops = _inline_region(g, t, merged, name, kind_name)
    attn_dim = int(flow.tensors[merged].shape[mdim])
    if not exact:
        out_dim = attn_dim
    value, why = _value_carry(g, cores, src, dim, merged, mdim, name + ".")
    if why:
        notes += (f"value projection not carried ({why}): the mixer's v starts from a fresh initialisation",)
    pcarry = None
    if exact and proj is not None:
        try:
            pcarry = out_carry(flow, proj, name + ".")
        except Unreplayable as e:
            notes += (f"output projection not carried ({e}): the mixer's proj starts fresh",)
    prefix = name + "."
    consumed = sorted({
        flow.tensors[r].param[len(prefix):] for i in region_ops for r in flow.ops[i].inputs
        if flow.tensors[r].param and flow.tensors[r].param.startswith(prefix)
    })  # fmt: skip
    q_params = tuple(dict.fromkeys(_pname(flow, p.weight, prefix) for p in first_q))
    grid = None
    if layout in ("tokens", "tokens_first"):
        n = int(flow.tensors[src].shape[1 if layout == "tokens" else 0])
        grid = find_token_grid(flow, src, n, dim)
    return AttentionForm(
        name, kind_name, "module" if exact else "inline", layout, tuple(flow.tensors[src].shape), dim, attn_dim,
        out_dim, value, pcarry, tuple(q for q in q_params if q), _pname(flow, proj.weight, prefix) if proj else None,
        tuple(consumed), call, {r: flow.tensors[r].shape for r in ins + outs}, notes,
        grid[0] if grid else None, grid[1] if grid else None,
    )  # fmt: skip


def _pname(flow: Dataflow, ref: int, prefix: str) -> str | None:
    """The parameter (relative to the module) a projection weight operand is read from."""
    stack = [ref]
    while stack:
        r = stack.pop()
        p = flow.tensors[r].param
        if p is not None:
            return p[len(prefix) :] if p.startswith(prefix) else None
        op = flow.producer(r)
        if op is not None:
            stack.extend(op.inputs)
    return None


def _check_masks(g: OpGraph, cores: list[Core], t: int, x: int, name: str, kind_name: str) -> tuple[str, ...]:
    notes = []
    for c in cores:
        for m in c.masks:
            if g.tainted(m):
                if g.leaves(m, {t, x}) - {t, x} or _compares(g, m):
                    why = f"its attention scores are masked by {_describe(g.flow, m)} computed from the model input"
                    raise _refuse(name, kind_name, why + "; ParC mixes every token and has no notion of a mask")
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


def _check_outputs(call: ModuleCall, y: int, name: str, kind_name: str) -> tuple[str, ...]:
    leaves = pytree.tree_leaves(call.output)
    odd = [v for v in leaves if not isinstance(v, TRef) and v is not None]
    if odd:
        what = ", ".join(v.type_name if isinstance(v, Opaque) else repr(v) for v in odd[:3])
        raise _refuse(name, kind_name, f"it returns {what} besides its output; a ParC mixer cannot produce that. "
                      "Exclude it")  # fmt: skip
    extra = [v for v in leaves if isinstance(v, TRef) and v.ref != y]
    if extra:
        return (f"{len(extra)} further tensor output(s) (attention weights) are returned as None",)
    return ()


def _inline_region(g: OpGraph, t: int, merged: int, name: str, kind_name: str) -> set[int]:
    """Ops between ``t`` and ``merged``; refused when something outside reads one of their results."""
    desc_refs = g.forward([t])
    region = {i for i in g.backward_ops([merged]) if any(r in desc_refs for r in g.flow.ops[i].outputs)}
    made = {r for i in region for r in g.flow.ops[i].outputs}
    for r in made - {merged}:
        for op in g.users.get(r, ()):
            in_place = op.func._schema.is_mutable and set(op.outputs) <= made  # writes a region tensor (``add_``)
            if op.index not in region and op.name not in METADATA_OPS and not in_place:
                raise _refuse(name, kind_name, f"the inline attention's intermediate {_describe(g.flow, r)} is also "
                              f"read by {op.name} in {op.owner or 'the model'} (a projection shared with other "
                              "computation, or attention weights used elsewhere); only a self-contained attention "
                              "can be rewritten")  # fmt: skip
    return region


def _value_carry(g: OpGraph, cores, t, dim, merged, mdim, prefix) -> tuple[Carried | None, str]:
    projs = []
    for c in cores:
        found, leaves = g.projections(c.v)
        if len(found) != 1 or leaves - {c.out for c in cores}:
            return None, "the values are not one projection of the token input"
        p = found[0]
        shape = g.flow.tensors[p.token].shape
        if g.layout_root(p.token) != t or not shape or shape[p.channel_dim] != dim:
            return None, "the value projection reads another tensor than the token input"
        projs.append(p)
    try:
        return value_carry(g.flow, g.lo, g.hi, projs, {c.op: c for c in cores}, merged, mdim, prefix), ""
    except Unreplayable as e:
        return None, str(e)


class _Holder(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


def form_of_module(module: nn.Module, ctx) -> AttentionForm:
    """The form of an attention ``module`` used on its own (no engine probe): probed once on a token input.

    The input is ``ctx.source_in_shape`` when given, else (1, prefix + H * W, C) tokens on
    ``ctx.feature_size`` with C the input width of the module's first ``nn.Linear``.
    """
    from .probe import probe_model

    shape = ctx.source_in_shape
    if shape is None:
        lin = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        if lin is None:
            raise _refuse("the module", type(module).__qualname__, "no input shape recorded and no nn.Linear to guess")
        h, w = ctx.feature_size
        shape = (1, int(ctx.options.get("num_prefix_tokens", ctx.num_prefix_tokens) or 0) + h * w, lin.in_features)
    first = next(iter(module.parameters()), None)
    x = torch.randn(shape, device=first.device if first is not None else None)
    if first is not None and first.is_floating_point():
        x = x.to(first.dtype)
    probe = probe_model(_Holder(module), x)
    if "m" not in probe.attention:
        raise _refuse("the module", type(module).__qualname__, "no attention token mixer runs in its forward")
    return find_attention_form(module, probe, "m")


def attention_form_or_error(model: nn.Module, probe: ProbeResult, name: str) -> AttentionForm | UnsupportedTargetError:
    """:func:`find_attention_form` for the probe's attention ``name``, or the refusal; cached on the probe."""
    cache = probe.forms
    if name not in cache:
        try:
            cache[name] = find_attention_form(model.get_submodule(name), probe, name)
        except UnsupportedTargetError as e:
            cache[name] = e
    return cache[name]
