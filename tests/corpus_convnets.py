"""ConvNets written the way people write them: their own block classes, no timm / torchvision classes inside.

Small widths so tests are fast (input 32 x 32: stages at 16, 8, 4). Every block adds its input (or a
projection of it) to a path with a spatial conv, each in its own way: ``+`` (basic), in-place ``+=``
(bottleneck), ``torch.add`` (inverted residual), and a forward that calls its own helper method. The
models return a tensor, a tuple or a dict (``out=``).
"""

from __future__ import annotations

import torch
from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class ResBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut (identity, or 1x1 conv + bn when it downsamples / widens)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        same = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand; ``out += identity`` in place (a user class of the same name as timm's)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = _bn(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(), nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class InvertedResidual(nn.Module):
    """expand 1x1, depthwise 3x3, project 1x1 in a Sequential; ``torch.add`` when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False),
            _bn(hid),
            nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
            _bn(hid),
            nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False),
            _bn(cout),
        )

    def forward(self, x):
        return torch.add(x, self.block(x)) if self.use_res else self.block(x)


class HelperBlock(nn.Module):
    """``x + self._mix(x)``: the forward calls the block's own helper method (a depthwise 5x5 inside)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.down = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 2, stride=2)
        self.dw = nn.Conv2d(cout, cout, 5, padding=2, groups=cout)
        self.norm = _bn(cout)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(cout, cout, 1)
        self.scale = nn.Parameter(torch.full((cout, 1, 1), 0.5))

    def _mix(self, x):
        return self.scale * self.pw(self.act(self.norm(self.dw(x))))

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        return x + self._mix(x)


class UserConvNet(nn.Module):
    """Stem (stride 2), stages of ``block`` (the first block of each later stage halves the size), pooled head.

    ``out``: ``"tensor"`` (logits), ``"tuple"`` (logits, pooled features) or ``"dict"`` ({"logits", "features"}).
    """

    def __init__(
        self,
        block: type[nn.Module] = ResBlock,
        widths: tuple[int, ...] = (8, 16, 32),
        depths: tuple[int, ...] = (2, 2, 3),
        *,
        num_classes: int = 10,
        out: str = "tensor",
    ):
        super().__init__()
        self.out = out
        stem_conv = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.stem = nn.Sequential(stem_conv, _bn(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [block(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(d)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        feats = self.stages(self.stem(x)).mean((2, 3))
        logits = self.head(feats)
        if self.out == "tuple":
            return logits, feats
        if self.out == "dict":
            return {"logits": logits, "features": feats}
        return logits


def basic_net(**kw) -> UserConvNet:
    return UserConvNet(ResBlock, **kw)


def bottleneck_net(**kw) -> UserConvNet:
    return UserConvNet(Bottleneck, widths=(16, 32, 64), **kw)


def inverted_residual_net(**kw) -> UserConvNet:
    return UserConvNet(InvertedResidual, widths=(8, 16, 24), **kw)


def helper_net(**kw) -> UserConvNet:
    return UserConvNet(HelperBlock, **kw)
