"""MAC counting: the added formulas (FFT, complex products, CPU attention), uncounted ops, meta device, targets."""

from __future__ import annotations

import math

import pytest
import timm
import timm.layers.config as timm_layer_config
import torch
import torch.nn.functional as F
from torch import nn

from parc_surgery import ParC
from parc_surgery.errors import ConfigError, NoMatchError, TraceError
from parc_surgery.flops import MacCount, count_macs, count_params, fft_flops, is_compute_op
from parc_surgery.inputs import get_in_chans


@torch.library.custom_op("parc_test_flops::fused_conv", mutates_args=())
def _fused_conv(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


class Fn(nn.Module):
    """Wraps a function of the (B, C, H, W) input as a module."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _rfft_lines(n: int, lines: int) -> float:
    return 2.5 * n * math.log2(n) * lines


# -- formulas -----------------------------------------------------------------------------------


def test_fft_flops_formula():
    assert fft_flops((3, 8), [1], real=True) == 3 * 2.5 * 8 * 3  # 3 real transforms of length 8
    assert fft_flops((3, 8), [-1], real=False) == 3 * 5 * 8 * 3
    assert fft_flops((2, 4, 8), [1, 2], real=False) == 2 * 5 * 32 * 5  # one 2-D transform = N = 32
    assert fft_flops((5, 1), [1], real=True) == 0
    assert fft_flops((1, 12), [1], real=True) == round(2.5 * 12 * math.log2(12))


def test_fft_ops_counted():
    def fn(x):  # x (1, 2, 8, 8)
        xf = torch.fft.rfft(x, dim=2)  # r2c: 16 lines of 8
        y = torch.fft.fft(xf, dim=3)  # c2c: (1, 2, 5, 8) -> 10 lines of 8
        return torch.fft.irfft(y, n=8, dim=2)  # c2r: real output 16 lines of 8

    c = count_macs(Fn(fn), (8, 8), in_chans=2)
    assert c.per_op["aten._fft_r2c"] == int(_rfft_lines(8, 16)) // 2
    assert c.per_op["aten._fft_c2c"] == (5 * 8 * 3 * 10) // 2
    assert c.per_op["aten._fft_c2r"] == int(_rfft_lines(8, 16)) // 2
    assert c.flops == int(2 * _rfft_lines(8, 16) + 5 * 8 * 3 * 10)
    assert c.uncounted == {}


def test_complex_products_counted_real_products_not():
    def fn(x):  # x (1, 2, 4, 4) real
        z = torch.complex(x, x)
        a = z * z  # complex x complex: 6 FLOPs per element (32 elements)
        b = z * x  # complex x real: 2 FLOPs per element
        c = x * x  # real: not counted
        m = torch.bmm(z.flatten(0, 1), z.flatten(0, 1))  # (2, 4, 4) @ (2, 4, 4): 2*2*4*4*4 real-count x4
        return a.real + b.real + c + m.real.view_as(x)

    c = count_macs(Fn(fn), (4, 4), in_chans=2)
    assert c.flops == 6 * 32 + 2 * 32 + 4 * (2 * 2 * 4 * 4 * 4)
    assert c.per_op["aten.bmm"] == (4 * 2 * 2 * 4 * 4 * 4) // 2


def test_cpu_fused_attention_counted():
    b, h, l, e = 1, 2, 16, 8

    def fn(x):  # (B, H, L, E) as an image-shaped input
        return F.scaled_dot_product_attention(x, x, x)

    cpu = count_macs(Fn(fn), (l, e), in_chans=h, batch=b)
    expected = 2 * b * h * l * l * e + 2 * b * h * l * l * e
    assert cpu.flops == expected
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in cpu.per_op
    meta = count_macs(Fn(fn), (l, e), in_chans=h, batch=b, device="meta")  # math path: two bmm
    assert meta.flops == expected and "aten.bmm" in meta.per_op


def test_native_multi_head_attention_equals_unfused():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def fn(x):
        t = x.flatten(2).transpose(1, 2)
        return mha(t, t, t, need_weights=False)[0]

    model = Fn(fn)
    model.mha = mha
    fused = count_macs(model, (4, 4), in_chans=16)
    assert "aten._native_multi_head_attention" in fused.per_op
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        plain = count_macs(model, (4, 4), in_chans=16)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    assert "aten._native_multi_head_attention" not in plain.per_op
    assert fused.flops == plain.flops > 0 and fused.uncounted == plain.uncounted == {}


# -- ParC: fft against the formula, spatial against the conv ---------------------------------------


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("dense", [False, True])
def test_parc_fft_and_spatial_counts(axis, dense):
    torch.manual_seed(0)
    bsz, c, hh, ww = 2, 4, 16, 8
    # no PE: the operator alone (the module may fold the PE through the kernel, which is extra work)
    model = nn.Sequential(ParC(c, 16 if axis == "height" else 8, axis, pe=False, dense=dense, impl="auto"))
    n, other = (hh, ww) if axis == "height" else (ww, hh)
    nf = n // 2 + 1
    lines = bsz * c * other
    cin = c if dense else 1
    fft = 2 * _rfft_lines(n, lines)  # rfft(x) + irfft(y)
    fft += _rfft_lines(n, c * cin)  # rfft of the kernels
    if dense:
        fft += 8 * bsz * c * c * nf * other  # complex multiply-accumulates of the channel matmul
    else:
        fft += 6 * bsz * c * nf * other  # complex elementwise product
    spatial_macs = bsz * c * hh * ww * n * cin

    got_fft = count_macs(model, (hh, ww), batch=bsz, parc_impl="fft")
    got_spatial = count_macs(model, (hh, ww), batch=bsz, parc_impl="spatial")
    assert got_fft.flops == int(fft) and got_fft.macs == int(fft) // 2
    assert got_spatial.macs == spatial_macs
    assert got_fft.uncounted == got_spatial.uncounted == {}
    assert got_fft.macs_of("0") == got_fft.macs
    assert model[0].impl == "auto"  # restored
    for own, expected in (("fft", got_fft.macs), ("spatial", spatial_macs)):  # parc_impl=None: the module's own
        model[0].impl = own
        assert count_macs(model, (hh, ww), batch=bsz, parc_impl=None).macs == expected


# -- uncounted ops ----------------------------------------------------------------------------------


def test_uncounted_ops_are_listed():
    def fn(x):
        y = torch.linalg.inv(x + 4 * torch.eye(x.shape[-1]))
        return _fused_conv(y) + y

    c = count_macs(Fn(fn), (4, 4), in_chans=2)
    assert c.uncounted == {"aten.linalg_inv_ex": 1, "parc_test_flops.fused_conv": 1}


@pytest.mark.parametrize(
    ("name", "compute"),
    [
        ("aten.linalg_inv_ex", True),
        ("aten._fft_r2c", True),
        ("aten.convolution", True),
        ("aten._slow_conv2d_forward", True),
        ("aten._scaled_dot_product_flash_attention_for_cpu", True),
        ("mylib::fused_conv", True),
        ("aten.mv", True),
        ("aten.silu", False),
        ("aten.gelu", False),
        ("aten.upsample_bilinear2d", False),
        ("aten.native_layer_norm", False),
        ("aten.add", False),
        ("aten._convert_indices_from_coo_to_csr", False),
        ("aten.detach", False),
        ("aten._linalg_check_errors", False),
    ],
)
def test_is_compute_op(name, compute):
    assert is_compute_op(name) is compute


# -- the model is left alone; errors ------------------------------------------------------------------


def test_state_restored_and_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    c = count_macs(model, 8, device="meta")
    assert c.macs == 6 * 6 * 8 * 3 * 9
    assert [m.training for m in model] == [True, False, True] and model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())


def test_batch_scales_and_per_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    one = count_macs(model, (6, 5))
    two = count_macs(model, (6, 5), batch=2)
    assert one.macs == 6 * 5 * (8 * 3 * 9 + 4 * 8) and two.macs == 2 * one.macs
    assert one.per_module == {"": one.macs, "0": 6 * 5 * 8 * 27, "1": 0, "2": 6 * 5 * 32}
    assert (one.input_size, two.batch) == ((6, 5), 2)
    with pytest.raises(NoMatchError, match="Did you mean '2'"):
        one.macs_of("2 ")
    assert isinstance(one, MacCount)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": 0}, "input_size"),
        ({"input_size": (4, 4, 4)}, "input_size"),
        ({"input_size": 4, "batch": 0}, "batch"),
        ({"input_size": 4, "parc_impl": "fast"}, "parc_impl"),
        ({"input_size": 4, "in_chans": -1}, "in_chans"),
        ({"input_size": 4, "device": "nodevice"}, "device"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        count_macs(nn.Conv2d(3, 3, 1), **kwargs)


def test_model_failure_is_trace_error():
    with pytest.raises(TraceError, match=r"Conv2d failed on an input of shape \(1, 5, 4, 4\)"):
        count_macs(nn.Conv2d(3, 3, 1), 4, in_chans=5)
    with pytest.raises(ConfigError, match="in_chans"):
        count_macs(nn.Sequential(nn.ReLU()), 4)


def test_count_params_shared_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(4, 2, bias=False))
    assert count_params(model) == 4 * 4 + 4 + 4 * 2


# -- timm targets (design/parc.md §5) --------------------------------------------------------------------


def _build(name: str) -> nn.Module:
    if name == "convnext_xt":
        return timm.models.ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))
    return timm.create_model(name, pretrained=False)


TARGETS = [  # name, input size, params, G MACs
    ("mobilevit_s", 256, 5_578_632, 2.0008),
    ("resnet50", 224, 25_557_032, 4.0892),
    ("mobilenetv2_100", 224, 3_504_872, 0.3008),
    ("convnext_xt", 224, 7_438_360, 1.1440),
]


@pytest.mark.parametrize(("name", "size", "params", "gmacs"), TARGETS, ids=[t[0] for t in TARGETS])
def test_targets_on_meta(name, size, params, gmacs):
    with torch.device("meta"):
        model = _build(name)
    c = count_macs(model, size)
    assert count_params(model) == params
    assert abs(round(c.macs / 1e9, 4) - gmacs) < 5e-5
    assert c.uncounted == {} and c.macs_of("") == c.macs


def test_meta_equals_real_and_infers_chans():
    model = timm.create_model("mobilenetv2_050", pretrained=False)
    real = count_macs(model, (128, 96))
    meta = count_macs(model, (128, 96), device="meta")
    assert real == meta
    assert next(model.parameters()).device.type == "cpu"
    with torch.device("meta"):
        gray = timm.create_model("resnet18", pretrained=False, in_chans=1)
    assert gray.pretrained_cfg["input_size"][0] == 3 and get_in_chans(gray) == 1


def test_mobilevit_fused_attention_counted_on_cpu():
    torch.manual_seed(0)
    fused = timm.create_model("mobilevit_s", pretrained=False)
    c = count_macs(fused, 256)
    sdpa = c.per_op["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert abs(c.macs / 1e9 - 2.0008) < 5e-5 and c.uncounted == {}
    saved = timm_layer_config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    try:
        with torch.device("meta"):
            unfused = timm.create_model("mobilevit_s", pretrained=False)
    finally:
        timm_layer_config._USE_FUSED_ATTN = saved
    assert timm.layers.use_fused_attn() == bool(saved)
    u = count_macs(unfused, 256)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" not in u.per_op
    assert u.macs == c.macs and u.per_module == c.per_module
    assert u.per_op["aten.bmm"] == sdpa


def test_pe_is_counted_as_an_add_not_a_correlation():
    """MACs of a ParC with PE equal those without PE (the papers add the PE); the function is unchanged."""
    from parc_surgery.ops.functional import unfolded_pe

    torch.manual_seed(0)
    with_pe = torch.nn.Sequential(ParC(8, 12, "height", pe=True, impl="spatial"))
    no_pe = torch.nn.Sequential(ParC(8, 12, "height", pe=False, impl="spatial"))
    x = torch.randn(2, 8, 12, 5)
    with torch.no_grad():
        folded = with_pe(x)
        with unfolded_pe():
            unfolded = with_pe(x)
    assert torch.allclose(folded, unfolded, atol=1e-5)
    a = count_macs(with_pe, (12, 5), in_chans=8)
    b = count_macs(no_pe, (12, 5), in_chans=8)
    assert a.macs == b.macs == 8 * 12 * 12 * 5  # C * N taps * N outputs * W columns
