"""Saving and loading converted models: safetensors weights plus a manifest that rebuilds the architecture.

A converted model is stored as one ``.safetensors`` file (never pickle). Its metadata holds, as JSON
under the key ``"parc_surgery"``, everything needed to rebuild the architecture before the weights
are loaded: the timm model name and constructor arguments, then, per conversion step, the rule
(its YAML text), the input size, impl/init/seed and the resolved plan. It also records the library
versions and two SHA-256 digests (tensor names/shapes/dtypes, and tensor bytes), so a file whose
tensors do not match its manifest is refused.

``load(path)`` rebuilds the model from the manifest only: ``timm.create_model(name, pretrained=False,
**args)`` (on the meta device when that is safe, so no weights are initialised twice), then
``convert`` with each recorded rule (no validation, no counting), checks that the rebuilt plan matches
the recorded one, and loads the tensors with ``strict=True``. Nothing in the file is executed: the
model name must be in timm's registry, the rules are parsed by the safe YAML loader.

Writes are atomic: a temporary file in the target directory is moved over the target with
``os.replace``; an existing file is only replaced with ``force=True``, and a failed write leaves no
partial file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_target
from .errors import CheckpointError, ParcSurgeryError

__all__ = ["MANIFEST_KEY", "MANIFEST_VERSION", "load", "load_conversion", "read_manifest", "save", "save_conversion"]

MANIFEST_KEY = "parc_surgery"
MANIFEST_FORMAT = "parc-surgery-model"
MANIFEST_VERSION = 1
HISTORY_ATTR = "_parc_surgery_history"  # set on loaded models: how to rebuild them (model + steps)

# create_model arguments that would load files or weights at rebuild time: never recorded, never honoured
_FORBIDDEN_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


# ----------------------------------------------------------------------------------------------------------------------
# Tensors and digests


def _prepare_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _layout_digest(tensors: dict[str, torch.Tensor], shared: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\t{str(t.dtype).removeprefix('torch.')}\t{list(t.shape)}\n".encode())
    for alias in sorted(shared):
        h.update(f"{alias}\t= {shared[alias]}\n".encode())
    return h.hexdigest()


def _data_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Manifest


def _versions() -> dict[str, str]:
    import safetensors
    import timm

    from . import __version__

    return {"parc_surgery": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": getattr(safetensors, "__version__", "?")}  # fmt: skip


def _json_args(args: Any, what: str) -> dict[str, Any]:
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise CheckpointError(f"{what} must be a dict of create_model keyword arguments, got {type(args).__name__}")
    bad = [k for k in args if k in _FORBIDDEN_ARGS]
    if bad:
        raise CheckpointError(
            f"{what}: {', '.join(map(repr, bad))} cannot be recorded (a saved model rebuilds without loading "
            "weights or files; its weights are in the file itself)"
        )
    try:
        return json.loads(json.dumps(args, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} must hold plain values (numbers, strings, booleans, lists): {e}") from None


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


def _is_timm_model(name: str) -> bool:
    import timm

    from . import timm_models  # noqa: F401  (registers the parc_* model names)

    return isinstance(name, str) and timm.is_model(name)


def _history_for(obj, model: nn.Module, model_name: str | None, model_args: dict | None, seed: int) -> dict:
    from .api import Conversion

    history = getattr(model, HISTORY_ATTR, None)
    if history is not None:
        history = json.loads(json.dumps(history))  # a private copy
        if model_name is not None and model_name != history["model"]["name"]:
            raise CheckpointError(
                f"model_name={model_name!r} contradicts the model's recorded source {history['model']['name']!r} "
                "(it was loaded from a parc-surgery file); leave model_name out"
            )
    else:
        if model_name is None:
            cfg = getattr(model, "pretrained_cfg", None)
            model_name = cfg.get("architecture") if isinstance(cfg, dict) else None
            if model_name is None and isinstance(obj, Conversion):
                model_name = obj.plan.model
        if model_args is None:
            model_args = dict(getattr(model, "_model_args", None) or {})
        if not model_name or not _is_timm_model(model_name):
            raise CheckpointError(
                f"cannot record how to rebuild this model: {model_name!r} is not a timm model name. "
                "Saved models are rebuilt with timm.create_model(model_name, **model_args) before their weights are "
                "loaded; pass model_name= (and model_args=) naming the timm model it was created from"
            )
        history = {"model": {"name": model_name, "args": _json_args(model_args, "model_args")}, "steps": []}
    if isinstance(obj, Conversion):
        history["steps"].append(_step(obj, seed=seed))
    return history


def _parc_impls(model: nn.Module) -> dict[str, str]:
    from .ops import ParC

    return {name: m.impl for name, m in model.named_modules() if isinstance(m, ParC)}


# ----------------------------------------------------------------------------------------------------------------------
# Rebuilding


def _plan_key(plan: dict) -> list[tuple]:
    return [
        (
            t.get("name"),
            t.get("block"),
            tuple(t.get("kernel_size") or ()),
            t.get("pe"),
            tuple(t.get("feature_size") or ()),
        )
        for t in plan.get("targets", [])
    ]


def _has_unsaved_buffers(model: nn.Module) -> bool:
    keys = set(model.state_dict().keys())
    return any(name not in keys for name, _ in model.named_buffers(remove_duplicate=False))


def _rebuild(history: dict, *, meta: bool, where: str) -> nn.Module:
    """The architecture described by ``history`` (model + conversion steps), weights uninitialised if ``meta``."""
    import timm

    from .api import convert
    from .rule import parse_rule

    name, args = history["model"]["name"], history["model"]["args"]
    if not _is_timm_model(name):
        raise CheckpointError(f"{where}: the manifest names model {name!r}, which is not in timm's registry")
    bad = [k for k in args if k in _FORBIDDEN_ARGS]
    if bad:
        raise CheckpointError(f"{where}: the manifest's model args hold {bad}, which are never honoured")
    try:
        if meta:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **args)
        else:
            model = timm.create_model(name, pretrained=False, **args)
    except Exception as e:
        raise CheckpointError(f"{where}: timm.create_model({name!r}, **{args}) failed: {type(e).__name__}: {e}") from e
    for i, step in enumerate(history["steps"]):
        source = f"{where} (manifest step {i}, rule {step['rule']['name']!r})"
        try:
            rule = parse_rule(step["rule"]["text"], source=source)
            conv = convert(
                model,
                rule,
                input_size=tuple(step["input_size"]),
                impl=step.get("impl"),
                init=step.get("init"),
                seed=int(step.get("seed", 0)),
                validate=False,
                count=False,
                strict=False,
            )
        except ParcSurgeryError as e:
            raise CheckpointError(f"{source}: the recorded conversion no longer applies: {e}") from e
        except (TypeError, ValueError, KeyError) as e:  # a malformed step (hand-edited manifest)
            raise CheckpointError(f"{source}: malformed conversion step: {type(e).__name__}: {e}") from e
        if _plan_key(conv.plan.to_dict()) != _plan_key(step["plan"]):
            got = [(t.name, t.block) for t in conv.plan.targets]
            want = [(t.get("name"), t.get("block")) for t in step["plan"].get("targets", [])]
            raise CheckpointError(
                f"{source}: rebuilding gives a different plan than the one recorded (rebuilt targets {got[:6]}, "
                f"recorded {want[:6]}); the file was written by another parc-surgery/timm version "
                f"({history.get('versions', {})}) or edited"
            )
        model = conv.model
    return model


def _build(history: dict, *, device: str | torch.device, where: str) -> nn.Module:
    """A materialised model on ``device``: built on meta then allocated when every buffer is saved."""
    model = _rebuild(history, meta=True, where=where)
    if _has_unsaved_buffers(model):  # non-persistent buffers are computed in __init__: build for real
        model = _rebuild(history, meta=False, where=where).to(device)
    else:
        model = model.to_empty(device=device)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Public API


def _check_target(path: Path, force: bool) -> None:
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


def save(
    obj: Any,
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_args: dict | None = None,
    seed: int = 0,
    force: bool = False,
    verify: bool = True,
) -> Path:
    """Write a converted model as ``.safetensors`` with a rebuild manifest; returns the path.

    Args:
        obj: a :class:`~parc_surgery.Conversion` (its model and plan), a model returned by :func:`load`
            (further conversions append to its recorded steps), or a model made by ``timm.create_model``
            (e.g. ``"parcnet_s"``).
        path: the file to write (conventionally ``*.safetensors``).
        model_name: the timm model the conversion started from; default: the model's
            ``pretrained_cfg["architecture"]``.
        model_args: ``create_model`` keyword arguments it was built with; default: timm's ``model._model_args``.
        seed: the seed passed to ``convert`` (recorded; loading restores the saved weights regardless).
        force: replace an existing file.
        verify: rebuild the architecture on the meta device first and check that it has exactly the model's
            tensors (names and shapes), so a file that could not be loaded back is never written.

    Raises:
        CheckpointError: the file exists (without ``force``), the directory is missing or not writable,
            the model cannot be rebuilt from what would be recorded.
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
    path = Path(path)
    _check_target(path, force)
    history = _history_for(obj, model, model_name, model_args, seed)
    tensors, shared = _prepare_tensors(model)
    if verify:
        rebuilt = _rebuild(history, meta=True, where=f"save {str(path)!r}")
        want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
            raise CheckpointError(
                f"cannot save to {str(path)!r}: rebuilding {history['model']['name']!r} with the recorded "
                f"{len(history['steps'])} conversion step(s) does not give this model's tensors (differences: "
                f"{diff[:5]}{' ...' if len(diff) > 5 else ''}). A model converted twice in memory only records its "
                "last step: save after each conversion and convert the loaded model (parc_surgery.load) instead"
            )
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        **history,
        "parc_impl": _parc_impls(model),
        "float_dtypes": dtypes,
        "tensors": {
            "count": len(tensors),
            "shared": shared,
            "layout_sha256": _layout_digest(tensors, shared),
            "data_sha256": _data_digest(tensors),
        },
        "versions": _versions(),
    }
    metadata = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True), "format": "pt"}
    from safetensors.torch import save_file

    try:
        with atomic_target(path, before_replace=lambda: _check_target(path, force)) as tmp:
            # _check_target again right before the move: a file that appeared meanwhile is not overwritten
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError as e:
        raise CheckpointError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors
        raise CheckpointError(f"cannot write {str(path)!r}: {type(e).__name__}: {e}") from e
    return path


save_conversion = save


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r}: {what}")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a parc-surgery file (reads the header only, no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if not path.is_file():
        raise _fail(path, "not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise _fail(path, f"not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise _fail(
            path,
            f"not a parc-surgery file: a safetensors file without a {MANIFEST_KEY!r} manifest "
            "(was it written by parc-convert --output / parc_surgery.save?)",
        )
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise _fail(path, f"the {MANIFEST_KEY!r} manifest is not valid JSON (tampered?): {e}") from None
    _validate_manifest(manifest, path)
    return manifest


def _validate_manifest(m: Any, path: Path) -> None:
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise _fail(path, f"the manifest is not a {MANIFEST_FORMAT!r} manifest (tampered?)")
    version = m.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _fail(path, f"the manifest has no valid format_version (got {version!r})")
    if version > MANIFEST_VERSION:
        raise _fail(
            path,
            f"written by a newer parc-surgery (manifest format {version}; this version reads {MANIFEST_VERSION}); "
            "upgrade parc-surgery",
        )
    model = m.get("model")
    ok = (
        isinstance(model, dict)
        and isinstance(model.get("name"), str)
        and isinstance(model.get("args"), dict)
        and isinstance(m.get("steps"), list)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("rule"), dict)
            and isinstance(s["rule"].get("text"), str)
            and isinstance(s["rule"].get("name"), str)
            and isinstance(s.get("input_size"), list)
            and isinstance(s.get("plan"), dict)
            for s in m["steps"]
        )
        and isinstance(m.get("tensors"), dict)
        and isinstance(m["tensors"].get("shared"), dict)
        and isinstance(m.get("parc_impl", {}), dict)
    )
    if not ok:
        raise _fail(path, "the manifest is incomplete or malformed (tampered?)")


def load_conversion(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Like :func:`load`, also returning the file's manifest."""
    from safetensors.torch import load_file

    from .ops import ParC

    path = Path(path)
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise _fail(path, f"cannot read the tensors (truncated or corrupt file): {type(e).__name__}: {e}") from None
    info = manifest["tensors"]
    shared = info["shared"]
    if _layout_digest(tensors, shared) != info.get("layout_sha256") or len(tensors) != info.get("count"):
        raise _fail(path, "the tensors (names, shapes, dtypes) do not match the manifest (tampered or corrupt file)")
    if _data_digest(tensors) != info.get("data_sha256"):
        raise _fail(path, "the tensor data does not match the manifest's digest (tampered or corrupt file)")
    history = {"model": manifest["model"], "steps": manifest["steps"]}
    model = _build(history, device=device, where=repr(str(path)))
    floats = manifest.get("float_dtypes") or []
    if len(floats) == 1 and isinstance(floats[0], str) and isinstance(getattr(torch, floats[0], None), torch.dtype):
        model = model.to(getattr(torch, floats[0]))
    state = dict(tensors)
    for alias, canonical in shared.items():
        if canonical not in tensors:
            raise _fail(path, f"the manifest's shared entry {alias!r} -> {canonical!r} names a missing tensor")
        state[alias] = tensors[canonical]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise _fail(path, f"the tensors do not fit the rebuilt model: {str(e).splitlines()[0][:500]}") from None
    impls = manifest.get("parc_impl", {})
    for name, mod in model.named_modules():
        if isinstance(mod, ParC) and impls.get(name) in ("spatial", "fft", "auto"):
            mod.impl = impls[name]
    model.eval()
    setattr(model, HISTORY_ATTR, history)
    return model, manifest


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save` (or ``parc-convert --output``) and load its weights, in eval mode.

    The outputs equal those of the saved model exactly. Raises :class:`CheckpointError` for a missing,
    truncated, corrupt or tampered file, a safetensors file not written by parc-surgery, or one whose
    recorded conversion no longer rebuilds the same architecture.
    The official ParC-Net-S weights (hkzhang91/ParC-Net state dict) load as ``parcnet_s``: :mod:`.official`.
    """
    from .official import load_official

    official = load_official(path, device=device)
    return official if official is not None else load_conversion(path, device=device)[0]
