"""Small models of every source form for the checkpoint and CLI tests: written to disk by the tests themselves.

- a transformers directory (``config.json`` + ``model.safetensors``) of a tiny ConvNeXt, written with
  ``save_pretrained``;
- a user package ``userzoo`` with a builder function ``userzoo.nets:tiny_net`` returning the user's own
  class (torchvision BasicBlocks inside), written as source files into a directory.

Also :func:`edit_manifest`, which rewrites a checkpoint's manifest the way a tamperer would.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import struct
import sys
from pathlib import Path

import torch

# a ConvNeXt small enough to convert in well under a second at 32x32 (convstage2parc replaces 3 blocks)
CONVNEXT_ARGS = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 3, 1], "num_labels": 5}
BUILDER = "userzoo.nets:tiny_net"
BUILDER_ARGS = {"width": 8, "num_classes": 5}

_NETS = '''"""A user's own small ResNet-like network, built by a function."""
from torch import nn
from torchvision.models.resnet import BasicBlock


class TinyNet(nn.Module):
    def __init__(self, width=16, num_classes=10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2, down), BasicBlock(2 * w, 2 * w), BasicBlock(2 * w, 2 * w))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


def tiny_net(width=16, num_classes=10):
    return TinyNet(width, num_classes)
'''


def write_user_package(directory: Path) -> Path:
    """Write the ``userzoo`` package into ``directory`` (importable once ``directory`` is the current one)."""
    pkg = directory / "userzoo"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(_NETS)
    importlib.invalidate_caches()
    return pkg


def forget_user_package() -> None:
    """Drop ``userzoo`` from ``sys.modules`` (it lived in a temporary directory)."""
    for name in [n for n in sys.modules if n == "userzoo" or n.startswith("userzoo.")]:
        del sys.modules[name]


def write_transformers_dir(directory: Path, *, weights: bool = True) -> Path:
    """A tiny ConvNeXt classifier saved with ``save_pretrained`` (config.json, and weights unless not asked)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(**CONVNEXT_ARGS))
    directory.mkdir(parents=True, exist_ok=True)
    if weights:
        model.save_pretrained(str(directory))
    else:
        model.config.save_pretrained(str(directory))
    return directory


def logits(out) -> torch.Tensor:
    """A model's output tensor (a transformers model returns a ModelOutput)."""
    return out if isinstance(out, torch.Tensor) else out.logits


@contextlib.contextmanager
def source_workdir(directory: Path):
    """``directory`` holding ``userzoo`` and ``tiny_convnext/`` (a transformers directory), as the current one."""
    write_user_package(directory)
    write_transformers_dir(directory / "tiny_convnext")
    old = os.getcwd()
    os.chdir(directory)
    try:
        yield directory
    finally:
        os.chdir(old)
        forget_user_package()


def edit_manifest(src: Path, dst: Path, edit) -> None:
    """Copy the checkpoint ``src`` to ``dst`` with ``edit(manifest)`` applied to its manifest (tensors untouched)."""
    from parc_surgery.manifest import MANIFEST_KEY

    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    edit(manifest)
    header["__metadata__"][MANIFEST_KEY] = json.dumps(manifest)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
