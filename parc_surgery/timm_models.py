"""The published ParC models as timm model names: ``timm.create_model("parcnet_s")`` after ``import parc_surgery``.

Each entry builds its timm base model and converts it with a bundled rule (no validation, no counting,
so building is quick; under ``with torch.device("meta")`` nothing is allocated at all):

=============================  ================================================  ====================
name                           base model                                        rule
=============================  ================================================  ====================
parcnet_s / _xs / _xxs         mobilevit_s / _xs / _xxs (head dropout 0.2)       vit2parc
parc_resnet50                  resnet50                                          resnet_parc
parc_mobilenetv2_100           mobilenetv2_100                                   mobilenetv2_parc
parc_convnext_xt               ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))  convnext_parc
parc_deit_tiny_patch16_224     deit_tiny_patch16_224                             vit_attention2parc
=============================  ================================================  ====================

Keyword arguments (``num_classes``, ``drop_path_rate``, ...) go to the base model. ``img_size`` (ViTs) also
sets the size the kernels are planned at. No pretrained weights exist: ``pretrained=True`` raises; convert a
pretrained base model with :func:`parc_surgery.convert` instead, or load a saved one with
:func:`parc_surgery.load`.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .errors import ConfigError
from .inputs import get_in_chans

__all__: list[str] = []  # timm's register_model appends every registered name

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # MobileViT / ParC-Net take [0, 1] inputs


def _cfg(size: int, norm: dict, first_conv: str, classifier: str, crop_pct: float, paper: str) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": None,
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "first_conv": first_conv,
        "classifier": classifier,
        "paper_ids": paper,
        "license": "apache-2.0",
        **norm,
    }


_ECCV = "arXiv:2203.03952"
_CONVNETS = "arXiv:2203.03952 (ParC-ConvNets)"
_PARCNET = ("stem.conv", "head.fc", 0.9)

default_cfgs = generate_default_cfgs(
    {
        "parcnet_s": _cfg(256, _NO_NORM, *_PARCNET, _ECCV),
        "parcnet_xs": _cfg(256, _NO_NORM, *_PARCNET, _ECCV),
        "parcnet_xxs": _cfg(256, _NO_NORM, *_PARCNET, _ECCV),
        "parc_resnet50": _cfg(224, _IMAGENET, "conv1", "fc", 0.95, _CONVNETS),
        "parc_mobilenetv2_100": _cfg(224, _IMAGENET, "conv_stem", "classifier", 0.875, _CONVNETS),
        "parc_convnext_xt": _cfg(224, _IMAGENET, "stem.0", "head.fc", 0.95, _CONVNETS),
        "parc_deit_tiny_patch16_224": _cfg(224, _IMAGENET, "patch_embed.proj", "head", 0.9, _ECCV),
    }
)


def _input_size(kwargs: dict[str, Any]) -> tuple[int, int] | None:
    size = kwargs.get("img_size")
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None  # the base model's pretrained_cfg input size


def _create(
    name: str,
    base: str,
    rule: str,
    pretrained: bool = False,
    *,
    base_args: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    from .api import convert

    if pretrained:
        raise ConfigError(
            f"{name}: no pretrained weights exist for this parc-surgery model; create it with pretrained=False, "
            f"convert a pretrained base instead (parc_surgery.convert(timm.create_model({base!r}, pretrained=True), "
            f"{rule!r})), or load a saved one with parc_surgery.load(path)"
        )
    for key in ("pretrained_cfg", "cache_dir"):
        kwargs.pop(key, None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    user_args = dict(kwargs)
    args = {**(base_args or {}), **(defaults or {}), **kwargs}
    model = timm.create_model(base, pretrained=False, **args)
    conv = convert(model, rule, input_size=_input_size(kwargs), validate=False, count=False, model_name=name)
    out = conv.model
    cfg = dict(getattr(out, "pretrained_cfg", None) or {})
    h, w = conv.plan.input_size
    in_chans = get_in_chans(out)
    cfg.update(
        architecture=name,
        tag=None,
        url="",
        hf_hub_id=None,
        file=None,
        input_size=(in_chans, h, w),
        source_model=base,
        parc_rule=rule,
        num_classes=getattr(out, "num_classes", cfg.get("num_classes")),
    )
    cfg.update(overlay)
    out.pretrained_cfg = out.default_cfg = cfg
    out._model_args = user_args
    return out


@register_model
def parcnet_s(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-Net-S (ECCV 2022): MobileViT-S with its MobileViT blocks replaced by ParC-Net blocks; 5.04 M params."""
    return _create("parcnet_s", "mobilevit_s", "vit2parc", pretrained, defaults={"drop_rate": 0.2}, **kwargs)


@register_model
def parcnet_xs(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-Net-XS: MobileViT-XS converted by ``vit2parc`` (global widths 4/3 of MobileViT's)."""
    return _create("parcnet_xs", "mobilevit_xs", "vit2parc", pretrained, defaults={"drop_rate": 0.2}, **kwargs)


@register_model
def parcnet_xxs(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-Net-XXS: MobileViT-XXS converted by ``vit2parc`` (global widths 4/3 of MobileViT's)."""
    return _create("parcnet_xxs", "mobilevit_xxs", "vit2parc", pretrained, defaults={"drop_rate": 0.2}, **kwargs)


@register_model
def parc_resnet50(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-ResNet50: ResNet50 with dense ParC in layer3.3-5 and layer4.2; 23.74 M params."""
    return _create("parc_resnet50", "resnet50", "resnet_parc", pretrained, **kwargs)


@register_model
def parc_mobilenetv2_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-MobileNetV2: depthwise ParC in blocks.3.2, 3.3, 4.2, 5.2; 3.53 M params."""
    return _create("parc_mobilenetv2_100", "mobilenetv2_100", "mobilenetv2_parc", pretrained, **kwargs)


@register_model
def parc_convnext_xt(pretrained: bool = False, **kwargs) -> nn.Module:
    """ParC-ConvNeXt-XT: ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384)) + ParC; 7.41 M params."""
    base_args = {"depths": (3, 3, 9, 3), "dims": (48, 96, 192, 384)}
    return _create("parc_convnext_xt", "convnext_tiny", "convnext_parc", pretrained, base_args=base_args, **kwargs)


@register_model
def parc_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-Tiny with every attention token mixer replaced by a ParC token mixer."""
    return _create("parc_deit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_attention2parc", pretrained, **kwargs)
