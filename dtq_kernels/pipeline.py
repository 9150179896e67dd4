"""dtq.quantize_pipeline: quantize a diffusers pipeline's transformer in one call.

    pipe = dtq.quantize_pipeline(pipe, "viditq-w8a8")
    pipe.save_pretrained(out_dir)     # atomic; the transformer saves packed, with the dtq config in its config.json

A recipe that calibrates on data runs the pipeline itself first (dtq.calibrate: num_samples samples,
num_inference_steps steps, pipe_kwargs such as class_labels or prompt); a data-free recipe or a ready
QuantPlan skips that. The transformer is quantized in place (quantized attention installed where the
plan has settings for it) and marked as dtq-quantized for diffusers, so save_pretrained and
from_pretrained round-trip it. This is a tool (it calibrates), built on the runtime's dtq.quantize.
"""
from __future__ import annotations

from .plan import QuantPlan
from .quantize import quantize


def quantize_pipeline(pipe, recipe: str | QuantPlan, *, num_samples: int = 32, num_inference_steps: int = 25,
                      pipe_kwargs: dict | None = None, attention: bool = True, progress: bool = True):
    """Calibrate (if the recipe needs data) and quantize `pipe.transformer` in place; returns `pipe`."""
    transformer = getattr(pipe, "transformer", None)
    if not hasattr(transformer, "named_modules"):
        raise TypeError(f"quantize_pipeline needs a diffusers pipeline with a .transformer, got {type(pipe).__name__}")
    if getattr(transformer, "dtq_plan", None) is not None:
        raise ValueError("this pipeline's transformer is already quantized")
    if isinstance(recipe, QuantPlan):
        plan = recipe
    elif isinstance(recipe, str):
        from .calib import calibrate
        plan = calibrate(pipe, recipe, num_samples=num_samples, num_inference_steps=num_inference_steps,
                         pipe_kwargs=pipe_kwargs, progress=progress)
    else:
        raise TypeError(f"recipe must be a recipe name (dtq.recipes()) or a QuantPlan, got {type(recipe).__name__}")
    quantize(transformer, plan, progress=progress, attention=attention)
    if hasattr(transformer, "register_to_config"):  # a diffusers model: save_pretrained / from_pretrained know it
        from .diffusers_quantizer import make_save_atomic, mark_quantized
        mark_quantized(transformer, quantize_attention=attention)
        make_save_atomic(pipe)  # pipe.save_pretrained: atomic and refusing, like the transformer's
    return pipe
