"""``ParCMetaFormerBlock``: the ParC-MetaFormer block of ParC-Net (ECCV 2022), design notes §2.

A MetaFormer block whose token mixer is a pair of global circular convolutions per half of the
channels: half 1 runs height then width, half 2 width then height, each half with its own BatchNorm
pre-norm and residual; then a conv FFN rescaled by SE-like channel attention, in a residual.

Not registered as a replacement block: no common model has a module it replaces one-for-one (timm's
MetaFormer blocks differ in layout, FFN width and norm, and share no weights with it). It is the
building piece of :mod:`parc_surgery.blocks.parcnet`, and usable directly.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from timm.layers import register_notrace_module
from torch import nn

from ..errors import ConfigError
from ..helpers import as_kernel_hw
from ..ops import ParC, add_pe, resize_kernel
from ._metaformer_eval import fast_forward

__all__ = ["ChannelAttention", "ConvFFN", "ParCMetaFormerBlock", "init_conv_fan_out"]

# A leaf for torch.fx: the resize depends on the input size, which must not be baked into a graph.
torch.fx.wrap("add_pe")


@torch.no_grad()
def init_conv_fan_out(module: nn.Module) -> None:
    """The reference init of the block's ordinary convs (cvnets / timm ByobNet): N(0, 2 / fan_out), zero bias.

    BatchNorms keep weight 1 / bias 0; ParC kernels and PEs are left alone (they have their own init).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.zero_()


class ConvFFN(nn.Module):
    """BN -> 1x1 conv C->F (bias) -> Hardswish -> Dropout -> 1x1 conv F->C (bias) -> Dropout."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.1, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.BatchNorm2d(dim, **dd)
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=True, **dd)
        self.act = nn.Hardswish()
        self.drop1 = nn.Dropout(0.0)
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=True, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x))))))


class ChannelAttention(nn.Module):
    """SE-like gate: avgpool -> 1x1 C->C/r (no bias) -> BN -> Hardswish -> 1x1 -> C (no bias) -> BN -> Hardsigmoid."""

    def __init__(self, dim: int, *, reduction: int = 16, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = dim // reduction
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(dim, hidden, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(hidden, **dd)
        self.act = nn.Hardswish()
        self.expand = nn.Conv2d(hidden, dim, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(dim, **dd)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.bn2(self.expand(self.act(self.bn1(self.reduce(self.pool(x)))))))


# A leaf in timm's fx feature extraction (and the engine's traces): a traced graph calls the block, so in eval
# it runs the same inference fast path as eager (a graph of the reference ops would differ by float rounding).
@register_notrace_module
class ParCMetaFormerBlock(nn.Module):
    """ParC-MetaFormer block (ParC-Net): global circular-conv token mixer + conv FFN with channel attention.

    With ``x1`` / ``x2`` the first / second half of the ``dim`` input channels (``d = dim // 2`` each)::

        r1, r2 = x1, x2
        x1 = x1 + pe_1 (along height);  x2 = x2 + pe_2 (along width)       # PE blocks only
        x1, x2 = norm_1(x1), norm_2(x2)                                    # a BatchNorm per half
        x1 = parc_1_h(x1);  x2 = parc_2_w(x2)                              # height on half 1, width on half 2
        x1 = parc_1_w(x1);  x2 = parc_2_h(x2)                              # each adds its PE first (PE blocks)
        z = cat(r1 + x1, r2 + x2)
        out = z + ca(ffn(z))

    ``parc_1_h`` has a (K_h, 1) kernel and mixes each column ("ParC-V" in the paper); ``parc_1_w`` a
    (1, K_w) kernel mixing each row ("ParC-H"). Kernels and PEs are stored at the base lengths
    ``kernel_hw`` and resized to each input's own height / width, so any input size works.

    The first PE of each half (``pe_1``, ``pe_2``) is added *before* the pre-norm, so it is a parameter
    of this block; the second is the built-in PE of the ParC that follows it. No ParC bias, PE init
    N(0, 1), kernels U(-1/sqrt(K), 1/sqrt(K)), other convs N(0, 2/fan_out) as in the reference.

    ``impl`` selects the ParC implementation: ``spatial`` (a valid conv over the circularly extended
    map, O(N^2) per line, fastest for short axes) or ``fft`` (Fast-ParC, O(N log N), faster from about
    N = 28); both compute the same function. ``auto`` picks per call from the actual sizes.

    Args:
        dim: channels in and out (even, and at least ``ca_reduction``).
        kernel_hw: base kernel / PE lengths (along height, along width): the feature size at the
            model's input size.
        pe: whether this block carries position embeddings (only the first block of a stage does).
        ffn_ratio: FFN hidden width relative to ``dim``.
        ca_reduction: channel-attention reduction (hidden width ``dim // ca_reduction``).
        drop: dropout after the FFN's second conv.
        impl: ``"spatial"``, ``"fft"`` or ``"auto"``.
    """

    def __init__(
        self,
        dim: int,
        kernel_hw: tuple[int, int] | int,
        *,
        pe: bool,
        ffn_ratio: float = 2,
        ca_reduction: int = 16,
        drop: float = 0.1,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ConfigError(
                f"{name}: dim={dim!r} must be an even positive int (the channels are split into two halves)"
            )
        if isinstance(ca_reduction, bool) or not isinstance(ca_reduction, int) or ca_reduction < 1:
            raise ConfigError(f"{name}: ca_reduction={ca_reduction!r} must be a positive int")
        if dim // ca_reduction < 1:
            raise ConfigError(
                f"{name}: dim={dim} is too small for channel attention with ca_reduction={ca_reduction} "
                f"(hidden width dim // ca_reduction = 0); use dim >= {ca_reduction} or a smaller ca_reduction"
            )
        kh, kw = as_kernel_hw(kernel_hw, name)
        hidden = round(dim * ffn_ratio)
        if hidden < 1:
            raise ConfigError(f"{name}: ffn_ratio={ffn_ratio!r} gives an FFN width of {hidden}; it must be >= 1")
        dd = {"device": device, "dtype": dtype}
        d = dim // 2
        self.dim = dim
        self.half = d
        self.kernel_hw = (kh, kw)
        self.has_pe = bool(pe)
        parc = {"bias": False, "impl": impl, "pe_init": "normal", **dd}

        self.pe_1 = nn.Parameter(torch.empty(1, d, kh, 1, **dd)) if pe else None
        self.pe_2 = nn.Parameter(torch.empty(1, d, 1, kw, **dd)) if pe else None
        self.norm_1 = nn.BatchNorm2d(d, **dd)
        self.norm_2 = nn.BatchNorm2d(d, **dd)
        self.parc_1_h = ParC(d, kh, "height", pe=False, **parc)
        self.parc_2_w = ParC(d, kw, "width", pe=False, **parc)
        self.parc_1_w = ParC(d, kw, "width", pe=pe, **parc)
        self.parc_2_h = ParC(d, kh, "height", pe=pe, **parc)
        self.ffn = ConvFFN(dim, hidden, drop=drop, **dd)
        self.ca = ChannelAttention(dim, reduction=ca_reduction, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: PE N(0, 1), ParC kernels U(-1/sqrt(K), 1/sqrt(K)), convs N(0, 2/fan_out), BN 1/0."""
        if self.pe_1 is not None:
            nn.init.normal_(self.pe_1, 0.0, 1.0)
            nn.init.normal_(self.pe_2, 0.0, 1.0)
        for m in (self.parc_1_h, self.parc_2_w, self.parc_1_w, self.parc_2_h):
            m.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        init_conv_fan_out(self)

    def token_mixer(self, x: torch.Tensor) -> torch.Tensor:
        """The token mixer (everything before the residual) as the reference forward computes it."""
        d = self.half
        x1, x2 = x[:, :d], x[:, d:]
        if self.pe_1 is not None:
            x1 = add_pe(x1, self.pe_1, "height")
            x2 = add_pe(x2, self.pe_2, "width")
        x1 = self.parc_1_w(self.parc_1_h(self.norm_1(x1)))
        x2 = self.parc_2_h(self.parc_2_w(self.norm_2(x2)))
        return torch.cat([x1, x2], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # inference: the same function with folded norms and merged ParC steps
            y = fast_forward(self, x)
            if y is not None:
                return y
        z = x + self.token_mixer(x)
        return z + self.ca(self.ffn(z))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # PEs saved at another base length load resampled to this block's lengths (as ParC does for its own).
        for name, axis, k in (("pe_1", "height", self.kernel_hw[0]), ("pe_2", "width", self.kernel_hw[1])):
            t = state_dict.get(prefix + name)
            own = getattr(self, name)
            if t is None or own is None or t.dim() != 4 or t.shape == own.shape:
                continue
            dim = 2 if axis == "height" else 3
            if all(t.shape[i] == own.shape[i] for i in range(4) if i != dim):
                state_dict[prefix + name] = resize_kernel(t.to(own.dtype), k, axis)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"{self.dim}, kernel_hw={self.kernel_hw}, pe={self.has_pe}"
