"""Corpus sweep: models that are not timm's (written by hand, torchvision, transformers) through the engine.

The second table of ``benchmarks/zoo_sweep.md``. The corpus is every ``sweep_entries()`` of the test corpus
modules (``tests/*corpus*.py``): each entry names a model builder (random weights, nothing downloaded), a
rule, an input size and whether the model is meant to convert or to be refused (the corpus holds forms that
cannot be rewritten on purpose: cross-attention, masks computed from the input, ...). Each entry runs in a
worker subprocess with a time bound; ``convert(..., validate=True, strict=True)``. Status per entry:

* ``converted``: converted and every check passed (``preserved`` included);
* ``refused``: a ``ParcSurgeryError`` saying why (its message is recorded);
* ``failed``: any other exception (``raw``: not a ``ParcSurgeryError``), ``timeout``, ``crashed``.

Results go into the zoo sweep's JSON under ``"corpus"``; the markdown is rewritten with both tables.

Usage:
  python benchmarks/corpus_sweep.py                        # every entry
  python benchmarks/corpus_sweep.py --pattern 'hf_*'       # some of them (shell glob over the names)
  python benchmarks/corpus_sweep.py --list                 # the entries, without running them
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import importlib
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")


def load_entries() -> dict[str, dict]:
    """name -> entry, from every ``tests/*corpus*.py`` module that defines ``sweep_entries()``."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    out: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(TESTS, "*corpus*.py"))):
        mod = importlib.import_module(os.path.splitext(os.path.basename(path))[0])
        for e in getattr(mod, "sweep_entries", lambda: [])():
            out[e["name"]] = {**e, "module": mod.__name__}
    return out


def run_entry(entry: dict) -> dict:
    """Convert one corpus entry (never raises)."""
    import torch

    from parc_surgery import convert
    from parc_surgery.errors import ParcSurgeryError

    rec = {k: entry[k] for k in ("name", "source", "rule", "size", "expect", "module") if k in entry}
    t0 = time.time()
    try:
        torch.manual_seed(0)
        model = entry["build"]().eval()
        rec["params"] = sum(p.numel() for p in model.parameters())
        conv = convert(model, entry["rule"], input_size=entry["size"], count=False, strict=True)
        rec.update(
            status="converted",
            targets=len(conv.plan.targets),
            blocks=sorted({t.block for t in conv.plan.targets}),
            checks={c.name: c.passed for c in conv.report.checks},
            notes=len(conv.report.notes),
        )
    except ParcSurgeryError as e:
        rec.update(status="refused", error=type(e).__name__, message=" ".join(str(e).split())[:1200])
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-3:]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb))
        rec.update(status="failed", raw=True, error=type(e).__name__, message=str(e)[:600], where=where)
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def _reason(message: str) -> str:
    """The refusal's own reason out of an engine error (what follows the name of the first module left out)."""
    for marker in ("left out (the block cannot replace them): ", "nothing was changed: - "):
        if marker in message:
            return message.split(marker, 1)[1]
    return message


def corpus_table(data: dict) -> list[str]:
    """The markdown section of the corpus results in ``data["corpus"]`` (empty without results)."""
    results = data.get("corpus", {}).get("results", {})
    if not results:
        return []
    recs = sorted(results.values(), key=lambda r: (r.get("source", ""), r["name"]))
    meant = [r for r in recs if r.get("expect") == "convert"]
    conv = [r for r in meant if r["status"] == "converted"]
    refused_meant = [r for r in recs if r.get("expect") == "refuse" and r["status"] == "refused"]
    bad = [r for r in recs if r["status"] not in ("converted", "refused")]
    lines = ["## Non-timm corpus", ""]
    lines.append("Produced by:")
    lines.append("")
    lines += [f"    {c}" for c in data["corpus"].get("commands", [])]
    lines.append("")
    lines.append(
        f"Models meant to convert: {len(conv)} of {len(meant)} converted and validated "
        f"({100 * len(conv) / max(1, len(meant)):.1f} %); models written to be refused: {len(refused_meant)} of "
        f"{len(recs) - len(meant)} refused with the reason; failures that are not a clear refusal: {len(bad)}."
    )
    lines.append("")
    lines.append("| model | source | rule | meant to | status | targets | blocks | s | reason |")
    lines.append("|---|---|---|---|---|---:|---|---:|---|")
    for r in recs:
        why = _reason(r.get("message") or "").replace("|", "/")[:220]
        lines.append(
            f"| {r['name']} | {r.get('source', '')} | {r.get('rule', '')} | {r.get('expect', '')} | {r['status']} | "
            f"{r.get('targets', '')} | {', '.join(r.get('blocks', []))} | {r.get('seconds', '')} | {why} |"
        )
    lines.append("")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pattern", default="*", help="shell glob over the entry names")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per entry")
    p.add_argument("--list", action="store_true", help="list the entries and exit")
    p.add_argument("--json", default=os.path.join(HERE, "zoo_sweep.json"))
    p.add_argument("--md", default=os.path.join(HERE, "zoo_sweep.md"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker: run one entry, print its record
    args = p.parse_args(argv)
    entries = load_entries()
    if args.one is not None:
        print("\n" + json.dumps(run_entry(entries[args.one])), flush=True)
        return
    names = [n for n in entries if fnmatch.fnmatchcase(n, args.pattern)]
    if args.list:
        for n in names:
            e = entries[n]
            print(f"{n}: {e['source']}, {e['rule']} at {e['size']}, meant to {e['expect']}")
        return
    from zoo_sweep import _load, _save, write_markdown

    data = _load(args.json) if os.path.exists(args.json) else {"commands": [], "results": {}}
    corpus = data.setdefault("corpus", {"commands": [], "results": {}})
    corpus["commands"].append(
        "python benchmarks/corpus_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    for i, n in enumerate(names, 1):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", n]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            rec = json.loads(lines[-1]) if lines else {
                "name": n, "status": "crashed", "message": (done.stderr or "")[-600:], "returncode": done.returncode
            }  # fmt: skip
        except subprocess.TimeoutExpired:
            rec = {"name": n, "status": "timeout", "message": f"more than {args.timeout:g} s"}
        for k in ("source", "rule", "size", "expect"):
            rec.setdefault(k, entries[n].get(k))
        corpus["results"][n] = rec
        print(f"[{i}/{len(names)}] {n}: {rec['status']} {rec.get('seconds', '')}s", flush=True)
        _save(data, args.json)
    write_markdown(data, args.md)
    print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
