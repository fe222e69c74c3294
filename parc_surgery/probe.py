"""Probing a model: one recorded forward pass (shapes, call order, attention ops) and an fx trace.

``probe_model`` runs the model once at a given input size (eval mode, no grad, on whatever device the
model lives on, the meta device included) with forward hooks on every submodule and a dispatch mode that
sees every aten op. It records, per module, the input/output shapes of each call and the call order,
and finds attention token mixers *structurally*: a module whose own forward runs
``scaled_dot_product_attention`` or a ``softmax`` fed by a matmul whose result feeds another matmul
(softmax(Q K^T) V), whatever the module is called (ops of parameter-free leaf children such as an
``nn.Softmax`` count as the caller's own). Only attention that keeps its input's token / spatial layout
is a token mixer (``ProbeResult.attention``); attention pooling and class / cross attention, whose
output has fewer tokens, are listed apart (``ProbeResult.other_attention``).

``trace_model`` tries torch.fx with timm's leaf registry (plus any extra leaf types); models that don't
trace are still handled through the recorded forward (the hooks), and the report says which was used.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from .dataflow import Dataflow, DataflowRecorder, ModuleCall
from .errors import TraceError
from .helpers import first_tensor
from .inputs import example_input, get_in_chans  # noqa: F401  (example_input: also imported from here)
from .module_state import trace_side_effects_undone
from .train_flags import eval_mode

__all__ = [
    "CallRecord",
    "ProbeResult",
    "example_input",
    "get_timm_leaves",
    "probe_model",
    "trace_model",
]

_aten = torch.ops.aten
_MATMUL_OPS = {"mm", "bmm", "matmul", "baddbmm", "addmm", "einsum", "_unsafe_view_mm"}
_SOFTMAX_OPS = {"_softmax", "softmax", "_safe_softmax", "_log_softmax"}


def _is_sdpa(name: str) -> bool:
    return "scaled_dot_product" in name or name.startswith("_flash_attention") or name.startswith("_efficient_att")


@dataclass
class CallRecord:
    """What one module did during the probe: shapes of each call, first call index (call order)."""

    name: str
    type_name: str
    order: int
    in_shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    out_shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    out_tensor: list[bool] = field(default_factory=list)  # per call: the output was a plain tensor
    call_args: list[ModuleCall] = field(default_factory=list)  # per call: arguments and output, tensors by reference

    @property
    def calls(self) -> int:
        return len(self.in_shapes)

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        return self.in_shapes[0] if self.in_shapes else None

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return self.out_shapes[0] if self.out_shapes else None


@dataclass
class ProbeResult:
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    calls: dict[str, CallRecord]
    attention: tuple[str, ...]  # attention token mixers: attention that keeps the token / spatial layout
    aliases: dict[str, tuple[str, ...]]  # name -> every qualified name of the same module object
    output: torch.Tensor | None = None  # the (first tensor of the) model output
    other_attention: tuple[str, ...] = ()  # attention that is no token mixer (pooling, class / cross attention)
    raw_output: Any = None  # the model output as returned (a tensor, tuple, dict or ModelOutput)
    flow: Dataflow = field(default_factory=Dataflow)  # every aten op of the forward, tensors by reference
    forms: dict = field(default_factory=dict)  # name -> AttentionForm or its refusal (attention_form's cache)

    def called(self, name: str) -> bool:
        rec = self.calls.get(name)
        return rec is not None and rec.calls > 0


def _attention_owners(flow: Dataflow) -> list[str]:
    ops: dict[str, list[str]] = {}
    for op in flow.ops:
        ops.setdefault(op.owner, []).append(op.name)
    found = []
    for owner, seq in ops.items():
        if not owner:
            continue
        if any(_is_sdpa(op) for op in seq):
            found.append(owner)
            continue
        for i, op in enumerate(seq):
            if op in _SOFTMAX_OPS:
                before = any(o in _MATMUL_OPS for o in seq[:i])
                after = any(o in _MATMUL_OPS for o in seq[i + 1 :])
                if before and after:
                    found.append(owner)
                    break
    return found


def probe_model(model: nn.Module, x: torch.Tensor) -> ProbeResult:
    """Run ``model(x)`` once in eval mode without grad, recording shapes, call order and attention ops.

    Every module's training flag is restored afterwards; nothing else about the model changes.
    """
    calls: dict[str, CallRecord] = {}
    aliases: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            aliases.setdefault(id(mod), []).append(name)
    stack: list[str] = []
    counter = [0]
    handles = []
    pending: dict[str, list] = {}
    transparent = frozenset(
        name
        for name, mod in model.named_modules()
        if name and not any(True for _ in mod.children()) and not any(True for _ in mod.parameters())
    )
    recorder = DataflowRecorder(model, stack, transparent)

    def pre(name):
        def hook(mod, args, kwargs=None):
            stack.append(name)
            rec = calls.get(name)
            if rec is None:
                rec = calls[name] = CallRecord(name, type(mod).__name__, counter[0])
                counter[0] += 1
            t = first_tensor(args) if args else first_tensor(kwargs or {})
            rec.in_shapes.append(tuple(t.shape) if t is not None else None)
            pending.setdefault(name, []).append((recorder.to_refs((args, kwargs or {})), len(recorder.flow.ops)))

        return hook

    def post(name):
        def hook(mod, args, out):
            if stack and stack[-1] == name:
                stack.pop()
            t = first_tensor(out)
            rec = calls[name]
            rec.out_shapes.append(tuple(t.shape) if t is not None else None)
            rec.out_tensor.append(isinstance(out, torch.Tensor))
            (a, k), start = pending[name].pop()
            rec.call_args.append(ModuleCall(a, k, recorder.to_refs(out), (start, len(recorder.flow.ops))))

        return hook

    seen = set()
    for name, mod in model.named_modules():
        if not name or id(mod) in seen:
            continue
        seen.add(id(mod))
        handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(mod.register_forward_hook(post(name)))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention / nn.TransformerEncoderLayer run one fused op in eval without grad; the probe
        # needs to see their attention as attention (projections, SDPA), so their fast path is off here
        torch.backends.mha.set_fastpath_enabled(False)
        with eval_mode(model), torch.no_grad(), recorder:
            recorder.to_refs(x, taint=True)
            out = model(x)
    except Exception as e:  # the model's own failure at this size
        hint = (
            "On the meta device a model that reads tensor values (.item(), a data-dependent branch) cannot run: "
            "build it on a real device."
            if x.device.type == "meta"
            else "Pass an input size the model accepts (input_size=(H, W) / --input-size H W)."
        )
        raise TraceError(f"the model fails at input shape {tuple(x.shape)}: {type(e).__name__}: {e}. {hint}") from e
    finally:
        for h in handles:
            h.remove()
        torch.backends.mha.set_fastpath_enabled(fastpath)
    t = first_tensor(out)
    owners = _attention_owners(recorder.flow)
    attention = tuple(n for n in owners if _keeps_layout(calls[n]))
    other = tuple(n for n in owners if n not in attention)
    alias_map = {}
    for names in aliases.values():
        for n in names:
            alias_map[n] = tuple(names)
    # records under the canonical (first) name only; expose aliases separately
    return ProbeResult(
        tuple(x.shape),
        tuple(t.shape) if t is not None else None,
        calls,
        attention,
        alias_map,
        t,
        other,
        out,
        recorder.flow,
    )


def _keeps_layout(rec: CallRecord) -> bool:
    """Whether every call maps its input to an output with the same batch and token / spatial extent.

    (B, N, C) -> (B, N, C'), (B, C, H, W) -> (B, C', H, W) or (B, H, W, C) -> (B, H, W, C'): a token mixer.
    Attention pooling ((B, N, C) -> (B, C)) and class / cross attention ((B, 1 + N, C) -> (B, 1, C)) are not.
    """
    if not rec.in_shapes:
        return False
    for a, b in zip(rec.in_shapes, rec.out_shapes):
        if a is None or b is None or len(a) != len(b) or a[0] != b[0]:
            return False
        if len(a) == 3:
            if a[1] != b[1]:
                return False
        elif len(a) == 4:
            if a[2:] != b[2:] and a[1:3] != b[1:3]:
                return False
        else:
            return False
    return True


def get_timm_leaves() -> tuple[list[type], list]:
    """timm's not-traceable modules and functions (fx leaves in every trace of a timm model)."""
    try:
        from timm.layers import _fx as timm_fx

        return list(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())
    except Exception:  # pragma: no cover - timm always has it in supported versions
        return [], []


def _default_args(model: nn.Module) -> dict | None:
    """The forward's optional arguments at their defaults (``mask=None``): the engine only calls ``model(x)``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {
        p.name: p.default
        for p in params[1:]
        if p.kind in kinds and p.default is not inspect.Parameter.empty and isinstance(p.default, (type(None), bool))
    }
    return out or None


def trace_model(model: nn.Module, leaf_types: Iterable[type] = ()) -> tuple[torch.fx.GraphModule | None, str]:
    """Symbolically trace ``model`` with timm's leaf modules/functions plus ``leaf_types`` as leaves.

    The forward's optional ``None`` / bool arguments are fixed at their defaults (the engine calls ``model(x)``),
    so branches such as ``if mask is not None`` trace as they run.

    Returns ``(graph_module, "")`` or ``(None, reason)`` when the model does not trace.
    """
    leaves, fns = get_timm_leaves()
    leaf_set = tuple({*leaves, *leaf_types})

    class _Tracer(torch.fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(f for f in fns if callable(f)))

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if leaf_set and isinstance(m, leaf_set):
                return True
            return super().is_leaf_module(m, qualname)

    try:
        tracer = _Tracer()
        with trace_side_effects_undone(model):
            graph = tracer.trace(model, concrete_args=_default_args(model))
            # built before the undo: the tensor constants the tracer set on the root are copied into the
            # GraphModule, then removed from the user's model.
            # The default class name: torch.fx makes a class per GraphModule, and one named after the model's own
            # class would put that name among the torch classes a rule may name (parc_surgery.types' allow-list)
            return torch.fx.GraphModule(tracer.root, graph), ""
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
