"""torch.compile: every bundled conversion compiles with ``fullgraph=True`` (no graph break) in eval and training
and matches eager at two input sizes; ParC-Net's inference fast path is what the compiled graph runs.

Whole models are captured by Dynamo with ``fullgraph=True`` (a graph break raises) and run through the
captured graph (backend ``eager``: Dynamo's graph, no code generation), or through AOT autograd (backend
``aot_eager``: functionalization, the custom FFT operator's fake and autograd kernels) for training.
Inductor's code generation is checked on ParC-Net-XXS and on a ParC ConvNet with the FFT path in training
(slow: a few minutes of C++ compilation on 2 cores).
"""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
from torch import nn

import parc_surgery  # noqa: F401  (registers the parc* timm models)
from parc_surgery.blocks import _metaformer_eval as fe
from parc_surgery.blocks.parc_split import ParCSplit
from parc_surgery.ops import ParC, choose_impl, use_impl

RTOL = 1e-5  # compiled vs eager, relative to the largest output (the bound)

# the bundled conversions (the registered timm models), with two input sizes each
MODELS = {
    "parcnet_s": ({}, (64, 96)),
    "parc_mobilevit_xs": ({}, (64, 96)),
    "parc_mobilevit_xxs": ({}, (64, 96)),
    "parc_resnet50": ({}, (64, 80)),
    "parc_mobilenetv2_100": ({}, (64, 80)),
    "parc_convnext_xt": ({}, (64, 80)),
    "parc_deit_tiny_patch16_224": ({"img_size": 64, "dynamic_img_size": True}, (64, 96)),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo caches compiled graphs per code object: the parcnet_* models share timm's ``ByobNet.forward``, so
    without a reset their graphs (per model, size and grad mode) pile up against the recompile limit (8)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(name: str, train: bool) -> nn.Module:
    torch.manual_seed(0)
    kwargs, _ = MODELS[name]
    m = timm.create_model(name, num_classes=10, **kwargs)
    for mod in m.modules():  # compiled and eager dropout draw different masks: compare without dropout
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m.train(train)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _grads(m: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return out


def _check_grads(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys() and ref
    top = max(float(g.abs().max()) for g in ref.values())
    for k, g in ref.items():
        # per tensor, relative to its own size, with a floor at 1e-2 of the largest gradient. A tensor whose gradient
        # is exactly zero in exact arithmetic (a conv bias feeding a training-mode BatchNorm) holds only the float32
        # rounding of a sum of terms the size of the other gradients, in both runs (eager ~1e-9, inductor ~1e-7 for
        # a largest gradient ~0.1): its scale is the largest gradient
        size = float(g.abs().max())
        scale = top if size <= 1e-6 * top else max(size, 1e-2 * top)
        err = float((got[k] - g).abs().max())
        assert err <= RTOL * scale, (k, err, size)


def _train_step(compiled, m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward through the compiled model and through eager; checks the gradients agree and returns
    both outputs (detached)."""
    y = compiled(x)
    y.square().mean().backward()
    got = _grads(m)
    ref = m(x)
    ref.square().mean().backward()
    _check_grads(got, _grads(m))
    return y.detach(), ref.detach()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bundled_conversion_compiles_fullgraph_and_matches_eager(name, train):
    m = _model(name, train)
    compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)  # a graph break raises
    for size in MODELS[name][1]:
        x = torch.randn(2, 3, size, size)
        if train:
            y, ref = _train_step(compiled, m, x)
        else:
            with torch.no_grad():
                y, ref = compiled(x), m(x)
        assert y.shape == (2, 10)
        assert _rel(y.detach(), ref.detach()) <= RTOL


def test_parcnet_training_through_aot_autograd_with_the_fft_path():
    # float64: AOT autograd decomposes the training-mode BatchNorms into other float ops than eager's kernel, which
    # in float32 moves the deepest gradients (the stem's) by ~4e-5 relative; in float64 any real error would show
    m = _model("parc_mobilevit_xxs", True).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with use_impl(m, "fft"):
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
        compiled(x).square().mean().backward()
        got = _grads(m)
        m(x).square().mean().backward()
    _check_grads(got, _grads(m))


def test_the_compiled_graph_runs_the_inference_fast_path(monkeypatch):
    folds = []
    real = fe.fold
    monkeypatch.setattr(fe, "fold", lambda *a, **k: folds.append(1) or real(*a, **k))
    m = _model("parc_mobilevit_xxs", False)
    x = torch.randn(1, 3, 64, 64)

    def batch_norms(ctx) -> int:
        nodes = []

        def backend(gm, inputs):
            nodes.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm

        torch._dynamo.reset()
        with ctx, torch.no_grad():
            torch.compile(m, backend=backend, fullgraph=True)(x)
        return sum("batch_norm" in t for t in nodes)

    fast = batch_norms(contextlib.nullcontext())
    assert len(folds) >= 9  # every one of ParC-Net-XXS's 9 MetaFormer blocks took the folded path
    assert not fe._CACHE.get(m.stages[2][1].blocks[0])  # no eager cache entry was made while tracing
    assert batch_norms(fe.reference_forward()) - fast == 5 * 9  # the 5 BatchNorms of each block folded away


def test_compiled_inference_forms_and_exports_stay_portable():
    """Compiled for inference (no freezing): each MetaFormer block's two FFN convs run as oneDNN's channels-last 1x1
    convolution and each ParC-Net block's grouped projection conv as a multiply and a sum. With inductor's
    ``freezing`` (which prepacks plain convolutions itself), inside ``portable_form`` and under ``torch.export``
    the graph holds plain convolutions only (exporters and edge runtimes have no oneDNN op)."""
    import torch._inductor.config as inductor_config

    from parc_surgery.ops import portable_form

    m = _model("parc_mobilevit_xs", False)  # (its projections have one output per group, as ParC-Net-S's)
    x = torch.randn(1, 3, 64, 64)

    def targets(ctx=None) -> list[str]:
        nodes: list[str] = []

        def backend(gm, inputs):
            nodes.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm

        torch._dynamo.reset()
        with ctx or contextlib.nullcontext(), torch.no_grad():
            y = torch.compile(m, backend=backend, fullgraph=True)(x)
            assert _rel(y, m(x)) <= RTOL
        return nodes

    def count(nodes: list[str], what: str) -> int:
        return sum(what in t for t in nodes)

    if not fe.onednn_ok(x):
        pytest.skip("this PyTorch build has no oneDNN (the plain form is what runs: covered by the other tests)")
    plain, portable = targets(), targets(portable_form())
    assert count(plain, "_convolution_pointwise") == 2 * 9  # 9 MetaFormer blocks
    assert count(portable, "_convolution_pointwise") == 0
    # portable: per block the 2 FFN and 2 channel-attention convs (the oneDNN form runs the latter as linear on the
    # pooled vector) and the 2 ParC calls of its constant map (shifted multiply-adds when compiled for inference),
    # and the 3 ParC-Net blocks' projections: 9 * 6 + 3 more convolutions
    assert count(portable, "conv2d") - count(plain, "conv2d") == 9 * 6 + 3
    with inductor_config.patch(freezing=True):  # (the config's own patch: monkeypatch's undo deletes the entry)
        frozen = targets()
    assert count(frozen, "_convolution_pointwise") == 0 and count(frozen, "conv2d") > count(plain, "conv2d")
    with torch.no_grad():
        exported = torch.export.export(m, (x,))
    ops = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert ops and not any("mkldnn" in t for t in ops)


def test_compiled_parc_resnet50_runs_its_dense_parc_as_convolutions():
    """ParC-ResNet50 at 224x224: eager ``auto`` runs its dense ParC layers on 14-long lines through the FFT
    operator; compiled for inference every dense ParC is a convolution (faster there), with the same outputs."""
    torch.manual_seed(0)
    m = timm.create_model("parc_resnet50", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    nodes: list[str] = []

    def backend(gm, inputs):
        nodes.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        y = torch.compile(m, backend=backend, fullgraph=True)(x)
        with use_impl(m, "fft"):  # what eager auto picks at these lengths: the FFT operator
            ref = m(x)
    assert choose_impl(14, axis="height", channels=256, dense=True, dtype=torch.float32, grad=False) == "fft"
    assert nodes and not any("fft_correlate" in t for t in nodes)
    assert _rel(y, ref) <= RTOL


def test_compiled_model_follows_weight_changes():
    """No Python-side cache in the compiled graph: an in-place weight edit is seen by the next call."""
    m = _model("parc_mobilevit_xxs", False)
    compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = compiled(x)
        m.stages[3][1].blocks[0].parc_1_h.weight.mul_(-3.0)
        m.stages[3][1].blocks[0].norm_1.running_var.mul_(4.0)
        after, ref = compiled(x), m(x)
    assert _rel(after, before) > 1e-3 and _rel(after, ref) <= RTOL


@pytest.mark.slow
def test_inductor_parcnet_eval_two_sizes():
    m = _model("parc_mobilevit_xxs", False)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for size in (64, 96):
            x = torch.randn(1, 3, size, size)
            assert _rel(compiled(x), m(x)) <= RTOL


@pytest.mark.slow
def test_inductor_convnet_training_with_fft_parc():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        ParCSplit(16, (8, 8), dense=True, impl="fft"),
        ParC(16, 8, "width", impl="fft"),
        ParCSplit(16, (8, 8), impl="spatial"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).train()
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    for size in (8, 12):
        y, ref = _train_step(compiled, m, torch.randn(2, 3, size, size))
        assert _rel(y, ref) <= RTOL
