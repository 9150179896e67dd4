"""PTQ4DiT (NeurIPS 2024; docs/methods.md): channel salience, Spearman-ρ-guided salience calibration
(SSC) across timesteps, channel-wise salience balancing (CSB) folded offline, then static quantization.

* Salience of input channel j: s(X_j) = max over tokens |X_j| (per diffusion timestep t), s(W_j) =
  max over output channels |W_{o,j}|.
* SSC: ρ_t = Spearman(s(X^(t)), s(W)) over the input channels; η = softmax_t(−ρ_t); the calibrated
  activation salience is s_ρ(X) = Σ_t η_t·s(X^(t)): timesteps whose salient activation channels do NOT
  coincide with the salient weight channels (low ρ, the complementarity balancing exploits) weigh more.
  The released code takes t per calibration sample; we take it per diffusion timestep (the paper).
* CSB: m_j = √(s_ρ(X_j) / (s(W_j) + 1e-8)); X_j/m_j and W_j·m_j both get salience √(s_ρ(X_j)·s(W_j)),
  so max(s(X_j), s(W_j)) never grows. Channels with a zero salience on either side keep m_j = 1.
* Balanced layers: q/k/v (one group), the attention out-projection and fc1; not fc2 (its input is
  post-GELU). The 1/m folds into the adaLN modulation and the V projection (calib/balance.py): no op
  is added at inference.
* Quantization (our choice in place of the paper's quantile clip + BRECQ reconstruction, which is not
  built): per-output-channel weight clips and ONE static per-tensor activation scale per layer input,
  both from TQ-DiT's alternating output-MSE grid search on the balanced calibration rows. The
  activation scale is symmetric (our static kernels); the paper's is asymmetric.
"""
from __future__ import annotations

import torch

from ..plan import QuantPlan
from .balance import InputGroup, balance, input_groups, spearman, static_group_plans

BALANCED_ROLES = ("qkv", "attn_out", "fc1")
EPS = 1e-8


def ssc_salience(t_chan_absmax: dict[int, torch.Tensor], w_salience: torch.Tensor):
    """(s_ρ(X) [K], {t: ρ_t}, {t: η_t}) from the per-timestep activation salience."""
    if not t_chan_absmax:
        raise ValueError("SSC needs the activation salience of at least one timestep")
    ts = sorted(t_chan_absmax)
    rho = torch.tensor([spearman(t_chan_absmax[t], w_salience) for t in ts], dtype=torch.float64)
    eta = torch.softmax(-rho, 0)
    s = sum(float(e) * t_chan_absmax[t].double() for e, t in zip(eta, ts)).float()
    return s, dict(zip(ts, rho.tolist())), dict(zip(ts, eta.tolist()))


def csb_factors(act_salience: torch.Tensor, w_salience: torch.Tensor) -> torch.Tensor:
    """m [K] = √(s(X)/(s(W)+ε)); 1 where either salience is zero (nothing to balance)."""
    a, w = act_salience.double(), w_salience.double()
    m = torch.sqrt(a / (w + EPS))
    return torch.where((a > 0) & (w > 0), m, torch.ones_like(m)).float()


def ptq4dit_balance(stats, layers: dict, model: torch.nn.Module, adapter, ssc: bool = True):
    """(groups, Balanced, per-group info): SSC + CSB factors of the balanced roles, folded."""
    groups = input_groups(adapter, layers)
    info = {}

    def factor(group: InputGroup, w: torch.Tensor):
        if group.role not in BALANCED_ROLES:
            return None
        st = stats.layers[group.layers[0]]
        sw = w.abs().amax(0)
        if ssc:
            sx, rho, _ = ssc_salience(st.t_chan_absmax or {}, sw)
        else:  # CSB alone (the paper's ablation): the channel max over all timesteps
            sx, rho = st.chan_absmax.amax(0), {}
        m = csb_factors(sx, sw)
        info[group.key] = {"rho": {str(t): round(r, 4) for t, r in rho.items()},
                           "act_salience_max": [float(sx.max()), float((sx / m).max())],
                           "weight_salience_max": [float(sw.max()), float((sw * m).max())]}
        return m

    bal = balance(model, groups, factor)
    for key, target in bal.folded_into.items():
        info[key]["folded_into"] = target
    return groups, bal, info


def build_ptq4dit(recipe, stats, layers: dict, plan: QuantPlan, model: torch.nn.Module, adapter) -> None:
    groups, bal, info = ptq4dit_balance(stats, layers, model, adapter, recipe.ssc)
    bal.to_plan(plan)
    static_group_plans(stats, groups, bal, plan, recipe.weight, recipe.act, recipe.time_groups,
                       note="ptq4dit" + (" ssc" if recipe.ssc else "") + " csb", rounds=recipe.search_rounds)
    plan.meta["ptq4dit"] = {
        "ssc": recipe.ssc,
        "groups": info,
        "note": "salience max [before, after] balancing; folded_into: the op the 1/m is folded into "
                "(None: a smoothing vector fused into the activation quantizer)"}
