"""What input a model takes: its input channels, inferred once for every part of parc-surgery.

The probe, the MAC counter, validation, the CLI audit of a saved model and the ONNX check all build their
example inputs from :func:`get_in_chans`, so they agree on every model (a timm model built with
``in_chans=1`` keeps ``(3, H, W)`` in its ``pretrained_cfg``: the weights are read first).
"""

from __future__ import annotations

from torch import nn

from .errors import ConfigError
from .ops.parc import ParC

__all__ = ["get_in_chans"]


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
    if isinstance(attr, int) and not isinstance(attr, bool) and attr > 0:
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
