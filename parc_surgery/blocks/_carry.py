"""``CarryRecord``: what happened to each parameter when a block replaced a module.

Names on the new side are relative to the new block, names on the old side relative to the replaced
module. ``kept``: copied bit-identical; ``transformed``: derived from old tensors (how is said);
``new``: freshly initialised; ``dropped``: old parameters with no counterpart.
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

    def to_dict(self) -> dict:
        return {
            "kept": [list(p) for p in self.kept],
            "transformed": [{"name": n, "from": list(o), "how": h} for n, o, h in self.transformed],
            "new": list(self.new),
            "dropped": list(self.dropped),
        }


@dataclass
class CarryBuilder:
    """Mutable helper used while building a block; ``finish`` computes ``new`` and ``dropped``."""

    kept: list[tuple[str, str]] = field(default_factory=list)
    transformed: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)

    @torch.no_grad()
    def copy(self, new_mod: nn.Module, new_prefix: str, old_mod: nn.Module, old_prefix: str) -> None:
        """Copy every parameter and buffer of ``old_mod`` into ``new_mod`` (same structure), bit-identical."""
        new_sd = dict(new_mod.named_parameters()) | dict(new_mod.named_buffers())
        for name, t in list(old_mod.named_parameters()) + list(old_mod.named_buffers()):
            dst = new_sd[name]
            if dst.shape != t.shape:
                raise ValueError(f"carry {old_prefix}{name}: shape {tuple(t.shape)} != {tuple(dst.shape)}")
            dst.copy_(t)
            if isinstance(t, nn.Parameter) or name in dict(old_mod.named_parameters()):
                self.kept.append((f"{new_prefix}{name}", f"{old_prefix}{name}"))

    def transform(self, new_name: str, old_names: tuple[str, ...] | list[str], how: str) -> None:
        self.transformed.append((new_name, tuple(old_names), how))

    def finish(self, new_block: nn.Module, old_module: nn.Module) -> CarryRecord:
        touched_new = {n for n, _ in self.kept} | {n for n, _, _ in self.transformed}
        used_old = {o for _, o in self.kept} | {o for _, olds, _ in self.transformed for o in olds}
        new = tuple(n for n, _ in new_block.named_parameters() if n not in touched_new)
        dropped = tuple(n for n, _ in old_module.named_parameters() if n not in used_old)
        return CarryRecord(tuple(self.kept), tuple(self.transformed), new, dropped)
