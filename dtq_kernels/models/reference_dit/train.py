"""Train the reference DiT on Fashion-MNIST (epsilon prediction, DDPM linear schedule, CFG label dropout).

    OMP_NUM_THREADS=1 python -m dtq_kernels.models.reference_dit.train --max-minutes 65 --threads 1  # CPU
    python -m dtq_kernels.models.reference_dit.train --batch 256 --bf16 --max-minutes 20 --resume  # GPU

Resumable: --resume continues from --state (model, EMA, optimizer, step, wall time, and the model
config it was started with, which overrides the size flags). --max-minutes counts total training time
across resumes. Every --save-every minutes it writes the state and the EMA weights (what ships) with
save_pretrained to --export (default: the package's weights/ dir; only config.json + safetensors).

Evaluating the exported weights (sample grid, classifier accuracy, FID) is a tool of its own:
    python -m dtq_kernels.eval.reference_model [--export DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from ...fileio import replaced_atomically, write_atomically
from .data import load_fashion_mnist
from .model import NUM_TRAIN_TIMESTEPS, WEIGHTS_DIR, build_reference_dit, load_reference_dit


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
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--min-snr", type=float, default=5.0,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023): weight min(SNR, gamma)/SNR on the "
                        "epsilon loss; 0 = plain MSE. Spends less effort on nearly clean timesteps")
    p.add_argument("--lr-decay-steps", type=int, default=6500,
                   help="cosine decay of the learning rate to 10%% over this many steps after warm-up (0 = none)")
    p.add_argument("--dit-init", action=argparse.BooleanOptionalAction, default=True,
                   help="DiT paper initialisation for a fresh model: xavier linears, zero adaLN modulation "
                        "and zero output layer (adaLN-zero: every block starts as the identity)")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--state", type=Path, default=Path("runs/reference_dit_train/state.pt"))
    p.add_argument("--export", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None,
                   help="warm start: model and EMA from these exported weights (e.g. the shipped ones, when the "
                        "resume state is gone); optimizer, step count and warm-up start afresh")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compact-state", type=Path, default=None, metavar="DST",
                   help="no training: write a compact copy of --state to DST (model fp32, AdamW moments bf16, EMA "
                        "fp16: about 60%% of the bytes), small enough to keep in the repository so a later session "
                        "on another machine resumes with its optimizer state (--resume --state DST)")
    return p.parse_args(argv)


def export(ema, args, step: int, seconds: float, losses: list[float]) -> None:
    """Ship the EMA weights in fp16 (half the bytes; load_reference_dit loads them back as fp32).
    The run's facts (steps, batch, wall time, ...) go to training.json beside --state, not into --export."""
    args.export.mkdir(parents=True, exist_ok=True)
    # written beside, then each file renamed in: an interrupted export never leaves torn shipped weights
    with tempfile.TemporaryDirectory(dir=args.export.parent) as tmp:
        copy.deepcopy(ema).half().save_pretrained(tmp, safe_serialization=True)
        for f in sorted(Path(tmp).iterdir()):
            with replaced_atomically(args.export / f.name) as dst:
                os.replace(f, dst)
    info = {"steps": step, "batch": args.batch, "samples_seen": step * args.batch, "wall_seconds": round(seconds),
            "threads": args.threads, "device": args.device, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
            "bf16": args.bf16, "min_snr": args.min_snr, "lr_decay_steps": args.lr_decay_steps,
            "dit_init": args.dit_init, "config": dict(ema.config), "init_from": str(args.init_from or ""),
            "loss_avg_last100": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 5)}
    args.state.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.state.with_name("training.json"), json.dumps(info, indent=1, default=str))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compact_state is not None:
        compact_state(args.state, args.compact_state)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    images, labels = load_fashion_mnist("train")
    images, labels = images.to(device), labels.to(device)
    st = torch.load(args.state, map_location=device) if args.resume and args.state.exists() else None
    size = (st["size"] if st is not None and "size" in st else
            dict(patch_size=args.patch_size, num_layers=args.layers, heads=args.heads, head_dim=args.head_dim))
    args.size = size
    model = build_reference_dit(**size).to(device).train()
    if args.dit_init and st is None and args.init_from is None:
        dit_initialize(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed, losses = 0, 0.0, []
    if st is not None:
        model.load_state_dict(st["model"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    elif args.init_from is not None:
        init = load_reference_dit(args.init_from).state_dict()  # strict load: a size mismatch raises
        model.load_state_dict(init); ema.load_state_dict(init)
        print(f"warm start from {args.init_from}", flush=True)
    abar = ddpm_alphas_cumprod().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, tokens {(32 // size['patch_size']) ** 2}, device {device}", flush=True)

    start, last_save = time.time() - elapsed, time.time()
    while step < args.max_steps and (time.time() - start) < args.max_minutes * 60:
        idx = torch.randint(0, images.shape[0], (args.batch,), device=device)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (args.batch,), device=device)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        lr = learning_rate(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, timestep=t, class_labels=y).sample  # LabelEmbedding drops 10% to the null class
        per_sample = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * snr_weight(a.view(-1), args.min_snr)).mean()
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


def learning_rate(args, step: int) -> float:
    """Linear warm-up, then constant, or cosine decay to 10 % over --lr-decay-steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay_steps <= 0:
        return args.lr
    frac = min(1.0, (step - args.warmup) / args.lr_decay_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def snr_weight(abar_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weight for the epsilon loss: min(SNR, gamma) / SNR with SNR = abar / (1 - abar)."""
    if gamma <= 0:
        return torch.ones_like(abar_t)
    snr = abar_t / (1 - abar_t)
    return snr.clamp(max=gamma) / snr


def dit_initialize(model) -> None:
    """The DiT paper's initialisation (diffusers keeps PyTorch's defaults): xavier-uniform linears with zero
    bias, N(0, 0.02) embeddings, and zero for every adaLN modulation linear and the output projection, so
    each block starts as the identity and the model predicts 0. It trains markedly faster from scratch."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)
    for blk in model.transformer_blocks:
        for m in blk.norm1.emb.timestep_embedder.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02)
        torch.nn.init.zeros_(blk.norm1.linear.weight)
        torch.nn.init.zeros_(blk.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)


def compact_state(src: Path, dst: Path) -> None:
    """A resumable copy of a training state with the master weights kept in fp32 (small AdamW updates must not
    be rounded away) but the AdamW moments in bf16 and the EMA in fp16: resuming casts them back to fp32
    (torch's Optimizer.load_state_dict and Module.load_state_dict both cast to the parameters' dtype)."""
    st = torch.load(src, map_location="cpu")
    st["opt"] = copy.deepcopy(st["opt"])
    for slot in st["opt"]["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            slot[k] = slot[k].to(torch.bfloat16)
    st["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in st["ema"].items()}
    with replaced_atomically(dst) as tmp:
        torch.save(st, tmp)


def save_state(args, model, ema, opt, step, elapsed, losses) -> None:
    with replaced_atomically(args.state) as tmp:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "losses": losses, "size": args.size}, tmp)


if __name__ == "__main__":
    main()
