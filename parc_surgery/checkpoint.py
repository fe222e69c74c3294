"""Checkpoints: a converted model saved as safetensors with a manifest, and loaded back exactly.

A converted model is one ``.safetensors`` file (never pickle): its tensors, and in its metadata the
manifest (:mod:`parc_surgery.manifest`): the model source, the conversion steps, digests of the tensors.

``load(path)`` rebuilds the architecture from the manifest alone when its source is timm, torchvision or
transformers: the source model on the meta device (no weights initialised), the recorded rules applied
again (no validation, no counting), the rebuilt plan compared with the recorded one, then the tensors loaded
with ``strict=True``. ``load(path, model=m)`` applies the recorded steps to ``m`` (your unconverted model,
any class) instead: the only way to load a model built by your own code, since a file never imports code.

``save`` checks without converting again: the model's tensors outside the replaced modules must be the
source model's (built on the meta device), and the written file is read back (header, both digests)
before it replaces anything. Writes are atomic and never overwrite without ``force=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_target
from .errors import CheckpointError
from .manifest import (
    HISTORY_ATTR,
    MANIFEST_KEY,
    MANIFEST_VERSION,
    build_manifest,
    check_manifest,
    data_digest,
    get_history,
    layout_digest,
    prepare_tensors,
    tensor_layout,
)
from .rebuild import class_hint, has_unsaved_buffers, layout_problems, materialise, meta_copy, rebuild
from .sources import source_from_manifest

__all__ = [
    "HISTORY_ATTR",
    "MANIFEST_KEY",
    "MANIFEST_VERSION",
    "check_writable",
    "load",
    "load_conversion",
    "read_manifest",
    "rebuild",
    "save",
    "save_conversion",
]


def check_writable(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Raise :class:`CheckpointError` unless ``path`` can be written (directory exists; no file, or ``force``)."""
    path = Path(path)
    directory = path.parent
    if not directory.exists():
        raise CheckpointError(
            f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist; create it first"
        )
    if not directory.is_dir():
        raise CheckpointError(f"cannot write {str(path)!r}: {str(directory)!r} is not a directory")
    if path.is_dir():
        raise CheckpointError(f"cannot write {str(path)!r}: it is a directory")
    if path.exists() and not force:
        raise CheckpointError(
            f"{str(path)!r} exists already; pass force=True (CLI: --force) to overwrite it (it was left untouched)"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def _check_written(tmp: Path, manifest: dict, where: str) -> None:
    """Read the written file back: the same manifest, tensor layout and bytes as meant."""
    from safetensors import safe_open

    layout = []
    with safe_open(str(tmp), framework="pt") as f:
        recorded = json.loads((f.metadata() or {}).get(MANIFEST_KEY, "null"))

        def get(name: str) -> torch.Tensor:
            t = f.get_tensor(name)
            layout.append((name, t.dtype, tuple(t.shape)))
            return t

        data = data_digest(list(f.keys()), get)
    info = manifest["tensors"]
    if (
        recorded != json.loads(json.dumps(manifest))
        or data != info["data_sha256"]
        or layout_digest(layout, info["shared"]) != info["layout_sha256"]
    ):
        raise CheckpointError(f"{where}: the file read back differs from what was written (disk or filesystem fault?)")


def save(
    obj: Any,
    path: str | os.PathLike,
    *,
    source=None,
    model_args: dict | None = None,
    model_name: str | None = None,
    seed: int = 0,
    force: bool = False,
    verify: bool = True,
) -> Path:
    """Write a converted model as ``.safetensors`` with its manifest; returns the path.

    Args:
        obj: a :class:`~parc_surgery.Conversion` (its model and plan), a model returned by :func:`load`
            (further conversions append to its recorded steps), or any model (saved with no steps).
        path: the file to write (conventionally ``*.safetensors``).
        source: where the unconverted model came from (``"resnet18"``, ``"torchvision:resnet18"``,
            ``"transformers:ViTForImageClassification"``, ``"mynets:build"``; see
            :func:`parc_surgery.sources.list_source_forms`); default: found from the model (timm's
            ``pretrained_cfg``, a transformers model's config, :func:`parc_surgery.sources.create_model`'s
            record), else its class is recorded and it loads through ``load(path, model=...)``.
        model_args: the source's keyword arguments (config fields for transformers); default: found with it.
        model_name: the older name of ``source``.
        seed: the seed passed to ``convert`` (recorded; loading restores the saved weights regardless).
        force: replace an existing file.
        verify: check that the model's tensors outside the replaced modules are the recorded source model's
            (built on the meta device, no conversion run), and read the written file back before it replaces
            ``path``.

    Raises:
        CheckpointError: the file exists (without ``force``), the directory is missing or not writable,
            the source is unknown or contradicts the model.
    """
    from .api import Conversion

    if isinstance(obj, Conversion):
        model = obj.model
    elif isinstance(obj, nn.Module):
        model = obj
    else:
        raise CheckpointError(f"save: expected a Conversion or an nn.Module, got {type(obj).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CheckpointError(f"save: seed must be an int, got {seed!r}")
    if source is not None and model_name is not None:
        raise CheckpointError("save: pass source= or its older name model_name=, not both")
    path = check_writable(path, force=force)
    where = f"cannot save to {str(path)!r}"
    history = get_history(obj, model, source=source if source is not None else model_name, model_args=model_args,
                          seed=seed)  # fmt: skip
    tensors, shared = prepare_tensors(model)
    if verify:
        diff = layout_problems(history, model)
        if diff:
            raise CheckpointError(
                f"{where}: {history['model']['name']!r} with the recorded {len(history['steps'])} conversion step(s) "
                f"does not have this model's tensors outside the replaced modules (differences: {diff[:5]}"
                f"{' ...' if len(diff) > 5 else ''}). A model converted twice in memory only records its last step: "
                "save after each conversion and convert the loaded model (parc_surgery.load) instead; a model built "
                "otherwise than its source says needs source= naming how it was built"
            )
    manifest = build_manifest(history, model, tensors, shared)
    metadata = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True), "format": "pt"}
    from safetensors.torch import save_file

    try:
        # check_writable again right before the move: a file that appeared meanwhile is not overwritten
        with atomic_target(path, before_replace=lambda: check_writable(path, force=force)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            if verify:
                _check_written(tmp, manifest, where)
    except OSError as e:
        raise CheckpointError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors
        raise CheckpointError(f"cannot write {str(path)!r}: {type(e).__name__}: {e}") from e
    return path


save_conversion = save


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a parc-surgery file (reads the header only, no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    where = repr(str(path))
    if not path.exists():
        raise CheckpointError(f"{where}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{where}: not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(
            f"{where}: not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise CheckpointError(
            f"{where}: not a parc-surgery file: a safetensors file without a {MANIFEST_KEY!r} manifest "
            "(was it written by parc-convert --output / parc_surgery.save?)"
        )
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: the {MANIFEST_KEY!r} manifest is not valid JSON (tampered?): {e}") from None
    check_manifest(manifest, where)
    return manifest


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, hint: str) -> None:
    have = model.state_dict()
    problems = [f"{k} (missing from the file)" for k in have if k not in state]
    problems += [f"{k} (not in the model)" for k in state if k not in have]
    problems += [
        f"{k} (file {list(state[k].shape)}, model {list(have[k].shape)})"
        for k in have
        if k in state and state[k].shape != have[k].shape
    ]
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{where}: the tensors do not fit the rebuilt model{hint}: {'; '.join(problems[:5])}{more}"
        )
    model.load_state_dict(state, strict=True)


def load_conversion(
    path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device | None = None
) -> tuple[nn.Module, dict]:
    """Like :func:`load`, also returning the file's manifest."""
    from safetensors.torch import load_file

    from .ops import ParC

    path = Path(path)
    where = repr(str(path))
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(
            f"{where}: cannot read the tensors (truncated or corrupt file): {type(e).__name__}: {e}"
        ) from None
    info = manifest["tensors"]
    shared = info["shared"]
    if layout_digest(tensor_layout(tensors), shared) != info.get("layout_sha256") or len(tensors) != info.get("count"):
        raise CheckpointError(
            f"{where}: the tensors (names, shapes, dtypes) do not match the manifest (tampered or corrupt file)"
        )
    if data_digest(tensors, tensors.__getitem__) != info.get("data_sha256"):
        raise CheckpointError(
            f"{where}: the tensor data does not match the manifest's digest (tampered or corrupt file)"
        )
    if model is None:
        built = materialise(manifest, device=device or "cpu", where=where)
    else:
        if device is None:
            device = next((t.device for t in model.state_dict().values() if t.device.type != "meta"), None)
        if not has_unsaved_buffers(model):  # every tensor comes from the file: convert a weightless copy
            model = meta_copy(model)
        built = rebuild(manifest, model=model, where=where)
        if any(t.device.type == "meta" for t in built.state_dict().values()):
            if has_unsaved_buffers(built):
                raise CheckpointError(
                    f"{where}: the model passed is on the meta device and has buffers the file does "
                    "not hold (computed when it is built): pass a model built on a real device"
                )
            built = built.to_empty(device=device or "cpu")
        elif device is not None:
            built = built.to(device)
    floats = manifest.get("float_dtypes") or []
    if len(floats) == 1 and isinstance(floats[0], str) and isinstance(getattr(torch, floats[0], None), torch.dtype):
        built = built.to(getattr(torch, floats[0]))
    state = dict(tensors)
    for alias, canonical in shared.items():
        if canonical not in tensors:
            raise CheckpointError(
                f"{where}: the manifest's shared entry {alias!r} -> {canonical!r} names a missing tensor"
            )
        state[alias] = tensors[canonical]
    _load_state(built, state, where, class_hint(manifest, model))
    impls = manifest.get("parc_impl", {})
    for name, mod in built.named_modules():
        if isinstance(mod, ParC) and impls.get(name) in ("spatial", "fft", "auto"):
            mod.impl = impls[name]
    built.eval()
    source = source_from_manifest(manifest["model"]).to_manifest()
    setattr(built, HISTORY_ATTR, {"model": source, "steps": manifest["steps"]})
    return built, manifest


def load(
    path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device | None = None
) -> nn.Module:
    """Load a model saved by :func:`save` (or ``parc-convert --output``), in eval mode.

    Args:
        path: the ``.safetensors`` file.
        model: your unconverted model (any class): the recorded conversion steps are applied to a copy of it,
            then the weights loaded. Needed when the file's source is your own code (a file never imports
            code); without it the model is rebuilt from the recorded timm / torchvision / transformers source.
        device: where to put the model (default: the CPU, or ``model``'s device).

    The outputs equal those of the saved model exactly. Raises :class:`CheckpointError` for a missing,
    truncated, corrupt or tampered file, a safetensors file not written by parc-surgery, a source that
    cannot be rebuilt, or tensors / recorded steps that do not fit the model (naming the first mismatches).
    The official ParC-Net-S weights (hkzhang91/ParC-Net state dict) load as ``parcnet_s``: :mod:`.official`.
    """
    from .official import load_official

    official = load_official(path, device=device or "cpu") if model is None else None
    return official if official is not None else load_conversion(path, model, device=device)[0]
