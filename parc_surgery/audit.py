"""The audit of a saved model: it loaded (digests, strict load), and it runs at two input sizes.

``parc-convert FILE`` (without ``--rule``) reports this instead of a conversion's before/after audit:
the file's checks, the parameter count and MACs of the loaded model, the recorded conversion steps.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ParcSurgeryError
from .flops import count_macs, count_params
from .probe import _first_tensor, example_input
from .report import Check, Report
from .sources import create_model, source_from_manifest
from .validate import second_size

__all__ = ["audit_saved"]


def _runs(model: nn.Module, size: tuple[int, int]) -> tuple[torch.Tensor | None, str]:
    try:
        with torch.no_grad():
            return _first_tensor(model(example_input(model, size))), ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _original(manifest: dict, original: nn.Module | None) -> nn.Module | None:
    if original is not None:
        return original
    src = source_from_manifest(manifest["model"])
    if not src.rebuildable:
        return None
    try:
        return create_model(src, meta=True)
    except ParcSurgeryError:
        return None


def audit_saved(
    model: nn.Module,
    manifest: dict,
    input_size: tuple[int, int] | None = None,
    *,
    count: bool = True,
    original: nn.Module | None = None,
) -> tuple[Report, tuple[int, int]]:
    """A :class:`Report` for a model loaded from a file (or rebuilt on the meta device: shapes only).

    The input size defaults to the last recorded step's, then timm's ``pretrained_cfg``, then 224. A size
    at which the model fails is not held against it when the unconverted model (``original``, else the
    recorded source built on the meta device) fails there too, as in a conversion's own checks.
    Returns the report and the input size used.
    """
    steps = manifest["steps"]
    size = input_size
    if size is None:
        size = tuple(steps[-1]["input_size"]) if steps else None
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    p = next(iter(model.parameters()), None)
    meta = p is not None and p.device.type == "meta"
    loaded = "tensors match the manifest digests; loaded with strict=True"
    checks = [Check("loads", True, "dry run: architecture rebuilt on the meta device" if meta else loaded)]
    for name, s in (("runs", size), ("runs_non_square", second_size(size))):
        y, error = _runs(model, s)
        if error:
            base = _original(manifest, original)
            if base is not None and _runs(base, s)[1]:
                checks.append(Check(name, True, f"n/a: the unconverted model does not run at {s[0]}x{s[1]} either"))
            else:
                checks.append(Check(name, False, f"at {s[0]}x{s[1]}: {error}"))
            continue
        ok = y is not None and (meta or bool(torch.isfinite(y).all()))
        what = "shape only (meta device)" if meta else "finite" if ok else "NOT finite"
        shape = tuple(y.shape) if y is not None else None
        checks.append(Check(name, ok, f"at {s[0]}x{s[1]}: output {shape}, {what}"))
    params = count_params(model)
    macs = None
    if count and not meta:
        try:
            macs = count_macs(model, size).macs
        except Exception:
            macs = None
    rule = " + ".join(st["rule"]["name"] for st in steps) or "(none)"
    report = Report(
        model=source_from_manifest(manifest["model"]).spec,
        rule=rule,
        input_size=size,
        params_before=params,
        params_after=params,
        macs_before=macs,
        macs_after=macs,
        macs_after_fft=None,
        targets=(),
        checks=tuple(checks),
        uncounted_ops={},
        notes=(f"audit of a saved model ({len(steps)} conversion step(s): {rule}); 'before' = 'after'",),
    )
    return report, size
