"""`make demo`: quantize the shipped reference DiT and compare it with floating point, on the CPU.

Loads the trained Fashion-MNIST DiT embedded in the package, builds quantized versions of it (ViDiT-Q
W8A8 dynamic per-token, and ViDiT-Q W4A8 with static per-time-range activation scales and smoothing,
calibrated on the model's own samples),
samples every model from identical noise and labels, and prints class accuracy (the shipped
classifier), PSNR/SSIM against the FP samples, per-layer SQNR and weight bytes. Writes a sample grid
per model and the quantized checkpoint under --out. FID is left to `dtq eval` (Inception on the CPU is
slow); see benchmarks/results/quality.md for it.

    python -m dtq_kernels.demo [--recipes viditq-w8a8,viditq-w4a8] [--samples 10] [--steps 20]

Every recipe of `dtq recipes` works here; the TQ-DiT ones spend about 4 minutes of one CPU core on their
scale grid search.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dtq demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="viditq-w8a8,viditq-w4a8")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = p.parse_args(argv)

    import dtq_kernels as dtq
    from dtq_kernels.eval import harness, report
    from dtq_kernels.eval.cli import build_quantized, print_table
    from dtq_kernels.models.reference_dit import load_reference_dit

    torch.manual_seed(args.seed)
    fp = load_reference_dit()
    sample_fn = harness.default_sample_fn()
    models = {"fp32": fp}
    for name in [r for r in args.recipes.split(",") if r]:
        start = time.time()
        models[name], notes = build_quantized(dtq, fp, name, sample_fn, args.steps, args.guidance)
        print(f"{name}: calibrated and quantized in {time.time() - start:.1f} s", flush=True)
        for note in notes:
            print(f"  note: {note}", flush=True)
    print(f"sampling {args.samples} images x {len(models)} models, {args.steps} DDIM steps, "
          f"guidance {args.guidance}, identical noise per model (CPU)", flush=True)
    ev = harness.evaluate(models, args.samples, args.seed, args.steps, args.guidance, fid=False, sqnr_samples=2,
                          log=lambda s: None)
    print_table(ev.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, images in ev.images.items():
        report.save_grid(images, str(args.out / f"samples_{name}.png"))
    for name, model in list(models.items())[1:]:
        dtq.save_quantized(model, args.out / f"ckpt_{name}", overwrite=True)  # the demo's own output
    print(f"sample grids and quantized checkpoints in {args.out}/")


if __name__ == "__main__":
    main()
