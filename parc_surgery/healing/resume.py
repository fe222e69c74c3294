"""Resumable heals: each finished stage's weights (safetensors) and figures (JSON) in a work folder.

``heal(..., work_dir=DIR)`` writes ``DIR/stage1.safetensors`` / ``DIR/stage2.safetensors`` (the whole
student after that stage, written atomically) and then ``DIR/heal_state.json`` (the figures so far).
Run again with the same folder and the same conversion, data and options, and it restores the last
finished stage and carries on from there. The state records a fingerprint of what the heal was; a
folder that holds another heal is refused rather than silently mixed. Only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from .._atomic import atomic_target
from ..errors import CheckpointError
from .distributed import World, barrier

__all__ = ["STATE_FILE", "HealCheckpoint", "create_fingerprint"]

STATE_FILE = "heal_state.json"
_FORMAT, _VERSION = "parc-surgery-heal-state", 1
_NOT_FINGERPRINTED = ("progress", "device", "cache_mb", "stages")  # how it runs (stages: how far), not what


def create_fingerprint(student: nn.Module, names: list[str], *, plan, config, data) -> dict[str, Any]:
    """What makes two heals the same: model, rule, targets, the targets' starting weights, options, data."""
    h = hashlib.sha256()
    for n in names:
        for k, t in sorted(student.get_submodule(n).state_dict().items()):
            h.update(f"{n}.{k}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(-1).numpy().tobytes())
    return {
        "model": plan.model,
        "rule": plan.rule,
        "targets": list(names),
        "weights": h.hexdigest()[:16],
        "config": {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED},
        "data": {"source": data.source, "train": len(data.train_indices), "heldout": len(data.heldout_indices)},
    }


class HealCheckpoint:
    """The work folder of one heal (or nothing, when ``folder`` is None)."""

    def __init__(self, folder, fingerprint: dict, world: World):
        self.folder = None if folder is None else Path(folder)
        self.fingerprint, self.world = fingerprint, world
        self.state: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "fingerprint": fingerprint, "stages": {}}
        if self.folder is None:
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"work_dir {str(self.folder)!r} is a file; give a folder (it is created if missing)")
        path = self.folder / STATE_FILE
        if path.is_file():
            self.state = self._read(path)
        elif world.main:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create work_dir {str(self.folder)!r}: {e}") from e
        barrier(world)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {str(path)!r}: {e}; delete it to start the heal afresh") from e
        if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise CheckpointError(f"{str(path)!r} is not a heal state this version writes; delete it or use another")
        old = state.get("fingerprint", {})
        if old != self.fingerprint:
            diff = []
            for k in sorted({*old, *self.fingerprint}):
                a, b = old.get(k), self.fingerprint.get(k)
                if a != b and k == "config" and isinstance(a, dict):
                    diff.append("config: " + ", ".join(o for o in sorted({*a, *b}) if a.get(o) != b.get(o)))
                elif a != b:
                    diff.append(k)
            raise CheckpointError(
                f"{str(self.folder)!r} holds a heal of something else (it differs in {'; '.join(diff)}); "
                "use another work_dir, or delete this one to start afresh"
            )
        return state

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def get(self, key: str) -> Any:
        return self.state.get(key)

    def done(self, stage: int) -> dict | None:
        """The recorded figures of a finished ``stage`` (its weights are on disk), or None."""
        return self.state["stages"].get(str(stage))

    def restore(self, model: nn.Module, stage: int) -> None:
        from safetensors.torch import load_model

        path = self.folder / f"stage{stage}.safetensors"
        try:
            load_model(model, path, strict=True, device=str(next(model.parameters()).device))
        except Exception as e:
            raise CheckpointError(
                f"cannot restore stage {stage} from {str(path)!r}: {type(e).__name__}: {e}; delete the work_dir "
                "to start afresh"
            ) from e

    def put(self, key: str, value: Any) -> None:
        """Record ``key`` (e.g. the figures of the converted model) in the state and write it."""
        self.state[key] = value
        self._write_state()

    def finish(self, model: nn.Module, stage: int, record: dict) -> None:
        """Stage ``stage`` is over: write the weights, then the state that points to them."""
        if self.enabled and self.world.main:
            from safetensors.torch import save_model

            path = self.folder / f"stage{stage}.safetensors"
            try:
                with atomic_target(path) as tmp:
                    save_model(model, str(tmp), metadata={"parc_surgery_heal_stage": str(stage)})
            except OSError as e:
                raise CheckpointError(f"cannot write {str(path)!r}: {e}") from e
        self.state["stages"][str(stage)] = record
        self._write_state()

    def _write_state(self) -> None:
        if self.enabled and self.world.main:
            path = self.folder / STATE_FILE
            try:
                with atomic_target(path) as tmp:
                    tmp.write_text(json.dumps(self.state, indent=2), encoding="utf-8")
            except OSError as e:
                raise CheckpointError(f"cannot write {str(path)!r}: {e}") from e
        barrier(self.world)
