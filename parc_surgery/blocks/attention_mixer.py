"""The registered ParC mixers that replace attention: ``parc_token_mixer`` and ``parc_mixer``.

Both are built from the attention's :class:`~parc_surgery.attention_form.AttentionForm` (the engine puts it in
``BlockContext.attention``; a module used on its own is probed here). What they return depends on the form:

* ``kind="module"`` (the module *is* the attention: timm ``Attention``, ``nn.MultiheadAttention``, a
  ``transformers`` self-attention, ...): the mixer itself, taking the module's call signature and returning
  its output structure (``(out, None)`` for ``nn.MultiheadAttention``, the tuple a ``transformers``
  attention returns). Arguments that were ``None`` when the model was planned (masks) must stay ``None``;
  ``nn.MultiheadAttention``'s key and value must be its query (self-attention);
* ``kind="inline"`` (the attention is computed inside a block's forward together with its norms and MLP):
  the block as a ``torch.fx.GraphModule`` in which only the attention region is replaced by a call to a
  mixer (:mod:`parc_surgery.graph_attention`); every other node, submodule and parameter name stays.

``parc_token_mixer`` is for attention over the tokens of the model's patch embedding (plain ViT / DeiT):
its mixers record the patch grid from the patch embedding at run time (:meth:`ParCTokenMixer.attach`), so
``dynamic_img_size`` models work at any input size. ``parc_mixer`` takes any attention token mixer (windowed,
relative-position, 4-D, channels-last, ...) and is lenient: what it cannot replace is left out with a note.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from ..attention_carry import Carried, gather
from ..dataflow import TRef
from ..errors import ConfigError, UnsupportedTargetError
from ._carry import CarryBuilder, CarryRecord
from ._registry import BlockContext, ReplacementBlock, register_block
from .token_mixer import ParCTokenMixerBase, attach_grid

__all__ = ["ParCMixer", "ParCTokenMixer"]

_OUT = "__parc_out__"  # marks the token output among the recorded output leaves


class _CallSpec:
    """How the replaced module was called and what it returned (plain data; deep-copies with the model).

    ``none``: (position among the arguments after the tokens, name) of every argument that was ``None`` when the
    model was planned (passed, or left at a ``None`` default): it must stay ``None``. ``same``: positions that
    must be the token tensor itself (``nn.MultiheadAttention``'s key and value).
    """

    def __init__(self, module: nn.Module, call, token_ref: int, out_ref: int, mha: bool):
        leaves, self.spec = pytree.tree_flatten(call.output)
        self.leaves = tuple(_OUT if isinstance(v, TRef) and v.ref == out_ref else None for v in leaves)
        self.plain = isinstance(call.output, TRef)
        try:
            params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind in _NAMED]
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params]
        none = [(i - 1, names[i] if i < len(names) else "") for i, a in enumerate(call.args) if a is None and i > 0]
        none += [(names.index(k) - 1 if k in names else -1, k) for k, a in call.kwargs.items() if a is None]
        passed = {n for _, n in none} | set(call.kwargs) | set(names[: len(call.args)])
        none += [(i - 1, p.name) for i, p in enumerate(params) if p.name not in passed and i > 0 and p.default is None]
        self.none = tuple(none)
        self.same = tuple(i - 1 for i, a in enumerate(call.args) if i > 0 and a == TRef(token_ref)) if mha else ()


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _check_call(none: tuple, same: tuple, x, args: tuple, kwargs: dict) -> None:
    """Arguments that were ``None`` at planning stay ``None``; nn.MultiheadAttention's key / value are its query."""
    for pos, name in none:
        v = args[pos] if 0 <= pos < len(args) else kwargs.get(name)
        if v is not None:
            raise ConfigError(
                f"ParC mixer: argument {name or pos!r} (an attention mask or second input) was None when the model was "
                f"converted and is a {type(v).__name__} now; ParC mixes every token of one sequence and has no masks"
            )
    for i in same:
        if i < len(args) and args[i] is not x:
            raise ConfigError("ParC mixer: key / value must be the query itself (self-attention); got another tensor")


torch.fx.wrap("_check_call")


@register_block("parc_token_mixer")
class ParCTokenMixer(ParCTokenMixerBase, ReplacementBlock):
    """A :class:`~parc_surgery.blocks.token_mixer.ParCTokenMixerBase` called like the module it replaces."""

    replaces = ("timm.layers.attention.Attention",)
    uses_attention = True

    def forward(self, x: torch.Tensor, *args, **kwargs):
        spec: _CallSpec | None = getattr(self, "_call", None)
        if spec is not None:
            _check_call(spec.none, spec.same, x, args, kwargs)
        out = self.mix(x, args, kwargs)
        if spec is None or spec.plain:
            return out
        return pytree.tree_unflatten([out if v == _OUT else None for v in spec.leaves], spec.spec)

    # --- the registry protocol -----------------------------------------------------------------------------------

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Accept an attention (module or inline) whose tokens lie on the model's patch-embedding grid."""
        form = _form(module, ctx)
        if form.kind == "inline":  # the graph rewrite is planned (and checked) here; nothing is changed
            from ..graph_attention import plan_inline_rewrite

            plan_inline_rewrite(module, form)
        if form.layout != "tokens" or ctx.patch_grid is False:
            raise UnsupportedTargetError(
                f"{cls.block_name}: the {form.type_name}'s tokens ({form.layout}, {form.token_shape}) are not on the "
                "model's patch-embedding grid (windowed / pooled / hierarchical / 4-D tokens); use parc_mixer"
            )

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, ctx: BlockContext) -> tuple[nn.Module, CarryRecord]:
        """Build the replacement of ``module`` (never mutated) from its attention form.

        Carried: the value rows (of a fused ``qkv`` / ``in_proj``, or a separate value projection) as ``v`` and
        the output projection as ``proj``, located through the recorded ops (``kept`` when a whole parameter
        is copied, else ``transformed`` with the rows named); timm ``Attention``'s output ``norm`` / ``gate``
        (``kept``). Dropped: the query / key projections and everything else of the attention. New: the ParC
        kernels (reference init U(-1/sqrt(K), 1/sqrt(K)): attention has no kernel to fold) and PEs (zero for
        ``warm_start``, trunc-normal std 0.02 for ``reference``).
        """
        cls.check_source(module, ctx)
        form = _form(module, ctx)
        if form.kind == "inline":
            from ..graph_attention import rewrite_inline_attention

            mixer, carry = cls._build(form, module, ctx, proj=False)
            return rewrite_inline_attention(module, form, mixer, carry)
        block, carry = cls._build(form, module, ctx, proj=True)
        mha = isinstance(module, nn.MultiheadAttention)
        block._call = _CallSpec(module, form.call, form.call.tensor_refs()[0], form.call.output_refs()[0], mha)
        _adopt_attributes(block, module)
        if mha:  # nn.TransformerEncoderLayer reads it to choose its fused fast path: None sends it to the module
            block.in_proj_bias = None
        # the form found the module to be exactly an attention: what is not carried (q / k, tables) is dropped
        return block, carry.finish(block, module, drop_unused=True)

    @classmethod
    def _build(
        cls, form, module: nn.Module, ctx: BlockContext, *, proj: bool
    ) -> tuple[ParCTokenMixerBase, CarryBuilder]:
        first = next(iter(module.parameters()), None)
        dd = {"device": first.device, "dtype": first.dtype} if first is not None else {}
        grid = tuple(ctx.feature_size)
        if form.layout == "nhwc":
            grid = (int(form.token_shape[1]), int(form.token_shape[2]))
        drop = getattr(module, "proj_drop", None)
        prefix = ctx.options.get("num_prefix_tokens", ctx.num_prefix_tokens)
        if prefix is None and cls.block_name == "parc_mixer":
            prefix = 0  # parc_token_mixer leaves it unknown: attach() reads the model's count
        block = cls(
            form.dim,
            form.attn_dim,
            kernel_hw=ctx.kernel_size or grid,
            layout=form.layout,
            base_grid=grid,
            dim_out=form.out_dim if proj else None,
            proj=proj,
            num_prefix_tokens=prefix,
            pe=ctx.pe,
            v_bias=form.value is None or form.value.bias is not None,
            proj_bias=form.proj is None or form.proj.bias is not None,
            proj_drop=drop.p if isinstance(drop, nn.Dropout) and proj else 0.0,
            impl=ctx.impl,
            **dd,
        )
        block.train(module.training)
        block.use_patch_grid = cls.block_name == "parc_token_mixer"  # its check refused tokens off the patch grid
        if ctx.pe and ctx.init == "warm_start":
            for m in (block.parc_1_h, block.parc_1_w, block.parc_2_w, block.parc_2_h):
                m.pe.zero_()
        params = dict(module.named_parameters()) | dict(module.named_buffers())
        carry = CarryBuilder()
        _carry(carry, "v", block.v, form.value, params, "the value rows")
        if proj:
            _carry(carry, "proj", block.proj, form.proj, params, "the output projection")
            for part in ("norm", "gate"):  # timm Attention's output norm and gate
                src = getattr(module, part, None)
                if isinstance(src, nn.Module) and not isinstance(src, nn.Identity) and _is_timm_attention(module):
                    setattr(block, part, copy.deepcopy(src))
                    carry.copy(getattr(block, part), f"{part}.", src, f"{part}.")
        return block, carry

    @classmethod
    def attach(cls, model: nn.Module, placements: list[tuple[str, nn.Module]]) -> None:
        """Connect the model's patch-grid mixers to its patch embedding; called once after the swap.

        Registers (replacing any earlier one) a forward hook on the patch embedding (``model.patch_embed``,
        else the first timm ``PatchEmbed``) that records the token grid of each forward into a state shared
        by every patch-grid mixer of ``model``, and copies ``model.num_prefix_tokens`` into them. Without a
        patch embedding the mixers fall back to the base grid / :func:`factor_grid` (warns).
        """
        mixers = [m for m in model.modules() if isinstance(m, ParCTokenMixerBase) and getattr(m, "use_patch_grid", 0)]
        present = {id(m) for m in model.modules()}
        missing = [n for n, b in placements if id(b) not in present]
        if missing:
            raise ConfigError(f"{cls.__name__}.attach: placements {missing} are not part of the model")
        if mixers and not attach_grid(model, mixers):
            warnings.warn(
                f"ParCTokenMixer.attach: no patch embedding found in {type(model).__name__} (no .patch_embed, no "
                f"timm PatchEmbed); the mixers guess the grid from the token count (base grid {mixers[0].base_grid})",
                stacklevel=2,
            )


@register_block("parc_mixer")
class ParCMixer(ParCTokenMixer):
    """The generic fallback: any detected attention token mixer, any layout; what it cannot replace is left out."""

    replaces = ()  # selected by detected attention (``select: attention: true``), not by class
    skip_unsupported = True

    @classmethod
    def check_source(cls, module: nn.Module, ctx: BlockContext) -> None:
        """Accept any attention whose form could be read (see :func:`~parc_surgery.attention_form.find_attention_form`)
        and, for attention inline in a block's forward, whose graph rewrite can be planned."""
        form = _form(module, ctx)
        if form.kind == "inline":
            from ..graph_attention import plan_inline_rewrite

            plan_inline_rewrite(module, form)


def _form(module: nn.Module, ctx: BlockContext):
    form = ctx.attention
    if isinstance(form, Exception):
        raise form
    if form is None:
        from ..attention_form import form_of_module

        form = form_of_module(module, ctx)
    return form


def _is_timm_attention(module: nn.Module) -> bool:
    from timm.layers import Attention

    return isinstance(module, Attention) and type(module).forward is Attention.forward


def _carry(carry: CarryBuilder, new: str, dst: nn.Module, src: Carried | None, params: dict, what: str) -> None:
    """Fill ``dst`` (a Linear) from ``src`` and record it: kept when it copies whole parameters, else transformed."""
    if src is None or isinstance(dst, nn.Identity):
        return
    with torch.device("cpu"):  # the labels live on the CPU whatever default device the caller set
        _carry_on_cpu(carry, new, dst, src, params, what)


def _carry_on_cpu(carry: CarryBuilder, new: str, dst: nn.Module, src: Carried, params: dict, what: str) -> None:
    gather(src, params, dst.weight, dst.bias)
    for part, lab in (("weight", src.rows), ("bias", src.bias)):
        if lab is None or getattr(dst, part, None) is None:
            continue
        names = sorted({src.names[s] for s in lab[:, 0].tolist() if s >= 0})
        param = params[names[0]] if len(names) == 1 else None
        if param is not None and _whole(lab, src.names.index(names[0]), param):
            if param.shape == getattr(dst, part).shape:
                carry.kept.append((f"{new}.{part}", names[0]))
            else:
                carry.transform(f"{new}.{part}", names, f"{what}: the 1x1 conv kernel {names[0]} squeezed to a matrix")
        else:
            carry.transform(f"{new}.{part}", names, f"{what}: {_describe_rows(src, lab)}")


def _whole(lab: torch.Tensor, slot: int, param: torch.Tensor) -> bool:
    n = param.shape[0]
    return lab.shape[0] == n and bool((lab[:, 0] == slot).all()) and bool((lab[:, 1] == torch.arange(n)).all())


def _describe_rows(src: Carried, lab: torch.Tensor) -> str:
    parts = []
    for s in dict.fromkeys(lab[:, 0].tolist()):
        idx = lab[lab[:, 0] == s, 1]
        name = src.names[s] if s >= 0 else "zero"
        if s >= 0 and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + len(idx))).all()):
            parts.append(f"rows {int(idx[0])}:{int(idx[0]) + len(idx)} of {name}")
        else:
            parts.append(f"{len(idx)} rows of {name} (as the head merge orders them)" if s >= 0 else "zero")
    return "; ".join(parts)


def _is_plain(v) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    return isinstance(v, tuple) and all(isinstance(i, (bool, int, float, str)) for i in v)


def _adopt_attributes(block: nn.Module, module: nn.Module) -> None:
    """Copy the source's public plain attributes (``resolution``, ``num_heads``, ...) its callers may read."""
    for k, v in vars(module).items():
        if not k.startswith("_") and not hasattr(block, k) and _is_plain(v):  # never shadow a submodule
            block.__dict__[k] = v
