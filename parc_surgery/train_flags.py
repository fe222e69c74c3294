"""Train / eval flags of every module: saved, set to eval for a check, and restored exactly.

``model.train(mode)`` sets one flag on the whole tree, so restoring a model with ``model.train(was_training)``
loses mixed flags (a training model with a frozen, eval-mode ``layer1``). The engine runs its copy of the
model in eval mode (probe, MAC counts, validation, ONNX check) inside :func:`eval_mode`, which puts every
module's own flag back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from torch import nn

__all__ = ["eval_mode", "get_train_flags", "set_train_flags"]


def get_train_flags(model: nn.Module) -> dict[nn.Module, bool]:
    """Each module's ``training`` flag (shared modules once)."""
    return {m: m.training for m in model.modules()}


def set_train_flags(flags: Mapping[nn.Module, bool]) -> None:
    """Put back flags from :func:`get_train_flags`, module by module (not recursively, unlike ``train()``)."""
    for m, flag in flags.items():
        m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode inside the block; each module's own flag restored afterwards."""
    flags = get_train_flags(model)
    model.eval()
    try:
        yield model
    finally:
        set_train_flags(flags)
