"""Zoo sweep: the generic rules (attention2parc, convstage2parc) over every architecture of ``timm.list_models()``.

Each architecture runs in a worker subprocess with a time bound, so a hang or a crash (segfault, out of
memory) is recorded for that architecture and the sweep goes on. Per architecture:

1. build it on the meta device (no weights; CPU when timm cannot build it on meta) and pick the input
   size: the ``pretrained_cfg`` size for fixed-size models, else the smallest of 128/160/192/224/... up
   to the default size at which the model runs (scaled along with a non-square default);
2. survey it (``list_candidates``): detected attention token mixers and blocks a registered ParC block
   replaces (``supported``);
3. plan each rule on the meta device (``convert(..., validate=False, count=False)``);
4. for a rule that planned targets, build the model for real (CPU, random init) when it has at most
   ``--max-params`` parameters and convert it with validation (``strict=True``); larger models are
   recorded as ``planned (meta)`` only.

Status per architecture: ``converted`` (a rule converted and every check passed, no rule failed),
``planned_meta`` (large model: planned on meta only), ``nothing`` (every rule raised ``NoMatchError``),
``failed`` (some rule raised another error; ``raw`` marks an exception that is not a ``ParcSurgeryError``),
``timeout``, ``crashed``, ``build_failed`` (timm itself cannot build or run the model at any size).

Writes ``benchmarks/zoo_sweep.json`` (every record, after each architecture, so an interrupted sweep keeps
what it did) and ``benchmarks/zoo_sweep.md`` (totals, per-family table, failure reasons, the commands run).

Usage:
  python benchmarks/zoo_sweep.py                       # the whole zoo (hours on 2 cores)
  python benchmarks/zoo_sweep.py --sample 100          # ~100 architectures spread over the families
  python benchmarks/zoo_sweep.py --pattern 'vit_*' --limit 20 --timeout 120 --jobs 2
  python benchmarks/zoo_sweep.py --resume              # skip the architectures already in the JSON
  python benchmarks/zoo_sweep.py --rerun --pattern 'mvit*'   # redo some, keep the other records
  python benchmarks/zoo_sweep.py --rerun --status failed     # redo the failures (after a fix)
  python benchmarks/zoo_sweep.py --report              # rewrite the markdown from the JSON only

The second table of the markdown (models that are not timm's) comes from ``benchmarks/corpus_sweep.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import re
import selectors
import shlex
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "zoo_sweep.json")
DEFAULT_MD = os.path.join(HERE, "zoo_sweep.md")
RULES = ("attention2parc", "convstage2parc")
SIZES = (128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
STATUSES = ("converted", "planned_meta", "nothing", "failed", "timeout", "crashed", "build_failed")


def family(name: str) -> str:
    """The name's prefix before the first '_' or digit (``vit_base_patch16_224`` -> ``vit``)."""
    m = re.match(r"[^_\d]+", name)
    return m.group(0) if m else name


def spread_sample(names: list[str], n: int) -> list[str]:
    """``n`` names spread over the families: round-robin over families, each family's names evenly spaced."""
    fams: dict[str, list[str]] = collections.defaultdict(list)
    for name in names:
        fams[family(name)].append(name)
    queues = {}
    for f, members in fams.items():  # an evenly spaced order within the family: middle, ends, ...
        order = sorted(range(len(members)), key=lambda i: (bin(i).count("1"), i))
        queues[f] = [members[i] for i in order]
    out: list[str] = []
    rnd = 0
    while len(out) < n and any(len(q) > rnd for q in queues.values()):
        for f in sorted(queues):
            if len(queues[f]) > rnd and len(out) < n:
                out.append(queues[f][rnd])
        rnd += 1
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------------------
# Worker side


def _short(e: BaseException, limit: int = 600) -> str:
    text = " ".join(str(e).split())
    return text[:limit] + (" ..." if len(text) > limit else "")


def _tb_tail(e: BaseException, frames: int = 4) -> str:
    tb = traceback.extract_tb(e.__traceback__)[-frames:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(tb))


def _error(e: BaseException) -> dict:
    from parc_surgery.errors import ParcSurgeryError

    out = {"error": type(e).__name__, "message": _short(e, 1200), "raw": not isinstance(e, ParcSurgeryError)}
    if out["raw"]:
        out["where"] = _tb_tail(e)
    return out


def _candidate_sizes(default: tuple[int, int], fixed: bool) -> list[tuple[int, int]]:
    if fixed:
        return [default]
    h, w = default
    side = max(h, w)
    out = []
    for s in SIZES:
        if s >= side:
            break
        out.append((max(1, round(h * s / side)), max(1, round(w * s / side))))
    out.append(default)
    return out


def _runs(model, size, in_chans) -> str:
    import torch

    x = torch.zeros(1, in_chans, *size, device=next(iter(model.parameters()), torch.empty(0)).device)
    try:
        with torch.no_grad():
            model.eval()(x)
        return ""
    except Exception as e:
        return f"{type(e).__name__}: {_short(e, 200)}"


def _survey(model, size) -> dict:
    """Detected attention (type, in/out shape) and replaceable blocks, from one probe on the model as it is."""
    from parc_surgery import list_candidates
    from parc_surgery.probe import example_input, probe_model

    cands = list_candidates(model, input_size=size)
    probe = probe_model(model, example_input(model, size))
    attn = collections.Counter()
    for n in cands.attention:
        rec = probe.calls[n]
        t = type(model.get_submodule(n))
        attn[f"{t.__module__}.{t.__qualname__} {list(rec.in_shape or [])}->{list(rec.out_shape or [])}"] += 1
    blocks = collections.Counter(t for _, t, _ in cands.blocks)
    return {
        "attention": dict(attn),
        "n_attention": len(cands.attention),
        "blocks": dict(blocks),
        "n_stages": len(cands.stages),
        "traced": cands.traced,
    }


def _convert_one(model, rule: str, size, *, validate: bool) -> dict:
    from parc_surgery import convert
    from parc_surgery.errors import NoMatchError

    t0 = time.time()
    try:
        conv = convert(model, rule, input_size=size, validate=validate, count=False, strict=True)
    except NoMatchError as e:
        return {"outcome": "nothing", "message": _short(e, 1200), "seconds": round(time.time() - t0, 2)}
    except Exception as e:
        return {"outcome": "failed", **_error(e), "seconds": round(time.time() - t0, 2)}
    blocks = collections.Counter(t.block for t in conv.plan.targets)
    out = {
        "outcome": "validated" if validate else "planned",
        "targets": len(conv.plan.targets),
        "blocks": dict(blocks),
        "seconds": round(time.time() - t0, 2),
    }
    if validate:
        out["checks"] = {c.name: c.passed for c in conv.report.checks}
    del conv
    return out


def run_architecture(name: str, *, max_params: float, rules=RULES) -> dict:
    """Everything the sweep records for one architecture (never raises)."""
    import timm
    import torch

    t0 = time.time()
    rec: dict = {"name": name, "family": family(name)}
    try:
        cfg = timm.models.get_pretrained_cfg(name)
        cfg_size = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
        fixed = bool(getattr(cfg, "fixed_input_size", False))
    except Exception:
        cfg_size, fixed = (3, 224, 224), False
    in_chans, default = int(cfg_size[0]), (int(cfg_size[1]), int(cfg_size[2]))
    rec.update(default_size=list(default), fixed_size=fixed)

    # 1. build on meta (weights not needed to plan); CPU when the model cannot be built or run on meta
    device = "meta"
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception as e:
        rec["meta_note"] = f"meta build: {type(e).__name__}: {_short(e, 200)}"
        model = None
    params = None
    if model is not None:
        params = sum(p.numel() for p in model.parameters())
    size, why = None, ""
    if model is not None:
        for s in _candidate_sizes(default, fixed):
            why = _runs(model, s, in_chans)
            if not why:
                size = s
                break
        if size is None:
            rec["meta_note"] = f"meta forward: {why}"
    if size is None:  # plan on CPU instead
        if params is not None and params > max_params:
            rec.update(status="build_failed", reason=f"runs on neither meta nor (too large for) CPU: {why}")
            return _finish(rec, t0)
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
            device = "cpu"
        except Exception as e:
            rec.update(status="build_failed", reason=f"timm.create_model: {type(e).__name__}: {_short(e, 300)}")
            return _finish(rec, t0)
        params = sum(p.numel() for p in model.parameters())
        for s in _candidate_sizes(default, fixed):
            why = _runs(model, s, in_chans)
            if not why:
                size = s
                break
        if size is None:
            rec.update(status="build_failed", reason=f"the model runs at none of its sizes: {why}")
            return _finish(rec, t0)
    rec.update(params=params, size=list(size), plan_device=device)
    small = params <= max_params

    # 2. survey
    try:
        rec["survey"] = _survey(model, size)
        s = rec["survey"]
        rec["supported"] = bool(s["n_attention"] or s["blocks"])
    except Exception as e:
        rec["survey_error"] = _error(e)
        rec["supported"] = None

    # 3. plan every rule (on meta where possible), 4. validate for real where small enough
    rec["rules"] = {}
    real = model if device == "cpu" else None
    for rule in rules:
        r = _convert_one(model, rule, size, validate=device == "cpu" and small)
        if device == "meta" and r["outcome"] == "planned" and small:
            if real is None:
                try:
                    torch.manual_seed(0)
                    real = timm.create_model(name, pretrained=False)
                except Exception as e:
                    r = {"outcome": "failed", "error": "build", "message": f"CPU build: {_short(e, 300)}"}
            if real is not None:
                meta_seconds = r["seconds"]
                r = _convert_one(real, rule, size, validate=True)
                r["meta_plan_seconds"] = meta_seconds
        rec["rules"][rule] = r
        gc.collect()
    del model, real
    gc.collect()

    outcomes = [r["outcome"] for r in rec["rules"].values()]
    if "failed" in outcomes:
        rec["status"] = "failed"
        first = next(r for r in rec["rules"].values() if r["outcome"] == "failed")
        rec["reason"] = f"{first.get('error')}: {first.get('message', '')[:300]}"
        rec["raw"] = any(r.get("raw") for r in rec["rules"].values())
    elif "validated" in outcomes:
        rec["status"] = "converted"
    elif "planned" in outcomes:
        rec["status"] = "planned_meta"
    else:
        rec["status"] = "nothing"
    return _finish(rec, t0)


def _finish(rec: dict, t0: float) -> dict:
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def worker_main(args) -> None:
    """Read architecture names on stdin, write one JSON line per name on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the models print goes to stderr, never into the protocol
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    import parc_surgery  # noqa: F401  (import once, before timing anything)

    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        try:
            rec = run_architecture(name, max_params=args.max_params * 1e6)
        except BaseException as e:  # run_architecture never raises; this guards the protocol anyway
            rec = {"name": name, "family": family(name), "status": "failed", "raw": True, **_error(e)}
            rec["reason"] = f"sweep: {type(e).__name__}: {_short(e, 300)}"
        proto.write(json.dumps(rec) + "\n")
        gc.collect()


# ----------------------------------------------------------------------------------------------------------------------
# Parent side


class _Worker:
    def __init__(self, args, log):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(args.threads)]
        cmd += ["--max-params", str(args.max_params)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.name: str | None = None
        self.started = 0.0

    def send(self, name: str) -> None:
        self.name, self.started = name, time.time()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()


def _load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"commands": [], "results": {}}


def _save(data: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_sweep(args, names: list[str], data: dict, command: str) -> None:
    log = open(args.log, "a") if args.log else subprocess.DEVNULL  # noqa: SIM115
    todo = collections.deque(names)
    workers: list[_Worker] = []
    sel = selectors.DefaultSelector()
    done = 0
    total = len(names)

    def record(rec: dict) -> None:
        nonlocal done
        done += 1
        data["results"][rec["name"]] = rec
        _save(data, args.json)
        print(
            f"[{done}/{total}] {rec['name']}: {rec['status']}"
            + (f" ({rec.get('reason', '')[:120]})" if rec["status"] not in ("converted", "nothing") else "")
            + f" {rec.get('seconds', '')}s",
            flush=True,
        )

    def start() -> _Worker:
        w = _Worker(args, log)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        workers.append(w)
        return w

    def stop(w: _Worker) -> None:
        sel.unregister(w.proc.stdout)
        w.kill()
        workers.remove(w)

    for _ in range(min(args.jobs, len(todo))):
        start()
    for w in list(workers):
        if todo:
            w.send(todo.popleft())
    while any(w.name for w in workers):
        now = time.time()
        busy = [w for w in workers if w.name]
        wait = max(0.1, min(w.started + args.timeout - now for w in busy))
        for key, _ in sel.select(timeout=wait):
            w = key.data
            line = w.proc.stdout.readline()
            if not line:  # the worker died: a segfault, the OOM killer, ...
                code = w.proc.wait()
                rec = {"name": w.name, "family": family(w.name), "status": "crashed"}
                rec["reason"] = f"worker exited with {code}" + (f" (signal {-code})" if code < 0 else "")
                rec["seconds"] = round(time.time() - w.started, 1)
                w.name = None
                stop(w)
                record(rec)
                if todo:
                    start().send(todo.popleft())
                continue
            rec = json.loads(line)
            w.name = None
            record(rec)
            if todo:
                w.send(todo.popleft())
        now = time.time()
        for w in [w for w in workers if w.name and now - w.started > args.timeout]:
            rec = {"name": w.name, "family": family(w.name), "status": "timeout"}
            rec["reason"] = f"no result within {args.timeout:g} s"
            rec["seconds"] = round(now - w.started, 1)
            w.name = None
            stop(w)
            record(rec)
            if todo:
                start().send(todo.popleft())
    for w in list(workers):
        w.proc.stdin.close()
        w.proc.wait(timeout=30)
        sel.unregister(w.proc.stdout)
    if log is not subprocess.DEVNULL:
        log.close()


# ----------------------------------------------------------------------------------------------------------------------
# Report


def _reason_key(rec: dict) -> str:
    reason = rec.get("reason", "")
    reason = re.sub(r"\d+", "N", reason)
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return reason[:140]


def write_markdown(data: dict, path: str) -> None:
    results = data["results"]
    universe = data.get("universe", len(results))
    fams: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    tot = collections.Counter()
    sup = collections.Counter()
    for rec in results.values():
        fams[rec["family"]][rec["status"]] += 1
        tot[rec["status"]] += 1
        if rec.get("supported"):
            sup[rec["status"]] += 1
            fams[rec["family"]]["supported"] += 1
    n = len(results)
    n_sup = sum(sup.values())
    raw = [r for r in results.values() if r.get("raw")]
    complete = n >= universe
    lines = ["# Zoo sweep: the generic rules over timm's architectures", ""]
    lines.append(
        f"{'Complete' if complete else 'SAMPLE / PARTIAL'}: {n} of the {universe} architectures of "
        f"`timm.list_models()` (timm {data.get('timm')}, torch {data.get('torch')}, {data.get('machine', '')})."
    )
    lines.append("")
    lines.append("Produced by:")
    lines.append("")
    for c in data.get("commands", []):
        lines.append(f"    {c}")
    lines.append("")
    lines.append(
        "Rules: `attention2parc` and `convstage2parc` on every architecture; plans on the meta device, "
        "validation (`convert(..., validate=True, strict=True)`: output shapes at the size and at a non-square "
        "size, finiteness, target shapes, spatial vs FFT, traced vs eager) with random weights on CPU at the "
        "smallest input size the model runs at (128 px and up, the pretrained size for fixed-size models), "
        f"for models up to {data.get('max_params_m', '?')}M parameters; larger ones are planned on meta only."
    )
    lines.append("")
    lines.append("## Totals")
    lines.append("")
    lines.append("| status | architectures | with a supported block |")
    lines.append("|---|---:|---:|")
    for s in STATUSES:
        lines.append(f"| {s} | {tot[s]} | {sup[s]} |")
    lines.append(f"| **all** | **{n}** | **{n_sup}** |")
    lines.append("")
    ok = sup["converted"] + sup["planned_meta"]
    eligible = n_sup - sup["planned_meta"]
    if n_sup:
        lines.append(
            f"Architectures with a supported block (a detected attention token mixer, or a block a registered ParC "
            f"block replaces): {n_sup}. Converted and validated: {sup['converted']} of the {eligible} validated "
            f"for real ({100 * sup['converted'] / max(1, eligible):.1f} %); with the meta-only plans of the large "
            f"ones: {ok} of {n_sup} ({100 * ok / n_sup:.1f} %)."
        )
    lines.append(f"Failures that were not a `ParcSurgeryError` (raw tracebacks): {len(raw)}.")
    lines.append("")
    reasons = collections.Counter()
    example: dict[str, str] = {}
    for rec in results.values():
        if rec["status"] in ("failed", "timeout", "crashed", "build_failed"):
            k = f"{rec['status']}: {_reason_key(rec)}"
            reasons[k] += 1
            example.setdefault(k, rec["name"])
    if reasons:
        lines.append("## Failure reasons")
        lines.append("")
        lines.append("| count | reason (digits and quoted names folded) | e.g. |")
        lines.append("|---:|---|---|")
        for k, c in reasons.most_common():
            lines.append(f"| {c} | {k.replace('|', '/')} | {example[k]} |")
        lines.append("")
    blocks = collections.Counter()
    for rec in results.values():
        ok = [r for r in rec.get("rules", {}).values() if r.get("outcome") == "validated"]
        blocks.update({b for r in ok for b in r.get("blocks", {})})
    if blocks:
        lines.append("## Blocks used by the converted architectures")
        lines.append("")
        lines.append("| block | architectures |")
        lines.append("|---|---:|")
        for b, c in blocks.most_common():
            lines.append(f"| {b} | {c} |")
        lines.append("")
    missed = sorted(n for n, r in results.items() if r.get("supported") and r["status"] == "nothing")
    if missed:
        lines.append("## Supported blocks, nothing converted")
        lines.append("")
        lines.append(
            "Architectures with a supported block where both rules selected nothing replaceable "
            "(e.g. every such block is the strided first block of its stage, or lies outside the deep stages):"
        )
        lines.append("")
        lines.append(", ".join(f"`{n}`" for n in missed))
        lines.append("")
    lines.append("## Per family")
    lines.append("")
    lines.append("Family: the name's prefix before the first `_` or digit.")
    lines.append("")
    cols = ["converted", "planned_meta", "nothing", "failed", "timeout", "crashed", "build_failed"]
    lines.append("| family | archs | supported | " + " | ".join(cols) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(cols))
    for f in sorted(fams):
        c = fams[f]
        total = sum(c[s] for s in STATUSES)
        lines.append(f"| {f} | {total} | {c['supported']} | " + " | ".join(str(c[s] or "") for s in cols) + " |")
    lines.append("")
    from corpus_sweep import corpus_table  # the second table: models that are not timm's (corpus_sweep.py)

    lines += corpus_table(data)
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="at most N architectures (after the other filters)")
    p.add_argument("--pattern", default="*", help="shell glob over timm.list_models() names")
    p.add_argument("--sample", type=int, default=None, help="N architectures spread over the families")
    p.add_argument("--names", default=None, help="a file of architecture names, one per line (with the other filters)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per architecture")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--max-params", type=float, default=60.0, help="millions of parameters up to which to validate")
    p.add_argument("--resume", action="store_true", help="skip the architectures already in the JSON")
    p.add_argument("--rerun", action="store_true", help="run the selected architectures again, keeping the others")
    p.add_argument("--status", action="append", choices=STATUSES, help="with --rerun: only records with this status")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--md", default=DEFAULT_MD)
    p.add_argument("--log", default=None, help="file for the workers' stderr (default: discarded)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args)
        return

    import timm
    import torch

    keep = args.resume or args.report or args.rerun
    data = _load(args.json) if keep else {"commands": [], "results": {}}
    if args.report:
        write_markdown(data, args.md)
        return
    all_names = timm.list_models()
    names = [n for n in all_names if fnmatch.fnmatchcase(n, args.pattern)]
    if args.names:
        with open(args.names) as fh:
            wanted = {ln.strip() for ln in fh if ln.strip()}
        names = [n for n in names if n in wanted]
    if args.sample:
        names = spread_sample(names, args.sample)
    if args.resume:
        names = [n for n in names if n not in data["results"]]
    if args.rerun and args.status:
        names = [n for n in names if data["results"].get(n, {}).get("status") in args.status]
    if args.limit is not None:  # after --resume: a sweep in pieces takes the next N
        names = names[: args.limit]
    argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = f"python benchmarks/zoo_sweep.py {argv_text}".strip()
    data["commands"] = [*data.get("commands", []), command]
    data.update(
        universe=len(all_names),
        timm=timm.__version__,
        torch=torch.__version__,
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} worker(s)",
        max_params_m=args.max_params,
        updated=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    print(f"{len(names)} architecture(s) to sweep, {args.jobs} worker(s), {args.timeout:g} s each at most", flush=True)
    t0 = time.time()
    try:
        run_sweep(args, names, data, command)
    finally:
        data["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        data.setdefault("wall_seconds", 0)
        data["wall_seconds"] = round(data["wall_seconds"] + time.time() - t0)
        _save(data, args.json)
        write_markdown(data, args.md)
    print(f"done in {math.ceil(time.time() - t0)} s; wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
