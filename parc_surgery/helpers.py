"""Small helpers shared across the package: size checks, "did you mean" hints, the first tensor of an output.

One copy of each: every module that validates an (H, W) size, suggests a close name or picks the tensor out of
a model's output imports it from here. The error *messages* stay with their callers (each names its own field
and fix); the checks themselves live here once.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["as_hw", "as_kernel_hw", "close_matches", "did_you_mean", "first_tensor", "is_positive_int", "to_hw"]


def is_positive_int(value: Any) -> bool:
    """``value`` is an ``int`` (not a ``bool``) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def to_hw(value: Any, *, pair_only: bool = False) -> tuple[int, int] | None:
    """``value`` as (H, W) of positive ints: one int means (n, n) unless ``pair_only``; ``None`` if it is neither."""
    if not pair_only and is_positive_int(value):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_positive_int(v) for v in value):
        return int(value[0]), int(value[1])
    return None


def as_hw(value: Any, what: str) -> tuple[int, int]:
    """:func:`to_hw` or a :class:`ConfigError` naming ``what`` (the field), the bad value and the accepted forms."""
    hw = to_hw(value)
    if hw is None:
        raise ConfigError(f"{what} must be a positive int or (H, W) of positive ints, got {value!r}")
    return hw


def as_kernel_hw(kernel_hw: Any, owner: str) -> tuple[int, int]:
    """A block's base kernel size given as one int or (along height, along width), else a :class:`ConfigError`."""
    hw = to_hw(kernel_hw)
    if hw is None:
        raise ConfigError(
            f"{owner}: kernel_hw={kernel_hw!r} must be a positive int or a pair (along height, along width) "
            f"of positive ints: the feature size at the model's input size"
        )
    return hw


def close_matches(word: Any, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.5) -> list[str]:
    """Up to ``n`` of ``choices`` close to ``word`` (best first); none for a non-string ``word``."""
    if not isinstance(word, str):
        return []
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)


def did_you_mean(word: Any, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.5) -> str:
    """``"Did you mean 'x'?"`` (or ``'x', 'y'`` for ``n > 1``) for the choices close to ``word``; ``""`` if none."""
    close = close_matches(word, choices, n=n, cutoff=cutoff)
    return f"Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a model output (a tensor, or nested tuples / lists / dicts such as a ``ModelOutput``)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = first_tensor(o)
            if t is not None:
                return t
    return None
