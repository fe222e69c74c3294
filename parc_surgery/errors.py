"""The exception hierarchy of parc-surgery.

Every failure a user can cause is a :class:`ParcSurgeryError`. Messages say what went wrong,
where (file, line, field, module name) and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NoMatchError",
    "ParcSurgeryError",
    "RuleError",
    "TeacherMismatchError",
    "TraceError",
    "UnsupportedTargetError",
    "ValidationError",
]


class ParcSurgeryError(Exception):
    """Root of every error parc-surgery raises on purpose."""


class ConfigError(ParcSurgeryError, ValueError):
    """A bad argument to an operator, block or API call: names the argument, the value, what is allowed."""


class RuleError(ConfigError):
    """A rule (YAML file, dict or Rule) that does not validate: names the file, line, field and fix."""


class NoMatchError(ParcSurgeryError, LookupError):
    """A rule selected nothing (or a name was not found); points to ``list_candidates``."""


class UnsupportedTargetError(ParcSurgeryError):
    """A selected module cannot be replaced by the named block (odd channels, unknown layout, ...)."""


class TraceError(ParcSurgeryError):
    """The model could be neither traced nor hooked, or fails at the given input size."""


class ValidationError(ParcSurgeryError):
    """A check on the converted model failed (shape, finiteness, impl agreement, traced == eager)."""


class CheckpointError(ParcSurgeryError):
    """A file that cannot be written or read back: not a parc-surgery file, tampered, exists already."""


class DataError(ConfigError):
    """Images that cannot be used to heal: an empty or unreadable folder or file, images that do not fit the model."""


class TeacherMismatchError(ConfigError):
    """A teacher model that does not match the conversion it should heal (missing targets, other outputs)."""
