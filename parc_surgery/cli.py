"""``parc-convert``: convert a timm model with a rule, print the plan and the audit, save the result.

Usage (also ``python -m parc_surgery``)::

    parc-convert MODEL --rule RULE [options]

MODEL is a timm model name (``--model-arg key=value`` passes constructor arguments, values read as YAML
scalars) or the path of a ``.safetensors`` file written by ``--output``. With a file, ``--rule``
converts the loaded model further (the new file records both steps); without ``--rule`` the file is
loaded, checked (its digests, a forward at the input size and at a non-square size, ``--check-onnx``)
and audited, and ``--output`` writes a copy. RULE is a bundled rule name (``--list-rules``) or a YAML path.

The CLI only parses, calls :mod:`parc_surgery.api` / :mod:`parc_surgery.io` and renders: tables go to
stdout, progress and messages to stderr (no spinners when stderr is not a terminal).

Exit codes:

    0  success
    1  any other error (a file that cannot be written or read, an unsupported target, a model that fails)
    2  usage error: bad option or value, unknown model name, invalid rule file
    3  the rule selected nothing in the model
    4  a check on the converted model failed (the report, if asked for, is still written; the model is not)
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError, NoMatchError, ParcSurgeryError, ValidationError

__all__ = ["cli", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_MATCH, EXIT_CHECK_FAILED = 0, 1, 2, 3, 4

EPILOG = """\b
Examples:
  parc-convert mobilevit_s --rule vit2parc --output parcnet_s.safetensors --report parcnet_s.md
  parc-convert resnet50 --rule resnet_parc --input-size 224 --dry-run
  parc-convert vit_giant_patch14_224 --rule vit_attention2parc --dry-run    (meta device: no weights)
  parc-convert resnet50 --rule resnet_parc --inspect
  parc-convert parcnet_s.safetensors --check-onnx
  parc-convert mobilevit_s --rule vit2parc --export onnx --export-path parcnet_s.onnx
\b
Exit codes:
  0  success
  1  any other error (file I/O, unsupported target, ...)
  2  usage error: bad option, unknown model, invalid rule
  3  the rule selected nothing
  4  a check on the converted model failed
"""

_REPORT_SUFFIXES = (".json", ".md")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:[x,\s]\s*(\d+))?\s*$")


class _Command(click.Command):
    """Lets ``--input-size`` take two numbers (``--input-size 256 192``) as well as one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        merged: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--input-size" and i + 2 < len(args) and args[i + 1].isdigit() and args[i + 2].isdigit():
                merged += [a, f"{args[i + 1]}x{args[i + 2]}"]
                i += 3
                continue
            merged.append(a)
            i += 1
        return super().parse_args(ctx, merged)


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    m = _SIZE_RE.match(value)
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise click.BadParameter(f"expected H W, HxW or one number, got {value!r}", param_hint="'--input-size'")
    h = int(m.group(1))
    return h, int(m.group(2)) if m.group(2) is not None else h


def _parse_model_args(items: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise click.BadParameter(
                f"expected KEY=VALUE with KEY a Python name, got {item!r}", param_hint="'--model-arg'"
            )
        if key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"):
            hint = "use --pretrained" if key == "pretrained" else "weights are loaded by timm or from a saved file only"
            raise click.BadParameter(
                f"{key!r} cannot be passed as a model argument ({hint})", param_hint="'--model-arg'"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise click.BadParameter(
                f"{item!r}: the value is not valid YAML ({e})", param_hint="'--model-arg'"
            ) from None
        scalar = (str, int, float, bool, type(None))
        if not (isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))):
            raise click.BadParameter(
                f"{item!r}: values must be scalars or lists of scalars (e.g. depths=[3,3,9,3])",
                param_hint="'--model-arg'",
            )
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Output


class _Ui:
    """Tables on stdout; progress and messages on stderr (spinner and timings only on a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.out = Console(soft_wrap=False)
        self.err = Console(stderr=True)
        if not self.out.is_terminal:
            self.out = Console(width=200, soft_wrap=False, color_system=None)
        if not self.err.is_terminal:
            self.err = Console(stderr=True, width=200, color_system=None, highlight=False)

    @contextlib.contextmanager
    def step(self, text: str):
        if not self.err.is_terminal:
            yield
            return
        t = time.perf_counter()
        with self.err.status(f"{text} ..."):
            yield
        self.err.print(f"[green]✓[/green] {text} [dim]({time.perf_counter() - t:.1f} s)[/dim]")

    def note(self, text: str) -> None:
        self.err.print(text, markup=False, highlight=False)

    def tables(self, tables: list) -> None:
        for t in tables:
            self.out.print(t)


def _plan_table(plan):
    from rich.table import Table

    t = Table(title=f"Plan: {plan.model} with {plan.rule} @ {plan.input_size[0]}x{plan.input_size[1]}")
    for col in ("target", "block", "replaces", "in -> out", "feature", "kernel", "PE", "impl", "init"):
        t.add_column(col)
    for p in plan.targets:
        shapes = f"{_shape(p.in_shape)} -> {_shape(p.out_shape)}"
        kh, kw = p.ctx.kernel_hw
        fh, fw = p.ctx.feature_size
        t.add_row(
            p.name, p.block, p.source_type.rsplit(".", 1)[-1], shapes, f"{fh}x{fw}", f"{kh}x{kw}",
            "yes" if p.ctx.pe else "no", p.ctx.impl, p.ctx.init,
        )  # fmt: skip
    if plan.notes:
        t.caption = "; ".join(plan.notes)
    return t


def _shape(s) -> str:
    return "x".join(map(str, s)) if s else "?"


def _candidate_tables(c) -> list:
    from rich.table import Table

    h, w = c.input_size
    stages = Table(title=f"{c.model} @ {h}x{w}: stages (fx trace: {c.traced_text})")
    for col in ("stage", "container", "blocks", "channels", "feature"):
        stages.add_column(col)
    for s in c.stages:
        feat = "x".join(map(str, s.feature_size or ())) or "?"
        stages.add_row(str(s.index), s.container, str(len(s.blocks)), str(s.channels), feat)
    blocks = Table(title=f"Replaceable blocks ({len(c.blocks)})")
    for col in ("module", "type", "replaceable by"):
        blocks.add_column(col)
    for name, typ, by in c.blocks:
        blocks.add_row(name, typ, ", ".join(by))
    attention = Table(title=f"Attention token mixers ({len(c.attention)})")
    attention.add_column("module")
    for name in c.attention:
        attention.add_row(name)
    out = [stages, blocks, attention]
    if c.selected is not None:
        sel = Table(title=f"Selected by the rule ({len(c.selected)})")
        for col in ("target", "block", "feature", "kernel", "PE", "stage"):
            sel.add_column(col)
        for t in c.selected:
            fh, fw = t.ctx.feature_size
            kh, kw = t.ctx.kernel_hw
            stage = "" if t.stage is None else str(t.stage)
            sel.add_row(t.name, t.block, f"{fh}x{fw}", f"{kh}x{kw}", "yes" if t.ctx.pe else "no", stage)
        if c.diagnostics:
            sel.caption = "\n".join(d.describe() for d in c.diagnostics)
        out.append(sel)
    return out


def _rules_table():
    from rich.table import Table

    from .rule import list_rules, load_rule

    t = Table(title="Bundled rules")
    t.add_column("rule")
    t.add_column("description")
    for name in list_rules():
        try:
            desc = load_rule(name).description
        except ParcSurgeryError as e:
            desc = f"(invalid: {e})"
        t.add_row(name, desc)
    return t


# ----------------------------------------------------------------------------------------------------------------------
# Models


def _is_file_arg(model: str) -> bool:
    return model.endswith(".safetensors") or Path(model).is_file()


def _create(name: str, args: dict[str, Any], *, pretrained: bool, meta: bool):
    import timm
    import torch

    from . import timm_models  # noqa: F401  (registers parcnet_s & co.)

    base = name.split(".", 1)[0] if "." in name and ":" not in name else name
    if ":" in name or not timm.is_model(base):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown timm model {name!r}.{hint} (timm.list_models('*{base.split('_')[0]}*') lists the names; "
            "a saved model is a path ending in .safetensors)"
        )
    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **args)
        return timm.create_model(name, pretrained=pretrained, **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"timm.create_model({name!r}, **{args}) failed: {e} (check --model-arg)") from e


def _with_check(report, check):
    return replace(report, checks=(*report.checks, check))


def _audit_loaded(model, manifest: dict, size: tuple[int, int] | None, *, count: bool):
    """A report for a saved file: it loaded (digests, strict load), forwards at two sizes are finite."""
    import torch

    from .flops import count_macs, count_params
    from .probe import _first_tensor, example_input
    from .report import Check, Report
    from .validate import second_size

    steps = manifest["steps"]
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
        try:
            with torch.no_grad():
                y = _first_tensor(model(example_input(model, s)))
            ok = y is not None and (meta or bool(torch.isfinite(y).all()))
            what = "shape only (meta device)" if meta else "finite" if ok else "NOT finite"
            shape = tuple(y.shape) if y is not None else None
            checks.append(Check(name, ok, f"at {s[0]}x{s[1]}: output {shape}, {what}"))
        except Exception as e:
            checks.append(Check(name, False, f"at {s[0]}x{s[1]}: {type(e).__name__}: {e}"))
    params = count_params(model)
    macs = None
    if count and not meta:
        try:
            macs = count_macs(model, size).macs
        except Exception:
            macs = None
    rule = " + ".join(st["rule"]["name"] for st in steps) or "(none)"
    report = Report(
        model=manifest["model"]["name"],
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


# ----------------------------------------------------------------------------------------------------------------------
# Export (--export)


def _export_target(o: dict, model_name: str, rule: str | None, from_file: bool) -> Path | None:
    """The --export file (checked before the slow part), or None without --export."""
    fmt = o["export_format"]
    if fmt is None:
        if o["export_path"]:
            raise click.UsageError("--export-path needs --export onnx|openvino|executorch")
        return None
    if o["dry_run"] or o["inspect"]:
        raise click.UsageError("--export needs weights and a model to export; it cannot run with --dry-run / --inspect")
    from .export_runtimes import FORMAT_FILES, require
    from .exporter import export_paths

    require(fmt)  # a missing runtime is named (with its extra) before the conversion runs
    if o["export_path"]:
        path = Path(o["export_path"])
    else:
        stem = Path(model_name).stem if from_file else model_name.replace("/", "_")
        rule_stem = Path(rule).stem if rule else ""
        suffix = FORMAT_FILES[fmt][0]
        path = Path(f"{stem}_{rule_stem}{suffix}" if rule_stem else f"{stem}{suffix}")
    from ._atomic import check_target

    for f in export_paths(path, fmt):
        check_target(f, o["force"])
    return path


def _export_step(ui: _Ui, obj, fmt: str, path: Path, size, force: bool, report):
    """Export, run and compare (``parc_surgery.export``); the outcome becomes the report's ``export_<fmt>`` check."""
    from .exporter import export
    from .report import Check

    with ui.step(f"exporting to {fmt} and running it"):
        try:
            result = export(obj, fmt, path, input_size=size, force=force)
        except ValidationError as e:
            return _with_check(report, Check(f"export_{fmt}", False, str(e)))
    ui.note(f"wrote {fmt} export {', '.join(result.files)}")
    return _with_check(report, result.to_check())


# ----------------------------------------------------------------------------------------------------------------------
# The command


@click.command(
    "parc-convert",
    cls=_Command,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.argument("model", required=False, metavar="MODEL")
@click.option("--rule", "-r", metavar="RULE", help="Bundled rule name (see --list-rules) or a rule YAML path.")
@click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="timm.create_model keyword argument (repeatable; VALUE read as YAML, e.g. num_classes=10).",
)
@click.option("--pretrained", is_flag=True, help="Create the timm model with its pretrained weights (downloads).")
@click.option("--input-size", metavar="H [W]", help="Input size to plan at: H W, HxW or one number (square).")
@click.option("--impl", type=click.Choice(["auto", "spatial", "fft"]), help="Override every target's ParC impl.")
@click.option("--init", type=click.Choice(["warm_start", "reference"]), help="Override every target's init.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for newly initialised weights.")
@click.option("--output", "-o", metavar="PATH.safetensors", help="Save the converted model (weights + manifest).")
@click.option("--report", "report_path", metavar="PATH.json|PATH.md", help="Write the audit report.")
@click.option("--dry-run", is_flag=True, help="Plan and audit on the meta device (shapes only); write nothing.")
@click.option("--inspect", is_flag=True, help="Show stages, replaceable blocks, attention and the rule's selection.")
@click.option("--list-rules", is_flag=True, help="List the bundled rules and exit.")
@click.option("--check-onnx", is_flag=True, help="Export to ONNX, run onnxruntime, compare, census the ops.")
@click.option(
    "--export",
    "export_format",
    type=click.Choice(["onnx", "openvino", "executorch"]),
    help="Export the (converted) model, run it in that runtime, compare with eager (needs the extra of that name).",
)
@click.option("--export-path", metavar="PATH", help="Where --export writes (default: MODEL_RULE.onnx / .xml / .pte).")
@click.option("--no-count", is_flag=True, help="Skip counting MACs (faster on big models).")
@click.option("--force", is_flag=True, help="Overwrite existing --output / --report / --export files.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(**opts: Any) -> None:
    """Swap attention / deep conv-stage blocks of MODEL for ParC blocks as RULE says, and audit the result.

    MODEL is a timm model name or a .safetensors file written by --output (without --rule: load, check
    and audit it; with --rule: convert it further).
    """
    ui = _Ui()
    debug = opts["debug"]
    try:
        code = _run(ui, **opts)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except Exception as e:
        code = _exit_code(e)
        if debug:
            traceback.print_exc(file=sys.stderr)
        label = {EXIT_USAGE: "Error", EXIT_NO_MATCH: "Nothing matched", EXIT_CHECK_FAILED: "Check failed"}.get(
            code, "Error"
        )
        msg = str(e) if isinstance(e, ParcSurgeryError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, ParcSurgeryError) and not debug:
            msg += " (unexpected; rerun with --debug for the traceback)"
        click.echo(f"{label}: {msg}", err=True)
    sys.exit(code)


def _exit_code(e: BaseException) -> int:
    if isinstance(e, ConfigError):  # RuleError is a ConfigError
        return EXIT_USAGE
    if isinstance(e, NoMatchError):
        return EXIT_NO_MATCH
    if isinstance(e, ValidationError):
        return EXIT_CHECK_FAILED
    return EXIT_ERROR


def _run(ui: _Ui, **o: Any) -> int:
    from . import io as pio

    if o["list_rules"]:
        ui.tables([_rules_table()])
        return EXIT_OK
    model_name: str | None = o["model"]
    if not model_name:
        raise click.UsageError("missing argument MODEL (a timm model name or a .safetensors file); see --help")
    size = _parse_size(o["input_size"])
    margs = _parse_model_args(o["model_args"])
    from_file = _is_file_arg(model_name)
    dry, rule = o["dry_run"], o["rule"]
    if from_file and (margs or o["pretrained"]):
        raise click.UsageError("--model-arg / --pretrained apply to timm model names, not to a saved .safetensors file")
    if dry and o["check_onnx"]:
        raise click.UsageError("--check-onnx needs weights; it cannot run with --dry-run (meta device)")
    if not rule and not from_file and not o["inspect"]:
        raise click.UsageError("missing option --rule (a bundled rule name, see --list-rules, or a YAML path)")
    report_path = o["report_path"]
    if report_path and Path(report_path).suffix.lower() not in _REPORT_SUFFIXES:
        raise click.BadParameter(f"{report_path!r}: use a .json or .md file", param_hint="'--report'")
    output = o["output"]
    if output and not dry:
        pio._check_target(Path(output), o["force"])  # fail before the slow part, not after it
    if report_path and not dry:
        pio._check_target(Path(report_path), o["force"])  # reports are not clobbered without --force either
    export_path = _export_target(o, model_name, rule, from_file)

    # 1. the model
    meta = dry or o["inspect"]
    manifest = None
    if from_file:
        if not Path(model_name).is_file():
            raise click.BadParameter(f"no such file: {model_name!r}", param_hint="'MODEL'")
        with ui.step(f"loading {model_name}"):
            if meta:
                manifest = pio.read_manifest(model_name)
                model = pio._rebuild(
                    {"model": manifest["model"], "steps": manifest["steps"]}, meta=True, where=repr(model_name)
                )
                setattr(model, pio.HISTORY_ATTR, {"model": manifest["model"], "steps": manifest["steps"]})
            else:
                model, manifest = pio.load_conversion(model_name)
        source_name, source_args = manifest["model"]["name"], None
    else:
        where = " on the meta device" if meta else ""
        with ui.step(f"building {model_name}{where}"):
            model = _create(model_name, margs, pretrained=o["pretrained"], meta=meta)
        source_name, source_args = model_name, margs

    # 2. discovery only
    if o["inspect"]:
        from .api import list_candidates

        with ui.step("probing the model"):
            cands = list_candidates(model, rule, input_size=size)
        ui.tables(_candidate_tables(cands))
        return EXIT_OK

    # 3. convert, or audit a saved model
    from .api import convert

    conv = None
    if rule:
        with ui.step(f"converting with {rule}" + (" (shapes only)" if dry else " (validating, counting)")):
            conv = convert(
                model,
                rule,
                input_size=size,
                impl=o["impl"],
                init=o["init"],
                seed=o["seed"],
                count=not o["no_count"],
                strict=False,
                model_name=source_name if not from_file else None,
            )
        report, size = conv.report, conv.plan.input_size
        out_model = conv.model
    else:
        if o["impl"] or o["init"]:
            raise click.UsageError("--impl / --init apply to a conversion; pass --rule to convert the loaded model")
        with ui.step("checking the saved model"):
            report, size = _audit_loaded(model, manifest, size, count=not o["no_count"] and not dry)
        out_model = model

    if o["check_onnx"]:
        from .onnx_check import check_onnx

        with ui.step("exporting to ONNX and running onnxruntime"):
            try:
                result = check_onnx(out_model, size)
                report = _with_check(report, result.to_check())
            except ValidationError as e:
                from .report import Check

                report = _with_check(report, Check("onnx", False, str(e)))

    if export_path is not None and report.passed:
        obj = conv if conv is not None else out_model
        report = _export_step(ui, obj, o["export_format"], export_path, size, o["force"], report)

    # 4. render and write
    if conv is not None:
        ui.tables([_plan_table(conv.plan)])
    ui.tables(report.rich_tables())
    if dry:
        for what, p in (("model", output), ("report", report_path)):
            if p:
                ui.note(f"dry run: the {what} would be written to {p} (nothing written)")
    else:
        if report_path:
            from .report import write_report

            write_report(report, report_path)
            ui.note(f"wrote report {report_path}")
        if output and report.passed:
            with ui.step(f"saving {output}"):
                obj = conv if conv is not None else out_model
                kwargs = {} if from_file else {"model_name": source_name, "model_args": source_args}
                pio.save(obj, output, seed=o["seed"], force=o["force"], **kwargs)
            ui.note(f"wrote model {output} ({Path(output).stat().st_size / 1e6:.1f} MB)")
        elif output:
            ui.note(f"not writing {output}: a check failed")
    if not report.passed:
        failed = [c for c in report.checks if not c.passed]
        click.echo(
            "Check failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
            err=True,
        )
        return EXIT_CHECK_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``parc-convert`` and ``python -m parc_surgery``."""
    cli.main(args=argv, prog_name="parc-convert")


if __name__ == "__main__":  # pragma: no cover
    main()
