"""The ``--heal`` options of ``parc-convert``, and the step that runs them on a fresh conversion.

``parc-convert MODEL --rule R --heal DIR`` converts, then heals the conversion towards MODEL with the
images in DIR (unlabelled, any nesting) before the audit is rendered and the model saved; the report
gains the heal section. The CLI module only applies :func:`heal_options` and calls the two functions.
"""

from __future__ import annotations

from typing import Any

import click

__all__ = ["check_heal_options", "heal_options", "run_heal"]

_DEFAULTS = {"heal_images": 1024, "heal_steps": 300, "heal_batch_size": 32}


def heal_options(f):
    """Add ``--heal DIR`` and its options to a click command."""
    opts = [
        click.option("--heal", "heal", metavar="DIR",
                     help="Heal the converted model towards the original with the (unlabelled) images in DIR."),
        click.option("--heal-images", type=click.IntRange(min=1), metavar="N",
                     help=f"--heal: at most N training images [default: {_DEFAULTS['heal_images']}]."),
        click.option("--heal-steps", type=click.IntRange(min=0), metavar="N",
                     help=f"--heal: steps of each stage [default: {_DEFAULTS['heal_steps']}]."),
        click.option("--heal-batch-size", type=click.IntRange(min=1), metavar="N",
                     help=f"--heal: batch size [default: {_DEFAULTS['heal_batch_size']}]."),
        click.option("--heal-device", metavar="DEVICE", help="--heal: cpu, cuda or cuda:N [default: the model's]."),
        click.option("--heal-work-dir", metavar="DIR",
                     help="--heal: save each finished stage there; a rerun resumes after the last one."),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


def check_heal_options(o: dict[str, Any], *, rule: str | None, dry: bool) -> None:
    """Usage errors before anything slow runs."""
    keys = ("heal_images", "heal_steps", "heal_batch_size", "heal_device", "heal_work_dir")
    given = [k for k in keys if o.get(k) is not None]
    if not o.get("heal"):
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise click.UsageError(f"{names} apply to --heal DIR; pass --heal with a folder of images")
        return
    if not rule:
        raise click.UsageError("--heal heals a conversion: pass --rule too")
    if dry:
        raise click.UsageError("--heal trains weights; it cannot run with --dry-run (meta device)")
    from .data import list_images

    list_images(o["heal"])  # an empty or missing folder fails now, not after the conversion


def run_heal(ui, conv, o: dict[str, Any]):
    """Heal ``conv`` with the images of ``--heal``; returns the healed conversion."""
    from .pipeline import heal

    opts = {
        "images": o.get("heal_images") or _DEFAULTS["heal_images"],
        "batch_size": o.get("heal_batch_size") or _DEFAULTS["heal_batch_size"],
        "device": o.get("heal_device"),
    }
    steps = o.get("heal_steps")
    steps = _DEFAULTS["heal_steps"] if steps is None else steps
    opts.update(recon_steps=steps, distill_steps=steps)
    ui.note(f"healing with the images in {o['heal']} ...")  # heal draws its own progress bars on a terminal
    healed = heal(conv, o["heal"], work_dir=o.get("heal_work_dir"), seed=o.get("seed") or 0, **opts)
    ui.note(f"healed in {healed.report.heal.seconds:.1f} s")
    return healed
