"""Latency of whole models against their ParC conversions: is the ParC version faster?

Pairs (original -> conversion, rule, input size):

  mobilevit_s      MobileViT-S      -> ParC-Net-S         vit2parc            256
  resnet50         ResNet50         -> ParC-ResNet50      resnet_parc         224
  mobilenetv2_100  MobileNetV2      -> ParC-MobileNetV2   mobilenetv2_parc    224
  convnext_xt      ConvNeXt-XT      -> ParC-ConvNeXt-XT   convnext_parc       224
  deit_small       DeiT-S           -> DeiT-S ParC mixer  vit_attention2parc  224

Variants, per pair and batch size: the original in eager mode; the conversion in eager mode with every
ParC on ``spatial``, on ``fft`` and on ``auto`` (each ParC's ``.impl`` is set before its call), and for
ParC-Net-S also with its ParC-MetaFormer blocks on their reference forward instead of their folded
inference path (``blocks/_metaformer_eval.py``), to show what that path buys; both under
``torch.compile`` (inductor, with ``freezing`` so weight-only work such as kernel resizing is folded
once); both exported to ONNX and run in onnxruntime (ParC exported on its ``spatial`` path: the ONNX
exporters do not translate complex FFTs). A compile or ONNX variant that fails prints ``n/a (reason)``.

All variants of a pair are timed *interleaved* in one run: after a warm-up, round-robin over the
variants (order rotated every round), so load on a shared machine hits them alike; each sample after a
20 ms pause and one untimed call (see ``time_interleaved``). Median and min over
the rounds, eval mode, ``torch.inference_mode()``, ``torch.set_num_threads(--threads)`` (default 2), CPU,
float32, random weights (timing does not depend on them).

Targets checked on the medians (also printed with the mins):
  * ParC-Net-S at least 1.2x faster than MobileViT-S at batch 1, eager, best ParC impl (papers: 1.23x);
  * every ParC ConvNet at most 1.1x slower than its baseline (eager, best impl);
  * ``auto`` at most 1.10x the best fixed impl of the same model.

Usage:
  python benchmarks/bench_models.py                      # everything (compile takes minutes per model)
  python benchmarks/bench_models.py --quick              # eager only, batch 1, few rounds
  python benchmarks/bench_models.py --models mobilevit_s --batch 1 8 --repeats 20 --no-compile
  python benchmarks/bench_models.py --profile mobilevit_s   # torch.profiler op tables, original vs ParC
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from torch import nn

from parc_surgery import ParC, convert
from parc_surgery.blocks._metaformer_eval import reference_forward
from parc_surgery.blocks.metaformer import ParCMetaFormerBlock

IMPLS = ("spatial", "fft", "auto")
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


@dataclass(frozen=True)
class Pair:
    key: str
    original: str
    converted: str
    build: Callable[[], nn.Module]
    rule: str
    size: int
    target: str  # "faster": conversion >= 1.2x faster; "parity": conversion <= 1.1x slower; "": none


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False)


def _convnext_xt() -> nn.Module:
    return timm.models.ConvNeXt(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))


PAIRS = {
    p.key: p
    for p in (
        Pair("mobilevit_s", "MobileViT-S", "ParC-Net-S", _timm("mobilevit_s"), "vit2parc", 256, "faster"),
        Pair("resnet50", "ResNet50", "ParC-ResNet50", _timm("resnet50"), "resnet_parc", 224, "parity"),
        Pair(
            "mobilenetv2_100",
            "MobileNetV2",
            "ParC-MobileNetV2",
            _timm("mobilenetv2_100"),
            "mobilenetv2_parc",
            224,
            "parity",
        ),
        Pair("convnext_xt", "ConvNeXt-XT", "ParC-ConvNeXt-XT", _convnext_xt, "convnext_parc", 224, "parity"),
        Pair("deit_small", "DeiT-S", "DeiT-S ParC", _timm("deit_small_patch16_224"), "vit_attention2parc", 224, ""),
    )
}


def build_pair(pair: Pair) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    orig = pair.build().eval()
    conv = convert(orig, pair.rule, input_size=pair.size).model.eval()
    return orig, conv


def set_impl(model: nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, ParC):
            m.impl = impl


def _short(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:140]}"


# ---------------------------------------------------------------------------------------------------------------
# variants: name -> (setup, call); setup runs outside the timed region


def eager_variants(orig: nn.Module, conv: nn.Module, x: torch.Tensor) -> dict[str, tuple[Callable, Callable]]:
    out = {"orig eager": (lambda: None, lambda: orig(x))}
    for impl in IMPLS:
        out[f"parc eager {impl}"] = (lambda impl=impl: set_impl(conv, impl), lambda: conv(x))
    if any(isinstance(m, ParCMetaFormerBlock) for m in conv.modules()):  # what the blocks' inference path buys

        def reference():
            with reference_forward():
                conv(x)

        out["parc eager spatial, reference blocks"] = (lambda: set_impl(conv, "spatial"), reference)
    return out


def compile_variant(model: nn.Module, x: torch.Tensor, impl: str | None) -> tuple[tuple[Callable, Callable], float]:
    """A ``torch.compile``d model (inductor, freezing), compiled and checked here; returns it and the compile time."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # fold weight-only work (kernel / PE resizing, BN into conv) once
    if impl is not None:
        set_impl(model, impl)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    fn = torch.compile(model, dynamic=False)
    y = fn(x)
    dt = time.perf_counter() - t0
    ref = model(x)
    err = float((y - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    if not err <= 1e-3:
        raise RuntimeError(f"compiled output differs from eager by {err:.1e}")

    def setup():
        if impl is not None:
            set_impl(model, impl)

    return (setup, lambda: fn(x)), dt


def onnx_variant(model: nn.Module, x: torch.Tensor, threads: int, tmpdir: str, tag: str):
    """Export ``model`` at ``x``'s shape (ParC on ``spatial``); returns an onnxruntime call and a note (exporter)."""
    import onnxruntime as ort

    set_impl(model, "spatial")
    path = os.path.join(tmpdir, f"{tag}.onnx")
    why = []
    for dynamo in (False, True):  # legacy first: constant folding bakes the resized kernels for this size
        sink = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    if dynamo:
                        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=18, external_data=False)
                    else:
                        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=18, do_constant_folding=True)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # no busy-waiting between runs: spinning onnxruntime threads would steal the cores from the
            # variants timed after them (and count in their CPU time)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x.numpy()}
            y = torch.from_numpy(sess.run(None, feed)[0])
            with torch.inference_mode():
                ref = model(x)
            err = float((y - ref).abs().max()) / max(1.0, float(ref.abs().max()))
            if not err <= 1e-3:
                raise RuntimeError(f"onnxruntime output differs from eager by {err:.1e}")
            note = ("dynamo" if dynamo else "legacy") + " exporter" + (f" ({why[0]})" if why else "")
            return (lambda: None, lambda sess=sess, feed=feed: sess.run(None, feed)), note
        except Exception as e:  # try the other exporter
            why.append(f"{'dynamo' if dynamo else 'legacy'}: {_short(e)}")
    raise RuntimeError("; ".join(why))


# ---------------------------------------------------------------------------------------------------------------
# timing


def time_interleaved(
    variants: dict[str, tuple[Callable, Callable]],
    *,
    repeats: int,
    warmup: int,
    min_sample_s: float,
    settle_s: float = 0.02,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round, round-robin with the order rotated every round.

    Before each sample: the variant's setup, ``settle_s`` of sleep (the previous variant's runtime may keep its
    worker threads spinning for a while after its last call: OpenMP, TBB in OpenVINO, pthreadpool in XNNPACK;
    on a 2-core machine they would steal the second core from the next variant's two threads) and one untimed
    call (the variant's weights back in cache), so each sample is that variant's steady state."""
    inner: dict[str, int] = {}
    for name, (setup, call) in variants.items():
        setup()
        for _ in range(warmup):
            call()
        setup()
        t0 = _clock()
        call()
        inner[name] = max(1, int(min_sample_s / max(_clock() - t0, 1e-6) + 0.5))
    names = list(variants)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            setup, call = variants[k]
            setup()
            time.sleep(settle_s)
            call()
            n = inner[k]
            t0 = _clock()
            for _ in range(n):
                call()
            samples[k].append((_clock() - t0) / n)
    return samples


@dataclass
class Row:
    pair: Pair
    batch: int
    variant: str
    median: float | None
    best: float | None
    note: str = ""

    @property
    def is_orig(self) -> bool:
        return self.variant.startswith("orig")


def bench_pair(pair: Pair, batches, args) -> list[Row]:
    t0 = time.perf_counter()
    orig, conv = build_pair(pair)
    print(f"\n## {pair.original} -> {pair.converted} ({pair.rule}, {pair.size}x{pair.size}); "
          f"built and converted in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    rows: list[Row] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench_models_")
    try:
        for b in batches:
            x = torch.randn(b, 3, pair.size, pair.size, generator=torch.Generator().manual_seed(0))
            variants = eager_variants(orig, conv, x)
            notes: dict[str, str] = {}
            failed: dict[str, str] = {}
            if not args.no_onnx:  # exported outside inference mode (the exporters trace with autograd tensors)
                for tag, model in (("orig onnxruntime", orig), ("parc onnxruntime spatial", conv)):
                    try:
                        variants[tag], notes[tag] = onnx_variant(model, x, args.threads, tmp.name, tag.split()[0])
                    except Exception as e:
                        failed[tag] = _short(e)
                    set_impl(conv, "auto")
            with torch.inference_mode():
                if not args.no_compile:
                    for tag, model, impl in (("orig compile", orig, None), ("parc compile auto", conv, "auto")):
                        try:
                            variants[tag], dt = compile_variant(model, x, impl)
                            notes[tag] = f"compiled in {dt:.0f} s"
                        except Exception as e:
                            failed[tag] = _short(e)
                        set_impl(conv, "auto")
                samples = time_interleaved(
                    variants, repeats=args.repeats, warmup=args.warmup, min_sample_s=args.min_sample_ms / 1e3
                )
            set_impl(conv, "auto")
            for name, s in samples.items():
                rows.append(Row(pair, b, name, statistics.median(s), min(s), notes.get(name, "")))
            for name, why in failed.items():
                rows.append(Row(pair, b, name, None, None, f"n/a ({why})"))
            print_table([r for r in rows if r.batch == b], args.stat)
    finally:
        tmp.cleanup()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# report


def _stat(r: Row, stat: str) -> float | None:
    return r.median if stat == "median" else r.best


def _baseline(rows: list[Row], r: Row) -> Row | None:
    kind = "eager" if "eager" in r.variant else "compile" if "compile" in r.variant else "onnxruntime"
    same = (o for o in rows if o.pair.key == r.pair.key and o.batch == r.batch)
    return next((o for o in same if o.is_orig and kind in o.variant), None)


def print_table(rows: list[Row], stat: str) -> None:
    print(
        "\n| model | batch | variant | median ms | min ms | vs original (same mode) | note |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in rows:
        name = r.pair.original if r.is_orig else r.pair.converted
        if r.median is None:
            print(f"| {name} | {r.batch} | {r.variant} | n/a | n/a | | {r.note} |")
            continue
        base = _baseline(rows, r)
        rel = ""
        if not r.is_orig and base is not None and base.median is not None:
            q = _stat(r, stat) / _stat(base, stat)
            rel = f"{q:.2f}x time ({1 / q:.2f}x {'faster' if q < 1 else 'speed'})"
        print(f"| {name} | {r.batch} | {r.variant} | {r.median * 1e3:.1f} | {r.best * 1e3:.1f} | {rel} | {r.note} |")
    sys.stdout.flush()


def check_targets(rows: list[Row], stat: str) -> list[str]:
    out = []
    keys = dict.fromkeys((r.pair.key, r.batch) for r in rows)
    for key, b in keys:
        rs = [r for r in rows if r.pair.key == key and r.batch == b and r.median is not None]
        pair = PAIRS[key]
        orig = next((r for r in rs if r.variant == "orig eager"), None)
        impls = {r.variant.split()[-1]: _stat(r, stat) for r in rs if r.variant in {f"parc eager {i}" for i in IMPLS}}
        if orig is None or len(impls) < 3:
            continue
        best_impl = min(("spatial", "fft"), key=lambda k: impls[k])
        best = min(impls.values())
        q = best / _stat(orig, stat)
        auto_q = impls["auto"] / impls[best_impl]
        head = f"{pair.converted} vs {pair.original}, batch {b} (eager, {stat})"
        if pair.target == "faster" and b == 1:
            ok = 1 / q >= 1.2
            out.append(f"{head}: {1 / q:.2f}x faster with the best impl (target >= 1.20x): {'PASS' if ok else 'FAIL'}")
        elif pair.target == "parity":
            ok = q <= 1.1
            out.append(f"{head}: {q:.2f}x the time with the best impl (target <= 1.10x): {'PASS' if ok else 'FAIL'}")
        else:
            out.append(f"{head}: {q:.2f}x the time ({1 / q:.2f}x faster) with the best impl (no target)")
        ok = auto_q <= 1.10
        out.append(
            f"  auto {impls['auto'] * 1e3:.1f} ms vs best fixed impl ({best_impl}) {impls[best_impl] * 1e3:.1f} ms: "
            f"{auto_q:.2f}x (target <= 1.10x): {'PASS' if ok else 'FAIL'}"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# profile


def profile_pair(pair: Pair, batch: int, impl: str, rounds: int, rows: int) -> None:
    """torch.profiler op tables (self CPU time) for the original and the conversion, same input."""
    from torch.profiler import ProfilerActivity, profile

    orig, conv = build_pair(pair)
    set_impl(conv, impl)
    x = torch.randn(batch, 3, pair.size, pair.size)
    for tag, model in ((pair.original, orig), (f"{pair.converted} ({impl})", conv)):
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(rounds):
                    model(x)
        avg = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in avg) / rounds / 1e3
        print(f"\n### {tag}, batch {batch}: {total:.1f} ms self CPU per forward (all threads' ops, profiled)")
        print(avg.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=32, max_shapes_column_width=60
            )
        )


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=tuple(PAIRS), default=list(PAIRS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-sample-ms", type=float, default=30.0, help="inner repeats make each sample this long")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="statistic the targets use")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCK),
        default="wall",
        help="wall: perf_counter (latency); cpu: process CPU time of all threads (a loaded-machine fallback; "
        "use with OMP_WAIT_POLICY=PASSIVE)",
    )
    ap.add_argument("--quick", action="store_true", help="batch 1, 5 rounds, eager only")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    ap.add_argument("--no-onnx", action="store_true", help="skip onnxruntime variants")
    ap.add_argument("--profile", metavar="MODEL", choices=tuple(PAIRS), help="profile one pair instead of timing")
    ap.add_argument("--profile-impl", choices=IMPLS, default="auto")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCK[args.clock]
    if args.quick:
        args.batch, args.repeats, args.warmup = [1], 5, 2
        args.no_compile = args.no_onnx = True
    load = os.getloadavg()
    print(
        f"# torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, threads={args.threads}, clock={args.clock}, repeats={args.repeats}, "
        f"stat for targets={args.stat}, load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        flush=True,
    )
    if args.profile:
        profile_pair(PAIRS[args.profile], args.batch[0], args.profile_impl, max(3, args.repeats // 3), 25)
        return 0
    rows: list[Row] = []
    for key in args.models:
        rows += bench_pair(PAIRS[key], args.batch, args)
    print("\n# All results")
    print_table(rows, args.stat)
    print("\n# Targets")
    for line in check_targets(rows, args.stat):
        print(line)
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
