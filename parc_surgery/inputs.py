"""What input a model takes: its input size and channels, inferred once for every part of parc-surgery.

The probe, the MAC counter, validation, the CLI audit of a saved model and the ONNX check all build their
example inputs from :func:`get_in_chans`, so they agree on every model (a timm model built with
``in_chans=1`` keeps ``(3, H, W)`` in its ``pretrained_cfg``: the weights are read first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError
from .helpers import as_hw, is_positive_int
from .ops.parc import ParC

if TYPE_CHECKING:
    from .rule import Rule

__all__ = ["example_input", "get_in_chans", "resolve_input_size"]


def _channels_in(module: nn.Module) -> int | None:
    if isinstance(module, ParC):
        return int(module.channels)
    if isinstance(module, nn.modules.conv._ConvNd) and module.in_channels > 0:  # 0: a lazy conv not yet built
        return int(module.in_channels)
    return None


def _cfg(model: nn.Module) -> dict:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            return cfg
    return {}


def get_in_chans(model: nn.Module, *, default: int | None = None) -> int:
    """Input channels of ``model``, from the first source that tells.

    1. the layer timm's ``pretrained_cfg['first_conv']`` names, when it is a convolution (or ParC);
    2. the first convolution (or ParC) in ``model.modules()`` order;
    3. an int ``model.in_chans`` attribute;
    4. timm's ``pretrained_cfg['input_size'][0]``;
    5. ``default``.

    Raises:
        ConfigError: nothing tells and no ``default`` is given.
    """
    cfg = _cfg(model)
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, str) and first:
        try:
            chans = _channels_in(model.get_submodule(first))
        except AttributeError:
            chans = None
        if chans is not None:
            return chans
    for m in model.modules():
        chans = _channels_in(m)
        if chans is not None:
            return chans
    attr = getattr(model, "in_chans", None)
    if is_positive_int(attr):
        return attr
    size = cfg.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        return int(size[0])
    if default is not None:
        return default
    raise ConfigError(
        f"cannot infer the input channels of {type(model).__name__} (no convolution, no in_chans attribute, no timm "
        "pretrained_cfg['input_size']); pass in_chans=..."
    )


def resolve_input_size(model: nn.Module, input_size=None, rule: Rule | None = None) -> tuple[int, int]:
    """The input size to plan at: given, else the rule's, else timm's ``pretrained_cfg``."""
    if input_size is not None:
        return as_hw(input_size, "input_size")
    if rule is not None and rule.input_size is not None:
        return as_hw(rule.input_size, "rule input_size")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return as_hw(tuple(cfg["input_size"])[-2:], "pretrained_cfg input_size")
    raise ConfigError(
        f"input_size is needed for a {type(model).__name__} (it has no timm pretrained_cfg): "
        "pass input_size=(H, W) (CLI: --input-size H W)"
    )


def example_input(model: nn.Module, input_size: tuple[int, int], *, batch: int = 1, in_chans: int | None = None):
    """A random input for ``model`` at ``input_size`` on the model's device and floating dtype."""
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    if in_chans is None:
        in_chans = get_in_chans(model, default=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans, *input_size, generator=g, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)
