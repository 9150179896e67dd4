"""Train the reference DiT on Fashion-MNIST (epsilon prediction, DDPM linear schedule, CFG label dropout).

    python -m dtq_kernels.models.reference_dit.train --max-minutes 75 --threads 1      # CPU
    python -m dtq_kernels.models.reference_dit.train --patch-size 2 --batch 256 --bf16  # on a GPU

Resumable (--resume continues from runs/reference_dit/state.pt). Every --save-every minutes it writes
the EMA weights (what ships) with save_pretrained to --export (default: the package's weights/ dir).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from .data import load_fashion_mnist
from .model import NUM_TRAIN_TIMESTEPS, WEIGHTS_DIR, build_reference_dit


def ddpm_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--state", type=Path, default=Path("runs/reference_dit/state.pt"))
    p.add_argument("--export", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def export(ema, args, step: int, seconds: float, losses: list[float]) -> None:
    """Ship the EMA weights in fp16 (half the bytes; they are loaded back as fp32 for inference)."""
    args.export.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(ema).half().save_pretrained(args.export, safe_serialization=True)
    info = {"steps": step, "batch": args.batch, "wall_seconds": round(seconds), "threads": args.threads,
            "device": args.device, "lr": args.lr, "ema": args.ema,
            "final_loss_avg100": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 5)}
    (args.export / "training.json").write_text(json.dumps(info, indent=1))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    images, labels = load_fashion_mnist("train")
    images, labels = images.to(device), labels.to(device)
    model = build_reference_dit(patch_size=args.patch_size, num_layers=args.layers, heads=args.heads,
                                head_dim=args.head_dim).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed, losses = 0, 0.0, []
    if args.resume and args.state.exists():
        st = torch.load(args.state, map_location=device)
        model.load_state_dict(st["model"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    abar = ddpm_alphas_cumprod().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, tokens {(32 // args.patch_size) ** 2}, device {device}", flush=True)

    start, last_save = time.time() - elapsed, time.time()
    while step < args.max_steps and (time.time() - start) < args.max_minutes * 60:
        idx = torch.randint(0, images.shape[0], (args.batch,), device=device)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (args.batch,), device=device)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, timestep=t, class_labels=y).sample  # LabelEmbedding drops 10% to the null class
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # EMA warm-up: early weights are forgotten fast
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        losses.append(loss.item())
        if step % 25 == 0:
            el = time.time() - start
            print(f"step {step} loss {sum(losses[-25:]) / 25:.4f} lr {lr:.2e} {el / step:.2f} s/step "
                  f"{el / 60:.1f} min", flush=True)
        if time.time() - last_save > args.save_every * 60:
            save_state(args, model, ema, opt, step, time.time() - start, losses)
            export(ema, args, step, time.time() - start, losses)
            last_save = time.time()
    save_state(args, model, ema, opt, step, time.time() - start, losses)
    export(ema, args, step, time.time() - start, losses)
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min", flush=True)


def save_state(args, model, ema, opt, step, elapsed, losses) -> None:
    args.state.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.state.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "elapsed": elapsed, "losses": losses}, tmp)
    tmp.replace(args.state)


if __name__ == "__main__":
    main()
