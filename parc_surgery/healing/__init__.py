"""Heal after surgery: recover the original model's function with unlabelled images and no retraining.

``parc_surgery.heal(conversion, data)`` fits each new block to its teacher block (block reconstruction),
then distils the whole converted model from the teacher, and reports agreement, KL and block errors on
held-out images (see :mod:`.pipeline`). Files: ``config`` (options), ``data`` (folders, tensors,
iterables), ``record`` (hooks on the teacher), ``chunks`` (cached or streamed recordings), ``losses``
(objectives, measurements), ``train`` (the shared loop), ``distributed`` (torchrun / DDP), ``resume``
(stage checkpoints), ``report`` (the heal section), ``progress`` (rich bars).
"""

from .config import HealConfig, create_heal_config
from .data import create_heal_data, create_image_transform, list_images
from .losses import EvalPoint
from .pipeline import check_teacher, heal
from .report import HealedReport, HealReport
from .train import StageResult

__all__ = [
    "EvalPoint",
    "HealConfig",
    "HealReport",
    "HealedReport",
    "StageResult",
    "check_teacher",
    "create_heal_config",
    "create_heal_data",
    "create_image_transform",
    "heal",
    "list_images",
]
