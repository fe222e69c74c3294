"""Rebuilding a converted architecture from a manifest: its source model, then the recorded steps applied again.

The source is built from the manifest alone (timm, torchvision, transformers; on the meta device, so no
weights are initialised) or is the unconverted model the caller passes (any class: the only way for
models of user code, since a file never imports code). Each recorded rule is applied with ``convert``
(no validation, no counting) and the plan it gives must be the recorded one. Used by
:mod:`parc_surgery.checkpoint` to load files and to check, when saving, that a model is what its manifest
says without converting again.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ParcSurgeryError
from .sources import create_model, source_from_manifest

__all__ = ["class_hint", "has_unsaved_buffers", "layout_problems", "materialise", "meta_copy", "rebuild"]


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


def class_hint(manifest: dict, model: nn.Module | None) -> str:
    """A note for errors when ``model`` is not of the class the file was saved from (else ``""``)."""
    saved = manifest.get("model_class")
    given = None if model is None else f"{type(model).__module__}.{type(model).__qualname__}"
    if given is None or not isinstance(saved, str) or saved == given:
        return ""
    return f" (the file was saved from a {saved}; the model passed is a {given})"


def _apply_steps(model: nn.Module, manifest: dict, where: str, hint: str = "", *, given: bool = False) -> nn.Module:
    from .api import convert
    from .rule import parse_rule

    for i, step in enumerate(manifest["steps"]):
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
            raise CheckpointError(f"{source}: the recorded conversion no longer applies{hint}: {e}") from e
        except (TypeError, ValueError, KeyError) as e:  # a malformed step (hand-edited manifest)
            raise CheckpointError(f"{source}: malformed conversion step: {type(e).__name__}: {e}") from e
        if _plan_key(conv.plan.to_dict()) != _plan_key(step["plan"]):
            got = [(t.name, t.block) for t in conv.plan.targets]
            want = [(t.get("name"), t.get("block")) for t in step["plan"].get("targets", [])]
            raise CheckpointError(
                f"{source}: rebuilding gives a different plan than the one recorded (rebuilt targets {got[:6]}, "
                f"recorded {want[:6]}){hint}; "
                + (
                    "the model passed is not the one the file was converted from (another architecture or arguments?)"
                    if given
                    else f"the file was written by another parc-surgery/timm version ({manifest.get('versions', {})}) "
                    "or edited"
                )
            )
        model = conv.model
    return model


def _source_model(manifest: dict, *, meta: bool, where: str) -> nn.Module:
    src = source_from_manifest(manifest["model"], where=where)
    if src.kind == "builder":
        raise CheckpointError(
            f"{where}: the model was built by your code ({src.name}, arguments {dict(src.args)}), and a file never "
            f"imports code: load it with parc_surgery.load(path, model={src.name.split(':')[-1]}(...)) or the CLI's "
            f"--model {src.name}"
        )
    if src.kind == "module":
        raise CheckpointError(
            f"{where}: the model's source was not recorded (class {src.name}): load it with "
            "parc_surgery.load(path, model=<your unconverted model>) (CLI: --model package.module:function), or "
            "save it with source= naming where it came from (e.g. source='torchvision:resnet18') to rebuild it alone"
        )
    try:
        return create_model(src, meta=meta)
    except ParcSurgeryError as e:
        raise CheckpointError(f"{where}: the recorded source {src.spec!r} cannot be rebuilt: {e}") from e


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (no data copied)."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def has_unsaved_buffers(model: nn.Module) -> bool:
    """Whether ``model`` has buffers its state dict leaves out (computed in ``__init__``: lost on the meta device)."""
    keys = set(model.state_dict().keys())
    return any(name not in keys for name, _ in model.named_buffers(remove_duplicate=False))


def rebuild(manifest: dict, *, model: nn.Module | None = None, where: str = "the manifest") -> nn.Module:
    """The converted architecture a manifest describes, without its weights.

    Without ``model``: the recorded source built on the meta device (timm, torchvision, transformers only;
    never user code) with the recorded steps applied. With ``model`` (your unconverted model, on any device,
    the meta device included): the recorded steps applied to a copy of it. Used by ``parc-convert FILE
    --dry-run`` / ``--inspect``; :func:`load` also fills in the weights.
    """
    if model is None:
        return _apply_steps(_source_model(manifest, meta=True, where=where), manifest, where)
    if not manifest["steps"]:
        model = copy.deepcopy(model)  # each conversion step works on a copy; no step: copy here
    return _apply_steps(model, manifest, where, class_hint(manifest, model), given=True)


def materialise(manifest: dict, *, device: str | torch.device, where: str) -> nn.Module:
    """:func:`rebuild` with storage allocated on ``device`` (uninitialised: the caller loads the weights)."""
    model = rebuild(manifest, where=where)
    if has_unsaved_buffers(model):  # non-persistent buffers are computed in __init__: build for real
        return _apply_steps(_source_model(manifest, meta=False, where=where), manifest, where).to(device)
    return model.to_empty(device=device)


def layout_problems(history: dict, model: nn.Module) -> list[str]:
    """Tensors outside the recorded targets that differ from the recorded source model's (built on meta).

    The check ``save`` makes instead of converting again; empty when the source is user code (not built).
    """
    src = source_from_manifest(history["model"])
    if not src.rebuildable:
        return []  # nothing to build without running the user's code; load(path, model=...) checks it
    base = _source_model(history, meta=True, where="save")
    targets = {t.get("name") for s in history["steps"] for t in s["plan"].get("targets", [])}

    def kept(m: nn.Module) -> dict[str, tuple]:
        ids = {id(mod) for name, mod in m.named_modules() if name in targets}
        skip = targets | {n for n, mod in m.named_modules(remove_duplicate=False) if id(mod) in ids}
        under = lambda k: any(k == s or k.startswith(s + ".") for s in skip)  # noqa: E731
        return {k: tuple(v.shape) for k, v in m.state_dict().items() if not under(k)}

    names = {n for n, _ in model.named_modules()}
    missing = sorted(t for t in targets if t not in names)
    want, have = kept(base), kept(model)
    return missing or sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
