"""parc-surgery: swap ViT attention and deep conv stages for ParC blocks, carry weights, prove the result.

Quickstart::

    import timm, parc_surgery
    model = timm.create_model("mobilevit_s", pretrained=False)
    conv = parc_surgery.convert(model, "vit2parc")   # ParC-Net-S
    print(conv.report.to_markdown())
"""

from . import timm_models  # noqa: F401  (registers parcnet_s & co. with timm)
from .api import Candidates, Conversion, convert, list_candidates
from .blocks import BlockContext, CarryRecord, ReplacementBlock, get_block, list_blocks, register_block
from .checkpoint import load, read_manifest, save
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NoMatchError,
    ParcSurgeryError,
    RuleError,
    TeacherMismatchError,
    TraceError,
    UnsupportedTargetError,
    ValidationError,
)
from .exporter import ExportResult, export
from .flops import count_macs, count_params
from .healing import HealConfig, heal
from .ops import ParC
from .plan import Plan
from .report import Check, Report
from .rule import Rule, list_rules, load_rule
from .types import register_type
from .version import __version__

__all__ = [
    "BlockContext",
    "Candidates",
    "CarryRecord",
    "Check",
    "CheckpointError",
    "ConfigError",
    "Conversion",
    "DataError",
    "ExportResult",
    "HealConfig",
    "NoMatchError",
    "ParC",
    "ParcSurgeryError",
    "Plan",
    "ReplacementBlock",
    "Report",
    "Rule",
    "RuleError",
    "TeacherMismatchError",
    "TraceError",
    "UnsupportedTargetError",
    "ValidationError",
    "__version__",
    "convert",
    "count_macs",
    "count_params",
    "export",
    "get_block",
    "heal",
    "list_blocks",
    "list_candidates",
    "list_rules",
    "load",
    "load_rule",
    "read_manifest",
    "register_block",
    "register_type",
    "save",
]
