"""dtq.quantize: apply a QuantPlan to a model in place (Linear -> QuantLinear, timestep tracker, attention)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from .models.adapters import get_adapter
from .nn.linear import QuantLinear, StepGroupQuantLinear
from .nn.timestep import attach_timestep_tracker
from .plan import LayerPlan, QuantPlan

log = logging.getLogger("dtq_kernels")


def _plan_from_recipe(model: torch.nn.Module, name: str) -> QuantPlan:
    from .calib import calibrate
    from .calib.recipes import get_recipe
    if get_recipe(name).needs_stats:
        raise ValueError(f"recipe {name!r} needs calibration data: plan = dtq.calibrate(pipe_or_model, {name!r}, "
                         "...) first, then dtq.quantize(model, plan)")
    return calibrate(model, name, progress=False)


def _build_calibrated(lin: torch.nn.Linear, name: str, lp: LayerPlan, plan: QuantPlan) -> torch.nn.Module:
    """Quantize one layer's weights per its plan (calibrated smoothing vector / weight if any)."""
    kwargs = dict(smooth=plan.tensors.get(f"{name}.smooth"), weight=plan.tensors.get(f"{name}.weight"),
                  weight_clip=lp.weight_clip, weight_scale=plan.tensors.get(f"{name}.wscale"))
    if not lp.step_group_specs:
        return QuantLinear.from_linear(lin, lp.spec, lp.act_scales, **kwargs)
    distinct = list(dict.fromkeys(lp.step_group_specs))
    variants = [QuantLinear.from_linear(lin, s, lp.act_scales, **kwargs) for s in distinct]
    return StepGroupQuantLinear(variants, [distinct.index(s) for s in lp.step_group_specs])


def build_empty(lin: torch.nn.Linear, name: str, lp: LayerPlan, plan: QuantPlan) -> torch.nn.Module:
    """A layer with the right buffers but no content, on `lin`'s device (the meta device included: then
    nothing is allocated), for checkpoint loading to fill."""
    def make(spec):
        with torch.device(lin.weight.device):
            return QuantLinear(lin.in_features, lin.out_features, spec, bias=lin.bias is not None)
    if not lp.step_group_specs:
        return make(lp.spec)
    distinct = list(dict.fromkeys(lp.step_group_specs))
    return StepGroupQuantLinear([make(s) for s in distinct], [distinct.index(s) for s in lp.step_group_specs])


def check_plan_fits(model: torch.nn.Module, plan: QuantPlan) -> dict[str, torch.nn.Linear]:
    """The Linear modules the plan names, after checking the plan fits this model (nothing is changed)."""
    adapter = get_adapter(model)
    if plan.model_type != adapter.model_type:
        raise ValueError(f"plan is for a {plan.model_type!r} model, this is a {adapter.model_type!r} "
                         f"({type(model).__name__})")
    modules = dict(model.named_modules())
    linears = {}
    for name, lp in plan.layers.items():
        lin = modules.get(name)
        if not isinstance(lin, torch.nn.Linear):
            found = "missing" if lin is None else type(lin).__name__
            raise ValueError(f"plan layer {name!r} is not a Linear of this model ({found}); was the model "
                             "already quantized, or is it another architecture?")
        w = plan.tensors.get(f"{name}.weight")
        if w is not None and tuple(w.shape) != tuple(lin.weight.shape):
            raise ValueError(f"plan weight for {name} has shape {tuple(w.shape)}, the layer {tuple(lin.weight.shape)}")
        linears[name] = lin
    params = dict(model.named_parameters())
    for pname in plan.reparam:
        p = params.get(pname)
        if p is None:
            raise ValueError(f"plan re-parameterizes {pname!r}, which is no parameter of this model")
        if tuple(p.shape) != tuple(plan.tensors[pname].shape):
            raise ValueError(f"plan value for {pname} has shape {tuple(plan.tensors[pname].shape)}, "
                             f"the parameter {tuple(p.shape)}")
    return linears


def _apply_reparam(model: torch.nn.Module, plan: QuantPlan) -> dict[str, torch.Tensor]:
    """Replace the parameters plan.reparam names by the plan's values; returns the old values."""
    params = dict(model.named_parameters())
    old = {}
    with torch.no_grad():
        for pname in plan.reparam:
            p = params[pname]
            old[pname] = p.detach().clone()
            p.copy_(plan.tensors[pname].to(p.device, p.dtype))
    return old


def install(model: torch.nn.Module, plan: QuantPlan, build: Callable, progress: bool = False,
            fuse: bool = True) -> torch.nn.Module:
    linears = check_plan_fits(model, plan)
    adapter = get_adapter(model)
    built = {}
    items = linears.items()
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"quantizing ({plan.recipe})", unit="layer")
    old = _apply_reparam(model, plan)  # the folded parameters feed the layers built below
    try:
        for name, lin in items:  # build everything first: an error leaves the model as it was
            built[name] = build(lin, name, plan.layers[name], plan)
    except BaseException:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for pname, value in old.items():
                params[pname].copy_(value)
        raise
    needs_tracker = plan.time_groups > 1 or any(lp.spec.static for lp in plan.layers.values()) or bool(plan.attention)
    tracker = attach_timestep_tracker(model, plan.time_groups, plan.num_train_timesteps, adapter) \
        if needs_tracker else None
    for name, module in built.items():
        if tracker is not None:
            module.bind_timestep_tracker(tracker)
        model.set_submodule(name, module)
    if plan.attention:
        try:
            from .nn.attention import set_quant_attention
        except ImportError:
            log.warning("plan %s quantizes attention but this build has no quantized attention processor: "
                        "attention stays in floating point", plan.recipe)
        else:
            set_quant_attention(model, plan.attention, tracker)
    if fuse:
        from .nn.fused import apply_fast_path
        apply_fast_path(model)
    model.dtq_plan = plan
    return model


def quantize(model: torch.nn.Module, plan: QuantPlan | str, progress: bool = False,
             fuse: bool = True) -> torch.nn.Module:
    """Quantize `model` in place per `plan` (a QuantPlan from dtq.calibrate, or the name of a recipe that
    needs no calibration data, e.g. "viditq-w8a8"); returns the model.

    fuse=True (default): the fast path of nn/fused.py: q/k/v fused into one layer where their
    quantizers agree, and supported blocks (DiT, PixArt) quantize each shared input once, with the
    LayerNorm-modulate and GELU fused into the quantization. fuse=False: every layer quantizes its
    own input (the per-layer path; the same numbers on the reference backend)."""
    if isinstance(plan, str):
        plan = _plan_from_recipe(model, plan)
    if not isinstance(plan, QuantPlan):
        raise TypeError(f"plan must be a QuantPlan or a recipe name, got {type(plan).__name__}")
    return install(model, plan, _build_calibrated, progress, fuse)
