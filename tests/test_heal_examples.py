"""examples/heal_folder.py on a tiny budget: resumed after an interruption, and as a 2-process torchrun job (gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "heal_folder.py"
TINY = ["--images", "60", "--teacher-steps", "5", "--steps", "3", "--dim", "16", "--depth", "1", "--batch-size", "8"]


def _import():
    spec = importlib.util.spec_from_file_location("parc_example_heal_folder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_resumes_after_stage_1(tmp_path, capsys):
    example = _import()
    first = example.main([*TINY, "--out", str(tmp_path), "--interrupt-after-stage-1"])
    assert [s["stage"] for s in first["stages"]] == [1] and not first["stages"][0]["resumed"]
    second = example.main([*TINY, "--out", str(tmp_path)])
    assert [(s["stage"], s["resumed"]) for s in second["stages"]] == [(1, True), (2, False)]
    assert second["points"]["stage 1"] == first["points"]["stage 1"]  # read back from the work folder
    assert second["reload_max_abs_diff"] == 0.0  # parc_surgery.load gives the healed model back exactly
    assert second["images_train"] + second["images_heldout"] == 60
    assert "## Heal" in capsys.readouterr().out


def test_example_under_torchrun_with_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           *TINY, "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [s["steps_done"] for s in summary["stages"]] == [3, 3]
    assert set(summary["points"]) == {"converted", "stage 1", "stage 2"}
    assert proc.stdout.count("## Heal") == 1  # only rank 0 prints
    assert summary["reload_max_abs_diff"] == 0.0
