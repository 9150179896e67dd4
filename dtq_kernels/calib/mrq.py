"""TQ-DiT multi-region quantization (docs/methods.md), on formats.quantize_two_region codes.

* post-GELU (fc2 inputs), mode "sign": negative region fixed at Δ₋ = 0.16997 / 2^(b−1) (GELU's minimum
  spread over the negative codes), positive region Δ₊ searched on the λ grid around
  Δ₀ = max(X) / (2^(b−1) − 0.5). Table entry (c_pos, c_neg) = (Δ₊, Δ₋).
* post-softmax P, mode "split": high region [p, 1] with Δ_hi = 1/(2^(b−1)−1); low region [0, p) with
  Δ_lo = p/(2^(b−1)−1), p ∈ {2⁰, …, 2⁻¹⁹} (so Δ_hi/Δ_lo = 2^k). formats.py stores this as
  c_pos = Δ_lo, c_neg = −Δ_hi (high-region codes are negative and decode to positive values). p is
  searched per time group by the attention output error ‖P̂V − PV‖² on the collected snapshots.
"""
from __future__ import annotations

import torch

from ..formats import dequantize_two_region, int_qmax, quantize_two_region

GELU_MIN = 0.16997  # -min_x GELU(x), the deepest a post-GELU activation goes
SOFTMAX_SPLITS = tuple(2.0 ** -k for k in range(20))


def fake_two_region(x: torch.Tensor, c_pos, c_neg, bits: int, mode: str) -> torch.Tensor:
    """Two-region quantize→dequantize; c_pos / c_neg (floats or tensors) broadcast against x."""
    c_pos = torch.as_tensor(c_pos, dtype=torch.float32, device=x.device)
    c_neg = torch.as_tensor(c_neg, dtype=torch.float32, device=x.device)
    return dequantize_two_region(quantize_two_region(x, c_pos, c_neg, bits, mode), c_pos, c_neg)


def gelu_neg_step(bits: int) -> float:
    return GELU_MIN / 2 ** (bits - 1)


def gelu_quantizer(bits: int):
    """ActQuant for search.search_linear: the candidate is Δ₊, Δ₋ is fixed."""
    c_neg = gelu_neg_step(bits)
    return lambda x, c_pos: fake_two_region(x, c_pos, c_neg, bits, "sign")


def softmax_split_params(p: float, bits: int) -> tuple[float, float]:
    """(c_pos, c_neg) of the split-mode code for split point p."""
    qmax = int_qmax(bits)
    return p / qmax, -1.0 / qmax


def attention_output_mse(snapshots: list[tuple[torch.Tensor, torch.Tensor]], c_pos: float, c_neg: float,
                         bits: int) -> float:
    """Mean over snapshots of mean((P̂V − PV)²), P̂ the split-mode two-region quantization of P."""
    errs = []
    for p, v in snapshots:
        v = v.float()
        p_hat = fake_two_region(p, c_pos, c_neg, bits, "split")
        errs.append(float(((p_hat @ v - p @ v) ** 2).mean()))
    return sum(errs) / len(errs)


def search_softmax_split(snapshots: list[tuple[torch.Tensor, torch.Tensor]], bits: int) -> tuple[float, float, float]:
    """(c_pos, c_neg, error) of the best split point for these post-softmax snapshots."""
    if not snapshots:
        raise ValueError("post-softmax search needs at least one snapshot")
    best = None
    for p in SOFTMAX_SPLITS:
        c_pos, c_neg = softmax_split_params(p, bits)
        err = attention_output_mse(snapshots, c_pos, c_neg, bits)
        if best is None or err < best[2]:
            best = (c_pos, c_neg, err)
    return best
