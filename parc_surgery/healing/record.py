"""Recording the teacher: each target's full call (args, kwargs) and output, and the model's logits.

Forward hooks with kwargs on the teacher's target modules snapshot every call (tensors detached and
copied, so later in-place ops cannot change them); anything that is not a tensor (``None`` masks,
flags, grid sizes) is kept as it is, so a student block can be replayed with exactly the call its
teacher block got. The teacher runs in eval mode, without gradients, on its own device; its training
flags are restored afterwards and nothing else about it changes (hooks are removed in every case).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..outputs import tensor_leaves as output_leaves

__all__ = [
    "Call",
    "Recorder",
    "get_logits",
    "map_tensors",
    "nbytes",
    "tensor_leaves",
]


@dataclass
class Call:
    """One call of a module: its positional and keyword arguments and what it returned."""

    args: tuple
    kwargs: dict
    output: Any

    def to(self, device: torch.device) -> Call:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Call(map_tensors(self.args, move), map_tensors(self.kwargs, move), map_tensors(self.output, move))


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside tuples, lists and dicts (other values as they are)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        out = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(out) if type(obj) is not dict else out
        except Exception:  # a dict subclass that cannot be built from a dict
            return out
    return obj


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (tuples, lists, dicts; a transformers ``ModelOutput`` is a dict), in order."""
    return [t for _, t in output_leaves(obj)]


def nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensor_leaves(obj))


def get_logits(output: Any) -> torch.Tensor | None:
    """The class scores in a model's output: a tensor, ``.logits`` / ``["logits"]``, or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    leaves = tensor_leaves(output)
    return leaves[0] if leaves else None


class Recorder:
    """Context manager: while active, every call of the named submodules of ``model`` is recorded.

    ``take()`` returns ``{name: [Call, ...]}`` (one entry per call, in call order) and starts afresh.
    Tensors are detached copies on ``device``.
    """

    def __init__(self, model: nn.Module, names: list[str], *, device: torch.device):
        self.model, self.names, self.device = model, list(names), device
        self.calls: dict[str, list[Call]] = {n: [] for n in self.names}
        self._pending: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in self.names}
        self._handles: list = []

    def _copy(self, obj: Any) -> Any:
        return map_tensors(obj, lambda t: t.detach().to(self.device, copy=True))

    def __enter__(self) -> Recorder:
        try:
            for name in self.names:
                mod = self.model.get_submodule(name)
                self._handles.append(mod.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._post(name), with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            self._pending[name].append((self._copy(args), self._copy(kwargs)))

        return hook

    def _post(self, name: str):
        def hook(module, args, kwargs, output):
            a, k = self._pending[name].pop()
            self.calls[name].append(Call(a, k, self._copy(output)))

        return hook

    def take(self) -> dict[str, list[Call]]:
        calls = self.calls
        self.calls = {n: [] for n in self.names}
        self._pending = {n: [] for n in self.names}
        return calls
