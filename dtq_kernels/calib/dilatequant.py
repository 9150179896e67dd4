"""DilateQuant (arXiv 2409.14307; docs/methods.md): weight dilation, per-timestep activation
quantizers (TPQ); block-wise distillation is not built.

* Weight dilation: with W_max,o / W_min,o the max / min of output channel o, input channels attaining
  some channel's max or min keep s_k = 1; every other channel gets
      s_k = min( min_{o: W_ok > 0} W_max,o / W_ok,  min_{o: W_ok < 0} W_min,o / W_ok ) ≥ 1,
  the largest factor that leaves every output channel's range (and so its weight scale) unchanged.
  X_k / s_k shrinks the activation range for free. The products are rounded once in fp32; they are
  clamped back into the original [W_min,o, W_max,o] so that no range grows by a rounding ulp.
  Dilated: the shared q/k/v input, the out-projection and fc1 (1/s folded into adaLN / V like PTQ4DiT,
  calib/balance.py) and fc2 (post-GELU: 1/s fused into the activation quantizer as a smoothing vector).
* TPQ: one static activation scale per calibration timestep — the recipe's time groups are set to the
  number of calibration sampling steps, so each step of the calibration schedule owns a group of the
  static per-time-group kernels (group g = ⌊t·G/T⌋). Scales and per-channel weight clips come from the
  output-MSE grid search on the dilated rows (the paper learns them by distillation; its zero points
  are not used: our static activations are symmetric).
"""
from __future__ import annotations

import torch

from ..plan import QuantPlan
from .balance import InputGroup, balance, input_groups, static_group_plans

DILATED_ROLES = ("qkv", "attn_out", "fc1", "fc2")


def dilation_factors(w: torch.Tensor) -> torch.Tensor:
    """s [K] ≥ 1 for W [N, K] (zero weights impose no bound; an all-zero column keeps s = 1)."""
    wd = w.double()
    wmax, wmin = wd.amax(1, keepdim=True), wd.amin(1, keepdim=True)
    inf = torch.full_like(wd, float("inf"))
    bound = torch.minimum(torch.where(wd > 0, wmax / wd, inf), torch.where(wd < 0, wmin / wd, inf)).amin(0)
    return torch.where(torch.isfinite(bound), bound, torch.ones_like(bound)).clamp_min(1.0).float()


def dilate(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W·diag(s) in fp32, clamped into each output channel's original range."""
    wd = (w.double() * s.double()[None, :]).float()
    return torch.maximum(torch.minimum(wd, w.amax(1, keepdim=True)), w.amin(1, keepdim=True))


def build_dilatequant(recipe, stats, layers: dict, plan: QuantPlan, model: torch.nn.Module, adapter) -> None:
    groups = input_groups(adapter, layers)
    before: dict[str, torch.Tensor] = {}

    def factor(group: InputGroup, w: torch.Tensor):
        if group.role not in DILATED_ROLES:
            return None
        before[group.key] = w.clone()
        return dilation_factors(w)

    bal = balance(model, groups, factor)
    shrink = {}
    for group in groups:
        if group.key not in bal.factors:
            continue
        s, start = bal.factors[group.key], 0
        for n in group.layers:  # the ulp clamp: each output channel's range exactly as before
            rows = bal.weights[n].shape[0]
            w0 = before[group.key][start:start + rows]
            start += rows
            bal.weights[n].copy_(dilate(w0, s))
        st = stats.layers[group.layers[0]]
        shrink[group.key] = [float(st.chan_absmax.amax()), float((st.chan_absmax / s).amax()), float(s.max())]
    bal.to_plan(plan)
    static_group_plans(stats, groups, bal, plan, recipe.weight, recipe.act, recipe.time_groups,
                       note="dilatequant tpq", rounds=recipe.search_rounds)
    plan.meta["dilatequant"] = {
        "time_groups": recipe.time_groups, "folded_into": bal.folded_into,
        "act_absmax_before_after_max_factor": shrink}
