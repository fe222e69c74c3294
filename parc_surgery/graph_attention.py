"""Rewriting an attention computed inline in a block's forward: replace exactly that subgraph in torch.fx.

When the probe finds the attention inside a larger forward (a block that runs its norms, the attention and
its MLP in one method), the block is traced with torch.fx (every submodule a leaf, so submodules stay
``call_module`` nodes) and the attention region is replaced by one call to a ParC mixer:

* the **token input** ``T`` is what the query / key / value projections read (located by their weights, as
  the attention's :class:`~parc_surgery.attention_form.AttentionForm` names them), walked back through
  layout ops;
* the **region output** ``O`` is the output projection's input (the merged heads); the output projection
  itself stays where it is;
* the region is every node that depends on ``T`` and feeds ``O``. A region node read by anything else (the
  attention weights returned, a projection shared with the MLP) makes the rewrite refuse.

The block becomes a ``torch.fx.GraphModule`` with the mixer as a new submodule (``parc_mixer``); every other
node, submodule (also those its forward never calls), parameter name, buffer and public attribute stays.
Plan, check, then mutate: the region is found and checked on a deep copy before anything is replaced, and
every edit ends with ``graph.lint()``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .blocks._carry import CarryBuilder, CarryRecord
from .dataflow import TRef
from .errors import UnsupportedTargetError
from .module_state import trace_side_effects_undone

__all__ = ["InlinePlan", "plan_inline_rewrite", "rewrite_inline_attention", "trace_block"]

_LAYOUT = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "unflatten", "squeeze", "unsqueeze"}
_LAYOUT_FNS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.squeeze, torch.unsqueeze}
_LINEAR_FNS = {torch.nn.functional.linear, torch.nn.functional.conv2d, torch.matmul, operator.matmul}


class _LeafTracer(torch.fx.Tracer):
    """Traces only the root's own forward: every submodule call stays a ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def trace_block(module: nn.Module, call) -> torch.fx.GraphModule:
    """Trace ``module``'s forward as it was called (``call``: a recorded :class:`ModuleCall`).

    Arguments recorded as ``None`` or bools are fixed (``if mask is not None`` traces as it ran); tensors and
    other values stay inputs. Raises :class:`UnsupportedTargetError` when the forward does not trace.
    """
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    concrete = {}
    for i, a in enumerate(call.args):
        if i < len(params) and (a is None or isinstance(a, bool)):
            concrete[params[i].name] = a
    for k, a in call.kwargs.items():
        if a is None or isinstance(a, bool):
            concrete[k] = a
    for p in params[len(call.args) :]:
        if (
            p.name not in concrete
            and p.default is not inspect.Parameter.empty
            and isinstance(p.default, (type(None), bool))
        ):
            concrete[p.name] = p.default
    tracer = _LeafTracer()
    try:
        with trace_side_effects_undone(module):  # the GraphModule copies the tracer's constants before the undo
            return torch.fx.GraphModule(module, tracer.trace(module, concrete_args=concrete or None))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UnsupportedTargetError(
            f"the attention is computed inline in the {type(module).__qualname__}'s forward (with other computation), "
            f"and that forward does not trace with torch.fx ({type(e).__name__}: {msg}); it cannot be rewritten"
        ) from e


def _uses_param(node: torch.fx.Node, gm: torch.fx.GraphModule, param: str) -> bool:
    """Whether ``node`` applies the weight ``param`` (a submodule call owning it, or a linear / conv / matmul on it)."""
    if node.op == "call_module":  # the submodule holding the weight (every submodule is a traced leaf)
        return param.startswith(node.target + ".")
    if node.op == "call_function" and node.target in _LINEAR_FNS and len(node.args) >= 2:
        w = node.args[1]
        while isinstance(w, torch.fx.Node) and w.op in ("call_method", "call_function") and w.args:
            if w.op == "get_attr":
                break
            name = w.target if isinstance(w.target, str) else getattr(w.target, "__name__", "")
            if name not in ("t", "transpose", "permute"):
                break
            w = w.args[0]
        return isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target == param
    return False


def _layout_root(node):
    while isinstance(node, torch.fx.Node) and node.args and isinstance(node.args[0], torch.fx.Node):
        name = node.target if node.op == "call_method" else None
        if not (name in _LAYOUT or (node.op == "call_function" and node.target in _LAYOUT_FNS)):
            break
        node = node.args[0]
    return node


def _find(gm, params, what: str, type_name: str) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(the node applying one of ``params``, its token input); refused unless exactly one input is found."""
    found = [n for n in gm.graph.nodes if any(_uses_param(n, gm, p) for p in params)]
    inputs = {_layout_root(n.args[0]) for n in found if n.args and isinstance(n.args[0], torch.fx.Node)}
    if not found or len(inputs) != 1:
        raise UnsupportedTargetError(
            f"the {type_name}'s traced forward does not show one {what} reading one tensor "
            f"({len(found)} node(s) apply {', '.join(params)}); it cannot be rewritten"
        )
    return found[0], inputs.pop()


def _shapes(gm: torch.fx.GraphModule, call, shapes: dict[int, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Node name -> output shape, by running a meta copy of ``gm`` on the recorded input shapes ({} if it fails)."""

    def arg(a):
        return torch.zeros(shapes[a.ref], device="meta") if isinstance(a, TRef) else a

    values = []
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if i < len(call.args):
            values.append(arg(call.args[i]))
        elif n.target in call.kwargs:
            values.append(arg(call.kwargs[n.target]))
        else:
            values.append(n.args[0] if n.args else None)
    try:
        meta = copy.deepcopy(gm).to("meta")
        ShapeProp(meta).propagate(*values)
    except Exception:
        return {}
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in meta.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)}  # fmt: skip


@dataclass
class InlinePlan:
    """Where the attention sits in the traced block: the graph, its token input, the region and its output."""

    gm: torch.fx.GraphModule
    work: nn.Module  # the deep copy of the block the graph was traced from
    t: torch.fx.Node
    o: torch.fx.Node
    region: set
    flatten: bool  # the output projection reads (B * N, A): flatten the mixer's (B, N, A)


def plan_inline_rewrite(module: nn.Module, form) -> InlinePlan:
    """Trace a deep copy of ``module`` and find its attention region; raises :class:`UnsupportedTargetError`."""
    type_name = form.type_name.rsplit(".", 1)[-1]
    work = copy.deepcopy(module)
    gm = trace_block(work, form.call)
    _, t = _find(gm, form.q_params, "query / key / value projection", type_name)
    proj, _ = _find(gm, (form.proj_param,), "output projection", type_name)
    o = proj.args[0]
    if not isinstance(o, torch.fx.Node):
        raise UnsupportedTargetError(f"the {type_name}'s output projection does not read a traced tensor")
    region = _region(gm.graph, t, o, type_name)
    shapes = _shapes(gm, form.call, form.shapes)
    cdim = 1 if form.layout == "nchw" else -1
    if shapes and (shapes.get(t.name) != tuple(form.token_shape) or shapes.get(o.name, (0,))[cdim] != form.attn_dim):
        raise UnsupportedTargetError(
            f"the {type_name}'s traced forward does not match its recorded attention (token input "
            f"{shapes.get(t.name)} vs {tuple(form.token_shape)}); it cannot be rewritten"
        )
    flatten = bool(shapes) and len(shapes.get(o.name, ())) == 2 and len(form.token_shape) == 3
    return InlinePlan(gm, work, t, o, region, flatten)


def rewrite_inline_attention(module: nn.Module, form, mixer: nn.Module, built: CarryBuilder):
    """The block ``module`` (never mutated) as a GraphModule whose attention region calls ``mixer``.

    ``built`` records what ``mixer`` carried (names relative to the mixer); the returned :class:`CarryRecord`
    is relative to the block: the block's other parameters ``kept`` under their own names, the mixer's under
    ``parc_mixer.``, the query / key side ``dropped``.
    """
    plan = plan_inline_rewrite(module, form)
    gm, graph, t, o, region = plan.gm, plan.gm.graph, plan.t, plan.o, plan.region
    name = "parc_mixer"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, mixer)
    with graph.inserting_before(o):
        new = graph.call_module(name, (t,))
        if plan.flatten:
            new = graph.call_method("flatten", (new, 0, 1))
    o.replace_all_uses_with(new)
    for node in reversed(list(graph.nodes)):
        if node in region:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    gm.recompile()
    targets = {n.target for n in region if n.op in ("call_module", "get_attr")}
    out = _keep_the_rest(gm, plan.work, used, region_targets=targets)
    out.train(module.training)
    return out, _record(out, module, name, built)


def _region(graph: torch.fx.Graph, t: torch.fx.Node, o: torch.fx.Node, type_name: str) -> set[torch.fx.Node]:
    """Nodes that depend on ``t`` and feed ``o`` (``o`` included); refused when something else reads one."""
    desc, stack = set(), [t]
    while stack:
        for u in stack.pop().users:
            if u not in desc:
                desc.add(u)
                stack.append(u)
    anc, stack = set(), [o]
    while stack:
        n = stack.pop()
        if n in anc:
            continue
        anc.add(n)
        stack.extend(a for a in n.all_input_nodes)
    region = {n for n in (desc & anc) if not _is_metadata(n)} | {o}
    for n in region - {o}:
        outside = [u for u in n.users if u not in region]
        if outside:
            raise UnsupportedTargetError(
                f"in the {type_name}'s traced forward, {n.format_node()} (part of the attention) is also read by "
                f"{outside[0].format_node()}; only a self-contained attention can be rewritten"
            )
    return region


def _is_metadata(node: torch.fx.Node, _memo: dict | None = None) -> bool:
    """A node computing sizes, not tensors: ``x.shape`` / ``x.size()`` / ``x.dim()`` and arithmetic on them."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda")
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", "") in ("_operator", "operator", "math"):
        return bool(node.all_input_nodes) and all(_is_metadata(a) for a in node.all_input_nodes)
    return False


def _keep_the_rest(gm: torch.fx.GraphModule, work: nn.Module, used: set, region_targets: set) -> torch.fx.GraphModule:
    """Drop what only the region read; put back what ``GraphModule`` leaves out (submodules / tensors the forward
    never reads, public attributes)."""
    for target in sorted(region_targets - used, key=lambda t: -t.count(".")):
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if attr in mod._modules:
            del mod._modules[attr]
        elif attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
    for name, child in work.named_children():
        if not hasattr(gm, name) and not any(t == name or t.startswith(name + ".") for t in region_targets - used):
            gm.add_module(name, child)
    for name, p in list(work._parameters.items()):
        if p is not None and name not in gm._parameters and name not in region_targets:
            gm.register_parameter(name, p)
    for name, b in list(work._buffers.items()):
        if b is not None and name not in gm._buffers and name not in region_targets:
            gm.register_buffer(name, b, persistent=name not in work._non_persistent_buffers_set)
    for k, v in vars(work).items():
        if not k.startswith("_") and k != "training" and not hasattr(gm, k) and _is_plain(v):
            gm.__dict__[k] = v
    return gm


def _is_plain(v) -> bool:
    return (
        v is None
        or isinstance(v, (bool, int, float, str))
        or (isinstance(v, tuple) and all(isinstance(i, (bool, int, float, str)) for i in v))
    )


def _record(gm: nn.Module, module: nn.Module, name: str, built: CarryBuilder) -> CarryRecord:
    """Relative to the block: the mixer's carried tensors (under ``name``), and every tensor the rewrite removed
    that the mixer does not carry declared dropped (the query / key side, the attention's own tables). The rest
    stays at its own name, bit-identical, and needs no record."""
    carry = CarryBuilder()
    carry.kept.extend((f"{name}.{a}", b) for a, b in built.kept)
    carry.buffers_kept.extend((f"{name}.{a}", b) for a, b in built.buffers_kept)
    carry.transformed.extend((f"{name}.{a}", olds, how) for a, olds, how in built.transformed)
    sources = {o for _, o in built.kept} | {o for _, olds, _ in built.transformed for o in olds}
    remaining = set(gm.state_dict(keep_vars=True))
    carry.drop(*(n for n in module.state_dict(keep_vars=True) if n not in remaining and n not in sources))
    return carry.finish(gm, module)
