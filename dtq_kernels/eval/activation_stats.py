"""The activation statistics the DiT PTQ methods fight, measured over a real sampling run.

For every nn.Linear input X (tokens × channels) at every transformer call (one call per timestep):
- channel imbalance: per-channel absmax over all calls, then max / median over channels (what
  SmoothQuant-style balancing, PTQ4DiT's CSB and ViDiT-Q's channel balancing attack);
- range across timesteps: the tensor absmax per call, then max / min over calls (what TGQ's time
  groups and DilateQuant's per-timestep quantizers attack);
- post-GELU asymmetry (inputs of ff.net.2): max vs |min| (GELU's minimum is −0.17), the share of
  negative values (what MRQ's sign-split two-region code attacks);
- post-softmax asymmetry (attention probabilities, recomputed from the attention module's inputs
  with its own to_q/to_k, since SDPA never materialises them): quantiles, and the share of
  probabilities a uniform unsigned 8-bit grid on [0, max] rounds to zero (what MRQ's split code
  attacks).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn

from . import hooks

_MAX_QUANTILE_ELEMENTS = 1 << 20  # torch.quantile's input cap is 16M; a strided subsample is plenty


def layer_group(name: str) -> str:
    """Coarse layer type of a diffusers DiT Linear, for summaries."""
    for key, group in (("attn1.to_q", "qkv"), ("attn1.to_k", "qkv"), ("attn1.to_v", "qkv"),
                       ("attn1.to_out", "attn out"), ("ff.net.0", "fc1"), ("ff.net.2", "fc2 (post-GELU)"),
                       ("norm1.linear", "adaLN"), ("timestep_embedder", "t-embed"), ("proj_out", "final")):
        if key in name:
            return group
    return "other"


def _quantiles(x: torch.Tensor, qs=(0.5, 0.9, 0.99, 0.999)) -> dict[str, float]:
    flat = x.flatten().float()
    if flat.numel() > _MAX_QUANTILE_ELEMENTS:
        flat = flat[:: math.ceil(flat.numel() / _MAX_QUANTILE_ELEMENTS)]
    vals = torch.quantile(flat, torch.tensor(qs, device=flat.device))
    return {f"q{q * 100:g}": v.item() for q, v in zip(qs, vals)}


def _attention_probs(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ·scale) [B, heads, T, T] for a self-attention diffusers Attention module."""
    b, t, _ = hidden_states.shape
    q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
    h = attn.heads
    q = q.view(b, t, h, -1).transpose(1, 2)
    k = k.view(b, t, h, -1).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)


@torch.inference_mode()
def collect(model: nn.Module, calls: list[hooks.Call]) -> dict:
    """Statistics over the recorded transformer calls (see module docstring), JSON-ready."""
    names = hooks.linear_names(model)
    chan_max = {}                                    # layer -> running per-channel absmax [Cin]
    absmax_per_call = defaultdict(list)              # layer -> tensor absmax at each call
    gelu = defaultdict(lambda: {"max": -math.inf, "min": math.inf, "neg": 0, "count": 0})
    probs_stats = []                                 # one dict per (attention module, call)

    def on_linear(name, inputs, _out):
        x = inputs[0].detach().float()
        x = x.reshape(-1, x.shape[-1]).abs()
        cm = x.amax(0)
        chan_max[name] = cm if name not in chan_max else torch.maximum(chan_max[name], cm)
        this_call[name] = max(this_call.get(name, 0.0), cm.max().item())  # a layer may run twice per call
        if "ff.net.2" in name:
            raw = inputs[0].detach().float()
            g = gelu[name]
            g["max"], g["min"] = max(g["max"], raw.max().item()), min(g["min"], raw.min().item())
            g["neg"] += int((raw < 0).sum())
            g["count"] += raw.numel()

    attn_modules = {n: m for n, m in model.named_modules() if n.endswith("attn1") and hasattr(m, "to_q")}
    step = {"t": None}
    this_call: dict[str, float] = {}

    def on_attn(name, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        p = _attention_probs(attn_modules[name], hs.detach())
        levels = p.amax() / 255.0  # unsigned 8-bit uniform grid on [0, max P]
        probs_stats.append({"layer": name, "timestep": step["t"], "max": p.amax().item(),
                            "tokens": p.shape[-1], "zero_at_uint8": (p < levels / 2).float().mean().item(),
                            **_quantiles(p)})

    handles = [m.register_forward_pre_hook(lambda mod, a, kw, n=n: on_attn(n, a, kw), with_kwargs=True)
               for n, m in attn_modules.items()]
    try:
        with hooks.capture(model, names, on_linear):
            for call in calls:
                step["t"] = call.timestep
                this_call.clear()
                hooks.replay(model, call)
                for n, v in this_call.items():
                    absmax_per_call[n].append(v)
    finally:
        for h in handles:
            h.remove()

    layers = {}
    for n in names:
        if n not in chan_max:
            continue
        cm = chan_max[n]
        per_call = absmax_per_call[n]
        layers[n] = {"group": layer_group(n), "channels": cm.numel(),
                     "channel_max_over_median": (cm.max() / cm.median().clamp_min(1e-12)).item(),
                     "absmax": cm.max().item(),
                     "range_over_timesteps": max(per_call) / max(min(per_call), 1e-12),
                     "absmax_per_call": per_call}
    post_gelu = {n: {"max": g["max"], "min": g["min"], "max_over_abs_min": g["max"] / max(-g["min"], 1e-12),
                     "negative_share": g["neg"] / max(g["count"], 1)} for n, g in gelu.items()}
    return {"timesteps": [c.timestep for c in calls], "layers": layers, "post_gelu": post_gelu,
            "post_softmax": probs_stats, "summary": summarize(layers, post_gelu, probs_stats)}


def summarize(layers: dict, post_gelu: dict, probs: list[dict]) -> dict:
    """Per layer group: median and max over layers of the channel ratio and the timestep range;
    post-GELU and post-softmax aggregates."""
    groups = defaultdict(list)
    for n, s in layers.items():
        groups[s["group"]].append(s)
    out = {"groups": {}}
    for g, items in groups.items():
        cr = sorted(s["channel_max_over_median"] for s in items)
        tr = sorted(s["range_over_timesteps"] for s in items)
        out["groups"][g] = {"layers": len(items), "channel_ratio_median": cr[len(cr) // 2],
                            "channel_ratio_max": cr[-1], "timestep_range_median": tr[len(tr) // 2],
                            "timestep_range_max": tr[-1]}
    if post_gelu:
        out["post_gelu"] = {"max": max(g["max"] for g in post_gelu.values()),
                            "min": min(g["min"] for g in post_gelu.values()),
                            "max_over_abs_min_median": sorted(g["max_over_abs_min"] for g in post_gelu.values())[
                                len(post_gelu) // 2],
                            "negative_share_mean": sum(g["negative_share"] for g in post_gelu.values()) / len(post_gelu)}
    if probs:
        out["post_softmax"] = {"tokens": probs[0]["tokens"], "uniform_prob": 1.0 / probs[0]["tokens"],
                               "median_mean": sum(p["q50"] for p in probs) / len(probs),
                               "q99_mean": sum(p["q99"] for p in probs) / len(probs),
                               "max_mean": sum(p["max"] for p in probs) / len(probs),
                               "zero_at_uint8_mean": sum(p["zero_at_uint8"] for p in probs) / len(probs)}
    return out
