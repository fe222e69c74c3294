"""ParC-MetaFormer block (design notes §2) and the ``parcnet`` block replacing timm MobileViT blocks (§3)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx
from timm.layers import make_divisible
from timm.models.mobilevit import MobileVitBlock
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from parc_surgery.blocks import BlockContext, get_block, is_block
from parc_surgery.blocks.metaformer import ParCMetaFormerBlock
from parc_surgery.blocks.parcnet import ParCNetBlock
from parc_surgery.errors import ConfigError, UnsupportedTargetError

# mobilevit_xxs at 128x128: the MobileViT blocks see 16x16, 8x8 and 4x4 maps.
XXS_TARGETS = {"stages.2.1": 16, "stages.3.1": 8, "stages.4.1": 4}


def nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def xxs():
    """mobilevit_xxs, its MobileViT blocks' inputs at 128x128, and a snapshot of its state."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    inputs = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
        for n in XXS_TARGETS
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 128, 128))
    for h in hooks:
        h.remove()
    # give the BatchNorms non-trivial statistics so "kept" copies are distinguishable from fresh ones
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    return model, inputs, snapshot


def ctx_for(k: int, **kw) -> BlockContext:
    return BlockContext(feature_size=(k, k), **kw)


# ------------------------------------------------------------------------------------------ MetaFormer block


@pytest.mark.parametrize(
    "dim, n, with_pe, expected",
    [
        (192, 32, True, 178_392),
        (192, 32, False, 166_104),
        (256, 16, True, 289_056),
        (256, 16, False, 280_864),
        (320, 8, True, 435_560),
        (320, 8, False, 430_440),
    ],
)
def test_metaformer_param_counts_match_reference(dim, n, with_pe, expected):
    with torch.device("meta"):
        block = ParCMetaFormerBlock(dim, (n, n), pe=with_pe)
    assert nparams(block) == expected


def _roll_parc(x: torch.Tensor, w: torch.Tensor, axis: str) -> torch.Tensor:
    """Independent reference: y[i] = sum_k w[k] x[(i + k) mod N], kernel already of length N."""
    dim = 2 if axis == "height" else 3
    taps = w.flatten(1)  # (C, K)
    y = torch.zeros_like(x)
    for k in range(taps.shape[1]):
        shape = (1, -1, 1, 1)
        y = y + taps[:, k].view(shape) * torch.roll(x, -k, dims=dim)
    return y


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


@pytest.mark.parametrize("with_pe", [True, False])
def test_metaformer_matches_written_out_definition(with_pe):
    torch.manual_seed(1)
    b = ParCMetaFormerBlock(32, (6, 5), pe=with_pe, impl="spatial").eval()
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 32, 6, 5)
    d = 16
    x1, x2 = x[:, :d], x[:, d:]
    if with_pe:  # PE_a is added before the per-half BatchNorm
        x1, x2 = x1 + b.pe_1, x2 + b.pe_2
    x1, x2 = _bn(x1, b.norm_1), _bn(x2, b.norm_2)
    x1, x2 = _roll_parc(x1, b.parc_1_h.weight, "height"), _roll_parc(x2, b.parc_2_w.weight, "width")
    if with_pe:  # PE_b: along width on half 1, along height on half 2
        x1, x2 = x1 + b.parc_1_w.pe, x2 + b.parc_2_h.pe
    x1, x2 = _roll_parc(x1, b.parc_1_w.weight, "width"), _roll_parc(x2, b.parc_2_h.weight, "height")
    z = torch.cat([x[:, :d] + x1, x[:, d:] + x2], 1)
    f = b.ffn.fc2(F.hardswish(b.ffn.fc1(_bn(z, b.ffn.norm))))
    s = F.adaptive_avg_pool2d(f, 1)
    s = F.hardsigmoid(_bn(b.ca.expand(F.hardswish(_bn(b.ca.reduce(s), b.ca.bn1))), b.ca.bn2))
    with torch.no_grad():
        torch.testing.assert_close(b(x), z + f * s, atol=1e-5, rtol=1e-5)


def test_metaformer_structure_and_init():
    torch.manual_seed(0)
    b = ParCMetaFormerBlock(64, (16, 16), pe=True)
    assert [m.axis for m in (b.parc_1_h, b.parc_1_w, b.parc_2_w, b.parc_2_h)] == ["height", "width", "width", "height"]
    assert all(m.bias is None for m in (b.parc_1_h, b.parc_1_w, b.parc_2_w, b.parc_2_h))
    assert b.parc_1_h.pe is None and b.parc_2_w.pe is None  # PE_a lives before the norms, on the block
    assert b.ffn.fc1.out_channels == 128 and b.ca.reduce.out_channels == 4
    assert b.ffn.drop2.p == pytest.approx(0.1) and b.ffn.drop1.p == 0.0
    pe = torch.cat([b.pe_1.flatten(), b.pe_2.flatten(), b.parc_1_w.pe.flatten(), b.parc_2_h.pe.flatten()])
    assert 0.8 < pe.std().item() < 1.2  # N(0, 1), not trunc-normal 0.02
    assert b.parc_1_h.weight.abs().max().item() <= 1 / 16**0.5


@pytest.mark.parametrize("size", [(16, 16), (24, 24), (8, 8), (12, 20), (5, 9)])
@pytest.mark.parametrize("train", [True, False])
def test_metaformer_shapes_any_size(size, train):
    torch.manual_seed(0)
    b = ParCMetaFormerBlock(32, (16, 16), pe=True).train(train)
    y = b(torch.randn(2, 32, *size))
    assert y.shape == (2, 32, *size) and torch.isfinite(y).all()


@pytest.mark.parametrize("train", [True, False])
def test_metaformer_spatial_equals_fft(train):
    torch.manual_seed(0)
    a = ParCMetaFormerBlock(32, (12, 12), pe=True, impl="spatial").train(train)
    b = ParCMetaFormerBlock(32, (12, 12), pe=True, impl="fft").train(train)
    b.load_state_dict(a.state_dict())
    # In training the channel attention's BatchNorm sees one pooled value per sample; with a batch of 2 it
    # maps two nearly equal values to +-1 and amplifies float rounding, so train mode uses a batch of 8.
    batch = 8 if train else 2
    for size in ((12, 12), (20, 14), (7, 9)):
        x = torch.randn(batch, 32, *size)
        torch.manual_seed(3)  # same dropout mask in train mode
        ya = a(x)
        torch.manual_seed(3)
        yb = b(x)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)


def test_metaformer_fx_traced_equals_eager_at_other_sizes():
    torch.manual_seed(0)
    b = ParCMetaFormerBlock(32, (8, 8), pe=True).eval()
    gm = torch.fx.symbolic_trace(b)
    for size in ((8, 8), (12, 6)):  # a size other than the base proves nothing size-dependent was baked in
        x = torch.randn(2, 32, *size)
        torch.testing.assert_close(gm(x), b(x), atol=0, rtol=0)


def test_metaformer_backward_reaches_kernels_and_pes():
    torch.manual_seed(0)
    b = ParCMetaFormerBlock(32, (8, 8), pe=True)
    b(torch.randn(2, 32, 10, 6)).square().mean().backward()
    for name in (
        "pe_1",
        "pe_2",
        "parc_1_h.weight",
        "parc_2_w.weight",
        "parc_1_w.weight",
        "parc_1_w.pe",
        "parc_2_h.weight",
        "parc_2_h.pe",
    ):
        g = b.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name


def test_metaformer_state_dict_round_trip_and_pe_resize():
    torch.manual_seed(0)
    a = ParCMetaFormerBlock(32, (8, 8), pe=True).eval()
    torch.manual_seed(1)
    b = ParCMetaFormerBlock(32, (8, 8), pe=True).eval()
    x = torch.randn(2, 32, 8, 8)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(a(x), b(x))
    big = ParCMetaFormerBlock(32, (16, 12), pe=True).eval()
    big.load_state_dict(a.state_dict(), strict=True)  # kernels and PEs resampled to the new base lengths
    assert big.pe_1.shape == (1, 16, 16, 1) and big.pe_2.shape == (1, 16, 1, 12)
    assert torch.equal(big.pe_1[..., 0, 0], a.pe_1[..., 0, 0])  # first tap kept exactly (source index 0, weight 0)
    # last tap kept up to rounding: its source index (k-1)/(n-1)*(n-1) may round just below k-1 (a blend with
    # weight 1 - ~1e-7 on the last tap): an error of ~1e-7 * |tap difference|
    torch.testing.assert_close(big.pe_1[..., -1, 0], a.pe_1[..., -1, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 33, "kernel_hw": 8}, "dim=33"),
        ({"dim": 14, "kernel_hw": 8}, "dim=14"),
        ({"dim": 32, "kernel_hw": (8, 0)}, "kernel_hw"),
        ({"dim": 32, "kernel_hw": "8"}, "kernel_hw"),
    ],
)
def test_metaformer_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        ParCMetaFormerBlock(**kwargs, pe=True)
    assert "ParCMetaFormerBlock" in str(e.value)


def test_metaformer_is_not_registered_parcnet_is():
    assert not is_block("parc_metaformer")
    assert get_block("parcnet") is ParCNetBlock
    assert "timm.models.mobilevit.MobileVitBlock" in ParCNetBlock.replaces


# ------------------------------------------------------------------------------------------ ParC-Net block


@pytest.mark.parametrize("name", list(XXS_TARGETS))
def test_parcnet_replaces_mobilevit_block(xxs, name):
    model, inputs, _ = xxs
    src = model.get_submodule(name)
    k = XXS_TARGETS[name]
    block, rec = ParCNetBlock.from_module(src, ctx_for(k, impl="spatial"))
    d = src.conv_1x1.out_channels
    dim = make_divisible(4 / 3 * d, 8)
    c = src.conv_kxk.conv.in_channels
    assert block.conv_1x1.out_channels == dim and len(block.blocks) == len(src.transformer)
    assert block.conv_kxk.conv.groups == torch.tensor(dim).gcd(torch.tensor(c)).item()
    assert block.conv_proj.conv.groups == block.conv_kxk.conv.groups
    assert block.blocks[0].pe_1 is not None and all(b.pe_1 is None for b in block.blocks[1:])
    assert block.blocks[0].kernel_hw == (k, k) and block.training == src.training
    x = inputs[name]
    with torch.no_grad():
        assert block(x).shape == src(x).shape
    # carried tensors, bit-identical; the fusion conv's input halves swapped
    ws, wn = src.conv_fusion.conv.weight, block.conv_fusion.conv.weight
    assert torch.equal(wn[:, :c], ws[:, c:]) and torch.equal(wn[:, c:], ws[:, :c])
    for part in ("conv_fusion.bn", "conv_proj.bn"):
        new_sd, old_sd = block.get_submodule(part).state_dict(), src.get_submodule(part).state_dict()
        for t in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(new_sd[t], old_sd[t]), f"{part}.{t}"
    assert dict(rec.kept) == {
        p: p for p in ("conv_fusion.bn.weight", "conv_fusion.bn.bias", "conv_proj.bn.weight", "conv_proj.bn.bias")
    }
    assert [(n, o) for n, o, _ in rec.transformed] == [("conv_fusion.conv.weight", ("conv_fusion.conv.weight",))]
    assert "conv_1x1.weight" in rec.dropped and "transformer.0.attn.qkv.weight" in rec.dropped
    assert "blocks.0.parc_1_h.weight" in rec.new and "conv_kxk.conv.weight" in rec.new
    assert set(rec.new) | {n for n, _ in rec.kept} | {n for n, _, _ in rec.transformed} == {
        n for n, _ in block.named_parameters()
    }


def test_parcnet_source_unchanged(xxs):
    model, _, snapshot = xxs
    for name, k in XXS_TARGETS.items():
        ParCNetBlock.from_module(model.get_submodule(name), ctx_for(k))
    after = model.state_dict()
    assert after.keys() == snapshot.keys() and all(torch.equal(after[k], v) for k, v in snapshot.items())
    assert all(isinstance(model.get_submodule(n), MobileVitBlock) for n in XXS_TARGETS)


@pytest.mark.parametrize("size", [(16, 16), (24, 24), (8, 8), (12, 20)])
@pytest.mark.parametrize("train", [True, False])
def test_parcnet_output_shape_any_size(xxs, size, train):
    model, _, _ = xxs
    src = model.get_submodule("stages.2.1")
    block, _ = ParCNetBlock.from_module(src, ctx_for(16))
    block.train(train)
    x = torch.randn(2, src.conv_kxk.conv.in_channels, *size)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_parcnet_spatial_equals_fft_and_fx(xxs):
    model, inputs, _ = xxs
    src = model.get_submodule("stages.2.1")
    torch.manual_seed(0)
    a, _ = ParCNetBlock.from_module(src, ctx_for(16, impl="spatial"))
    b, _ = ParCNetBlock.from_module(src, ctx_for(16, impl="fft"))
    b.load_state_dict(a.state_dict())
    gm = torch.fx.symbolic_trace(a)
    with torch.no_grad():
        for x in (inputs["stages.2.1"], torch.randn(1, 48, 20, 12)):
            ya = a(x)
            torch.testing.assert_close(b(x), ya, atol=1e-5, rtol=1e-5)
            # eager eval runs the folded fast path (blocks/_metaformer_eval.py), the graph the reference ops
            torch.testing.assert_close(gm(x), ya, atol=1e-5, rtol=1e-5)


def test_parcnet_widths_pe_and_init_options(xxs):
    model, _, _ = xxs
    src = model.get_submodule("stages.3.1")  # transformer width 80, 4 blocks
    keep, _ = ParCNetBlock.from_module(src, ctx_for(8, width_mult=1.0))
    assert keep.conv_1x1.out_channels == 80
    wide, _ = ParCNetBlock.from_module(src, ctx_for(8, width_mult=2.0))
    assert wide.conv_1x1.out_channels == 160
    no_pe, _ = ParCNetBlock.from_module(src, ctx_for(8, pe=False))
    assert all(b.pe_1 is None and b.parc_1_w.pe is None for b in no_pe.blocks)
    torch.manual_seed(5)
    warm, _ = ParCNetBlock.from_module(src, ctx_for(8, init="warm_start"))
    torch.manual_seed(5)
    ref, _ = ParCNetBlock.from_module(src, ctx_for(8, init="reference"))
    sw, sr = warm.state_dict(), ref.state_dict()
    assert all(torch.equal(sw[k], sr[k]) for k in sw)  # MobileViT has nothing to fold: same init


def test_parcnet_meta_device_and_dtype():
    with torch.device("meta"):
        src = timm.create_model("mobilevit_xxs", pretrained=False)
    block, rec = ParCNetBlock.from_module(src.stages[3][1], ctx_for(8))
    assert all(p.is_meta for p in block.parameters()) and rec.transformed
    src64 = MobileVitBlock(16, 16, transformer_dim=24, transformer_depth=1, patch_size=2).double()
    block64, _ = ParCNetBlock.from_module(src64, ctx_for(6))
    assert all(p.dtype == torch.float64 for p in block64.parameters())
    assert block64(torch.randn(2, 16, 6, 6, dtype=torch.float64)).dtype == torch.float64


def test_parcnet_no_fusion_supported():
    torch.manual_seed(0)
    src = MobileVitBlock(16, 24, transformer_dim=32, transformer_depth=2, patch_size=2, no_fusion=True).eval()
    block, rec = ParCNetBlock.from_module(src, ctx_for(8))
    assert block.conv_fusion is None and not rec.transformed
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert block.eval()(x).shape == src(x).shape == (2, 24, 8, 8)


def test_parcnet_bad_sources():
    with pytest.raises(UnsupportedTargetError, match="MobileVitBlock"):
        ParCNetBlock.check_source(nn.Conv2d(8, 8, 3), ctx_for(8))
    tiny = MobileVitBlock(8, 8, transformer_dim=8, transformer_depth=1, patch_size=2)
    with pytest.raises(UnsupportedTargetError, match="too small"):
        ParCNetBlock.from_module(tiny, ctx_for(8, width_mult=1.0))
    odd = MobileVitBlock(8, 8, transformer_dim=21, transformer_depth=1, num_heads=3, patch_size=2)
    with pytest.raises(UnsupportedTargetError, match="odd"):
        ParCNetBlock.check_source(odd, ctx_for(8, width_mult=1.0))
    strided = MobileVitBlock(16, 16, stride=2, transformer_dim=32, transformer_depth=1, patch_size=2)
    with pytest.raises(UnsupportedTargetError, match="stride"):
        ParCNetBlock.check_source(strided, ctx_for(8))


def test_parcnet_s_matches_published_figures():
    """ParC-Net-S = mobilevit_s with its three MobileViT blocks replaced: 5.0371 M params, 1.6573 G MACs @256."""
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = timm.create_model("mobilevit_s", pretrained=False)
    model = timm.create_model("mobilevit_s", pretrained=False)
    for s, k in ((2, 32), (3, 16), (4, 8)):
        model.stages[s][1], _ = ParCNetBlock.from_module(model.stages[s][1], ctx_for(k, impl="spatial"))
        meta.stages[s][1], _ = ParCNetBlock.from_module(meta.stages[s][1], ctx_for(k, impl="spatial"))
    assert nparams(meta) == nparams(model)
    assert nparams(model) == pytest.approx(5.0371e6, rel=1e-3)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        y = model.eval()(torch.randn(1, 3, 256, 256))
    assert y.shape == (1, 1000)
    assert fc.get_total_flops() / 2 == pytest.approx(1.6573e9, rel=1e-2)
