"""Checks run on a converted model, each recorded as a ``Check`` in the report.

* ``output_shape``: every tensor of the output (a tensor, tuple, dict or ``transformers`` ``ModelOutput``:
  :mod:`parc_surgery.outputs`) has the original's shape at the input size;
* ``output_structure``: the converted model returns the same structure as the original (same container
  types, keys, ``None`` entries and tensor ranks), at both sizes;
* ``output_shape_non_square``: the same shapes at a second, non-square size (n/a when the original itself
  does not run there, e.g. a fixed-size ViT);
* ``finite``: every floating output tensor is finite at both sizes;
* ``target_shapes``: every replaced module's input/output shapes equal those of the module it replaced;
* ``spatial_vs_fft``: every ParC layer's output on ``spatial`` and on ``fft`` agree to 1e-4 on the input
  it received in the model (relative to the output's largest magnitude; 4 ulps for float16 / bfloat16
  models), and the model runs with every ParC on ``fft``. Judged per layer: a deep network at random init
  amplifies float32 rounding (EfficientNetV2 at 128 px: layers agree to 2e-7, outputs to 1.5e-2); the whole
  model's difference (the largest over the output tensors) is reported alongside;
* ``traced_vs_eager``: where the original traced with torch.fx, the converted model traces too (in eval
  mode, as Python branches on ``self.training`` are fixed at trace time) and every traced output tensor
  equals the eager one.

The ``preserved`` check (nothing of the input lost without a record) is :mod:`parc_surgery.preserved`.

All forwards run in eval mode without grad; training flags and ParC impls are restored afterwards.
The forward at the input size runs every ParC on ``spatial`` and is the spatial side of ``spatial_vs_fft``
and the eager side of ``traced_vs_eager`` (so the converted model runs 3 forwards there, not 4); the
non-square forward runs each ParC's own impl.
On the meta device only the shape checks run (the numeric ones are recorded as n/a).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .ops import ParC
from .ops.parc import use_impl
from .outputs import output_structure, tensor_leaves
from .plan import PlannedTarget
from .probe import _first_tensor, trace_model
from .report import Check
from .train_flags import eval_mode

__all__ = ["eval_forward", "second_size", "validate_model"]

RTOL_IMPL = 1e-4
RTOL_TRACE = 1e-5


def second_size(size: tuple[int, int]) -> tuple[int, int]:
    """A non-square size near ``size``: width scaled by 3/4, rounded to a multiple of 32 (8 when small)."""
    h, w = size
    step = 32 if w >= 96 else 8
    w2 = max(step, round(w * 0.75 / step) * step)
    if w2 == w:
        w2 = w + step
    return h, w2


@contextlib.contextmanager
def _eval(model: nn.Module):
    with eval_mode(model), torch.no_grad():
        yield


def eval_forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` (the whole output) in eval mode without grad; ``None`` if the model fails at this input."""
    try:
        with _eval(model):
            return model(x)
    except Exception:
        return None


def _tol(rtol: float, dtype: torch.dtype) -> float:
    """``rtol``, widened to 4 ulps of a low-precision dtype (bfloat16: 0.031, float16: 0.0039)."""
    return max(rtol, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else rtol


def _layer_agreement(inputs: list[tuple[ParC, torch.Tensor]]) -> float:
    """Largest relative difference of any ParC layer's ``spatial`` and ``fft`` outputs on its recorded input."""
    worst = 0.0
    with torch.no_grad():
        for m, a in inputs:
            old = m.impl
            try:
                m.impl = "spatial"
                ys = m(a)
                m.impl = "fft"
                yf = m(a)
            finally:
                m.impl = old
            worst = max(worst, _rel(ys, yf))
    return worst


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    scale = float(a.abs().max()) or 1.0
    return float((a.double() - b.double()).abs().max()) / scale


def _rel_out(a: Any, b: Any) -> float:
    """The largest :func:`_rel` over two outputs' tensors (``inf`` when their tensors do not pair up)."""
    la, lb = tensor_leaves(a), tensor_leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for (_, x), (_, y) in zip(la, lb)):
        return float("inf")
    return max((_rel(x, y) for (_, x), (_, y) in zip(la, lb)), default=0.0)


def _shapes(out: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(p, tuple(t.shape)) for p, t in tensor_leaves(out)]


def _compare_shapes(y: Any, ref: Any) -> tuple[bool, str]:
    """Whether every output tensor has the original's shape, and the detail saying so (or the first mismatch)."""
    got, want = _shapes(y), _shapes(ref)
    if not want:
        return False, "the original output holds no tensor"
    if [p for p, _ in got] != [p for p, _ in want]:
        return False, f"output tensors {[p for p, _ in got][:4]} != original {[p for p, _ in want][:4]}"
    bad = [f"{p}: {a} != original {b}" for (p, a), (_, b) in zip(got, want) if a != b]
    if bad:
        return False, "; ".join(bad[:3])
    if len(got) == 1:
        return True, f"{got[0][1]} == original {want[0][1]}"
    return True, f"all {len(got)} output tensors keep their shapes (first {got[0][0]}: {got[0][1]})"


def _finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for _, t in tensor_leaves(out) if t.is_floating_point())


def validate_model(
    new: nn.Module,
    targets: list[PlannedTarget] | tuple,
    *,
    x: torch.Tensor,
    x2: torch.Tensor,
    ref: Any,
    ref2: Any,
    original_traced: bool,
    leaf_types: tuple[type, ...] = (),
) -> list[Check]:
    """The checks of the module docstring; ``ref`` / ``ref2`` are the original's whole outputs at ``x`` / ``x2``."""
    checks: list[Check] = []
    meta = x.device.type == "meta"
    # target shapes, recorded by hooks during the first forward
    seen: dict[str, list] = {}
    handles = []
    for t in targets:
        mod = new.get_submodule(t.name)

        def hook(m, args, out, _name=t.name):
            a = _first_tensor(args)
            o = _first_tensor(out)
            seen.setdefault(_name, []).append(
                (tuple(a.shape) if a is not None else None, tuple(o.shape) if o is not None else None)
            )

        handles.append(mod.register_forward_hook(hook))
    parc_inputs: list[tuple[ParC, torch.Tensor]] = []  # each ParC's input in the first forward (the first call)
    if not meta:
        for mod in {id(m): m for m in new.modules() if isinstance(m, ParC)}.values():

            def record(m, args, _inputs=parc_inputs):
                if args and isinstance(args[0], torch.Tensor) and all(m is not p for p, _ in _inputs):
                    _inputs.append((m, args[0].detach()))

            handles.append(mod.register_forward_pre_hook(record))
    try:
        try:  # every ParC on ``spatial``: this forward is also the spatial side of ``spatial_vs_fft``
            with _eval(new), use_impl(new, "spatial"):
                y = new(x)
            err = ""
        except Exception as e:
            y, err = None, f"{type(e).__name__}: {e}"
    finally:
        for h in handles:
            h.remove()
    ran = y is not None or not err
    ok, detail = _compare_shapes(y, ref) if ran else (False, f"converted model: {err}")
    checks.append(Check("output_shape", ok, f"at {tuple(x.shape[2:])}: {detail}"))
    y2 = eval_forward(new, x2) if ref2 is not None else None
    structures = [(tuple(x.shape[2:]), output_structure(y) if ran else None, output_structure(ref))]
    if ref2 is not None:
        structures.append((tuple(x2.shape[2:]), output_structure(y2), output_structure(ref2)))
    bad = [f"at {s}: {a} != original {b}" for s, a, b in structures if a != b]
    checks.append(
        Check(
            "output_structure",
            ran and not bad,
            "; ".join(bad) if bad else f"the original's structure at every size: {structures[0][2]}",
        )
    )
    bad = []
    for t in targets:
        calls = seen.get(t.name, [])
        want = (t.in_shape, t.out_shape)
        if not calls or any(c != want for c in calls):
            bad.append(f"{t.name}: {calls[:1] or 'not called'} != {want}")
    checks.append(
        Check(
            "target_shapes",
            ran and not bad,
            f"all {len(targets)} targets keep their input/output shapes" if not bad else "; ".join(bad[:5]),
        )
    )
    if ref2 is None:
        checks.append(
            Check("output_shape_non_square", True, f"n/a: the original model does not run at {tuple(x2.shape[2:])}")
        )
    else:
        ok2, detail2 = _compare_shapes(y2, ref2) if y2 is not None else (False, "the converted model fails")
        checks.append(Check("output_shape_non_square", ok2, f"at {tuple(x2.shape[2:])}: {detail2}"))
    if meta:
        for name in ("finite", "spatial_vs_fft", "traced_vs_eager"):
            checks.append(Check(name, True, "n/a: meta device (shapes only, no values)"))
        return checks
    finite = ran and _finite(y) and (y2 is None or _finite(y2))
    checks.append(Check("finite", finite, "all outputs finite" if finite else "non-finite values in the output"))
    if not ran or not any(isinstance(m, ParC) for m in new.modules()):
        checks.append(Check("spatial_vs_fft", ran, "n/a: no ParC layers"))
    else:
        with use_impl(new, "fft"):
            yf = eval_forward(new, x)
        if yf is None:
            checks.append(Check("spatial_vs_fft", False, "the forward with every ParC on fft failed"))
        else:
            dtype = next((t.dtype for _, t in tensor_leaves(y) if t.is_floating_point()), torch.float32)
            r_layer, tol = _layer_agreement(parc_inputs), _tol(RTOL_IMPL, dtype)
            checks.append(
                Check(
                    "spatial_vs_fft",
                    r_layer <= tol,
                    f"max relative difference per ParC layer {r_layer:.2e} over {len(parc_inputs)} layer(s) "
                    f"(<= {tol:g}); whole model output {_rel_out(y, yf):.2e}",
                )
            )
    if not original_traced:
        checks.append(Check("traced_vs_eager", True, "n/a: the original model does not trace with torch.fx"))
    else:
        # traced in eval mode (branches on ``self.training`` are baked into the graph) and, like ``y``, with
        # every ParC on spatial (an impl a module's forward reads while tracing would be baked in too)
        with _eval(new), use_impl(new, "spatial"):
            gm, why = trace_model(new, leaf_types)
        if gm is None:
            checks.append(Check("traced_vs_eager", False, f"the converted model does not trace: {why}"))
        else:
            with use_impl(new, "spatial"):
                yt = eval_forward(gm, x)
            if yt is None or not ran:
                checks.append(Check("traced_vs_eager", False, "the traced converted model fails to run"))
            else:
                dtype = next((t.dtype for _, t in tensor_leaves(y) if t.is_floating_point()), torch.float32)
                r, tol = _rel_out(y, yt), _tol(RTOL_TRACE, dtype)
                checks.append(Check("traced_vs_eager", r <= tol, f"max relative difference {r:.2e} (<= {tol:g})"))
    return checks
