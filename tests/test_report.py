"""The audit record: JSON round trip, Markdown and rich renderings, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
from rich.console import Console

from parc_surgery import report as report_mod
from parc_surgery.blocks import CarryRecord
from parc_surgery.errors import CheckpointError, ConfigError
from parc_surgery.report import Check, Report, TargetReport, format_count, format_macs, format_params, write_report


def _report(*, failing: bool = True, uncounted: dict | None = None) -> Report:
    carry = CarryRecord(
        kept=(("conv.weight", "conv_kxk.weight"),),
        transformed=(("parc_h.weight", ("conv_kxk.weight",), "fold 3x3 into the ParC kernel"),),
        new=("parc_h.pe",),
        dropped=(),
    )
    targets = (
        TargetReport("stages.2.1", "parcnet", "timm.models.mobilevit.MobileVitBlock", 1_234_567, 1_034_567,
                     900_000_000, 700_000_000, 10, 2, 8, 1, carry.to_dict()),
        TargetReport("stages.3.1", "parcnet", "timm.models.mobilevit.MobileVitBlock", 2_000_000, 1_999_999,
                     None, None, 0, 0, 0, 0, None),
    )  # fmt: skip
    checks = (
        Check("output shape", True, "(1, 1000) == (1, 1000)"),
        Check("traced == eager", not failing, "max abs diff 3.2e-07" if not failing else "max abs diff 0.5 > 1e-5"),
    )
    return Report(
        model="mobilevit_s",
        rule="attention2parc",
        input_size=(256, 256),
        params_before=5_578_632,
        params_after=5_037_100,
        macs_before=2_000_831_488,
        macs_after=1_657_300_000,
        macs_after_fft=1_500_000_000,
        targets=targets,
        checks=checks,
        uncounted_ops=uncounted if uncounted is not None else {},
        notes=("ParC kernels sized at 256x256",),
    )


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (5_037_100, "", "5.0371 M"),
        (1_657_300_000, "MACs", "1.6573 G MACs"),
        (25_557_032, "", "25.5570 M"),
        (12_345, "", "12.3450 K"),
        (999, "", "999"),
        (None, "", "n/a"),
    ],
)
def test_format_count(value, unit, text):
    assert format_count(value, unit) == text


def test_format_helpers():
    assert format_params(3_504_872) == "3.5049 M"
    assert format_macs(300_774_272) == "300.7743 M MACs"
    assert format_macs(None) == "n/a"


def test_passed():
    assert not _report(failing=True).passed
    assert _report(failing=False).passed


def test_json_round_trip():
    rep = _report(uncounted={"aten.linalg_inv_ex": 2})
    data = json.loads(rep.to_json())
    for key in ("params_before", "params_after", "macs_before", "macs_after", "input_size", "targets", "checks"):
        assert key in data
    assert data["input_size"] == [256, 256] and data["passed"] is False
    assert {"name", "block", "params_before", "params_after"} <= set(data["targets"][0])
    assert data["checks"][1] == {"name": "traced == eager", "passed": False, "detail": "max abs diff 0.5 > 1e-5"}
    back = Report.from_dict(data)
    assert back == rep
    assert back.targets[0].carry["transformed"][0]["how"] == "fold 3x3 into the ParC kernel"


def test_from_dict_errors():
    data = _report().to_dict()
    del data["model"]
    with pytest.raises(ConfigError, match="missing key 'model'"):
        Report.from_dict(data)
    newer = _report().to_dict() | {"version": 99}
    with pytest.raises(ConfigError, match="version 99 is newer"):
        Report.from_dict(newer)
    bad = _report().to_dict()
    bad["checks"][0]["pased"] = True
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['pased'\] in checks"):
        Report.from_dict(bad)


def test_markdown_has_the_figures():
    md = _report(uncounted={"aten.linalg_inv_ex": 2}).to_markdown()
    for text in ("5.5786 M", "5.0371 M", "2.0008 G MACs", "1.6573 G MACs", "1.5000 G MACs", "0.9029x (-9.71%)",
                 "stages.2.1", "timm.models.mobilevit.MobileVitBlock", "FAIL", "max abs diff 0.5 > 1e-5",
                 "SOME CHECKS FAILED", "aten.linalg_inv_ex", "MACs = multiply-accumulates", "@ 256x256",
                 "ParC kernels sized at 256x256"):  # fmt: skip
        assert text in md, text
    assert "all checks passed" in _report(failing=False).to_markdown()


def test_rich_tables_render():
    tables = _report(uncounted={"aten.linalg_inv_ex": 2}).rich_tables()
    assert len(tables) == 3
    console = Console(record=True, width=120)
    for t in tables:
        console.print(t)
    text = console.export_text()
    for needle in ("5.0371 M", "1.6573 G MACs", "MACs = multiply-accumulates", "Targets (2)", "stages.3.1",
                   "Checks (1/2 passed)", "FAIL", "PASS", "aten.linalg_inv_ex"):  # fmt: skip
        assert needle in text, needle


@pytest.mark.parametrize("suffix", [".json", ".md", ".MD"])
def test_write_report(tmp_path, suffix):
    rep = _report()
    path = write_report(rep, tmp_path / f"audit{suffix}")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        assert Report.from_dict(json.loads(text)) == rep
    else:
        assert text == rep.to_markdown()
    assert os.listdir(tmp_path) == [f"audit{suffix}"]


def test_write_report_bad_suffix(tmp_path):
    with pytest.raises(ConfigError, match=r"unsupported suffix '\.txt'.*\.json.*\.md"):
        write_report(_report(), tmp_path / "audit.txt")
    with pytest.raises(ConfigError, match="unsupported suffix '\\(none\\)'"):
        write_report(_report(), tmp_path / "audit")
    assert os.listdir(tmp_path) == []


def test_write_report_render_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(Report, "to_json", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(_report(), tmp_path / "audit.json")
    assert os.listdir(tmp_path) == []


def test_write_report_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "audit.md"
    target.write_text("old report\n", encoding="utf-8")

    def fail_replace(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(report_mod.os, "replace", fail_replace)
    with pytest.raises(CheckpointError, match=r"cannot write .*audit\.md.*Permission denied"):
        write_report(_report(), target)
    assert target.read_text(encoding="utf-8") == "old report\n"
    assert os.listdir(tmp_path) == ["audit.md"]  # the temporary file is gone


def test_write_report_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        write_report(_report(), tmp_path / "no" / "audit.json")


def test_rich_cells_are_not_markup():
    rep = Report("m[0]", "r", (8, 8), 1, 1, None, None, None, (), (Check("[red]x[/red]", True, "shape [1, 3]"),), {})
    console = Console(record=True, width=120)
    for t in rep.rich_tables():
        console.print(t)
    text = console.export_text()
    assert "[red]x[/red]" in text and "shape [1, 3]" in text and "m[0]" in text
    assert "n/a" in text and rep.passed
