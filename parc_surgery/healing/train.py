"""The optimisation loop both stages share: AdamW, warm-up + cosine, clipping, and a NaN guard.

Every step the loss value and two flags (loss not finite, a gradient not finite) are summed over the
ranks, so all ranks take the same decision. A step only happens on finite losses and gradients; the
weights before it are kept as the last good ones, and when a loss turns NaN or infinite the stage
stops and those weights come back (the report says at which step).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .chunks import Chunk
from .distributed import World, all_sum
from .progress import create_progress

__all__ = ["StageResult", "collect_params", "run_stage", "stage_timer", "summarize", "trainable_only"]

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm, nn.RMSNorm)  # fmt: skip


@dataclass(frozen=True)
class StageResult:
    """What one stage did: steps run of those planned, time, images seen, losses, and why it stopped early."""

    stage: int
    name: str
    steps: int
    steps_done: int
    seconds: float
    images: int
    trainable_params: int
    loss_first: float | None
    loss_last: float | None
    stopped: str | None = None
    resumed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StageResult:
        return cls(**d)


def collect_params(model: nn.Module, names: list[str], which: str) -> list[nn.Parameter]:
    """The parameters of ``which`` set: ``replaced`` (modules at ``names``), ``replaced+norms``, ``all``."""
    if which == "all":
        return list(model.parameters())
    seen: dict[int, nn.Parameter] = {}
    for n in names:
        for p in model.get_submodule(n).parameters():
            seen.setdefault(id(p), p)
    if which == "replaced+norms":
        for m in model.modules():
            if isinstance(m, _NORM_TYPES) or type(m).__name__.lower().endswith(("norm", "norm2d", "norm1d")):
                for p in m.parameters(recurse=False):
                    seen.setdefault(id(p), p)
    return list(seen.values())


@contextlib.contextmanager
def trainable_only(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad for the duration; every parameter's own flag is put back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _schedule(steps: int, warmup: float = 0.05) -> Callable[[int], float]:
    w = max(1, round(steps * warmup))

    def f(i: int) -> float:
        if i < w:
            return (i + 1) / w
        return 0.5 * (1 + math.cos(math.pi * (i - w) / max(1, steps - w)))

    return f


def run_stage(
    *,
    world: World,
    groups: list[list[nn.Parameter]],
    chunks: Iterator[Chunk],
    steps: int,
    lr: float,
    weight_decay: float,
    grad_clip: float | None,
    loss_fn: Callable[[Chunk], torch.Tensor],
    progress: bool,
    desc: str,
    ema: float = 0.0,
) -> tuple[int, list[float], str | None, int]:
    """Run ``steps`` steps of ``loss_fn`` on ``chunks``; ``groups`` are clipped separately (independent blocks).

    ``ema`` > 0 keeps an exponential moving average of the parameters (decay ``ema``, updated after every
    step, bias-corrected for the first steps) and leaves it in the parameters at the end unless the stage stopped
    on a non-finite loss (then the last good weights stay).

    Returns (steps done, per-step mean loss over ranks, why it stopped early or None, images seen on all ranks).
    """
    params = [p for g in groups for p in g]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    good = [p.detach().clone() for p in params]
    shadow = [p.detach().clone() for p in params] if ema else None
    losses: list[float] = []
    stopped, images, done = None, 0, 0
    with create_progress(progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        for chunk in chunks:
            loss = loss_fn(chunk)
            opt.zero_grad(set_to_none=True)
            loss_bad = not bool(torch.isfinite(loss.detach()))
            loss.backward()  # on every rank, NaN or not: under DDP each backward joins the gradient all-reduce
            norms = [_clip(g, grad_clip) for g in groups]
            grad_bad = not loss_bad and not all(math.isfinite(n) for n in norms)
            value = float(loss.detach()) if not loss_bad else 0.0
            total, n_loss_bad, n_grad_bad = all_sum(world, [value, float(loss_bad), float(grad_bad)])
            if n_loss_bad or n_grad_bad:
                if n_loss_bad:  # the current weights gave a NaN / inf loss: back to the ones before the last step
                    with torch.no_grad():
                        for p, g in zip(params, good):
                            p.copy_(g)
                what = "loss" if n_loss_bad else "gradient"
                last = done - 1 if n_loss_bad else done  # the last weights that gave a finite loss
                kept = f"the weights after step {last}" if last > 0 else "the weights it started from"
                stopped = f"stopped at step {done + 1} of {steps}: the {what} was not finite (NaN or inf); {kept} kept"
                break
            with torch.no_grad():
                for p, g in zip(params, good):
                    g.copy_(p)
            opt.step()
            sched.step()
            done += 1
            if shadow is not None:
                with torch.no_grad():  # decay min(ema, (1 + n) / (10 + n)): early averages do not hold the start
                    torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - min(ema, (1 + done) / (10 + done)))
            images += len(chunk.x)
            losses.append(total / world.size)
            bar.update(task, advance=1, info=f"loss {losses[-1]:.4g}")
    if shadow is not None and done and not stopped:
        with torch.no_grad():
            for p, a in zip(params, shadow):
                p.copy_(a)
    images = int(all_sum(world, [images])[0])
    return done, losses, stopped, images


def _clip(group: list[nn.Parameter], max_norm: float | None) -> float:
    grads = [p for p in group if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def summarize(losses: list[float]) -> tuple[float | None, float | None]:
    """(first loss, mean of the last tenth of the losses): what the report shows of a stage's curve."""
    if not losses:
        return None, None
    k = max(1, len(losses) // 10)
    return losses[0], sum(losses[-k:]) / k


def stage_timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: round(time.perf_counter() - t0, 2)
