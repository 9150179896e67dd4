"""Turn statistics into plan entries, one builder per method family (docs/methods.md)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..formats import absmax_scale, get_format
from ..nn.spec import LinearQuantSpec
from ..plan import LayerPlan, QuantPlan
from . import mixed_precision as mp
from .mrq import gelu_neg_step, gelu_quantizer, search_softmax_split
from .recipes import Recipe
from .rtn import static_scales
from .search import LAMBDAS, delta0, fake_quant_int, search_linear
from .smooth import layer_smoothing, range_cost
from .stats import CalibStats
from .tgq import fill_unvisited


def _visited_stats(stats: CalibStats, name: str):
    st = stats.layers[name]
    if not bool(st.visited.any()):
        raise ValueError(f"layer {name!r} never ran during calibration: the calibration forwards do not "
                         "reach it, so it has no activation statistics")
    return st


def build_rtn(recipe: Recipe, stats: CalibStats, layers: dict, plan: QuantPlan) -> None:
    spec = LinearQuantSpec(weight=recipe.weight, act=recipe.act, act_mode="static", time_groups=recipe.time_groups)
    for name in layers:
        st = _visited_stats(stats, name)
        plan.layers[name] = LayerPlan(spec, act_scales=static_scales(st, recipe.act, recipe.act_clip, recipe.percentile),
                                      note=f"rtn {recipe.act_clip}")


def build_viditq(recipe: Recipe, stats: CalibStats | None, layers: dict, plan: QuantPlan,
                 model: torch.nn.Module) -> None:
    spec = LinearQuantSpec(weight=recipe.weight, act=recipe.act, act_mode="dynamic",
                           smooth=recipe.smooth_alpha is not None)
    if recipe.smooth_alpha is None:
        for name in layers:
            plan.layers[name] = LayerPlan(spec, note="viditq dynamic per-token")
        return
    smooth, costs = {}, {}
    for name, lin in layers.items():
        st = _visited_stats(stats, name)
        smooth[name] = layer_smoothing(st, recipe.smooth_alpha)
        plan.tensors[f"{name}.smooth"] = smooth[name]
        costs[name] = range_cost(st, lin.weight.detach(), recipe.smooth_alpha, recipe.weight, recipe.act)
    mean = {k: sum(c[k] for c in costs.values()) / len(costs) for k in ("none", "single", "per_range")}
    worst = max(costs, key=lambda n: costs[n]["single"] - costs[n]["per_range"])
    plan.meta["smoothing"] = {
        "alpha": recipe.smooth_alpha, "ema_momentum": stats.config.ema_momentum,
        "layout": "one vector per layer from the channel max over all time ranges (ViDiT-Q's code keeps "
                  "one per range [0,500],[501,1000] with a weight copy per range)",
        "mean_rel_output_error": mean, "worst_layer": {worst: costs[worst]}}
    if not recipe.mixed_precision:
        plan.time_groups = 1  # the ranges only shaped the statistics; nothing in the plan depends on t
        for name in layers:
            plan.layers[name] = LayerPlan(spec, note=f"viditq smooth alpha={recipe.smooth_alpha}")
        return
    _assign_mixed_precision(recipe, stats, layers, plan, model, spec, smooth)


def _assign_mixed_precision(recipe, stats, layers, plan, model, spec, smooth) -> None:
    G = recipe.time_groups
    spec8 = replace(spec, weight="int8")
    w8_groups = mp.all_w8_groups(G, recipe.mp_w8_fraction)
    params = {n: lin.weight.numel() for n, lin in layers.items()}
    promoted, sens = {}, {}
    for g in range(G):
        if g in w8_groups or g not in stats.inputs:
            continue
        sens[g] = mp.sensitivity(model, layers, stats.inputs[g], smooth, recipe.weight)
        promoted[g] = mp.allocate(sens[g], params, recipe.mp_budget_bits)
    low_groups = [g for g in range(G) if g not in w8_groups]
    if not promoted:
        raise ValueError(f"mixed precision needs calibration forwards in the W4 step groups {low_groups} "
                         "(timesteps below the first 25% of the range); none were seen")
    for g in low_groups:  # a step group the sampler never visited takes its nearest visited neighbour's choice
        if g not in promoted:
            promoted[g] = promoted[min(promoted, key=lambda v: (abs(v - g), v))]
    total = sum(params.values())
    avg_bits = {g: (4 * total + 4 * sum(params[n] for n in promoted[g])) / total for g in low_groups}
    for name in layers:
        sgs = [spec8 if (g in w8_groups or name in promoted[g]) else spec for g in range(G)]
        low = spec if any(s == spec for s in sgs) else spec8
        plan.layers[name] = LayerPlan(low, step_group_specs=None if all(s == low for s in sgs) else sgs,
                                      note=f"viditq-mp smooth alpha={recipe.smooth_alpha}")
    plan.meta["mixed_precision"] = {
        "metric": "relative model-output MSE with the layer's weight alone at " + recipe.weight,
        "budget_bits": recipe.mp_budget_bits, "all_w8_groups": sorted(w8_groups),
        "avg_weight_bits": {str(g): b for g, b in avg_bits.items()},
        "promoted": {str(g): sorted(p) for g, p in promoted.items()},
        "sensitivity": {str(g): s for g, s in sens.items()}}


def build_tqdit(recipe: Recipe, stats: CalibStats, layers: dict, plan: QuantPlan, adapter,
                model: torch.nn.Module | None = None) -> None:
    G, abits = recipe.time_groups, get_format(recipe.act).bits
    fisher = None
    if recipe.objective == "fisher":  # Hessian-guided (diagonal Fisher) activation search, calib/fisher.py
        from .fisher import output_fisher
        fisher = output_fisher(model, layers, stats.inputs)
        plan.meta["objective"] = {"name": "fisher", "groups": sorted(stats.inputs)}
    for name, lin in layers.items():
        st = _visited_stats(stats, name)
        vis = st.visited
        rows = [st.group_rows(g) if vis[g] else None for g in range(G)]
        two_region = recipe.mrq and adapter.role(name) == "fc2"
        if two_region:  # post-GELU: Δ₊ searched from the positive max, Δ₋ fixed
            quant = gelu_quantizer(abits)
            top = st.tmax.clamp_min(1e-8)  # a zero Δ₊ would divide by zero in the two-region code
            spec = LinearQuantSpec(weight=recipe.weight, act=recipe.act, act_mode="two_region", time_groups=G,
                                   two_region_mode="sign")
        else:
            quant = (lambda x, c: fake_quant_int(x, c, abits))
            top = st.chan_absmax.amax(1)
            spec = LinearQuantSpec(weight=recipe.weight, act=recipe.act, act_mode="static", time_groups=G)
        init = [delta0(float(top[g]), abits) if vis[g] else None for g in range(G)]  # λ = 1
        cands = [d * LAMBDAS if d is not None else None for d in init]
        out_w = None if fisher is None else [fisher[name].get(g) for g in range(G)]
        clips, act, errs = search_linear(rows, lin.weight.detach(), recipe.weight, cands, quant, init,
                                         recipe.search_rounds, out_weights=out_w)
        table = fill_unvisited(torch.tensor([a if a is not None else 0.0 for a in act]), vis)
        act_scales = [[c, gelu_neg_step(abits)] for c in table.tolist()] if two_region else table.tolist()
        # 6 decimals keep the JSON compact; the clip grid step is 0.012, so rounding changes no choice
        plan.layers[name] = LayerPlan(spec, act_scales=act_scales, weight_clip=[round(c, 6) for c in clips.tolist()],
                                      note=f"tqdit search mse={max(e for e in errs if e == e):.3g}")
    for name, at in stats.attention.items():
        plan.attention[name] = _tqdit_attention(at, G, abits, recipe.act)


def _tqdit_attention(at, G: int, abits: int, act_fmt: str) -> dict:
    """Per-group MRQ split parameters for P and per-head absmax scales for Q, K, V."""
    vis = at.visited
    if not bool(vis.any()):
        raise ValueError(f"attention {at.name!r} never ran during calibration")
    p = torch.zeros(G, 2)
    for g in range(G):
        if vis[g]:
            c_pos, c_neg, _ = search_softmax_split(at.snapshots[g], abits)
            p[g] = torch.tensor([c_pos, c_neg])
    scales = {k: absmax_scale(fill_unvisited(getattr(at, f"{k}_absmax"), vis), act_fmt).tolist() for k in "qkv"}
    return {"heads": at.heads, "head_dim": at.head_dim, "bits": abits, "time_groups": G,
            "qkv_mode": "static_per_head", "q_scales": scales["q"], "k_scales": scales["k"],
            "v_scales": scales["v"], "p_mode": "two_region", "two_region_mode": "split",
            "p_scales": fill_unvisited(p, vis).tolist()}
