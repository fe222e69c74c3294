"""``heal(conversion, data)``: recover the original model's function after surgery, without labels.

1. **Record** the teacher (by default the model the conversion was made from): on each image batch,
   every target's full call and output, and the logits (:mod:`.record`, :mod:`.chunks`).
2. **Stage 1, block reconstruction**: fit each new block, alone, to map its teacher block's inputs to
   that block's outputs (BRECQ-style; only the new blocks train).
3. **Stage 2, distillation**: train the whole converted model (its ``trainable`` set) to match the
   teacher's class distribution (KL at a temperature).
4. **Measure** on held-out images after conversion and after each stage: top-1 agreement with the
   teacher, KL, accuracy when labels were given, and each block's reconstruction error.

The teacher is only ever run (eval mode, no grad, on its own device), never modified or copied; the
conversion passed in is not modified either: the student is a copy of its model. Under ``torchrun``
every rank heals its shard of the images with DistributedDataParallel. With ``work_dir`` each
finished stage is saved and a rerun continues after the last one.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn

from ..api import Conversion
from ..errors import ConfigError, DataError, ParcSurgeryError, TeacherMismatchError
from ..inputs import get_in_chans
from ..train_flags import eval_mode
from .augment import apply_augment
from .chunks import Budget, ChunkSource, TeacherPass
from .config import HealConfig, create_heal_config
from .data import create_heal_data
from .distributed import World, join_world, resolve_device, wrap_ddp
from .losses import BlockBank, EvalPoint, as_bank_input, distill_loss, measure, recon_loss, teacher_accuracy
from .progress import show_progress
from .record import get_logits
from .report import HealedReport, HealReport
from .resume import HealCheckpoint, create_fingerprint
from .train import StageResult, collect_params, run_stage, stage_timer, summarize, trainable_only

__all__ = ["check_teacher", "heal"]

_STAGE_NAMES = {1: "block reconstruction", 2: "distillation"}


def heal(
    conversion: Conversion,
    data,
    *,
    teacher: nn.Module | None = None,
    eval_data=None,
    work_dir=None,
    transform=None,
    config: HealConfig | None = None,
    **options,
) -> Conversion:
    """Heal ``conversion``'s model towards ``teacher`` on unlabelled ``data``; a new :class:`Conversion`.

    Args:
        conversion: what :func:`parc_surgery.convert` returned; not modified.
        data: a folder of images (any nesting; jpg / png / webp), an ``(N, C, H, W)`` tensor, a Dataset or an
            iterable / DataLoader of images or batches (optionally with labels: then accuracy is reported).
        teacher: the model to recover; default: the model the conversion was made from. Never modified.
        eval_data: held-out images (same forms); default: ``holdout`` of ``data``.
        work_dir: folder for stage checkpoints (safetensors) so an interrupted heal resumes.
        transform: PIL image -> tensor for a folder; default: timm's eval transform at the planned size.
        config: a :class:`HealConfig`; ``options`` override its fields (``recon_steps=100``, ...).

    Returns:
        ``conversion`` with the healed model and a report with a heal section (``report.heal``).

    Raises:
        DataError, TeacherMismatchError, ConfigError, CheckpointError.
    """
    cfg = create_heal_config(config, **options)
    if not isinstance(conversion, Conversion):
        what = type(conversion).__name__
        raise ConfigError(f"heal: conversion must be what parc_surgery.convert returned, got {what}")
    names = [t.name for t in conversion.plan.targets]
    teacher_given = teacher is not None
    teacher = conversion.original if teacher is None else teacher
    if teacher is None:
        raise ConfigError(
            "heal: this conversion does not hold the model it was made from (it was not made by convert() in this "
            "process); pass the original model as teacher="
        )
    notes = check_teacher(teacher, conversion)
    p = next(iter(conversion.model.parameters()), None)
    device = resolve_device(cfg.device, p.device if p is not None else torch.device("cpu"))
    with join_world(device) as world:
        return _heal(conversion, data, teacher, names, cfg, world, eval_data, work_dir, transform, notes, teacher_given)


def check_teacher(teacher: nn.Module, conversion: Conversion) -> list[str]:
    """Raise :class:`TeacherMismatchError` unless ``teacher`` has every target, of the type that was replaced.

    Returns notes for the report (e.g. teacher weights outside the targets that differ from the student's).
    """
    if not isinstance(teacher, nn.Module):
        raise TeacherMismatchError(f"heal: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is conversion.model:
        raise TeacherMismatchError("heal: the teacher is the converted model itself; pass the original model")
    for t in conversion.plan.targets:
        try:
            mod = teacher.get_submodule(t.name)
        except AttributeError:
            raise TeacherMismatchError(
                f"heal: the teacher has no module {t.name!r}, a target of this conversion: it is not the model the "
                "conversion was made from; pass that model as teacher= (or leave teacher=None)"
            ) from None
        qual = type(mod).__qualname__
        if not (t.source_type == qual or t.source_type.endswith("." + qual)):
            raise TeacherMismatchError(
                f"heal: the teacher's {t.name!r} is a {type(mod).__name__}, but the conversion replaced a "
                f"{t.source_type}: the teacher does not match the conversion; pass the model it was made from"
            )
    inside = tuple(f"{t.name}." for t in conversion.plan.targets)
    student = dict(conversion.model.named_parameters())
    differ = 0
    for k, v in teacher.named_parameters():
        if k.startswith(inside) or k not in student:
            continue
        s = student[k]
        if s.shape != v.shape or not torch.equal(s.detach().cpu(), v.detach().cpu()):
            differ += 1
    if differ:
        return [f"the teacher's weights differ from the converted model's outside the targets in {differ} tensor(s)"]
    return []


def _heal(conversion, data, teacher, names, cfg, world: World, eval_data, work_dir, transform, notes, given):
    t_start = time.perf_counter()
    plan = conversion.plan
    student = copy.deepcopy(conversion.model).to(world.device)  # the conversion passed in stays as it was
    data = create_heal_data(
        data, eval_data=eval_data, images=cfg.images, holdout=cfg.holdout, seed=cfg.seed, model=teacher,
        input_size=plan.input_size, in_chans=get_in_chans(conversion.model), transform=transform,
    )  # fmt: skip
    show = show_progress(cfg.progress, main=world.main)
    fingerprint = create_fingerprint(conversion.model, names, plan=plan, config=cfg, data=data)
    ckpt = HealCheckpoint(work_dir, fingerprint, world)
    last = max((s for s in (1, 2) if ckpt.done(s)), default=None)
    tpass = TeacherPass(teacher, names, input_size=plan.input_size)
    budget = Budget(cfg.cache_mb * 2**20)
    per_rank = max(1, cfg.batch_size // world.size)
    common = {"budget": budget, "seed": cfg.seed, "device": world.device, "progress": show}
    held = None
    if data.heldout is not None and data.heldout_indices:
        shard = world.shard(data.heldout_indices)
        held = ChunkSource(data.heldout, shard, tpass, batch_size=per_rank, record=True, what="held-out", **common)
    stage1_left = 1 in cfg.stages and last is None
    need_calls = stage1_left or (cfg.features > 0 and 2 in cfg.stages and last != 2)
    shard = world.shard(data.train_indices)
    train = ChunkSource(data.train, shard, tpass, batch_size=per_rank, record=need_calls, what="training", **common)
    if not train.cached or (held is not None and not held.cached):
        notes.append(f"teacher recordings above cache_mb={cfg.cache_mb} were streamed (the teacher ran every step)")

    points: list[EvalPoint] = []
    stages: list[StageResult] = []
    stopped = None
    with eval_mode(student):
        if held is not None:
            conv_point = ckpt.get("converted")
            if conv_point is None:
                conv_point = _first_measure(student, held, names, world, data.labelled).to_dict()
                ckpt.put("converted", conv_point)
                ckpt.put("teacher_accuracy", teacher_accuracy(held, world) if data.labelled else None)
            points.append(EvalPoint.from_dict(conv_point))
        if last is not None:
            ckpt.restore(student, last)
            for s in range(1, last + 1):
                rec = ckpt.done(s)
                if rec is not None:
                    stages.append(dataclasses.replace(StageResult.from_dict(rec["result"]), resumed=True))
                    if rec.get("point"):
                        points.append(EvalPoint.from_dict(rec["point"]))
        for stage in cfg.stages:
            if last is not None and stage <= last:
                continue
            timer = stage_timer()
            if stage == 1:
                done, losses, stopped, seen, n_params = _stage1(student, train, names, cfg, world, show)
                if not cfg.features:
                    train.drop_calls()
            else:
                done, losses, stopped, seen, n_params = _stage2(student, train, names, cfg, world, show)
            first, final = summarize(losses)
            steps = cfg.recon_steps if stage == 1 else cfg.distill_steps
            result = StageResult(
                stage, _STAGE_NAMES[stage], steps, done, timer(), seen, n_params, first, final, stopped
            )
            point = None
            if held is not None:
                point = measure(f"stage {stage}", student, held, names, world, blocks=True, labelled=data.labelled)
                points.append(point)
            stages.append(result)
            if stopped:
                notes.append(f"stage {stage} {stopped}; the heal stopped there")
                break
            ckpt.finish(student, stage, {"result": result.to_dict(), "point": point and point.to_dict()})
    if held is None:
        notes.append("no held-out images (holdout=0 and no eval_data): agreement and block errors not measured")
    report = HealReport(
        teacher=("given" if given else "the original model") + f" ({type(teacher).__name__})",
        device=str(world.device),
        world_size=world.size,
        images_train=len(data.train_indices),
        images_heldout=len(data.heldout_indices),
        data=data.source,
        labelled=data.labelled,
        config=cfg.to_dict(),
        points=tuple(points),
        stages=tuple(stages),
        seconds=round(time.perf_counter() - t_start, 2),
        teacher_accuracy=ckpt.get("teacher_accuracy"),
        stopped=stopped,
        notes=tuple(notes),
    )
    return dataclasses.replace(conversion, model=student, report=HealedReport.create(conversion.report, report))


def _first_measure(student, held, names, world, labelled) -> EvalPoint:
    try:
        return measure("converted", student, held, names, world, blocks=True, labelled=labelled)
    except ParcSurgeryError:
        raise
    except Exception as e:
        raise DataError(
            f"the converted model fails on the held-out images: {type(e).__name__}: {e}; the images must fit the "
            "model (the size the conversion was planned at)"
        ) from e


def _stage1(student, train: ChunkSource, names, cfg: HealConfig, world, show):
    groups, seen = [], set()
    for n in names:  # one clipping group per block: blocks are independent
        g = [p for p in student.get_submodule(n).parameters() if id(p) not in seen]
        seen.update(id(p) for p in g)
        groups.append(g)
    with trainable_only(student, [p for g in groups for p in g]):
        bank = wrap_ddp(world, BlockBank(student, names, cosine=cfg.cosine))  # DDP takes what requires grad now

        def loss_fn(chunk):
            return bank(as_bank_input(chunk.calls, names))[0]

        done, losses, stopped, images = run_stage(
            world=world, groups=groups, chunks=train.cycle(cfg.recon_steps), steps=cfg.recon_steps, lr=cfg.recon_lr,
            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, loss_fn=loss_fn, progress=show,
            desc="heal stage 1: block reconstruction",
        )  # fmt: skip
    return done, losses, stopped, images, sum(p.numel() for g in groups for p in g)


def _stage2(student, train: ChunkSource, names, cfg: HealConfig, world, show):
    params = collect_params(student, names, cfg.trainable)
    outputs: dict[str, list] = {n: [] for n in names}
    handles = []
    if cfg.features:  # hidden-state alignment: the student's target outputs in its own forward
        for n in names:
            handles.append(student.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outputs[n].append(o)))
    try:
        with trainable_only(student, params):
            model = wrap_ddp(world, student)

            gen = torch.Generator().manual_seed(cfg.seed * 7919 + world.rank)  # each rank its own augmentations

            def loss_fn(chunk):
                for v in outputs.values():
                    v.clear()
                x, target = chunk.x, chunk.logits
                if cfg.augment:  # the teacher sees the same transformed images (function matching)
                    x = apply_augment(x.cpu(), cfg.augment, gen).to(chunk.x.device)
                    target = train.teacher(x, record=False, device=chunk.x.device)[0]
                loss = distill_loss(get_logits(model(x)), target, cfg.temperature)
                if cfg.features:
                    align = [recon_loss(o, c.output, n) for n in names for o, c in zip(outputs[n], chunk.calls[n])]
                    loss = loss + cfg.features * torch.stack(align).mean()
                return loss

            done, losses, stopped, images = run_stage(
                world=world, groups=[params], chunks=train.cycle(cfg.distill_steps), steps=cfg.distill_steps,
                lr=cfg.distill_lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, loss_fn=loss_fn,
                progress=show, desc=f"heal stage 2: distillation ({cfg.trainable})", ema=cfg.distill_ema,
            )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return done, losses, stopped, images, sum(p.numel() for p in params)
