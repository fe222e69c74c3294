"""Finding a model's stages from its structure and the probe, so fractions work on unseen models.

A *block container* is a plain ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` whose children
are composite modules (modules with submodules of their own; subclasses of Sequential such as
torchvision's ``Conv2dNormActivation`` count as blocks, not containers), or a stage module of its own class
(timm's ``RegStage``, torchvision's ``AnyStage``) whose >= 2 children are composite modules of one class that
the probe saw run one after the other, each feeding the next. A *stage* is a run of consecutive called blocks of
one container with one feature shape: a container whose blocks change resolution or width midway
(torchvision's ``mobilenet_v2().features``) is split there, and the block that changes the shape is the first
of the stage it outputs into; where a container is split, a run of a single block that only changes the shape
(a stem, a widening block between two runs, a final 1x1 conv) is a transition, not a stage.

A container whose children are stage wrappers (each holds a block container or is a stage module itself, and
each after the first changes the shape: timm's ``ConvNeXt.stages``, torchvision's RegNet ``trunk_output``) is a
container of stages, not a stage. A block of a stage, and a container nested inside one (MobileViT's
transformer, torchvision's ``MBConv.block``), is not a top-level stage. Stages are numbered in call order
(0-based; rules may count from the end with negative indices). timm's ``feature_info`` is attached where a
stage's container is named there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from .probe import ProbeResult

__all__ = ["Stage", "find_stages"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Stage:
    index: int
    container: str  # qualified name of the container holding the blocks
    blocks: tuple[str, ...]  # qualified names, in call order
    channels: int | None  # output channels of the last block
    feature_size: tuple[int, ...] | None  # spatial size (or token count) of the stage's output
    first_changes_shape: bool  # the first block changes the feature shape (strided / channel change)
    feature_info: int | None = None  # index into timm's feature_info, where named

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "container": self.container,
            "blocks": list(self.blocks),
            "channels": self.channels,
            "feature_size": list(self.feature_size) if self.feature_size else None,
        }


def _is_container(m: nn.Module) -> bool:
    return type(m) in _CONTAINERS


def _is_block(m: nn.Module) -> bool:
    return not _is_container(m) and any(True for _ in m.children())


def _spatial(shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if shape is None:
        return None
    return tuple(shape[2:]) if len(shape) == 4 else tuple(shape[1:-1])


def _channels(shape: tuple[int, ...] | None) -> int | None:
    if shape is None or len(shape) < 2:
        return None
    return shape[1] if len(shape) == 4 else shape[-1]


def _changes_shape(probe: ProbeResult, name: str) -> bool:
    rec = probe.calls[name]
    return rec.in_shape != rec.out_shape


def _is_block_container(m: nn.Module) -> bool:
    children = list(m.children())
    return _is_container(m) and bool(children) and all(_is_block(c) for c in children)


def _is_custom_stage(m: nn.Module, probe: ProbeResult, prefix: str) -> bool:
    """A stage module of its own class (timm's ``RegStage``): >= 2 composite children of one class, holding no
    block container, run one after the other in registration order, each feeding the next its output shape."""
    children = list(m.named_children())
    if _is_container(m) or len(children) < 2 or len({type(c) for _, c in children}) != 1:
        return False
    if not all(_is_block(c) for _, c in children) or any(_has_block_container(c) for _, c in children):
        return False
    recs = [probe.calls.get(prefix + n) for n, _ in children]
    if any(r is None or r.calls != 1 for r in recs):
        return False
    return all(a.order < b.order and a.out_shape == b.in_shape for a, b in itertools.pairwise(recs))


def _has_block_container(m: nn.Module) -> bool:
    return any(_is_block_container(d) for d in m.modules())


def _has_nested_container(m: nn.Module) -> bool:
    return any(_is_block_container(d) for d in m.modules() if d is not m)


def _holds_stages(cont: nn.Module, probe: ProbeResult, prefix: str) -> bool:
    """Whether ``cont``'s children are stage wrappers (timm's ``ConvNeXtStage``, torchvision's RegNet
    ``AnyStage``), not blocks: each holds a block container or is a stage module itself (or is of the class of
    such siblings), and after the first every child changes the feature shape (each wrapper downsamples), so
    they form no run of blocks. Blocks holding a container of their own (torchvision's ``MBConv.block``,
    ``transformers``' ``ResNet*Layer.layer``) run one after the other at one shape: their container is a stage.
    A lone child is a wrapper only if it is a stage module itself."""
    children = list(cont.named_children())
    wraps = [_has_nested_container(c) or _is_custom_stage(c, probe, f"{prefix}{n}.") for n, c in children]
    one_class = len({type(c) for _, c in children}) == 1
    if not (all(wraps) or (one_class and any(wraps))):
        return False
    if len(children) == 1:  # a lone child is a stage of one block, unless it is a stage module itself
        name, child = children[0]
        return _is_custom_stage(child, probe, f"{prefix}{name}.")
    recs = sorted((probe.calls[prefix + n] for n, _ in children if probe.called(prefix + n)), key=lambda r: r.order)
    return all(r.in_shape != r.out_shape for r in recs[1:])


def find_stages(model: nn.Module, probe: ProbeResult) -> list[Stage]:
    """All stages of ``model``, in call order (see the module docstring for the definition)."""
    runs: list[tuple[int, str, list[str]]] = []
    containers = []
    for cname, cont in model.named_modules():
        prefix = f"{cname}." if cname else ""
        if not (_is_block_container(cont) or _is_custom_stage(cont, probe, prefix)):
            continue
        children = list(cont.named_children())
        if _holds_stages(cont, probe, prefix):
            continue  # its children are stage wrappers (e.g. ConvNeXtStage), not blocks
        if any(cname == b or cname.startswith(f"{b}.") for outer in containers for b in outer):
            continue  # a block of an outer stage, or nested inside one (e.g. MobileViT's transformer)
        containers.append([prefix + n for n, _ in children])
        called = [(probe.calls[prefix + n].order, prefix + n) for n, _ in children if probe.called(prefix + n)]
        if not called:
            continue
        called.sort()
        # split where a block changes the feature shape (resolution or channels)
        split: list[list[str]] = [[]]
        for _, name in called:
            rec = probe.calls[name]
            if split[-1] and rec.in_shape != rec.out_shape:
                split.append([])
            split[-1].append(name)
        for run in split:
            if len(split) > 1 and len(run) == 1 and _changes_shape(probe, run[0]):
                continue  # one block between two runs that only changes the shape: a transition, not a stage
            runs.append((probe.calls[run[0]].order, cname, run))
    runs.sort()
    # name split runs container[a:b] when a container yields several stages
    per_container: dict[str, int] = {}
    for _, cname, _ in runs:
        per_container[cname] = per_container.get(cname, 0) + 1
    fi = {}
    for i, info in enumerate(getattr(model, "feature_info", None) or []):
        mod = info.get("module") if isinstance(info, dict) else None
        if mod:
            fi[mod] = i
    stages = []
    for idx, (_, cname, names) in enumerate(runs):
        label = cname
        if per_container[cname] > 1:
            kids = [n for n, _ in model.get_submodule(cname).named_children()] if cname else []
            first = names[0].rsplit(".", 1)[-1]
            last = names[-1].rsplit(".", 1)[-1]
            a = kids.index(first) if first in kids else first
            b = (kids.index(last) + 1) if last in kids else last
            label = f"{cname}[{a}:{b}]"
        first_rec, last_rec = probe.calls[names[0]], probe.calls[names[-1]]
        changes = first_rec.in_shape != first_rec.out_shape
        keys = [names[-1], cname] + [cname.rsplit(".", i)[0] for i in range(1, cname.count(".") + 1)]
        fidx = next((fi[k] for k in keys if k in fi), None)
        stages.append(
            Stage(idx, label, tuple(names), _channels(last_rec.out_shape), _spatial(last_rec.out_shape), changes, fidx)
        )
    return stages
