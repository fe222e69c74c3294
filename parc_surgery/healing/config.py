"""``HealConfig``: every knob of :func:`parc_surgery.heal`, validated once, frozen.

Defaults follow the block-reconstruction recipe (BRECQ, ICLR 2021: about 1,024 unlabelled images) and
were tuned on the figures of ``benchmarks/bench_heal.py``. Errors name the field, the value and what is
allowed, and suggest the closest field name for a typo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ..errors import ConfigError
from ..helpers import close_matches
from .augment import parse_augment

__all__ = ["TRAINABLE_SETS", "HealConfig", "create_heal_config"]

TRAINABLE_SETS = ("replaced", "replaced+norms", "all")


@dataclass(frozen=True)
class HealConfig:
    """What :func:`parc_surgery.heal` does.

    images: at most this many unlabelled images train (the held-out split comes on top of them).
    holdout: held-out images when no ``eval_data`` is given: a fraction of the data (0 < f < 1) or a count.
    stages: which stages run: 1 (block reconstruction), 2 (end-to-end distillation), in that order.
    recon_steps / distill_steps: optimiser steps of stage 1 / stage 2.
    batch_size: global batch size (split over the ranks under torchrun).
    recon_lr / distill_lr: AdamW peak learning rates (linear warm-up, cosine decay to 0). Stage 2's
        default 5e-4 (was 2e-4) lowered the benchmark's KL for MobileViT-XXS and raised a DeiT's
        agreement after 600 steps from 88 % to 94 %; ViTs whose attention is all replaced gain from
        more (``distill_lr=3e-3``, ``trainable="replaced+norms"``, ``temperature=4``, and a patient schedule on
        augmented images, ``distill_steps=3000, augment="shift:4"``: see benchmarks/README.md).
    cosine: weight of a (1 - cosine similarity) term added to stage 1's normalised MSE.
    temperature: distillation temperature of stage 2's KL (the loss is scaled by T^2).
    features: weight of a hidden-state alignment term added to stage 2's KL: each target's output in
        the student's own forward against the teacher's recorded output (normalised MSE, as stage 1;
        MOHAWK-style). 0 turns it off and frees the recordings after stage 1.
    trainable: stage 2's trainable set: ``replaced`` (the new blocks), ``replaced+norms``, ``all``.
    distill_ema: decay of an exponential moving average of stage 2's trainable weights, taken after every
        step; the healed model gets the averaged weights. 0 turns it off; else 0 < decay < 1 (e.g. 0.99).
    augment: stage 2 on transformed copies of the images, the teacher run on the same copies (function
        matching): ``"shift:N"`` (each image translated by up to N pixels, edges replicated) and / or
        ``"mixup:A"`` (blended with another image of the batch, Beta(A, A)), a comma-separated string or
        a sequence; empty: the images as given. The teacher then runs every step (see :mod:`.augment`).
    grad_clip: per-block (stage 1) / global (stage 2) gradient-norm clip; None: no clipping.
    device: where the student trains (``cpu``, ``cuda``, ``cuda:1``); None: the local GPU under a
        multi-GPU torchrun, else the device the converted model is on. The teacher stays where it is.
    cache_mb: teacher recordings (block inputs/outputs, logits, images) are kept in CPU memory up to this
        size per process; above it they are recomputed batch by batch (streamed), so memory stays bounded.
    seed: data split, data order and any randomness of the heal.
    progress: rich progress bars; None: only when stderr is a terminal (never in tests or logs).
    """

    images: int = 1024
    holdout: float | int = 0.1
    stages: tuple[int, ...] = (1, 2)
    recon_steps: int = 300
    distill_steps: int = 300
    batch_size: int = 32
    recon_lr: float = 2e-3
    distill_lr: float = 5e-4
    weight_decay: float = 0.0
    cosine: float = 0.0
    temperature: float = 1.0
    features: float = 0.0
    trainable: Literal["replaced", "replaced+norms", "all"] = "replaced"
    distill_ema: float = 0.0
    augment: tuple[str, ...] = ()
    grad_clip: float | None = 1.0
    device: str | None = None
    cache_mb: int = 2048
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        _positive_int(self, "images")
        _positive_int(self, "batch_size")
        _non_negative_int(self, "recon_steps")
        _non_negative_int(self, "distill_steps")
        _non_negative_int(self, "cache_mb")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"heal: seed must be an int, got {self.seed!r}")
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)) or h < 0 or (isinstance(h, float) and h >= 1):
            raise ConfigError(
                f"heal: holdout must be a fraction 0 <= f < 1 of the data or a count of images >= 0, got {h!r}"
            )
        stages = tuple(self.stages) if isinstance(self.stages, (list, tuple)) else self.stages
        if not isinstance(stages, tuple) or not stages or any(s not in (1, 2) for s in stages):
            raise ConfigError(f"heal: stages must be a non-empty subset of (1, 2), got {self.stages!r}")
        object.__setattr__(self, "stages", tuple(sorted(set(stages))))
        for name in ("recon_lr", "distill_lr", "temperature"):
            _positive_float(self, name)
        for name in ("weight_decay", "cosine", "features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"heal: {name} must be a number >= 0, got {v!r}")
        e = self.distill_ema
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e < 1:
            raise ConfigError(f"heal: distill_ema must be 0 (off) or a decay 0 < d < 1 such as 0.99, got {e!r}")
        object.__setattr__(self, "augment", parse_augment(self.augment))
        if self.augment and self.features:
            raise ConfigError(
                "heal: augment and features cannot be combined: the hidden-state alignment compares with the "
                "teacher's recordings of the images as given; set features=0 or augment=()"
            )
        if self.grad_clip is not None:
            _positive_float(self, "grad_clip")
        if self.trainable not in TRAINABLE_SETS:
            raise ConfigError(f"heal: trainable must be one of {', '.join(TRAINABLE_SETS)}, got {self.trainable!r}")
        if self.device is not None and not isinstance(self.device, str):
            object.__setattr__(self, "device", str(self.device))
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(f"heal: progress must be True, False or None, got {self.progress!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        d["augment"] = list(self.augment)
        return d


def create_heal_config(config: HealConfig | None = None, **options: Any) -> HealConfig:
    """``config`` with ``options`` replacing its fields (or the defaults with ``options``); typos are named."""
    names = [f.name for f in fields(HealConfig)]
    unknown = [k for k in options if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = close_matches(k, names, cutoff=0.6)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"heal: unknown option(s) {', '.join(hints)}; known: {', '.join(names)}")
    if config is not None and not isinstance(config, HealConfig):
        raise ConfigError(f"heal: config must be a HealConfig, got {type(config).__name__}")
    base = asdict(config) if config is not None else {}
    return HealConfig(**{**base, **options})


def _positive_int(cfg: HealConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"heal: {name} must be an int >= 1, got {v!r}")


def _non_negative_int(cfg: HealConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"heal: {name} must be an int >= 0, got {v!r}")


def _positive_float(cfg: HealConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v:
        raise ConfigError(f"heal: {name} must be a number > 0, got {v!r}")
