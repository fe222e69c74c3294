"""ONNX export check: export a converted model, run it in onnxruntime, compare with eager, census its ops.

``check_onnx(model, input_size)`` exports the model's deployable form
(:func:`~parc_surgery.export_portable.to_portable`: every ParC as slice + concat + depthwise conv, the
form the official ParC-Net code shipped, kernels resized for the input size once) and tries, in order,
until one export runs in onnxruntime:

1. the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``), as
   :func:`parc_surgery.export` does;
2. the legacy TorchScript exporter, for models ``torch.export`` cannot capture.

The result lists the operator census (ONNX ``op_type`` -> count), the operators ParC must never lower to
that were found (``DFT``, ``Pad(mode=wrap)``: none, or the check fails) and whether the graph is *pure
convolution*: no ``Softmax`` and no attention-style ``MatMul`` (one whose two inputs are both computed
from the image, rather than one of them being a weight). Needs the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import ConfigError, ParcSurgeryError, ValidationError
from .export_portable import to_portable
from .export_runtimes import onnx_ops, require
from .ops import portable_form
from .train_flags import eval_mode

__all__ = ["OnnxResult", "check_onnx", "onnx_census"]

ATOL = 1e-4
_SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
_MATMUL = {"MatMul", "Einsum", "MatMulInteger", "Gemm"}


@dataclass(frozen=True)
class OnnxResult:
    """The outcome of :func:`check_onnx`.

    exporter: ``"dynamo"`` or ``"legacy"``; parc_impl: what ParC was exported as (``"portable"``: slice + concat
    + depthwise conv; ``"n/a ..."`` without ParC layers); ``forbidden``: ``DFT`` / ``Pad(mode=wrap)`` nodes found.
    max_abs_diff: largest ``|onnxruntime - eager|`` over the output; tolerance: the bound it was held to
    (``1e-4`` times ``max(1, max |eager output|)``). ``attention_matmuls``: names of MatMul-like nodes
    whose two inputs both depend on the image. ``attempts``: why earlier export attempts failed.
    """

    path: str | None
    exporter: str
    parc_impl: str
    opset: int
    input_shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    op_counts: dict[str, int]
    softmax: int
    attention_matmuls: tuple[str, ...]
    attempts: tuple[str, ...] = field(default=())
    forbidden: tuple[str, ...] = field(default=())

    @property
    def matches(self) -> bool:
        """onnxruntime agrees with eager within the tolerance, and no ``DFT`` / ``Pad(mode=wrap)`` is left."""
        return self.max_abs_diff <= self.tolerance and not self.forbidden

    @property
    def pure_convolution(self) -> bool:
        """No Softmax and no MatMul between two activations: nothing attention-like is left."""
        return self.softmax == 0 and not self.attention_matmuls

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        pure = (
            "yes (no Softmax, no activation x activation MatMul)"
            if self.pure_convolution
            else f"no ({self.softmax} Softmax, {len(self.attention_matmuls)} activation x activation MatMul)"
        )
        bad = f"; FORBIDDEN: {', '.join(self.forbidden)}" if self.forbidden else ""
        return (
            f"{self.exporter} exporter (opset {self.opset}, ParC {self.parc_impl}{bad}); onnxruntime vs eager at "
            f"{tuple(self.input_shape)}: max |diff| {self.max_abs_diff:.2e} (<= {self.tolerance:.1e}: "
            f"{'ok' if self.matches else 'NO'}); pure convolution: {pure}; ops: {ops}"
        )

    def to_check(self):
        """A report :class:`~parc_surgery.report.Check` named ``onnx`` (passes when onnxruntime matches eager)."""
        from .report import Check

        return Check("onnx", self.matches, self.summary())

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "exporter": self.exporter,
            "parc_impl": self.parc_impl,
            "opset": self.opset,
            "input_shape": list(self.input_shape),
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "matches": self.matches,
            "pure_convolution": self.pure_convolution,
            "softmax": self.softmax,
            "attention_matmuls": list(self.attention_matmuls),
            "op_counts": dict(self.op_counts),
            "attempts": list(self.attempts),
            "forbidden": list(self.forbidden),
        }


def _require_onnx():
    require("onnx")  # names the extra to install
    import onnx
    import onnxruntime

    return onnx, onnxruntime


def onnx_census(graph_model) -> tuple[dict[str, int], int, tuple[str, ...]]:
    """(op_type counts, Softmax-like count, activation x activation MatMul node names) of an ONNX model."""
    onnx, _ = _require_onnx()
    with contextlib.suppress(Exception):
        graph_model = onnx.inliner.inline_local_functions(graph_model)
    graph = graph_model.graph
    const = {i.name for i in graph.initializer}
    const |= {i.name for i in graph.sparse_initializer} if hasattr(graph, "sparse_initializer") else set()
    for node in graph.node:  # nodes are topologically sorted: propagate "computed only from constants"
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(o for o in node.output if o)
    counts = Counter(n.op_type for n in graph.node)
    softmax = sum(counts.get(op, 0) for op in _SOFTMAX)
    attention = []
    for node in graph.node:
        if node.op_type in _MATMUL:
            ins = [i for i in node.input[:2] if i]
            if len(ins) == 2 and not any(i in const for i in ins):
                attention.append(node.name or f"{node.op_type}({', '.join(ins)})")
    return dict(counts), softmax, tuple(attention)


def _export(model: nn.Module, x: torch.Tensor, path: str, *, dynamo: bool, opset: int) -> None:
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        with torch.no_grad(), portable_form():
            if dynamo:
                torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset, external_data=False)
            else:
                torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, do_constant_folding=True)


def _first_line(e: BaseException) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    # the dynamo exporter puts the useful reason last; keep the message short
    msg = next((s for s in reversed(lines) if "Error" in s or "error" in s), lines[0] if lines else "")
    return f"{type(e).__name__}: {msg.strip()[:300]}"


def check_onnx(
    model: nn.Module,
    input_size: int | tuple[int, int],
    *,
    path: str | os.PathLike | None = None,
    opset: int = 18,
    in_chans: int | None = None,
    atol: float = ATOL,
) -> OnnxResult:
    """Export ``model`` to ONNX at ``input_size`` (batch 1), run it in onnxruntime and compare with eager.

    Args:
        model: a converted model (any ``nn.Module`` taking one image tensor); it is run in eval mode (its
            training flags are restored) and exported as a portable copy, so it is never changed.
        input_size: (H, W) or one int.
        path: where to keep the ``.onnx`` file (overwritten); default: a temporary file, deleted afterwards.
            :func:`parc_surgery.export` is the one that writes atomically and refuses to overwrite.
        opset: ONNX opset version.
        in_chans: input channels (default: from the model, usually 3).
        atol: bound on ``max |onnxruntime - eager|``, scaled by ``max(1, max |eager output|)``.

    Raises:
        ConfigError: onnx / onnxruntime are not installed, or a bad argument.
        ValidationError: no exporter produced a model that onnxruntime runs (the message lists each attempt).
    """
    onnx, ort = _require_onnx()
    from .api import resolve_input_size
    from .inputs import example_input
    from .ops import ParC

    size = resolve_input_size(model, input_size)
    params = next(iter(model.parameters()), None)
    if params is not None and params.device.type == "meta":
        raise ConfigError("check_onnx: the model is on the meta device (no weights); export needs a real model")
    x = example_input(model, size, in_chans=in_chans)
    attempts: list[str] = []
    tmpdir = None
    with eval_mode(model), torch.no_grad():
        ref = next((t for t in pytree.tree_leaves(model(x)) if isinstance(t, torch.Tensor)), None)
        if ref is None:
            raise ConfigError("check_onnx: the model's output holds no tensor to compare")
        deploy = to_portable(model, x)
    ref = ref.detach().float().cpu()
    try:
        if path is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="parc_onnx_")
            out_path = os.path.join(tmpdir.name, "model.onnx")
        else:
            out_path = os.fspath(path)
        has_parc = any(isinstance(m, ParC) for m in model.modules())
        label = "portable (slice + concat + depthwise conv)" if has_parc else "n/a (no ParC layers)"
        for exporter in ("dynamo", "legacy"):
            try:
                _export(deploy, x, out_path, dynamo=exporter == "dynamo", opset=opset)
                sess = ort.InferenceSession(out_path, providers=["CPUExecutionProvider"])
                feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}
                y = torch.from_numpy(sess.run(None, feed)[0]).float()
            except ParcSurgeryError:
                raise
            except Exception as e:
                attempts.append(f"{exporter} exporter: {_first_line(e)}")
                continue
            if tuple(y.shape) != tuple(ref.shape):
                attempts.append(f"{exporter} exporter: output shape {tuple(y.shape)} != {tuple(ref.shape)}")
                continue
            diff = float((y - ref).abs().max()) if y.numel() else 0.0
            tol = atol * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
            counts, softmax, attention = onnx_census(onnx.load(out_path))
            return OnnxResult(
                path=None if path is None else out_path,
                exporter=exporter,
                parc_impl=label,
                opset=opset,
                input_shape=tuple(x.shape),
                max_abs_diff=diff,
                tolerance=tol,
                op_counts=counts,
                softmax=softmax,
                attention_matmuls=attention,
                attempts=tuple(attempts),
                forbidden=onnx_ops(Path(out_path))[1],
            )
        raise ValidationError(
            "ONNX export failed with every exporter:\n  - "
            + "\n  - ".join(attempts)
            + "\nSee parc_surgery.onnx_check for what each attempt does."
        )
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
