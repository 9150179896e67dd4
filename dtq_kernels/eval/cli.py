"""`dtq eval`: build the models to compare (FP, recipes calibrated on the spot, saved quantized
checkpoints), run the harness, print the table, and optionally write the quality report.

    dtq eval --recipes viditq-w8a8,tqdit-w6a6      # FP + two recipes, table on stdout
    dtq eval --recipes all --out-dir DIR            # every recipe + ablations, DIR/quality.{md,json}
    dtq eval --quantized mine=path/to/ckpt          # a saved dtq.save_quantized directory
    dtq eval --tiny                                 # dry run on a tiny random DiT (numbers mean nothing)

Calibration drives the model's own sampler with its own seeds (CALIB_SEED + batch), never the test
set. The noise floor is the FP model sampled from a second seed: differences below it are noise.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import logging
import math
import os
import sys
import time
from typing import Callable

import torch

from ..cli_args import device_spec, existing_dir, finite_float, nonnegative_int, output_dir, positive_int, torch_device
from . import activation_stats, harness, hooks, report
from .progress import RunProgress

# CPU counts chosen from costs measured on this project's 2-core CPU machine with the reference DiT (patch 4,
# 64 tokens; 25 DDIM steps, guidance 1.15), one thread beside another job: sampling ~0.43 s/image in fp32,
# quantized 1.4x that (ViDiT-Q W8A8) to 9x (HQ-DiT W4A4) on the dtq ops' reference backend (the quality
# table's sampling column has every model's), two threads alone ~0.25 s/image (1.7x); Inception-v3 ~0.17
# s/image (0.15 on two threads: one process per core, --shard, uses the machine better). N = 1000 for every
# recipe is hours of CPU (resumable); FID at N = 100 is strongly biased upward: compare it only between rows
# of one run. A GPU run uses GPU_SAMPLES and all 10,000 test images.
CPU_SAMPLES = 100
CPU_FID_REF = 1000
GPU_SAMPLES = 5000
CPU_COST_NOTE = ("CPU; each model's sampling cost per image is in the table (reference ops; guidance > 1 runs two "
                 "transformer passes per step); Inception ~0.15-0.17 s/image; calibration 17 s (rtn) to 175 s "
                 "(tqdit-w6a6-nomrq) per recipe on one thread, measured 2026-12-04")
CALIB_SAMPLES = 32
CALIB_BATCH = 16
CALIB_SEED = 10_000      # calibration noise seeds: disjoint from the evaluation seeds
NOISE_SEEDS = 3          # the noise floor: the FP model sampled again with seeds seed+1 .. seed+NOISE_SEEDS
# Ablations: one of a paper's components switched off, calibrated the same way.
ABLATIONS = {"tqdit-w6a6-g1": ("tqdit-w6a6", {"time_groups": 1}, "tqdit-w6a6 with ONE time group (TGQ off)"),
             "tqdit-w6a6-nomrq": ("tqdit-w6a6", {"mrq": False},
                                  "tqdit-w6a6 without MRQ (uniform post-softmax/post-GELU quantizers)"),
             "hqdit-w4a4-int4": ("hqdit-w4a4-fp4", {"weight": "int4", "act": "int4"},
                                 "hqdit-w4a4-fp4 on the INT4 grid (same rotation, clip search, GPTQ and blocks "
                                 "of 32; FP4 off)")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", type=_recipe_list, default=None, help="comma-separated recipes/ablations, or 'all'")
    p.add_argument("--no-ablations", action="store_true", help="with --recipes all: skip the TQ-DiT ablations")
    p.add_argument("--quantized", action="append", type=_named_checkpoint, default=[], metavar="NAME=DIR",
                   help="a dtq.save_quantized checkpoint of the reference model (repeatable)")
    p.add_argument("--n-samples", type=positive_int, default=None,
                   help=f"samples per model (default: {GPU_SAMPLES} on a GPU, {CPU_SAMPLES} on CPU)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the reference sampler's)")
    p.add_argument("--guidance", type=finite_float, default=None, help="CFG scale (default: the reference sampler's)")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--fid-ref-n", type=positive_int, default=None,
                   help=f"test images for the FID statistics (default: 10000 on a GPU, {CPU_FID_REF} on CPU)")
    p.add_argument("--cls-ref-n", type=positive_int, default=10_000, help="test images for the classifier-feature statistics")
    p.add_argument("--no-fid", action="store_true", help="skip Inception FID (classifier metrics only)")
    p.add_argument("--defer-fid", action="store_true",
                   help="with --out-dir: score everything but FID and keep every model's 8-bit samples in the progress "
                        "file instead (for a machine without the Inception weights, e.g. the GPU machine); the run "
                        "that computes the FIDs and writes the report is the same command without --defer-fid, "
                        "elsewhere with --sampled-on")
    p.add_argument("--sampled-on", type=device_spec, default=None, metavar="DEVICE",
                   help="finish a run whose models were sampled on DEVICE (e.g. cuda, on the GPU machine) rather "
                        "than on --device: compute the FIDs it deferred and write the report; samples no model")
    p.add_argument("--sqnr-samples", type=nonnegative_int, default=4)
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out-dir", type=output_dir, default=None, help="write quality.md/.json and sample grids here")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="with --out-dir: evaluate only every N-th recipe (and noise-floor seed) starting at I, into "
                        "a progress file of its own, and write no report; N such processes of one thread each use "
                        "N cores better than one process of N threads (Inception scales poorly with threads). The "
                        "same command without --shard then collects every shard's results and writes the report")
    p.add_argument("--tiny", action="store_true", help="tiny random DiT, 8 samples, 2 steps (dry run)")


def _shard(text: str) -> tuple[int, int]:
    """argparse type of --shard: 'I/N' with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _recipe_list(text: str) -> str:
    """argparse type of --recipes: 'all' or comma-separated names dtq knows (checked before any model loads)."""
    if text == "all":
        return text
    available = available_recipes(_dtq_api())
    names = text.split(",")
    unknown = [r for r in names if r not in available]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown recipes {unknown}; available: {', '.join(available)}")
    return text


def _named_checkpoint(text: str) -> tuple[str, str]:
    """argparse type of --quantized: NAME=DIR with a non-empty NAME and an existing DIR."""
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"wants NAME=DIR, got {text!r}")
    return name, str(existing_dir(path))


def _given(value, default):
    """An option's value, or `default` when it was not given (never for a given 0: the types refuse it)."""
    return default if value is None else value


def _reference():
    """(model loader, sampler, default steps, default guidance) of the shipped reference DiT."""
    from dtq_kernels.models import reference_dit as ref

    params = inspect.signature(ref.sample).parameters
    return (ref.load_reference_dit, ref.sample, params["num_inference_steps"].default,
            params["guidance_scale"].default)


def _dtq_api():
    import dtq_kernels as dtq

    missing = [f for f in ("calibrate", "quantize", "recipes") if not hasattr(dtq, f)]
    if missing:
        raise RuntimeError(f"dtq_kernels does not export {', '.join(missing)}: recipes cannot be evaluated")
    return dtq


def available_recipes(dtq) -> dict[str, str]:
    out = dict(dtq.recipes())
    out.update({k: v[2] for k, v in ABLATIONS.items() if v[0] in out})
    return out


class LogCollector(logging.Handler):
    """A logging handler keeping the messages of level >= `level` in `messages`; `select(message)`, when
    given, returns the text to keep (e.g. shortened) or None to drop the message."""

    def __init__(self, level: int = logging.WARNING, select: Callable[[str], str | None] | None = None):
        super().__init__(level)
        self.select = select
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if self.select is not None:
            msg = self.select(msg)
        if msg is not None:
            self.messages.append(msg)


def build_quantized(dtq, fp_model, name: str, sample_fn, steps: int, guidance: float, progress: bool = False):
    """Calibrate recipe `name` (or an ABLATIONS variant) on the model's own samples; quantize a copy.
    Returns (model, warnings dtq_kernels logged meanwhile, e.g. a plan part this build cannot run)."""
    from dtq_kernels.calib import get_recipe

    if name in ABLATIONS:
        base, overrides, _ = ABLATIONS[name]
        recipe = dataclasses.replace(get_recipe(base), name=name, **overrides)
    else:
        recipe = name
    labels = harness.balanced_labels(CALIB_SAMPLES)

    def run_fn(transformer):
        for b, i in enumerate(range(0, CALIB_SAMPLES, CALIB_BATCH)):
            sample_fn(transformer, labels[i:i + CALIB_BATCH], steps, torch.Generator().manual_seed(CALIB_SEED + b),
                      guidance)

    handler = LogCollector()
    logger = logging.getLogger("dtq_kernels")
    logger.addHandler(handler)
    try:
        plan = dtq.calibrate(fp_model, recipe, run_fn=run_fn, num_inference_steps=steps, progress=progress)
        model = copy.deepcopy(fp_model)
        # per layer: the SQNR table hooks every Linear's forward, which the fast block path bypasses
        # (it hands codes to the GEMMs directly); on CPU both paths give the same numbers
        dtq.quantize(model, plan, fuse=False)
    finally:
        logger.removeHandler(handler)
    return model.eval(), handler.messages


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names and bytes, in order): which floating-point model a report measured."""
    import hashlib
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def merge_previous(path: str, evaluation, descriptions: dict) -> None:
    """Keep the rows (and SQNR) of an earlier report that used the same configuration and the same FP weights
    (after a retrain, the old rows measured another model)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    keys = ("n_samples", "seed", "steps", "guidance", "fid", "fid_ref_n", "cls_ref_n", "sqnr_samples", "batch_size",
            "fp_weights_sha256")
    if any(old["config"].get(k) != evaluation.config[k] for k in keys):
        print(f"{path} used another configuration: its rows are not kept", flush=True)
        return
    new = {r["model"] for r in evaluation.rows}
    for r in old["rows"]:
        if r["model"] not in new:
            evaluation.rows.append(r)
            evaluation.sqnr[r["model"]] = old.get("sqnr_per_layer", {}).get(r["model"], {})
    for m, d in old.get("meta", {}).get("descriptions", {}).items():
        descriptions.setdefault(m, d)


# (row key, header, unit line, legend, format): the columns a newcomer can read; a column every row
# lacks (e.g. FID when it was not computed) is left out rather than printed as None.
TABLE_COLUMNS = [
    ("fid", "FID", "", "Frechet Inception distance to the Fashion-MNIST test images (lower is better; "
     "compare only rows of one run: it depends on the sample count)", "{:.1f}"),
    ("class_acc", "class acc", "%", "share of samples the shipped classifier (92.1% on real test images) "
     "assigns to the requested class", "{:.0%}"),
    ("cls_fd", "cls FD", "", "Frechet distance of the classifier's features to the test set (lower is better)",
     "{:.2f}"),
    ("psnr_vs_ref", "PSNR vs FP", "dB", "pixel agreement with the floating-point model's sample from the same "
     "noise (higher is closer; FP itself is infinite)", "{:.1f}"),
    ("ssim_vs_ref", "SSIM vs FP", "", "structural similarity to the FP sample from the same noise (1 = identical)",
     "{:.3f}"),
    ("sqnr_median_db", "SQNR", "dB", "median signal-to-quantization-noise ratio of the quantized layers' "
     "outputs vs FP, over the sampling steps (higher is better)", "{:.1f}"),
]


def print_table(rows: list[dict], fp16_bytes: int | None = None, legend: bool = True) -> None:
    """The comparison table for people: one row per model, units in a second header line, weight bytes as
    MB and as a multiple of the FP16 model (fp16_bytes), then a legend of what each column means."""
    cols = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    width = max(12, max(len(str(r["model"])) for r in rows) + 2)
    head = [f"{'model':<{width}}"] + [f"{c[1]:>11}" for c in cols] + [f"{'weights':>9}"]
    units = [" " * width] + [f"{c[2]:>11}" for c in cols] + [f"{'MB':>9}"]
    if fp16_bytes:
        head.append(f"{'vs FP16':>8}")
        units.append(f"{'':>8}")
    print("  ".join(head))
    print("  ".join(units))

    def cell(row, key, fmt):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return fmt.format(v)
    for r in rows:
        line = [f"{r['model']:<{width}}"] + [f"{cell(r, key, fmt):>11}" for key, _, _, _, fmt in cols]
        line.append(f"{r['weight_bytes'] / 1e6:>9.2f}")
        if fp16_bytes:
            line.append(f"{r['weight_bytes'] / fp16_bytes:>7.2f}x")
        print("  ".join(line))
    if legend:
        print()
        for key, header, unit, text, _ in cols:
            print(f"  {header}{f' ({unit})' if unit else ''}: {text}")
        print("  weights: bytes of every tensor in memory (codes, scales, and the layers kept in floating point, "
              "which stay in the model's dtype)" + (", and that size as a multiple of the model in FP16" if fp16_bytes
                                                  else "")
              + "; a saved checkpoint stores the kept layers in fp16/bf16 and is smaller (dtq info DIR)")


def fp16_bytes_of(model: torch.nn.Module) -> int:
    """What the model's parameters take in FP16: the size a quantized checkpoint is compared with."""
    return 2 * sum(p.numel() for p in model.parameters())


def cli_eval(args: argparse.Namespace) -> list[dict]:
    """Run `dtq eval` with parsed arguments (see add_arguments); returns the table rows."""
    from threadpoolctl import threadpool_limits  # numpy's BLAS (FID algebra) obeys the same thread cap

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with threadpool_limits(args.threads):
            return _run(args)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace) -> list[dict]:
    t_start = time.time()
    if args.tiny:
        from dtq_kernels.models.reference_dit import sample as sample_fn

        fp = harness.tiny_random_dit()
        n, steps, fid_ref_n = _given(args.n_samples, 8), _given(args.steps, 2), _given(args.fid_ref_n, 16)
        guidance = args.guidance if args.guidance is not None else 2.0
        model_desc = "tiny random DiT (dry run: the numbers mean nothing)"
    else:
        load, sample_fn, def_steps, def_guidance = _reference()
        fp = load()
        on_gpu = torch.device(args.device).type == "cuda"
        n = _given(args.n_samples, GPU_SAMPLES if on_gpu else CPU_SAMPLES)
        fid_ref_n = _given(args.fid_ref_n, 10_000 if on_gpu else CPU_FID_REF)
        steps = _given(args.steps, def_steps)
        guidance = args.guidance if args.guidance is not None else def_guidance
        model_desc = "the shipped reference DiT (dtq_kernels.models.reference_dit, Fashion-MNIST 32×32)"
    fp = fp.to(args.device).eval()
    descriptions = {"fp": "the floating-point (fp32) model"}
    common = dict(sample_fn=sample_fn, batch_size=args.batch_size, fid=not args.no_fid, defer_fid=args.defer_fid,
                  fid_ref_n=fid_ref_n, cls_ref_n=args.cls_ref_n, device=args.device)
    digest = weights_digest(fp)
    if args.shard and not args.out_dir:
        raise SystemExit("dtq eval: --shard needs --out-dir (the shards meet in its progress files)")
    if (args.defer_fid or args.sampled_on) and not args.out_dir:
        raise SystemExit("dtq eval: --defer-fid and --sampled-on need --out-dir (their results meet in its "
                         "progress files)")
    if args.defer_fid and (args.no_fid or args.sampled_on):
        raise SystemExit("dtq eval: --defer-fid keeps samples for a later FID: not with --no-fid or --sampled-on")
    sampled_on = str(args.sampled_on or args.device)
    # with --out-dir every finished model is saved at once: the same command resumes an interrupted run
    progress = (RunProgress(str(args.out_dir), shard=args.shard, reference="fp",
                            key=dict(n_samples=n, seed=args.seed, steps=steps, guidance=guidance,
                                     batch_size=args.batch_size, fid=not args.no_fid, fid_ref_n=fid_ref_n,
                                     cls_ref_n=args.cls_ref_n, sqnr_samples=args.sqnr_samples,
                                     fp_weights_sha256=digest, device=sampled_on))
                if args.out_dir else None)
    done = dict(progress.results) if progress else {}
    descriptions.update(progress.descriptions if progress else {})

    def evaluate_one(name: str, model: torch.nn.Module, description: str) -> None:
        """Sample and score one model beside FP (FP first, once), recording it in the progress file."""
        descriptions[name] = description

        def record(name_: str, result: harness.ModelResult) -> None:
            done[name_] = result
            if progress:
                progress.add_result(name_, result, descriptions[name_])

        harness.evaluate({"fp": fp, name: model}, n, args.seed, steps, guidance, sqnr_samples=args.sqnr_samples,
                         done=done, on_result=record, **common)

    wanted = []
    if args.recipes:
        dtq = _dtq_api()
        available = available_recipes(dtq)
        wanted = ([r for r in available if not (args.no_ablations and r in ABLATIONS)] if args.recipes == "all"
                  else args.recipes.split(","))
    noise_seeds = list(range(1, NOISE_SEEDS + 1))
    if args.shard:  # this shard's share; FP is every shard's (PSNR and SQNR are measured against it)
        i, n_shards = args.shard
        wanted, noise_seeds = wanted[i::n_shards], noise_seeds[i::n_shards]
    if sampled_on != str(args.device):  # finishing another machine's run: everything must be sampled already
        missing = [m for m in ["fp", *wanted, *(name for name, _ in args.quantized)] if m not in done]
        missing += [f"noise-floor seed {args.seed + k}" for k in noise_seeds if k not in progress.noise]
        if missing:
            raise SystemExit(f"dtq eval: --sampled-on {sampled_on}: the progress files in {args.out_dir} lack "
                             f"{', '.join(missing)}; run the sampling command on {sampled_on} first")
    if "fp" not in done:
        evaluate_one("fp", fp, descriptions["fp"])
    for name in wanted:
        if name in done:
            continue
        t0 = time.time()
        model, notes = build_quantized(dtq, fp, name, sample_fn, steps, guidance)
        print(f"calibrated and quantized {name} in {time.time() - t0:.0f} s", flush=True)
        evaluate_one(name, model, available[name] + "".join(f" **Note: {m}.**" for m in notes))
        del model
    for name, path in args.quantized:
        if name in done:
            continue
        dtq = _dtq_api()
        model = copy.deepcopy(fp)
        dtq.load_quantized(model, path, fuse=False)  # per layer, as build_quantized (SQNR hooks)
        evaluate_one(name, model, f"checkpoint {path}")
    names = ["fp"] + wanted + [name for name, _ in args.quantized]
    if progress and not args.no_fid and not args.defer_fid:  # FIDs a deferred run left, each saved when scored
        # a shard scores its own share; FP (in every shard's file) only in shard 0
        share = names if not args.shard or args.shard[0] == 0 else names[1:]
        harness.fill_deferred_fid({m: done[m] for m in share if m in done}, fid_ref_n, args.device,
                                  on_result=lambda name, r: progress.add_result(name, r, descriptions[name]))
    if args.out_dir:
        for k in noise_seeds:
            if k not in progress.noise:
                harness.evaluate({"fp": fp}, n, args.seed + k, steps, guidance, sqnr_samples=0,
                                 on_result=lambda _, result, k=k: progress.add_noise(k, result), **common)
        if not args.no_fid and not args.defer_fid:
            harness.fill_deferred_fid({k: progress.noise[k] for k in noise_seeds}, fid_ref_n, args.device,
                                      on_result=progress.add_noise)
    # assembles the table; samples nothing new, and in a shard scores no FID beyond the shard's share above
    ev = harness.evaluate({"fp": fp}, n, args.seed, steps, guidance, sqnr_samples=args.sqnr_samples,
                          done={m: done[m] for m in names},
                          **{**common, "defer_fid": args.defer_fid or bool(args.shard)})
    ev.config["fp_weights_sha256"] = digest
    if args.shard or args.defer_fid:
        part = f"shard {args.shard[0]}/{args.shard[1]}" if args.shard else "sampling"
        then = ("the same command without --shard" + (" and --defer-fid, with --sampled-on where it runs elsewhere,"
                                                      if args.defer_fid else ""))
        print(f"{part} done ({', '.join(names)}); when every shard is, {then} writes the report", flush=True)
    elif args.out_dir:
        noise = [progress.noise[k].row for k in noise_seeds]
        k = max(args.sqnr_samples, 1)
        with hooks.record_calls(fp) as calls:
            harness.generate(fp, k, args.seed, steps, guidance, k, sample_fn)
        stats = activation_stats.collect(fp, calls)
        os.makedirs(args.out_dir, exist_ok=True)
        if args.recipes and args.recipes != "all":
            merge_previous(os.path.join(args.out_dir, "quality.json"), ev, descriptions)
        meta = {"command": " ".join(["python"] + sys.argv), "commands": progress.commands,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "device": _devices_note(ev.rows, args),
                "torch": torch.__version__, "model": model_desc, "descriptions": descriptions,
                "cpu_cost_note": CPU_COST_NOTE, "wall_s": round(progress.wall_s())}
        report.write(args.out_dir, ev, descriptions=descriptions, noise_rows=noise, act_stats=stats, meta=meta)
        progress.discard()
        print(f"wrote {args.out_dir}/quality.md ({time.time() - t_start:.0f} s)", flush=True)
    print_table(ev.rows, fp16_bytes_of(fp))
    return ev.rows


def _devices_note(rows: list[dict], args: argparse.Namespace) -> str:
    """Where the samples were drawn (and with which kernels), and where this run scored them."""
    here = harness.device_name(args.device)
    here = f"CPU, {args.threads} thread(s)" if here == "CPU" else here
    sampled = sorted({r.get("sampled_on", here) for r in rows})
    if sampled == [harness.device_name(args.device)]:
        return here
    return f"sampled on {', '.join(sampled)}; FID and report on {here}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dtq eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    cli_eval(p.parse_args(argv))


if __name__ == "__main__":
    main()
