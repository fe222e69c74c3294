"""Images to heal with: a folder (any nesting; jpg / png / webp), a tensor, a Dataset or any iterable.

A folder is read with Pillow and transformed the way timm evaluates that model
(``timm.data.resolve_data_config`` + ``create_transform``: resize, centre crop, normalise), at the
conversion's planned input size. Python data may be a ``(N, C, H, W)`` tensor, a map-style ``Dataset``
or any iterable / ``DataLoader`` yielding images or batches, alone or as ``(image, label)`` pairs or
dicts (``image`` / ``pixel_values``, ``label`` / ``labels``); iterables are read only as far as needed.
Labels are optional and only ever used to report accuracy.

:func:`create_heal_data` splits the images once, deterministically (the same on every rank): a
held-out part (``eval_data`` if given, else ``holdout`` of the data) and at most ``images`` to train on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError

__all__ = ["IMAGE_SUFFIXES", "HealData", "Samples", "create_heal_data", "create_image_transform", "list_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_IMAGE_KEYS = ("image", "images", "pixel_values", "x", "input")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class Samples:
    """Indexable images: ``len(s)``, ``s[i] -> (image (C, H, W), label or None)``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | None]:
        raise NotImplementedError

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The images at ``indices`` stacked ``(B, C, H, W)``, with their labels ``(B,)`` when every one has one."""
        items = [self[i] for i in indices]
        x = torch.stack([it[0] for it in items])
        ys = [it[1] for it in items]
        y = torch.tensor(ys, dtype=torch.long) if ys and all(v is not None for v in ys) else None
        return x, y


class TensorSamples(Samples):
    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], (None if self.y is None else int(self.y[i]))

    def batch(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], (None if self.y is None else self.y[idx])


class DatasetSamples(Samples):
    """A map-style dataset whose items are images, (image, label) pairs or dicts."""

    def __init__(self, dataset, where: str):
        self.dataset, self.where = dataset, where

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = _split_item(self.dataset[i], f"{self.where}[{i}]")
        if x.dim() != 3:
            raise DataError(f"{self.where}[{i}] is an image of shape {tuple(x.shape)}; expected (C, H, W)")
        return x, (None if y is None else int(y))


class FolderSamples(Samples):
    """Image files read with Pillow and transformed by ``transform`` (PIL image -> tensor)."""

    def __init__(self, paths: list[Path], transform, mode: str, root: Path):
        self.paths, self.transform, self.mode, self.root = paths, transform, mode, root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {str(path)!r}: {e}. Remove or replace the file and run again.") from e
        x = self.transform(img)
        if not isinstance(x, torch.Tensor):
            raise DataError(f"the transform returned a {type(x).__name__} for {str(path)!r}; it must return a tensor")
        return x, None


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every jpg / jpeg / png / webp file under ``folder`` (any depth), sorted by path; DataError if none."""
    root = Path(folder)
    if not root.exists():
        raise DataError(f"image folder {str(root)!r} does not exist; pass a folder of .jpg/.png/.webp images")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file, not a folder; pass the folder that holds the images")
    found, other = [], 0
    try:
        for dirpath, _, files in os.walk(root, onerror=_raise_walk_error):
            for f in files:
                if f.lower().endswith(IMAGE_SUFFIXES):
                    found.append(Path(dirpath) / f)
                else:
                    other += 1
    except OSError as e:
        raise DataError(f"cannot read the image folder {str(root)!r}: {e}; check its permissions") from e
    if not found:
        what = f"{other} file(s), none of them" if other else "nothing:"
        raise DataError(
            f"no images in {str(root)!r} (searched every subfolder; it holds {what} a {'/'.join(IMAGE_SUFFIXES)} "
            "image); put unlabelled images there, any nesting"
        )
    return sorted(found)


def _raise_walk_error(e: OSError) -> None:
    raise e


def create_image_transform(model: nn.Module, input_size: tuple[int, int], in_chans: int):
    """timm's eval transform for ``model`` (mean / std / crop / interpolation from its config) at ``input_size``."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (in_chans, *input_size)}, model=model)
    return create_transform(**cfg, is_training=False)


@dataclass
class HealData:
    """The images of one heal: what trains, what is held out, whether labels came with them."""

    train: Samples
    train_indices: list[int]
    heldout: Samples | None
    heldout_indices: list[int]
    labelled: bool  # the held-out images have labels: accuracy is reported
    source: str

    def describe(self) -> str:
        return f"{len(self.train_indices)} training + {len(self.heldout_indices)} held-out images from {self.source}"


def create_heal_data(
    data: Any,
    *,
    eval_data: Any = None,
    images: int,
    holdout: float | int,
    seed: int,
    model: nn.Module,
    input_size: tuple[int, int],
    in_chans: int,
    transform=None,
) -> HealData:
    """Read ``data`` (and ``eval_data``) as :class:`Samples` and split them (see the module docstring)."""
    if eval_data is None:
        need = images + holdout if isinstance(holdout, int) else math.ceil(images / (1 - holdout)) + 1
    else:
        need = images
    train, source = _as_samples(data, "data", need, model, input_size, in_chans, transform)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    if eval_data is not None:
        held, _ = _as_samples(eval_data, "eval_data", None, model, input_size, in_chans, transform)
        held_idx, train_idx = list(range(len(held))), perm[:images]
    else:
        n = len(train)
        n_hold = holdout if isinstance(holdout, int) else (max(1, round(holdout * n)) if holdout > 0 else 0)
        if n - n_hold < 1:
            raise DataError(
                f"only {n} image(s) in {source}: nothing is left to train on after holding out {n_hold}; "
                "give more images, a smaller holdout, or eval_data="
            )
        held = train if n_hold else None
        held_idx, train_idx = sorted(perm[:n_hold]), perm[n_hold : n_hold + images]
    labelled = held is not None and bool(held_idx) and _has_labels(held, held_idx[:1])  # accuracy: held-out only
    return HealData(train, train_idx, held, held_idx, labelled, source)


def _has_labels(samples: Samples, idx: list[int]) -> bool:
    if isinstance(samples, TensorSamples):
        return samples.y is not None
    return all(samples[i][1] is not None for i in idx)


def _as_samples(data, what, need, model, size, in_chans, transform) -> tuple[Samples, str]:
    if isinstance(data, (str, os.PathLike)):
        paths = list_images(data)
        if in_chans not in _PIL_MODES:
            raise DataError(f"images from a folder can feed 1, 3 or 4 channels; the model takes {in_chans}")
        tf = transform or create_image_transform(model, size, in_chans)
        return FolderSamples(paths, tf, _PIL_MODES[in_chans], Path(data)), f"folder {str(data)!r}"
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise DataError(f"{what}: a tensor of images must be (N, C, H, W), got shape {tuple(data.shape)}")
        return TensorSamples(_check_images(data, what, in_chans)), f"a tensor of {len(data)} images"
    map_style = not isinstance(data, torch.utils.data.IterableDataset) and hasattr(data, "__len__")
    if isinstance(data, torch.utils.data.Dataset) and map_style:
        if len(data) == 0:
            raise DataError(f"{what}: the dataset is empty; give it images")
        return DatasetSamples(data, what), f"a {type(data).__name__} of {len(data)} images"
    if hasattr(data, "__iter__"):
        x, y = _materialise(data, what, need, in_chans)
        return TensorSamples(x, y), f"a {type(data).__name__} ({len(x)} images read)"
    raise DataError(
        f"{what}: cannot read images from a {type(data).__name__}; pass a folder path, an (N, C, H, W) tensor, "
        "a Dataset or an iterable / DataLoader of image tensors"
    )


def _materialise(data, what: str, need: int | None, in_chans: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys, n = [], [], 0
    for k, item in enumerate(_iterate(data, what)):
        x, y = _split_item(item, f"{what} item {k}")
        if x.dim() == 3:
            x = x.unsqueeze(0)
            y = None if y is None else torch.as_tensor([y])
        if x.dim() != 4:
            raise DataError(f"{what} item {k}: images must be (C, H, W) or batches (B, C, H, W), got {tuple(x.shape)}")
        xs.append(_check_images(x.detach().cpu(), f"{what} item {k}", in_chans))
        ys.append(None if y is None else torch.as_tensor(y).reshape(-1).long().cpu())
        n += len(x)
        if need is not None and n >= need:
            break
    if not xs:
        raise DataError(f"{what}: the {type(data).__name__} yielded no images; give it images")
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"{what}: images of different shapes {sorted(shapes)}; resize them to one size")
    x = torch.cat(xs)[:need]
    y = torch.cat(ys)[:need] if all(v is not None for v in ys) else None
    return x, y


def _iterate(data, what: str) -> Iterator:
    try:
        yield from data
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{what}: reading it failed: {type(e).__name__}: {e}") from e


def _split_item(item, where: str) -> tuple[torch.Tensor, Any]:
    x, y = item, None
    if isinstance(item, dict):
        key = next((k for k in _IMAGE_KEYS if k in item), None)
        if key is None:
            raise DataError(f"{where}: a dict without an image key (one of {', '.join(_IMAGE_KEYS)}): {sorted(item)}")
        x = item[key]
        y = next((item[k] for k in _LABEL_KEYS if k in item), None)
    elif isinstance(item, (tuple, list)):
        if not item:
            raise DataError(f"{where}: an empty {type(item).__name__}; expected an image or (image, label)")
        x = item[0]
        y = item[1] if len(item) > 1 else None
    if not isinstance(x, torch.Tensor):
        raise DataError(
            f"{where}: expected an image tensor, got a {type(x).__name__}; convert images to tensors "
            "(or pass a folder path: it is read and transformed for the model)"
        )
    if isinstance(y, torch.Tensor) and y.is_floating_point():
        y = None  # soft targets or regression values are no class labels
    return x, y


def _check_images(x: torch.Tensor, where: str, in_chans: int) -> torch.Tensor:
    if not x.is_floating_point():
        raise DataError(
            f"{where}: images are {x.dtype}, not floating point; normalise them the way the model expects "
            "(e.g. timm.data.resolve_data_config(model=model) gives its mean and std)"
        )
    if x.shape[-3] != in_chans:
        raise DataError(
            f"{where}: images have {x.shape[-3]} channel(s) (shape {tuple(x.shape)}); the model takes {in_chans}"
        )
    return x
