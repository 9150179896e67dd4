"""ViDiT-Q metric-decoupled mixed precision (docs/methods.md), with relative output MSE as the metric.

Sensitivity of a layer in a step group: quantize that layer alone to the low weight format (after its
smoothing, exactly as it would run), run the transformer on the inputs captured in that group, and
measure ‖out − out_fp‖² / ‖out_fp‖². Then, per step group, promote the most sensitive layers to W8 while
the parameter-weighted average weight width stays within the bit budget. The first `w8_fraction` of the
sampling steps (the highest timesteps) run all-W8, as the released W4A8-MP configuration.
"""
from __future__ import annotations

import torch

from .search import fake_quant_weight


def _sample(out) -> torch.Tensor:
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def sensitivity(model: torch.nn.Module, layers: dict[str, torch.nn.Linear], inputs: tuple[tuple, dict],
                smooth: dict[str, torch.Tensor], weight_fmt: str) -> dict[str, float]:
    """{layer: relative output error of the model with only that layer's weight quantized}."""
    args, kwargs = inputs
    ref = _sample(model(*args, **kwargs)).float()
    denom = (ref ** 2).sum().clamp_min(1e-30)
    out = {}
    for name, lin in layers.items():
        w = lin.weight.data
        s = smooth.get(name, torch.ones(w.shape[1])).to(w.device)
        lin.weight.data = (fake_quant_weight(w.float() * s, weight_fmt) / s).to(w.dtype)
        try:
            y = _sample(model(*args, **kwargs)).float()
        finally:
            lin.weight.data = w
        out[name] = float(((y - ref) ** 2).sum() / denom)
    return out


def allocate(sens: dict[str, float], params: dict[str, int], budget_bits: float, low: int = 4,
             high: int = 8) -> set[str]:
    """Layers promoted to `high` bits: most sensitive first, while the average width ≤ budget_bits."""
    total = sum(params.values())
    bits = low * total
    promoted = set()
    for name in sorted(sens, key=sens.get, reverse=True):
        extra = (high - low) * params[name]
        if bits + extra <= budget_bits * total:
            promoted.add(name)
            bits += extra
    return promoted


def all_w8_groups(time_groups: int, w8_fraction: float) -> set[int]:
    """Time groups inside the top `w8_fraction` of the timestep range (the first sampling steps)."""
    first = round(time_groups * (1 - w8_fraction))
    return set(range(first, time_groups))
