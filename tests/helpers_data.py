"""Synthetic inputs shared by the op tests."""
import torch


def with_outliers(m, k, dtype=torch.float32, seed=0):
    """Activations like a transformer's: mostly N(0,1), three channels 50x larger, a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 50
    if m > 2:
        x[2] = 0
    return x.to(dtype)
