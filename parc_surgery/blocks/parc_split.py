"""``ParCSplit``: the ParC layer of the ParC-ConvNets (ParC-Net, ECCV 2022, section 3.3).

Replaces the spatial conv of a ConvNet block: the channels are split into two halves, a ParC along
``height`` (kernel (K_h, 1), mixes the pixels of one column; the paper's "ParC-V") runs on the first
half, a ParC along ``width`` (kernel (1, K_w), mixes one row; "ParC-H") on the second half, and the
two results are concatenated. The halves never mix. ``dense=True`` makes each ParC channel-mixing
*within* its half (ParC-ResNet); ``dense=False`` is depthwise (ParC-MobileNetV2, ParC-ConvNeXt).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..ops import ParC
from ..vocab import Impl

__all__ = ["ParCSplit"]


class ParCSplit(nn.Module):
    """Height ParC on the first half of the channels ‖ width ParC on the second half.

    Args:
        channels: input (= output) channels; must be even (``d = channels // 2`` per half).
        kernel_hw: base kernel / PE lengths ``(K_h, K_w)``: the height ParC uses ``K_h``, the width ParC ``K_w``.
        dense: channel-mixing ParC within each half (kernels ``(d, d, K)``) instead of depthwise ``(d, 1, K)``.
        pe: learned position embeddings in both ParCs.
        bias: per-channel bias in both ParCs.
        impl: ``"spatial"``, ``"fft"`` or ``"auto"`` (see :class:`parc_surgery.ops.ParC`).
        pe_init: ``"trunc_normal"`` (std 0.02, the ParC-ConvNets init) or ``"normal"``.

    Submodules ``parc_h`` (height, channels ``0:d``) and ``parc_w`` (width, channels ``d:``).
    """

    def __init__(
        self,
        channels: int,
        kernel_hw: tuple[int, int],
        *,
        dense: bool = False,
        pe: bool = True,
        bias: bool = True,
        impl: Impl = "auto",
        pe_init: str = "trunc_normal",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
            raise ConfigError(f"ParCSplit: channels must be an even int >= 2, got {channels!r}")
        if channels % 2:
            raise ConfigError(
                f"ParCSplit: channels must be even (split into a height half and a width half), got {channels}; "
                f"the replaced layer must have an even channel count"
            )
        try:
            k_h, k_w = kernel_hw
        except (TypeError, ValueError):
            raise ConfigError(
                f"ParCSplit: kernel_hw must be a pair (K_h, K_w) of base kernel lengths, got {kernel_hw!r}"
            ) from None
        self.channels = channels
        self.half = channels // 2
        self.kernel_hw = (k_h, k_w)
        self.dense = bool(dense)
        kw = {"pe": pe, "bias": bias, "dense": dense, "impl": impl, "pe_init": pe_init}
        self.parc_h = ParC(self.half, k_h, "height", **kw, device=device, dtype=dtype)
        self.parc_w = ParC(self.half, k_w, "width", **kw, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.half
        return torch.cat([self.parc_h(x[:, :d]), self.parc_w(x[:, d:])], dim=1)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_hw={self.kernel_hw}, dense={self.dense}"
