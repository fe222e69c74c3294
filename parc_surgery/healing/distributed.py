"""The process group a heal runs in: a world of one by default, torchrun's world when launched by it.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`join_world` initialises the default
process group if the caller has not (gloo on CPU, nccl on GPU) and destroys it afterwards; a group the
caller set up is used as it is and left alone. Each rank works on its own shard of the images;
:func:`wrap_ddp` puts the trainable module under ``DistributedDataParallel`` so gradients are averaged,
and the small reductions here (sums, "did any rank see a NaN") keep the ranks in lockstep.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

_CPU = torch.device("cpu")

__all__ = ["World", "all_any", "all_sum", "barrier", "join_world", "resolve_device", "wrap_ddp"]


@dataclass(frozen=True)
class World:
    """This process's place in the heal: ``rank`` of ``size`` (1 without torchrun), its device, the backend."""

    rank: int = 0
    size: int = 1
    backend: str | None = None
    device: torch.device = _CPU

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: list) -> list:
        """This rank's share of ``items``: every ``size``-th one from position ``rank``."""
        return items[self.rank :: self.size]


def resolve_device(option: str | None, fallback: torch.device) -> torch.device:
    """``option`` as a device; None: the local GPU under a multi-GPU torchrun, else ``fallback``."""
    if option is not None:
        try:
            dev = torch.device(option)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"heal: device {option!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"heal: device {option!r} asked for but CUDA is not available here; use device='cpu'")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return dev
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > 1 and torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return fallback


@contextlib.contextmanager
def join_world(device: torch.device) -> Iterator[World]:
    """The world to heal in; initialises (and afterwards destroys) torchrun's process group if nobody did."""
    owned = False
    if not dist.is_available() or (not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) <= 1):
        yield World(device=device)
        return
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        owned = True
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        yield World(dist.get_rank(), dist.get_world_size(), dist.get_backend(), device)
    finally:
        if owned:
            dist.destroy_process_group()


def _comm_device(world: World) -> torch.device:
    return world.device if world.backend == "nccl" else torch.device("cpu")


def all_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over every rank (float64); the values themselves in a world of one."""
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(world))
    dist.all_reduce(t)
    return t.tolist()


def all_any(world: World, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer, so all stop together)."""
    return bool(all_sum(world, [1.0 if flag else 0.0])[0] > 0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap_ddp(world: World, module: nn.Module) -> nn.Module:
    """``module`` under DistributedDataParallel in a distributed world (rank 0's weights broadcast); else itself.

    ``find_unused_parameters`` is on: a target module may hold parameters its forward does not use.
    """
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
