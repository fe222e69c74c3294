"""A tiny trained teacher and a tiny image folder for the heal tests (built once per test module).

The images are 16x16 RGB: a faint square in one of four quadrants (the class) on noise, written as
PNG / JPEG / WebP files in nested folders. The teacher is ``toy_models.ToyViT`` (two attention
blocks, given the token grid as a positional argument) trained on those files read the way heal
reads them, to well above chance, so that its function is worth recovering.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from toy_models import ToyViT

from parc_surgery.healing import create_image_transform, list_images

SIZE = 16


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images (n, 16, 16, 3) and their classes 0..3: a faint square in one quadrant, on noise.

    Faint on purpose: the teacher's decisions are close calls, so a conversion visibly changes them.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    img = torch.rand(n, 3, SIZE, SIZE, generator=g) * 120
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        img[i, :, r * 8 + 2 : r * 8 + 6, q * 8 + 2 : q * 8 + 6] += 40 * (0.5 + torch.rand(3, 1, 1, generator=g))
    return img.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), labels


def write_folder(root: Path, n: int = 128, seed: int = 0) -> dict[Path, int]:
    """Images as root/a/*.png, root/b/c/*.jpg, root/b/*.webp; returns {path: class}."""
    from PIL import Image

    pixels, labels = make_images(n, seed)
    out = {}
    for i in range(n):
        sub, ext = [("a", ".png"), ("b/c", ".jpg"), ("b", ".webp")][i % 3]
        path = root / sub / f"{i:04d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i].numpy()).save(path, quality=95)
        out[path] = int(labels[i])
    return out


def load_folder(root: Path, model, labels: dict[Path, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    tf = create_image_transform(model, (SIZE, SIZE), 3)
    paths = list_images(root)
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]), torch.tensor([labels[p] for p in paths])


def train_teacher(x: torch.Tensor, y: torch.Tensor, *, steps: int = 150, seed: int = 0) -> ToyViT:
    torch.manual_seed(seed)
    model = ToyViT(dim=16, depth=2, patch=4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
