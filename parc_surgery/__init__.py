"""parc-surgery: swap ViT attention and deep conv stages for ParC blocks, carry weights, prove the result."""

from .errors import (
    CheckpointError,
    ConfigError,
    NoMatchError,
    ParcSurgeryError,
    RuleError,
    TraceError,
    UnsupportedTargetError,
    ValidationError,
)
from .ops import ParC

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "NoMatchError",
    "ParC",
    "ParcSurgeryError",
    "RuleError",
    "TraceError",
    "UnsupportedTargetError",
    "ValidationError",
    "__version__",
]
