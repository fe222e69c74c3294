"""Benchmark of the ParC operator: spatial, FFT and auto paths against the reference formulation.

The reference formulation is the ParC-Net code's: add the PE, concatenate ``x`` with ``x[..., :N-1]``
along the axis, run a valid depthwise ``F.conv2d`` with the length-N kernel (and bias). All four are
timed *interleaved* in one run (round-robin over the implementations, order rotated every round,
median over rounds), so load on a shared machine hits them alike.

Passes:
  fwd      eval mode under ``torch.no_grad()`` (ParC's eval-mode kernel cache is active)
  fwd-nc   training mode under ``torch.no_grad()`` (no cache: kernel prepared on every call)
  fwd+bwd  training mode, input and parameters require grad, ``backward`` of a random cotangent

Targets checked per cell: spatial <= 1.05 x reference; FFT at least 1.7x faster than spatial in the
forward passes at N >= 56; auto <= 1.10 x min(spatial, FFT).

Usage:
  python benchmarks/bench_parc_op.py                  # full table (several minutes on 2 cores)
  python benchmarks/bench_parc_op.py --quick          # a short run
  python benchmarks/bench_parc_op.py --crossover      # fine N sweep of FFT / spatial, to set choose_impl
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from parc_surgery import ParC
from parc_surgery.ops import choose_impl

IMPLS = ("ref", "spatial", "fft", "auto")
PASSES = ("fwd", "fwd-nc", "fwd+bwd")


def reference(x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor, bias: torch.Tensor, axis: str):
    """The ParC-Net reference formulation (N == K, so no resizing)."""
    dim = 2 if axis == "height" else 3
    x = x + pe
    xp = torch.cat([x, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
    return F.conv2d(xp, weight, bias, groups=x.shape[1])


def make_step(fn: Callable[[torch.Tensor], torch.Tensor], x, g, params, pass_: str) -> Callable[[], None]:
    if pass_ == "fwd+bwd":

        def step():
            for p in params:
                p.grad = None
            x.grad = None
            fn(x).backward(g)

    else:

        def step():
            with torch.no_grad():
                fn(x)

    return step


STAT = {"median": statistics.median, "min": min}
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def time_cell(
    steps: dict[str, Callable[[], None]], rounds: int, min_sample_s: float, stat: str = "median"
) -> dict[str, float]:
    """Seconds per call of each step (median or min over rounds), measured round-robin (order rotated every
    round) with a common inner count."""
    for step in steps.values():  # warm up (allocator, MKL plans, kernel caches)
        step()
        step()
    t0 = _clock()
    steps["ref"]()
    est = max(_clock() - t0, 1e-6)
    inner = max(1, int(min_sample_s / est + 0.5))
    names = list(steps)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t0 = _clock()
            for _ in range(inner):
                steps[k]()
            samples[k].append((_clock() - t0) / inner)
    return {k: STAT[stat](v) for k, v in samples.items()}


def bench(axis: str, channels, sizes, batch: int, rounds: int, min_sample_s: float, stat: str, passes=PASSES):
    rows = []
    for c in channels:
        for n in sizes:
            torch.manual_seed(0)
            mods = {impl: ParC(c, n, axis, pe=True, bias=True, impl=impl) for impl in ("spatial", "fft", "auto")}
            for m in mods.values():
                m.load_state_dict(mods["spatial"].state_dict())
            src = mods["spatial"]
            ref_params = [src.weight.detach().clone(), src.pe.detach().clone(), src.bias.detach().clone()]
            x = torch.randn(batch, c, n, n)
            g = torch.randn(batch, c, n, n)
            for pass_ in passes:
                train = pass_ != "fwd"
                grad = pass_ == "fwd+bwd"
                for m in mods.values():
                    m.train(train)
                    m.requires_grad_(grad)
                for p in ref_params:
                    p.requires_grad_(grad)
                x.requires_grad_(grad)
                fns = {"ref": lambda x, p=ref_params: reference(x, *p, axis), **mods}
                steps = {
                    k: make_step(fn, x, g, ref_params if k == "ref" else list(mods[k].parameters()), pass_)
                    for k, fn in fns.items()
                }
                t = time_cell(steps, rounds, min_sample_s, stat)
                rows.append({"axis": axis, "pass": pass_, "C": c, "N": n, **t})
                print(format_row(rows[-1]), flush=True)
            del x, g, mods
    return rows


def ratios(row) -> tuple[float, float, float]:
    sp_ref = row["spatial"] / row["ref"]
    fft_sp = row["fft"] / row["spatial"]
    auto_min = row["auto"] / min(row["spatial"], row["fft"])
    return sp_ref, fft_sp, auto_min


def targets(row) -> tuple[bool, bool | None, bool]:
    sp_ref, fft_sp, auto_min = ratios(row)
    fft_ok = (fft_sp <= 1 / 1.7) if (row["pass"] != "fwd+bwd" and row["N"] >= 56) else None
    return sp_ref <= 1.05, fft_ok, auto_min <= 1.10


HEADER = (
    "| axis | pass | C | N | ref ms | spatial ms | fft ms | auto ms (pick) | spatial/ref | fft/spatial | fft/ref "
    "| auto/min | sp<=1.05ref | fft>=1.7x | auto<=1.1min |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(row) -> str:
    sp_ref, fft_sp, auto_min = ratios(row)
    ok = ["yes" if v else ("-" if v is None else "NO") for v in targets(row)]
    pick = choose_impl(row["N"], axis=row["axis"], channels=row["C"], grad=row["pass"] == "fwd+bwd")
    ms = {k: row[k] * 1e3 for k in IMPLS}
    return (
        f"| {row['axis']} | {row['pass']} | {row['C']} | {row['N']} | {ms['ref']:.3f} | {ms['spatial']:.3f} | "
        f"{ms['fft']:.3f} | {ms['auto']:.3f} ({pick}) | {sp_ref:.2f} | {fft_sp:.2f} | {row['fft'] / row['ref']:.2f} | "
        f"{auto_min:.2f} | {ok[0]} | {ok[1]} | {ok[2]} |"
    )


def summary(rows) -> str:
    lines = []
    names = ("spatial <= 1.05 x ref", "FFT >= 1.7x faster than spatial (fwd passes, N >= 56)", "auto <= 1.10 x min")
    for i, name in enumerate(names):
        cells = [r for r in rows if targets(r)[i] is not None]
        if cells:
            held = sum(bool(targets(r)[i]) for r in cells)
            worst = max(ratios(r)[i] for r in cells)
            lines.append(f"{name}: {held}/{len(cells)} cells; worst ratio {worst:.2f}")
    big = [r["fft"] / r["ref"] for r in rows if r["pass"] != "fwd+bwd" and r["N"] >= 56]
    if big:
        lines.append(f"FFT / ref (fwd passes, N >= 56): {min(big):.2f} .. {max(big):.2f}")
    return "\n".join(lines)


def crossover(channels, sizes, batch, rounds, min_sample_s, stat, axes=("height",), dense=False):
    """FFT / spatial time ratios over a fine N grid, per pass (the basis of choose_impl)."""
    kind = "dense" if dense else "depthwise"
    print(f"{kind}\n\n| axis | pass | C | N | spatial ms | fft ms | fft/spatial |\n|---|---|---|---|---|---|---|")
    for axis in axes:
        for c in channels:
            for n in sizes:
                torch.manual_seed(0)
                sp = ParC(c, n, axis, impl="spatial", dense=dense)
                ff = ParC(c, n, axis, impl="fft", dense=dense)
                ff.load_state_dict(sp.state_dict())
                x = torch.randn(batch, c, n, n)
                g = torch.randn(batch, c, n, n)
                for pass_ in ("fwd", "fwd+bwd"):
                    grad = pass_ == "fwd+bwd"
                    for m in (sp, ff):
                        m.train(grad)
                    x.requires_grad_(grad)
                    steps = {
                        "ref": make_step(sp, x, g, list(sp.parameters()), pass_),  # "ref" is spatial here
                        "fft": make_step(ff, x, g, list(ff.parameters()), pass_),
                    }
                    t = time_cell(steps, rounds, min_sample_s, stat)
                    print(
                        f"| {axis} | {pass_} | {c} | {n} | {t['ref'] * 1e3:.3f} | {t['fft'] * 1e3:.3f} | "
                        f"{t['fft'] / t['ref']:.2f} |",
                        flush=True,
                    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="C=64, N in {14, 56}, height, few rounds")
    ap.add_argument("--axis", choices=("height", "width", "both"), default="height")
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 28, 56, 112])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-sample-ms", type=float, default=5.0, help="inner repeats make each sample this long")
    ap.add_argument("--stat", choices=tuple(STAT), default="median", help="statistic over rounds")
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCK),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time of all threads (robust to preemption on a loaded machine; "
        "run with OMP_WAIT_POLICY=PASSIVE so idle threads do not spin)",
    )
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crossover", action="store_true", help="fine N sweep of FFT vs spatial instead of the table")
    ap.add_argument("--dense", action="store_true", help="with --crossover: dense (channel-mixing) kernels")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCK[args.clock]
    if args.quick:
        args.channels, args.sizes, args.rounds = [64], [14, 56], 5
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
        f"batch={args.batch}, rounds={args.rounds}, stat={args.stat}, clock={args.clock}, float32, pe+bias, K=N\n"
    )
    if args.crossover:
        sizes = args.sizes if args.sizes != [7, 14, 28, 56, 112] else [40, 48, 56, 64, 72, 80, 96, 112, 128]
        axes = ("height", "width") if args.axis == "both" else (args.axis,)
        crossover(args.channels, sizes, args.batch, args.rounds, args.min_sample_ms / 1e3, args.stat, axes, args.dense)
        return
    axes = ("height", "width") if args.axis == "both" else (args.axis,)
    print(HEADER)
    rows = []
    for axis in axes:
        rows += bench(
            axis, args.channels, args.sizes, args.batch, args.rounds, args.min_sample_ms / 1e3, args.stat, args.passes
        )
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
