"""``parc-convert``: convert a model with a rule, print the plan and the audit, save the result.

Usage (also ``python -m parc_surgery``)::

    parc-convert MODEL --rule RULE [options]

MODEL is a model source (:mod:`parc_surgery.sources`, ``--list-sources``): a timm name (``mobilevit_s``),
``torchvision:NAME``, ``transformers:PATH``, ``transformers:CLASS`` or your ``package.module:function``;
``--model-arg key=value`` passes its arguments (values read as YAML). Or MODEL is the path of a
``.safetensors`` file written by ``--output``: with ``--rule`` the loaded model is converted further (the new
file records both steps); without, the file is loaded, checked (its digests, a forward at the input size and
at a non-square size, ``--check-onnx``) and audited, and ``--output`` writes a copy. A file whose model came
from your own code loads with ``--model package.module:function`` (a file never imports code by itself).
RULE is a bundled rule name (``--list-rules``) or a YAML path.

The CLI only parses, calls :mod:`parc_surgery.api`, :mod:`parc_surgery.sources` and
:mod:`parc_surgery.checkpoint`, and renders (:mod:`parc_surgery.render`): tables go to stdout, progress
and messages to stderr (no spinners when stderr is not a terminal).

Exit codes:

    0  success
    1  any other error (a file that cannot be written or read, an unsupported target, a model that fails)
    2  usage error: bad option or value, unknown model source, invalid rule file
    3  the rule selected nothing in the model
    4  a check on the converted model failed (the report, if asked for, is still written; the model is not)
"""

from __future__ import annotations

import re
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError, NoMatchError, ParcSurgeryError, ValidationError
from .export_cli import check_export_target, export_options, run_export
from .healing.cli_options import check_heal_options, heal_options, run_heal
from .render import Ui
from .sources import list_source_forms
from .vocab import IMPLS, INITS

__all__ = ["cli", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_MATCH, EXIT_CHECK_FAILED = 0, 1, 2, 3, 4

EPILOG = (
    """\b
Examples:
  parc-convert mobilevit_s --rule vit2parc --output parcnet_s.safetensors --report parcnet_s.md
  parc-convert resnet50 --rule resnet_parc --input-size 224 --dry-run
  parc-convert torchvision:resnet50 --rule resnet_parc --input-size 224 --model-arg num_classes=10
  parc-convert transformers:./my_convnext --rule convstage2parc --input-size 224 --inspect
  parc-convert vit_giant_patch14_224 --rule vit_attention2parc --dry-run    (meta device: no weights)
  parc-convert parcnet_s.safetensors --check-onnx
  parc-convert mobilevit_s --rule vit2parc --export onnx --export-path parcnet_s.onnx
\b
Model sources (MODEL; --model for a saved file; --list-sources):
"""
    + "\n".join(f"  {form:<24} e.g. {example}" for form, example, _ in list_source_forms())
    + """
\b
Exit codes:
  0  success
  1  any other error (file I/O, unsupported target, ...)
  2  usage error: bad option, unknown model source, invalid rule
  3  the rule selected nothing
  4  a check on the converted model failed
"""
)

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


def _plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())


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
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise click.BadParameter(
                f"{item!r}: the value is not valid YAML ({e})", param_hint="'--model-arg'"
            ) from None
        if not _plain(value):
            raise click.BadParameter(
                f"{item!r}: values must be plain YAML (numbers, strings, lists, mappings; e.g. depths=[3,3,9,3])",
                param_hint="'--model-arg'",
            )
        out[key] = value
    return out


def _is_file_arg(model: str) -> bool:
    return model.endswith(".safetensors") or Path(model).is_file()


def _with_check(report, check):
    return replace(report, checks=(*report.checks, check))


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
    help="Argument of the model source (repeatable; VALUE read as YAML, e.g. num_classes=10): create_model / "
    "get_model / builder keyword, or transformers config field.",
)
@click.option(
    "--model",
    "base_model",
    metavar="SOURCE",
    help="For a saved MODEL file: the unconverted model to apply its steps to (needed for your own builder's files).",
)
@click.option(
    "--pretrained", is_flag=True, help="timm / torchvision: create the model with pretrained weights (downloads)."
)
@click.option("--input-size", metavar="H [W]", help="Input size to plan at: H W, HxW or one number (square).")
@click.option("--impl", type=click.Choice(IMPLS), help="Override every target's ParC impl.")
@click.option("--init", type=click.Choice(INITS), help="Override every target's init.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for newly initialised weights.")
@click.option("--output", "-o", metavar="PATH.safetensors", help="Save the converted model (weights + manifest).")
@click.option("--report", "report_path", metavar="PATH.json|PATH.md", help="Write the audit report.")
@click.option("--dry-run", is_flag=True, help="Plan and audit on the meta device (shapes only); write nothing.")
@click.option("--inspect", is_flag=True, help="Show stages, replaceable blocks, attention and the rule's selection.")
@click.option("--list-rules", is_flag=True, help="List the bundled rules and exit.")
@click.option("--list-sources", is_flag=True, help="List the MODEL forms (timm, torchvision, transformers, yours).")
@click.option("--check-onnx", is_flag=True, help="Export to ONNX, run onnxruntime, compare, census the ops.")
@export_options
@click.option("--no-count", is_flag=True, help="Skip counting MACs (faster on big models).")
@click.option("--force", is_flag=True, help="Overwrite existing --output / --report / --export files.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@heal_options
def cli(**opts: Any) -> None:
    """Swap attention / deep conv-stage blocks of MODEL for ParC blocks as RULE says, and audit the result.

    MODEL is a model source (see below and --list-sources) or a .safetensors file written by --output
    (without --rule: load, check and audit it; with --rule: convert it further).
    """
    ui = Ui()
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


def _check_usage(o: dict[str, Any], from_file: bool, margs: dict) -> None:
    """Option combinations that make no sense, refused before anything is built."""
    if from_file and (margs or o["pretrained"]) and not o["base_model"]:
        raise click.UsageError(
            "--model-arg / --pretrained apply to a model source, not to a saved .safetensors file "
            "(give the file's unconverted model with --model SOURCE)"
        )
    if o["base_model"] and not from_file:
        raise click.UsageError("--model gives the unconverted model of a saved .safetensors MODEL; MODEL is a source")
    if o["dry_run"] and o["check_onnx"]:
        raise click.UsageError("--check-onnx needs weights; it cannot run with --dry-run (meta device)")
    if not o["rule"] and not from_file and not o["inspect"]:
        raise click.UsageError("missing option --rule (a bundled rule name, see --list-rules, or a YAML path)")
    check_heal_options(o, rule=o["rule"], dry=o["dry_run"])
    report_path = o["report_path"]
    if report_path and Path(report_path).suffix.lower() not in _REPORT_SUFFIXES:
        raise click.BadParameter(f"{report_path!r}: use a .json or .md file", param_hint="'--report'")
    if from_file and not Path(o["model"]).is_file():
        raise click.BadParameter(f"no such file: {o['model']!r}", param_hint="'MODEL'")


def _run(ui: Ui, **o: Any) -> int:
    from . import checkpoint
    from .sources import create_model, get_source

    if o["list_rules"] or o["list_sources"]:
        from .render import rules_table, sources_table

        ui.tables(([rules_table()] if o["list_rules"] else []) + ([sources_table()] if o["list_sources"] else []))
        return EXIT_OK
    text: str | None = o["model"]
    if not text:
        raise click.UsageError("missing argument MODEL (a model source, see --list-sources, or a .safetensors file)")
    size = _parse_size(o["input_size"])
    margs = _parse_model_args(o["model_args"])
    from_file = _is_file_arg(text)
    _check_usage(o, from_file, margs)
    dry, rule, output, report_path = o["dry_run"], o["rule"], o["output"], o["report_path"]
    source = get_source(o["base_model"] or text, margs) if (o["base_model"] or not from_file) else None
    for path in (output, report_path) if not dry else ():
        if path:  # fail before the slow part, not after it; reports are not clobbered without --force either
            checkpoint.check_writable(path, force=o["force"])
    export_path = check_export_target(o, text, rule, from_file)

    # 1. the model
    meta = dry or o["inspect"]
    manifest = None
    where = " on the meta device" if meta else ""
    if from_file:
        with ui.step(f"loading {text}" + (f" onto {source.spec}" if source else "")):
            base = create_model(source, meta=meta, pretrained=o["pretrained"]) if source else None
            if meta:
                manifest = checkpoint.read_manifest(text)
                model = checkpoint.rebuild(manifest, model=base, where=repr(text))
            else:
                model, manifest = checkpoint.load_conversion(text, base)
    else:
        with ui.step(f"building {source.spec}{where}"):
            model = create_model(source, meta=meta, pretrained=o["pretrained"])

    # 2. discovery only
    if o["inspect"]:
        from .api import list_candidates
        from .render import candidate_tables

        with ui.step("probing the model"):
            cands = list_candidates(model, rule, input_size=size)
        ui.tables(candidate_tables(cands))
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
                model_name=None if from_file else source.spec,
            )
        if o["heal"] and conv.report.passed:
            conv = run_heal(ui, conv, o)
        report, size = conv.report, conv.plan.input_size
        out_model = conv.model
    else:
        from .audit import audit_saved

        if o["impl"] or o["init"]:
            raise click.UsageError("--impl / --init apply to a conversion; pass --rule to convert the loaded model")
        with ui.step("checking the saved model"):
            report, size = audit_saved(model, manifest, size, count=not o["no_count"] and not dry, original=base)
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
        report = _with_check(report, run_export(ui, obj, o["export_format"], export_path, size, o["force"]))

    # 4. render and write
    if conv is not None:
        from .render import plan_table

        ui.tables([plan_table(conv.plan)])
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
                checkpoint.save(conv if conv is not None else out_model, output, seed=o["seed"], force=o["force"])
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
