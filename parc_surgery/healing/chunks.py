"""Batches of a rank's images with what the teacher did on them, kept in memory or streamed.

A :class:`Chunk` is one batch: the images, their labels (if any), the teacher's logits and, when asked
for, every target's recorded calls. :class:`ChunkSource` computes the first chunk, estimates the
size of them all and keeps them in CPU memory if that fits the budget (one teacher pass in all);
otherwise it recomputes each chunk when it is needed (the teacher runs again, memory stays at one
batch). Either way the order is seeded per epoch, so a run is reproducible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DataError, TeacherMismatchError
from ..train_flags import eval_mode
from .data import Samples
from .progress import create_progress
from .record import Call, Recorder, get_logits, nbytes

__all__ = ["Budget", "Chunk", "ChunkSource", "TeacherPass"]


@dataclass
class Chunk:
    x: torch.Tensor
    y: torch.Tensor | None
    logits: torch.Tensor
    calls: dict[str, list[Call]] | None = None

    def to(self, device: torch.device) -> Chunk:
        calls = None if self.calls is None else {n: [c.to(device) for c in cs] for n, cs in self.calls.items()}
        y = None if self.y is None else self.y.to(device)
        return Chunk(self.x.to(device), y, self.logits.to(device), calls)

    @property
    def nbytes(self) -> int:
        return nbytes([self.x, self.y, self.logits]) + (0 if self.calls is None else nbytes(list(self.calls.values())))


class Budget:
    """Bytes of CPU memory that recordings may still take (shared by the training and held-out sources)."""

    def __init__(self, nbytes: int):
        self.left = nbytes

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True


class TeacherPass:
    """Runs the teacher on a batch (eval mode, no grad, its own device): logits and, optionally, target calls."""

    def __init__(self, teacher: nn.Module, names: list[str], *, input_size: tuple[int, int]):
        self.teacher, self.names, self.input_size = teacher, list(names), input_size
        p = next(iter(teacher.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32

    def __call__(self, x: torch.Tensor, *, record: bool, device: torch.device) -> tuple[torch.Tensor, dict | None]:
        rec = Recorder(self.teacher, self.names, device=device) if record else contextlib.nullcontext()
        with torch.no_grad(), eval_mode(self.teacher), rec:
            try:
                out = self.teacher(x.to(self.device, self.dtype))
            except Exception as e:
                h, w = self.input_size
                raise DataError(
                    f"the teacher fails on images of shape {tuple(x.shape)}: {type(e).__name__}: {e}. The images "
                    f"must fit the model: the conversion was planned at {h}x{w} (a folder is resized to it)"
                ) from e
        logits = get_logits(out)
        if logits is None:
            raise TeacherMismatchError(
                f"the teacher returned no tensor ({type(out).__name__}); heal needs a model that returns class logits"
            )
        calls = rec.take() if record else None
        if calls is not None:
            missing = [n for n, cs in calls.items() if not cs]
            if missing:
                raise TeacherMismatchError(
                    f"the teacher's forward never called target(s) {missing}: it does not match the conversion; "
                    "pass the model the conversion was made from (teacher=None uses it)"
                )
        return logits.detach().to(device, torch.float32), calls


class ChunkSource:
    """This rank's images in batches of ``batch_size``, each with the teacher's logits (and calls if ``record``)."""

    def __init__(
        self,
        samples: Samples,
        indices: list[int],
        teacher: TeacherPass,
        *,
        batch_size: int,
        record: bool,
        budget: Budget,
        seed: int,
        device: torch.device,
        progress: bool,
        what: str,
    ):
        self.samples, self.indices, self.teacher = samples, list(indices), teacher
        self.batch_size, self.record, self.seed, self.device = max(1, batch_size), record, seed, device
        self.progress, self.what = progress, what
        self.cache: list[Chunk] | None = None
        self._prepare(budget)

    @property
    def n_chunks(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def _batches(self, order: list[int]) -> Iterator[list[int]]:
        for i in range(0, len(order), self.batch_size):
            yield order[i : i + self.batch_size]

    def _compute(self, idx: list[int], device: torch.device) -> Chunk:
        x, y = self.samples.batch(idx)
        logits, calls = self.teacher(x, record=self.record, device=device)
        return Chunk(x.to(device), None if y is None else y.to(device), logits, calls)

    def _prepare(self, budget: Budget) -> None:
        if not self.indices:
            return
        batches = list(self._batches(self.indices))
        first = self._compute(batches[0], torch.device("cpu"))
        if not budget.take(first.nbytes * len(batches)):
            return  # streamed: every chunk is recomputed when it is needed
        cache = [first]
        with create_progress(self.progress) as bar:
            task = bar.add_task(f"recording the teacher ({self.what})", total=len(batches), info="")
            bar.advance(task)
            for idx in batches[1:]:
                cache.append(self._compute(idx, torch.device("cpu")))
                bar.advance(task)
        self.cache = cache

    def drop_calls(self) -> None:
        """Forget the recorded calls (stage 1 is over); logits and images stay."""
        self.record = False
        if self.cache is not None:
            for c in self.cache:
                c.calls = None

    def once(self) -> Iterator[Chunk]:
        """Every chunk once, in a fixed order, on the training device."""
        if self.cache is not None:
            for c in self.cache:
                yield c.to(self.device)
            return
        for idx in self._batches(self.indices):
            yield self._compute(idx, self.device)

    def cycle(self, steps: int) -> Iterator[Chunk]:
        """``steps`` chunks, epoch after epoch, reshuffled each epoch with ``seed + epoch``."""
        if not self.indices or steps <= 0:
            return
        done, epoch = 0, 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            if self.cache is not None:
                chunks = (self.cache[i].to(self.device) for i in torch.randperm(len(self.cache), generator=g).tolist())
            else:
                order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()]
                chunks = (self._compute(idx, self.device) for idx in self._batches(order))
            for c in chunks:
                yield c
                done += 1
                if done == steps:
                    return
            epoch += 1
