"""``count_macs_impls``: one pass, the same counts as a ``count_macs`` pass per ParC implementation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parc_surgery.blocks.metaformer import ParCMetaFormerBlock
from parc_surgery.blocks.parc_split import ParCSplit
from parc_surgery.errors import ConfigError
from parc_surgery.flops import count_macs, count_macs_impls
from parc_surgery.ops import ParC


def _model() -> nn.Module:
    torch.manual_seed(0)
    shared = ParC(16, 6, "width", pe=True, bias=True)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        ParCSplit(16, (8, 6), dense=True),  # dense ParCs: a different FFT formula
        ParCMetaFormerBlock(16, (8, 6), pe=True),
        shared,
        nn.Sequential(shared),  # the same ParC called twice, under two names
        nn.Conv2d(16, 4, 1),
    ).eval()


@pytest.mark.parametrize("size", [(8, 6), (12, 20)])
def test_same_counts_as_separate_passes(size):
    device = "meta"  # what convert uses (on a real device, counts of eval ParCs depend on their kernel cache)
    model = _model()
    both = count_macs_impls(model, size, ("spatial", "fft", "auto"), batch=2, device=device)
    for impl in ("spatial", "fft", "auto"):
        ref = count_macs(model, size, batch=2, parc_impl=impl, device=device)
        got = both[impl]
        assert (got.macs, got.flops) == (ref.macs, ref.flops)
        assert got.uncounted == ref.uncounted
        assert set(got.per_op) == set(ref.per_op)
        assert all(abs(got.per_op[k] - ref.per_op[k]) <= 8 for k in ref.per_op)
        # a shared module's calls are attributed by call context; compare the unshared modules
        assert all(
            abs(got.per_module[k] - ref.per_module[k]) <= 8 for k in ref.per_module if k not in {"3", "4", "4.0"}
        )
    assert both["fft"].macs != both["spatial"].macs  # the two formulations really differ here


def test_model_without_parc_and_bad_impls():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    out = count_macs_impls(model, 16, device="meta")
    assert out["spatial"].macs == out["fft"].macs == count_macs(model, 16, device="meta").macs
    with pytest.raises(ConfigError, match="impls"):
        count_macs_impls(model, 16, ("spatial", "winograd"))
