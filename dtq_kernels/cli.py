"""The `dtq` command.

    dtq recipes                                              the calibration recipes
    dtq quantize --recipe R --model M --out DIR              calibrate if R needs data, quantize, save a checkpoint
    dtq quantize --plan PLAN_DIR --model M --out DIR         apply a plan saved by `dtq calibrate`
    dtq calibrate --recipe R --model M --out PLAN_DIR        calibrate and save the plan only [--plots DIR]
    dtq calibrate --recipe R --model DIR --prompt P ...      the same for a local diffusers pipeline directory
    dtq info PATH [--plots DIR] [--json]                     per-layer formats and bytes of a checkpoint or plan
    dtq sample CKPT --out grid.png                           sample a grid from a quantized reference-DiT checkpoint
    dtq eval ...                                             quality evaluation (dtq_kernels.eval)

Models (--model): `reference` is the trained Fashion-MNIST DiT shipped with the package; the `*-random`
models have random weights and only exercise the machinery (smoke tests, timing, sizes). Calibration
drives a model with its own sampler (reference-shaped models) or with random inputs over the timestep
range (random DiT-XL/2). --model may also name a local diffusers directory: a pipeline (DiT, PixArt,
SD3, Flux: the pipeline samples the calibration data with --class-labels or --prompt) or a transformer
alone (data-free recipes only).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .cli_args import (existing_dir, finite_float, image_file, nonnegative_int, output_dir, positive_int,
                       torch_device)
from .models.reference_dit.images import save_grid

CALIB_SEED = 10_000  # calibration noise seeds: disjoint from the sampling seeds (--seed)


class CliError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- models

def _reference_module():
    try:
        from .models import reference_dit
    except ImportError as e:
        raise CliError(f"the reference DiT module is not available in this build ({e})") from None
    return reference_dit


def _build_reference(seed: int):
    return _reference_module().load_reference_dit()


def _build_reference_random(seed: int, **overrides):
    torch.manual_seed(seed)
    return _reference_module().build_reference_dit(**overrides).eval()


def random_model(cls, seed: int, **config) -> torch.nn.Module:
    """A random-weight model built in seconds even at DiT-XL/2 size: parameters allocated without
    diffusers' initializers and filled N(0, 0.02); buffers (sin-cos position tables, independent of
    depth) taken from a one-block build of the same config."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to_empty(device="cpu")
    small = dict(cls(**{**config, "num_layers": 1}).named_buffers())
    for name, buf in model.named_buffers():
        if name not in small:
            raise RuntimeError(f"{cls.__name__} buffer {name} depends on the depth: cannot build it cheaply")
        buf.copy_(small[name])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def _build_dit_xl_random(seed: int):
    from diffusers import DiTTransformer2DModel
    return random_model(DiTTransformer2DModel, seed, num_layers=28, out_channels=8)


def _drive_sampler(model, num_samples: int, steps: int, batch_size: int, guidance: float | None) -> None:
    """Calibration forwards of a reference-shaped DiT: its own DDIM + CFG sampler, balanced labels."""
    ref = _reference_module()
    labels = torch.arange(num_samples) % ref.NUM_CLASSES
    kw = {} if guidance is None else {"guidance_scale": guidance}
    for b, i in enumerate(range(0, num_samples, batch_size)):
        ref.sample(model, labels[i:i + batch_size], steps, torch.Generator().manual_seed(CALIB_SEED + b), **kw)


def drive_random_inputs(model, num_samples: int, steps: int, batch_size: int, guidance: float | None) -> None:
    """Calibration forwards of a random DiT: random latents and labels at `steps` timesteps spread over
    the training range (statistics of random data through random weights: for smoke tests only)."""
    from .models import get_adapter
    cfg, T = model.config, get_adapter(model).num_train_timesteps
    g = torch.Generator().manual_seed(CALIB_SEED)
    param = next(model.parameters())
    with torch.no_grad():
        for t in torch.linspace(T - 1, 0, steps).round().long():
            for i in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - i)
                x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
                labels = torch.randint(0, cfg.num_embeds_ada_norm, (n,), generator=g)
                model(x.to(param), timestep=t.expand(n).to(param.device), class_labels=labels.to(param.device))


@dataclass(frozen=True)
class ModelChoice:
    description: str
    build: Callable[[int], torch.nn.Module]  # seed -> FP model in eval mode
    drive: Callable                          # calibration forwards (model, num_samples, steps, batch, guidance)


MODELS = {
    "reference": ModelChoice("the trained Fashion-MNIST reference DiT shipped with dtq_kernels",
                             _build_reference, _drive_sampler),
    "reference-random": ModelChoice("the reference DiT architecture (6 blocks, width 256) with random weights",
                                    _build_reference_random, _drive_sampler),
    "tiny-random": ModelChoice("a 2-block, width-32 reference-shaped DiT with random weights (tests, dry runs)",
                               lambda seed: _build_reference_random(seed, num_layers=2, heads=2, head_dim=16),
                               _drive_sampler),
    "dit-xl-random": ModelChoice("DiT-XL/2 (28 blocks, width 1152, 256 px latents) with random weights",
                                 _build_dit_xl_random, drive_random_inputs),
}


def model_from_checkpoint(meta: dict) -> torch.nn.Module:
    """A fresh model of the checkpoint's class and config (weights random: load_quantized fills them)."""
    import diffusers
    cls = getattr(diffusers, str(meta.get("model_class")), None)
    if cls is None:
        raise CliError(f"checkpoint model class {meta.get('model_class')!r} is not a diffusers model")
    torch.manual_seed(0)
    return cls.from_config(meta.get("config", {})).eval()


# ---------------------------------------------------------------------------------------------- info

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def _tensor_shapes(file: Path) -> dict[str, tuple[list[int], int, str]]:
    """name -> (shape, bytes, safetensors dtype) from a safetensors header, without reading the data."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import CheckpointError
    out = {}
    try:
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                shape = list(s.get_shape())
                n = 1
                for d in shape:
                    n *= d
                out[k] = (shape, n * _DTYPE_BYTES[s.get_dtype()], s.get_dtype())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    return out


def _format_label(lp) -> str:
    s = lp.spec
    label = s.name + (f" {s.act_mode}" if s.act else " weight-only")
    extras = [f"G={s.time_groups}" if s.time_groups > 1 else "", s.two_region_mode or "",
              "smooth" if s.smooth else "", "rotate" if s.rotate else "",
              "" if s.weight_symmetric else "asym"]
    if lp.step_group_specs:
        extras.append("per step group: " + "/".join(dict.fromkeys(x.name for x in lp.step_group_specs)))
    extras = [e for e in extras if e]
    return label + (f" ({', '.join(extras)})" if extras else "")


def describe(path: str | Path) -> dict:
    """Per-layer rows and totals of a checkpoint (or a plan directory: formats only, no bytes)."""
    from .checkpoint import MODEL_FILE, read_plan
    from .formats import get_format
    path = Path(path)
    meta, plan = read_plan(path)
    shapes = _tensor_shapes(path / MODEL_FILE) if (path / MODEL_FILE).is_file() else None
    # a layer fused with others (q/k/v, nn/fused.py) is saved as its share of the fused layer's rows
    fused_in = {m: (f, w / sum(group.values())) for f, group in (meta.get("fused_linears") or {}).items()
                for m, w in group.items()}
    rows = []
    for name, lp in plan.layers.items():
        row = {"name": name, "format": _format_label(lp), "kept_fp": False, "bytes": None, "fp16_bytes": None}
        if shapes is not None:
            saved_as, share = fused_in.get(name, (name, 1.0))
            own = {k[len(saved_as) + 1:]: v for k, v in shapes.items() if k.startswith(saved_as + ".")}
            # packed codes, scales, zero points (bias, smoothing and activation tables are not weights)
            row["bytes"] = round(share * sum(b for k, (_, b, _) in own.items()
                                             if k.rsplit(".", 1)[-1] in ("qweight", "wscale", "wzero")))
            qshape = next(shp for k, (shp, _, _) in own.items() if k.endswith("qweight"))
            first = lp.step_group_specs[0] if lp.step_group_specs else lp.spec
            k_in = qshape[1] * (2 if get_format(first.weight).bits == 4 else 1)
            row["fp16_bytes"] = round(share * qshape[0]) * k_in * 2
        rows.append(row)
    for name in plan.kept_fp:
        row = {"name": name, "format": "fp (kept)", "kept_fp": True, "bytes": None, "fp16_bytes": None}
        if shapes is not None and f"{name}.weight" in shapes:
            shp, b, _ = shapes[f"{name}.weight"]
            row["bytes"], row["fp16_bytes"] = b, shp[0] * shp[1] * 2
        rows.append(row)
    q = [r for r in rows if not r["kept_fp"]]
    saved_layers = {fused_in.get(name, (name,))[0] for name in plan.layers}  # as named in model.safetensors
    totals = {"quantized_layers": len(q), "kept_fp_layers": len(rows) - len(q),
              "attention_quantized": len(plan.attention)}
    if shapes is not None:
        totals.update(
            quantized_bytes=sum(r["bytes"] for r in q), quantized_fp16_bytes=sum(r["fp16_bytes"] for r in q),
            linear_bytes=sum(r["bytes"] or 0 for r in rows), linear_fp16_bytes=sum(r["fp16_bytes"] or 0 for r in rows),
            file_bytes=(path / MODEL_FILE).stat().st_size,
            fp16_model_bytes=_fp16_model_bytes(shapes, rows, saved_layers))
    return {"path": str(path), "model_class": meta.get("model_class"), "recipe": plan.recipe,
            "model_type": plan.model_type, "time_groups": plan.time_groups, "rows": rows, "totals": totals}


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _fp16_model_bytes(shapes: dict, rows: list[dict], saved_layers: set[str]) -> int:
    """Bytes of the unquantized model with every floating-point tensor in FP16 (the size the checkpoint
    replaces): each quantized layer's weight and bias at 2 bytes per value, everything else at 2 bytes
    per floating value (integer buffers at their own size). Scales, zero points, smoothing vectors and
    activation tables exist only in the quantized model and count nothing. `saved_layers`: the
    quantized layers as saved (a fused q/k/v layer once, under its fused name)."""
    total = sum(r["fp16_bytes"] for r in rows if not r["kept_fp"])
    for name in saved_layers:  # the quantized layers' biases
        bias = next((shp for k, (shp, _, _) in shapes.items() if k.startswith(name + ".") and k.endswith("bias")), None)
        total += 2 * bias[0] if bias else 0
    for k, (shp, b, dtype) in shapes.items():
        if not any(k.startswith(name + ".") for name in saved_layers):
            n = 1
            for d in shp:
                n *= d
            total += 2 * n if dtype in _FLOAT_DTYPES else b
    return total


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 1024:.1f} KiB"


def _console():
    from rich.console import Console
    c = Console()
    return c if c.is_terminal else Console(width=200)  # pipes and tests: never truncate layer names


def print_info(d: dict, console=None) -> None:
    from rich.table import Table
    console = console or _console()
    t = Table(title=f"{d['path']}: {d['model_class']} quantized with {d['recipe']!r} "
                    f"({d['time_groups']} time group{'s' if d['time_groups'] > 1 else ''})")
    for col, just in (("layer", "left"), ("format", "left"), ("bytes", "right"), ("fp16 bytes", "right"),
                      ("ratio", "right")):
        t.add_column(col, justify=just)
    for r in d["rows"]:
        ratio = f"{r['bytes'] / r['fp16_bytes']:.2f}" if r["bytes"] is not None and r["fp16_bytes"] else "-"
        t.add_row(r["name"], r["format"], _mb(r["bytes"]), _mb(r["fp16_bytes"]), ratio,
                  style="dim" if r["kept_fp"] else None)
    console.print(t)
    tot = d["totals"]
    console.print(f"{tot['quantized_layers']} quantized linear layers, {tot['kept_fp_layers']} kept in floating "
                  f"point, {tot['attention_quantized']} attention modules quantized")
    if "quantized_bytes" in tot:
        console.print(f"quantized layers: {_mb(tot['quantized_bytes'])} vs {_mb(tot['quantized_fp16_bytes'])} in FP16 "
                      f"({tot['quantized_fp16_bytes'] / max(tot['quantized_bytes'], 1):.2f}x smaller); all linear "
                      f"weights: {_mb(tot['linear_bytes'])} vs {_mb(tot['linear_fp16_bytes'])} in FP16; "
                      f"checkpoint file {_mb(tot['file_bytes'])} vs {_mb(tot['fp16_model_bytes'])} for the whole "
                      f"model in FP16 ({tot['file_bytes'] / max(tot['fp16_model_bytes'], 1):.2f}x)")
    else:
        console.print("a plan without weights (saved by `dtq calibrate`): apply it with `dtq quantize --plan`")


def cmd_info(args) -> dict:
    d = describe(args.path)
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        print_info(d)
    if args.plots:
        _plots(args.path, args.plots)
    return d


def _plots(path, out_dir) -> None:
    try:
        from .calib.plots import make_plots
    except ImportError as e:
        raise CliError(f"plots need dtq_kernels.calib.plots and matplotlib ({e})") from None
    from .checkpoint import read_plan
    _, plan = read_plan(path)
    for p in make_plots(plan, out_dir):
        print(f"wrote {p}")


# ---------------------------------------------------------------------------------------------- quantize

def load_local_model(path: Path):
    """(transformer, pipeline or None) from a local diffusers directory: a pipeline (model_index.json;
    its .transformer is quantized and the pipeline itself samples the calibration data) or a
    transformer (config.json of a DiT / PixArt / SD3 / Flux transformer class)."""
    import diffusers
    from .models import get_adapter
    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(path)
        transformer = getattr(pipe, "transformer", None)
        if transformer is None:
            raise CliError(f"the pipeline in {path} ({type(pipe).__name__}) has no transformer to quantize")
    elif (path / "config.json").is_file():
        name = json.loads((path / "config.json").read_text()).get("_class_name")
        cls = getattr(diffusers, str(name), None)
        if cls is None:
            raise CliError(f"{path / 'config.json'} names {name!r}, which is not a diffusers model class")
        pipe, transformer = None, cls.from_pretrained(path)
    else:
        raise CliError(f"{path} is not a diffusers directory (no model_index.json or config.json)")
    try:
        get_adapter(transformer)
    except TypeError as e:
        raise CliError(str(e)) from None
    return transformer.eval(), pipe


def _build_model(args) -> torch.nn.Module:
    args.pipeline = None
    if args.model in MODELS:
        return MODELS[args.model].build(args.seed).to(args.device)
    if Path(args.model).is_dir():
        model, args.pipeline = load_local_model(Path(args.model))
        if args.pipeline is not None:
            args.pipeline.to(args.device)
        return model.to(args.device)
    raise CliError(f"unknown model {args.model!r}; choose from {', '.join(MODELS)} or give a diffusers directory")


def _pipeline_kwargs(args, pipe) -> dict:
    """The conditioning the calibration runs of a local pipeline use: --class-labels or --prompt."""
    kwargs = {} if args.guidance is None else {"guidance_scale": args.guidance}
    if args.class_labels:
        return {**kwargs, "class_labels": [int(c) for c in args.class_labels.split(",")]}
    if args.prompt:
        return {**kwargs, "prompt": list(args.prompt)}
    raise CliError(f"calibrating with the {type(pipe).__name__} in {args.model} needs its conditioning: "
                   "--class-labels 1,2,... (class-conditional DiT) or --prompt TEXT (repeatable)")


def _make_plan(args, model):
    from .calib import calibrate, get_recipe, recipes
    if args.recipe not in recipes():
        raise CliError(f"unknown recipe {args.recipe!r}; available: {', '.join(recipes())}")
    rec = get_recipe(args.recipe)
    run_fn = None
    if rec.needs_stats and args.model not in MODELS:
        if args.pipeline is None:
            raise CliError(f"recipe {args.recipe!r} calibrates on samples, and {args.model} holds a transformer "
                           "alone: give the pipeline's directory (with model_index.json) so dtq can run it, or a "
                           "data-free recipe (viditq-w8a8)")
        print(f"calibrating {args.recipe} with the pipeline in {args.model}: {args.num_samples} samples x "
              f"{args.steps} steps", file=sys.stderr)
        return calibrate(args.pipeline, args.recipe, num_samples=args.num_samples, num_inference_steps=args.steps,
                         pipe_kwargs=_pipeline_kwargs(args, args.pipeline), progress=True,
                         time_groups=args.time_groups)
    if rec.needs_stats:
        choice = MODELS[args.model]
        print(f"calibrating {args.recipe} on {args.model}: {args.num_samples} samples x {args.steps} steps",
              file=sys.stderr)

        def run_fn(transformer):
            choice.drive(transformer, args.num_samples, args.steps, args.batch_size, args.guidance)
    return calibrate(model, args.recipe, run_fn=run_fn, num_inference_steps=args.steps, progress=True,
                     time_groups=args.time_groups)


def _check_model_and_recipe(args) -> None:
    """What can be checked before a model is built: the model (a built-in name or a local diffusers
    directory) and the recipe name."""
    if args.model not in MODELS and not Path(args.model).is_dir():
        raise CliError(f"unknown model {args.model!r}; choose from {', '.join(MODELS)} or give a local diffusers "
                       "directory")
    if getattr(args, "recipe", None) is not None:
        from .calib import recipes
        if args.recipe not in recipes():
            raise CliError(f"unknown recipe {args.recipe!r}; available: {', '.join(recipes())}")


def cmd_quantize(args):
    import dtq_kernels as dtq
    from .checkpoint import KIND_MODEL, CheckpointError, check_model_matches, check_target, read_plan
    if (args.recipe is None) == (args.plan is None):
        raise CliError("give exactly one of --recipe and --plan")
    _check_model_and_recipe(args)
    check_target(args.out, kind=KIND_MODEL, overwrite=args.force)  # refuse before any work
    meta = plan = None
    if args.plan is not None:
        meta, plan = read_plan(args.plan)
    model = _build_model(args)
    if plan is not None:
        try:
            check_model_matches(meta, model)
        except CheckpointError as e:
            raise CliError(f"plan {args.plan} was calibrated for another model than --model {args.model} ({e}): "
                           "its scales would not fit") from None
    else:
        plan = _make_plan(args, model)
    dtq.quantize(model, plan, progress=True)
    dtq.save_quantized(model, args.out, overwrite=args.force, fp_dtype=args.fp_dtype)
    print_info(describe(args.out))
    return model


def cmd_calibrate(args):
    from .checkpoint import KIND_PLAN, check_target, save_plan
    _check_model_and_recipe(args)
    check_target(args.out, kind=KIND_PLAN, overwrite=args.force)  # refuse before calibrating
    model = _build_model(args)
    plan = _make_plan(args, model)
    save_plan(plan, args.out, model, overwrite=args.force)
    print_info(describe(args.out))
    if args.plots:
        _plots(args.out, args.plots)
    return plan


# ---------------------------------------------------------------------------------------------- sample

def cmd_sample(args) -> Path:
    import dtq_kernels as dtq
    from .checkpoint import read_plan
    ref = _reference_module()
    meta, _ = read_plan(args.checkpoint)
    shape = {k: meta.get("config", {}).get(k) for k in ("in_channels", "sample_size", "num_embeds_ada_norm")}
    want = {"in_channels": 1, "sample_size": 32, "num_embeds_ada_norm": ref.NUM_CLASSES}
    if meta.get("model_class") != "DiTTransformer2DModel" or shape != want:
        raise CliError(f"dtq sample drives the reference DiT sampler (DiTTransformer2DModel with {want}); "
                       f"this checkpoint holds a {meta.get('model_class')} with {shape}")
    model = model_from_checkpoint(meta)
    dtq.load_quantized(model, args.checkpoint)
    model.to(args.device)
    labels = torch.arange(args.num) % ref.NUM_CLASSES
    kw = {} if args.guidance is None else {"guidance_scale": args.guidance}
    images = ref.sample(model, labels, args.steps, torch.Generator().manual_seed(args.seed), progress=True, **kw)
    if not bool(torch.isfinite(images).all()):
        raise CliError(f"the model produced non-finite samples ({int((~torch.isfinite(images)).sum())} values): "
                       f"no image written to {args.out}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out)
    print(f"wrote {out} ({args.num} samples, {args.steps} DDIM steps, labels i mod {ref.NUM_CLASSES})")
    return out


# ---------------------------------------------------------------------------------------------- recipes

def cmd_recipes(args) -> dict:
    from rich.table import Table

    from .calib import get_recipe, recipes
    t = Table(title="dtq recipes")
    for col in ("recipe", "needs calibration data", "description"):
        t.add_column(col)
    for name, desc in recipes().items():
        t.add_row(name, "yes" if get_recipe(name).needs_stats else "no", desc)
    _console().print(t)
    return recipes()


# ---------------------------------------------------------------------------------------------- main

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference",
                   help=f"one of: {', '.join(MODELS)} (default reference), or a local diffusers directory: a "
                        "pipeline (its transformer is quantized; calibration runs the pipeline) or a transformer "
                        "(DiT, PixArt, SD3, Flux; data-free recipes only)")
    p.add_argument("--class-labels", help="calibration conditioning of a local DiT pipeline, e.g. 1,2,3,4")
    p.add_argument("--prompt", action="append", help="calibration prompt of a local text-to-image pipeline "
                   "(repeatable: one sample per prompt and run)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of random-weight models")
    p.add_argument("--num-samples", type=positive_int, default=32, help="calibration samples (default 32)")
    p.add_argument("--steps", type=positive_int, default=25, help="sampler steps during calibration (default 25)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="calibration batch size (default 16)")
    p.add_argument("--guidance", type=finite_float, default=None, help="CFG scale (default: the sampler's)")
    p.add_argument("--time-groups", type=positive_int, default=None,
                   help="override the recipe's number of time groups")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log which kernel paths run (INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("recipes", help="list the calibration recipes")
    s.set_defaults(func=cmd_recipes)

    s = sub.add_parser("quantize", help="quantize a model and save the checkpoint")
    s.add_argument("--recipe", help="a recipe name (dtq recipes)")
    s.add_argument("--plan", type=existing_dir, help="a plan directory saved by `dtq calibrate` (instead of --recipe)")
    s.add_argument("--out", type=output_dir, required=True, help="checkpoint directory to write")
    s.add_argument("--fp-dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="storage dtype of the tensors kept in floating point (default auto: fp16 or bf16 where "
                        "that is exact, e.g. for a model loaded from an fp16 checkpoint, else their own dtype)")
    _model_args(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("calibrate", help="calibrate a model and save the plan (no weights)")
    s.add_argument("--recipe", required=True)
    s.add_argument("--out", type=output_dir, required=True, help="plan directory to write")
    s.add_argument("--plots", type=output_dir, help="also write the calibration plots here")
    _model_args(s)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("info", help="per-layer formats and sizes of a checkpoint or plan")
    s.add_argument("path", type=existing_dir)
    s.add_argument("--plots", type=output_dir, help="write the plan's calibration plots into this directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("sample", help="sample an image grid from a quantized reference-DiT checkpoint")
    s.add_argument("checkpoint", type=existing_dir)
    s.add_argument("--out", type=image_file, default=Path("samples.png"), help="image file (.png, .jpg, ...)")
    s.add_argument("--num", type=positive_int, default=20, help="images (default 20: two per class)")
    s.add_argument("--steps", type=positive_int, default=25)
    s.add_argument("--guidance", type=finite_float, default=None, help="CFG scale (default: the sampler's)")
    s.add_argument("--seed", type=nonnegative_int, default=0)
    s.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    s.set_defaults(func=cmd_sample)

    try:
        from .eval import add_arguments, cli_eval
    except ImportError:
        pass  # a build without the evaluation package simply has no `dtq eval`
    else:
        s = sub.add_parser("eval", help="quality evaluation: FID, classifier metrics, PSNR/SSIM vs FP",
                           description="see dtq_kernels/eval/cli.py")
        add_arguments(s)
        s.set_defaults(func=cli_eval)
    return p


def run(argv=None):
    """Parse and run one command; returns what the command produced (tests use it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input, corrupt or mismatched files, unwritable places: no traceback
        parser.exit(2, f"dtq {args.command}: error: {e}\n")


def main(argv=None) -> None:
    """The `dtq` console script (returns None: a value would become the exit status)."""
    run(argv)


if __name__ == "__main__":
    main()
