"""ParC-ConvNet blocks (parc_bottleneck, parc_basic_block, parc_inverted_residual, parc_convnext) and ParCSplit."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from parc_surgery.blocks import BlockContext, get_block
from parc_surgery.blocks._fold import fold_taps, split_from_conv
from parc_surgery.blocks.parc_split import ParCSplit
from parc_surgery.errors import ConfigError, UnsupportedTargetError
from parc_surgery.ops import ParC

BASE = (14, 14)
SIZES = {"base": BASE, "larger": (21, 21), "smaller": (7, 7), "non_square": (10, 17)}

# case id -> (source builder, block name, block input channels, path of the replaced conv)
CASES = {
    "timm_bottleneck": (lambda: timm.models.resnet.Bottleneck(64, 16), "parc_bottleneck", 64, "conv2"),
    "timm_basic_block": (lambda: timm.models.resnet.BasicBlock(32, 32), "parc_basic_block", 32, "conv2"),
    "timm_inverted_residual": (
        lambda: timm.create_model("mobilenetv2_050", pretrained=False).blocks[4][1],
        "parc_inverted_residual",
        48,
        "conv_dw",
    ),
    "timm_convnext": (
        lambda: timm.create_model("convnext_atto", pretrained=False).stages[2].blocks[1],
        "parc_convnext",
        160,
        "conv_dw",
    ),
    # torchvision blocks built directly (the same classes as in resnet50 / resnet18 / convnext_tiny, smaller widths)
    "tv_bottleneck": (lambda: torchvision.models.resnet.Bottleneck(256, 64), "parc_bottleneck", 256, "conv2"),
    "tv_basic_block": (lambda: torchvision.models.resnet.BasicBlock(64, 64), "parc_basic_block", 64, "conv2"),
    "tv_inverted_residual": (
        lambda: torchvision.models.mobilenet_v2(weights=None).features[12],
        "parc_inverted_residual",
        96,
        "conv.1.0",
    ),
    "tv_convnext": (
        lambda: torchvision.models.convnext.CNBlock(96, layer_scale=1e-6, stochastic_depth_prob=0.0),
        "parc_convnext",
        96,
        "block.0",
    ),
}


@pytest.fixture(scope="module")
def sources():
    torch.manual_seed(0)
    return {name: build().eval() for name, (build, *_) in CASES.items()}


def _build(source, block, **ctx_kw):
    ctx = BlockContext(feature_size=BASE, **ctx_kw)
    cls = get_block(block)
    cls.check_source(source, ctx)
    return cls.from_module(source, ctx)


def _smooth(c, hw, batch=2):
    return F.interpolate(torch.randn(batch, c, 4, 4), size=hw, mode="bilinear", align_corners=False)


case_ids = pytest.mark.parametrize("case", list(CASES))


# --- ParCSplit ---------------------------------------------------------------------------------------


def test_parc_split_halves_and_shapes():
    torch.manual_seed(0)
    split = ParCSplit(8, (6, 5), dense=True)
    assert split.parc_h.axis == "height" and split.parc_w.axis == "width"
    assert split.parc_h.weight.shape == (4, 4, 6, 1) and split.parc_w.weight.shape == (4, 4, 1, 5)
    assert split.parc_h.pe.shape == (1, 4, 6, 1) and split.parc_w.pe.shape == (1, 4, 1, 5)
    x = torch.randn(2, 8, 6, 5)
    y = split(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 4:] += 1.0  # perturb the width half only: the height half's output must not move
    y2 = split(x2)
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.equal(y[:, 4:], y2[:, 4:])
    assert torch.equal(y[:, :4], split.parc_h(x[:, :4]))


def test_parc_split_rejects_odd_channels():
    with pytest.raises(ConfigError, match=r"ParCSplit: channels must be even.*got 45"):
        ParCSplit(45, (7, 7))
    with pytest.raises(ConfigError, match="kernel_hw must be a pair"):
        ParCSplit(8, 7)


# --- warm start fold ---------------------------------------------------------------------------------


def test_fold_taps_offset0_and_modulo():
    w = torch.arange(1.0, 8.0)  # 7 taps, offsets -3..3
    assert fold_taps(w, 10, 3).tolist() == [4, 5, 6, 7, 0, 0, 0, 1, 2, 3]
    # K = 3 < 7 taps: offset a lands at a mod 3, collisions summed
    expect = [0.0, 0.0, 0.0]
    for j, v in enumerate(w.tolist()):
        expect[(j - 3) % 3] += v
    assert fold_taps(w, 3, 3).tolist() == expect


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize(("n", "k"), [(14, 7), (5, 7), (9, 3)])
def test_warm_start_is_exact_on_lines(dense, n, k):
    # With circular padding, a conv on an input constant along width equals the folded height ParC
    # (and vice versa); dense: the cross-half blocks are zeroed, since a ParCSplit never mixes halves.
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, k, padding=k // 2, groups=1 if dense else 8, padding_mode="circular", bias=True)
    if dense:
        with torch.no_grad():
            conv.weight[:4, 4:] = 0
            conv.weight[4:, :4] = 0
    split = split_from_conv(conv, (n, n), dense=dense, pe=True, impl="spatial", init="warm_start")
    assert torch.equal(split.parc_h.bias, conv.bias[:4]) and torch.equal(split.parc_w.bias, conv.bias[4:])
    assert not split.parc_h.pe.any() and not split.parc_w.pe.any()
    with torch.no_grad():
        x_col = torch.randn(2, 8, n, 1).expand(2, 8, n, n)
        x_row = torch.randn(2, 8, 1, n).expand(2, 8, n, n)
        torch.testing.assert_close(split(x_col)[:, :4], conv(x_col)[:, :4], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split(x_row)[:, 4:], conv(x_row)[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["timm_bottleneck", "timm_inverted_residual", "timm_convnext", "tv_convnext"])
def test_warm_start_closer_than_reference(sources, case):
    source = copy.deepcopy(sources[case])
    for p in ("gamma", "layer_scale"):  # trained ConvNeXts have layer scales far from the 1e-6 init
        if getattr(source, p, None) is not None:
            getattr(source, p).data.fill_(1.0)
    c = CASES[case][2]
    errs = {}
    for init in ("warm_start", "reference"):
        torch.manual_seed(1)
        block, _ = _build(source, CASES[case][1], init=init)
        block.eval()
        x = _smooth(c, BASE)
        with torch.no_grad():
            y0 = source(x)
            errs[init] = ((block(x) - y0).norm() / y0.norm()).item()
    assert errs["warm_start"] < errs["reference"], errs


# --- the blocks --------------------------------------------------------------------------------------


@case_ids
def test_registered_and_replaces(sources, case):
    cls = get_block(CASES[case][1])
    src_type = type(sources[case])
    assert f"{src_type.__module__}.{src_type.__qualname__}" in cls.replaces
    assert cls.block_name == CASES[case][1]


@case_ids
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes(sources, case, train):
    block, _ = _build(sources[case], CASES[case][1])
    block.train(train)
    c = CASES[case][2]
    for hw in SIZES.values():
        x = torch.randn(2, c, *hw)
        with torch.no_grad():
            y = block(x)
        assert y.shape == (2, c, *hw)
        assert torch.isfinite(y).all()


@case_ids
def test_spatial_equals_fft(sources, case):
    torch.manual_seed(0)
    block, _ = _build(sources[case], CASES[case][1], impl="spatial", init="reference")
    block.eval()
    fft_block = copy.deepcopy(block)
    parcs = [m for m in fft_block.modules() if isinstance(m, ParC)]
    assert len(parcs) == 2
    for m in parcs:
        m.impl = "fft"
    c = CASES[case][2]
    for hw in (BASE, SIZES["non_square"]):
        x = torch.randn(2, c, *hw)
        with torch.no_grad():
            torch.testing.assert_close(fft_block(x), block(x), rtol=1e-5, atol=1e-5)


@case_ids
def test_traced_equals_eager(sources, case):
    block, _ = _build(sources[case], CASES[case][1], init="reference")
    block.eval()
    traced = torch.fx.symbolic_trace(block)
    c = CASES[case][2]
    for hw in (BASE, SIZES["non_square"]):  # nothing size-dependent is baked into the graph
        x = torch.randn(2, c, *hw)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), block(x), rtol=1e-6, atol=1e-6)


@case_ids
def test_backward_reaches_parc(sources, case):
    block, _ = _build(sources[case], CASES[case][1])
    block.train()
    x = torch.randn(2, CASES[case][2], 10, 12)
    block(x).square().mean().backward()
    split = block.get_submodule(CASES[case][3])
    assert isinstance(split, ParCSplit)
    for parc in (split.parc_h, split.parc_w):
        for p in (parc.weight, parc.pe, parc.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0


@case_ids
def test_state_dict_round_trip(sources, case):
    torch.manual_seed(0)
    block, _ = _build(sources[case], CASES[case][1])
    torch.manual_seed(1)
    fresh, _ = _build(sources[case], CASES[case][1], init="reference")
    fresh.load_state_dict(block.state_dict(), strict=True)
    block.eval()
    fresh.eval()
    x = torch.randn(2, CASES[case][2], *SIZES["non_square"])
    with torch.no_grad():
        assert torch.equal(fresh(x), block(x))
    again = pickle.loads(pickle.dumps(block))
    with torch.no_grad():
        assert torch.equal(again(x), block(x))


@case_ids
def test_carry_record_and_source_untouched(sources, case):
    source = sources[case]
    before = {k: v.clone() for k, v in source.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in source.named_modules()]
    path = CASES[case][3]
    conv = source.get_submodule(path)
    block, rec = _build(source, CASES[case][1])

    assert [(n, type(m)) for n, m in source.named_modules()] == modules_before
    after = source.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    new_params = dict(block.named_parameters())
    old_params = dict(source.named_parameters())
    assert len(rec.kept) == len(old_params) - (2 if conv.bias is not None else 1)
    for new_name, old_name in rec.kept:
        assert new_name == old_name and torch.equal(new_params[new_name], old_params[old_name])
    parc_w = {f"{path}.parc_h.weight", f"{path}.parc_w.weight"}
    parc_b = {f"{path}.parc_h.bias", f"{path}.parc_w.bias"}
    parc_pe = {f"{path}.parc_h.pe", f"{path}.parc_w.pe"}
    transformed = {n for n, _, _ in rec.transformed}
    for name, olds, how in rec.transformed:
        if name.endswith(".weight"):
            assert olds == (f"{path}.weight",) and how.startswith("folded")
        else:
            assert olds == (f"{path}.bias",) and "bias" in how
    if conv.bias is not None:  # ConvNeXt: the conv bias goes to the ParC biases
        assert transformed == parc_w | parc_b and set(rec.new) == parc_pe
        d = conv.out_channels // 2
        assert torch.equal(new_params[f"{path}.parc_w.bias"], conv.bias[d:])
    else:
        assert transformed == parc_w and set(rec.new) == parc_pe | parc_b
    assert rec.dropped == ()
    covered = {n for n, _ in rec.kept} | transformed | set(rec.new)
    assert covered == set(new_params)

    _, rec_ref = _build(source, CASES[case][1], init="reference")
    assert rec_ref.transformed == () and set(rec_ref.new) == parc_w | parc_b | parc_pe
    assert set(rec_ref.dropped) == {n for n in old_params if n.startswith(path + ".")}


@case_ids
@pytest.mark.parametrize(("kernel", "pe"), [((14, 14), True), ((14, 10), False)])
def test_parameter_count_formula(sources, case, kernel, pe):
    source = sources[case]
    block_name, _, path = CASES[case][1:]
    conv = source.get_submodule(path)
    block, _ = get_block(block_name).from_module(source, BlockContext(feature_size=BASE, kernel_size=kernel, pe=pe))
    d = conv.out_channels // 2
    dense = get_block(block_name).dense
    parc = sum(d * (d if dense else 1) * k + d + (d * k if pe else 0) for k in kernel)
    n_src = sum(p.numel() for p in source.parameters())
    n_conv = sum(p.numel() for p in conv.parameters())
    assert sum(p.numel() for p in block.parameters()) == n_src - n_conv + parc
    split = block.get_submodule(path)
    assert (split.parc_h.kernel_size, split.parc_w.kernel_size) == kernel
    assert (split.parc_h.pe is None) == (not pe)


@pytest.mark.parametrize("case", ["timm_bottleneck", "timm_convnext", "tv_inverted_residual"])
def test_meta_source_builds_meta_block(sources, case):
    source = copy.deepcopy(sources[case]).to("meta")
    block, rec = _build(source, CASES[case][1])
    assert all(p.device.type == "meta" for p in block.parameters())
    assert len(rec.kept) > 0
    for init in ("reference",):
        block, _ = _build(source, CASES[case][1], init=init)
        assert all(p.is_meta for p in block.parameters())


# --- refusals ----------------------------------------------------------------------------------------

_ds = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))  # noqa: E731

BAD = [
    ("parc_bottleneck", lambda: timm.models.resnet.Bottleneck(36, 9, downsample=_ds(36, 36)), r"9 channels, an odd"),
    (
        "parc_bottleneck",
        lambda: timm.models.resnet.Bottleneck(64, 32, stride=2, downsample=_ds(64, 128)),
        r"'conv2' has stride \(2, 2\)",
    ),
    ("parc_bottleneck", lambda: timm.models.resnet.Bottleneck(64, 16, cardinality=2), r"grouped \(groups=2\)"),
    ("parc_bottleneck", lambda: timm.models.resnet.Bottleneck(64, 16, dilation=2), "dilated"),
    (
        "parc_bottleneck",
        lambda: timm.models.resnet.Bottleneck(64, 32, stride=2, aa_layer=nn.AvgPool2d, downsample=_ds(64, 128)),
        "anti-aliasing layer 'aa'",
    ),
    (
        "parc_bottleneck",
        lambda: torchvision.models.resnet.Bottleneck(256, 128, stride=2, downsample=_ds(256, 512)),
        r"stride \(2, 2\)",
    ),
    ("parc_bottleneck", lambda: nn.Conv2d(8, 8, 3), r"cannot replace a torch\.nn\.modules\.conv\.Conv2d"),
    ("parc_bottleneck", lambda: timm.models.resnet.BasicBlock(32, 32), r"it replaces timm\.models\.resnet\.Bottleneck"),
    (
        "parc_basic_block",
        lambda: timm.models.resnet.BasicBlock(32, 64, stride=2, downsample=_ds(32, 64)),
        r"'conv1' has stride \(2, 2\)",
    ),
    (
        "parc_inverted_residual",
        lambda: timm.models._efficientnet_blocks.InvertedResidual(16, 24, stride=2),
        r"depthwise conv 'conv_dw' has stride \(2, 2\)",
    ),
    (
        "parc_inverted_residual",
        lambda: torchvision.models.mobilenet_v2(weights=None).features[14],
        r"'conv\.1\.0' has stride \(2, 2\)",
    ),
    (
        "parc_inverted_residual",
        lambda: timm.models._efficientnet_blocks.InvertedResidual(16, 16, exp_ratio=2, group_size=8),
        r"not depthwise \(groups=4, 32 channels\)",
    ),
    ("parc_convnext", lambda: timm.models.convnext.ConvNeXtBlock(45), r"45 channels, an odd count"),
    ("parc_convnext", lambda: timm.models.convnext.ConvNeXtBlock(32, 64), "maps 32 to 64 channels"),
]


@pytest.mark.parametrize(("block", "build", "match"), BAD, ids=[f"{b}-{i}" for i, (b, _, _) in enumerate(BAD)])
def test_unsupported_sources_are_refused(block, build, match):
    source = build()
    ctx = BlockContext(feature_size=BASE)
    with pytest.raises(UnsupportedTargetError, match=match) as info:
        get_block(block).check_source(source, ctx)
    assert str(info.value).startswith(f"{block}: cannot replace")
    with pytest.raises(UnsupportedTargetError, match=match):
        get_block(block).from_module(source, ctx)


def test_bad_context_is_a_config_error(sources):
    source = sources["timm_bottleneck"]
    cls = get_block("parc_bottleneck")
    with pytest.raises(ConfigError, match=r"parc_bottleneck: init must be one of .*'warm'"):
        cls.check_source(source, BlockContext(feature_size=BASE, init="warm"))
    with pytest.raises(ConfigError, match=r"kernel_hw must be two positive ints.*\(14, 0\)"):
        cls.from_module(source, BlockContext(feature_size=BASE, kernel_size=(14, 0)))
