"""``parc_token_mixer``: ParC token mixing in place of a ViT / DeiT self-attention (timm ``Attention``).

The attention of a plain ViT block is swapped for global circular convolutions over the patch grid;
the block's norms, residuals, MLP and layer scale stay as they are. Tokens arrive as ``(B, N, C)``,
so the mixer must learn the grid from somewhere: :meth:`ParCTokenMixer.attach` hooks the model's
patch embedding to record it (see the class docstring for the fallback).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.fx
from timm.layers import Attention, PatchEmbed
from torch import nn

from ..errors import ConfigError, UnsupportedTargetError
from ..ops import ParC
from ._carry import CarryBuilder, CarryRecord
from ._registry import BlockContext, ReplacementBlock, register_block
from .metaformer import _kernel_pair

__all__ = ["ParCTokenMixer", "factor_grid"]


def factor_grid(n: int, base_hw: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) with ``H * W == n`` whose aspect ratio is closest to ``base_hw``'s (``base_hw`` if it fits).

    Ties go to the wider grid (24 tokens on a square base: 4 x 6, not 6 x 4).

    Raises :class:`ConfigError` when ``n < 1``, or when ``n`` is prime (only a 1 x n line) while the
    base grid is not a line: no sensible grid can be guessed then.
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


def _resolve_prefix(x: torch.Tensor, num_prefix: int | None, hint, base_hw) -> int:
    """Number of prefix tokens: as configured, else what is left over by the recorded / base grid."""
    n = x.shape[1]
    if num_prefix is not None:
        if n < num_prefix:
            raise ConfigError(f"ParCTokenMixer: {n} tokens but num_prefix_tokens={num_prefix}")
        return num_prefix
    for hw in (hint, base_hw):
        if hw is not None and n >= hw[0] * hw[1]:
            return n - hw[0] * hw[1]
    raise ConfigError(
        f"ParCTokenMixer: num_prefix_tokens is unknown and {n} tokens are fewer than the base grid "
        f"{base_hw[0]}x{base_hw[1]}; set num_prefix_tokens (ParCTokenMixer.attach reads model.num_prefix_tokens)"
    )


def _tokens_to_map(t: torch.Tensor, hint, base_hw) -> torch.Tensor:
    """(B, M, C) patch tokens -> (B, C, H, W) map on the recorded grid, else the base grid, else a guess."""
    b, m, c = t.shape
    if hint is not None:
        if hint[0] * hint[1] != m:
            raise ConfigError(
                f"ParCTokenMixer: {m} patch tokens do not fill the grid {hint[0]}x{hint[1]} recorded from the "
                f"patch embedding; token dropping / pruning (e.g. timm patch_drop_rate > 0 in training) cannot be "
                f"used with ParC mixing"
            )
        h, w = hint
    else:
        h, w = factor_grid(m, base_hw)
    return t.transpose(1, 2).reshape(b, c, h, w)


def _refuse_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ConfigError("ParCTokenMixer: attn_mask / is_causal are not supported (ParC mixes the whole grid)")


# Leaves for torch.fx: they read sizes (and the mask arguments, graph values in a traced caller) at run
# time. A traced graph keeps the grid recorded when it was traced as a constant (checked against the
# token count at run time, like in eager).
torch.fx.wrap("_refuse_mask")
torch.fx.wrap("_resolve_prefix")
torch.fx.wrap("_tokens_to_map")


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


@register_block("parc_token_mixer")
class ParCTokenMixer(ReplacementBlock):
    """ParC token mixer for (B, N, C) token sequences: a drop-in for timm's ViT ``Attention``.

    With ``p`` prefix tokens (class / register / distillation) followed by ``H * W`` patch tokens::

        v = self.v(x)                                    # the attention's value projection, carried
        g = v[:, p:] as a (B, A, H, W) map               # A = attention width, on the actual grid
        g1 = parc_1_w(parc_1_h(g[:, :A/2]))              # half 1: height then width
        g2 = parc_2_h(parc_2_w(g[:, A/2:]))              # half 2: width then height
        patches = cat(g1, g2) as tokens
        prefix = v[:, :p] + mean over patch tokens of patches
        out = proj_drop(proj(gate * norm(cat(prefix, patches))))   # proj (and norm / gate) carried

    Every ParC adds its PE first when built with PE. The prefix tokens keep receiving global
    information through the mean of the mixed patch features (each class token output depends on every
    patch); patch tokens do not read the prefix tokens. ``attn_mask`` / ``is_causal`` are refused.

    **The grid.** The mixer only sees (B, N, C). :meth:`attach` (called once by the engine after the
    swap) registers a forward hook on the model's patch embedding that records the current grid
    (so ``dynamic_img_size`` models work at any input size, square or not) and sets
    ``num_prefix_tokens`` from ``model.num_prefix_tokens``. Without a recorded grid (a mixer used on its
    own, or a model without a findable patch embedding) the grid is the base grid if the token count
    matches, else the factorisation of the patch count whose aspect ratio is closest to the base grid's
    (:func:`factor_grid`), and a clear error when no sensible one exists. A recorded grid that the token
    count does not fill (token dropping) is an error. torch.fx traces keep the grid seen at trace time.

    Kernels / PEs are stored at ``kernel_hw`` (the patch grid at the model's input size, 14x14 for
    224 / 16) and resized to the actual grid at every call.
    """

    replaces = ("timm.layers.attention.Attention",)

    def __init__(
        self,
        dim: int,
        attn_dim: int,
        *,
        kernel_hw: tuple[int, int] | int,
        base_grid: tuple[int, int] | None = None,
        dim_out: int | None = None,
        num_prefix_tokens: int | None = None,
        pe: bool = True,
        pe_init: str = "trunc_normal",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        if isinstance(attn_dim, bool) or not isinstance(attn_dim, int) or attn_dim < 2 or attn_dim % 2:
            raise ConfigError(f"{name}: attn_dim={attn_dim!r} must be an even int >= 2 (split into two halves)")
        if num_prefix_tokens is not None and (not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0):
            raise ConfigError(f"{name}: num_prefix_tokens={num_prefix_tokens!r} must be an int >= 0 or None")
        kh, kw = _kernel_pair(kernel_hw, name)
        self.base_grid = _kernel_pair(base_grid, f"{name} (base_grid)") if base_grid is not None else (kh, kw)
        self.kernel_hw = (kh, kw)
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_dim = attn_dim
        self._grid_state: _GridState | None = None
        dd = {"device": device, "dtype": dtype}
        d = attn_dim // 2
        parc = {"pe": pe, "bias": False, "impl": impl, "pe_init": pe_init, **dd}
        self.v = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
        self.parc_1_h = ParC(d, kh, "height", **parc)
        self.parc_1_w = ParC(d, kw, "width", **parc)
        self.parc_2_w = ParC(d, kw, "width", **parc)
        self.parc_2_h = ParC(d, kh, "height", **parc)
        self.norm = nn.Identity()
        self.gate: nn.Module | None = None
        self.proj = nn.Linear(attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _refuse_mask(attn_mask, is_causal)
        hint = self._grid_state.hw if self._grid_state is not None else None
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        v = self.v(x)
        p = _resolve_prefix(v, self.num_prefix_tokens, hint, self.base_grid)
        g = _tokens_to_map(v[:, p:], hint, self.base_grid)
        d = self.attn_dim // 2
        g1 = self.parc_1_w(self.parc_1_h(g[:, :d]))
        g2 = self.parc_2_h(self.parc_2_w(g[:, d:]))
        patches = torch.cat([g1, g2], dim=1).flatten(2).transpose(1, 2)
        prefix = v[:, :p] + patches.mean(dim=1, keepdim=True)
        x = self.norm(torch.cat([prefix, patches], dim=1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Accept timm's plain ``Attention`` (not subclasses with their own forward) with an even width."""
        if not isinstance(module, Attention) or type(module).forward is not Attention.forward:
            raise UnsupportedTargetError(
                f"parc_token_mixer replaces timm.layers.Attention (plain ViT / DeiT self-attention), not "
                f"{type(module).__module__}.{type(module).__name__}"
            )
        if ctx.patch_grid is False:  # the engine found no patch embedding grid for these tokens
            raise UnsupportedTargetError(
                "parc_token_mixer: the tokens are not on the model's patch-embedding grid (pooled / hierarchical / "
                "unfolded tokens), which it records its grid from; use parc_mixer"
            )
        if module.attn_dim % 2:
            raise UnsupportedTargetError(
                f"parc_token_mixer: attention width {module.attn_dim} is odd; ParC mixing splits it into two halves"
            )
        _kernel_pair(ctx.kernel_hw, "parc_token_mixer (BlockContext.kernel_size: the patch grid)")
        _kernel_pair(ctx.feature_size, "parc_token_mixer (BlockContext.feature_size: the patch grid)")

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, ctx: BlockContext) -> tuple[ParCTokenMixer, CarryRecord]:
        """Build the mixer replacing ``module`` (never mutated).

        Carried: the value rows of ``qkv`` as ``v`` (``transformed``), ``proj`` and, when present, the
        attention's output ``norm`` and ``gate`` (``kept``). Dropped: the query / key rows of ``qkv`` (the
        tensor is listed as the source of ``v``) and ``q_norm`` / ``k_norm``. New: the ParC kernels and PEs.

        ``ctx.init``: attention has no kernel to fold into ParC, so kernels get the reference init
        U(-1/sqrt(K), 1/sqrt(K)) either way; PEs start at zero for ``warm_start`` and trunc-normal (std 0.02,
        as in ParC-ConvNets) for ``reference``. ``ctx.feature_size`` is the patch grid at the model's input
        size; the rule's ``block_options: {num_prefix_tokens: p}``, else the engine's ``ctx.num_prefix_tokens``,
        presets the prefix count (``attach`` sets it from the model anyway).
        """
        cls.check_source(module, ctx)
        w = module.qkv.weight
        a = module.attn_dim
        block = cls(
            module.qkv.in_features,
            a,
            kernel_hw=ctx.kernel_hw,
            base_grid=tuple(ctx.feature_size),
            dim_out=module.proj.out_features,
            num_prefix_tokens=ctx.options.get("num_prefix_tokens", ctx.num_prefix_tokens),
            pe=ctx.pe,
            qkv_bias=module.qkv.bias is not None,
            proj_bias=module.proj.bias is not None,
            proj_drop=module.proj_drop.p,
            impl=ctx.impl,
            device=w.device,
            dtype=w.dtype,
        )
        block.train(module.training)
        if ctx.pe and ctx.init == "warm_start":
            for m in (block.parc_1_h, block.parc_1_w, block.parc_2_w, block.parc_2_h):
                m.pe.zero_()
        carry = CarryBuilder()
        block.v.weight.copy_(w[2 * a : 3 * a])
        carry.transform("v.weight", ["qkv.weight"], f"rows {2 * a}:{3 * a} of qkv.weight (the value projection)")
        if module.qkv.bias is not None:
            block.v.bias.copy_(module.qkv.bias[2 * a : 3 * a])
            carry.transform("v.bias", ["qkv.bias"], f"entries {2 * a}:{3 * a} of qkv.bias (the value projection)")
        carry.copy(block.proj, "proj.", module.proj, "proj.")
        if not isinstance(module.norm, nn.Identity):
            block.norm = copy.deepcopy(module.norm)
            carry.copy(block.norm, "norm.", module.norm, "norm.")
        if module.gate is not None:
            block.gate = copy.deepcopy(module.gate)
            carry.copy(block.gate, "gate.", module.gate, "gate.")
        # every part of timm's Attention is attention: what is not carried (q / k rows, q_norm, k_norm) is dropped
        return block, carry.finish(block, module, drop_unused=True)

    @classmethod
    def attach(cls, model: nn.Module, placements: list[tuple[str, nn.Module]]) -> None:
        """Connect the model's mixers to its patch embedding; called once after the swap.

        Registers (replacing any earlier one) a forward hook on the patch embedding (``model.patch_embed``,
        else the first timm ``PatchEmbed``) that records the token grid of each forward into a state
        shared by every ``ParCTokenMixer`` of ``model``, and copies ``model.num_prefix_tokens`` into them.
        Without a patch embedding the mixers fall back to the base grid / :func:`factor_grid` (warns).
        """
        mixers = [m for m in model.modules() if isinstance(m, cls)]
        present = {id(m) for m in mixers}
        missing = [n for n, b in placements if isinstance(b, cls) and id(b) not in present]
        if missing:
            raise ConfigError(f"ParCTokenMixer.attach: placements {missing} are not part of the model")
        if not mixers:
            return
        prefix = getattr(model, "num_prefix_tokens", None)
        if isinstance(prefix, int) and not isinstance(prefix, bool):
            for m in mixers:
                m.num_prefix_tokens = prefix
        embed = getattr(model, "patch_embed", None)
        if not isinstance(embed, nn.Module):
            embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
        if embed is None:
            warnings.warn(
                f"ParCTokenMixer.attach: no patch embedding found in {type(model).__name__} (no .patch_embed, no "
                f"timm PatchEmbed); the mixers guess the grid from the token count (base grid {mixers[0].base_grid})",
                stacklevel=2,
            )
            return
        for key, hook in list(embed._forward_hooks.items()):
            if isinstance(hook, _GridRecorder):
                del embed._forward_hooks[key]
        state = _GridState()
        embed.register_forward_hook(_GridRecorder(state))
        for m in mixers:
            m._grid_state = state

    def extra_repr(self) -> str:
        return (
            f"attn_dim={self.attn_dim}, kernel_hw={self.kernel_hw}, base_grid={self.base_grid}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
