"""``export(conversion_or_model, format, path)``: a converted model as an ONNX, OpenVINO or ExecuTorch file, proven.

The steps (nothing is written unless every one passes):

1. the model's deployable form (:func:`~parc_surgery.export_portable.to_portable`): a copy with every ParC
   as slice + concat + depthwise conv and every ParC-MetaFormer block folded, per-size kernels precomputed;
2. ``torch.export.export`` of that copy at a fixed input shape (batch ``batch``, the conversion's input
   size unless given);
3. the format's writer (:mod:`parc_surgery.export_runtimes`) into temporary files next to the target;
4. the census of the written graph: operator counts, and none of the forms ParC must not take there
   (``DFT``, ``Pad(mode=wrap)``, ``aten.fft_*``);
5. the file loaded and run in its runtime on a random input, compared with the eager model (in eval mode,
   as it is: its own ParC impls and fast paths), within ``atol`` times ``max(1, max |eager output|)``;
6. each temporary file moved into place atomically (``.bin`` before ``.xml`` for OpenVINO); an existing
   file is replaced only with ``force=True``.

One side effect outside this package: the first ExecuTorch export in a process resets Dynamo (XNNPACK's
bilinear-upsampling pass runs a strict ``torch.export`` once, which calls ``torch._dynamo.reset()``), so a
model compiled with ``torch.compile`` before it compiles again on its next call.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from ._atomic import atomic_target
from .checkpoint import check_writable
from .errors import ConfigError, ParcSurgeryError, ValidationError
from .export_portable import to_portable
from .export_runtimes import FORMAT_FILES, FORMATS, get_runtime
from .ops import ParC, portable_form
from .train_flags import eval_mode

__all__ = ["ATOL", "ExportResult", "export", "export_paths"]

ATOL = 1e-4


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and proved.

    ``files``: every file written (OpenVINO: ``.xml`` and ``.bin``); ``ops``: the census (operator -> count);
    ``forbidden``: operators ParC must not lower to that were found (always empty in a returned result:
    :func:`export` raises instead); ``max_abs_diff``: largest ``|runtime - eager|`` over the outputs, held to
    ``tolerance`` (``ATOL * max(1, max |eager|)``); ``parc_layers``: ParC layers in the model.
    """

    format: str
    path: str
    files: tuple[str, ...]
    input_shape: tuple[int, ...]
    runtime: str
    max_abs_diff: float
    tolerance: float
    ops: dict[str, int]
    forbidden: tuple[str, ...]
    parc_layers: int

    @property
    def matches(self) -> bool:
        return self.max_abs_diff <= self.tolerance and not self.forbidden

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))[:12])
        more = len(self.ops) - 12
        parc = (
            f"{self.parc_layers} ParC layer(s) as slice + concat + depthwise conv, no DFT / Pad(mode=wrap)"
            if not self.forbidden
            else f"FORBIDDEN ops found: {', '.join(self.forbidden)}"
        )
        return (
            f"{self.format} -> {', '.join(self.files)}; {self.runtime} vs eager at {tuple(self.input_shape)}: "
            f"max |diff| {self.max_abs_diff:.2e} (<= {self.tolerance:.1e}: {'ok' if self.matches else 'NO'}); "
            f"{parc}; ops: {top}{f' (+{more} more kinds)' if more > 0 else ''}"
        )

    def to_check(self):
        """A report :class:`~parc_surgery.report.Check` named ``export_<format>``."""
        from .report import Check

        return Check(f"export_{self.format}", self.matches, self.summary())

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "path": self.path,
            "files": list(self.files),
            "input_shape": list(self.input_shape),
            "runtime": self.runtime,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "matches": self.matches,
            "ops": dict(self.ops),
            "forbidden": list(self.forbidden),
            "parc_layers": self.parc_layers,
        }


def export_paths(path: str | os.PathLike, fmt: str) -> list[Path]:
    """The files an export to ``path`` writes: ``path`` itself, plus the ``.bin`` next to an OpenVINO ``.xml``."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {fmt!r}")
    p = Path(path)
    suffixes = FORMAT_FILES[fmt]
    if p.suffix.lower() != suffixes[0]:
        raise ConfigError(f"{str(p)!r}: a {fmt} export is written to a {suffixes[0]} file")
    return [p, *(p.with_suffix(s) for s in suffixes[1:])]


def _resolve(obj, input_size) -> tuple[nn.Module, tuple[int, int]]:
    from .api import Conversion, resolve_input_size

    if isinstance(obj, Conversion):
        size = obj.plan.input_size if input_size is None else input_size
        return obj.model, resolve_input_size(obj.model, size)
    if not isinstance(obj, nn.Module):
        raise ConfigError(f"export: expected a Conversion or an nn.Module, got {type(obj).__name__}")
    return obj, resolve_input_size(obj, input_size)


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor], atol: float) -> tuple[float, float]:
    if len(got) != len(ref) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(ref, got)):
        shapes = ([tuple(t.shape) for t in ref], [tuple(t.shape) for t in got])
        raise ValidationError(f"export: the runtime returned outputs {shapes[1]}, eager {shapes[0]}")
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in ref if a.numel()), default=1.0)
    return diff, atol * max(1.0, scale)


def export(
    obj,
    format: str,
    path: str | os.PathLike,
    *,
    input_size: int | tuple[int, int] | None = None,
    batch: int = 1,
    in_chans: int | None = None,
    force: bool = False,
    opset: int = 18,
    atol: float = ATOL,
) -> ExportResult:
    """Export a :class:`~parc_surgery.Conversion` or a model to ``format`` at ``path``, run it, compare it.

    Args:
        obj: a ``Conversion`` (its model, at its planned input size) or any ``nn.Module`` taking one image.
        format: ``"onnx"`` (``.onnx``), ``"openvino"`` (``.xml`` + ``.bin``) or ``"executorch"`` (``.pte``).
        path: the file to write (its suffix must match the format).
        input_size: (H, W) or one int; default: the conversion's, else timm's ``pretrained_cfg``.
        batch: the batch size of the exported graph (its shape is fixed).
        in_chans: input channels (default: from the model).
        force: replace existing files.
        opset: ONNX opset.
        atol: bound on ``max |runtime - eager|``, scaled by ``max(1, max |eager output|)``.

    The model is left as it was (it is copied; its training flags are restored). Raises
    :class:`ConfigError` (bad argument, missing runtime: the message names the extra to install),
    :class:`~parc_surgery.errors.CheckpointError` (a file exists without ``force``, a missing directory) or
    :class:`ValidationError` (export failed, a forbidden operator, or the runtime disagrees with eager);
    on any error nothing is written.
    """
    from .inputs import example_input

    runtime = get_runtime(format)
    files = export_paths(path, format)
    for f in files:
        check_writable(f, force=force)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"export: batch must be a positive int, got {batch!r}")
    model, size = _resolve(obj, input_size)
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type == "meta":
        raise ConfigError("export: the model is on the meta device (no weights); export needs a real model")
    x = example_input(model, size, batch=batch, in_chans=in_chans)
    with eval_mode(model), torch.no_grad():
        ref = _leaves(model(x))
        deploy = to_portable(model, x, offsets_as=runtime.offsets_as)
    if not ref:
        raise ConfigError("export: the model's output holds no tensor to compare")
    tmpdir = Path(tempfile.mkdtemp(dir=files[0].parent, prefix=f".{files[0].name}."))
    try:
        tmp = [tmpdir / f.name for f in files]
        try:
            with torch.no_grad(), portable_form():
                ep = torch.export.export(deploy, (x,))
            runtime.write(ep, x, tmp, opset=opset)
            ops, bad = runtime.census(tmp[0])
            got = runtime.load(tmp, None)(x)
        except ParcSurgeryError:
            raise
        except Exception as e:
            raise ValidationError(f"export to {format} failed: {type(e).__name__}: {e}") from e
        diff, tol = _compare(ref, got, atol)
        result = ExportResult(
            format=format,
            path=str(files[0]),
            files=tuple(str(f) for f in files),
            input_shape=tuple(x.shape),
            runtime=runtime.what,
            max_abs_diff=diff,
            tolerance=tol,
            ops=ops,
            forbidden=bad,
            parc_layers=sum(isinstance(m, ParC) for m in model.modules()),
        )
        if not result.matches:
            raise ValidationError(f"export check failed (nothing written): {result.summary()}")
        for src, dst in sorted(zip(tmp, files), key=lambda sd: sd[1].suffix == ".xml"):  # OpenVINO: .bin first
            with atomic_target(dst, before_replace=lambda d=dst: check_writable(d, force=force)) as t:
                os.replace(src, t)
        return result
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
