"""The package's vocabulary: the choices a rule, the CLI and the blocks accept, each spelled once.

Each choice set is a ``Literal`` (for annotations) and the matching tuple (for checks, messages and
``click.Choice``), derived from it so the two cannot drift.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["IMPLS", "INITS", "KERNEL_IMPLS", "PE_MODES", "Impl", "Init", "KernelImpl", "PeMode"]

Impl = Literal["auto", "spatial", "fft"]
"""How a ParC convolves: ``spatial`` (a depthwise conv), ``fft`` (Fast-ParC) or ``auto`` (by measured crossover)."""

KernelImpl = Literal["spatial", "fft"]
"""The two concrete ParC paths (``auto`` resolved)."""

Init = Literal["warm_start", "reference"]
"""``warm_start`` folds the replaced kernel into ParC; ``reference`` keeps the published initialisation."""

PeMode = Literal["all", "first", "none"]
"""Which ParC layers of a target get a position embedding: all, the first of each stage, or none."""

IMPLS: tuple[str, ...] = get_args(Impl)
KERNEL_IMPLS: tuple[str, ...] = get_args(KernelImpl)
INITS: tuple[str, ...] = get_args(Init)
PE_MODES: tuple[str, ...] = get_args(PeMode)
