"""The ParC operator against an independent float64 reference: both paths, resizing, gradients, tracing, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx
from torch import nn

from parc_surgery import ConfigError, ParC
from parc_surgery.ops import choose_impl, parc_conv, parc_fft, parc_spatial, resize_kernel
from parc_surgery.ops.parc import _TAPS_MAX, FFT_MIN_LENGTH, FFT_MIN_LENGTH_DENSE, resolve_impl

SIZES = (1, 2, 3, 7, 8, 14, 28, 56)


# ----- independent references (written here, not taken from the package) -----
def ref_interp(w: torch.Tensor, n: int) -> torch.Tensor:
    """1-D linear interpolation with align_corners=True along the last dim: out[i] at pos i*(K-1)/(n-1)."""
    k = w.shape[-1]
    out = torch.empty(*w.shape[:-1], n, dtype=w.dtype)
    for i in range(n):
        pos = 0.0 if n == 1 else i * (k - 1) / (n - 1)
        lo = min(math.floor(pos), k - 1)
        hi = min(lo + 1, k - 1)
        frac = pos - lo
        out[..., i] = (1 - frac) * w[..., lo] + frac * w[..., hi]
    return out


def ref_parc(x, w, pe, b, axis, dense):
    """y[i] = sum_k w[k] * (x + pe)[(i + k) mod N] + b as a sum of torch.roll's, in float64.

    x (B, C, H, W); w (C_out, C_in or 1, N) already at the axis length; pe (C, N) or None; b (C_out,) or None.
    """
    x, w = x.double(), w.double()
    dim = 2 if axis == "height" else 3
    n = x.shape[dim]
    if pe is not None:
        pe = pe.double()
        x = x + (pe[None, :, :, None] if axis == "height" else pe[None, :, None, :])
    y = torch.zeros(x.shape[0], w.shape[0], *x.shape[2:], dtype=torch.float64)
    for k in range(n):
        xs = torch.roll(x, shifts=-k, dims=dim)  # xs[..., i] = x[..., (i + k) % n]
        if dense:
            y += torch.einsum("oc,bchw->bohw", w[:, :, k], xs)
        else:
            y += w[:, 0, k].view(1, -1, 1, 1) * xs
    if b is not None:
        y += b.double().view(1, -1, 1, 1)
    return y


def module_ref(m: ParC, x: torch.Tensor) -> torch.Tensor:
    """The reference output of module ``m`` for ``x``: stored kernel/PE resized with ``ref_interp``."""
    n = x.shape[2] if m.axis == "height" else x.shape[3]
    w = ref_interp(m.weight.detach().double().flatten(2), n)
    pe = None if m.pe is None else ref_interp(m.pe.detach().double().reshape(m.channels, -1), n)
    b = None if m.bias is None else m.bias.detach()
    return ref_parc(x, w, pe, b, m.axis, m.dense)


def make(channels, k, axis, *, dense=False, pe=True, bias=True, impl="spatial", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = ParC(channels, k, axis, dense=dense, pe=pe, bias=bias, impl=impl, pe_init="normal").to(dtype)
    return m


# ----- agreement with the reference -----
@pytest.mark.parametrize("dense", [False, True], ids=["dw", "dense"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("impl", ["spatial", "fft"])
def test_matches_reference(impl, axis, n, dense):
    channels = 2 if dense and n >= 28 else 3
    other = n + 3 if n < 28 else 20  # a non-square map: the other axis has its own length
    cases = [  # (batch, axis length, other length, pe, bias)
        (1, n, other, True, False),
        (4, n, n, False, True),
    ]
    if n == 14:
        cases.append((2, 14, 20, True, True))  # 14x20 (height) / 20x14 (width)
    for batch, length, other_len, pe, bias in cases:
        shape = (batch, channels, length, other_len) if axis == "height" else (batch, channels, other_len, length)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            m = make(channels, 5, axis, dense=dense, pe=pe, bias=bias, impl=impl, dtype=dtype, seed=n)
            torch.manual_seed(1)
            x = torch.randn(shape, dtype=dtype)
            y = m(x)
            assert y.shape == x.shape and y.dtype == dtype
            err = (y.double() - module_ref(m, x)).abs().max().item()
            assert err < tol, f"{impl} {axis} N={n} {shape} pe={pe} bias={bias} {dtype}: max err {err:.3g}"


@pytest.mark.parametrize("impl", ["spatial", "fft"])
@pytest.mark.parametrize("axis", ["height", "width"])
def test_no_grad_eval_and_channels_last_paths(axis, impl):
    # the inference code paths (in-place adds, per-image GEMMs for long lines, the cache) and strided inputs
    for n in (7, 8, 9, 31, 32, 56):
        for pe, bias in ((True, True), (False, True), (False, False)):
            m = make(2, 6, axis, pe=pe, bias=bias, impl=impl, dtype=torch.float32, seed=n)
            x = torch.randn(3, 2, n, 5) if axis == "height" else torch.randn(3, 2, 5, n)
            r = module_ref(m, x)
            with torch.no_grad():
                assert (m(x).double() - r).abs().max() < 1e-5
                assert (m(x.to(memory_format=torch.channels_last)).double() - r).abs().max() < 1e-5
                m.eval()
                assert (m(x).double() - r).abs().max() < 1e-5
                assert (m(x).double() - r).abs().max() < 1e-5  # from the cache
            assert (m(x.to(memory_format=torch.channels_last)).double() - r).abs().max() < 1e-5


@pytest.mark.parametrize("axis", ["height", "width"])
def test_non_square_sizes_each_axis_from_its_own_dimension(axis):
    m = make(3, 6, axis, impl="spatial")
    mf = make(3, 6, axis, impl="fft")
    for h, w in ((14, 20), (20, 14), (5, 1), (1, 9), (40, 4), (4, 40)):
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        r = module_ref(m, x)
        assert (m(x) - r).abs().max() < 1e-10
        assert (mf(x) - r).abs().max() < 1e-10


def test_functional_forms_match_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    for axis, n in (("height", 9), ("width", 6)):
        for dense in (False, True):
            k_shape = (n, 1) if axis == "height" else (1, n)
            w = torch.randn(3, 3 if dense else 1, *k_shape, dtype=torch.float64)
            b = torch.randn(3, dtype=torch.float64)
            r = ref_parc(x, w.flatten(2), None, b, axis, dense)
            assert (parc_spatial(x, w, b, axis, dense) - r).abs().max() < 1e-10
            assert (parc_fft(x, w, b, axis, dense) - r).abs().max() < 1e-10
            pe = torch.randn(1, 3, *k_shape, dtype=torch.float64)
            rp = ref_parc(x, w.flatten(2), pe.reshape(3, n), b, axis, dense)
            for impl in ("spatial", "fft"):
                assert (parc_conv(x, w, pe, b, axis, dense, impl) - rp).abs().max() < 1e-10


def test_not_centred_offset_zero_convention():
    # a one-hot kernel at tap k shifts the input by k: y[i] = x[(i + k) mod N]
    x = torch.arange(7, dtype=torch.float64).view(1, 1, 7, 1)
    for impl in ("spatial", "fft"):
        m = ParC(1, 7, "height", pe=False, bias=False, impl=impl).double()
        with torch.no_grad():
            m.weight.zero_()
            m.weight[0, 0, 2, 0] = 1.0
        assert torch.allclose(m(x).flatten(), torch.tensor([2.0, 3, 4, 5, 6, 0, 1], dtype=torch.float64))


def test_unfolded_pe_context_is_the_same_function():
    from parc_surgery.ops.functional import unfolded_pe

    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    for impl in ("spatial", "fft"):
        m = make(3, 5, "height", impl=impl)
        r = module_ref(m, x)
        with unfolded_pe():
            assert (m(x) - r).abs().max() < 1e-10
            m.eval()
            with torch.no_grad():
                assert (m(x) - r).abs().max() < 1e-10
        with torch.no_grad():
            assert (m(x) - r).abs().max() < 1e-10  # the folded entry is kept apart in the cache


# ----- kernel / PE resizing -----
def test_stored_kernel_used_unchanged_at_base_length():
    m = make(3, 9, "height")
    assert resize_kernel(m.weight, 9, "height") is m.weight
    assert resize_kernel(m.pe, 9, "height") is m.pe
    x = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    r = ref_parc(x, m.weight.detach().flatten(2), m.pe.detach().reshape(3, 9), m.bias.detach(), "height", False)
    for impl in ("spatial", "fft"):
        m.impl = impl
        assert (m(x) - r).abs().max() < 1e-12


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 9, 20])
def test_resize_matches_linear_interpolation_formula(axis, n):
    torch.manual_seed(0)
    k_shape = (7, 1) if axis == "height" else (1, 7)
    w = torch.randn(4, 1, *k_shape, dtype=torch.float64)
    pe = torch.randn(1, 4, *k_shape, dtype=torch.float64)
    got_w = resize_kernel(w, n, axis)
    got_pe = resize_kernel(pe, n, axis)
    assert got_w.shape == (4, 1, n, 1) if axis == "height" else (4, 1, 1, n)
    assert torch.allclose(got_w.flatten(2), ref_interp(w.flatten(2), n), atol=1e-12)
    assert torch.allclose(got_pe.reshape(4, n), ref_interp(pe.reshape(4, 7), n), atol=1e-12)
    # end taps are kept when n > 1. The first exactly: output 0 maps to source 0 with weight 0 on its neighbour.
    # The last to rounding only: its source index (k-1)/(n-1)*(n-1) may round just below k-1, making it a blend
    # with weight 1 - ~1e-16 on the last tap (e.g. float32 k=2, n=42): its error is ~1e-16 * |tap difference|.
    if n > 1:
        assert torch.equal(got_w.flatten(2)[..., 0], w.flatten(2)[..., 0])
        torch.testing.assert_close(got_w.flatten(2)[..., -1], w.flatten(2)[..., -1], rtol=1e-14, atol=1e-14)


def test_state_dict_from_another_base_length_is_resampled():
    src = make(4, 7, "width", dense=False)
    dst = ParC(4, 14, "width", pe_init="normal").double()
    dst.load_state_dict(src.state_dict())
    assert dst.weight.shape == (4, 1, 1, 14) and dst.pe.shape == (1, 4, 1, 14)
    assert torch.allclose(dst.weight.flatten(2), ref_interp(src.weight.detach().flatten(2), 14), atol=1e-12)
    assert torch.allclose(dst.pe.reshape(4, 14), ref_interp(src.pe.detach().reshape(4, 7), 14), atol=1e-12)
    assert torch.equal(dst.bias, src.bias)
    # at N = 14 both modules use the same length-14 kernel
    x = torch.randn(2, 4, 3, 14, dtype=torch.float64)
    assert (dst(x) - src(x)).abs().max() < 1e-12
    # a mismatch in anything but the length is still an error
    with pytest.raises(RuntimeError, match="size mismatch"):
        ParC(5, 14, "width").double().load_state_dict(src.state_dict())


# ----- gradients -----
@pytest.mark.parametrize("dense", [False, True], ids=["dw", "dense"])
@pytest.mark.parametrize("axis", ["height", "width"])
def test_gradients_of_both_paths_agree(axis, dense):
    grads = {}
    for impl in ("spatial", "fft"):
        m = make(3, 6, axis, dense=dense, impl=impl)
        torch.manual_seed(5)
        x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, 3, 7, 9, dtype=torch.float64)
        m(x).backward(g)
        grads[impl] = [x.grad] + [p.grad for p in (m.weight, m.pe, m.bias)]
    for a, b in zip(grads["spatial"], grads["fft"]):
        assert a is not None and a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("dense", [False, True], ids=["dw", "dense"])
@pytest.mark.parametrize("impl", ["spatial", "fft"])
def test_gradcheck(impl, dense):
    for axis, shape in (("height", (2, 2, 5, 3)), ("width", (1, 2, 3, 4))):
        m = make(2, 3, axis, dense=dense, impl=impl)  # K=3 resized to 5 / 4: interpolation is in the graph
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

        def f(x, w, pe, b, axis=axis):
            return parc_conv(x, w, pe, b, axis, dense, impl)

        assert torch.autograd.gradcheck(f, (x, m.weight, m.pe, m.bias), fast_mode=True)


@pytest.mark.parametrize("dense", [False, True], ids=["dw", "dense"])
@pytest.mark.parametrize("impl", ["spatial", "fft"])
def test_global_receptive_field(impl, dense):
    # the output at one pixel depends on every pixel of its column (height) / row (width), and on nothing else
    for axis in ("height", "width"):
        m = make(3, 8, axis, dense=dense, impl=impl)
        with torch.no_grad():
            m.weight.copy_(torch.rand_like(m.weight) + 0.5)  # no zero taps
        x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        m(x)[0, 1, 2, 5].backward()
        g = x.grad[0].abs()
        line = g[:, :, 5] if axis == "height" else g[:, 2, :]  # (C, 8)
        if dense:
            assert (line > 0).all()
        else:
            assert (line[1] > 0).all() and (line[[0, 2]] == 0).all()
        # nothing outside that column / row: those gradient entries are exactly zero (no float sum compared)
        outside = torch.ones_like(g, dtype=torch.bool)
        if axis == "height":
            outside[:, :, 5] = False
        else:
            outside[:, 2, :] = False
        assert (g[outside] == 0).all()


# ----- tracing -----
def _toy(impl="auto"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        ParC(4, 8, "height", impl=impl),
        nn.ReLU(),
        ParC(4, 8, "width", dense=True, impl=impl),
    ).eval()


@pytest.mark.parametrize("impl", ["spatial", "fft", "auto"])
def test_fx_symbolic_trace_works_at_other_sizes(impl):
    model = _toy(impl)
    gm = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_function" and "_parc_forward" in str(n.target) for n in gm.graph.nodes)
    for size in ((8, 8), (12, 5), (60, 64)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.allclose(gm(x), model(x), atol=1e-5)
        assert torch.allclose(gm(x), model(x), atol=1e-5)  # with grad (no cache)


def test_timm_leaf_registry():
    from timm.layers import _fx

    assert _fx.is_notrace_module(ParC)
    model = _toy()

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return _fx.is_notrace_module(type(m)) or super().is_leaf_module(m, qualname)

    gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3"]
    fe = _fx.create_feature_extractor(model, return_nodes={"1": "h", "3": "out"})
    for size in ((8, 8), (16, 10)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref = model(x)
            assert torch.allclose(gm(x), ref, atol=1e-6)
            assert torch.allclose(fe(x)["out"], ref, atol=1e-6)
            assert fe(x)["h"].shape == (1, 4, *size)


# ----- errors -----
def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda: ParC(4, 8, "rows"), r"axis must be one of \('height', 'width'\).*'rows'"),
        (lambda: ParC(4, 8, impl="fast"), r"impl must be one of \('auto', 'spatial', 'fft'\).*'fast'"),
        (lambda: ParC(0, 8), r"channels must be a positive int.*0"),
        (lambda: ParC(4, 0), r"kernel_size must be a positive int.*0"),
        (lambda: ParC(4, 8, pe_init="zeros"), r"pe_init.*'zeros'"),
    ],
)
def test_bad_construction(make_bad, match):
    with pytest.raises(ConfigError, match=match):
        make_bad()


@pytest.mark.parametrize("impl", ["spatial", "fft", "auto"])
def test_bad_input(impl):
    m = ParC(4, 8, "width", impl=impl)
    with pytest.raises(ConfigError, match=r"input has 3 channels.*channels=4"):
        m(torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"must be 4-D.*\(4, 8, 8\)"):
        m(torch.randn(4, 8, 8))
    with pytest.raises(ConfigError, match=r"spatial size \(8, 0\) is empty"):
        m(torch.randn(1, 4, 8, 0))
    m.eval()
    with torch.no_grad(), pytest.raises(ConfigError, match=r"input has 3 channels.*channels=4"):
        m(torch.randn(1, 3, 8, 8))  # the cached path checks too


def test_bad_impl_or_axis_at_call_time():
    m = ParC(4, 8)
    m.impl = "winograd"
    with pytest.raises(ConfigError, match=r"impl must be one of.*'winograd'"):
        m(torch.randn(1, 4, 8, 8))
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 8, 1)
    with pytest.raises(ConfigError, match=r"axis must be one of.*'depth'"):
        parc_spatial(x, w, None, "depth")
    with pytest.raises(ConfigError, match=r"axis must be one of.*'depth'"):
        parc_fft(x, w, None, "depth")
    with pytest.raises(ConfigError, match=r"impl must be one of \('spatial', 'fft', 'conv', 'taps'\).*'auto'"):
        parc_conv(x, w, None, None, "height", False, "auto")
    with pytest.raises(ConfigError, match=r"axis must be one of.*'diagonal'"):
        choose_impl(64, axis="diagonal")


# ----- dtypes and impl choice -----
def test_choose_impl_uses_measured_crossover():
    for (axis, grad), n in FFT_MIN_LENGTH.items():
        assert choose_impl(n, axis=axis, grad=grad) == "fft"
        assert choose_impl(n - 1, axis=axis, grad=grad) == "spatial"
    assert choose_impl(FFT_MIN_LENGTH_DENSE, dense=True) == "fft"
    assert choose_impl(FFT_MIN_LENGTH_DENSE - 1, dense=True) == "spatial"
    for dt in (torch.bfloat16, torch.float16):
        assert choose_impl(10_000, dtype=dt) == "spatial"
        assert choose_impl(10_000, dtype=dt, dense=True) == "spatial"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["spatial", "auto", "fft"])
def test_half_precision_inputs(impl, dtype):
    m32 = make(4, 8, "height", impl="spatial", dtype=torch.float32)
    m = make(4, 8, "height", impl=impl, dtype=torch.float32)
    x = torch.randn(2, 4, 12, 6)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    tol = 0.05 * m32(x).abs().max().item()
    assert (y.float() - m32(x)).abs().max() < tol
    m_half = make(4, 8, "height", impl=impl, dtype=dtype)  # half-precision parameters as well
    assert m_half(x.to(dtype)).dtype == dtype
    assert (m_half(x.to(dtype)).float() - m32(x)).abs().max() < 2 * tol


@pytest.mark.parametrize("grad", [False, True])
def test_auto_picks_per_call(grad):
    m = make(2, 8, "width", impl="auto", dtype=torch.float32)
    threshold = FFT_MIN_LENGTH[("width", grad)]
    with torch.set_grad_enabled(grad):
        for n in (threshold - 1, threshold):
            x = torch.randn(1, 2, 3, n)
            m.impl = choose_impl(n, axis="width", grad=grad)
            y_chosen = m(x)
            m.impl = "auto"
            assert torch.equal(m(x), y_chosen)
    m.impl = "auto"
    d = make(2, 8, "height", impl="auto", dense=True, dtype=torch.float32)
    x = torch.randn(1, 2, FFT_MIN_LENGTH_DENSE, 3)
    d.impl = "fft"
    y_fft = d(x)
    d.impl = "auto"
    assert torch.equal(d(x), y_fft)


# ----- eval-mode cache -----
def test_cache_eval_repeats_and_invalidation():
    m = make(3, 8, "height", impl="spatial").eval()
    x = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    with torch.no_grad():
        y1 = m(x)
        y2 = m(x)
        assert torch.equal(y1, y2) and len(m._kernel_cache) == 1
        m(torch.randn(1, 3, 6, 4, dtype=torch.float64))  # another N: its own entry
        assert len(m._kernel_cache) == 2
        for p in (m.weight, m.pe, m.bias):  # in-place update of each parameter
            p.mul_(1.5)
            y3 = m(x)
            assert not torch.allclose(y3, y2)
            assert (y3 - module_ref(m, x)).abs().max() < 1e-10
            y2 = y3
        m.weight.data.mul_(2.0)  # .data bypasses the version counter: documented, clear_cache() fixes it
        m.clear_cache()
        assert (m(x) - module_ref(m, x)).abs().max() < 1e-10


def test_cache_not_used_in_training_or_with_grad():
    m = make(3, 8, "width", impl="fft").eval()
    x = torch.randn(2, 3, 4, 10, dtype=torch.float64)
    with torch.no_grad():
        m(x)
    m.train()
    assert len(m._kernel_cache) == 0
    with torch.no_grad():
        m.weight.add_(0.1)
        assert (m(x) - module_ref(m, x)).abs().max() < 1e-10
        assert len(m._kernel_cache) == 0
    # eval with grad: gradients flow and equal those of training mode
    m.eval()
    y = m(x)
    assert len(m._kernel_cache) == 0
    y.square().sum().backward()
    g_eval = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.train()
    m(x).square().sum().backward()
    for a, p in zip(g_eval, m.parameters()):
        assert a.abs().max() > 0 and torch.allclose(a, p.grad)


def test_cache_with_frozen_parameters_and_load_state_dict():
    m = make(3, 8, "height", impl="fft").eval().requires_grad_(False)
    x = torch.randn(1, 3, 8, 5, dtype=torch.float64, requires_grad=True)
    y = m(x)  # grad enabled but parameters frozen: cached, still differentiable w.r.t. x
    assert len(m._kernel_cache) == 1
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    other = make(3, 8, "height", impl="fft", seed=9)
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert (m(x) - module_ref(other, x)).abs().max() < 1e-10


def test_cache_entries_from_inference_mode_do_not_leak_into_autograd():
    m = make(3, 8, "height", impl="spatial").eval().requires_grad_(False)
    x = torch.randn(1, 3, 8, 5, dtype=torch.float64)
    with torch.inference_mode():
        y_inf = m(x)
    xg = x.clone().requires_grad_(True)
    y = m(xg)  # must not reuse inference tensors (they cannot be saved for backward)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inf) and xg.grad.abs().max() > 0


def test_cache_survives_copy_dtype_and_state_dict_round_trip():
    m = make(3, 8, "width", impl="spatial").eval()
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        c = copy.deepcopy(m)
        assert len(c._kernel_cache) == 0
        assert torch.equal(c(x), y)
        c.weight.mul_(-1)
        assert torch.equal(m(x), y)  # the copy does not share parameters or cache
        assert set(m.state_dict()) == {"weight", "pe", "bias"}
        m.float()
        assert len(m._kernel_cache) == 0
        y32 = m(x.float())
        assert y32.dtype == torch.float32 and (y32.double() - y).abs().max() < 1e-5


def test_meta_device_shape_only():
    m = ParC(6, 8, "width", impl="auto", device="meta", dense=True)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        for size in ((8, 8), (5, 130)):
            with torch.no_grad():
                y = m(torch.empty(2, 6, *size, device="meta"))
            assert y.shape == (2, 6, *size) and y.is_meta
            assert m(torch.empty(2, 6, *size, device="meta")).is_meta
        assert len(m._kernel_cache) == 0


def test_torch_compile():
    m = make(3, 8, "height", impl="auto", dtype=torch.float32).eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 6)
    with torch.no_grad():
        assert torch.allclose(compiled(x), m(x), atol=1e-5)
    m.train()
    x.requires_grad_(True)
    y = compiled(x)
    y.sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().max() > 0


@pytest.mark.parametrize(("n", "grad", "form"), [(14, False, "conv"), (14, True, "fft"), (48, False, "fft")])
def test_compiled_dense_auto_form(n, grad, form):
    """A dense ParC on ``auto``: in a compiled graph for inference, lines up to 32 run as the reference convolution
    (faster there than the FFT operator, measured on ParC-ResNet50); with autograd, or longer lines, the FFT."""
    m = make(4, n, "height", dense=True, impl="auto", dtype=torch.float32).eval()
    assert choose_impl(n, axis="height", channels=4, dense=True, dtype=torch.float32, grad=grad) == "fft"
    nodes: list[str] = []

    def backend(gm, inputs):
        nodes.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    x = torch.randn(1, 4, n, 5, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = torch.compile(m, backend=backend, fullgraph=True)(x)
        ref = m(x)
    torch._dynamo.reset()
    # the same function either way: float32 rounding of different summation orders (FFT vs direct), relative
    assert float((y - ref).detach().abs().max() / ref.detach().abs().max()) < 1e-5
    assert any("fft_correlate" in t for t in nodes) == (form == "fft")
    assert any("conv2d" in t for t in nodes) == (form == "conv")


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_taps_form_is_the_correlation(axis, n):
    """The ``taps`` form (shifted multiply-adds) computes the portable ``conv`` form's function, PE and bias
    included; dense kernels fall back to the conv (float64: only summation order differs)."""
    for dense in (False, True):
        m = make(3, 5, axis, dense=dense)
        x = torch.randn(2, 3, n if axis == "height" else 4, 4 if axis == "height" else n, dtype=torch.float64)
        ref = parc_conv(x, m.weight, m.pe, m.bias, axis, dense, "conv")
        got = parc_conv(x, m.weight, m.pe, m.bias, axis, dense, "taps")
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12)


def _compiled_targets(m, x, *, grad=False):
    nodes: list[str] = []

    def backend(gm, inputs):
        nodes.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        y = torch.compile(m, backend=backend, fullgraph=True)(x)
        ref = m(x)
    torch._dynamo.reset()
    return nodes, y, ref


@pytest.mark.parametrize(
    ("n", "grad", "form"), [(14, False, "taps"), (_TAPS_MAX + 8, False, "conv"), (14, True, "spatial")]
)
def test_compiled_depthwise_auto_form(n, grad, form):
    """A depthwise ParC on ``auto`` in a compiled graph: for inference, lines up to ``_TAPS_MAX`` as shifted
    multiply-adds (no convolution, no GEMM: inductor fuses them), longer lines as the conv; with autograd the
    circulant GEMMs, as in eager."""
    m = make(4, n, "width", impl="auto", dtype=torch.float32).eval()
    x = torch.randn(1, 4, 5, n, requires_grad=grad)
    nodes, y, ref = _compiled_targets(m, x, grad=grad)
    # the same function: float32 rounding of different summation orders, relative to the output's scale
    assert float((y - ref).detach().abs().max() / ref.detach().abs().max()) < 1e-5
    has_conv = any("conv2d" in t for t in nodes)
    has_gemm = any(k in t for t in nodes for k in ("bmm", "matmul"))
    assert (has_conv, has_gemm) == {"taps": (False, False), "conv": (True, False), "spatial": (False, True)}[form]


def test_taps_never_in_exports_nor_chained_metaformer_steps():
    """``torch.export`` keeps the portable conv (exporters get slice + concat + depthwise conv), and
    ``taps=False`` (the ParC-MetaFormer's chained steps) keeps the conv in compiled inference."""
    m = make(4, 8, "height", impl="auto", dtype=torch.float32).eval()
    x = torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("conv2d" in t or "convolution" in t for t in targets)
    seen = []

    def backend(gm, inputs):
        return gm

    def f(x):
        seen.append(
            (
                resolve_impl("auto", x, m.weight, "height", False),
                resolve_impl("auto", x, m.weight, "height", False, taps=False),
            )
        )
        return x + 1

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(f, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert seen == [("taps", "conv")]
