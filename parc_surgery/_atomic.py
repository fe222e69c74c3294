"""Atomic file writes: a temporary file in the target's directory, then ``os.replace``.

A failed write leaves no partial file and keeps any existing file as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import CheckpointError

__all__ = ["atomic_target", "check_target"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_target(path: Path, force: bool) -> None:
    """Raise :class:`CheckpointError` unless ``path`` can be written: its directory exists, it is no directory,
    and it does not exist yet unless ``force``."""
    directory = path.parent
    if not directory.exists():
        raise CheckpointError(
            f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist; create it first"
        )
    if not directory.is_dir():
        raise CheckpointError(f"cannot write {str(path)!r}: {str(directory)!r} is not a directory")
    if path.is_dir():
        raise CheckpointError(f"cannot write {str(path)!r}: it is a directory")
    if path.exists() and not force:
        raise CheckpointError(
            f"{str(path)!r} exists already; pass force=True (CLI: --force) to overwrite it (it was left untouched)"
        )


@contextlib.contextmanager
def atomic_target(path: Path, *, before_replace: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success give it the usual permissions and move it there.

    ``before_replace`` runs right before the move (e.g. a last check that the target did not appear).
    Any exception removes the temporary file and propagates.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
