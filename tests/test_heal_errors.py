"""Bad input to ``parc_surgery.heal`` gets a ParcSurgeryError naming the problem and the fix; nothing is changed.

No training happens here: every error is raised before or at the first teacher pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from heal_helpers import write_folder
from toy_models import HybridNet, ToyViT

import parc_surgery as ps
from parc_surgery.errors import CheckpointError, ConfigError, DataError, ParcSurgeryError, TeacherMismatchError


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    return ps.convert(ToyViT(dim=16, depth=2, patch=4), "attention2parc", input_size=16, validate=False, count=False)


def _heal(conv, data, **kw):
    return ps.heal(conv, data, **{"recon_steps": 1, "distill_steps": 1, "batch_size": 8, "holdout": 2, **kw})


def test_error_classes():
    assert issubclass(DataError, ConfigError) and issubclass(TeacherMismatchError, ConfigError)
    assert issubclass(DataError, ParcSurgeryError) and ps.DataError is DataError


def test_folder_errors(conv, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _heal(conv, tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        _heal(conv, tmp_path / "file.png")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in .*empty.*nothing"):
        _heal(conv, empty)
    (empty / "sub" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"holds 1 file\(s\), none of them a \.jpg/\.jpeg/\.png/\.webp image"):
        _heal(conv, empty)


def test_unreadable_image_is_named(conv, tmp_path):
    write_folder(tmp_path, n=6)
    bad = tmp_path / "a" / "zz_broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*zz_broken\.png.*Remove or replace the file"):
        _heal(conv, tmp_path, holdout=0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.randn(4, 3, 16), r"must be \(N, C, H, W\)"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), "not floating point; normalise them"),
        (torch.randn(4, 1, 16, 16), r"1 channel\(s\).*the model takes 3"),
        ([], "yielded no images"),
        (["a", "b"], "expected an image tensor, got a str"),
        ([{"img": torch.randn(3, 16, 16)}], "a dict without an image key"),
        ([torch.randn(3, 16, 16), torch.randn(3, 8, 8)], "images of different shapes"),
        (torch.randn(1, 3, 16, 16), "nothing is left to train on"),
        (42, "cannot read images from a int"),
    ],
)
def test_python_data_errors(conv, data, match):
    with pytest.raises(DataError, match=match):
        _heal(conv, data, holdout=0.5)


def test_images_that_do_not_fit_the_model(conv):
    teacher = conv.original
    with pytest.raises(DataError, match=r"teacher fails on images of shape \(.*, 3, 2, 2\).*planned at 16x16"):
        _heal(conv, torch.randn(12, 3, 2, 2))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())  # hooks removed


class SkipViT(ToyViT):
    """Has every target, but its forward never calls the attention blocks."""

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.pool(x))


def test_teacher_mismatch(conv):
    x = torch.randn(12, 3, 16, 16)
    with pytest.raises(TeacherMismatchError, match="the teacher is the converted model itself"):
        _heal(conv, x, teacher=conv.model)
    with pytest.raises(TeacherMismatchError, match=r"has no module 'blocks\.0\.attn'"):
        _heal(conv, x, teacher=HybridNet())
    other = ToyViT(dim=16, depth=2, patch=4)
    other.blocks[0].attn = torch.nn.Identity()
    with pytest.raises(TeacherMismatchError, match=r"'blocks.0.attn' is a Identity, but the conversion replaced"):
        _heal(conv, x, teacher=other)
    with pytest.raises(TeacherMismatchError, match="never called target"):
        _heal(conv, x, teacher=SkipViT(dim=16, depth=2, patch=4))
    with pytest.raises(TeacherMismatchError, match=r"must be a torch\.nn\.Module"):
        _heal(conv, x, teacher="resnet18")


def test_conversion_without_its_original_needs_a_teacher(conv):
    with pytest.raises(ConfigError, match="pass the original model as teacher="):
        _heal(dataclasses.replace(conv, original=None), torch.randn(12, 3, 16, 16))
    with pytest.raises(ConfigError, match=r"must be what parc_surgery\.convert returned"):
        ps.heal(conv.model, torch.randn(12, 3, 16, 16))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"recon_step": 3}, "unknown option.*'recon_step' \\(did you mean 'recon_steps'\\?\\)"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"trainable": "norms"}, "trainable must be one of replaced, replaced\\+norms, all"),
        ({"stages": (3,)}, "stages must be a non-empty subset"),
        ({"holdout": 1.0}, "holdout must be a fraction"),
        ({"temperature": 0}, "temperature must be a number > 0"),
        ({"device": "tpu:0"}, "is not a torch device"),
        ({"distill_ema": 1.0}, "distill_ema must be 0 \\(off\\) or a decay 0 < d < 1"),
        ({"distill_ema": -0.5}, "distill_ema must be 0 \\(off\\) or a decay"),
        ({"augment": "flip"}, "unknown augment 'flip' in 'flip'; known: shift:N"),
        ({"augment": "shift:0"}, "augment 'shift:0': the value after shift: must be an int >= 1"),
        ({"augment": ("mixup:x",)}, "augment 'mixup:x': the value after mixup: must be a number > 0"),
        ({"augment": "shift:2", "features": 0.1}, "augment and features cannot be combined"),
    ],
)
def test_bad_options(conv, options, match):
    with pytest.raises(ConfigError, match=match):
        _heal(conv, torch.randn(12, 3, 16, 16), **options)


def test_bad_work_dir(conv, tmp_path):
    x = torch.randn(12, 3, 16, 16)
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match="is a file; give a folder"):
        _heal(conv, x, work_dir=tmp_path / "f")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "heal_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*heal_state\.json.*delete it"):
        _heal(conv, x, work_dir=tmp_path / "w")
