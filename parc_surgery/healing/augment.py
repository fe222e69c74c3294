"""Consistent augmentation for stage 2: the student and the teacher see the same transformed images.

Distillation only needs the teacher's outputs, not labels, so any input the teacher can be run on is a
valid training point ("function matching": Beyer et al., CVPR 2022, *Knowledge distillation: A good
teacher is patient and consistent*). With few unlabelled images the student otherwise matches the
teacher on those images only; transformed copies cover more of the input space. Each augmented batch
is fed to the teacher as well (so the teacher runs every step of stage 2).

Specs (``HealConfig.augment``, applied in this order, each to every image of the batch):

* ``shift:N``: translate each image by its own random offset in ``[-N, N]`` pixels along each axis,
  the uncovered border filled by replicating the edge pixels;
* ``mixup:A``: blend the batch with a shuffled copy of itself, ``lam ~ Beta(A, A)`` per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["AUGMENTS", "apply_augment", "parse_augment"]

AUGMENTS = ("shift", "mixup")


def parse_augment(spec) -> tuple[str, ...]:
    """``spec`` (None, ``"shift:4,mixup:0.2"`` or a sequence of ``"kind:value"``) as a validated tuple."""
    if spec is None:
        return ()
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"heal: augment items must be 'kind:value' strings ({', '.join(AUGMENTS)}), got {item!r}")
        kind, _, value = item.partition(":")
        if kind not in AUGMENTS:
            raise ConfigError(f"heal: unknown augment {kind!r} in {item!r}; known: shift:N (pixels), mixup:A (alpha)")
        try:
            v = int(value) if kind == "shift" else float(value)
        except ValueError:
            v = None
        if v is None or v <= 0 or v != v:
            what = "an int >= 1 (pixels)" if kind == "shift" else "a number > 0 (the Beta alpha)"
            raise ConfigError(f"heal: augment {item!r}: the value after {kind}: must be {what}, e.g. {kind}:" +
                              ("4" if kind == "shift" else "0.2"))  # fmt: skip
        out.append(f"{kind}:{v}")
    return tuple(out)


def apply_augment(x: torch.Tensor, specs: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """``x`` (B, C, H, W) transformed by ``specs`` (see the module docstring), drawing from ``generator``."""
    for spec in specs:
        kind, value = spec.split(":")
        x = _shift(x, int(value), generator) if kind == "shift" else _mixup(x, float(value), generator)
    return x


def _shift(x: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    n = min(n, h - 1, w - 1)
    if n < 1:
        return x
    padded = F.pad(x, (n, n, n, n), mode="replicate")
    oy = torch.randint(0, 2 * n + 1, (b,), generator=g).tolist()
    ox = torch.randint(0, 2 * n + 1, (b,), generator=g).tolist()
    return torch.stack([padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] for i in range(b)])


def _mixup(x: torch.Tensor, alpha: float, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    if b < 2:
        return x
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):  # Beta's sampler takes no generator: seed a forked global one
        torch.manual_seed(seed)
        lam = torch.distributions.Beta(alpha, alpha).sample((b,))
    perm = torch.randperm(b, generator=g)
    lam = lam.to(x.device, x.dtype).view(b, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[perm.to(x.device)]
