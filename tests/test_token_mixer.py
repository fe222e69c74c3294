"""``parc_token_mixer``: ParC token mixing in place of timm ViT / DeiT attention."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.fx
from timm.layers import Attention
from torch import nn

from parc_surgery.blocks import BlockContext, get_block
from parc_surgery.blocks.attention_mixer import ParCTokenMixer
from parc_surgery.blocks.token_mixer import factor_grid
from parc_surgery.errors import ConfigError, UnsupportedTargetError


def convert(model: nn.Module, **ctx_kw) -> list[tuple[str, nn.Module]]:
    """Swap every Attention of a timm ViT for a ParCTokenMixer in place (what the engine does), then attach."""
    grid = tuple(model.patch_embed.grid_size)
    ctx = BlockContext(feature_size=grid, **ctx_kw)
    placements = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Attention):
            block, _ = ParCTokenMixer.from_module(mod, ctx)
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, block)
            placements.append((name, block))
    ParCTokenMixer.attach(model, placements)
    return placements


@pytest.fixture(scope="module")
def deit_dynamic():
    """deit_tiny at a 64x64 base (4x4 patch grid), dynamic image size, converted; and its unconverted source."""
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, dynamic_img_size=True, depth=3)
    model = copy.deepcopy(src)
    convert(model, impl="spatial", init="reference")
    return src.eval(), model.eval()


@pytest.fixture(scope="module")
def attn():
    """One deit_tiny-sized Attention (dim 192, 3 heads) with random weights."""
    torch.manual_seed(0)
    return Attention(192, num_heads=3, qkv_bias=True).eval()


def mixer(attn: nn.Module, grid=(4, 4), **kw) -> ParCTokenMixer:
    return ParCTokenMixer.from_module(attn, BlockContext(feature_size=grid, **kw))[0].eval()


def test_registered():
    assert get_block("parc_token_mixer") is ParCTokenMixer
    assert "timm.layers.attention.Attention" in ParCTokenMixer.replaces


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (32, 32), (48, 80), (96, 64)])
@pytest.mark.parametrize("train", [True, False])
def test_dynamic_model_any_size(deit_dynamic, size, train):
    src, model = deit_dynamic
    model.train(train)
    try:
        x = torch.randn(2, 3, *size)
        y = model(x)
        assert y.shape == src(x).shape == (2, 1000) and torch.isfinite(y).all()
        grids = {b.attn._grid_state.hw for b in model.blocks}
        assert grids == {(size[0] // 16, size[1] // 16)}
    finally:
        model.eval()


def test_non_square_uses_recorded_grid(deit_dynamic):
    """With a recorded 6x4 grid the mixer equals ParC applied to the tokens laid out as 6 rows of 4."""
    _, model = deit_dynamic
    feats = {}
    h = model.blocks[1].attn.register_forward_hook(lambda m, a, o: feats.update(x=a[0], y=o))
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 64))
    h.remove()
    m = model.blocks[1].attn
    assert m._grid_state.hw == (6, 4)
    with torch.no_grad():
        v = m.v(feats["x"])
        g = v[:, 1:].transpose(1, 2).reshape(1, 192, 6, 4)
        g1 = m.parc_1_w(m.parc_1_h(g[:, :96]))
        g2 = m.parc_2_h(m.parc_2_w(g[:, 96:]))
        patches = torch.cat([g1, g2], 1).flatten(2).transpose(1, 2)
        cls = v[:, :1] + patches.mean(1, keepdim=True)
        ref = m.proj(torch.cat([cls, patches], 1))
    torch.testing.assert_close(feats["y"], ref, atol=1e-5, rtol=1e-5)
    # the square guess (4x6) would be wrong for this input
    assert factor_grid(24, (4, 4)) == (4, 6)


def test_static_vit_models_shapes():
    """deit_tiny (224 -> 14x14 grid, flattened patch embed), vit_small / deit_small widths."""
    torch.manual_seed(0)
    for name, kw, size in (
        ("deit_tiny_patch16_224", {"depth": 2}, 224),
        ("vit_small_patch16_224", {"depth": 1, "img_size": 64}, 64),
        ("deit_small_patch16_224", {"depth": 1, "img_size": 64}, 64),
    ):
        model = timm.create_model(name, pretrained=False, **kw).eval()
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            ref = model(x)
            convert(model)
            y = model(x)
        mixers = [b.attn for b in model.blocks]
        assert y.shape == ref.shape and torch.isfinite(y).all(), name
        assert mixers[0].kernel_hw == (size // 16, size // 16)
        assert mixers[0]._grid_state.hw == (size // 16, size // 16)
        assert mixers[0].num_prefix_tokens == model.num_prefix_tokens


def test_carry_and_source_unchanged(attn):
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    m, rec = ParCTokenMixer.from_module(attn, BlockContext(feature_size=(4, 4)))
    a = attn.attn_dim
    assert torch.equal(m.v.weight, attn.qkv.weight[2 * a :]) and torch.equal(m.v.bias, attn.qkv.bias[2 * a :])
    assert torch.equal(m.proj.weight, attn.proj.weight) and torch.equal(m.proj.bias, attn.proj.bias)
    assert dict(rec.kept) == {"proj.weight": "proj.weight", "proj.bias": "proj.bias"}
    assert {n: o for n, o, _ in rec.transformed} == {"v.weight": ("qkv.weight",), "v.bias": ("qkv.bias",)}
    assert set(rec.new) == {n for n, _ in m.named_parameters() if n.startswith("parc_")}
    after = attn.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert m.training == attn.training


def test_carries_output_norm_and_gate():
    torch.manual_seed(0)
    src = Attention(32, num_heads=2, scale_norm=True, gated=True, norm_layer=nn.LayerNorm)
    with torch.no_grad():
        src.norm.weight.normal_()
    m, rec = ParCTokenMixer.from_module(src, BlockContext(feature_size=(3, 3)))
    assert torch.equal(m.norm.weight, src.norm.weight) and torch.equal(m.gate.weight, src.gate.weight)
    assert {"norm.weight", "gate.weight"} <= {n for n, _ in rec.kept}
    assert m(torch.randn(2, 10, 32)).shape == (2, 10, 32)


def test_class_token_depends_on_every_patch(attn):
    m = mixer(attn, grid=(4, 4), pe=True)
    m.num_prefix_tokens = 1
    torch.manual_seed(1)
    for n_patches in (16, 15):  # the base 4x4 grid and a guessed 3x5 one
        x = torch.randn(2, 1 + n_patches, 192, requires_grad=True)
        m(x)[:, 0].square().sum().backward()
        per_token = x.grad[0].abs().sum(-1)
        assert (per_token[1:] > 0).all(), n_patches


def test_model_class_token_sees_every_patch(deit_dynamic):
    """End to end: the final class token of the converted model has a gradient in every 16x16 image patch."""
    _, model = deit_dynamic
    img = torch.randn(1, 3, 48, 80, requires_grad=True)
    model.forward_features(img)[:, 0].square().sum().backward()
    per_patch = img.grad[0].abs().sum(0).reshape(3, 16, 5, 16).sum((1, 3))
    assert (per_patch > 0).all()
    model.zero_grad(set_to_none=True)


def test_attach_hook_records_and_deepcopy_is_independent(deit_dynamic):
    _, model = deit_dynamic
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        twin(torch.randn(1, 3, 32, 96))
    assert model.blocks[0].attn._grid_state.hw == (4, 4)
    assert twin.blocks[0].attn._grid_state.hw == (2, 6)
    assert twin.blocks[0].attn._grid_state is twin.blocks[2].attn._grid_state
    # attaching again replaces the recorder instead of stacking a second one
    ParCTokenMixer.attach(twin, [])
    assert len(twin.patch_embed._forward_hooks) == 1


def test_spatial_equals_fft(attn):
    torch.manual_seed(0)
    a = mixer(attn, grid=(6, 6), impl="spatial", init="reference")
    b = mixer(attn, grid=(6, 6), impl="fft", init="reference")
    b.load_state_dict(a.state_dict())
    a.num_prefix_tokens = b.num_prefix_tokens = 1
    for n in (1 + 6 * 6, 1 + 8 * 8, 1 + 5 * 3):
        x = torch.randn(2, n, 192)
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_fx_traced_equals_eager(attn):
    m = mixer(attn, grid=(4, 4), init="reference")
    gm = torch.fx.symbolic_trace(m)  # mask arguments stay graph inputs, checked at run time
    for n in (17, 1 + 36):
        x = torch.randn(2, n, 192)
        torch.testing.assert_close(gm(x), m(x), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="attn_mask"):
        gm(torch.randn(1, 17, 192), torch.zeros(17, 17))


def test_backward_and_state_dict_round_trip(attn):
    torch.manual_seed(0)
    m = mixer(attn, init="reference")
    x = torch.randn(2, 17, 192)
    m(x).square().mean().backward()
    for p in ("parc_1_h", "parc_1_w", "parc_2_w", "parc_2_h"):
        for t in ("weight", "pe"):
            g = m.get_parameter(f"{p}.{t}").grad
            assert g is not None and g.abs().sum() > 0, f"{p}.{t}"
    torch.manual_seed(1)
    other = mixer(attn, init="reference")
    assert not torch.equal(other(x), m(x))
    other.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(other(x), m(x))


def test_init_modes_and_meta(attn):
    warm = mixer(attn, init="warm_start")
    ref = mixer(attn, init="reference")
    assert all(getattr(warm, p).pe.abs().sum() == 0 for p in ("parc_1_h", "parc_1_w", "parc_2_w", "parc_2_h"))
    assert ref.parc_1_h.pe.abs().sum() > 0 and ref.parc_1_h.pe.std() < 0.1
    no_pe = mixer(attn, pe=False)
    assert no_pe.parc_1_h.pe is None
    with torch.device("meta"):
        meta_src = Attention(64, num_heads=2, qkv_bias=True)
    m = mixer(meta_src)
    assert all(p.is_meta for p in m.parameters())


def test_factor_grid():
    assert factor_grid(16, (4, 4)) == (4, 4)
    assert factor_grid(12, (3, 4)) == (3, 4)
    assert factor_grid(48, (3, 4)) == (6, 8)
    assert factor_grid(7, (1, 5)) == (1, 7)
    with pytest.raises(ConfigError, match="attach"):
        factor_grid(13, (4, 4))
    with pytest.raises(ConfigError, match="cannot form a grid"):
        factor_grid(0, (4, 4))


def test_bad_inputs(attn):
    m = mixer(attn)
    with pytest.raises(ConfigError, match="attn_mask"):
        m(torch.randn(1, 17, 192), attn_mask=torch.zeros(17, 17))
    m.num_prefix_tokens = 1
    y = m(torch.randn(1, 14, 192))  # 13 patch tokens (prime) and no recorded grid: mixed as one 1 x 13 line
    assert y.shape == (1, 14, 192) and torch.isfinite(y).all()
    m.num_prefix_tokens = None
    with pytest.raises(ConfigError, match="num_prefix_tokens is unknown"):
        m(torch.randn(1, 9, 192))
    with pytest.raises(UnsupportedTargetError, match="no attention token mixer runs in its forward"):
        ParCTokenMixer.check_source(nn.Linear(4, 4), BlockContext(feature_size=(4, 4)))
    with pytest.raises(ConfigError, match="attn_dim"):
        ParCTokenMixer(8, 1, kernel_hw=4)


def test_odd_width_attention_splits_unevenly():
    torch.manual_seed(0)
    m = mixer(Attention(9, num_heads=3).eval(), grid=(3, 3))
    assert (m.parc_1_h.weight.shape[0], m.parc_2_h.weight.shape[0]) == (4, 5)
    assert m(torch.randn(2, 9, 9)).shape == (2, 9, 9)


def test_token_dropping_is_refused(deit_dynamic):
    _, model = deit_dynamic
    m = model.blocks[0].attn
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # records 4x4
    with pytest.raises(ConfigError, match="recorded"):
        m(torch.randn(1, 1 + 12, 192))
