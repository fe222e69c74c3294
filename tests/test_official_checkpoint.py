"""Official ParC-Net-S weights (hkzhang91/ParC-Net) load into ``parcnet_s`` (issue 13).

No official file can be downloaded here, so the test writes one: :func:`official_layout` lists the official
state dict's keys and shapes as the official code builds them (``edgeformer`` at ``scale_s``: ``ConvLayer``
= ``block.conv`` + ``block.norm``, ``InvertedResidual`` = ``block.{exp_1x1,conv_3x3,red_1x1}``,
``outer_frame_v1`` = ``dim_adaptive`` + ``spatial_global_rep`` (``gcc_ca_mf_block`` s and a BatchNorm) +
``channel_adaptive`` + ``local_global_fusion``, and the model's extra ``residual`` reference to ``layer_5.0``),
independently of parc-surgery's models. :func:`official_forward` computes that network's function from such a
state dict, following the official forward passes (circular convolution as ``conv2d`` over the input
concatenated with itself, PEs and kernels resized bilinearly, ``cat((global, local))`` fusion); the loaded
``parcnet_s`` must compute the same function, so a rename that is shape-compatible but wrong (two kernels of
one shape swapped) fails.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import parc_surgery as ps
from parc_surgery.errors import CheckpointError
from parc_surgery.official import checkpoint_filter_fn, is_official_state_dict, official_to_timm

# scale_s: (IR out, expand) per layer, then (out, cf_s, blocks, meta kernel, ffn) per ParC stage
STAGES = {3: (96, 192, 2, 32, 384), 4: (128, 256, 4, 16, 512), 5: (160, 320, 3, 8, 640)}


def _bn(keys, p, c):
    keys.update({f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,)})
    keys[f"{p}.num_batches_tracked"] = ()


def _conv_layer(keys, p, cin, cout, k, groups=1, norm=True):
    keys[f"{p}.block.conv.weight"] = (cout, cin // groups, k, k)
    if norm:
        _bn(keys, f"{p}.block.norm", cout)


def _inverted_residual(keys, p, cin, cout, expand=4):
    hidden = cin * expand  # make_divisible(., 8) leaves these multiples of 8 unchanged
    _conv_layer(keys, f"{p}.block.exp_1x1", cin, hidden, 1)
    _conv_layer(keys, f"{p}.block.conv_3x3", hidden, hidden, 3, groups=hidden)
    _conv_layer(keys, f"{p}.block.red_1x1", hidden, cout, 1)


def _gcc_ca_block(keys, p, dim, k, ffn, use_pe):
    _bn(keys, f"{p}.pre_Norm_1", dim)
    _bn(keys, f"{p}.pre_Norm_2", dim)
    for n, shape in (("1_H", (k, 1)), ("1_W", (1, k)), ("2_H", (k, 1)), ("2_W", (1, k))):
        keys[f"{p}.meta_kernel_{n}"] = (dim, 1, *shape)
        if use_pe:
            keys[f"{p}.meta_pe_{n}"] = (1, dim, *shape)
    _bn(keys, f"{p}.ffn.0", 2 * dim)
    keys.update({f"{p}.ffn.1.weight": (ffn, 2 * dim, 1, 1), f"{p}.ffn.1.bias": (ffn,)})
    keys.update({f"{p}.ffn.4.weight": (2 * dim, ffn, 1, 1), f"{p}.ffn.4.bias": (2 * dim,)})
    r = 2 * dim // 16
    keys[f"{p}.ca.fc.0.weight"] = (r, 2 * dim, 1, 1)
    _bn(keys, f"{p}.ca.fc.1", r)
    keys[f"{p}.ca.fc.3.weight"] = (2 * dim, r, 1, 1)
    _bn(keys, f"{p}.ca.fc.4", 2 * dim)


def _outer_frame(keys, p, cin, cf_s, n, k, ffn):
    g = math.gcd(cf_s, cin)
    _conv_layer(keys, f"{p}.dim_adaptive.0", cin, cf_s, 3, groups=g)
    _conv_layer(keys, f"{p}.dim_adaptive.1", cf_s, cf_s, 1, norm=False)
    for i in range(n):
        _gcc_ca_block(keys, f"{p}.spatial_global_rep.{i}", cf_s // 2, k, ffn, use_pe=i == 0)
    _bn(keys, f"{p}.spatial_global_rep.{n}", cf_s)
    _conv_layer(keys, f"{p}.channel_adaptive", cf_s, cin, 1, groups=g)
    _conv_layer(keys, f"{p}.local_global_fusion", 2 * cin, cin, 3)


def official_layout(num_classes: int = 1000) -> dict[str, tuple]:
    """Key -> shape of the official ParC-Net-S state dict, ``residual.*`` included."""
    keys: dict[str, tuple] = {}
    _conv_layer(keys, "conv_1", 3, 16, 3)
    _inverted_residual(keys, "layer_1.0", 16, 32)
    for j, cin in enumerate((32, 64, 64)):
        _inverted_residual(keys, f"layer_2.{j}", cin, 64)
    cin = 64
    for layer, (out, cf_s, n, k, ffn) in STAGES.items():
        _inverted_residual(keys, f"layer_{layer}.0", cin, out)
        _outer_frame(keys, f"layer_{layer}.1", out, cf_s, n, k, ffn)
        cin = out
    _conv_layer(keys, "conv_1x1_exp", 160, 640, 1)
    keys.update({"classifier.fc.weight": (num_classes, 640), "classifier.fc.bias": (num_classes,)})
    for key in [k for k in keys if k.startswith("layer_5.0.")]:
        keys["residual." + key[len("layer_5.0.") :]] = keys[key]
    return keys


def official_state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in the official layout; BatchNorm statistics plausible; residual.* shares layer_5.0's tensors."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in official_layout().items():
        if key.startswith("residual."):
            continue
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        elif key.endswith(".weight") and len(shape) == 1:  # norm scales
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g, dtype=dtype)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            sd[key] = torch.randn(shape, generator=g, dtype=dtype) / math.sqrt(max(fan_in, 1))
    for key in [k for k in sd if k.startswith("layer_5.0.")]:
        sd["residual." + key[len("layer_5.0.") :]] = sd[key]  # one module registered twice, as in the official model
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# The official network's function, from its state dict (eval mode)


def _bn_eval(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])


def _conv_layer_fwd(sd, p, x, stride=1, groups=1, act=True, norm=True):
    w = sd[f"{p}.block.conv.weight"]
    x = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
    x = _bn_eval(sd, f"{p}.block.norm", x) if norm else x
    return F.silu(x) if act else x


def _ir_fwd(sd, p, x, stride):
    hidden = sd[f"{p}.block.exp_1x1.block.conv.weight"].shape[0]
    y = _conv_layer_fwd(sd, f"{p}.block.exp_1x1", x)
    y = _conv_layer_fwd(sd, f"{p}.block.conv_3x3", y, stride=stride, groups=hidden)
    y = _conv_layer_fwd(sd, f"{p}.block.red_1x1", y, act=False)
    return x + y if stride == 1 and x.shape == y.shape else y


def _resize(t, n, axis):
    return F.interpolate(t, [n, 1] if axis == "H" else [1, n], mode="bilinear", align_corners=True)


def _circular(x, k, axis):
    """The official ParC: conv2d over the input followed by its own first N - 1 rows / columns, no padding."""
    if axis == "H":
        return F.conv2d(torch.cat((x, x[:, :, :-1, :]), dim=2), k, groups=x.shape[1])
    return F.conv2d(torch.cat((x, x[:, :, :, :-1]), dim=3), k, groups=x.shape[1])


def _gcc_ca_fwd(sd, p, x):
    x1, x2 = torch.chunk(x, 2, 1)
    r1, r2 = x1, x2
    n = x1.shape[2]
    k = {a: _resize(sd[f"{p}.meta_kernel_{a}"], n, a[-1]) for a in ("1_H", "1_W", "2_H", "2_W")}
    pe = f"{p}.meta_pe_1_H" in sd
    if pe:
        x1 = x1 + _resize(sd[f"{p}.meta_pe_1_H"], n, "H")
        x2 = x2 + _resize(sd[f"{p}.meta_pe_1_W"], n, "W")
    x1, x2 = _bn_eval(sd, f"{p}.pre_Norm_1", x1), _bn_eval(sd, f"{p}.pre_Norm_2", x2)
    x11, x21 = _circular(x1, k["1_H"], "H"), _circular(x2, k["1_W"], "W")
    if pe:
        x11 = x11 + _resize(sd[f"{p}.meta_pe_2_W"], n, "W")
        x21 = x21 + _resize(sd[f"{p}.meta_pe_2_H"], n, "H")
    z = torch.cat((r1 + _circular(x11, k["2_W"], "W"), r2 + _circular(x21, k["2_H"], "H")), dim=1)
    f = _bn_eval(sd, f"{p}.ffn.0", z)
    f = F.conv2d(F.hardswish(F.conv2d(f, sd[f"{p}.ffn.1.weight"], sd[f"{p}.ffn.1.bias"])), sd[f"{p}.ffn.4.weight"])
    f = f + sd[f"{p}.ffn.4.bias"][:, None, None]
    a = _bn_eval(sd, f"{p}.ca.fc.1", F.conv2d(f.mean((2, 3), keepdim=True), sd[f"{p}.ca.fc.0.weight"]))
    a = _bn_eval(sd, f"{p}.ca.fc.4", F.conv2d(F.hardswish(a), sd[f"{p}.ca.fc.3.weight"]))
    return z + f * F.hardsigmoid(a)


def _outer_frame_fwd(sd, p, x, n_blocks):
    res = x
    g = math.gcd(sd[f"{p}.dim_adaptive.1.block.conv.weight"].shape[0], x.shape[1])
    x = _conv_layer_fwd(sd, f"{p}.dim_adaptive.0", x, groups=g)
    x = _conv_layer_fwd(sd, f"{p}.dim_adaptive.1", x, act=False, norm=False)
    for i in range(n_blocks):
        x = _gcc_ca_fwd(sd, f"{p}.spatial_global_rep.{i}", x)
    x = _bn_eval(sd, f"{p}.spatial_global_rep.{n_blocks}", x)
    x = _conv_layer_fwd(sd, f"{p}.channel_adaptive", x, groups=g)
    return _conv_layer_fwd(sd, f"{p}.local_global_fusion", torch.cat((x, res), dim=1))


def official_forward(sd, x):
    x = _conv_layer_fwd(sd, "conv_1", x, stride=2)
    x = _ir_fwd(sd, "layer_1.0", x, 1)
    for j in range(3):
        x = _ir_fwd(sd, f"layer_2.{j}", x, 2 if j == 0 else 1)
    for layer, (_, _, n, _, _) in STAGES.items():
        x = _outer_frame_fwd(sd, f"layer_{layer}.1", _ir_fwd(sd, f"layer_{layer}.0", x, 2), n)
    x = _conv_layer_fwd(sd, "conv_1x1_exp", x).mean((2, 3))
    return F.linear(x, sd["classifier.fc.weight"], sd["classifier.fc.bias"])


# ----------------------------------------------------------------------------------------------------------------------


def test_the_layout_maps_onto_parcnet_s_tensor_for_tensor():
    layout = official_layout()
    with torch.device("meta"):
        ours = timm.create_model("parcnet_s")
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    renamed = official_to_timm({k: torch.empty(s, device="meta") for k, s in layout.items()})
    assert {k: tuple(v.shape) for k, v in renamed.items()} == mine  # every tensor, every shape
    assert len(layout) - len(renamed) == sum(k.startswith("residual.") for k in layout) > 0


def _same_function(model, sd):
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)  # square: the official code sizes both axes by the height
    with torch.no_grad():
        got = model.double().eval()(x)
        want = official_forward({k: v.double() for k, v in sd.items()}, x)
    # float64 throughout; the two compute the circular convolutions differently (rounding ~1e-15 per op)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_timm_pretrained_reads_an_official_torch_save_file(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "checkpoint_ema_avg.pt"
    torch.save(sd, path)
    model = timm.create_model("parcnet_s", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(
        model.stages[2][1].blocks[0].parc_1_w.weight, sd["layer_3.1.spatial_global_rep.0.meta_kernel_2_W"]
    )
    _same_function(model, sd)


def test_parc_surgery_load_reads_official_safetensors_and_pt(tmp_path):
    sd = official_state_dict(seed=1)
    safe = tmp_path / "official.safetensors"
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(safe))  # safetensors stores no shared tensors
    model = ps.load(safe)
    assert type(model).__name__ == "ByobNet" and model.pretrained_cfg["architecture"] == "parcnet_s"
    assert not model.training
    _same_function(model, sd)
    wrapped = tmp_path / "ddp.pth"  # a training checkpoint of a DistributedDataParallel model
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    again = ps.load(wrapped)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.float().state_dict().values()))


def test_native_files_pass_through_and_bad_official_files_are_refused(tmp_path):
    with torch.device("meta"):
        native = timm.create_model("parcnet_s").state_dict()
    assert not is_official_state_dict(native) and checkpoint_filter_fn(native) is native
    sd = official_state_dict()
    assert is_official_state_dict(sd) and is_official_state_dict({"state_dict": sd})
    with pytest.raises(CheckpointError, match=r"'layer_3\.1\.mystery\.weight' has no counterpart in parcnet_s"):
        official_to_timm({**sd, "layer_3.1.mystery.weight": torch.zeros(1)})
    tampered = dict(sd)
    tampered["residual.block.red_1x1.block.conv.weight"] = torch.zeros_like(
        sd["layer_5.0.block.red_1x1.block.conv.weight"]
    )
    with pytest.raises(CheckpointError, match=r"is not a copy of layer_5\.0"):
        official_to_timm(tampered)
    xs = dict(sd)  # another width: the official ParC-Net-XS has global width 96 in stage 3
    xs["layer_3.1.dim_adaptive.1.block.conv.weight"] = torch.zeros(96, 96, 1, 1)
    path = tmp_path / "xs.pt"
    torch.save(xs, path)
    with pytest.raises(CheckpointError, match=r"do not fit parcnet_s.*stages\.2\.1\.conv_1x1\.weight"):
        ps.load(path)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ps.load(other)
