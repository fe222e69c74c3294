"""Registry of replacement blocks and the contract they declare: ``ReplacementBlock``, ``BlockContext``.

Rules name blocks only through this registry (``register_block`` decorator, ``get_block``,
``get_block_spec``, ``list_blocks``). A replacement block declares its contract by subclassing
:class:`ReplacementBlock`:

* ``replaces``: dotted class names of the modules it is built from (discovery, ``list_candidates``);
* ``skip_unsupported``: ``True`` for a lenient (generic fallback) block: a module it refuses is left out of
  the conversion with a note instead of failing it;
* ``uses_attention``: ``True`` for a block that reads ``ctx.attention``: for a module the probe detected as an
  attention, the engine then reads what it computes (:func:`parc_surgery.attention_form.find_attention_form`);
* ``uses_residual``: ``True`` for a block that reads ``ctx.residual``: the engine then reads the source's fx
  graph once (:func:`parc_surgery.residual.find_residual`) and passes its residual structure;
* ``check_source(module, ctx) -> None``: raise :class:`UnsupportedTargetError` (naming the module type and
  the reason) if the block cannot replace ``module``; called once per target before anything is built, so a
  failed conversion touches nothing;
* ``from_module(module, ctx) -> (module, CarryRecord)``: build the replacement (an instance of the block, or
  any ``nn.Module``: the ParC-ConvNet blocks return a copy of the source block with its conv swapped),
  accounting for every tensor of ``module`` in the carry record; never mutates ``module``;
* ``attach(model, placements)``: called once after the swap with every ``(name, module)`` this block built
  (the default does nothing).

``register_block`` sets ``block_name`` and records a frozen :class:`BlockSpec`; the engine reads only the
spec. A plain ``nn.Module`` class that defines ``check_source`` / ``from_module`` (the protocol without the
base class) is accepted too: its optional attributes are read and type-checked once, at registration.

What the engine knows about a target travels as typed fields of :class:`BlockContext`; ``options`` holds only
the rule's own ``block_options``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import nn

from ..errors import ConfigError, NoMatchError

if TYPE_CHECKING:
    from ..residual import ResidualForm

__all__ = [
    "BlockContext",
    "BlockSpec",
    "ReplacementBlock",
    "get_block",
    "get_block_spec",
    "is_block",
    "list_blocks",
    "register_block",
    "unregister_block",
]

_BLOCKS: dict[str, BlockSpec] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BlockContext:
    """What the engine knows about one target when checking and building its replacement.

    From the rule (resolved per target):
        feature_size: (H, W) of the module's input at the model's input size (the token grid for tokens).
        kernel_size: base kernel/PE lengths (along H, along W); ``None`` means ``feature_size``.
        pe: whether this target carries position embeddings (resolved from the rule's PE placement).
        impl: ParC implementation for the new ParC layers.
        init: ``warm_start`` (fold the replaced kernel into ParC, PE zero) or ``reference`` (published init).
        width_mult: block-specific width multiplier (ParC-Net: global width relative to MobileViT's), or None.
        options: the rule's ``block_options`` for this target, as written.

    Engine facts (what the probe saw the module do; ``None`` when unknown, e.g. a block built by hand):
        source_in_shape / source_out_shape: the module's first input / output tensor shapes.
        num_tokens: the token count of a (B, N, C) input.
        num_prefix_tokens: leading tokens outside the 2-D grid (class / distillation / register tokens).
        patch_grid: whether the grid is the model's patch-embedding grid (``False``: guessed from the count).
        attention: for a detected attention (blocks that declare ``uses_attention``), its
            :class:`~parc_surgery.attention_form.AttentionForm` (what it computes, how it is called, what it
            returns), or the ``UnsupportedTargetError`` saying why it cannot be rewritten.
        residual: the source block's residual structure read from its fx graph (blocks that declare
            ``uses_residual``; ``None`` otherwise or when the module is a conv itself).
    """

    feature_size: tuple[int, int]
    kernel_size: tuple[int, int] | None = None
    pe: bool = True
    impl: Literal["spatial", "fft", "auto"] = "auto"
    init: Literal["warm_start", "reference"] = "warm_start"
    width_mult: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    source_in_shape: Shape | None = None
    source_out_shape: Shape | None = None
    num_tokens: int | None = None
    num_prefix_tokens: int | None = None
    patch_grid: bool | None = None
    attention: Any = None
    residual: ResidualForm | None = None

    @property
    def kernel_hw(self) -> tuple[int, int]:
        """Base kernel lengths along (height, width)."""
        return tuple(self.kernel_size) if self.kernel_size is not None else tuple(self.feature_size)


class ReplacementBlock(nn.Module):
    """The declared contract of a registered replacement block (see the module docstring).

    Subclasses override ``check_source`` and ``from_module`` and set the class attributes they need.
    """

    block_name: ClassVar[str] = ""  # set by register_block
    replaces: ClassVar[tuple[str, ...]] = ()
    skip_unsupported: ClassVar[bool] = False
    uses_residual: ClassVar[bool] = False
    uses_attention: ClassVar[bool] = False

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        raise NotImplementedError(f"{cls.__qualname__} must define the classmethod check_source(module, ctx)")

    @classmethod
    def from_module(cls, module: nn.Module, ctx: BlockContext) -> tuple[nn.Module, Any]:
        raise NotImplementedError(f"{cls.__qualname__} must define the classmethod from_module(module, ctx)")

    @classmethod
    def attach(cls, model: nn.Module, placements: list[tuple[str, nn.Module]]) -> None:
        """Connect the built blocks to the model after the swap (default: nothing to do)."""


@dataclass(frozen=True)
class BlockSpec:
    """A registered block as the engine sees it: its declared contract, read once at registration."""

    name: str
    cls: type[nn.Module]
    replaces: tuple[str, ...]
    skip_unsupported: bool
    uses_residual: bool
    attach: Callable[[nn.Module, list[tuple[str, nn.Module]]], None] | None
    uses_attention: bool = False

    def check_source(self, module: nn.Module, ctx: BlockContext) -> None:
        self.cls.check_source(module, ctx)

    def from_module(self, module: nn.Module, ctx: BlockContext):
        return self.cls.from_module(module, ctx)


def _spec(name: str, cls: type[nn.Module]) -> BlockSpec:
    where = f"register_block({name!r}): {cls.__qualname__}"
    for meth in ("from_module", "check_source"):
        if not callable(getattr(cls, meth, None)):
            raise ConfigError(f"{where} must define classmethod {meth}() (subclass parc_surgery.ReplacementBlock)")
    if issubclass(cls, ReplacementBlock):
        replaces, lenient, residual = cls.replaces, cls.skip_unsupported, cls.uses_residual
        attention = cls.uses_attention
        attach = None if cls.attach.__func__ is ReplacementBlock.attach.__func__ else cls.attach
    else:  # the protocol without the base class: its optional attributes, read and checked here once
        replaces = getattr(cls, "replaces", ())
        lenient = getattr(cls, "skip_unsupported", False)
        residual = getattr(cls, "uses_residual", False)
        attention = getattr(cls, "uses_attention", False)
        attach = getattr(cls, "attach", None)
    if not (isinstance(replaces, tuple) and all(isinstance(r, str) for r in replaces)):
        raise ConfigError(f"{where}.replaces must be a tuple of dotted class names, got {replaces!r}")
    for attr, value in (("skip_unsupported", lenient), ("uses_residual", residual), ("uses_attention", attention)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{attr} must be a bool, got {value!r}")
    if attach is not None and not callable(attach):
        raise ConfigError(f"{where}.attach must be a classmethod attach(model, placements), got {attach!r}")
    return BlockSpec(name, cls, tuple(replaces), lenient, residual, attach, attention)


def register_block(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a replacement block under ``name``; duplicates are refused."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"register_block: name must be lower_snake_case (e.g. 'my_block'), got {name!r}")

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _BLOCKS:
            old = _BLOCKS[name].cls
            raise ConfigError(
                f"register_block: a block named {name!r} is already registered "
                f"({old.__module__}.{old.__qualname__}); choose another name"
            )
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"register_block({name!r}): {cls!r} is not an nn.Module subclass")
        spec = _spec(name, cls)
        cls.block_name = name
        _BLOCKS[name] = spec
        return cls

    return deco


def unregister_block(name: str) -> None:
    """Remove a block (for tests and user code that re-registers)."""
    _BLOCKS.pop(name, None)


def get_block_spec(name: str) -> BlockSpec:
    """The :class:`BlockSpec` registered as ``name``."""
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


def get_block(name: str) -> type[nn.Module]:
    """The block class registered as ``name``."""
    return get_block_spec(name).cls


def is_block(name: str) -> bool:
    return name in _BLOCKS


def list_blocks() -> list[str]:
    """Names of all registered blocks, sorted."""
    return sorted(_BLOCKS)
