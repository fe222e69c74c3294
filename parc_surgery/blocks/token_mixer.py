"""The ParC token mixer: global circular convolutions over the token grid in place of an attention.

One implementation serves every attention the engine rewrites: timm's ViT ``Attention`` (registered as
``parc_token_mixer``), any other detected attention token mixer (``parc_mixer``, the lenient generic
fallback), ``nn.MultiheadAttention``, ``transformers`` self-attention modules, and attention computed
inline in a block's forward (the engine calls the mixer from the rewritten graph,
:mod:`parc_surgery.graph_attention`). The two registered names share the forward; they differ in what they
accept (see their ``check_source``). What the mixer is built from, and how it is called, comes from the
attention's :class:`~parc_surgery.attention_form.AttentionForm` (value rows, output projection, layout,
call signature, output structure).

Layouts of the tokens the mixer receives and returns: ``tokens`` (B, N, C) with N = p prefix tokens + H*W,
``tokens_first`` (N, B, C) (``nn.MultiheadAttention`` with ``batch_first=False``), ``nchw`` (B, C, H, W),
``nhwc`` (B, H, W, C).
"""

from __future__ import annotations

import math

import torch
import torch.fx
from timm.layers import PatchEmbed
from torch import nn

from ..errors import ConfigError, UnsupportedTargetError
from ..ops import ParC
from .metaformer import _kernel_pair

__all__ = ["LAYOUTS", "ParCTokenMixerBase", "attach_grid", "factor_grid", "grid_of", "infer_layout"]

LAYOUTS = ("tokens", "tokens_first", "nchw", "nhwc")


def factor_grid(n: int, base_hw: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) with ``H * W == n`` whose aspect ratio is closest to ``base_hw``'s (``base_hw`` if it fits).

    Ties go to the wider grid (24 tokens on a square base: 4 x 6, not 6 x 4). Raises :class:`ConfigError`
    when ``n < 1``, or when ``n`` is prime (only a 1 x n line) while the base grid is not a line.
    """
    bh, bw = base_hw
    if n == bh * bw:
        return bh, bw
    if n < 1:
        raise ConfigError(f"ParCTokenMixer: {n} patch tokens cannot form a grid")
    target = math.log(bh / bw)
    best = min(
        ((h, n // h) for h in range(1, n + 1) if n % h == 0),
        key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - target), 9), hw[0]),  # ties: the wider grid
    )
    if min(best) == 1 and min(bh, bw) > 1 and n > 1:
        raise ConfigError(
            f"ParCTokenMixer: cannot infer the patch grid of {n} patch tokens (base grid {bh}x{bw}; {n} only "
            f"factors as 1x{n}). Call ParCTokenMixer.attach(model, ...) so the grid is recorded from the "
            f"patch embedding, or feed an input size whose patch grid keeps the base aspect ratio."
        )
    return best


def infer_layout(module: nn.Module, in_shape) -> str:
    """``tokens`` / ``nchw`` / ``nhwc`` for a module run on ``in_shape``, or raise :class:`UnsupportedTargetError`.

    A 4-D input is ``nchw`` or ``nhwc`` by where the channel count of the module's first input projection
    (the first ``nn.Linear`` / ``nn.Conv2d`` inside it whose input width matches a dimension) sits.
    """
    what = f"{type(module).__module__}.{type(module).__qualname__}"
    if in_shape is None:
        raise UnsupportedTargetError(f"the {what} was not seen with a tensor input")
    if len(in_shape) == 3:
        return "tokens"
    if len(in_shape) != 4:
        raise UnsupportedTargetError(
            f"the {what} takes a {len(in_shape)}-D input {tuple(in_shape)}; only (B, N, C), (B, C, H, W) and "
            "(B, H, W, C) token mixers can be replaced"
        )
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == in_shape[1]:
            return "nchw"
        if isinstance(m, nn.Linear) and m.in_features == in_shape[-1]:
            return "nhwc"
        if isinstance(m, nn.Linear) and m.in_features == in_shape[1]:
            return "nchw"
    raise UnsupportedTargetError(
        f"cannot tell whether the {what}'s input {tuple(in_shape)} is (B, C, H, W) or (B, H, W, C): "
        "no projection inside it takes either width"
    )


# --- shape-dependent helpers: leaves for torch.fx (they read sizes at run time) ------------------------------------


def _to_tokens(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, M, C) channel-last tokens of ``x`` in its layout."""
    if layout == "nchw":
        return x.flatten(2).transpose(1, 2)
    if layout == "nhwc":
        return x.flatten(1, 2)
    if layout == "tokens_first":
        return x.transpose(0, 1)
    return x


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _grid_hint(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """A (H, W) the caller passed along with the tokens: a pair of ints, or two int arguments in a row."""
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(_pos_int(i) for i in v):
            return int(v[0]), int(v[1])
    ints = [v for v in args if isinstance(v, int) and not isinstance(v, bool)]
    if len(ints) == 2 and all(_pos_int(i) for i in ints):
        return ints[0], ints[1]
    return None


def grid_of(n: int, num_prefix: int | None, base: tuple[int, int], recorded, hint) -> tuple[int, int, int]:
    """(prefix tokens, H, W) for ``n`` tokens: the recorded patch grid, the caller's hint, the base grid,
    the factorisation closest to the base aspect, else one 1 x M line."""
    if recorded is not None:
        p = n - recorded[0] * recorded[1] if num_prefix is None else num_prefix
        if p < 0 or n - p != recorded[0] * recorded[1]:
            raise ConfigError(
                f"ParCTokenMixer: {n - (num_prefix or 0)} patch tokens do not fill the grid {recorded[0]}x"
                f"{recorded[1]} recorded from the patch embedding; token dropping / pruning (e.g. timm "
                "patch_drop_rate > 0 in training) cannot be used with ParC mixing"
            )
        return p, int(recorded[0]), int(recorded[1])
    if num_prefix is None:
        for hw in (hint, base):
            if hw is not None and n >= hw[0] * hw[1]:
                num_prefix = n - hw[0] * hw[1]
                break
        else:
            raise ConfigError(
                f"ParCTokenMixer: num_prefix_tokens is unknown and {n} tokens are fewer than the base grid "
                f"{base[0]}x{base[1]}; set num_prefix_tokens (ParCTokenMixer.attach reads model.num_prefix_tokens)"
            )
    m = n - num_prefix
    if m < 1:
        raise ConfigError(f"ParCTokenMixer: {n} tokens but {num_prefix} prefix token(s)")
    if hint is not None and hint[0] * hint[1] == m:
        return num_prefix, hint[0], hint[1]
    try:
        h, w = factor_grid(m, base)
    except ConfigError:  # a prime token count on a 2-D base grid: mix the tokens as one line, in order
        h, w = 1, m
    return num_prefix, h, w


def _grid(x, layout, num_prefix, base, recorded, args, kwargs) -> tuple[int, int, int]:
    if layout == "nchw":
        return 0, int(x.shape[2]), int(x.shape[3])
    if layout == "nhwc":
        return 0, int(x.shape[1]), int(x.shape[2])
    n = int(x.shape[0] if layout == "tokens_first" else x.shape[1])
    return grid_of(n, num_prefix, base, recorded, _grid_hint(args, kwargs))


def _tokens_to_map(v: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    b, _, c = v.shape
    return v[:, p:].transpose(1, 2).reshape(b, c, h, w)


def _join_prefix(v: torch.Tensor, patches: torch.Tensor, p: int) -> torch.Tensor:
    if p == 0:
        return patches
    return torch.cat([v[:, :p] + patches.mean(dim=1, keepdim=True), patches], dim=1)


def _from_tokens(y: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, M, C') tokens back into ``x``'s layout."""
    if layout == "nchw":
        return y.transpose(1, 2).reshape(x.shape[0], y.shape[-1], x.shape[2], x.shape[3])
    if layout == "nhwc":
        return y.reshape(x.shape[0], x.shape[1], x.shape[2], y.shape[-1])
    if layout == "tokens_first":
        return y.transpose(0, 1)
    return y


for _fn in (_to_tokens, _grid, _tokens_to_map, _join_prefix, _from_tokens):
    torch.fx.wrap(_fn.__name__)


class ParCTokenMixerBase(nn.Module):
    """ParC token mixing: input projection, two ParC halves with PE, output projection.

    With ``x`` in its layout as channel-last tokens ``t`` of width ``C``, ``p`` prefix tokens (class /
    register / distillation) and ``H * W`` patch tokens::

        v = self.v(t)                                   # C -> A (the attention's value rows, carried)
        g = v's patch tokens as a (B, A, H, W) map
        g1 = parc_1_w(parc_1_h(g[:, :A1]))              # half 1 (A1 = A // 2 channels): height then width
        g2 = parc_2_h(parc_2_w(g[:, A1:]))              # half 2 (the other A - A1): width then height
        patches = cat(g1, g2) as tokens
        prefix = v[:, :p] + mean of the patches         # the prefix tokens still see every patch
        out = proj_drop(proj(gate * norm(cat(prefix, patches))))   # A -> C' (carried); norm / gate if carried

    and back into the input's layout. Each ParC adds its PE first when built with PE; kernels and PEs are
    stored at ``kernel_hw`` and resized to the actual grid at every call. ``proj=False`` leaves the output
    projection out (an inline attention whose projection stays in the rewritten graph).

    **The grid.** ``nchw`` / ``nhwc`` inputs carry it. For token layouts it is, in order: the grid recorded
    from the model's patch embedding (:meth:`attach`, for mixers on the patch grid), a (H, W) the caller
    passes along (PVT / Twins attention receive one), the base grid when the patch count matches, else
    the factorisation of the patch count closest to the base grid's aspect (:func:`factor_grid`), else (a
    prime count) one 1 x M line. Windowed attention (Swin) receives one window per batch row, so the ParCs
    are circular within each window. ``num_prefix_tokens=None`` means "what the grid leaves over".
    """

    def __init__(
        self,
        dim: int,
        attn_dim: int,
        *,
        kernel_hw: tuple[int, int] | int,
        layout: str = "tokens",
        base_grid: tuple[int, int] | None = None,
        dim_out: int | None = None,
        proj: bool = True,
        num_prefix_tokens: int | None = 0,
        pe: bool = True,
        pe_init: str = "trunc_normal",
        v_bias: bool = True,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        if layout not in LAYOUTS:
            raise ConfigError(f"{name}: layout={layout!r} must be one of {LAYOUTS}")
        for what, v in (("dim", dim), ("attn_dim", attn_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: {what}={v!r} must be a positive int")
        if attn_dim < 2:
            raise ConfigError(f"{name}: attn_dim={attn_dim} must be >= 2 (split into two ParC halves)")
        if num_prefix_tokens is not None and (
            isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0
        ):
            raise ConfigError(f"{name}: num_prefix_tokens={num_prefix_tokens!r} must be an int >= 0 or None")
        kh, kw = _kernel_pair(kernel_hw, name)
        self.kernel_hw = (kh, kw)
        self.base_grid = _kernel_pair(base_grid, f"{name} (base_grid)") if base_grid is not None else (kh, kw)
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens if layout in ("tokens", "tokens_first") else 0
        self.attn_dim = attn_dim
        self.split = attn_dim // 2
        self._grid_state = None  # set by attach(): the grid recorded from the patch embedding
        dd = {"device": device, "dtype": dtype}
        d1, d2 = self.split, attn_dim - self.split
        parc = {"pe": pe, "bias": False, "impl": impl, "pe_init": pe_init, **dd}
        self.v = nn.Linear(dim, attn_dim, bias=v_bias, **dd)
        self.parc_1_h = ParC(d1, kh, "height", **parc)
        self.parc_1_w = ParC(d1, kw, "width", **parc)
        self.parc_2_w = ParC(d2, kw, "width", **parc)
        self.parc_2_h = ParC(d2, kh, "height", **parc)
        self.norm = nn.Identity()
        self.gate: nn.Module | None = None
        self.proj = nn.Linear(attn_dim, dim_out or dim, bias=proj_bias, **dd) if proj else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def mix(self, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
        """The mixer on ``x`` in its layout; ``args`` / ``kwargs``: the caller's other arguments (grid hints)."""
        t = _to_tokens(x, self.layout)
        gate = self.gate(t).sigmoid() if self.gate is not None else None
        v = self.v(t)
        recorded = self._grid_state.hw if self._grid_state is not None else None
        grid = _grid(
            x, self.layout, self.num_prefix_tokens, self.base_grid, recorded, args, {} if kwargs is None else kwargs
        )
        g = _tokens_to_map(v, grid[0], grid[1], grid[2])
        g1 = self.parc_1_w(self.parc_1_h(g[:, : self.split]))
        g2 = self.parc_2_h(self.parc_2_w(g[:, self.split :]))
        patches = torch.cat([g1, g2], dim=1).flatten(2).transpose(1, 2)
        y = self.norm(_join_prefix(v, patches, grid[0]))
        if gate is not None:
            y = y * gate
        return _from_tokens(self.proj_drop(self.proj(y)), x, self.layout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.mix(x, args, kwargs)

    def extra_repr(self) -> str:
        return (
            f"layout={self.layout!r}, attn_dim={self.attn_dim}, kernel_hw={self.kernel_hw}, "
            f"base_grid={self.base_grid}, num_prefix_tokens={self.num_prefix_tokens}"
        )


class _GridState:
    """The patch grid last seen by the patch embedding; shared by the recorder hook and the mixers of a model.

    A plain object (not a module or buffer), so ``copy.deepcopy(model)`` gives the copy its own shared
    state, hooked to the copy's patch embedding.
    """

    __slots__ = ("hw",)

    def __init__(self):
        self.hw: tuple[int, int] | None = None


class _GridRecorder:
    """Forward hook on a patch embedding: records the (H, W) grid of the tokens it produced."""

    def __init__(self, state: _GridState):
        self.state = state

    def __call__(self, module: nn.Module, args, output) -> None:
        hw = None
        if isinstance(output, (tuple, list)):  # e.g. timm PatchEmbedWithSize: (tokens, feat_size)
            if len(output) == 2 and isinstance(output[1], (tuple, list)) and len(output[1]) == 2:
                hw = output[1]
            output = output[0]
        if hw is None and isinstance(output, torch.Tensor) and output.dim() == 4:
            fmt = getattr(module, "output_fmt", "NCHW")
            fmt = getattr(fmt, "value", fmt)
            hw = output.shape[1:3] if fmt == "NHWC" else output.shape[2:4]
        if hw is None and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            if callable(getattr(module, "dynamic_feat_size", None)):
                hw = module.dynamic_feat_size(tuple(args[0].shape[-2:]))
            elif getattr(module, "grid_size", None) is not None:
                hw = module.grid_size
        self.state.hw = (int(hw[0]), int(hw[1])) if hw is not None else None


def attach_grid(model: nn.Module, mixers: list[ParCTokenMixerBase]) -> bool:
    """Hook ``model``'s patch embedding to record the token grid for ``mixers``; ``False`` if it has none.

    The hook (replacing any earlier one) is registered on ``model.patch_embed``, else the first timm
    ``PatchEmbed``; ``model.num_prefix_tokens`` (timm) is copied into the mixers.
    """
    prefix = getattr(model, "num_prefix_tokens", None)
    if isinstance(prefix, int) and not isinstance(prefix, bool):
        for m in mixers:
            m.num_prefix_tokens = prefix
    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, nn.Module):
        embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    if embed is None:
        return False
    for key, hook in list(embed._forward_hooks.items()):
        if isinstance(hook, _GridRecorder):
            del embed._forward_hooks[key]
    state = _GridState()
    embed.register_forward_hook(_GridRecorder(state))
    for m in mixers:
        m._grid_state = state
    return True
