"""The 2-D grid an attention's tokens lie on, for sizing its ParC mixer (kernels, PEs, prefix tokens).

Tokens carry no grid; it is found, in order, from the model's patch embedding (timm's ``grid_size``), from the
(H, W) map the tokens were flattened from in the recorded dataflow (:func:`find_token_grid`: the patch
embedding's output of a ViT, the window view of windowed attention, through a class token's ``cat``), or from a
square token count. Tokens that form no 2-D grid are refused (:func:`resolve_grid`).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from .attention_ops import is_sdpa_op
from .dataflow import Dataflow
from .errors import UnsupportedTargetError

if TYPE_CHECKING:
    from .attention_form import AttentionForm

__all__ = ["find_token_grid", "resolve_grid"]


def find_token_grid(flow: Dataflow, ref: int, n: int, channels: int, *, limit: int = 256):
    """((H, W), prefix) of the 2-D map ``n`` tokens of width ``channels`` were flattened from, else ``None``.

    Searches back from ``ref`` along the token path (layout ops, a class token's ``cat``, residual adds, position
    embeddings, norms; never through a projection or an attention) for the nearest (B, C, H, W) or
    (B, H, W, C) tensor with ``H * W = n - p`` for at most 16 prefix tokens ``p``: the patch embedding's
    output for a ViT, the window view for windowed attention.
    """
    seen, queue = {ref}, collections.deque([ref])
    while queue and len(seen) < limit:
        r = queue.popleft()
        s = flow.tensors[r].shape
        if len(s) == 4:
            for hw in ((s[2], s[3]) if s[1] == channels else (), (s[1], s[2]) if s[3] == channels else ()):
                if hw and 0 <= n - hw[0] * hw[1] <= 16 and hw[0] * hw[1] > 0:
                    return (int(hw[0]), int(hw[1])), n - hw[0] * hw[1]
        op = flow.producer(r)
        if op is None or op.name in _PATH_STOPS or is_sdpa_op(op.name):
            continue
        for i in op.inputs:
            if flow.tensors[i].tainted and i not in seen:
                seen.add(i)
                queue.append(i)
    return None


_PATH_STOPS = frozenset({"mm", "bmm", "addmm", "baddbmm", "convolution", "_convolution"})


def resolve_grid(form: AttentionForm, planned: tuple[tuple[int, int], int, bool]):
    """(grid, prefix tokens, on the patch-embedding grid) of ``form``'s tokens at the planning size.

    ``planned`` is the plan's own guess from the token count (the patch embedding's ``grid_size``, else a
    square count after up to 8 prefix tokens); the map the tokens were flattened from (:func:`find_token_grid`)
    is preferred to a square guess. Raises :class:`UnsupportedTargetError` when the tokens form no 2-D grid.
    """
    if form.layout == "nchw":
        return (int(form.token_shape[2]), int(form.token_shape[3])), 0, False
    if form.layout == "nhwc":
        return (int(form.token_shape[1]), int(form.token_shape[2])), 0, False
    (grid, prefix, patch) = planned
    if patch:
        return grid, prefix, True
    if form.grid is not None:
        return form.grid, form.num_prefix_tokens, False
    if prefix == 0 and grid[0] * grid[1] == form.num_tokens and (min(grid) > 1 or grid == (1, 1)):
        return grid, prefix, False  # a square token count (prefix tokens must be seen in the dataflow)
    raise UnsupportedTargetError(
        f"{form.name} ({form.type_name}): it attends over {form.num_tokens} tokens that form no 2-D grid (no "
        "patch-embedding grid, no (H, W) map they were flattened from, not a square count); ParC mixes along the "
        "rows and columns of a 2-D grid"
    )
