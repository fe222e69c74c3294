"""Replacement blocks and their registry. Importing this package registers the bundled blocks."""

from . import (  # noqa: F401  (registers)
    attention_mixer,
    bottleneck,
    convnext,
    generic_conv,
    inverted_residual,
    metaformer,
    parcnet,
)
from ._carry import CarryBuilder, CarryRecord
from ._registry import (
    BlockContext,
    BlockSpec,
    ReplacementBlock,
    get_block,
    get_block_spec,
    is_block,
    list_blocks,
    register_block,
    unregister_block,
)

__all__ = [
    "BlockContext",
    "BlockSpec",
    "CarryBuilder",
    "CarryRecord",
    "ReplacementBlock",
    "get_block",
    "get_block_spec",
    "is_block",
    "list_blocks",
    "register_block",
    "unregister_block",
]
