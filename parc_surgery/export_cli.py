"""The ``--export`` options of ``parc-convert``, and the step that runs them on the converted model.

``parc-convert MODEL --rule R --export onnx|openvino|executorch [--export-path P]`` converts, then exports the
result with :func:`parc_surgery.export` (written, run in its runtime and compared with eager); the outcome
becomes the report's ``export_<format>`` check. The CLI module only applies :func:`export_options` and calls
the two functions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from .errors import ValidationError
from .export_runtimes import FORMAT_FILES, FORMATS

__all__ = ["check_export_target", "export_options", "run_export"]


def export_options(f):
    """Add ``--export FORMAT`` and ``--export-path PATH`` to a click command."""
    f = click.option("--export-path", metavar="PATH",
                     help="Where --export writes (default: MODEL_RULE.onnx / .xml / .pte).")(f)  # fmt: skip
    return click.option(
        "--export",
        "export_format",
        type=click.Choice(FORMATS),
        help="Export the (converted) model, run it in that runtime, compare with eager (needs the extra of that name).",
    )(f)


def check_export_target(o: dict[str, Any], text: str, rule: str | None, from_file: bool) -> Path | None:
    """The --export file (checked before the slow part), or None without --export."""
    from .checkpoint import check_writable
    from .export_runtimes import require
    from .exporter import export_paths

    fmt = o["export_format"]
    if fmt is None:
        if o["export_path"]:
            raise click.UsageError(f"--export-path needs --export {'|'.join(FORMATS)}")
        return None
    if o["dry_run"] or o["inspect"]:
        raise click.UsageError("--export needs weights and a model to export; it cannot run with --dry-run / --inspect")
    require(fmt)  # a missing runtime is named (with its extra) before the conversion runs
    if o["export_path"]:
        path = Path(o["export_path"])
    else:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).stem if from_file else text).strip("_")
        rule_stem = Path(rule).stem if rule else ""
        path = Path(f"{stem}_{rule_stem}" if rule_stem else stem).with_suffix(FORMAT_FILES[fmt][0])
    for f in export_paths(path, fmt):
        check_writable(f, force=o["force"])
    return path


def run_export(ui, obj, fmt: str, path: Path, size, force: bool):
    """Export, run and compare (``parc_surgery.export``): the report's ``export_<fmt>`` check."""
    from .exporter import export
    from .report import Check

    with ui.step(f"exporting to {fmt} and running it"):
        try:
            result = export(obj, fmt, path, input_size=size, force=force)
        except ValidationError as e:
            return Check(f"export_{fmt}", False, str(e))
    ui.note(f"wrote {fmt} export {', '.join(result.files)}")
    return result.to_check()
