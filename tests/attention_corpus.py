"""Attention models written the way people write them (tests/test_attention_corpus.py, the zoo sweep's corpus).

Small widths and inputs: every model runs at 32 x 32 in a few milliseconds. Each class is one way of
writing a vision transformer that is not timm's: attention inline in a block's forward (softmax or SDPA,
with the MLP in the same method), ``nn.MultiheadAttention`` both ways round, ``nn.TransformerEncoder``,
separate q / k / v projections in a user attention class, dict outputs; and the forms that cannot be
rewritten (cross-attention, a mask computed from the input, tokens that form no 2-D grid, a forward that
does not trace).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 4, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class InlineBlock(nn.Module):
    """A ViT block whose forward computes everything: norm, qkv, softmax(QKᵀ)V or SDPA, projection, MLP."""

    def __init__(self, dim: int, heads: int = 2, *, sdpa: bool = False, mlp_ratio: int = 2):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), 0.5))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1) @ v
        x = x + self.gamma1 * self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class InlineViT(nn.Module):
    """Patch embedding, an optional class token, inline-attention blocks, a linear head."""

    def __init__(self, dim: int = 32, depth: int = 2, *, sdpa: bool = False, cls_token: bool = True):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls_token else None
        self.blocks = nn.Sequential(*[InlineBlock(dim, sdpa=sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


class MHABlock(nn.Module):
    """A pre-norm block around ``nn.MultiheadAttention`` (called as most hand-written ViTs call it)."""

    def __init__(self, dim: int, *, batch_first: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h)[0]  # need_weights left at its default (True): the weights are not used
        return x + self.mlp(self.norm2(x))


class MHAViT(nn.Module):
    """``nn.MultiheadAttention`` blocks; ``batch_first=False`` runs them on (N, B, C) tokens."""

    def __init__(self, dim: int = 32, depth: int = 2, *, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.blocks = nn.ModuleList([MHABlock(dim, batch_first=batch_first) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        if not self.batch_first:
            x = x.transpose(0, 1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[0] if not self.batch_first else x[:, 0])


class EncoderViT(nn.Module):
    """``nn.TransformerEncoder`` over patch tokens, mean pooled."""

    def __init__(self, dim: int = 32, depth: int = 2):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(self.patch_embed(x)).mean(1))


class QKVAttention(nn.Module):
    """Separate q / k / v projections and an output projection, SDPA in between."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape

        def split(t):
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(a.transpose(1, 2).reshape(b, n, c))


class DictViT(nn.Module):
    """Returns a dict (logits and tokens); attention modules of its own class."""

    def __init__(self, dim: int = 32, depth: int = 2):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.attns = nn.ModuleList([QKVAttention(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return {"logits": self.head(x.mean(1)), "tokens": x}


# ----------------------------------------------------------------------------------------------------------------------
# Forms that cannot be rewritten: each conversion must refuse with a reason


class CrossAttention(nn.Module):
    """Queries from the tokens ``x``, keys and values from another tensor ``context``: cross-attention."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, context):
        k, v = self.kv(context).chunk(2, -1)
        return self.proj((self.q(x) @ k.transpose(1, 2)).softmax(-1) @ v)


class CrossViT(nn.Module):
    """Image tokens attend to tokens of a 2x-pooled copy of the image."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.attn = CrossAttention(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.patch_embed(x)
        context = self.patch_embed(F.avg_pool2d(x, 2))
        return self.head((tokens + self.attn(tokens, context)).mean(1))


class MaskedAttention(nn.Module):
    """Self-attention with an additive mask argument."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(1, 2)
        if mask is not None:
            scores = scores + mask
        return self.proj(scores.softmax(-1) @ v)


class MaskedViT(nn.Module):
    """Masks out the tokens of dark patches: a mask computed from the input, passed to the attention."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.attn = MaskedAttention(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        dark = F.avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1) < -10.0  # (B, N): never true for randn input
        x = self.patch_embed(x)
        return self.head((x + self.attn(x, mask=dark[:, None, :] * -1e4)).mean(1))


class SelfMaskedAttention(MaskedAttention):
    """Computes its own mask from the tokens it attends over (comparisons on their values)."""

    def forward(self, x, mask=None):
        return super().forward(x, (x.abs().amax(-1) < 1e-6)[:, None, :] * -1e4)


class SelfMaskedViT(MaskedViT):
    def __init__(self, dim: int = 16):
        super().__init__(dim)
        self.attn = SelfMaskedAttention(dim)

    def forward(self, x):
        x = self.patch_embed(x)
        return self.head((x + self.attn(x)).mean(1))


class NoGridNet(nn.Module):
    """13 tokens made by a Linear from the flattened image: a sequence with no 2-D grid."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(3 * 8 * 8, 13 * dim)
        self.attn = QKVAttention(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(F.adaptive_avg_pool2d(x, 8).flatten(1)).view(x.shape[0], 13, self.dim)
        return self.head((t + self.attn(t)).mean(1))


class BranchyBlock(InlineBlock):
    """An inline-attention block whose forward branches on tensor values: torch.fx cannot trace it."""

    def forward(self, x):
        if x.mean() > 1e6:  # data-dependent (never true): fx cannot trace this
            x = x * 2
        return super().forward(x)


class BranchyViT(InlineViT):
    def __init__(self, dim: int = 16):
        super().__init__(dim, depth=1)
        self.blocks = nn.Sequential(BranchyBlock(dim))


# ----------------------------------------------------------------------------------------------------------------------
# The corpus sweep's entries (benchmarks/corpus_sweep.py): these models, and torchvision / transformers ones


def _tv(name: str, **kw):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return build


def _hf(config: str, model: str, **kw):
    def build():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kw))

    return build


def sweep_entries() -> list[dict]:
    """name, builder, rule, input size, source, and whether the model is meant to convert or to be refused."""

    def e(name, build, rule, size, source, expect="convert"):
        return {"name": name, "build": build, "rule": rule, "size": size, "source": source, "expect": expect}

    user = [
        e("user_inline_softmax_vit", lambda: InlineViT(sdpa=False), "attention2parc", 32, "user"),
        e("user_inline_sdpa_vit_no_cls", lambda: InlineViT(sdpa=True, cls_token=False), "attention2parc", 32, "user"),
        e("user_mha_vit_batch_first", lambda: MHAViT(batch_first=True), "attention2parc", 32, "user"),
        e("user_mha_vit_seq_first", lambda: MHAViT(batch_first=False), "attention2parc", 32, "user"),
        e("user_transformer_encoder_vit", EncoderViT, "attention2parc", 32, "user"),
        e("user_dict_output_qkv_vit", DictViT, "attention2parc", 32, "user"),
        e("user_cross_attention", CrossViT, "attention2parc", 32, "user", "refuse"),
        e("user_mask_from_input", MaskedViT, "attention2parc", 32, "user", "refuse"),
        e("user_mask_from_tokens", SelfMaskedViT, "attention2parc", 32, "user", "refuse"),
        e("user_tokens_without_grid", NoGridNet, "attention2parc", 32, "user", "refuse"),
        e("user_inline_untraceable", BranchyViT, "attention2parc", 32, "user", "refuse"),
    ]
    libs = [
        e("tv_vit_b_16", _tv("vit_b_16"), "attention2parc", 224, "torchvision"),
        e("tv_swin_t", _tv("swin_t"), "attention2parc", 224, "torchvision"),
        e("tv_swin_v2_t", _tv("swin_v2_t"), "attention2parc", 256, "torchvision"),
        e("hf_vit_base", _hf("ViTConfig", "ViTForImageClassification", num_labels=1000), "attention2parc", 224,
          "transformers"),
        e("hf_deit_base_distilled", _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", num_labels=1000),
          "attention2parc", 224, "transformers"),
        e("hf_swin_tiny", _hf("SwinConfig", "SwinForImageClassification", num_labels=1000), "attention2parc", 224,
          "transformers"),
        e("hf_mobilevit_s", _hf("MobileViTConfig", "MobileViTForImageClassification", num_labels=1000), "vit2parc",
          256, "transformers"),
        e("hf_mobilevit_s_attention", _hf("MobileViTConfig", "MobileViTForImageClassification", num_labels=1000),
          "attention2parc", 256, "transformers"),
    ]  # fmt: skip
    return user + libs
