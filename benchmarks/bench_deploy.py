"""Latency where users deploy: each original model against its ParC conversion in five runtimes (six rows).

Pairs (``bench_models.PAIRS``): MobileViT-S -> ParC-Net-S (``vit2parc``, 256x256) and the three ParC
ConvNets (ResNet50, MobileNetV2, ConvNeXt-XT, 224x224); ``--models`` selects (``deit_small`` too).

Runtimes, each for the original and the conversion, eval mode, float32, random weights:

  eager       PyTorch eager, ``torch.inference_mode()``; ParC on ``auto``, the ParC-MetaFormer fast path on
  compile     ``torch.compile(model, fullgraph=True)`` (inductor, static shapes, default settings), called
              under ``torch.inference_mode()``
  compile-freezing  the same with ``torch._inductor.config.freezing = True`` (inductor's inference setting:
              weight-only work such as BatchNorm folding, kernel resizing and oneDNN weight packing done once
              at compile time)
  onnxruntime ``parc_surgery.export(model, "onnx", ...)`` (torch.export-based exporter, ParC as slice +
              concat + depthwise conv), CPU execution provider, all graph optimizations, no spinning threads
  openvino    ``parc_surgery.export(model, "openvino", ...)``, CPU plugin, inference precision ``--ov-precision``
              (default f32; this CPU would pick bf16 on its own: AMX)
  executorch  ``parc_surgery.export(model, "executorch", ...)``: XNNPACK delegate, ExecuTorch runtime

Every exported / compiled variant is checked against eager before it is timed (``export`` checks to 1e-4;
compile to 1e-4 here, the tests hold it to 1e-5). Threads: ``torch.set_num_threads``, onnxruntime
``intra_op_num_threads``, OpenVINO ``INFERENCE_NUM_THREADS``, ExecuTorch's threadpool size, for each of
``--threads`` (default 1 and 2).

Timing (as ``bench_models.py``): per pair, batch and thread count, all variants (both models x every
runtime) interleaved in one loop: warm-up, then round-robin with the order rotated every round, each sample
after a 20 ms pause and one untimed call (worker threads a runtime leaves spinning would otherwise take the
second core from the next variant), inner repeats so each sample lasts ``--min-sample-ms``, median (and min)
over ``--repeats`` rounds.

Each (pair, thread count) runs in a child process of its own, which sets every runtime's thread count once
before anything runs: inductor bakes the thread count into its kernels, and resizing ExecuTorch's global
threadpool after it has run killed the process (no traceback). The parent prints each child's output and
the combined table.

Targets (medians): ParC-Net-S at least 1.23x faster than MobileViT-S (the papers' figure) on at least
three of the five runtimes (``compile`` counts, ``compile-freezing`` is shown apart) and never slower on any
row; compiled ParC-Net-S at least 1.2x faster than compiled MobileViT-S at batch 1 (both compile rows
reported); every ParC ConvNet at most 1.1x its baseline's time in every row.

Usage:
  python benchmarks/bench_deploy.py                                    # everything (long: compiles, exports)
  python benchmarks/bench_deploy.py --models mobilevit_s --batch 1 --threads 2 --runtimes eager compile-freezing
  python benchmarks/bench_deploy.py --tiny                             # smoke test: tiny inputs, 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models
from bench_models import CLOCK, PAIRS, Pair, build_pair, time_interleaved

import parc_surgery
from parc_surgery.export_runtimes import get_runtime

RUNTIMES = ("eager", "compile", "compile-freezing", "onnxruntime", "openvino", "executorch")
_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino", "executorch": "executorch"}
_SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte"}


@dataclass
class Row:
    pair: str
    batch: int
    threads: int
    runtime: str
    orig: float | None  # median seconds per call
    parc: float | None
    orig_min: float | None = None
    parc_min: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        """Original time / ParC time (> 1: the conversion is faster)."""
        return None if self.orig is None or self.parc is None else self.orig / self.parc


def _short(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:160]}"


_ET_THREADS = [0]


def _set_threads(runtime: str, n: int) -> None:
    torch.set_num_threads(n)
    if runtime == "executorch" and _ET_THREADS[0] != n:  # a global threadpool: resized only when it changes
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(n)
        _ET_THREADS[0] = n


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _setup(runtime: str, n: int) -> None:
    """Before each timed sample: the runtime's thread count and, for the compiled rows, inductor's ``freezing``
    flag as that row was compiled with. (A global flag: if anything makes Dynamo recompile a model during the
    timing loop, the recompile must not silently pick up the other row's setting; seen once, an original model's
    plain ``compile`` row timed as fast as its ``compile-freezing`` row.)"""
    _set_threads(runtime, n)
    if runtime.startswith("compile"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = runtime == "compile-freezing"


def _own_code(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` inside a wrapper whose ``forward`` is a code object of its own. Dynamo caches compiled graphs per
    code object: the original and its conversion (often one class) and every copy would otherwise share one
    cache (and its recompile limit), and a later compile could be found by an earlier variant's call."""
    ns: dict = {}
    exec("def forward(self, x):\n    return self.inner(x)\n", ns)
    wrapper = type("Compiled", (torch.nn.Module,), {"forward": ns["forward"]})()
    wrapper.inner = model
    return wrapper.eval()


def compiled(model: torch.nn.Module, x: torch.Tensor, *, freezing: bool) -> tuple[Callable, str]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freezing
    t0 = time.perf_counter()
    fn = torch.compile(_own_code(model), fullgraph=True, dynamic=False)
    with torch.inference_mode():
        y = fn(x)
        ref = model(x)
    err = float((y - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    if not err <= 1e-4:
        raise RuntimeError(f"compiled output differs from eager by {err:.1e}")
    return fn, f"compiled in {time.perf_counter() - t0:.0f} s{', freezing' if freezing else ''}"


def exported(model, x: torch.Tensor, runtime: str, tmpdir: str, tag: str, threads: list[int], args):
    """Export with parc_surgery.export (checked against eager); a loaded runner per thread count."""
    fmt = _FORMAT[runtime]
    path = os.path.join(tmpdir, f"{tag}_b{x.shape[0]}{_SUFFIX[fmt]}")
    t0 = time.perf_counter()
    res = parc_surgery.export(model, fmt, path, input_size=tuple(x.shape[2:]), batch=x.shape[0], force=True)
    note = f"exported in {time.perf_counter() - t0:.0f} s, max diff {res.max_abs_diff:.0e}"
    if fmt == "openvino" and args.ov_precision != "f32":
        return _openvino_runners(res.files[0], threads, args.ov_precision), note + f", {args.ov_precision}"
    load = get_runtime(fmt).load
    runners = {}
    for n in threads:
        _set_threads(runtime, n)
        runners[n] = load([Path(f) for f in res.files], n)
    return runners, note


def _openvino_runners(xml: str, threads: list[int], precision: str) -> dict[int, Callable]:
    import openvino as ov

    from parc_surgery.export_runtimes import openvino_config

    core = ov.Core()
    out = {}
    for n in threads:
        compiled_model = core.compile_model(core.read_model(xml), "CPU", openvino_config(n, precision))
        req = compiled_model.create_infer_request()
        out[n] = lambda x, req=req: req.infer([x.numpy()])
    return out


def bench_pair(pair: Pair, args) -> list[Row]:
    t0 = time.perf_counter()
    orig, conv = build_pair(pair)
    size = args.size or pair.size
    print(f"\n## {pair.original} -> {pair.converted} ({pair.rule}, {size}x{size}), {args.threads} thread(s); built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    rows: list[Row] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench_deploy_")
    try:
        for b in args.batch:
            x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))
            # runner[(model tag, runtime)][threads] -> callable taking no argument
            runners: dict[tuple[str, str], dict[int, Callable]] = {}
            notes: dict[tuple[str, str], str] = {}
            # Exports before compiles: ExecuTorch's first lowering in a process discards Dynamo's compiled code
            # (XNNPACK's bilinear-upsampling pass builds its patterns once with a strict torch.export, which calls
            # torch._dynamo.reset()), which made each model compiled before it compile anew inside the timing loop.
            build_order = sorted(args.runtimes, key=lambda r: r.startswith("compile"))
            for tag, model in (("orig", orig), ("parc", conv)):
                for rt in build_order:
                    key = (tag, rt)
                    try:
                        if rt == "eager":
                            runners[key] = {n: (lambda m=model, x=x: m(x)) for n in args.threads}
                        elif rt.startswith("compile"):  # inductor bakes the thread count in its kernels: one per count
                            runners[key] = {}
                            for n in args.threads:
                                torch.set_num_threads(n)
                                frz = rt == "compile-freezing"
                                fn, notes[key] = compiled(model, x, freezing=frz)
                                runners[key][n] = lambda fn=fn, x=x: fn(x)
                        else:
                            per_thread, notes[key] = exported(model, x, rt, tmp.name, tag, args.threads, args)
                            runners[key] = {n: (lambda r=r, x=x: r(x)) for n, r in per_thread.items()}
                    except Exception as e:
                        notes[key] = f"n/a ({_short(e)})"
                    print(f"  {tag} {rt} batch {b}: {notes.get(key, 'ready')}", flush=True)
            for n in args.threads:
                variants = {}
                for (tag, rt), per_thread in runners.items():
                    variants[f"{tag} {rt}"] = ((lambda rt=rt, n=n: _setup(rt, n)), per_thread[n])
                graphs = _graph_count()
                with torch.inference_mode():
                    samples = time_interleaved(
                        variants, repeats=args.repeats, warmup=args.warmup, min_sample_s=args.min_sample_ms / 1e3
                    )
                if _graph_count() != graphs:
                    new = _graph_count() - graphs
                    print(f"  !! Dynamo compiled {new} new graph(s) during the timing loop", flush=True)
                for rt in args.runtimes:
                    o, p = samples.get(f"orig {rt}"), samples.get(f"parc {rt}")
                    note = "; ".join(f"{t}: {notes[(t, rt)]}" for t in ("orig", "parc") if (t, rt) in notes)
                    med = [statistics.median(v) if v else None for v in (o, p)]
                    best = [min(v) if v else None for v in (o, p)]
                    rows.append(Row(pair.key, b, n, rt, med[0], med[1], best[0], best[1], note))
                print_table([r for r in rows if r.batch == b and r.threads == n])
    finally:
        tmp.cleanup()
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        "\n| pair | batch | threads | runtime | original ms (median / min) | ParC ms (median / min) | "
        "ParC speed-up | note |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        o = "n/a" if r.orig is None else f"{r.orig * 1e3:.1f} / {r.orig_min * 1e3:.1f}"
        p = "n/a" if r.parc is None else f"{r.parc * 1e3:.1f} / {r.parc_min * 1e3:.1f}"
        s = "" if r.speedup is None else f"{r.speedup:.2f}x"
        pair = PAIRS[r.pair]
        print(f"| {pair.converted} vs {pair.original} | {r.batch} | {r.threads} | {r.runtime} | {o} | {p} | {s} | "
              f"{r.note} |")  # fmt: skip
    sys.stdout.flush()


def check_targets(rows: list[Row]) -> list[str]:
    out = []
    for key in dict.fromkeys(r.pair for r in rows):
        pair = PAIRS[key]
        rs = [r for r in rows if r.pair == key and r.speedup is not None]
        for b, n in dict.fromkeys((r.batch, r.threads) for r in rs):
            cell = [r for r in rs if r.batch == b and r.threads == n]
            head = f"{pair.converted} vs {pair.original}, batch {b}, {n} thread(s)"
            ups = ", ".join(f"{r.runtime} {r.speedup:.2f}x" for r in cell)
            if pair.target == "faster":
                fast = [r for r in cell if r.speedup >= 1.23 and r.runtime != "compile-freezing"]
                slower = [r for r in cell if r.speedup < 1.0]
                ok = len(fast) >= 3 and not slower
                out.append(f"{head}: >= 1.23x on {len(fast)} of the runtimes, slower in {len(slower)} row(s) "
                           f"(target: >= 3, none slower): {'PASS' if ok else 'FAIL'} ({ups})")  # fmt: skip
                for comp in (r for r in cell if r.runtime.startswith("compile") and b == 1):
                    out.append(f"  {comp.runtime}, batch 1: {comp.speedup:.2f}x (target >= 1.20x): "
                               f"{'PASS' if comp.speedup >= 1.2 else 'FAIL'}")  # fmt: skip
            elif pair.target == "parity":
                worst = min(cell, key=lambda r: r.speedup)
                ok = 1 / worst.speedup <= 1.1
                out.append(f"{head}: worst {worst.runtime} {1 / worst.speedup:.2f}x the baseline's time "
                           f"(target <= 1.10x everywhere): {'PASS' if ok else 'FAIL'} ({ups})")  # fmt: skip
    return out


def _run_child(key: str, threads: int, argv: list[str]) -> list[Row]:
    """Run this script for one pair and one thread count in a fresh process; its rows (or none if it died)."""
    drop = {"--models", "--threads"}
    keep, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=")[0] in drop
            if skip:
                continue
        elif skip:
            continue
        keep.append(a)
    with tempfile.TemporaryDirectory(prefix="bench_deploy_child_") as d:
        out = Path(d) / "rows.json"
        cmd = [sys.executable, os.path.abspath(__file__), *keep, "--models", key, "--threads", str(threads),
               "--child-json", str(out)]  # fmt: skip
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0 or not out.exists():
            print(f"\n!! {key}, {threads} thread(s): the child process ended with code {rc}; no rows", flush=True)
            return []
        return [Row(**r) for r in json.loads(out.read_text())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=tuple(PAIRS), default=["mobilevit_s", "resnet50",
                    "mobilenetv2_100", "convnext_xt"])  # fmt: skip
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=None, help="input size (default: each pair's own)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-sample-ms", type=float, default=30.0, help="inner repeats make each sample this long")
    ap.add_argument("--ov-precision", choices=("f32", "bf16"), default="f32", help="OpenVINO inference precision")
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCK),
        default="wall",
        help="wall: perf_counter (latency); cpu: process CPU time of all threads (for A/B runs on a loaded machine; "
        "use with OMP_WAIT_POLICY=PASSIVE)",
    )
    ap.add_argument("--tiny", action="store_true", help="smoke test: 64x64 inputs, batch 1, 1 thread, 2 rounds")
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)  # internal: one pair / thread count
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.repeats, args.warmup, args.min_sample_ms = 64, [1], 2, 1, 1.0
        args.threads = args.threads if args.child_json else [1]
    bench_models._clock = CLOCK[args.clock]
    load = os.getloadavg()
    if not args.child_json:
        print(
            f"# torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, threads={args.threads}, batch={args.batch}, repeats={args.repeats}, "
            f"runtimes={args.runtimes}, clock={args.clock}, openvino precision={args.ov_precision}, "
            f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
            flush=True,
        )
    rows: list[Row] = []
    if args.child_json:  # one pair, one thread count, in this process
        torch.set_num_threads(args.threads[0])
        if "executorch" in args.runtimes:
            with contextlib.suppress(ImportError):  # (not installed: its rows say so)
                _set_threads("executorch", args.threads[0])
        for key in args.models:
            rows += bench_pair(PAIRS[key], args)
        Path(args.child_json).write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
        return 0
    for key in args.models:
        for n in args.threads:
            rows += _run_child(key, n, argv if argv is not None else sys.argv[1:])
    print("\n# All results (speed-up = original time / ParC time, medians)")
    print_table(rows)
    print("\n# Targets")
    for line in check_targets(rows):
        print(line)
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
