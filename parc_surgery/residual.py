"""Residual blocks found by structure: which spatial conv of a block a ParC replaces, read from its fx graph.

A *residual add* in a block's graph is an ``add`` (``+``, ``+=``, ``torch.add``, ``Tensor.add`` / ``add_``)
of two tensors ``s`` (the shortcut) and ``r`` (the residual path) where

* ``s`` depends on the block's input and is the input itself, or a *projection* of it: every spatial conv
  (an ``nn.Conv2d`` with a kernel side > 1) upstream of ``s`` is upstream of ``r`` too (a 1x1 conv + norm
  downsample, an average pool, an identity); and
* ``r`` has at least one spatial conv upstream that ``s`` has not: the *path* convs.

That is ``x + f(x)``, ``f(x) + proj(x)`` and ``y + g(y)`` after an earlier unit ``y = ...``, whatever the
block's class; two parallel conv branches (``f(x) + g(x)``) or adding a constant are not residual adds. The
target is the path's last spatial (or depthwise) conv: the one no other path conv feeds. Refused, with the
form found: a forward that does not trace, no residual add, several residual adds with spatial convs, a
path that ends in parallel spatial convs, spatial convs outside the path and the shortcut that also shape the
output (``x + a(x) + b(x)``). Convs called as functions (``F.conv2d``) are not modules and are
not seen.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from .probe import trace_model

__all__ = ["ResidualForm", "find_residual", "residual_form", "spatial_convs"]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")


@dataclass(frozen=True)
class ResidualForm:
    """What a block's graph says about its residual structure.

    conv: qualified name (inside the block) of the spatial conv to replace, ``None`` when there is none.
    path: the spatial convs on the residual path, in graph order (the target is the last).
    shortcut: ``"identity"`` or ``"projection through <modules>"``; ``""`` when no residual add was found.
    problem: why no conv was chosen (``None`` when ``conv`` is set).
    """

    conv: str | None
    path: tuple[str, ...] = ()
    shortcut: str = ""
    problem: str | None = None

    def describe(self) -> str:
        if self.conv is None:
            return f"not a residual block with one conv to replace: {self.problem}"
        return f"residual block: {self.shortcut} shortcut + path through {', '.join(self.path)}; replaces {self.conv}"


def spatial_convs(module: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The ``nn.Conv2d`` modules inside ``module`` (itself excluded) with a kernel side > 1, in registration order."""
    return [(n, m) for n, m in module.named_modules() if n and isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]


def find_residual(module: nn.Module, leaf_types: tuple[type, ...] = ()) -> ResidualForm:
    """Trace ``module`` with torch.fx (timm's leaves plus ``leaf_types``) and read its :class:`ResidualForm`."""
    gm, why = trace_model(module, leaf_types)
    if gm is None:
        return ResidualForm(None, problem=f"its forward does not trace with torch.fx ({why})")
    return residual_form(gm)


def _is_add(n: torch.fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _ADD_FUNCTIONS
    return n.op == "call_method" and n.target in _ADD_METHODS


def residual_form(gm: torch.fx.GraphModule) -> ResidualForm:
    """The :class:`ResidualForm` of a traced block (see the module docstring)."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if not inputs:
        return ResidualForm(None, problem="its forward takes no input")
    x = inputs[0]

    def spatial(n: torch.fx.Node) -> bool:
        m = modules.get(n.target) if n.op == "call_module" else None
        return isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1

    ancestors: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}
    convs: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}  # spatial convs upstream of a node, itself included
    for n in nodes:  # graph order is topological
        up = frozenset().union(*({i} | ancestors[i] for i in n.all_input_nodes))
        ancestors[n] = up
        own = frozenset(a for a in up if spatial(a))
        convs[n] = own | ({n} if spatial(n) else frozenset())

    found = []  # (add node, shortcut node, path conv nodes)
    for n in nodes:
        if not _is_add(n):
            continue
        args = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
        if len(args) != 2:
            continue
        for s, r in (args, args[::-1]):
            if (s is x or x in ancestors[s]) and convs[s] < convs[r]:
                found.append((n, s, convs[r] - convs[s]))
                break
    if not found:
        return ResidualForm(
            None,
            problem="no residual add: its forward adds no tensor derived from its input (or a projection of it) "
            "to a path holding a spatial conv",
        )
    if len(found) > 1:
        desc = "; ".join(f"{a.name}: {', '.join(_names(p))}" for a, _, p in found[:4])
        return ResidualForm(
            None,
            problem=f"{len(found)} residual adds with spatial convs ({desc}); which conv to replace is ambiguous: "
            "select the inner units",
        )
    add, s, path = found[0]
    r = next(a for a in add.args[:2] if isinstance(a, torch.fx.Node) and a is not s)
    out = next((n for n in reversed(nodes) if n.op == "output"), None)
    outside = (convs[out] if out is not None else frozenset()) - path - convs[s]
    if outside:
        return ResidualForm(
            None,
            tuple(_names(c for c in nodes if c in path)),
            _shortcut(s, r, ancestors, modules),
            f"spatial convs outside its residual path ({', '.join(_names(c for c in nodes if c in outside))}) also "
            "shape its output; which conv to replace is ambiguous",
        )
    ordered = [c for c in nodes if c in path]
    last = [c for c in ordered if not any(c in ancestors[o] for o in ordered if o is not c)]
    names = _names(ordered)
    if len(last) > 1:
        return ResidualForm(
            None,
            tuple(names),
            _shortcut(s, r, ancestors, modules),
            f"its residual path ends in {len(last)} parallel spatial convs ({', '.join(_names(last))}); which one to "
            "replace is ambiguous",
        )
    return ResidualForm(str(last[0].target), tuple(names), _shortcut(s, r, ancestors, modules))


def _names(nodes) -> list[str]:
    return [str(c.target) for c in nodes]


def _shortcut(s: torch.fx.Node, r: torch.fx.Node, ancestors, modules) -> str:
    """``identity`` when the path starts from the shortcut itself, else the modules only the shortcut runs."""
    if s in ancestors[r]:
        return "identity"
    own = (ancestors[s] | {s}) - ancestors[r]
    via = sorted(
        str(a.target)
        for a in own
        if a.op == "call_module" and a.target in modules and not isinstance(modules[a.target], nn.Identity)
    )
    return f"projection through {', '.join(via)}" if via else "identity"
