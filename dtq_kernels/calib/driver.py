"""dtq.calibrate: run the FP model on calibration data with statistics hooks, then build a QuantPlan."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..plan import QuantPlan
from .methods import build_rtn, build_tqdit, build_viditq
from .recipes import Recipe, get_recipe
from .stats import MAX_ROWS_PER_GROUP, CalibStats, StatsCollector, StatsConfig

PERCENTILE_ROWS = MAX_ROWS_PER_GROUP  # rows behind a percentile estimate


def _builder(module: str, name: str):
    def load():
        import importlib
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    return load


# builders that may re-parameterize the FP model: (recipe, stats, layers, plan, transformer, adapter)
BALANCING_BUILDERS = {"ptq4dit": _builder("ptq4dit", "build_ptq4dit"),
                      "smoothquant": _builder("smoothquant", "build_smoothquant"),
                      "dilatequant": _builder("dilatequant", "build_dilatequant"),
                      "hqdit": _builder("hqdit", "build_hqdit")}


def _batch_size(pipe_kwargs: dict) -> int:
    """Samples one pipeline call produces, from its conditioning arguments."""
    n = 1
    for key in ("class_labels", "prompt"):
        v = pipe_kwargs.get(key)
        if isinstance(v, (list, tuple)):
            n = len(v)
        elif isinstance(v, torch.Tensor) and v.ndim:
            n = v.shape[0]
    if isinstance(pipe_kwargs.get("prompt_embeds"), torch.Tensor) and "prompt" not in pipe_kwargs:
        n = pipe_kwargs["prompt_embeds"].shape[0]
    return n * int(pipe_kwargs.get("num_images_per_prompt") or 1)


def _resolve(pipe_or_model, adapter):
    transformer = getattr(pipe_or_model, "transformer", None)
    is_pipe = isinstance(transformer, torch.nn.Module)
    if not is_pipe:
        transformer = pipe_or_model
        if not isinstance(transformer, torch.nn.Module):
            raise TypeError(f"calibrate needs a diffusers pipeline (with .transformer) or a transformer "
                            f"nn.Module, got {type(pipe_or_model).__name__}")
    if adapter is None:
        from ..models.adapters import get_adapter
        adapter = get_adapter(transformer)
    return is_pipe, transformer, adapter


def _stats_config(rec: Recipe, adapter) -> StatsConfig:
    rows = rec.rows_per_group
    if rec.act_clip == "percentile":
        rows = max(rows, PERCENTILE_ROWS)
    return StatsConfig(time_groups=rec.time_groups, num_train_timesteps=adapter.num_train_timesteps,
                       rows_per_group=rows, attention=rec.mrq,
                       capture_inputs=rec.mixed_precision or rec.objective == "fisher",
                       per_timestep_channels=rec.method == "ptq4dit", gram=rec.method == "hqdit")


def collect_stats(pipe_or_model, config: StatsConfig, *, num_samples: int = 32, num_inference_steps: int = 25,
                  pipe_kwargs: dict | None = None, run_fn: Callable | None = None, progress: bool = True,
                  adapter=None, layers: dict | None = None) -> CalibStats:
    """Run calibration forwards with statistics hooks on the quantizable linears (model stays FP)."""
    is_pipe, transformer, adapter = _resolve(pipe_or_model, adapter)
    if layers is None:
        kept = set(adapter.kept_fp(transformer))
        layers = {n: m for n, m in adapter.quantizable_linears(transformer).items() if n not in kept}
    if is_pipe:
        pipe_kwargs = dict(pipe_kwargs or {})
        clash = {"num_inference_steps", "output_type"} & set(pipe_kwargs)
        if clash:
            raise ValueError(f"pass {sorted(clash)} as calibrate() arguments, not in pipe_kwargs")
        runs = math.ceil(num_samples / _batch_size(pipe_kwargs))
        total, unit = runs * num_inference_steps, "step"
    elif run_fn is None:
        raise ValueError("calibrating a bare transformer needs run_fn(transformer) to drive its forwards "
                         "(or pass the diffusers pipeline that owns it)")
    else:
        total, unit = None, "forward"
    bar = tqdm(total=total, desc="calibration", unit=unit, disable=not progress)
    try:
        with StatsCollector(transformer, adapter, layers, config, progress=bar) as col, torch.no_grad():
            if is_pipe:
                _run_pipeline(pipe_or_model, pipe_kwargs, runs, num_inference_steps)
            else:
                run_fn(transformer)
    finally:
        bar.close()
    if col.stats.forwards == 0:
        raise ValueError("calibration ran no transformer forward: nothing to calibrate from")
    return col.stats


def _run_pipeline(pipe, pipe_kwargs: dict, runs: int, num_inference_steps: int) -> None:
    old_cfg = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # ours counts the sampler steps instead
    try:
        for i in range(runs):
            kwargs = dict(pipe_kwargs)
            kwargs.setdefault("generator", torch.Generator().manual_seed(i))  # reproducible plans
            pipe(**kwargs, num_inference_steps=num_inference_steps, output_type="np")
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = old_cfg


def calibrate(pipe_or_model, recipe: str | Recipe, *, num_samples: int = 32, num_inference_steps: int = 25,
              pipe_kwargs: dict | None = None, run_fn: Callable | None = None, progress: bool = True,
              time_groups: int | None = None, adapter=None) -> QuantPlan:
    """Calibrate a DiT with a recipe (dtq.recipes()) and return the QuantPlan for dtq.quantize.

    With a pipeline, runs pipe(**pipe_kwargs, num_inference_steps=..., output_type="np") enough times
    to see num_samples samples; with a bare transformer, run_fn(transformer) drives the forwards.
    time_groups overrides the recipe's number of time groups (TGQ tables / ViDiT-Q ranges).
    """
    rec = get_recipe(recipe)
    if time_groups is not None:
        rec = replace(rec, time_groups=int(time_groups))
    elif rec.tpq:  # DilateQuant's per-timestep quantizers: one time group per calibration sampling step
        rec = replace(rec, time_groups=int(num_inference_steps))
    is_pipe, transformer, adapter = _resolve(pipe_or_model, adapter)
    if transformer.training:
        # train mode changes what the statistics see (e.g. DiT's LabelEmbedding drops class labels at random)
        warnings.warn("calibrate: the transformer is in train mode; call .eval() first so calibration sees "
                      "the activations of inference", stacklevel=2)
    kept = sorted(adapter.kept_fp(transformer))
    layers = {n: m for n, m in adapter.quantizable_linears(transformer).items() if n not in set(kept)}
    if not layers:
        raise ValueError(f"the {adapter.model_type!r} adapter found no quantizable linear layers")
    plan = QuantPlan(recipe=rec.name, model_type=adapter.model_type,
                     num_train_timesteps=adapter.num_train_timesteps, time_groups=rec.time_groups, kept_fp=kept)
    stats = None
    if rec.needs_stats:
        stats = collect_stats(pipe_or_model, _stats_config(rec, adapter), num_samples=num_samples,
                              num_inference_steps=num_inference_steps, pipe_kwargs=pipe_kwargs, run_fn=run_fn,
                              progress=progress, adapter=adapter, layers=layers)
        plan.meta["calibration"] = {"forwards": stats.forwards, "num_inference_steps": num_inference_steps,
                                    "num_samples": num_samples if is_pipe else None,
                                    "timesteps": stats.timesteps, "stats_bytes": stats.nbytes()}
        plan.meta["act_absmax_by_t"] = stats.absmax_by_t()
    if rec.method == "rtn":
        build_rtn(rec, stats, layers, plan)
    elif rec.method == "viditq":
        build_viditq(rec, stats, layers, plan, transformer)
    elif rec.method == "tqdit":
        build_tqdit(rec, stats, layers, plan, adapter, transformer)
    elif rec.method in BALANCING_BUILDERS:
        BALANCING_BUILDERS[rec.method]()(rec, stats, layers, plan, transformer, adapter)
    else:
        raise ValueError(f"recipe {rec.name!r} names an unknown method {rec.method!r}")
    return plan

