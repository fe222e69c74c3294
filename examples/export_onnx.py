"""Convert a model, export it to ONNX, run it in onnxruntime and compare with eager PyTorch.

For the original and the converted model: the ONNX operator census (op type -> count), whether the graph
is pure convolution (no Softmax, no MatMul between two activations: nothing attention-like left) and the
largest absolute difference between onnxruntime's and eager PyTorch's output.
:func:`parc_surgery.onnx_check.check_onnx` does the work: the ``torch.export``-based exporter first, the
TorchScript one as a fallback; ParC layers are exported in the portable form the official ParC-Net code
shipped (slice + concat + depthwise conv, never ``DFT`` or ``Pad(mode=wrap)``). To write a checked file for
deployment (ONNX, OpenVINO or ExecuTorch), use :func:`parc_surgery.export` or ``parc-convert --export``.

Run (needs the ``onnx`` extra)::

    python examples/export_onnx.py                                   # mobilevit_xxs + vit2parc at 256x256
    python examples/export_onnx.py --model resnet18 --rule resnet_parc --input-size 224 --out out/onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm

import parc_surgery
from parc_surgery.onnx_check import check_onnx


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilevit_xxs", help="timm model name (default: mobilevit_xxs)")
    p.add_argument("--model-args", default="{}", help="JSON create_model kwargs, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--rule", default="vit2parc", help="bundled rule name or YAML path (default: vit2parc)")
    p.add_argument("--input-size", type=int, default=256, help="square input size to convert and export at")
    p.add_argument("--out", default=None, help="folder to keep original.onnx / converted.onnx and results.json")
    p.add_argument("--skip-original", action="store_true", help="export only the converted model")
    return p.parse_args(argv)


def census_table(results: dict) -> str:
    """Markdown table: op type -> count per exported model, most frequent first."""
    names = list(results)
    ops = sorted(
        {op for r in results.values() for op in r.op_counts},
        key=lambda op: (-sum(r.op_counts.get(op, 0) for r in results.values()), op),
    )
    lines = ["| op | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {op} | " + " | ".join(str(results[n].op_counts.get(op, 0)) for n in names) + " |" for op in ops]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    model = timm.create_model(args.model, pretrained=False, **json.loads(args.model_args)).eval()
    conv = parc_surgery.convert(model, args.rule, input_size=args.input_size)
    print(
        f"{args.model} -> {args.rule}: replaced {len(conv.plan.targets)} module(s): "
        f"{', '.join(t.name for t in conv.plan.targets)}"
    )

    models = {"converted": conv.model} if args.skip_original else {"original": model, "converted": conv.model}
    results = {}
    for name, m in models.items():
        path = None if out is None else out / f"{name}.onnx"
        results[name] = r = check_onnx(m, args.input_size, path=path)
        print(f"\n{name}: {r.summary()}")
        for why in r.attempts:  # earlier exporters that failed, if any
            print(f"  (fallback because: {why})")

    print(f"\nONNX operator census at {args.input_size}x{args.input_size}:\n")
    print(census_table(results))
    print("\n| model | exporter | max abs diff vs eager | pure convolution | Softmax | attention MatMuls |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r.exporter} | {r.max_abs_diff:.2e} | {'yes' if r.pure_convolution else 'no'} | "
            f"{r.softmax} | {len(r.attention_matmuls)} |"
        )
    summary = {"model": args.model, "rule": args.rule, "input_size": args.input_size}
    summary |= {name: r.to_dict() for name, r in results.items()}
    if out is not None:
        (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
