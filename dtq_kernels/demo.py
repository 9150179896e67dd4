"""`make demo`: quantize the shipped reference DiT and compare it with floating point, on the CPU.

Loads the trained Fashion-MNIST DiT embedded in the package, builds quantized versions of it (ViDiT-Q
W8A8: dynamic per-token activations; ViDiT-Q W4A8: 4-bit weights with static per-time-range
activation scales and smoothing, calibrated on the model's own samples), samples every model from
identical noise and labels, and prints a table: class accuracy (the shipped classifier), PSNR/SSIM
against the FP samples, per-layer SQNR and weight bytes. Writes one labelled comparison grid (a row
per model, a column per class), a grid per model and the quantized checkpoints under --out. FID is
left to `dtq eval` (Inception on the CPU is slow); benchmarks/results/quality.md has it.

    python -m dtq_kernels.demo [--recipes viditq-w8a8,viditq-w4a8] [--samples 20] [--steps 20]

Every recipe of `dtq recipes` works here; the TQ-DiT ones spend minutes of CPU on their scale search.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .cli_args import positive_int
from .fileio import replaced_atomically


def main(argv=None) -> None:
    from dtq_kernels.models.reference_dit.model import DEFAULT_GUIDANCE
    p = argparse.ArgumentParser(prog="dtq demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="viditq-w8a8,viditq-w4a8")
    p.add_argument("--samples", type=positive_int, default=20, help="images per model (labels i mod 10)")
    p.add_argument("--steps", type=positive_int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale (1: no guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = p.parse_args(argv)

    import dtq_kernels as dtq
    from dtq_kernels.eval import harness, report
    from dtq_kernels.eval.cli import build_quantized, fp16_bytes_of, print_table
    from dtq_kernels.models.reference_dit import CLASSES, load_reference_dit
    from dtq_kernels.models.reference_dit.images import comparison_grid

    start = time.time()
    torch.manual_seed(args.seed)
    fp = load_reference_dit()
    sample_fn = harness.default_sample_fn()
    models = {"fp32": fp}
    for name in [r for r in args.recipes.split(",") if r]:
        t0 = time.time()
        print(f"{name}: calibrating on the model's own samples, then quantizing", flush=True)
        models[name], notes = build_quantized(dtq, fp, name, sample_fn, args.steps, args.guidance, progress=True)
        print(f"{name}: ready in {time.time() - t0:.1f} s", flush=True)
        for note in notes:
            print(f"  note: {note}", flush=True)
    print(f"sampling {args.samples} images from each of {len(models)} models: {args.steps} DDIM steps, "
          f"guidance {args.guidance}, identical noise and labels for every model (CPU)", flush=True)
    ev = harness.evaluate(models, args.samples, args.seed, args.steps, args.guidance, fid=False, sqnr_samples=2,
                          log=lambda s: None, progress=True)
    print()
    print_table(ev.rows, fp16_bytes_of(fp))
    args.out.mkdir(parents=True, exist_ok=True)
    # every image is written whole or not at all (an interrupted demo leaves no torn PNG)
    with replaced_atomically(args.out / "comparison.png") as tmp:
        comparison_grid(ev.images, ev.labels, CLASSES, per_class=max(1, min(2, args.samples // 10))).save(tmp)
    for name, images in ev.images.items():
        with replaced_atomically(args.out / f"samples_{name}.png") as tmp:
            report.save_grid(images, str(tmp))
    for name, model in list(models.items())[1:]:
        dtq.save_quantized(model, args.out / f"ckpt_{name}", overwrite=True)  # the demo's own output
    print(f"\nwrote {args.out}/comparison.png (a row per model, a column per class), one grid per model, and the "
          f"quantized checkpoints (ckpt_*/) — {time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
