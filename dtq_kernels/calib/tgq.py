"""Time grouping for calibration (TQ-DiT TGQ, docs/methods.md): how per-group tables are completed when
calibration never visited a group. Which group a timestep falls in is the runtime's `nn.timestep.group_of`.
"""
from __future__ import annotations

import torch


def fill_unvisited(values: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """Copy each unvisited group's row from the nearest visited group (ties: the lower group).

    A sampler with few steps leaves some groups empty; at inference with more steps those groups are
    reached, and the nearest calibrated group is the best estimate of their range we have.
    """
    visited = visited.bool()
    if not bool(visited.any()):
        raise ValueError("no time group received calibration data")
    idx = torch.nonzero(visited).flatten()
    out = values.clone()
    for g in range(values.shape[0]):
        if not visited[g]:
            out[g] = values[idx[(idx - g).abs().argmin()]]
    return out
