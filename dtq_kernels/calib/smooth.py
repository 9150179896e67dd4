"""Static SmoothQuant-style channel balancing, as ViDiT-Q's released code (docs/methods.md):
s_j = max|X_j|^α / max|W_j|^(1−α); the input is divided by s (fused into the activation quantizer) and
the weight multiplied by s (offline), so X·Wᵀ = (X/s)·(W·s)ᵀ. max|X_j| is the EMA (momentum 0.95) of the
per-call channel max.

ViDiT-Q keeps one s per time range ([0,500], [501,1000]) with a separate weight quantization per range.
Our LayerPlan holds one smoothing vector per layer (a per-range vector would need one quantized weight
per range, doubling W4 weight memory), so the plan carries a single vector from the channel max over all
ranges. `range_cost` measures what that costs on the calibration rows, per layer, next to per-range
smoothing and no smoothing; calibrate() records the summary in plan.meta["smoothing"].
"""
from __future__ import annotations

import torch

from ..formats import absmax_scale, dequantize_int, get_format, quantize_int
from .search import fake_quant_weight
from .stats import LayerStats

MIN_FACTOR = 1e-5


def smoothing_vector(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K]; channels where either side is all-zero get s = 1 (nothing to balance)."""
    a, w = act_absmax.float(), w_absmax.float()
    s = a.clamp_min(MIN_FACTOR) ** alpha / w.clamp_min(MIN_FACTOR) ** (1 - alpha)
    return torch.where((a > 0) & (w > 0), s.clamp_min(MIN_FACTOR), torch.ones_like(s))


def fake_quant_per_token(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Dynamic per-token symmetric quantize→dequantize (what quantize_per_token computes)."""
    scale = absmax_scale(x.abs().amax(-1, keepdim=True), fmt)
    return dequantize_int(quantize_int(x, scale, get_format(fmt).bits), scale)


def quantized_rel_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, weight_fmt: str,
                        act_fmt: str) -> float:
    """‖Q(X/s)·Q(W·s)ᵀ − X·Wᵀ‖² / ‖X·Wᵀ‖² with dynamic per-token activations."""
    w = w.float()
    s = torch.ones(w.shape[1], device=w.device) if s is None else s.to(w.device)
    y = x @ w.T
    y_hat = fake_quant_per_token(x / s, act_fmt) @ fake_quant_weight(w * s, weight_fmt).T
    return float(((y_hat - y) ** 2).sum() / (y ** 2).sum().clamp_min(1e-30))


def range_groups(time_groups: int, num_ranges: int = 2) -> list[list[int]]:
    """Time groups that make up each of ViDiT-Q's time ranges ([0,500), [500,1000] for 2)."""
    if time_groups % num_ranges:
        raise ValueError(f"{time_groups} time groups do not split into {num_ranges} ranges")
    per = time_groups // num_ranges
    return [list(range(r * per, (r + 1) * per)) for r in range(num_ranges)]


def layer_smoothing(stats: LayerStats, alpha: float) -> torch.Tensor:
    """The single smoothing vector of a layer: EMA channel max over every visited group."""
    act = stats.chan_ema[stats.visited].amax(0)
    return smoothing_vector(act, stats.w_chan_absmax, alpha)


def range_cost(stats: LayerStats, w: torch.Tensor, alpha: float, weight_fmt: str, act_fmt: str) -> dict:
    """Relative output error on the calibration rows with no smoothing, the single vector, and one
    vector per time range (each with its own quantized weight)."""
    s_single = layer_smoothing(stats, alpha)
    out = {"none": 0.0, "single": 0.0, "per_range": 0.0}
    n = 0
    for groups in range_groups(stats.chan_ema.shape[0]):
        groups = [g for g in groups if stats.visited[g]]
        if not groups:
            continue
        x = torch.cat([stats.group_rows(g) for g in groups]).to(w.device)
        s_range = smoothing_vector(stats.chan_ema[groups].amax(0), stats.w_chan_absmax, alpha)
        for key, s in (("none", None), ("single", s_single), ("per_range", s_range)):
            out[key] += quantized_rel_error(x, w, s, weight_fmt, act_fmt)
        n += 1
    return {k: v / n for k, v in out.items()}
