"""Put a model's own state back after running or tracing it: plain attributes, caches, trace-time writes.

Probing, validating at another size, tracing and shape-only runs on fake tensors all run the user's forward,
and some forwards write into their module (a window size shrunk to the feature map, an eval-mode cache of a
computed tensor): these context managers undo that, so the model does afterwards what it did before.
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn

__all__ = ["module_state_kept", "trace_side_effects_undone"]


@contextlib.contextmanager
def module_state_kept(model: nn.Module):
    """Restore every module's plain attributes (ints, floats, bools, strings, tuples of them) afterwards.

    Some forwards change their own configuration with the input size (``transformers``' Swin shrinks its
    window when the feature map is smaller, and keeps it): a forward at another size must not change what the
    model does at the size it was converted for.
    """
    saved = [(m, {k: v for k, v in vars(m).items() if not k.startswith("_") and _is_plain(v)}) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k, v in attrs.items():
                if m.__dict__.get(k, v) is not v:
                    m.__dict__[k] = v


def _is_plain(v) -> bool:
    return (
        v is None
        or isinstance(v, (bool, int, float, str))
        or (isinstance(v, tuple) and all(isinstance(i, (bool, int, float, str)) for i in v))
    )


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@contextlib.contextmanager
def trace_side_effects_undone(model: nn.Module):
    """Undo what a symbolic trace writes into the modules' own attributes and containers.

    Some forwards cache a computed tensor on the module in eval (timm's ``Attention2d.attention_bias_cache``):
    traced, the cache keeps an fx ``Proxy`` of that trace's graph, which a later trace of the same module would
    read as a node of another graph (and a later forward would fail on). Attributes set, replaced or added and
    dict / list / set contents changed during the trace are put back as they were, including the tensor
    constants the tracer itself sets on the root (``_tensor_constant0``): build the ``GraphModule`` inside the
    context, which copies them.
    """
    saved = []
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (dict, list, set)}
        saved.append((m, attrs, contents))
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            for k in [k for k in vars(m) if k not in _MODULE_INTERNALS and k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                if vars(m).get(k) is not v:
                    object.__setattr__(m, k, v)
                if k in contents:
                    v.clear()
                    (v.extend if isinstance(v, list) else v.update)(contents[k])
