"""ONNX export check: export a converted model, run it in onnxruntime, compare with eager, census its ops.

``check_onnx(model, input_size)`` tries, in order, until one export runs in onnxruntime:

1. the dynamo exporter (``torch.onnx.export(..., dynamo=True)``);
2. the legacy TorchScript exporter: tracing at the given input size bakes the resized kernels and
   position embeddings for that size into the graph (the fixed-size export the reference
   ParC-ConvNets could not produce).

Every ParC is exported on its ``spatial`` path by default (``parc_impl="spatial"``): the FFT path
(Fast-ParC) uses complex tensors, which neither of torch's ONNX exporters translates (torch 2.14:
"No decompositions registered for the complex-valued input" / "aten::fft_rfft ... not supported"), and
the spatial path computes the same function (to ~1e-6). ``parc_impl=None`` exports ParC as it is.

The result lists the operator census (ONNX ``op_type`` -> count) and whether the graph is *pure
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

import torch
from torch import nn

from .errors import ConfigError, ParcSurgeryError, ValidationError
from .ops.parc import use_impl
from .train_flags import get_train_flags, set_train_flags

__all__ = ["OnnxResult", "check_onnx", "onnx_census"]

ATOL = 1e-4
_SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
_MATMUL = {"MatMul", "Einsum", "MatMulInteger", "Gemm"}


@dataclass(frozen=True)
class OnnxResult:
    """The outcome of :func:`check_onnx`.

    exporter: ``"dynamo"`` or ``"legacy"``; parc_impl: what ParC was exported as (``"spatial"``, ``"as is"``, ...).
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

    @property
    def matches(self) -> bool:
        """onnxruntime agrees with eager within the tolerance."""
        return self.max_abs_diff <= self.tolerance

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
        return (
            f"{self.exporter} exporter (opset {self.opset}, ParC {self.parc_impl}); onnxruntime vs eager at "
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
        }


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ConfigError(
            f'the ONNX check needs onnx and onnxruntime ({e}); install them with: pip install "parc-surgery[onnx]"'
        ) from None
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
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset, external_data=False, verbose=False)
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
    parc_impl: str | None = "spatial",
) -> OnnxResult:
    """Export ``model`` to ONNX at ``input_size`` (batch 1), run it in onnxruntime and compare with eager.

    Args:
        model: a converted model (any ``nn.Module`` taking one image tensor); it is run in eval mode and
            left as it was (training flag and ParC impls restored).
        input_size: (H, W) or one int.
        path: where to keep the ``.onnx`` file; default: a temporary file, deleted afterwards.
        opset: ONNX opset version.
        in_chans: input channels (default: from the model, usually 3).
        atol: bound on ``max |onnxruntime - eager|``, scaled by ``max(1, max |eager output|)``.
        parc_impl: the ParC path to export (``"spatial"``, ``"fft"``, ``"auto"``), ``None``: as each ParC is set.
            Eager reference outputs are always computed with the ParC layers as they are.

    Raises:
        ConfigError: onnx / onnxruntime are not installed, or a bad argument.
        ValidationError: no exporter produced a model that onnxruntime runs (the message lists each attempt).
    """
    onnx, ort = _require_onnx()
    from .api import _as_hw

    if parc_impl not in (None, "spatial", "fft", "auto"):
        raise ConfigError(f"check_onnx: parc_impl must be 'spatial', 'fft', 'auto' or None, got {parc_impl!r}")
    from .probe import _first_tensor, example_input

    size = _as_hw(input_size, "input_size")
    params = next(iter(model.parameters()), None)
    if params is not None and params.device.type == "meta":
        raise ConfigError("check_onnx: the model is on the meta device (no weights); export needs a real model")
    x = example_input(model, size, in_chans=in_chans)
    flags = get_train_flags(model)
    model.eval()
    attempts: list[str] = []
    tmpdir = None
    try:
        with torch.no_grad():
            ref = _first_tensor(model(x))
        if ref is None:
            raise ConfigError("check_onnx: the model's output holds no tensor to compare")
        ref = ref.detach().float().cpu()
        if path is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="parc_onnx_")
            out_path = os.path.join(tmpdir.name, "model.onnx")
        else:
            out_path = os.fspath(path)
        from .ops import ParC

        has_parc = any(isinstance(m, ParC) for m in model.modules())
        label = "n/a (no ParC layers)" if not has_parc else "as is" if parc_impl is None else parc_impl
        for exporter in ("dynamo", "legacy"):
            try:
                with use_impl(model, parc_impl):
                    _export(model, x, out_path, dynamo=exporter == "dynamo", opset=opset)
                sess = ort.InferenceSession(out_path, providers=["CPUExecutionProvider"])
                feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}
                y = torch.from_numpy(sess.run(None, feed)[0]).float()
            except ParcSurgeryError:
                raise
            except Exception as e:
                attempts.append(f"{exporter} exporter, ParC {label}: {_first_line(e)}")
                continue
            if tuple(y.shape) != tuple(ref.shape):
                attempts.append(
                    f"{exporter} exporter, ParC {label}: output shape {tuple(y.shape)} != {tuple(ref.shape)}"
                )
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
            )
        raise ValidationError(
            "ONNX export failed with every exporter:\n  - "
            + "\n  - ".join(attempts)
            + "\nSee parc_surgery.onnx_check for what each attempt does."
        )
    finally:
        set_train_flags(flags)
        if tmpdir is not None:
            tmpdir.cleanup()
