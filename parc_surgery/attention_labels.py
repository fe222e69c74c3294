"""Which parameter entries a channel of an attention comes from, found by replaying recorded ops on labels.

An attention's value projection may be a fused ``qkv`` Linear split by ``reshape / permute / unbind``, a
``chunk``, ``nn.MultiheadAttention``'s packed ``in_proj_weight``, heads interleaved per head, ... Rather
than recognise each layout, the recorded aten ops between the projection and the attention core are
*replayed* on integer label tensors: every channel of the projection's output carries the label of the
parameter row it is computed from, the head split / merge ops move the labels exactly as they moved the
values, and the labels that arrive at the output projection say which row feeds which merged channel.

A label is ``slot * 2**32 + index + 1`` (``slot`` names a parameter or a projection output, ``index`` a flat
entry or a channel); ``0`` marks an entry with no source (zeros, padding). Ops that keep the shape of their
one replayable input (norms, activations, dtype casts, dropout) pass the labels through unchanged;
any other op stops the replay (:class:`Unreplayable`), and the caller then carries nothing.
"""

from __future__ import annotations

import torch

from .dataflow import METADATA_OPS, Dataflow, OpRecord, TRef

__all__ = ["LAYOUT_OPS", "LabelReplay", "Unreplayable", "channel_labels", "decode", "label_tensor", "with_stride"]

SLOT = 2**32

# ops that only move, copy or select entries: replayed for real on the labels
LAYOUT_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand", "clone",
        "contiguous", "alias", "detach", "unsqueeze", "squeeze", "flatten", "unflatten", "select", "slice",
        "unbind", "split", "split_with_sizes", "chunk", "narrow", "constant_pad_nd", "roll", "cat", "stack",
        "movedim", "swapaxes", "as_strided", "repeat", "lift_fresh_copy", "_to_copy", "to", "pixel_shuffle",
        "pixel_unshuffle", "index_select", "flip",
    }
)  # fmt: skip
_CASTS = frozenset({"_to_copy", "to"})


class Unreplayable(Exception):
    """The replay met an op (or a tensor) it cannot follow."""


def label_tensor(slot: int, shape, stride=None, *, dim: int | None = None) -> torch.Tensor:
    """Labels for a tensor of ``shape``: per flat entry (``dim=None``) or per index along ``dim``."""
    shape = tuple(shape)
    if dim is None:
        lab = torch.arange(1, 1 + max(1, _numel(shape)), dtype=torch.int64)[: _numel(shape)].reshape(shape)
    else:
        view = [1] * len(shape)
        view[dim] = shape[dim]
        lab = torch.arange(1, 1 + shape[dim], dtype=torch.int64).reshape(view).expand(shape)
    lab = lab + slot * SLOT
    return with_stride(lab, stride)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def with_stride(lab: torch.Tensor, stride) -> torch.Tensor:
    if stride and tuple(stride) != tuple(lab.stride()) and len(stride) == lab.dim():
        out = torch.empty_strided(lab.shape, tuple(stride), dtype=lab.dtype)
        out.copy_(lab)
        return out
    return lab.contiguous() if not stride else lab


def decode(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, index) of each label; index -1 where the label is 0 (no source)."""
    return torch.div(lab - 1, SLOT, rounding_mode="floor"), torch.where(lab > 0, (lab - 1) % SLOT, -1)


class LabelReplay:
    """Evaluate recorded tensors as labels, from ``roots`` (ref -> label tensor), within ops ``[lo, hi)``."""

    def __init__(self, flow: Dataflow, lo: int, hi: int, roots: dict[int, torch.Tensor]):
        self.flow, self.lo, self.hi = flow, lo, hi
        self.memo: dict[int, torch.Tensor] = dict(roots)
        self.failed: set[int] = set()

    def __call__(self, ref: int) -> torch.Tensor:
        if ref in self.memo:
            return self.memo[ref]
        if ref in self.failed:
            raise Unreplayable(f"tensor {ref}")
        try:
            self._run(self._producer(ref))
        except Unreplayable:
            self.failed.add(ref)
            raise
        return self.memo[ref]

    def _producer(self, ref: int) -> OpRecord:
        op = self.flow.producer(ref)
        if op is None or not (self.lo <= op.index < self.hi):
            raise Unreplayable(f"tensor {ref} comes from outside the replayed ops")
        return op

    def _run(self, op: OpRecord) -> None:
        name = op.name
        infos = [self.flow.tensors[r] for r in op.outputs]
        if name in METADATA_OPS or name in ("zeros", "full", "empty", "new_zeros", "zero"):
            outs = [torch.zeros(i.shape, dtype=torch.int64) for i in infos]
        elif name in LAYOUT_OPS:
            args = self._subst(op.args)
            kwargs = {k: v for k, v in self._subst(op.kwargs).items() if k not in ("dtype", "device", "layout")}
            if name in _CASTS:
                outs = [args[0].clone()]
            else:
                res = op.func(*args, **kwargs)
                outs = list(res) if isinstance(res, (list, tuple)) else [res]
        else:  # shape-keeping ops with one replayable input pass the labels through (norms, activations, casts)
            live = []
            for r in dict.fromkeys(op.inputs):
                try:
                    live.append(self(r))
                except Unreplayable:
                    continue
            if len(live) != 1 or not infos or tuple(live[0].shape) != infos[0].shape:
                raise Unreplayable(f"{name} changes or mixes what it reads")
            outs = [live[0]]
        for r, info, lab in zip(op.outputs, infos, outs):
            if tuple(lab.shape) != info.shape:
                raise Unreplayable(f"{name}: replayed shape {tuple(lab.shape)} != recorded {info.shape}")
            self.memo[r] = with_stride(lab, info.stride)

    def _subst(self, obj):
        if isinstance(obj, TRef):
            return self(obj.ref)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._subst(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._subst(v) for k, v in obj.items()}
        return obj


def channel_labels(lab: torch.Tensor, dim: int) -> torch.Tensor:
    """The label of each index along ``dim`` when ``lab`` is constant over every other dim; else raise."""
    moved = lab.movedim(dim, -1).reshape(-1, lab.shape[dim])
    first = moved[0]
    if not bool((moved[-1] == first).all() and (moved[len(moved) // 2] == first).all()):  # sampled: mixing shows
        raise Unreplayable("labels vary along the token / spatial dims: the channels were mixed")
    return first
