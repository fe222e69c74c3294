"""Heal figures: how much of a trained teacher's function ``parc_surgery.heal`` recovers after surgery.

Not a timed test: it trains real (small) teachers and measures agreement and accuracy. For each model:

1. **Teacher**: a timm model trained here, with labels, on scikit-learn's digits (1,797 real 8x8
   images, upsampled; 1,347 train / 450 test, as ``examples/finetune_ddp.py`` splits them). Saved with
   safetensors under ``--out`` and reused by later runs (``--retrain`` trains again).
2. **Convert** it with the model's rule, ``init`` ``warm_start`` and ``reference``: agreement with the
   teacher (top-1), KL(teacher || student) and accuracy on the 450 test images, right after conversion.
3. **Heal** each conversion with ``--images`` unlabelled training images (stage 1 block reconstruction,
   stage 2 distillation): the same figures after each stage, the mean block error before/after stage 1.
4. **Plain fine-tune** of the same conversion *with* labels (cross-entropy, every parameter, AdamW),
   on the same images for the same number of steps and batch size as the two heal stages together.

Results go to ``--out/results.json`` (``results_ddp.json`` under torchrun) and a Markdown table on
stdout. Under ``torchrun --nproc_per_node=2 ... --heal-only`` it heals the cached teachers' warm-start
conversions with DDP (gloo on CPU) with the same options, to compare with the single-process figures::

    nice -n 10 python benchmarks/bench_heal.py --out out/bench_heal
    nice -n 10 torchrun --standalone --nproc_per_node=2 benchmarks/bench_heal.py --out out/bench_heal --heal-only

(give the torchrun run the same options as the single-process one; the figures in ``benchmarks/README.md``
were taken with smaller budgets, one model per process: the command lines are there.)
    python benchmarks/bench_heal.py --quick --out /tmp/bench_heal       # a smoke run: tiny budgets
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model, save_model
from torch.utils.data import TensorDataset

import parc_surgery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from finetune_ddp import load_digits_split  # the examples' digits split, reused as is

MODELS = {
    # DeiT-style ViT (timm VisionTransformer with a class token) scaled to 32x32 digits: a 4x4 grid of 8x8-pixel
    # patches (2x2 digit pixels each; 4x4-pixel patches, an 8x8 grid, cost 4x the time per step for a
    # teacher about as good, 97.6 % after 800 steps, and a heal no better)
    "deit": {
        "timm": "deit_tiny_patch16_224",
        "args": {"img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4},
        "rule": "vit_attention2parc",
        "size": 32,
    },
    # MobileViT-XXS at 64x64: its three MobileViT blocks see 8x8, 4x4 and 2x2 maps
    "mobilevit": {"timm": "mobilevit_xxs", "args": {}, "rule": "vit2parc", "size": 64},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit,mobilevit", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", default="out/bench_heal", help="folder for teachers and results (default: out/bench_heal)")
    p.add_argument("--teacher-steps", type=int, default=600, help="teacher training steps (default: 600)")
    p.add_argument("--teacher-lr", type=float, default=1e-3, help="teacher AdamW lr (default: 1e-3)")
    p.add_argument("--teacher-aug", default="none",
                   help="teacher augmentation: none, roll:N (the whole batch rolled by up to N pixels) or shift:N "
                        "(each image translated by up to N pixels, background filled) (default: none)")  # fmt: skip
    p.add_argument("--images", type=int, default=1024, help="unlabelled images to heal with (default: 1024)")
    p.add_argument("--recon-steps", type=int, default=300, help="heal stage 1 steps (default: 300)")
    p.add_argument("--distill-steps", type=int, default=300, help="heal stage 2 steps (default: 300)")
    p.add_argument("--batch-size", type=int, default=32, help="heal and fine-tune global batch (default: 32)")
    p.add_argument("--recon-lr", type=float, default=None, help="heal stage 1 lr (default: HealConfig's)")
    p.add_argument("--distill-lr", type=float, default=None, help="heal stage 2 lr (default: HealConfig's)")
    p.add_argument("--trainable", default="replaced", help="heal stage 2 trainable set (default: replaced)")
    p.add_argument("--temperature", type=float, default=None, help="heal stage 2 temperature (default: HealConfig's)")
    p.add_argument("--finetune-lr", type=float, default=5e-4, help="plain fine-tune AdamW lr (default: 5e-4)")
    p.add_argument("--inits", default="warm_start,reference", help="conversion inits measured (default: both)")
    p.add_argument("--heal-inits", default=None, help="of --inits, the ones healed and fine-tuned (default: all)")
    p.add_argument("--heal-only", action="store_true", help="only heal the cached teachers' warm-start conversions")
    p.add_argument("--no-finetune", action="store_true", help="skip the plain fine-tune comparison (for sweeps)")
    p.add_argument("--retrain", action="store_true", help="train the teachers again even if cached")
    p.add_argument("--seed", type=int, default=0, help="teacher and data-split seed (default: 0)")
    p.add_argument("--heal-seeds", default=None,
                   help="comma-separated seeds of the conversion and the heal (the teacher stays the --seed one): "
                        "one heal per seed, each figure and the min reported (default: --seed)")  # fmt: skip
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="where every figure is measured: the 450 test images, or the validation split = the "
                        "training images heal does not use (train[--images:], 323 with 1,024): choose settings "
                        "on val, report on test (default: test)")  # fmt: skip
    p.add_argument("--set", dest="heal_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="another HealConfig field (repeatable; VALUE a number, else YAML: shift:4)")  # fmt: skip
    p.add_argument("--results", default=None, help="results file name in --out (default: results[_ddp].json)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run of the script)")
    a = p.parse_args(argv)
    kind, _, n = a.teacher_aug.partition(":")
    if a.teacher_aug != "none" and (kind not in ("roll", "shift") or not n.isdigit()):
        p.error(f"--teacher-aug must be none, roll:N or shift:N, got {a.teacher_aug!r}")
    a.heal_seeds = [int(v) for v in a.heal_seeds.split(",")] if a.heal_seeds else [a.seed]
    extra = {}
    for item in a.heal_set:
        key, eq, value = item.partition("=")
        if not eq:
            p.error(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            extra[key.strip()] = float(value) if any(c in value for c in ".eE") and "," not in value else int(value)
        except ValueError:
            extra[key.strip()] = yaml.safe_load(value)
    a.heal_set = extra
    if a.quick:
        a.teacher_steps, a.recon_steps, a.distill_steps, a.images = 20, 6, 6, 64
    return a


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def log(*args) -> None:
    if rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------------------


def create(spec: dict) -> torch.nn.Module:
    return timm.create_model(spec["timm"], pretrained=False, num_classes=10, **spec["args"])


def train_teacher(name: str, spec: dict, train_set: TensorDataset, args, out: Path) -> tuple[torch.nn.Module, dict]:
    """The cached teacher, or one trained now (AdamW, warm-up + cosine, label smoothing, optional shifts).

    ``roll:N`` rolls the whole batch by one random offset; ``shift:N`` translates each image by its own
    offset, filling with the background. For the DeiT the batch roll by 2 pixels (a quarter of its 8-pixel
    patch) was what made it learn slowly (68 % test accuracy after 400 steps, 94 % without it), while
    ``shift:4`` (one digit pixel) and 1,600 steps give 98.7 %.
    """
    path, meta_path = out / f"teacher_{name}.safetensors", out / f"teacher_{name}.json"
    torch.manual_seed(args.seed)
    model = create(spec)
    meta = {"steps": args.teacher_steps, "lr": args.teacher_lr, "aug": args.teacher_aug, "seed": args.seed, **spec}
    if path.is_file() and meta_path.is_file() and not args.retrain:
        saved = json.loads(meta_path.read_text())
        if {k: saved.get(k) for k in meta} == meta:
            load_model(model, path)
            return model.eval(), saved
    if args.heal_only:
        raise SystemExit(f"no cached teacher {path} for these options: run the single-process benchmark first")
    x, y = train_set.tensors
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.05)
    warm = max(1, args.teacher_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / args.teacher_steps))
    )
    t0 = time.time()
    model.train()
    for _ in range(args.teacher_steps):
        idx = torch.randint(len(x), (64,), generator=g)
        xb = x[idx]
        xb = augment(xb, args.teacher_aug, g)
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    meta["train_seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
    meta_path.write_text(json.dumps(meta, indent=2))
    return model, meta


def augment(x: torch.Tensor, aug: str, g: torch.Generator) -> torch.Tensor:
    """``x`` under the teacher augmentation ``aug`` (see ``--teacher-aug``), drawing from ``g``."""
    if aug == "none":
        return x
    kind, n = aug.split(":")
    n = int(n)
    if kind == "roll":  # one random offset for the whole batch
        return torch.roll(x, shifts=torch.randint(-n, n + 1, (2,), generator=g).tolist(), dims=(2, 3))
    h, w = x.shape[-2:]
    padded = F.pad(x, (n, n, n, n), value=x.amin().item())  # the background (the smallest value)
    ox = torch.randint(0, 2 * n + 1, (len(x),), generator=g)
    oy = torch.randint(0, 2 * n + 1, (len(x),), generator=g)
    return torch.stack([padded[j, :, oy[j] : oy[j] + h, ox[j] : ox[j] + w] for j in range(len(x))])


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def compare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> dict:
    kl = F.kl_div(
        student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return {
        "agreement": (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item(),
        "kl": kl.item(),
        "accuracy": (student_logits.argmax(-1) == y).float().mean().item(),
    }


def plain_finetune(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int
):
    """Cross-entropy with labels, every parameter, eval-mode layers (as heal trains), AdamW + cosine."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, steps))))
    g = torch.Generator().manual_seed(seed)
    model.eval()
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(x), generator=g).tolist()
        idx, order = order[:batch], order[batch:]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def heal_options(args, seed: int) -> dict:
    opts = {"recon_steps": args.recon_steps, "distill_steps": args.distill_steps, "batch_size": args.batch_size,
            "trainable": args.trainable, "seed": seed, "images": args.images, **args.heal_set}  # fmt: skip
    if args.recon_lr is not None:
        opts["recon_lr"] = args.recon_lr
    if args.distill_lr is not None:
        opts["distill_lr"] = args.distill_lr
    if args.temperature is not None:
        opts["temperature"] = args.temperature
    return opts


def eval_split(args, train_set, test_set) -> TensorDataset:
    """The images every figure is measured on: the test split, or the training images heal does not use (val)."""
    if args.eval_split == "test":
        return test_set
    x, y = train_set.tensors
    if args.images >= len(x):
        raise SystemExit(f"--eval-split val needs --images < {len(x)} (the validation images are train[--images:])")
    return TensorDataset(x[args.images :], y[args.images :])


def run_model(name: str, args, out: Path, train_set, test_set) -> dict:
    spec = MODELS[name]
    t0 = time.time()
    teacher, meta = train_teacher(name, spec, train_set, args, out)
    eval_set = eval_split(args, train_set, test_set)
    xt, yt = eval_set.tensors
    t_logits = logits_of(teacher, xt)
    acc = compare(t_logits, t_logits, yt)["accuracy"]
    row = {**spec, "model": name, "eval_split": args.eval_split, "eval_images": len(xt), "teacher_accuracy": acc,
           "teacher_meta": meta, "inits": {}}  # fmt: skip
    log(f"{name}: teacher {args.eval_split} accuracy {row['teacher_accuracy']:.4f} on {len(xt)} images "
        f"({time.time() - t0:.0f}s)")  # fmt: skip
    x_heal = train_set.tensors[0][: args.images]
    y_heal = train_set.tensors[1][: args.images]
    inits = ["warm_start"] if args.heal_only else args.inits.split(",")
    heal_inits = inits if args.heal_inits is None or args.heal_only else args.heal_inits.split(",")
    suffix = "_ddp" if args.heal_only else ""
    for init in inits:
        conv = parc_surgery.convert(teacher, spec["rule"], input_size=spec["size"], init=init, seed=args.seed)
        r = {
            "targets": [t.name for t in conv.plan.targets],
            "converted": compare(logits_of(conv.model, xt), t_logits, yt),
            "heals": {},
        }
        row["inits"][init] = r
        if init not in heal_inits:
            log(f"{name} {init}: converted {r['converted']} (not healed)")
            continue
        for seed in args.heal_seeds:  # the conversion and the heal with this seed; the teacher stays the same
            c = (
                conv
                if seed == args.seed
                else parc_surgery.convert(teacher, spec["rule"], input_size=spec["size"], init=init, seed=seed)
            )
            t1 = time.time()
            healed = parc_surgery.heal(c, x_heal, eval_data=eval_set, **heal_options(args, seed))
            h = healed.report.heal
            rs = {"seed": seed, "heal_seconds": round(time.time() - t1, 1), "heal": h.to_dict()}
            for p in h.points:
                rs[p.name] = {"agreement": p.agreement, "kl": p.kl, "accuracy": p.accuracy,
                              "block_error": p.mean_block_error}  # fmt: skip
            before, after = h.point("converted"), h.point("stage 1")
            if before and after and after.mean_block_error:
                rs["block_error_cut"] = before.mean_block_error / after.mean_block_error
            r["heals"][str(seed)] = rs
            if rank() == 0:
                (out / f"heal_{name}_{init}_seed{seed}{suffix}.md").write_text(healed.report.to_markdown())
            log(f"{name} {init} seed {seed}: healed {rs.get('stage 2') or rs.get('stage 1')}, block error cut "
                f"{rs.get('block_error_cut', float('nan')):.2f}x ({rs['heal_seconds']}s)")  # fmt: skip
        last = [rs.get("stage 2") or rs.get("stage 1") for rs in r["heals"].values()]
        if all(last):
            r["min_agreement"] = min(m["agreement"] for m in last)
            r["min_accuracy"] = min(m["accuracy"] for m in last if m["accuracy"] is not None)
            log(f"{name} {init}: agreement over seeds {[round(m['agreement'], 4) for m in last]}, min "
                f"{r['min_agreement']:.4f}; accuracy min {r['min_accuracy']:.4f}")  # fmt: skip
        if not args.heal_only and not args.no_finetune:
            t2 = time.time()
            torch.manual_seed(args.seed)
            ft = parc_surgery.convert(teacher, spec["rule"], input_size=spec["size"], init=init, seed=args.seed).model
            steps = args.recon_steps + args.distill_steps
            plain_finetune(ft, x_heal, y_heal, steps=steps, batch=args.batch_size, lr=args.finetune_lr, seed=args.seed)
            r["finetune"] = {
                **compare(logits_of(ft, xt), t_logits, yt),
                "steps": steps,
                "seconds": round(time.time() - t2, 1),
            }
            log(f"{name} {init}: plain fine-tune with labels {r['finetune']}")
    return row


def table(results: dict) -> str:
    lines = [
        "| model | init | seed | point | top-1 agreement | KL | accuracy | mean block error |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def line(model, init, seed, label, m):
        be = m.get("block_error")
        be = f"{be:.4f}" if be is not None else ""
        acc = "" if m["accuracy"] is None else f"{m['accuracy']:.4f}"
        return f"| {model} | {init} | {seed} | {label} | {m['agreement']:.4f} | {m['kl']:.4f} | {acc} | {be} |"

    for row in results["rows"]:
        lines.append(f"| {row['model']} | | | teacher ({row['eval_split']}) | | | {row['teacher_accuracy']:.4f} | |")
        for init, r in row["inits"].items():
            lines.append(line(row["model"], init, "", "converted", r["converted"]))
            for seed, rs in r["heals"].items():
                for point in ("stage 1", "stage 2"):
                    if rs.get(point):
                        lines.append(line(row["model"], init, seed, point, rs[point]))
            if r.get("finetune"):
                lines.append(line(row["model"], init, "", "plain fine-tune (labels)", r["finetune"]))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sizes = {MODELS[m]["size"] for m in args.models.split(",")}
    data = {s: load_digits_split(s, args.seed) for s in sizes}
    rows = []
    for name in args.models.split(","):
        train_set, test_set = data[MODELS[name]["size"]]
        rows.append(run_model(name, args, out, train_set, test_set))
    world = int(os.environ.get("WORLD_SIZE", 1))
    results = {"args": vars(args), "world_size": world, "torch": torch.__version__, "rows": rows,
               "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads()}  # fmt: skip
    if rank() == 0:
        name = args.results or ("results_ddp.json" if args.heal_only else "results.json")
        (out / name).write_text(json.dumps(results, indent=2))
        print(table(results))
        print(f"\n{world} process(es), {results['seconds']} s")
    return results


if __name__ == "__main__":
    main()
