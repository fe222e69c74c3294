"""The dataflow of one recorded forward pass: every aten op, which tensors it read and wrote, who ran it.

The probe (:mod:`parc_surgery.probe`) runs the model once under :class:`DataflowRecorder`, a
``TorchDispatchMode`` that sees every aten op after autograd's decompositions (``linear`` arrives as
``t`` + ``addmm``, ``matmul`` as views + ``bmm``). Each tensor gets a small integer reference; per op the
recorder keeps the op, its arguments with tensors replaced by :class:`TRef` (so pure layout ops can be
replayed later on other tensors, see :mod:`parc_surgery.attention_form`), the references it read and
wrote, and the innermost module running it. Per tensor it keeps the shape, the op that produced it,
the parameter / buffer it is (if any) and whether it depends on the model input ("tainted": a mask
computed from the architecture alone is not; one computed from the input is).

Module calls are recorded by the probe's hooks as :class:`ModuleCall`: the arguments and the output
with tensors as :class:`TRef` and plain values kept, so the call signature and the output structure
(tensor, tuple with ``None`` s, dict, ``ModelOutput``) of each module are known without running it again.

Nothing here holds a tensor alive: tensors are keyed weakly while the forward runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["METADATA_OPS", "Dataflow", "DataflowRecorder", "ModuleCall", "OpRecord", "Opaque", "TRef", "TensorInfo"]


@dataclass(frozen=True)
class TRef:
    """A tensor, by reference, inside recorded arguments / outputs (a pytree leaf)."""

    ref: int


@dataclass(frozen=True)
class Opaque:
    """A value of another kind inside recorded arguments / outputs, kept by its type name only (a pytree leaf)."""

    type_name: str


@dataclass
class TensorInfo:
    ref: int
    shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    producer: int | None = None  # index of the op that wrote it; None: input, parameter, buffer, constant
    param: str | None = None  # qualified name of the parameter / buffer it is
    tainted: bool = False  # depends on the model input
    buffer: bool = False  # ``param`` names a buffer, not an ``nn.Parameter``


@dataclass(frozen=True)
class OpRecord:
    index: int
    func: Any  # torch._ops.OpOverload
    owner: str  # the innermost (non-transparent) module running it; "" for the model's own forward
    args: tuple
    kwargs: dict
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.func.overloadpacket.__name__


@dataclass(frozen=True)
class ModuleCall:
    """One call of a module: arguments and output with tensors as :class:`TRef` (structure kept)."""

    args: tuple
    kwargs: dict
    output: Any
    ops: tuple[int, int] = (0, 0)  # [start, stop) indices of the ops run during this call

    def tensor_refs(self) -> list[int]:
        return [x.ref for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, TRef)]

    def output_refs(self) -> list[int]:
        return [x.ref for x in pytree.tree_leaves(self.output) if isinstance(x, TRef)]


@dataclass
class Dataflow:
    ops: list[OpRecord] = field(default_factory=list)
    tensors: dict[int, TensorInfo] = field(default_factory=dict)

    def ops_within(self, name: str) -> list[OpRecord]:
        """The ops run by module ``name`` or any module inside it (by qualified name)."""
        prefix = name + "."
        return [op for op in self.ops if op.owner == name or op.owner.startswith(prefix)]

    def producer(self, ref: int) -> OpRecord | None:
        info = self.tensors.get(ref)
        return None if info is None or info.producer is None else self.ops[info.producer]

    def users(self, ops: list[OpRecord]) -> dict[int, list[OpRecord]]:
        """ref -> the ops (of ``ops``) reading it."""
        out: dict[int, list[OpRecord]] = {}
        for op in ops:
            for r in set(op.inputs):
                out.setdefault(r, []).append(op)
        return out


METADATA_OPS = frozenset(
    {
        "new_zeros",
        "new_ones",
        "new_empty",
        "new_full",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "lift_fresh",
    }
)


def _plain(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format))


class DataflowRecorder(TorchDispatchMode):
    """Records every aten op with its owner (from the hook-maintained module ``stack``) into a :class:`Dataflow`.

    Modules named in ``transparent`` (parameter-free leaves such as ``nn.Softmax`` / ``nn.Dropout``) do not
    own ops: their ops go to the module that called them, so an attention whose softmax is an
    ``nn.Softmax`` child (Swin's ``WindowAttention``) still shows softmax(Q K^T) V in its own ops.
    """

    def __init__(self, model: nn.Module, stack: list[str], transparent: frozenset[str] = frozenset()):
        super().__init__()
        self.stack = stack
        self.transparent = transparent
        self.flow = Dataflow()
        self._refs = WeakIdKeyDictionary()
        for buffer, table in ((False, model.named_parameters), (True, model.named_buffers)):
            for name, t in table(remove_duplicate=True):
                if t is not None:
                    self.flow.tensors[self.ref(t, param=name)].buffer = buffer

    def ref(self, t: torch.Tensor, *, param: str | None = None, producer: int | None = None, tainted=False) -> int:
        """The reference of ``t`` (a new one for a tensor not seen before)."""
        r = self._refs.get(t)
        if r is None or producer is not None:
            r = len(self.flow.tensors)
            self._refs[t] = r
            dense = t.layout == torch.strided
            self.flow.tensors[r] = TensorInfo(
                r, tuple(t.shape) if dense else (), tuple(t.stride()) if dense else (), producer, param, tainted
            )
        return r

    def to_refs(self, obj, *, taint: bool = False):
        """``obj`` with every tensor replaced by its :class:`TRef`, every other non-plain value by :class:`Opaque`."""

        def one(x):
            if isinstance(x, torch.Tensor):
                r = self.ref(x)
                if taint:
                    self.flow.tensors[r].tainted = True
                return TRef(r)
            return x if _plain(x) else Opaque(type(x).__name__)

        return pytree.tree_map(one, obj)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        owner = next((n for n in reversed(self.stack) if n not in self.transparent), "")
        rargs, rkwargs = self.to_refs((args, kwargs))
        inputs = tuple(x.ref for x in pytree.tree_leaves((rargs, rkwargs)) if isinstance(x, TRef))
        # ops that read only the metadata of their input (``x.new_zeros(...)``) do not pass the taint on
        tainted = func.overloadpacket.__name__ not in METADATA_OPS and any(self.flow.tensors[r].tainted for r in inputs)
        index = len(self.flow.ops)
        outputs = []
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if func._schema.is_mutable and self._refs.get(t) is not None:  # in place: the same tensor, new value
                    r = self._refs[t]
                    self.flow.tensors[r].tainted |= tainted
                else:
                    r = self.ref(t, producer=index, tainted=tainted)
                outputs.append(r)
        self.flow.ops.append(OpRecord(index, func, owner, rargs, rkwargs, inputs, tuple(outputs)))
        return out
