"""SmoothQuant W8A8 baseline (docs/methods.md): static α, calibrated static per-tensor activations.

s_j = max|X_j|^α / max|W_j|^(1−α) (smooth.smoothing_vector, α = 0.5 as the SmoothQuant paper) on the
inputs SmoothQuant smooths — q/k/v and fc1, the LayerNorm outputs — with max|X_j| the channel max over
every calibration timestep. The division by s is folded into the adaLN modulation like PTQ4DiT's
balancing (calib/balance.py). Every layer then gets round-to-nearest per-channel absmax weights and one
static per-tensor activation scale from the calibration min-max of its (smoothed) input: the "O3"
static setting of the paper, the one that runs on the plain static kernels.
"""
from __future__ import annotations

import torch

from ..formats import absmax_scale
from ..nn.spec import LinearQuantSpec
from ..plan import LayerPlan, QuantPlan
from .balance import InputGroup, balance, input_groups
from .smooth import smoothing_vector
from .tgq import fill_unvisited

SMOOTHED_ROLES = ("qkv", "fc1")


def build_smoothquant(recipe, stats, layers: dict, plan: QuantPlan, model: torch.nn.Module, adapter) -> None:
    groups = input_groups(adapter, layers)

    def factor(group: InputGroup, w: torch.Tensor):
        if group.role not in SMOOTHED_ROLES:
            return None
        return smoothing_vector(stats.layers[group.layers[0]].chan_absmax.amax(0), w.abs().amax(0),
                                recipe.smooth_alpha)

    bal = balance(model, groups, factor)
    bal.to_plan(plan)
    for group in groups:
        st = stats.layers[group.layers[0]]
        if not bool(st.visited.any()):
            raise ValueError(f"layer {group.layers[0]!r} never ran during calibration: no activation statistics")
        m = bal.factors.get(group.key)
        absmax = (st.chan_absmax / m if m is not None else st.chan_absmax).amax(1)
        table = absmax_scale(fill_unvisited(absmax, st.visited), recipe.act).tolist()
        spec = LinearQuantSpec(weight=recipe.weight, act=recipe.act, act_mode="static", time_groups=recipe.time_groups,
                               smooth=any(n in bal.smooth for n in group.layers))
        for n in group.layers:
            plan.layers[n] = LayerPlan(spec, act_scales=table,
                                       note=f"smoothquant alpha={recipe.smooth_alpha}" if m is not None else "rtn minmax")
    plan.meta["smoothing"] = {"alpha": recipe.smooth_alpha, "folded_into": bal.folded_into}
