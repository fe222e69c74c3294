"""Weights of the official ParC-Net code (hkzhang91/ParC-Net) for ``parcnet_s``: key layout and loading.

The official code builds ParC-Net-S as ``edgeformer`` (``cvnets/models/classification/edgeformer.py``, scale
``scale_s``, ``gcc_ca`` blocks, ``concat`` fusion, position embeddings, no ParC bias), and its users hold a
plain ``torch.save(model.state_dict())``. ``parcnet_s`` (MobileViT-S converted by ``vit2parc``) has the same
structure tensor for tensor; only the names differ, and the official state dict holds the last stage's first
block twice (the model keeps it as ``self.residual`` as well as ``layer_5.0``). :func:`official_to_timm`
renames every tensor and drops the ``residual.*`` duplicates:

======================================================  ============================================
official (``layer_k`` = stage ``k - 1``)                parcnet_s
======================================================  ============================================
``conv_1.block.{conv,norm}``                            ``stem.{conv,bn}``
``layer_k.j.block.X.block.{conv,norm}``                 ``stages.(k-1).j.Y.{conv,bn}``, X -> Y:
                                                        exp_1x1 / conv_3x3 / red_1x1 ->
                                                        conv1_1x1 / conv2_kxk / conv3_1x1
``layer_k.1.dim_adaptive.0.block.{conv,norm}``          ``stages.(k-1).1.conv_kxk.{conv,bn}``
``layer_k.1.dim_adaptive.1.block.conv``                 ``stages.(k-1).1.conv_1x1``
``layer_k.1.spatial_global_rep.i`` (ParC block ``i``)   ``stages.(k-1).1.blocks.i`` (names below)
``layer_k.1.spatial_global_rep.n`` (final BatchNorm)    ``stages.(k-1).1.norm``
``layer_k.1.channel_adaptive.block.{conv,norm}``        ``stages.(k-1).1.conv_proj.{conv,bn}``
``layer_k.1.local_global_fusion.block.{conv,norm}``     ``stages.(k-1).1.conv_fusion.{conv,bn}``
``conv_1x1_exp.block.{conv,norm}`` / ``classifier.fc``  ``final_conv.{conv,bn}`` / ``head.fc``
======================================================  ============================================

In a ParC block (``gcc_ca_mf_block``): half 1 runs height then width, half 2 width then height, each second
step adding its own position embedding first::

    pre_Norm_1 / pre_Norm_2            -> norm_1 / norm_2
    meta_kernel_1_H / meta_kernel_2_W  -> parc_1_h.weight / parc_1_w.weight      (half 1)
    meta_kernel_1_W / meta_kernel_2_H  -> parc_2_w.weight / parc_2_h.weight      (half 2)
    meta_pe_1_H / meta_pe_1_W          -> pe_1 / pe_2                            (before the norms)
    meta_pe_2_W / meta_pe_2_H          -> parc_1_w.pe / parc_2_h.pe              (before the second steps)
    ffn.{0,1,4}                        -> ffn.{norm,fc1,fc2}
    ca.fc.{0,1,3,4}                    -> ca.{reduce,bn1,expand,bn2}
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["checkpoint_filter_fn", "is_official_state_dict", "load_official", "official_to_timm", "read_state_dict"]

_STEM = "conv_1.block.conv.weight"
_WRAPPERS = ("ema_state_dict", "state_dict_ema", "model_ema", "model_state_dict", "state_dict", "model")
_CONV_NORM = {"conv": "conv", "norm": "bn"}
_IR = {"exp_1x1": "conv1_1x1", "conv_3x3": "conv2_kxk", "red_1x1": "conv3_1x1"}
_FRAME = {"channel_adaptive": "conv_proj", "local_global_fusion": "conv_fusion"}
_BLOCK_TENSORS = {
    "meta_kernel_1_H": "parc_1_h.weight",
    "meta_kernel_2_W": "parc_1_w.weight",
    "meta_kernel_1_W": "parc_2_w.weight",
    "meta_kernel_2_H": "parc_2_h.weight",
    "meta_1_H_bias": "parc_1_h.bias",
    "meta_2_W_bias": "parc_1_w.bias",
    "meta_1_W_bias": "parc_2_w.bias",
    "meta_2_H_bias": "parc_2_h.bias",
    "meta_pe_1_H": "pe_1",
    "meta_pe_1_W": "pe_2",
    "meta_pe_2_W": "parc_1_w.pe",
    "meta_pe_2_H": "parc_2_h.pe",
}
_BLOCK_MODULES = {
    "pre_Norm_1": "norm_1",
    "pre_Norm_2": "norm_2",
    "ffn.0": "ffn.norm",
    "ffn.1": "ffn.fc1",
    "ffn.4": "ffn.fc2",
    "ca.fc.0": "ca.reduce",
    "ca.fc.1": "ca.bn1",
    "ca.fc.3": "ca.expand",
    "ca.fc.4": "ca.bn2",
}
_TOP = {"conv_1": "stem", "conv_1x1_exp": "final_conv"}
_LAYER = re.compile(r"layer_(\d+)\.(\d+)\.(.+)")
_GLOBAL = re.compile(r"spatial_global_rep\.(\d+)\.(.+)")


def _unwrap(obj: Any) -> Any:
    """The state dict inside a training checkpoint (EMA weights first), without DDP's ``module.`` prefix."""
    for key in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def is_official_state_dict(state_dict: Any) -> bool:
    """Whether ``state_dict`` (or the checkpoint holding it) has the official ParC-Net key layout."""
    sd = _unwrap(state_dict)
    return isinstance(sd, Mapping) and _STEM in sd and any(str(k).startswith("layer_") for k in sd)


def _block_name(rest: str) -> str | None:
    if rest in _BLOCK_TENSORS:
        return _BLOCK_TENSORS[rest]
    for old, new in _BLOCK_MODULES.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def _layer_name(stage: int, idx: str, rest: str, last_global: dict[tuple[int, str], int]) -> str | None:
    head = f"stages.{stage}.{idx}"
    if m := re.fullmatch(r"block\.(exp_1x1|conv_3x3|red_1x1)\.block\.(conv|norm)\.(.+)", rest):
        return f"{head}.{_IR[m[1]]}.{_CONV_NORM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"dim_adaptive\.0\.block\.(conv|norm)\.(.+)", rest):
        return f"{head}.conv_kxk.{_CONV_NORM[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"dim_adaptive\.1\.block\.conv\.(.+)", rest):
        return f"{head}.conv_1x1.{m[1]}"
    if m := re.fullmatch(r"(channel_adaptive|local_global_fusion)\.block\.(conv|norm)\.(.+)", rest):
        return f"{head}.{_FRAME[m[1]]}.{_CONV_NORM[m[2]]}.{m[3]}"
    if m := _GLOBAL.fullmatch(rest):
        if int(m[1]) == last_global[(stage, idx)]:  # the BatchNorm after the ParC blocks
            return f"{head}.norm.{m[2]}"
        block = _block_name(m[2])
        return None if block is None else f"{head}.blocks.{m[1]}.{block}"
    return None


def official_to_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an official ParC-Net-S state dict to ``parcnet_s`` names; drop the ``residual.*`` duplicates.

    Raises:
        CheckpointError: a key the official ParC-Net-S does not have, or ``residual.*`` tensors that are not
            copies of ``layer_5.0.*``.
    """
    sd = _unwrap(state_dict)
    last_global: dict[tuple[int, str], int] = {}
    for k in sd:
        if (m := _LAYER.fullmatch(k)) and (g := _GLOBAL.fullmatch(m[3])):
            key = (int(m[1]) - 1, m[2])
            last_global[key] = max(last_global.get(key, -1), int(g[1]))
    out: dict[str, Any] = {}
    for k, v in sd.items():
        new = None
        if k.startswith("residual."):
            twin = sd.get("layer_5.0." + k[len("residual.") :])
            same = isinstance(twin, torch.Tensor) and twin.shape == v.shape
            if not (same and (twin is v or v.is_meta or torch.equal(twin, v))):
                raise CheckpointError(
                    f"official ParC-Net checkpoint: {k!r} is not a copy of layer_5.0 (the official model keeps the "
                    "last stage's first block twice); the file is not an edgeformer state dict"
                )
            continue
        if m := _LAYER.fullmatch(k):
            new = _layer_name(int(m[1]) - 1, m[2], m[3], last_global)
        elif m := re.fullmatch(r"(conv_1|conv_1x1_exp)\.block\.(conv|norm)\.(.+)", k):
            new = f"{_TOP[m[1]]}.{_CONV_NORM[m[2]]}.{m[3]}"
        elif k.startswith("classifier.fc."):
            new = "head.fc." + k[len("classifier.fc.") :]
        if new is None:
            raise CheckpointError(
                f"official ParC-Net checkpoint: key {k!r} has no counterpart in parcnet_s (the mapping covers "
                "ParC-Net-S: edgeformer scale_s, gcc_ca blocks, concat fusion)"
            )
        out[new] = v
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module | None = None) -> Mapping[str, Any]:
    """timm's ``pretrained_filter_fn`` for ``parcnet_s``: official layouts are renamed, ours pass unchanged."""
    return official_to_timm(state_dict) if is_official_state_dict(state_dict) else state_dict


def read_state_dict(path: str | os.PathLike, *, official_only: bool = False) -> dict[str, Any] | None:
    """The tensors of a safetensors file or a ``torch.save`` state dict (``weights_only=True``); None otherwise.

    ``official_only``: None for a safetensors file whose names are not the official layout, read from its header
    alone (a parc-surgery file is not read twice).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except Exception:
        names = None  # not safetensors: a pickle from torch.save, read without running any code
    if names is not None:
        if official_only and not is_official_state_dict(dict.fromkeys(names)):
            return None
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    sd = _unwrap(obj)
    return dict(sd) if isinstance(sd, Mapping) else None


def load_official(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module | None:
    """``parcnet_s`` with the official ParC-Net-S weights of ``path``, in eval mode; None if ``path`` is not one."""
    sd = read_state_dict(path, official_only=True)
    if sd is None or not is_official_state_dict(sd):
        return None
    import timm

    fc = sd.get("classifier.fc.weight")
    num_classes = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 1000
    model = timm.create_model("parcnet_s", num_classes=num_classes)
    try:
        model.load_state_dict(official_to_timm(sd), strict=True)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:500]
        raise CheckpointError(
            f"{str(path)!r}: official ParC-Net weights that do not fit parcnet_s (is it ParC-Net-S: edgeformer "
            f"scale_s, gcc_ca blocks, concat fusion?): {why}"
        ) from None
    return model.to(device).eval()
