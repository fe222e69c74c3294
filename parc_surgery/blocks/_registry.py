"""Registry of replacement blocks: ``register_block`` (decorator), ``get_block``, ``list_blocks``.

Rules name blocks only through this registry. A registered block is an ``nn.Module`` subclass that
provides two classmethods used by the surgery engine:

* ``check_source(module, ctx) -> None``: raise :class:`UnsupportedTargetError` (naming the module
  type and the reason) if the block cannot replace ``module``; called for every target before
  anything is built, so a failed conversion touches nothing.
* ``from_module(module, ctx) -> (block, CarryRecord)``: build the replacement, carrying every weight
  that has a counterpart; never mutates ``module``.

and a class attribute ``replaces``: dotted class names of the modules it can be built from (used for
discovery and as the default type selector).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..errors import ConfigError, NoMatchError

__all__ = ["BlockContext", "get_block", "is_block", "list_blocks", "register_block", "unregister_block"]

_BLOCKS: dict[str, type[nn.Module]] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class BlockContext:
    """What the engine knows about one target when building its replacement.

    feature_size: (H, W) of the module's input at the model's input size.
    kernel_size: base kernel/PE lengths (along H, along W); ``None`` means ``feature_size``.
    pe: whether this target carries position embeddings (resolved from the rule's PE placement).
    impl: ParC implementation for the new ParC layers.
    init: ``warm_start`` (fold the replaced kernel into ParC, PE zero) or ``reference`` (published init).
    width_mult: block-specific width multiplier (ParC-Net: global width relative to MobileViT's), or None.
    options: further block-specific options from the rule.
    """

    feature_size: tuple[int, int]
    kernel_size: tuple[int, int] | None = None
    pe: bool = True
    impl: Literal["spatial", "fft", "auto"] = "auto"
    init: Literal["warm_start", "reference"] = "warm_start"
    width_mult: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def kernel_hw(self) -> tuple[int, int]:
        """Base kernel lengths along (height, width)."""
        return tuple(self.kernel_size) if self.kernel_size is not None else tuple(self.feature_size)


def register_block(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a replacement block under ``name``; duplicates are refused."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"register_block: name must be lower_snake_case (e.g. 'my_block'), got {name!r}")

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _BLOCKS:
            raise ConfigError(
                f"register_block: a block named {name!r} is already registered "
                f"({_BLOCKS[name].__module__}.{_BLOCKS[name].__qualname__}); choose another name"
            )
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"register_block({name!r}): {cls!r} is not an nn.Module subclass")
        for meth in ("from_module", "check_source"):
            if not callable(getattr(cls, meth, None)):
                raise ConfigError(f"register_block({name!r}): {cls.__qualname__} must define classmethod {meth}()")
        cls.block_name = name
        _BLOCKS[name] = cls
        return cls

    return deco


def unregister_block(name: str) -> None:
    """Remove a block (for tests and user code that re-registers)."""
    _BLOCKS.pop(name, None)


def get_block(name: str) -> type[nn.Module]:
    """The block class registered as ``name``."""
    try:
        return _BLOCKS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name), list(_BLOCKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise NoMatchError(
            f"no block named {name!r}.{hint} Registered blocks: {', '.join(sorted(_BLOCKS))} "
            f"(parc_surgery.list_blocks())."
        ) from None


def is_block(name: str) -> bool:
    return name in _BLOCKS


def list_blocks() -> list[str]:
    """Names of all registered blocks, sorted."""
    return sorted(_BLOCKS)
