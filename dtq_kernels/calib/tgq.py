"""Time grouping (TQ-DiT TGQ, docs/methods.md): which group a diffusion timestep falls in, and how
per-group tables are completed when calibration never visited a group.

Group of a timestep t in [0, T]: g = min(floor(t·G/T), G−1) (docs/architecture.md). With G = 10 and T = 1000 the
groups are [0,100), [100,200), ..., [900,1000].
"""
from __future__ import annotations

import torch


def group_of(t: torch.Tensor, time_groups: int, num_train_timesteps: int) -> torch.Tensor:
    """Group index (int64, same shape as t) of diffusion timesteps t (any real dtype)."""
    if time_groups < 1:
        raise ValueError(f"time_groups must be >= 1, got {time_groups}")
    g = torch.floor(t.double() * time_groups / num_train_timesteps).long()
    return g.clamp(0, time_groups - 1)


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
