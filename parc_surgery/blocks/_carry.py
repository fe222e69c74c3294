"""``CarryRecord``: what happened to each tensor of a module when a block replaced it.

Names on the new side are relative to the new block, names on the old side relative to the replaced
module (the engine maps them to the model under each of the target's names). Parameters:

* ``kept``: copied bit-identical (new name, old name);
* ``transformed``: derived from old tensors (new name, old names, how);
* ``new``: freshly initialised parameters of the new block;
* ``dropped``: old parameters the block knowingly discards (no counterpart).

Buffers (BatchNorm running statistics, index tables) are accounted apart, so that the four counts in a report
keep meaning parameters: ``buffers_kept`` (copied bit-identical: new name, old name) and ``buffers_dropped``.
A tensor left at its own name, bit-identical (a deep-copied block keeps everything but the swapped conv), needs
no record; every other tensor of the replaced module must be in the record, or the conversion's ``preserved``
check fails naming it (:mod:`parc_surgery.preserved`). Drops are declared, never inferred:
:meth:`CarryBuilder.drop`, or ``finish(..., drop_unused=True)`` for a block that replaces the whole module by
design (everything it does not carry is discarded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CarryBuilder", "CarryRecord"]


@dataclass(frozen=True)
class CarryRecord:
    kept: tuple[tuple[str, str], ...] = ()  # (new name, old name)
    transformed: tuple[tuple[str, tuple[str, ...], str], ...] = ()  # (new name, old names, how)
    new: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    buffers_kept: tuple[tuple[str, str], ...] = ()  # (new name, old name)
    buffers_dropped: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "kept": [list(p) for p in self.kept],
            "transformed": [{"name": n, "from": list(o), "how": h} for n, o, h in self.transformed],
            "new": list(self.new),
            "dropped": list(self.dropped),
            "buffers_kept": [list(p) for p in self.buffers_kept],
            "buffers_dropped": list(self.buffers_dropped),
        }


def _persistent_buffers(module: nn.Module) -> list[str]:
    params = {n for n, _ in module.named_parameters()}
    return [n for n in module.state_dict(keep_vars=True) if n not in params]


@dataclass
class CarryBuilder:
    """Mutable helper used while building a block; ``finish`` computes ``new`` and returns the record."""

    kept: list[tuple[str, str]] = field(default_factory=list)
    transformed: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    buffers_kept: list[tuple[str, str]] = field(default_factory=list)
    buffers_dropped: list[str] = field(default_factory=list)

    @torch.no_grad()
    def copy(self, new_mod: nn.Module, new_prefix: str, old_mod: nn.Module, old_prefix: str) -> None:
        """Copy every parameter and buffer of ``old_mod`` into ``new_mod`` (same structure), bit-identical."""
        new_sd = dict(new_mod.named_parameters()) | dict(new_mod.named_buffers())
        old_params = dict(old_mod.named_parameters())
        for name, t in list(old_params.items()) + list(old_mod.named_buffers()):
            dst = new_sd[name]
            if dst.shape != t.shape:
                raise ValueError(f"carry {old_prefix}{name}: shape {tuple(t.shape)} != {tuple(dst.shape)}")
            dst.copy_(t)
            pair = (f"{new_prefix}{name}", f"{old_prefix}{name}")
            (self.kept if name in old_params else self.buffers_kept).append(pair)

    def transform(self, new_name: str, old_names: tuple[str, ...] | list[str], how: str) -> None:
        self.transformed.append((new_name, tuple(old_names), how))

    def drop(self, *old_names: str) -> None:
        """Declare old parameters or buffers (names relative to the replaced module) discarded on purpose."""
        self.dropped.extend(old_names)

    def finish(self, new_block: nn.Module, old_module: nn.Module, *, drop_unused: bool = False) -> CarryRecord:
        """The record: ``new`` = the new block's parameters nothing was carried into.

        ``drop_unused``: declare every old parameter and persistent buffer not carried as dropped (for a block
        that replaces the whole module by design). Otherwise only what :meth:`drop` declared is dropped; an old
        buffer named there goes to ``buffers_dropped``.
        """
        touched_new = {n for n, _ in self.kept} | {n for n, _, _ in self.transformed}
        used_old = {o for _, o in self.kept} | {o for _, olds, _ in self.transformed for o in olds}
        used_old |= {o for _, o in self.buffers_kept}
        new = tuple(n for n, _ in new_block.named_parameters() if n not in touched_new)
        params = [n for n, _ in old_module.named_parameters()]
        buffers = _persistent_buffers(old_module)
        declared = list(dict.fromkeys(self.dropped))
        if drop_unused:
            declared += [n for n in (*params, *buffers) if n not in used_old and n not in declared]
        buffer_set = set(buffers)
        dropped = tuple(n for n in declared if n not in buffer_set)
        buffers_dropped = tuple(dict.fromkeys([*self.buffers_dropped, *(n for n in declared if n in buffer_set)]))
        return CarryRecord(
            tuple(self.kept), tuple(self.transformed), new, dropped, tuple(self.buffers_kept), buffers_dropped
        )
