"""How fast is the tool itself: ``convert`` (probe, plan, rewrite, MAC counts, every check) and the dry run.

1. ``convert(model, rule)`` with validation and MAC counting on, as ``parc-convert`` runs it, for
   ``mobilevit_s`` (``vit2parc``, target <= 3 s) and ``vit_base_patch16_224`` (``vit_attention2parc``,
   target <= 5 s), CPU, ``torch.set_num_threads(2)``. The model is built once (its build time is printed
   apart and not counted); each repeat converts it again (``convert`` never modifies its input); min and
   median over the repeats, wall time and process CPU time (all threads).
2. ``parc-convert vit_giant_patch14_224 --rule vit_attention2parc --dry-run`` (a 1 B-parameter model on
   the meta device: shapes only) in a fresh subprocess, from interpreter start to exit: target <= 10 s
   and <= 1 GiB peak resident memory: the child's own ``VmHWM`` (``/proc/self/status``) and
   ``getrusage(RUSAGE_SELF).ru_maxrss``; the parent's ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is printed
   too, but it also covers helper processes the child forks while importing torch, and a forked process
   starts with its parent's resident pages, so it can read higher than the child itself ever was.

Usage:
  python benchmarks/bench_convert.py                 # both, 3 repeats
  python benchmarks/bench_convert.py --repeats 5 --skip-dry-run
  python benchmarks/bench_convert.py --profile mobilevit_s   # cProfile of one convert (top functions)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time

CASES = {  # model -> (rule, target seconds)
    "mobilevit_s": ("vit2parc", 3.0),
    "vit_base_patch16_224": ("vit_attention2parc", 5.0),
}
DRY_MODEL, DRY_RULE = "vit_giant_patch14_224", "vit_attention2parc"
DRY_TARGET_S, DRY_TARGET_RSS = 10.0, 1 << 30

_CHILD = r"""
import contextlib, io, json, os, re, resource, sys, time
t0 = time.perf_counter()
from parc_surgery.cli import main
t_import = time.perf_counter() - t0
out = io.StringIO()
code = 0
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code or 0
t_total = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
m = re.search(r"Checks \((\d+/\d+) passed\)", out.getvalue())
checks = (m.group(1) + " passed") if m else "no check table"
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"import_s": t_import, "in_process_s": t_total, "vmhwm": hwm, "self_maxrss": own, "exit": code,
                  "checks": checks}))
"""


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} / {b:.2f} / {c:.2f}"


def bench_convert(name: str, rule: str, repeats: int) -> dict:
    import timm
    import torch

    from parc_surgery import convert

    t0 = time.perf_counter()
    model = timm.create_model(name, pretrained=False)
    build = time.perf_counter() - t0
    walls, cpus, passed = [], [], True
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        conv = convert(model, rule, strict=False)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        passed = passed and conv.report.passed
        del conv
    return {"build": build, "walls": walls, "cpus": cpus, "passed": passed, "threads": torch.get_num_threads()}


def bench_dry_run(repeats: int) -> list[dict]:
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, "-c", _CHILD, DRY_MODEL, "--rule", DRY_RULE, "--dry-run"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise RuntimeError(f"the dry-run child failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}") from None
        res["wall_s"] = wall
        res["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        res["ru_maxrss"] = after.ru_maxrss * 1024  # KiB on Linux; the max over all children so far
        runs.append(res)
    return runs


def profile_convert(name: str, top: int) -> None:
    import timm

    from parc_surgery import convert

    rule = CASES.get(name, (DRY_RULE, 0))[0]
    model = timm.create_model(name, pretrained=False)
    convert(model, rule, strict=False)  # warm (imports, MKL / oneDNN primitives)
    prof = cProfile.Profile()
    prof.enable()
    convert(model, rule, strict=False)
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(r"parc_surgery|module\.py.*_call_impl", top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=tuple(CASES), default=list(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-dry-run", action="store_true")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--profile", metavar="MODEL", help="cProfile one convert of MODEL instead")
    args = ap.parse_args(argv)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, repeats={args.repeats}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average at start {_load()}",
        flush=True,
    )
    lines = []
    # the dry runs first, while this process is small: a child forked from a big parent inherits its
    # maximum RSS in ru_maxrss (VmHWM, read in the child after exec, is exact either way)
    if not args.skip_dry_run and not args.profile:
        runs = bench_dry_run(args.repeats)
        print(
            f"\n`parc-convert {DRY_MODEL} --rule {DRY_RULE} --dry-run` in a fresh process (default threads):\n\n"
            "| run | wall s (process) | import s | CPU s | peak RSS (VmHWM) | ru_maxrss self | ru_maxrss children |"
            " checks |\n|---|---|---|---|---|---|---|---|"
        )
        for i, r in enumerate(runs):
            print(
                f"| {i + 1} | {r['wall_s']:.2f} | {r['import_s']:.2f} | {r['cpu_s']:.2f} | "
                f"{r['vmhwm'] / 2**20:.0f} MiB | {r['self_maxrss'] / 2**20:.0f} MiB | "
                f"{r['ru_maxrss'] / 2**20:.0f} MiB | {r['checks']} (exit {r['exit']}) |"
            )
        med = statistics.median(r["wall_s"] for r in runs)
        peak = max(max(r["vmhwm"], r["self_maxrss"]) for r in runs)
        ok_t, ok_m = med <= DRY_TARGET_S, peak <= DRY_TARGET_RSS
        lines.append(
            f"dry run {DRY_MODEL}: median {med:.2f} s (target <= {DRY_TARGET_S:g} s): {'PASS' if ok_t else 'FAIL'}; "
            f"peak RSS {peak / 2**20:.0f} MiB (target <= 1024 MiB): {'PASS' if ok_m else 'FAIL'}"
        )

    import torch

    torch.set_num_threads(args.threads)
    if args.profile:
        profile_convert(args.profile, 40)
        return 0
    if not args.skip_convert:
        print(
            f"\n`convert` (torch {torch.__version__}, threads={args.threads}):\n\n"
            "| model | rule | build s | convert+validate s (min / median) | CPU s (min / median) | checks | target |\n"
            "|---|---|---|---|---|---|---|",
            flush=True,
        )
        for name in args.models:
            rule, target = CASES[name]
            r = bench_convert(name, rule, args.repeats)
            lo, med = min(r["walls"]), statistics.median(r["walls"])
            ok = med <= target
            print(
                f"| {name} | {rule} | {r['build']:.2f} | {lo:.2f} / {med:.2f} | {min(r['cpus']):.2f} / "
                f"{statistics.median(r['cpus']):.2f} | {'all pass' if r['passed'] else 'FAILED'} | "
                f"<= {target:g} s: {'PASS' if ok else 'FAIL'} |",
                flush=True,
            )
            lines.append(
                f"convert+validate {name}: median {med:.2f} s (target <= {target:g} s): {'PASS' if ok else 'FAIL'}"
            )
    print("\n# Targets")
    for line in lines:
        print(line)
    print(f"\nload average at end {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
