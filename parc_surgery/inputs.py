"""What input a model takes: its input channels, inferred once for every part of parc-surgery.

The probe, the MAC counter, validation, the CLI audit of a saved model and the ONNX check all build their
example inputs from :func:`get_in_chans`, so they agree on every model. The weights are read first (a timm
model built with ``in_chans=1`` keeps ``(3, H, W)`` in its ``pretrained_cfg``), but the first convolution is
not always fed by the input (tresnet's space-to-depth stem gives it 48 channels, csatv2's DCT stem 64): when
the sources disagree, the model is run on fake tensors (shapes only, no compute) with each answer in turn.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import ConfigError
from .module_state import trace_side_effects_undone
from .ops.parc import ParC
from .train_flags import eval_mode

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


def _candidates(model: nn.Module) -> list[int]:
    """Every answer the model's weights, attributes and timm cfg give, in order of trust, without repeats."""
    found: list[int] = []
    cfg = _cfg(model)
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, str) and first:
        with contextlib.suppress(AttributeError):
            found.append(_channels_in(model.get_submodule(first)))
    found.append(next((c for c in map(_channels_in, model.modules()) if c is not None), None))
    attr = getattr(model, "in_chans", None)
    if isinstance(attr, int) and not isinstance(attr, bool) and attr > 0:
        found.append(attr)
    size = cfg.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        found.append(int(size[0]))
    return list(dict.fromkeys(c for c in found if c is not None))


def _runs_with(model: nn.Module, chans: int, size: tuple[int, int]) -> bool:
    """Whether ``model`` accepts a ``(1, chans, *size)`` input, run on fake tensors (shapes only)."""
    log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs every failed op before raising
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        p = next(iter(model.parameters()), None)
        like = {"dtype": p.dtype, "device": p.device} if p is not None and p.is_floating_point() else {}
        # the fake run must leave no fake tensor in the model's caches (ParC's eval-mode kernel cache)
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with trace_side_effects_undone(model), fake, eval_mode(model), torch.no_grad():
            model(torch.empty(1, chans, *size, **like))
        return True
    except Exception:
        return False
    finally:
        log.setLevel(level)


def get_in_chans(model: nn.Module, *, default: int | None = None, input_size: tuple[int, int] | None = None) -> int:
    """Input channels of ``model``, from the sources that tell, in this order of trust:

    1. the layer timm's ``pretrained_cfg['first_conv']`` names, when it is a convolution (or ParC);
    2. the first convolution (or ParC) in ``model.modules()`` order;
    3. an int ``model.in_chans`` attribute;
    4. timm's ``pretrained_cfg['input_size'][0]``;
    5. ``default``.

    When the sources disagree (``default`` counts as one when given), the first answer the model runs with (on
    fake tensors at ``input_size``, default the cfg's or 224 x 224) wins; when it runs with none, the first.

    Raises:
        ConfigError: nothing tells and no ``default`` is given.
    """
    found = _candidates(model)
    if found and default is not None and default not in found:  # a stem that changes the channel count
        found.append(default)
    if len(found) > 1:
        if input_size is None:
            size = _cfg(model).get("input_size")
            input_size = tuple(size[1:]) if isinstance(size, (list, tuple)) and len(size) == 3 else (224, 224)
        return next((c for c in found if _runs_with(model, c, input_size)), found[0])
    if found:
        return found[0]
    if default is not None:
        return default
    raise ConfigError(
        f"cannot infer the input channels of {type(model).__name__} (no convolution, no in_chans attribute, no timm "
        "pretrained_cfg['input_size']); pass in_chans=..."
    )
