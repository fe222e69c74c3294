"""rich progress bars for heal's long loops, on stderr, shown only on a terminal (and only by rank 0)."""

from __future__ import annotations

import sys

__all__ = ["create_progress", "show_progress"]


def show_progress(option: bool | None, *, main: bool) -> bool:
    """Whether to draw bars: ``option`` if given (rank 0 only), else when stderr is a terminal."""
    if not main:
        return False
    if option is not None:
        return option
    return sys.stderr.isatty()


def create_progress(enabled: bool):
    """A ``rich.progress.Progress`` (a context manager) drawing to stderr; a silent one when not ``enabled``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
