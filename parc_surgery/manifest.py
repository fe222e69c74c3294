"""The checkpoint manifest: what a parc-surgery ``.safetensors`` file records, and its digests.

The manifest is JSON in the file's metadata under ``"parc_surgery"``:

- ``model``: the model source (:mod:`parc_surgery.sources`): ``kind`` (timm / torchvision / transformers /
  builder / module), ``name``, ``args`` and, for transformers, the ``config`` (config.json contents);
  ``model_class``: the model's class (shown when a file is loaded onto another class).
- ``steps``: one per conversion: the rule (its YAML text), input size, impl / init override, seed and plan.
- ``parc_impl`` (each ParC layer's impl), ``float_dtypes``, ``versions``, and ``tensors``: the count, tied
  entries (``shared``) and two SHA-256 digests, of names / shapes / dtypes and of the bytes.

Format 1 (timm only: ``model`` without ``kind``) is still read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .sources import get_source, source_from_manifest, source_of_model

__all__ = [
    "HISTORY_ATTR",
    "MANIFEST_FORMAT",
    "MANIFEST_KEY",
    "MANIFEST_VERSION",
    "build_manifest",
    "check_manifest",
    "data_digest",
    "get_history",
    "layout_digest",
    "prepare_tensors",
    "tensor_layout",
]

MANIFEST_KEY = "parc_surgery"
MANIFEST_FORMAT = "parc-surgery-model"
MANIFEST_VERSION = 2
HISTORY_ATTR = "_parc_surgery_history"  # set on loaded models: their source and conversion steps


# ----------------------------------------------------------------------------------------------------------------------
# Tensors and digests


def prepare_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous tensors to write, with entries that alias another one (tied/shared) split off."""
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storage: set[int] = set()
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise CheckpointError(
                f"cannot save {name!r}: the model is on the meta device (it has shapes but no weights); "
                "materialise it first (model.to_empty(device='cpu') and load or initialise weights)"
            )
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() and key in seen_views:
            shared[name] = seen_views[key]
            continue
        if t.numel():
            seen_views[key] = name
        t = t.cpu()
        ptr = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or (t.numel() and ptr in seen_storage):
            t = t.contiguous().clone()  # an overlapping view of another tensor: store its own copy
        if t.numel():
            seen_storage.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors, shared


def layout_digest(layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], shared: dict[str, str]) -> str:
    """SHA-256 of the tensors' names, dtypes and shapes (``(name, dtype, shape)`` rows) and the tied entries."""
    h = hashlib.sha256()
    for name, dtype, shape in sorted(layout, key=lambda r: r[0]):
        h.update(f"{name}\t{str(dtype).removeprefix('torch.')}\t{list(shape)}\n".encode())
    for alias in sorted(shared):
        h.update(f"{alias}\t= {shared[alias]}\n".encode())
    return h.hexdigest()


def data_digest(names: Iterable[str], get_tensor) -> str:
    """SHA-256 of the tensors' bytes, in name order; ``get_tensor(name)`` gives one tensor at a time."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = get_tensor(name).detach().cpu().contiguous()
        h.update(name.encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` rows of ``tensors``, as :func:`layout_digest` takes them."""
    return [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


# ----------------------------------------------------------------------------------------------------------------------
# History (source + steps) and the manifest


def _versions() -> dict[str, str]:
    import safetensors
    import timm

    from . import __version__

    return {"parc_surgery": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": getattr(safetensors, "__version__", "?")}  # fmt: skip


def _one(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def _step(conv, *, seed: int) -> dict[str, Any]:
    rule = conv.rule
    if rule is None:
        raise CheckpointError("the Conversion has no rule recorded (conv.rule is None); it cannot be rebuilt")
    text = rule.text if rule.text is not None else rule.to_yaml()
    targets = conv.plan.targets
    return {
        "rule": {"name": rule.name, "text": text},
        "input_size": list(conv.plan.input_size),
        # an impl/init override makes every target agree; one common value is safe to pass back as the override
        "impl": _one({t.ctx.impl for t in targets}),
        "init": _one({t.ctx.init for t in targets}),
        "seed": seed,
        "plan": conv.plan.to_dict(),
    }


def get_history(obj, model: nn.Module, *, source=None, model_args: dict | None = None, seed: int = 0) -> dict:
    """The model source and conversion steps to record for ``obj`` (a Conversion or a model).

    A model loaded from a file carries its history; further conversions append to it. Otherwise the source
    is ``source`` (a string of :func:`parc_surgery.sources.list_source_forms` or a ``ModelSource``), else
    what :func:`parc_surgery.sources.source_of_model` finds (a model of unknown origin is recorded by class).
    """
    from .api import Conversion

    history = getattr(model, HISTORY_ATTR, None)
    try:
        if history is not None:
            history = json.loads(json.dumps(history))  # a private copy
            recorded = source_from_manifest(history["model"])
            given = get_source(source, model_args) if source is not None else recorded
            if (given.kind, given.name) != (recorded.kind, recorded.name):
                raise CheckpointError(
                    f"source={source!r} contradicts the model's recorded source {history['model']['name']!r} "
                    "(it was loaded from a parc-surgery file); leave source out"
                )
        else:
            if source is None:
                src = source_of_model(model)
                if model_args is not None:
                    src = get_source(src, model_args) if src.kind != "module" else src
            else:
                src = get_source(source, model_args)
            history = {"model": src.to_manifest(), "steps": []}
    except ConfigError as e:
        raise CheckpointError(f"cannot record how to rebuild this model: {e}") from None
    history["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    if isinstance(obj, Conversion):
        history["steps"].append(_step(obj, seed=seed))
    return history


def build_manifest(history: dict, model: nn.Module, tensors: dict[str, torch.Tensor], shared: dict[str, str]) -> dict:
    """The manifest of a file holding ``tensors`` (from :func:`prepare_tensors`) of ``model``."""
    from .ops import ParC

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        **history,
        "parc_impl": {name: m.impl for name, m in model.named_modules() if isinstance(m, ParC)},
        "float_dtypes": dtypes,
        "tensors": {
            "count": len(tensors),
            "shared": shared,
            "layout_sha256": layout_digest(tensor_layout(tensors), shared),
            "data_sha256": data_digest(tensors, tensors.__getitem__),
        },
        "versions": _versions(),
    }


def check_manifest(m: Any, where: str) -> None:
    """Raise :class:`CheckpointError` unless ``m`` is a well-formed manifest this version can read."""
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{where}: the manifest is not a {MANIFEST_FORMAT!r} manifest (tampered?)")
    version = m.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: the manifest has no valid format_version (got {version!r})")
    if version > MANIFEST_VERSION:
        raise CheckpointError(
            f"{where}: written by a newer parc-surgery (manifest format {version}; this version reads "
            f"{MANIFEST_VERSION}); upgrade parc-surgery"
        )
    try:
        source_from_manifest(m.get("model"), where=where)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    ok = (
        isinstance(m.get("steps"), list)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("rule"), dict)
            and isinstance(s["rule"].get("text"), str)
            and isinstance(s["rule"].get("name"), str)
            and isinstance(s.get("input_size"), list)
            and isinstance(s.get("plan"), dict)
            and isinstance(s["plan"].get("targets", []), list)
            for s in m["steps"]
        )
        and isinstance(m.get("tensors"), dict)
        and isinstance(m["tensors"].get("shared"), dict)
        and isinstance(m.get("parc_impl", {}), dict)
    )
    if not ok:
        raise CheckpointError(f"{where}: the manifest is incomplete or malformed (tampered?)")
