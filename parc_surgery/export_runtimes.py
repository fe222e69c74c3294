"""The three export targets: write an ``ExportedProgram``, census what was written, run it in its own runtime.

Each runtime is an optional extra; :func:`require` names the one to install when it is missing.

=============  ==============================================  ================================================
format         written                                         run with
=============  ==============================================  ================================================
``onnx``       ``.onnx`` (the ``torch.export``-based exporter)  onnxruntime, CPU execution provider
``openvino``   ``.xml`` + ``.bin`` (``ov.convert_model``)       OpenVINO CPU plugin, inference precision f32
``executorch`` ``.pte`` (XNNPACK delegate)                     the ExecuTorch runtime (``executorch.runtime``)
=============  ==============================================  ================================================

The census counts the operators of the written graph (ONNX ``op_type``, OpenVINO op type, ExecuTorch edge
operator or delegate call) and lists the ones ParC must never lower to: a discrete Fourier transform (ONNX
``DFT`` / ``STFT``, OpenVINO ``(I)(R)DFT``, ``aten.fft_*``) or circular padding (ONNX ``Pad(mode=wrap)``,
``aten.pad`` with ``circular``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["FORMATS", "FORMAT_FILES", "Runtime", "get_runtime", "require"]

FORMATS = ("onnx", "openvino", "executorch")
FORMAT_FILES = {"onnx": (".onnx",), "openvino": (".xml", ".bin"), "executorch": (".pte",)}
_PACKAGES = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "openvino": ("openvino",), "executorch": ("executorch",)}


def require(fmt: str) -> None:
    """Raise :class:`ConfigError` naming the extra to install unless ``fmt``'s packages import."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {fmt!r}")
    for pkg in _PACKAGES[fmt]:
        try:
            __import__(pkg)
        except ImportError as e:
            raise ConfigError(
                f"exporting to {fmt} needs the {pkg!r} package ({e}); install it with: "
                f'pip install "parc-surgery[{fmt}]"'
            ) from None


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings; keep the user's terminal for our own report."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


# ----- ONNX ------------------------------------------------------------------------------------------------------
def _onnx_write(ep, x: torch.Tensor, files: list[Path], *, opset: int) -> None:
    with _quiet():
        torch.onnx.export(ep, (x,), str(files[0]), dynamo=True, opset_version=opset, external_data=False)


def onnx_ops(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """(op_type counts, forbidden nodes) of an ONNX file; local functions inlined first."""
    import onnx

    model = onnx.load(str(path))
    with contextlib.suppress(Exception):
        model = onnx.inliner.inline_local_functions(model)
    counts = Counter(n.op_type for n in model.graph.node)
    bad = [f"{n.op_type} ({n.name})" for n in model.graph.node if n.op_type in ("DFT", "STFT")]
    for n in model.graph.node:
        if n.op_type == "Pad":
            mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "constant")
            if mode == "wrap":
                bad.append(f"Pad(mode=wrap) ({n.name})")
    return dict(counts), tuple(bad)


def _onnx_session(path: Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between runs: spinning threads would steal the cores from whatever runs next
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _onnx_load(files: list[Path], threads: int | None) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    sess = _onnx_session(files[0], threads)
    name = sess.get_inputs()[0].name
    return lambda x: [torch.from_numpy(y) for y in sess.run(None, {name: x.detach().cpu().numpy()})]


# ----- OpenVINO --------------------------------------------------------------------------------------------------
_OV_DFT = {"DFT", "IDFT", "RDFT", "IRDFT"}


def _openvino_write(ep, x: torch.Tensor, files: list[Path], *, opset: int) -> None:
    import openvino as ov

    with _quiet():
        model = ov.convert_model(ep)
        # weights stay float32 (save_model compresses them to float16 by default)
        ov.save_model(model, str(files[0]), compress_to_fp16=False)


def openvino_ops(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """(op type counts, forbidden ops) of an OpenVINO IR (``.xml``; Parameter / Result / Constant not counted)."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Result", "Constant")]
    counts = Counter(op.get_type_name() for op in ops)
    bad = tuple(f"{op.get_type_name()} ({op.get_friendly_name()})" for op in ops if op.get_type_name() in _OV_DFT)
    return dict(counts), bad


def openvino_config(threads: int | None, precision: str = "f32") -> dict[str, Any]:
    """CPU plugin properties: inference precision (the CPU's default may be bf16, on AMX CPUs) and threads."""
    import openvino.properties as props
    import openvino.properties.hint as hints

    cfg: dict[str, Any] = {hints.inference_precision(): precision}
    if threads is not None:
        cfg[props.inference_num_threads()] = threads
    return cfg


def _openvino_load(files: list[Path], threads: int | None) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(files[0])), "CPU", openvino_config(threads))
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        res = request.infer([x.detach().cpu().numpy()])
        return [torch.from_numpy(res[out].copy()) for out in compiled.outputs]

    return run


# ----- ExecuTorch ------------------------------------------------------------------------------------------------
def _executorch_write(ep, x: torch.Tensor, files: list[Path], *, opset: int) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with _quiet():
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        files[0].write_bytes(edge.to_executorch().buffer)


def executorch_ops(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """(operator counts of the program's execution plan, forbidden ops): delegate calls show as ``XnnpackBackend``."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes())
    program = getattr(program, "program", program)
    counts: Counter[str] = Counter()
    for plan in program.execution_plan:
        for chain in plan.chains:
            for ins in chain.instructions:
                args = ins.instr_args
                if hasattr(args, "op_index"):
                    counts[plan.operators[args.op_index].name] += 1
                elif hasattr(args, "delegate_index"):
                    counts[plan.delegates[args.delegate_index].id] += 1
    bad = tuple(k for k in counts if "fft" in k or "parc_surgery" in k)
    return dict(counts), bad


def _executorch_load(files: list[Path], threads: int | None) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    from executorch.runtime import Runtime as EtRuntime

    if threads is not None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    method = EtRuntime.get().load_program(str(files[0])).load_method("forward")
    return lambda x: [y for y in method.execute([x.detach().cpu().contiguous()]) if isinstance(y, torch.Tensor)]


# ----- registry --------------------------------------------------------------------------------------------------
class Runtime:
    """One export target: ``write(ep, x, files, opset=)``, ``census(files[0])``, ``load(files, threads)``, and
    ``offsets_as``, the position-offset layout of frozen ParCSplits it runs fastest
    (:data:`parc_surgery.export_portable.OFFSET_LAYOUTS`)."""

    def __init__(self, fmt: str, write, census, load, what: str, offsets_as: str):
        self.format, self.write, self.census, self.load, self.what = fmt, write, census, load, what
        self.offsets_as = offsets_as


_RUNTIMES = {
    "onnx": Runtime("onnx", _onnx_write, onnx_ops, _onnx_load, "onnxruntime (CPU execution provider)", "map"),
    "openvino": Runtime(
        "openvino",
        _openvino_write,
        openvino_ops,
        _openvino_load,
        "OpenVINO CPU plugin, inference precision f32",
        "lines",
    ),
    "executorch": Runtime(
        "executorch",
        _executorch_write,
        executorch_ops,
        _executorch_load,
        "ExecuTorch runtime, XNNPACK delegate",
        "lines",
    ),
}


def get_runtime(fmt: str) -> Runtime:
    """The :class:`Runtime` of an export format (its packages checked with :func:`require`)."""
    require(fmt)
    return _RUNTIMES[fmt]
