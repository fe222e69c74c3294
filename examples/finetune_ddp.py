"""Fine-tune a converted model with DistributedDataParallel: ``warm_start`` vs ``reference`` initialisation.

The whole pipeline, on a real (small, offline) image data set: scikit-learn's bundled handwritten
digits (1,797 8x8 grayscale images, 10 classes), upsampled to ``--image-size`` and repeated to 3
channels, split 75/25 into train/test (stratified, fixed seed).

1. **Pretrain** the original timm model (``--model``, random init) for ``--pretrain-steps`` with DDP,
   then broadcast rank 0's state (BatchNorm statistics included) so every rank holds bit-identical weights.
2. **Convert** it on every rank with ``parc_surgery.convert(model, --rule, init=..., seed=...)``, once per
   initialisation. The same model, rule and seed give bit-identical weights on every rank (checked).
3. **Fine-tune** each converted model (and, as a baseline, the unconverted one) for ``--steps`` with DDP:
   ``DistributedSampler`` with the same seed, so every run sees the same data in the same order.
4. **Evaluate** test accuracy and loss right after conversion and after fine-tuning (each rank scores its shard
   of the test set; the counts are summed).
5. **Save** each fine-tuned conversion as safetensors (``parc_surgery.save``), reload it
   with ``parc_surgery.load`` and check that it gives bit-identical logits, hence the same accuracy.

Only rank 0 prints and writes; results go to ``--out/results.json``. Runs under torchrun (gloo on
CPU, nccl when a GPU is present) and as a plain script (a world of one)::

    torchrun --standalone --nproc_per_node=2 examples/finetune_ddp.py --steps 100 --out out/ddp
    python examples/finetune_ddp.py --steps 20 --pretrain-steps 40 --image-size 32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import parc_surgery

# The default model is a slim ResNet-18 (half the channels) so that a run takes minutes on a laptop CPU.
SLIM_RESNET18 = {"channels": [32, 64, 128, 256]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model name (default: resnet18)")
    p.add_argument(
        "--model-args",
        default=None,
        help="JSON create_model kwargs (default: slim channels 32/64/128/256 for resnet18, else {})",
    )
    p.add_argument("--rule", default="resnet_parc", help="bundled rule name or YAML path (default: resnet_parc)")
    p.add_argument("--image-size", type=int, default=64, help="digits are upsampled from 8x8 to this (default: 64)")
    p.add_argument("--pretrain-steps", type=int, default=150, help="steps training the original model (default: 150)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per initialisation (default: 60)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size, split over ranks (default: 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="AdamW fine-tuning learning rate (default: 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, data order and conversion (default: 0)")
    p.add_argument("--out", default="out/finetune_ddp", help="output folder (default: out/finetune_ddp)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the process group: torchrun's environment when present, else a world of one (same code path)."""
    # nccl on GPUs when every local rank gets its own; else gloo on CPU
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:  # plain `python examples/finetune_ddp.py`: a single-process group through a file store
        store = Path(tempfile.mkdtemp(prefix="parc_ddp_")) / "store"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


@torch.no_grad()
def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers (BN running stats included) bit-identical to rank ``src``'s."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def ranks_agree(model: nn.Module, device: torch.device) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (compares SHA-256 digests of the raw bytes)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.tensor(list(h.digest()[:8]), dtype=torch.int64, device=device)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_digits_split(image_size: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """sklearn's digits as 3 x ``image_size`` x ``image_size`` float images (normalised), train/test 75/25."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - 0.3) / 0.4).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=y.numpy()
    )
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def batches(dataset: TensorDataset, *, steps: int, batch_size: int, seed: int):
    """``steps`` per-rank batches from a seeded DistributedSampler, epoch after epoch: the same order every call."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=max(1, batch_size // world), sampler=sampler, drop_last=True)
    done, epoch = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            yield xb, yb
            done += 1
            if done == steps:
                return
        epoch += 1


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def train(model: nn.Module, data: TensorDataset, *, steps: int, batch_size: int, lr: float, seed: int, device) -> float:
    """DDP training of ``model`` in place (AdamW, cosine decay); returns rank 0's last loss. Ranks stay identical."""
    torch.manual_seed(seed)  # same dropout / drop-path draws for every run
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, steps))))
    model.train()
    loss = torch.zeros(())
    for xb, yb in batches(data, steps=steps, batch_size=batch_size, seed=seed):
        loss = F.cross_entropy(ddp(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    broadcast_state(model)  # BN running statistics were updated on each rank's own batches
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def logits_of(model: nn.Module, data: TensorDataset, device, *, indices=None, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    x, _ = data.tensors
    idx = torch.arange(len(x)) if indices is None else indices
    return torch.cat([model(x[idx[i : i + batch_size]].to(device)).cpu() for i in range(0, len(idx), batch_size)])


def evaluate(model: nn.Module, data: TensorDataset, device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``data``: each rank scores every ``world``-th sample, sums are reduced."""
    world, rank = dist.get_world_size(), dist.get_rank()
    idx = torch.arange(rank, len(data), world)
    logits, labels = logits_of(model, data, device, indices=idx), data.tensors[1][idx]
    sums = [
        (logits.argmax(1) == labels).sum().item(),
        F.cross_entropy(logits, labels, reduction="sum").item(),
        len(idx),
    ]
    sums = torch.tensor(sums, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item()


def save_and_reload(conv, path: Path, data: TensorDataset, device, *, model_name: str, model_args: dict, seed: int):
    """Rank 0: save with safetensors, reload with ``parc_surgery.load``: same logits, same accuracy?"""
    parc_surgery.save(conv, path, source=model_name, model_args=model_args, seed=seed, force=True)
    reloaded = parc_surgery.load(path, device=device)
    a, b = logits_of(conv.model, data, device), logits_of(reloaded, data, device)
    labels = data.tensors[1]
    acc_a = (a.argmax(1) == labels).sum().item() / len(labels)
    acc_b = (b.argmax(1) == labels).sum().item() / len(labels)
    diff = (a - b).abs().max().item()
    return {
        "path": str(path),
        "acc_in_memory": acc_a,
        "acc_reloaded": acc_b,
        "max_abs_logit_diff": diff,
        "equal": acc_a == acc_b and diff == 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model_args = json.loads(args.model_args) if args.model_args else (SLIM_RESNET18 if args.model == "resnet18" else {})
    model_args = {**model_args, "num_classes": 10}
    train_set, test_set = load_digits_split(args.image_size, args.seed)
    log(
        f"world size {world} ({dist.get_backend()}), device {device}; digits: {len(train_set)} train / "
        f"{len(test_set)} test at {args.image_size}x{args.image_size}"
    )
    t0 = time.time()
    fit = {"batch_size": args.batch_size, "device": device}

    # 1. pretrain the original model with DDP (DDP starts every rank from rank 0's init)
    torch.manual_seed(args.seed)
    original = timm.create_model(args.model, pretrained=False, **model_args).to(device)
    train(original, train_set, steps=args.pretrain_steps, lr=args.lr, seed=args.seed, **fit)
    original_acc, original_loss = evaluate(original, test_set, device)
    log(
        f"pretrained {args.model} for {args.pretrain_steps} steps: test accuracy {original_acc:.4f}, "
        f"loss {original_loss:.4f} ({time.time() - t0:.0f}s)"
    )
    pretrained = {k: v.clone() for k, v in original.state_dict().items()}

    rows = []
    for init in ("warm_start", "reference", None):  # None: the unconverted model, trained on as a baseline
        original.load_state_dict(pretrained)
        conv, model, label = None, original, "original (not converted)"
        if init is not None:
            # 2. convert on every rank: same model, rule and seed -> bit-identical weights everywhere (checked)
            conv = parc_surgery.convert(
                original.cpu(), args.rule, input_size=args.image_size, init=init, seed=args.seed, count=False
            )
            original.to(device)
            model, label = conv.model.to(device), f"{conv.plan.rule}, init {init}"
            if not ranks_agree(model, device):
                raise RuntimeError(f"rank {rank}: the converted weights differ across ranks")
        acc0, loss0 = evaluate(model, test_set, device)
        # 3. fine-tune: same steps, seed and data order for every initialisation
        train(model, train_set, steps=args.steps, lr=args.finetune_lr, seed=args.seed + 1, **fit)
        acc1, loss1 = evaluate(model, test_set, device)
        row = {
            "model": label,
            "init": init,
            "acc_converted": acc0,
            "loss_converted": loss0,
            "acc_finetuned": acc1,
            "loss_finetuned": loss1,
        }
        if conv is not None:
            row["targets"] = [t.name for t in conv.plan.targets]
            row["params"] = sum(p.numel() for p in model.parameters())
            if rank == 0:  # 5. save with safetensors, reload, evaluate again
                path = out / f"{args.model}_{init}.safetensors"
                row["reload"] = save_and_reload(
                    conv, path, test_set, device, model_name=args.model, model_args=model_args, seed=args.seed
                )
            dist.barrier()
        rows.append(row)
        log(
            f"{label}: test accuracy {acc0:.4f} (loss {loss0:.4f}) -> {acc1:.4f} ({loss1:.4f}) after "
            f"{args.steps} steps ({time.time() - t0:.0f}s)"
        )

    result = {
        "model": args.model,
        "model_args": model_args,
        "rule": args.rule,
        "image_size": args.image_size,
        "world_size": world,
        "backend": dist.get_backend(),
        "pretrain_steps": args.pretrain_steps,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "finetune_lr": args.finetune_lr,
        "seed": args.seed,
        "original_accuracy": original_acc,
        "original_loss": original_loss,
        "rows": rows,
        "reload_equal": all(r["reload"]["equal"] for r in rows if "reload" in r) if rank == 0 else None,
        "seconds": round(time.time() - t0, 1),
    }
    if rank == 0:
        (out / "results.json").write_text(json.dumps(result, indent=2))
        print_table(result)
    dist.destroy_process_group()
    return result


def print_table(result: dict) -> None:
    print(
        f"\n{result['model']} on sklearn digits at {result['image_size']}x{result['image_size']}: pretrained "
        f"{result['pretrain_steps']} steps (test accuracy {result['original_accuracy']:.4f}, loss "
        f"{result['original_loss']:.4f}), fine-tuned {result['steps']} steps, global batch {result['batch_size']}, "
        f"{result['world_size']} rank(s) ({result['backend']}), {result['seconds']:.0f} s\n"
    )
    print("| model | test acc. (loss) after conversion | after fine-tuning | reloaded == in memory |")
    print("|---|---|---|---|")
    for r in result["rows"]:
        reload = r.get("reload")
        same = "n/a" if reload is None else ("yes" if reload["equal"] else f"NO ({reload['max_abs_logit_diff']:.2e})")
        print(
            f"| {r['model']} | {r['acc_converted']:.4f} ({r['loss_converted']:.4f}) | "
            f"{r['acc_finetuned']:.4f} ({r['loss_finetuned']:.4f}) | {same} |"
        )


if __name__ == "__main__":
    main()
