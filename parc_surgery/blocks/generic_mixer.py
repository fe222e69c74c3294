"""``parc_mixer``: a ParC token mixer in place of *any* attention token mixer, sized from what the probe saw.

timm's plain ViT ``Attention`` has its own block (:mod:`parc_surgery.blocks.vit_mixer`); every other
attention token mixer (windowed attention, relative-position attention, talking heads, cross-covariance,
the 4-D ``Attention2d`` mixers, ...) is replaced by :class:`ParCMixer`, built from the module's recorded
input / output shapes (``BlockContext.source_in_shape`` / ``source_out_shape``) and from
the projections it can recognise by name. Three layouts are supported:

* ``tokens``: ``(B, N, C) -> (B, N, C')``, ``N = p + H * W`` (``p`` prefix tokens, e.g. a class token);
* ``nchw``: ``(B, C, H, W) -> (B, C', H, W)``;
* ``nhwc``: ``(B, H, W, C) -> (B, H, W, C')`` (channels-last attention, e.g. MaxViT's ``AttentionCl``).

Attention that changes the token count (pooling, class / cross attention) is no token mixer and is
refused; the probe does not select it in the first place. The block is a lenient fallback
(``skip_unsupported``): selected modules it cannot replace (e.g. an attention returning a tuple) are left
out of the conversion with a note instead of failing it.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..errors import ConfigError, UnsupportedTargetError
from ..ops import ParC
from ._carry import CarryBuilder, CarryRecord
from ._registry import BlockContext, ReplacementBlock, register_block
from .metaformer import _kernel_pair
from .vit_mixer import factor_grid

__all__ = ["LAYOUTS", "ParCMixer", "infer_layout"]

LAYOUTS = ("tokens", "nchw", "nhwc")

# child names (last component) of the projections a ParCMixer can carry
_QKV_NAMES = ("qkv", "to_qkv", "qkv_proj", "in_proj", "wqkv")
_KV_NAMES = ("kv", "to_kv", "kv_proj", "wkv")
_V_NAMES = ("v", "v_proj", "to_v", "wv", "value", "v_linear")
_OUT_NAMES = ("proj", "out_proj", "o_proj", "to_out", "proj_out", "out", "o", "wo", "output")


def _channels(shape, layout: str) -> int:
    return int(shape[1]) if layout == "nchw" else int(shape[-1])


def _projection(mod: nn.Module | None) -> nn.Module | None:
    """A plain ``nn.Linear`` or 1x1 ungrouped, unstrided ``nn.Conv2d`` (or one at the head of a Sequential)."""
    if isinstance(mod, nn.Sequential) and len(mod) > 0:
        mod = mod[0]
    if type(mod) is nn.Linear:
        return mod
    if (
        type(mod) is nn.Conv2d
        and tuple(mod.kernel_size) == (1, 1)
        and tuple(mod.stride) == (1, 1)
        and mod.groups == 1
        and tuple(mod.dilation) == (1, 1)
    ):
        return mod
    return None


def _dims(proj: nn.Module) -> tuple[int, int]:
    """(in, out) features of a projection from :func:`_projection`."""
    if isinstance(proj, nn.Linear):
        return proj.in_features, proj.out_features
    return proj.in_channels, proj.out_channels


def _matrix(proj: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a projection (a 1x1 conv's kernel squeezed)."""
    w = proj.weight
    return w if w.dim() == 2 else w.reshape(w.shape[0], w.shape[1])


def _carry_matrix(carry: CarryBuilder, new: str, prefix: str, proj: nn.Module) -> None:
    """Record ``new``.weight/.bias as carried from ``proj`` (the bias itself is copied by the caller)."""
    if isinstance(proj, nn.Linear):
        carry.kept.append((f"{new}.weight", f"{prefix}weight"))
    else:
        carry.transform(f"{new}.weight", [f"{prefix}weight"], "the 1x1 conv kernel squeezed to a matrix")
    if proj.bias is not None:
        carry.kept.append((f"{new}.bias", f"{prefix}bias"))


def _is_plain(v) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    return isinstance(v, tuple) and all(isinstance(i, (bool, int, float, str)) for i in v)


def _adopt_attributes(block: nn.Module, module: nn.Module) -> None:
    """Copy the source's public plain attributes (``resolution``, ``num_heads``, ...) its callers may read."""
    for k, v in vars(module).items():
        if not k.startswith("_") and k not in vars(block) and not hasattr(type(block), k) and _is_plain(v):
            block.__dict__[k] = v


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        m = getattr(module, n, None)
        if isinstance(m, nn.Module) and _projection(m) is not None:
            return n, m
    return None


# children that make a module a whole transformer block rather than an attention: not attention, never dropped
_BLOCK_PARTS = ("mlp", "ffn", "feed_forward", "fc1", "fc2", "norm1", "norm2", "ls1", "ls2")


def _attention_tensors(module: nn.Module, carry: CarryBuilder) -> list[str]:
    """The tensors of ``module`` a ParCMixer drops: all but those carried and those of transformer-block parts.

    A module that runs attention inline together with its MLP (a whole ViT block) keeps its MLP / norm children
    out of the record, so the conversion's ``preserved`` check names them instead of losing them silently.
    """
    used = {o for _, o in carry.kept} | {o for _, olds, _ in carry.transformed for o in olds}
    parts = tuple(f"{n}." for n, _ in module.named_children() if n in _BLOCK_PARTS)
    return [n for n in module.state_dict(keep_vars=True) if n not in used and not n.startswith(parts)]


def infer_layout(module: nn.Module, in_shape) -> str:
    """``tokens`` / ``nchw`` / ``nhwc`` for a module run on ``in_shape``, or raise :class:`UnsupportedTargetError`.

    A 4-D input is ``nchw`` or ``nhwc`` by where the channel count of the module's first input projection
    (the first ``nn.Linear`` / ``nn.Conv2d`` inside it whose input width matches a dimension) sits.
    """
    what = f"{type(module).__module__}.{type(module).__qualname__}"
    if in_shape is None:
        raise UnsupportedTargetError(f"parc_mixer: the {what} was not seen with a tensor input")
    rank = len(in_shape)
    if rank == 3:
        return "tokens"
    if rank != 4:
        raise UnsupportedTargetError(
            f"parc_mixer: the {what} takes a {rank}-D input {tuple(in_shape)}; only (B, N, C), (B, C, H, W) and "
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
        f"parc_mixer: cannot tell whether the {what}'s input {tuple(in_shape)} is (B, C, H, W) or (B, H, W, C): "
        "no projection inside it takes either width"
    )


# --- shape-dependent helpers: leaves for torch.fx (they read sizes at run time) ------------------------------------


def _to_tokens(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, M, C) channel-last tokens of ``x`` in its layout."""
    if layout == "nchw":
        return x.flatten(2).transpose(1, 2)
    if layout == "nhwc":
        return x.flatten(1, 2)
    return x


def _int_pair(v) -> tuple[int, int] | None:
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_pos_int(i) for i in v):
        return int(v[0]), int(v[1])
    return None


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _grid_hint(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """A (H, W) the caller passed along with the tokens: a pair of ints, or two int arguments in a row."""
    values = list(args) + list(kwargs.values())
    for v in values:
        hw = _int_pair(v)
        if hw is not None:
            return hw
    ints = [v for v in args if isinstance(v, int) and not isinstance(v, bool)]
    if len(ints) == 2 and all(_pos_int(i) for i in ints):
        return ints[0], ints[1]
    return None


def _grid(
    x: torch.Tensor, layout: str, num_prefix: int, base_grid: tuple[int, int], args: tuple, kwargs: dict
) -> tuple[int, int, int]:
    """(prefix tokens, H, W) of ``x``: its own spatial dims, else the caller's hint, the base grid or a guess."""
    if layout == "nchw":
        return 0, int(x.shape[2]), int(x.shape[3])
    if layout == "nhwc":
        return 0, int(x.shape[1]), int(x.shape[2])
    m = int(x.shape[1]) - num_prefix
    if m < 1:
        raise UnsupportedTargetError(f"ParCMixer: {x.shape[1]} tokens but {num_prefix} prefix token(s)")
    hint = _grid_hint(args, kwargs)
    if hint is not None and hint[0] * hint[1] == m:
        return num_prefix, hint[0], hint[1]
    try:
        h, w = factor_grid(m, base_grid)
    except ConfigError:  # a prime token count on a 2-D base grid: mix the tokens as one line, in order
        h, w = 1, m
    return num_prefix, h, w


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
    return y


for _fn in (_to_tokens, _grid, _tokens_to_map, _join_prefix, _from_tokens):
    torch.fx.wrap(_fn.__name__)


@register_block("parc_mixer")
class ParCMixer(ReplacementBlock):
    """Generic ParC token mixer: input projection, two ParC halves with PE, output projection.

    With ``x`` in its layout (see the module docstring) as channel-last tokens ``t`` of width ``C``::

        v = self.v(t)                                  # C -> A (carried from the value projection if found)
        g = v's patch tokens as a (B, A, H, W) map
        g1 = parc_1_w(parc_1_h(g[:, :A1]))             # half 1 (A1 = A // 2 channels): height then width
        g2 = parc_2_h(parc_2_w(g[:, A1:]))             # half 2 (the other A - A1): width then height
        patches = cat(g1, g2) as tokens
        prefix = v[:, :p] + mean of the patches        # tokens layout with p > 0 prefix tokens only
        out = proj_drop(proj(cat(prefix, patches)))    # A -> C' (carried from the output projection if found)

    and back into the input's layout. Each ParC adds its PE first when built with PE.

    **The grid.** ``nchw`` / ``nhwc`` inputs carry it. For ``tokens`` it is, in order: a (H, W) the caller
    passes along (a pair of ints, or two int arguments, as PVT / Twins attention receive), the base grid when
    the patch count matches, else the factorisation of the patch count closest to the base grid's aspect
    (:func:`~parc_surgery.blocks.vit_mixer.factor_grid`), else (a prime count) one 1 x M line of tokens.
    Windowed attention (Swin) receives one window per batch row, so the ParCs are circular within each
    window. Any further arguments of the replaced module (masks, relative positions, ...) are accepted and
    ignored: ParC mixes the whole grid it is given.

    Kernels and PEs are stored at ``kernel_hw`` and resized to the actual grid at every call.
    """

    replaces = ()  # selected by detected attention (``select: attention: true``), not by class
    skip_unsupported = True  # a generic fallback: what it cannot replace is left out with a note

    def __init__(
        self,
        dim: int,
        attn_dim: int,
        *,
        kernel_hw: tuple[int, int] | int,
        layout: str = "tokens",
        base_grid: tuple[int, int] | None = None,
        dim_out: int | None = None,
        num_prefix_tokens: int = 0,
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
            raise UnsupportedTargetError(f"{name}: layout={layout!r} must be one of {LAYOUTS}")
        for what, v in (("dim", dim), ("attn_dim", attn_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UnsupportedTargetError(f"{name}: {what}={v!r} must be a positive int")
        if attn_dim < 2:
            raise UnsupportedTargetError(f"{name}: attn_dim={attn_dim} must be >= 2 (split into two ParC halves)")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise UnsupportedTargetError(f"{name}: num_prefix_tokens={num_prefix_tokens!r} must be an int >= 0")
        kh, kw = _kernel_pair(kernel_hw, name)
        self.kernel_hw = (kh, kw)
        self.base_grid = _kernel_pair(base_grid, f"{name} (base_grid)") if base_grid is not None else (kh, kw)
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens if layout == "tokens" else 0
        self.attn_dim = attn_dim
        self.split = attn_dim // 2
        dd = {"device": device, "dtype": dtype}
        d1, d2 = self.split, attn_dim - self.split
        parc = {"pe": pe, "bias": False, "impl": impl, "pe_init": pe_init, **dd}
        self.v = nn.Linear(dim, attn_dim, bias=v_bias, **dd)
        self.parc_1_h = ParC(d1, kh, "height", **parc)
        self.parc_1_w = ParC(d1, kw, "width", **parc)
        self.parc_2_w = ParC(d2, kw, "width", **parc)
        self.parc_2_h = ParC(d2, kh, "height", **parc)
        self.proj = nn.Linear(attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        v = self.v(_to_tokens(x, self.layout))
        grid = _grid(x, self.layout, self.num_prefix_tokens, self.base_grid, args, kwargs)
        g = _tokens_to_map(v, grid[0], grid[1], grid[2])
        g1 = self.parc_1_w(self.parc_1_h(g[:, : self.split]))
        g2 = self.parc_2_h(self.parc_2_w(g[:, self.split :]))
        patches = torch.cat([g1, g2], dim=1).flatten(2).transpose(1, 2)
        y = self.proj_drop(self.proj(_join_prefix(v, patches, grid[0])))
        return _from_tokens(y, x, self.layout)

    # --- the registry protocol -----------------------------------------------------------------------------------

    @classmethod
    def _source_dims(cls, module: nn.Module, ctx: BlockContext) -> dict:
        """Layout, widths and the carriable projections of ``module``; raises UnsupportedTargetError."""
        what = f"{type(module).__module__}.{type(module).__qualname__}"
        in_shape = ctx.source_in_shape
        out_shape = ctx.source_out_shape
        if in_shape is None or out_shape is None:
            raise UnsupportedTargetError(
                f"parc_mixer: no recorded input / output shape for the {what} (it did not run with one tensor in "
                "and one out); parc_mixer is sized from the probe's shapes"
            )
        layout = infer_layout(module, in_shape)
        if len(out_shape) != len(in_shape) or out_shape[0] != in_shape[0]:
            raise UnsupportedTargetError(
                f"parc_mixer: the {what} maps {tuple(in_shape)} to {tuple(out_shape)}: not a token mixer"
            )
        keep = (1,) if layout == "tokens" else ((2, 3) if layout == "nchw" else (1, 2))
        if any(in_shape[i] != out_shape[i] for i in keep):
            raise UnsupportedTargetError(
                f"parc_mixer: the {what} maps {tuple(in_shape)} to {tuple(out_shape)} ({layout} layout): it changes "
                "the token / spatial extent, so it is no token mixer (pooling, class or cross attention)"
            )
        c_in, c_out = _channels(in_shape, layout), _channels(out_shape, layout)
        src_v = src_out = None
        v_rows = None  # (start, stop) rows of the value projection inside a fused qkv / kv
        found = _child(module, _V_NAMES)
        if found is not None and _dims(_projection(found[1]))[0] == c_in:
            src_v = found
        if src_v is None:
            for names, parts, index in ((_QKV_NAMES, 3, 2), (_KV_NAMES, 2, 1)):
                found = _child(module, names)
                if found is None:
                    continue
                i, o = _dims(_projection(found[1]))
                if i == c_in and o % parts == 0:
                    a = o // parts
                    src_v, v_rows = found, (index * a, (index + 1) * a)
                    break
        attn_dim = None
        if src_v is not None:
            attn_dim = (v_rows[1] - v_rows[0]) if v_rows else _dims(_projection(src_v[1]))[1]
        found = _child(module, _OUT_NAMES)
        if found is not None:
            i, o = _dims(_projection(found[1]))
            if o == c_out and (attn_dim is None or i == attn_dim):
                src_out = found
                attn_dim = i
        if attn_dim is None:
            attn_dim = c_out if c_out >= 2 else max(2, c_in)
        if attn_dim < 2:
            raise UnsupportedTargetError(f"parc_mixer: the {what}'s width {attn_dim} is too small to split in two")
        grid = ctx.feature_size
        if layout == "nhwc":
            grid = (int(in_shape[1]), int(in_shape[2]))
        return {
            "layout": layout,
            "c_in": c_in,
            "c_out": c_out,
            "attn_dim": attn_dim,
            "v": src_v,
            "v_rows": v_rows,
            "out": src_out,
            "grid": tuple(int(g) for g in grid),
        }

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Accept a module recorded as a token mixer in one of the supported layouts (see the module docstring)."""
        info = cls._source_dims(module, ctx)
        _kernel_pair(ctx.kernel_size or info["grid"], "parc_mixer (BlockContext.kernel_size)")
        _kernel_pair(info["grid"], "parc_mixer (the token grid)")

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, ctx: BlockContext) -> tuple[ParCMixer, CarryRecord]:
        """Build the mixer replacing ``module`` (never mutated).

        Carried when recognised by name and width: the value projection (a ``v`` / ``v_proj`` / ... child, or
        the value rows of a fused ``qkv`` / ``kv`` child in the usual ``[q; k; v]`` order, with a separate
        ``v_bias`` parameter as in BEiT) as ``v`` (``transformed`` from a fused one, else ``kept``), and the
        output projection (``proj`` / ``out_proj`` / ``o_proj`` / ...) as ``proj``; a 1x1 conv's kernel is
        squeezed to a matrix. Everything else of the attention is ``dropped``; ``v`` / ``proj`` are ``new`` when
        nothing corresponds. The source's public plain attributes (ints, strings, ... such as ``resolution`` or
        ``num_heads``, which the code around it may read) are copied onto the block. ParC kernels: the reference
        init; PEs: zero for ``warm_start``, trunc-normal for ``reference`` (attention has no kernel to fold).
        """
        info = cls._source_dims(module, ctx)
        first = next(iter(module.parameters()), None)
        dd = {"device": first.device, "dtype": first.dtype} if first is not None else {}
        src_v, src_out, rows = info["v"], info["out"], info["v_rows"]
        v_bias = True
        if src_v is not None:
            pv = _projection(src_v[1])
            v_bias = pv.bias is not None or isinstance(getattr(module, "v_bias", None), nn.Parameter)
        proj_bias = True if src_out is None else _projection(src_out[1]).bias is not None
        drop = getattr(module, "proj_drop", None)
        grid = info["grid"]
        block = cls(
            info["c_in"],
            info["attn_dim"],
            kernel_hw=ctx.kernel_size or grid,
            layout=info["layout"],
            base_grid=grid,
            dim_out=info["c_out"],
            num_prefix_tokens=int(ctx.options.get("num_prefix_tokens", ctx.num_prefix_tokens) or 0),
            pe=ctx.pe,
            v_bias=v_bias,
            proj_bias=proj_bias,
            proj_drop=drop.p if isinstance(drop, nn.Dropout) else 0.0,
            impl=ctx.impl,
            **dd,
        )
        block.train(module.training)
        _adopt_attributes(block, module)
        if ctx.pe and ctx.init == "warm_start":
            for m in (block.parc_1_h, block.parc_1_w, block.parc_2_w, block.parc_2_h):
                m.pe.zero_()
        carry = CarryBuilder()
        if src_v is not None:
            name, mod = src_v
            p = _projection(mod)
            prefix = f"{name}." if p is mod else f"{name}.0."
            w = _matrix(p)
            if rows is None:
                block.v.weight.copy_(w)
                if p.bias is not None:
                    block.v.bias.copy_(p.bias)
                _carry_matrix(carry, "v", prefix, p)
            else:
                a, b = rows
                block.v.weight.copy_(w[a:b])
                carry.transform("v.weight", [f"{prefix}weight"], f"rows {a}:{b} of {prefix}weight (the value rows)")
                if isinstance(getattr(module, "v_bias", None), nn.Parameter) and module.v_bias.shape == (b - a,):
                    block.v.bias.copy_(module.v_bias)
                    carry.kept.append(("v.bias", "v_bias"))
                elif p.bias is not None:
                    block.v.bias.copy_(p.bias[a:b])
                    carry.transform("v.bias", [f"{prefix}bias"], f"entries {a}:{b} of {prefix}bias (the value rows)")
                elif block.v.bias is not None:
                    block.v.bias.zero_()
                    carry.transform("v.bias", [f"{prefix}weight"], "zero: the fused projection has no bias")
        if src_out is not None:
            name, mod = src_out
            p = _projection(mod)
            prefix = f"{name}." if p is mod else f"{name}.0."
            block.proj.weight.copy_(_matrix(p))
            _carry_matrix(carry, "proj", prefix, p)
            if p.bias is not None:
                block.proj.bias.copy_(p.bias)
        carry.drop(*_attention_tensors(module, carry))
        return block, carry.finish(block, module)

    def extra_repr(self) -> str:
        return (
            f"layout={self.layout!r}, attn_dim={self.attn_dim}, kernel_hw={self.kernel_hw}, "
            f"base_grid={self.base_grid}, num_prefix_tokens={self.num_prefix_tokens}"
        )
