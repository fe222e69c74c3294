"""A model's output as data: its tensor leaves and its structure (tensor, tuple, dict, ``ModelOutput``).

Models return a tensor, a tuple / list (``(logits, aux)``, named tuples), a dict, or a Hugging Face
``transformers`` ``ModelOutput`` (an ordered dict whose keys are the fields that are not ``None``). The
checks compare every tensor leaf (:func:`tensor_leaves`) and the structure itself (:func:`output_structure`):
a converted model must return what the original returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["output_structure", "tensor_leaves"]


def tensor_leaves(obj: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside ``obj`` with its path (``output``, ``output[0]``, ``output['logits']``), in order."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        return [leaf for k, v in obj.items() for leaf in tensor_leaves(v, f"{prefix}[{k!r}]")]
    if isinstance(obj, (tuple, list)):
        return [leaf for i, v in enumerate(obj) for leaf in tensor_leaves(v, f"{prefix}[{i}]")]
    return []


def output_structure(obj: Any) -> str:
    """The structure of an output as text, tensors as ``Tensor(rank)``: equal texts mean the same structure.

    ``ImageClassifierOutput(logits=Tensor(2))``, ``tuple(Tensor(2), None)``, ``dict(out=Tensor(4))``. Shapes are
    compared apart (the output size may legitimately differ between input sizes); ranks are part of it.
    """
    if isinstance(obj, torch.Tensor):
        return f"Tensor({obj.dim()})"
    name = type(obj).__name__
    if isinstance(obj, Mapping):
        return f"{name}(" + ", ".join(f"{k}={output_structure(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (tuple, list)):
        return f"{name}(" + ", ".join(output_structure(v) for v in obj) + ")"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj) if obj is None else name
    return name
