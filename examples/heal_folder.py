"""Heal a converted model from a folder of unlabelled images, resumably, on one process or under torchrun.

1. **Images**: scikit-learn's bundled digits (real 8x8 scans), upsampled and written as PNG files into
   ``--out/images/<digit>/`` (nested folders: heal reads any nesting and ignores the folder names).
2. **Teacher**: a small timm ViT trained here, with labels, on those files read the way heal reads
   them (timm's eval transform for the model at ``--image-size``).
3. **Convert** it with ``vit_attention2parc`` (every attention -> a ParC token mixer).
4. **Heal** with ``parc_surgery.heal(conv, folder, work_dir=...)``: no labels; 10 % of the images held out
   to measure agreement with the teacher. Each finished stage is saved in ``--out/heal_work``: run
   the script again and it resumes (``--interrupt-after-stage-1`` stops it there, to try this).
5. **Save** the healed model with ``parc_surgery.save``, reload it, and print the report's heal section.

Under ``torchrun --nproc_per_node=2`` every rank heals its shard of the images (DistributedDataParallel,
gloo on CPU); the script sets the process group up itself so the teacher is trained once, on rank 0,
and broadcast. Only rank 0 prints and writes. ``--out/summary.json`` holds the figures::

    python examples/heal_folder.py --out out/heal_folder
    torchrun --standalone --nproc_per_node=2 examples/heal_folder.py --out out/heal_folder_ddp
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

import parc_surgery
from parc_surgery.healing import create_image_transform, list_images

RULE = "vit_attention2parc"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/heal_folder", help="output folder (default: out/heal_folder)")
    p.add_argument("--image-size", type=int, default=32, help="digits are upsampled to this (default: 32)")
    p.add_argument("--images", type=int, default=400, help="digit images written to the folder (default: 400)")
    p.add_argument("--dim", type=int, default=64, help="ViT width (default: 64)")
    p.add_argument("--depth", type=int, default=2, help="ViT depth (default: 2)")
    p.add_argument("--teacher-steps", type=int, default=200, help="teacher training steps (default: 200)")
    p.add_argument("--steps", type=int, default=100, help="steps of each heal stage (default: 100)")
    p.add_argument("--batch-size", type=int, default=32, help="heal batch size, global (default: 32)")
    p.add_argument("--interrupt-after-stage-1", action="store_true", help="stop after stage 1 (then rerun)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def write_digits(folder: Path, n: int, size: int) -> None:
    """``n`` digits as ``folder/<digit>/<index>.png`` (size x size grayscale), unless already there."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(min(n, len(digits.target))):
        path = folder / str(digits.target[i]) / f"{i:04d}.png"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype("uint8")
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(path)


def load_labelled(folder: Path, model, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder's images through heal's own transform, with their labels (the digit folder names)."""
    from PIL import Image

    tf = create_image_transform(model, (size, size), 3)
    paths = list_images(folder)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    y = torch.tensor([int(p.parent.name) for p in paths])
    return x, y


def train_teacher(model, x, y, *, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, steps))))
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # heal uses a group that is already there (and leaves it alone)
    out = Path(args.out)
    folder = out / "images"
    if is_main():
        write_digits(folder, args.images, args.image_size)
    if dist.is_initialized():
        dist.barrier()

    torch.manual_seed(args.seed)
    model_args = {"img_size": args.image_size, "patch_size": 4, "embed_dim": args.dim, "depth": args.depth,
                  "num_heads": 2, "num_classes": 10}  # fmt: skip
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, **model_args)
    x, y = load_labelled(folder, teacher, args.image_size)
    if is_main():
        train_teacher(teacher, x, y, steps=args.teacher_steps, seed=args.seed)
    if dist.is_initialized():
        for t in [*teacher.parameters(), *teacher.buffers()]:
            dist.broadcast(t.data, 0)  # every rank holds rank 0's teacher
    teacher.eval()
    with torch.no_grad():
        teacher_acc = (teacher(x).argmax(-1) == y).float().mean().item()

    conv = parc_surgery.convert(teacher, RULE, input_size=args.image_size, seed=args.seed)
    options = {"recon_steps": args.steps, "distill_steps": args.steps, "batch_size": args.batch_size,
               "seed": args.seed}  # fmt: skip
    if args.interrupt_after_stage_1:
        options["stages"] = (1,)
    healed = parc_surgery.heal(conv, folder, work_dir=out / "heal_work", **options)
    h = healed.report.heal

    summary = {
        "world_size": h.world_size,
        "teacher_accuracy_on_folder": teacher_acc,
        "targets": [t.name for t in conv.plan.targets],
        "images_train": h.images_train,
        "images_heldout": h.images_heldout,
        "points": {p.name: {"agreement": p.agreement, "kl": p.kl, "block_error": p.mean_block_error} for p in h.points},
        "stages": [{"stage": s.stage, "steps_done": s.steps_done, "resumed": s.resumed} for s in h.stages],
        "seconds": h.seconds,
    }
    if is_main():
        if not args.interrupt_after_stage_1:
            path = out / "healed.safetensors"
            parc_surgery.save(healed, path, model_name="vit_tiny_patch16_224", model_args=model_args, force=True)
            again = parc_surgery.load(path)
            with torch.no_grad():
                summary["reload_max_abs_diff"] = (again(x[:16]) - healed.model(x[:16])).abs().max().item()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(h.to_markdown())
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
