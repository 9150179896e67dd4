"""Round-to-nearest baselines: static per-tensor activation scales from the calibration min-max
(absmax) or from a percentile of |x|; weights keep formats.quantize_weight's absmax scales."""
from __future__ import annotations

import torch

from ..formats import absmax_scale
from .stats import LayerStats
from .tgq import fill_unvisited


def static_absmax(stats: LayerStats, clip: str = "minmax", percentile: float = 99.99) -> torch.Tensor:
    """Per-group clipping value [G] of |x|: the true absmax, or the percentile of the group's
    reservoir rows (an estimate from ≤ R·K values; the top 0.01% of 256×1152 is ~30 values)."""
    if clip == "minmax":
        amax = stats.chan_absmax.amax(1)
    elif clip == "percentile":
        amax = torch.zeros(stats.chan_absmax.shape[0])
        for g in range(len(amax)):
            if stats.visited[g]:
                amax[g] = torch.quantile(stats.group_rows(g).abs().flatten(), percentile / 100)
    else:
        raise ValueError(f"act_clip must be 'minmax' or 'percentile', got {clip!r}")
    return fill_unvisited(amax, stats.visited)


def static_scales(stats: LayerStats, act_fmt: str, clip: str = "minmax", percentile: float = 99.99) -> list[float]:
    """Static per-tensor activation scales per time group: clip value / qmax."""
    return absmax_scale(static_absmax(stats, clip, percentile), act_fmt).tolist()
