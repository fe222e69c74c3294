"""timm's own model contract, run over every registered ``parc*`` model (issue 13).

The checks follow timm's ``tests/test_models.py`` (forward, backward, default cfg, ``features_only``,
``forward_intermediates``, fx forward / backward) at the small input sizes its helpers allow (a fixed-size
model runs at its own size). TorchScript is not covered: it is deprecated in torch 2.14 and out of scope.
On top of timm's checks: a ``features_only`` model carries its ParC blocks where the full published network
has them, for every ``out_indices`` and feature class.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import re

import pytest
import timm
import torch
from test_timm_models import NAMES  # the published names
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules, get_pretrained_cfg_value
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import parc_surgery  # noqa: F401  (registers the models)
from parc_surgery.ops import ParC

MODELS = timm.list_models("parc*")
NON_STD = ["parc_deit*"]  # timm's NON_STD_FILTERS: token models without the spatial feature API (its 'deit*')
CONV = [n for n in MODELS if not any(fnmatch.fnmatch(n, f) for f in NON_STD)]
FWD_SIZE = FFEAT_SIZE = FX_FWD_SIZE = 96  # timm: 384 / 96 / 128; smaller keeps the suite fast
BWD_SIZE = BWD_FX_SIZE = 64  # timm: 128


def test_every_published_model_is_covered():
    assert set(MODELS) == set(NAMES)


@pytest.mark.parametrize("name", MODELS)
def test_registered_cfg_matches_the_model(name):
    """timm's tests size inputs from the registry (``get_pretrained_cfg_value``), so it must tell the truth."""
    model = create(name)
    for key in ("input_size", "pool_size", "first_conv", "classifier", "fixed_input_size", "mean", "std"):
        assert get_pretrained_cfg_value(name, key) == model.pretrained_cfg.get(key), key
    assert (model.pretrained_cfg["pool_size"] is None) == (name not in CONV)
    assert bool(get_pretrained_cfg_value(name, "fixed_input_size")) == (name not in CONV)


@functools.cache
def _built(name: str, kwargs: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **dict(kwargs))


def create(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``: each conversion runs once per module, every test gets its own copy."""
    return copy.deepcopy(_built(name, tuple(sorted(kwargs.items()))))


def input_size(model: torch.nn.Module, target: int) -> tuple[int, int, int]:
    """timm's ``_get_input_size``: the cfg size, capped at ``target`` unless the model has a fixed input size."""
    cfg = model.pretrained_cfg
    size = cfg["input_size"]
    if cfg.get("fixed_input_size"):
        return size
    return tuple(min(x, target) for x in size) if max(size) > target else size


def _nchw(output_fmt: str = "NCHW"):
    return get_channel_dim(output_fmt), get_spatial_dim(output_fmt)


# ----------------------------------------------------------------------------------------------------------------------
# forward / backward


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model = create(name).eval()
    x = torch.randn(1, *input_size(model, FWD_SIZE))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1000) and not torch.isnan(y).any()
    model.set_grad_checkpointing()
    with torch.no_grad():
        y2 = model(x)
    # timm's tolerance: checkpointing reruns the same ops, possibly in another order of kernels
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name):
    model = create(name)  # timm builds it with num_classes=42: the same head, without a second conversion
    model.reset_classifier(42)
    model.train()
    x = torch.randn(2, *input_size(model, BWD_SIZE))
    y = model(x)
    y.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert y.shape == (2, 42) and not torch.isnan(y).any()


# ----------------------------------------------------------------------------------------------------------------------
# default cfgs


def _check_cfg_names(state, cfg):
    for c in (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]:
        assert c + ".weight" in state, f"classifier {c} not in the model"
    for fc in (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]:
        assert fc + ".weight" in state, f"first conv {fc} not in the model"


@pytest.mark.slow
@pytest.mark.parametrize("name", CONV)
def test_model_default_cfgs(name):
    model = create(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    _check_cfg_names(model.state_dict(), cfg)
    pool_size = cfg["pool_size"]
    assert pool_size is not None, "conv models declare their final feature map size"
    feat_axis, spatial = _nchw()
    x = torch.randn(1, *cfg["input_size"])  # pool_size is declared at the cfg size
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert (feats.shape[spatial[0]], feats.shape[spatial[1]]) == pool_size
        assert feats.shape[feat_axis] == model.num_features and pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        out = model(x)
        assert out.dim() == 4 and (out.shape[spatial[0]], out.shape[spatial[1]]) == pool_size
        bare = create(name, num_classes=0, global_pool="").eval()
        out = bare(x)
        assert out.dim() == 4 and (out.shape[spatial[0]], out.shape[spatial[1]]) == pool_size


@pytest.mark.parametrize("name", [n for n in MODELS if n not in CONV])
def test_model_default_cfgs_non_std(name):
    model = create(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    _check_cfg_names(model.state_dict(), cfg)
    assert cfg["fixed_input_size"] is True  # timm then feeds its own input size, never a smaller one
    x = torch.randn(1, *input_size(model, FWD_SIZE))
    assert x.shape[-2:] == (224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape
        out = create(name, num_classes=0).eval()(x)
        assert out.shape[-1] == model.num_features


# ----------------------------------------------------------------------------------------------------------------------
# features


def _check_features(model, outputs, x):
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    feat_axis, spatial = _nchw(getattr(model, "output_fmt", "NCHW"))
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[0] == x.shape[0] and o.shape[feat_axis] == c
        assert o.shape[spatial[0]] <= math.ceil(x.shape[-2] / r) + 1
        assert o.shape[spatial[1]] <= math.ceil(x.shape[-1] / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("name", CONV)
def test_model_forward_features(name):
    model = create(name, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    x = torch.randn(1, *input_size(model, FFEAT_SIZE))
    with torch.no_grad():
        _check_features(model, model(x), x)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates_features(name):
    model = create(name, features_only=True, feature_cls="getter").eval()
    x = torch.randn(1, *input_size(model, FFEAT_SIZE))
    with torch.no_grad():
        _check_features(model, model(x), x)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(name):
    model = create(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    x = torch.randn(1, *input_size(model, FFEAT_SIZE))
    feat_axis, spatial = _nchw()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(inter) == len(info.channels())
        for c, r, o in zip(info.channels(), info.reduction(), inter):
            assert o.shape[feat_axis] == c and not torch.isnan(o).any()
            assert o.shape[spatial[0]] <= math.ceil(x.shape[-2] / r) + 1
        # the same forward up to the last stage: timm's default allclose tolerance
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)


def _canonical(name: str) -> str:
    """A feature wrapper's module name as the full model's (``model.`` prefix, flattened ``stages_2``)."""
    name = re.sub(r"^model\.", "", name)
    return re.sub(r"^([A-Za-z]+(?:_[A-Za-z]+)*)_(\d+)(?=\.|$)", r"\1.\2", name)


def _expected_parc(full: torch.nn.Module, last_module: str) -> set[str]:
    """ParC layers of the full model up to the end of ``last_module`` (what a truncated network keeps)."""
    order = [n for n, _ in full.named_modules()]
    end = max(i for i, n in enumerate(order) if n == last_module or n.startswith(last_module + "."))
    return {n for i, (n, m) in enumerate(full.named_modules()) if isinstance(m, ParC) and i <= end}


PLACEMENT = [  # the default and getter cases share the models built for the tests above
    ("parc_resnet50", {"out_indices": (0, 1, 2)}),
    ("parc_resnet50", {}),
    ("parc_resnet50", {"feature_cls": "getter"}),
    ("parc_mobilenetv2_100", {}),
    ("parc_mobilenetv2_100", {"feature_cls": "getter"}),
    ("parcnet_s", {"out_indices": (0, 1, 2)}),
    ("parcnet_s", {"feature_cls": "getter"}),
    ("parc_convnext_xt", {}),
    ("parc_deit_tiny_patch16_224", {"feature_cls": "getter"}),
]


@pytest.mark.parametrize(("name", "kwargs"), PLACEMENT, ids=[f"{n}-{k}" for n, k in PLACEMENT])
def test_features_keep_the_published_parc_blocks(name, kwargs):
    full = create(name)
    feats = create(name, features_only=True, **kwargs)
    last_module = feats.feature_info.module_name()[-1]  # the deepest module an out_index asks for
    got = {_canonical(n) for n, m in feats.named_modules() if isinstance(m, ParC)}
    assert got == _expected_parc(full, last_module)
    if name == "parc_resnet50" and kwargs.get("out_indices") == (0, 1, 2):
        assert not got  # layer1 / layer2 stay plain, as in the published network
    if name == "parc_mobilenetv2_100" and not kwargs.get("out_indices"):
        assert {n.rsplit(".", 1)[0] for n in got} == {
            "blocks.3.2.conv_dw",
            "blocks.3.3.conv_dw",
            "blocks.4.2.conv_dw",
            "blocks.5.2.conv_dw",
        }


# ----------------------------------------------------------------------------------------------------------------------
# torch.fx (torchvision's feature extractor with timm's leaf modules, as timm's tests trace)


def _fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    tracer_kwargs = {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
        "param_shapes_constant": True,
    }
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        outputs = [n.name for n in nodes[0]._input_nodes]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(o)] for o in outputs]
    return create_feature_extractor(
        model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_fx(name):
    model = create(name).eval()
    x = torch.randn(1, *input_size(model, FX_FWD_SIZE))
    with torch.inference_mode():
        y = model(x)
        fx_y = torch.cat(tuple(_fx_model(model)(x).values()))
    # timm's check, exact: the traced graph must run the very ops the eager forward runs
    assert torch.all(fx_y == y), float((fx_y - y).abs().max())
    assert y.shape[0] == 1 and not torch.isnan(y).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_backward_fx(name):
    model = create(name)
    model.reset_classifier(42)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    fx = _fx_model(model, train=True)
    y = torch.cat(tuple(fx(torch.randn(2, *input_size(model, BWD_FX_SIZE))).values()))
    y.mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert sum(p.grad.numel() for p in fx.parameters()) == n_params
    assert y.shape[-1] == 42 and not torch.isnan(y).any()
