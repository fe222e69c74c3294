"""The ParC-MetaFormer block's inference fast path computes what its reference forward computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from parc_surgery.blocks import _metaformer_eval as fe
from parc_surgery.blocks.metaformer import ParCMetaFormerBlock


def _block(dim=32, k=(8, 10), *, pe=True, impl="auto", seed=0, dtype=torch.float32) -> ParCMetaFormerBlock:
    torch.manual_seed(seed)
    blk = ParCMetaFormerBlock(dim, k, pe=pe, impl=impl, dtype=dtype)
    with torch.no_grad():  # non-trivial BN statistics and affines, so folding them is really tested
        for m in blk.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return blk.eval()


def _reference(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference forward: with autograd on (parameters require grad) the fast path never runs."""
    with torch.enable_grad():
        return blk(x).detach()


def _fast(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        y = blk(x)
    assert fe._CACHE.get(blk), "the fast path did not run"
    return y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("impl", ["spatial", "fft", "auto"])
@pytest.mark.parametrize("pe", [True, False])
@pytest.mark.parametrize("size", [(8, 10), (12, 7)])
def test_fast_path_matches_reference(impl, pe, size):
    blk = _block(pe=pe, impl=impl)
    x = torch.randn(2, 32, *size)
    ref = _reference(blk, x)
    assert _rel(_fast(blk, x), ref) < 1e-5


@pytest.mark.parametrize(("batch", "size", "fused"), [(1, (8, 10), True), (3, (12, 16), True), (3, (8, 10), False)])
def test_spatial_mixer_with_the_residual_in_the_gemm(monkeypatch, batch, size, fused):
    """Both steps on spatial: the fused per-image GEMMs (``_spatial_mixer``) run where measured faster."""
    calls = []
    real = fe._spatial_mixer
    monkeypatch.setattr(fe, "_spatial_mixer", lambda *a: calls.append(1) or real(*a))
    blk = _block(pe=True, impl="spatial")
    x = torch.randn(batch, 32, *size)
    assert _rel(_fast(blk, x), _reference(blk, x)) < 1e-5
    assert bool(calls) == fused


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "gemm"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ffn_forms_match_reference(monkeypatch, onednn, channels_last):
    """float32 on CPU: the FFN through oneDNN's channels-last 1x1 convolution (where the build has oneDNN), else
    as batched GEMMs; either form, and a channels-last input, give the reference's output."""
    x = torch.randn(3, 32, 8, 10)
    if onednn and not fe.onednn_ok(x):
        pytest.skip("this PyTorch build has no oneDNN")
    calls = []
    real = fe._ffn_onednn
    monkeypatch.setattr(fe, "_ffn_onednn", lambda *a: calls.append(1) or real(*a))
    if not onednn:
        monkeypatch.setattr(fe, "onednn_ok", lambda t: False)
    blk = _block(pe=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert _rel(_fast(blk, x), _reference(blk, x)) < 1e-5
    assert bool(calls) == onednn


def test_float64_and_mixed_impls_per_axis():
    blk = _block(dtype=torch.float64)
    for p in (blk.parc_1_h, blk.parc_2_h):
        p.impl = "fft"  # height on FFT, width on spatial
    for p in (blk.parc_1_w, blk.parc_2_w):
        p.impl = "spatial"
    x = torch.randn(1, 32, 9, 11, dtype=torch.float64)
    assert _rel(_fast(blk, x), _reference(blk, x)) < 1e-12


def test_cache_follows_parameter_and_buffer_changes():
    blk = _block()
    x = torch.randn(1, 32, 8, 10)
    before = _fast(blk, x)
    with torch.no_grad():
        blk.parc_2_w.weight.mul_(-2.0)  # in-place edit: version counter bump
    after = _fast(blk, x)
    assert _rel(after, before) > 1e-3
    assert _rel(after, _reference(blk, x)) < 1e-5
    state = copy.deepcopy(blk.state_dict())
    state["ffn.norm.running_var"].mul_(3.0)
    blk.load_state_dict(state)  # copies into the buffers in place
    assert _rel(_fast(blk, x), _reference(blk, x)) < 1e-5


def test_falls_back_when_a_submodule_is_swapped_or_hooked():
    blk = _block()
    x = torch.randn(1, 32, 8, 10)
    _fast(blk, x)
    blk.ffn.act = nn.GELU()  # not the layout the fold assumes: the reference forward must run
    with torch.inference_mode():
        y = blk(x)
    assert _rel(y, _reference(blk, x)) < 1e-6
    calls = []
    blk.ca.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        blk(x)
    assert calls == [1]  # hooks on submodules fire: the reference forward ran


def test_training_mode_and_deepcopy():
    blk = _block()
    x = torch.randn(2, 32, 8, 10)
    _fast(blk, x)
    twin = copy.deepcopy(blk)
    assert twin not in fe._CACHE  # the cache lives outside the module and is not copied
    assert _rel(_fast(twin, x), _reference(blk, x)) < 1e-5
    blk.train()
    with torch.no_grad():
        y = blk(x)  # batch statistics: differs from the eval output
    assert _rel(y, _reference(blk.eval(), x)) > 1e-3


def test_mac_counts_see_the_reference_ops():
    from parc_surgery.flops import count_macs

    blk = _block()
    on_cpu = count_macs(blk, (8, 10), in_chans=32, batch=2)  # eval, no grad, on the real device
    on_meta = count_macs(blk, (8, 10), in_chans=32, batch=2, device="meta")
    assert on_cpu.macs == on_meta.macs > 0
    assert on_cpu.per_module["parc_1_h"] == on_meta.per_module["parc_1_h"] > 0  # the ParC modules ran
    assert blk not in fe._CACHE  # counting never took the folded path


def test_reference_forward_context():
    blk = _block()
    x = torch.randn(1, 32, 8, 10)
    with torch.inference_mode(), fe.reference_forward():
        y = blk(x)
    assert blk not in fe._CACHE  # the folded path never ran
    torch.testing.assert_close(y, _reference(blk, x), atol=0, rtol=0)
    assert _rel(_fast(blk, x), y) < 1e-5  # and it is on again outside the context


def test_fx_traced_parcnet_runs_the_same_ops_as_eager():
    """timm's fx test compares traced and eager outputs with ``==``: the block is an fx leaf, so the traced graph
    calls the block and, in eval without grad, runs the same fast path on the same cached folds as eager: the
    very same computation, hence the exact comparison."""
    import timm
    from timm.layers import _fx as timm_fx
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    import parc_surgery  # noqa: F401  (registers parc_mobilevit_xxs)

    torch.manual_seed(0)
    model = timm.create_model("parc_mobilevit_xxs", num_classes=10).eval()
    kw = {"leaf_modules": timm_fx.get_notrace_modules(), "autowrap_functions": timm_fx.get_notrace_functions()}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw
    ).eval()
    assert any(type(m) is ParCMetaFormerBlock for m in fx_model.modules())  # called as a module, not inlined
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        yt = next(iter(fx_model(x).values()))
    assert fe._CACHE.get(model.stages[2][1].blocks[0])  # eager ran the fast path
    assert torch.equal(y, yt)


def test_no_import_circle_between_the_block_and_its_fast_path():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(fe))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.endswith("metaformer") for m in imported), imported
