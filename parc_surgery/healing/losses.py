"""The two objectives and the measurements: block reconstruction, distillation, agreement and block error.

Stage 1 replays each recorded teacher call on the student's module at the same name and compares the
outputs (every floating-point tensor of the returned structure): mean squared error normalised by
the teacher output's mean square (so every block weighs the same whatever its scale), plus an optional
``1 - cosine`` term. Blocks are independent: each one's loss depends only on its own parameters.
Stage 2 is the temperature-scaled KL divergence of the student's class distribution from the teacher's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TeacherMismatchError
from .chunks import ChunkSource
from .distributed import World, all_sum
from .record import Call, get_logits, tensor_leaves

__all__ = ["BlockBank", "EvalPoint", "as_bank_input", "distill_loss", "measure", "recon_loss", "teacher_accuracy"]

_EPS = 1e-12


def _pairs(student_out: Any, teacher_out: Any, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    s = [t for t in tensor_leaves(student_out) if t.is_floating_point()]
    t = [t for t in tensor_leaves(teacher_out) if t.is_floating_point()]
    if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise TeacherMismatchError(
            f"target {name!r} returns tensors of shapes {[tuple(a.shape) for a in s]} in the converted model but "
            f"{[tuple(b.shape) for b in t]} in the teacher: the teacher does not match the conversion; pass the "
            "model the conversion was made from (teacher=None uses it)"
        )
    if not s:
        raise TeacherMismatchError(f"target {name!r} returns no floating-point tensor; there is nothing to fit")
    return list(zip(s, t))


def recon_loss(student_out: Any, teacher_out: Any, name: str, *, cosine: float = 0.0) -> torch.Tensor:
    """Normalised MSE (+ ``cosine`` x (1 - cosine similarity per sample)) over the output's float tensors."""
    total = 0.0
    pairs = _pairs(student_out, teacher_out, name)
    for s, t in pairs:
        s, t = s.float(), t.float()
        loss = (s - t).pow(2).mean() / (t.pow(2).mean() + _EPS)
        if cosine:
            loss = loss + cosine * (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1, eps=1e-8).mean())
        total = total + loss
    return total / len(pairs)


class BlockBank(nn.Module):
    """The student's target modules side by side; ``forward`` fits each to its own teacher calls.

    A module of its own so that DistributedDataParallel can wrap exactly the blocks that train.
    """

    def __init__(self, student: nn.Module, names: list[str], *, cosine: float = 0.0):
        super().__init__()
        self.names = list(names)
        self.blocks = nn.ModuleList([student.get_submodule(n) for n in self.names])
        self.cosine = cosine

    def forward(self, calls: list[list[tuple[tuple, dict, Any]]]) -> tuple[torch.Tensor, torch.Tensor]:
        per = []
        for name, block, cs in zip(self.names, self.blocks, calls):
            losses = [recon_loss(block(*a, **k), out, name, cosine=self.cosine) for a, k, out in cs]
            per.append(torch.stack(losses).mean())
        per_t = torch.stack(per)
        return per_t.sum(), per_t.detach()


def as_bank_input(calls: dict[str, list[Call]], names: list[str]) -> list[list[tuple[tuple, dict, Any]]]:
    return [[(c.args, c.kwargs, c.output) for c in calls[n]] for n in names]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (Hinton et al. 2015)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


@dataclass(frozen=True)
class EvalPoint:
    """The student against the teacher on the held-out images, at one point of the heal."""

    name: str
    images: int
    agreement: float
    kl: float
    accuracy: float | None = None
    block_errors: dict[str, float] = field(default_factory=dict)

    @property
    def mean_block_error(self) -> float | None:
        return sum(self.block_errors.values()) / len(self.block_errors) if self.block_errors else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalPoint:
        return cls(**d)


@torch.no_grad()
def measure(
    name: str, student: nn.Module, source: ChunkSource, names: list[str], world: World, *, blocks: bool, labelled: bool
) -> EvalPoint:
    """Top-1 agreement, KL(teacher || student) (T = 1), accuracy (with labels), block errors, summed over ranks.

    A block's error is ``sum((student - teacher)^2) / sum(teacher^2)`` over its held-out calls, replayed
    on the teacher's inputs.
    """
    agree = kl = correct = n = 0.0
    sq = {k: [0.0, 0.0] for k in names}
    for chunk in source.once():
        logits = get_logits(student(chunk.x))
        if logits is None or logits.shape != chunk.logits.shape:
            got = None if logits is None else tuple(logits.shape)
            raise TeacherMismatchError(
                f"the converted model returns logits of shape {got} but the teacher {tuple(chunk.logits.shape)}: the "
                "teacher does not match the conversion; pass the model it was made from (teacher=None uses it)"
            )
        agree += float((logits.argmax(-1) == chunk.logits.argmax(-1)).sum())
        kl += float(distill_loss(logits, chunk.logits, 1.0)) * len(logits)
        if labelled and chunk.y is not None:
            correct += float((logits.argmax(-1) == chunk.y).sum())
        n += len(logits)
        if blocks and chunk.calls is not None:
            for k in names:
                block = student.get_submodule(k)
                for c in chunk.calls[k]:
                    for s, t in _pairs(block(*c.args, **c.kwargs), c.output, k):
                        sq[k][0] += float((s.float() - t.float()).pow(2).sum())
                        sq[k][1] += float(t.float().pow(2).sum())
    flat = [agree, kl, correct, n, *(v for k in names for v in sq[k])]
    agree, kl, correct, n, *rest = all_sum(world, flat)
    errors = {}
    if blocks:
        for i, k in enumerate(names):
            errors[k] = rest[2 * i] / max(rest[2 * i + 1], _EPS)
    n = max(n, 1.0)
    return EvalPoint(name, int(n), agree / n, kl / n, correct / n if labelled else None, errors)


@torch.no_grad()
def teacher_accuracy(source: ChunkSource, world: World) -> float | None:
    """The teacher's top-1 accuracy on the labelled held-out images (every rank must call it)."""
    correct = n = 0.0
    for chunk in source.once():
        if chunk.y is not None:
            correct += float((chunk.logits.argmax(-1) == chunk.y).sum())
            n += len(chunk.y)
    correct, n = all_sum(world, [correct, n])
    return correct / n if n else None
