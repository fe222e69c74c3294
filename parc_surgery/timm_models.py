"""The published ParC models as timm model names: ``timm.create_model("parcnet_s")`` after ``import parc_surgery``.

Each entry builds its full timm base model and converts it with a bundled rule (no validation, no counting,
so building is quick; under ``with torch.device("meta")`` nothing is allocated at all); timm's
``build_model_with_cfg`` then does what it does for its own models: the pretrained cfg, weights from a file,
and the ``features_only`` wrapper around the *converted* model, so the ParC blocks sit where the published
network has them for every ``out_indices`` and ``feature_cls``:

==========================  =======================================================  ==================
name                        base model                                               rule
==========================  =======================================================  ==================
parcnet_s                   mobilevit_s (head dropout 0.2): ParC-Net-S               vit2parc
parc_mobilevit_xs / _xxs    mobilevit_xs / _xxs (head dropout 0.2) with ParC blocks  vit2parc
parc_resnet50               resnet50                                                 resnet_parc
parc_mobilenetv2_100        mobilenetv2_100                                          mobilenetv2_parc
parc_convnext_xt            ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))  convnext_parc
parc_deit_tiny_patch16_224  deit_tiny_patch16_224                                    vit_attention2parc
==========================  =======================================================  ==================

``parc_mobilevit_xs`` / ``_xxs`` are MobileViT-XS / -XXS with ParC-Net blocks (global widths 4/3 of MobileViT's),
not the official ParC-Net-XS (MobileViT-S channels, global widths 96 / 128 / 160, 2 / 3 / 2 blocks, additive
fusion): they are named for what they are.

Keyword arguments (``num_classes``, ``drop_path_rate``, ...) go to the base model. ``img_size`` (ViTs) also
sets the size the kernels are planned at. No weights are published for these names: ``pretrained=True``
needs a file, ``pretrained_cfg_overlay=dict(file=PATH)`` (safetensors, or a ``torch.save`` state dict read
with ``weights_only=True``); for ``parcnet_s`` that file may hold the official ParC-Net-S weights in the
official code's key layout (:mod:`parc_surgery.official`). Otherwise convert a pretrained base model with
:func:`parc_surgery.convert`, or load a saved one with :func:`parc_surgery.load`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .errors import ConfigError
from .inputs import get_in_chans
from .official import checkpoint_filter_fn

__all__: list[str] = []  # timm's register_model appends every registered name

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # MobileViT / ParC-Net take [0, 1] inputs


def _cfg(
    size: int, pool: int | None, norm: dict, first_conv: str, classifier: str, crop_pct: float, paper: str, **extra
) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": None if pool is None else (pool, pool),
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "first_conv": first_conv,
        "classifier": classifier,
        "paper_ids": paper,
        "license": "apache-2.0",
        **norm,
        **extra,
    }


_ECCV = "arXiv:2203.03952"
_CONVNETS = "arXiv:2203.03952 (ParC-ConvNets)"
_PARCNET = (_NO_NORM, "stem.conv", "head.fc", 0.9)

default_cfgs = generate_default_cfgs(
    {
        "parcnet_s": _cfg(256, 8, *_PARCNET, _ECCV),
        "parc_mobilevit_xs": _cfg(256, 8, *_PARCNET, _ECCV),
        "parc_mobilevit_xxs": _cfg(256, 8, *_PARCNET, _ECCV),
        "parc_resnet50": _cfg(224, 7, _IMAGENET, "conv1", "fc", 0.95, _CONVNETS),
        "parc_mobilenetv2_100": _cfg(224, 7, _IMAGENET, "conv_stem", "classifier", 0.875, _CONVNETS),
        "parc_convnext_xt": _cfg(224, 7, _IMAGENET, "stem.0", "head.fc", 0.95, _CONVNETS),
        "parc_deit_tiny_patch16_224": _cfg(
            224, None, _IMAGENET, "patch_embed.proj", "head", 0.9, _ECCV, fixed_input_size=True
        ),
    }
)

# timm's own features_only defaults for each base family (see its _create_* functions)
_FLAT = {"flatten_sequential": True}


def _input_size(kwargs: dict[str, Any]) -> tuple[int, int] | None:
    size = kwargs.get("img_size")
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None  # the base model's pretrained_cfg input size


def _has_weights_file(kwargs: dict[str, Any]) -> bool:
    sources = [kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")]
    return any(isinstance(s, dict) and (s.get("file") or s.get("state_dict") is not None) for s in sources)


def _create(
    name: str,
    base: str,
    rule: str,
    pretrained: bool = False,
    *,
    base_args: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    feature_cfg: dict[str, Any] | None = None,
    filter_fn: Callable | None = None,
    **kwargs: Any,
) -> nn.Module:
    from .api import convert

    if pretrained and not _has_weights_file(kwargs):
        raise ConfigError(
            f"{name}: no pretrained weights are published for this parc-surgery model; pass a file "
            f"(timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))), "
            f"convert a pretrained base instead (parc_surgery.convert(timm.create_model({base!r}, pretrained=True), "
            f"{rule!r})), or load a saved one with parc_surgery.load(path)"
        )
    planned: dict[str, tuple[int, int]] = {}

    def build(**model_kwargs: Any) -> nn.Module:
        """The full base model, converted: timm wraps it for features_only afterwards."""
        args = {**(base_args or {}), **(defaults or {}), **model_kwargs}
        model = timm.create_model(base, pretrained=False, **args)
        conv = convert(model, rule, input_size=_input_size(model_kwargs), validate=False, count=False, model_name=name)
        planned["size"] = conv.plan.input_size
        return conv.model

    model = build_model_with_cfg(
        build, name, pretrained, feature_cfg=dict(feature_cfg or {}), pretrained_filter_fn=filter_fn, **kwargs
    )
    h, w = planned["size"]
    cfg = dict(model.pretrained_cfg)
    cfg.update(input_size=(get_in_chans(model, default=3, input_size=(h, w)), h, w), source_model=base, parc_rule=rule)
    model.pretrained_cfg = model.default_cfg = cfg
    # the rebuild arguments are the caller's, not those the base model was built with (timm merges this dict)
    model._model_args = {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS and v is not None}
    return model


_NOT_MODEL_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "feature_cls")


@register_model
def parcnet_s(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-Net-S (ECCV 2022): MobileViT-S with its MobileViT blocks replaced by ParC-Net blocks; 5.04 M params.

    ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` also reads the official ParC-Net-S weights.
    """
    return _create(
        "parcnet_s",
        "mobilevit_s",
        "vit2parc",
        pretrained,
        defaults={"drop_rate": 0.2},
        feature_cfg=_FLAT,
        filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


@register_model
def parc_mobilevit_xs(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileViT-XS converted by ``vit2parc`` (global widths 4/3 of MobileViT's); not the official ParC-Net-XS."""
    return _create(
        "parc_mobilevit_xs",
        "mobilevit_xs",
        "vit2parc",
        pretrained,
        defaults={"drop_rate": 0.2},
        feature_cfg=_FLAT,
        **kwargs,
    )


@register_model
def parc_mobilevit_xxs(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileViT-XXS converted by ``vit2parc`` (global widths 4/3 of MobileViT's); not an official ParC-Net."""
    return _create(
        "parc_mobilevit_xxs",
        "mobilevit_xxs",
        "vit2parc",
        pretrained,
        defaults={"drop_rate": 0.2},
        feature_cfg=_FLAT,
        **kwargs,
    )


@register_model
def parc_resnet50(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-ResNet50: ResNet50 with dense ParC in layer3.3-5 and layer4.2; 23.74 M params."""
    return _create("parc_resnet50", "resnet50", "resnet_parc", pretrained, **kwargs)


@register_model
def parc_mobilenetv2_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-MobileNetV2: depthwise ParC in blocks.3.2, 3.3, 4.2, 5.2; 3.53 M params."""
    return _create(
        "parc_mobilenetv2_100", "mobilenetv2_100", "mobilenetv2_parc", pretrained, feature_cfg=_FLAT, **kwargs
    )


@register_model
def parc_convnext_xt(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-ConvNeXt-XT: ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384)) + ParC; 7.41 M params."""
    return _create(
        "parc_convnext_xt",
        "convnext_tiny",
        "convnext_parc",
        pretrained,
        base_args={"depths": (3, 3, 9, 3), "dims": (48, 96, 192, 384)},
        feature_cfg={"out_indices": (0, 1, 2, 3), **_FLAT},
        **kwargs,
    )


@register_model
def parc_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-Tiny with every attention token mixer replaced by a ParC token mixer."""
    feature_cfg = {"out_indices": kwargs.pop("out_indices", 3), "feature_cls": "getter"}
    return _create(
        "parc_deit_tiny_patch16_224",
        "deit_tiny_patch16_224",
        "vit_attention2parc",
        pretrained,
        feature_cfg=feature_cfg,
        **kwargs,
    )
