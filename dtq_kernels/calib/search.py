"""TQ-DiT scale grid search (docs/methods.md): Δ = Δ₀·λ, Δ₀ = max|·|/(2^(b−1)−0.5),
λ ∈ {0.01 + i·1.19/100 : i = 0..100}, alternating weight and activation search for `rounds` rounds,
minimizing the layer's output MSE mean((X̂Ŵᵀ − XWᵀ)²) on the calibration rows.

Differences from the released code, both no worse by construction: weights get a clip ratio per output
channel (our kernels take per-channel weight scales; for a fixed X̂ each output channel's error depends
only on its own row of W, so the per-channel argmin is exact), and activation scales are searched per
time group (TGQ) for every quantized activation, not only post-softmax.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..formats import dequantize_weight, fake_quantize, get_format, quantize_weight

LAMBDAS = torch.tensor([0.01 + i * 1.19 / 100 for i in range(101)], dtype=torch.float64)

# (x [n, K], candidates [C, 1, 1]) -> fake-quantized x for every candidate [C, n, K]
ActQuant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CHUNK_ELEMS = 1 << 24  # candidates are evaluated in batches of about this many elements


def delta0(absmax: float, bits: int) -> float:
    """TQ-DiT's initial step: the absmax maps to the last code's upper rounding edge."""
    return float(absmax) / (2 ** (bits - 1) - 0.5)


def fake_quant_int(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Symmetric INTn quantize→dequantize (formats.py math); scale broadcasts against x."""
    return fake_quantize(x, scale, f"int{bits}")


def weight_clip_candidates(fmt: str) -> torch.Tensor:
    """The λ grid as clip ratios of the absmax scale (scale = absmax·clip/qmax ⇔ Δ = Δ₀·λ), ≤ 1."""
    qmax = get_format(fmt).maxval
    clips = LAMBDAS * qmax / (qmax + 0.5)
    return clips[clips <= 1.0].float()


def fake_quant_weight(w: torch.Tensor, fmt: str, clip: torch.Tensor | float = 1.0,
                      group_size: int | None = None) -> torch.Tensor:
    return dequantize_weight(quantize_weight(w, fmt, group_size, clip_ratio=clip)).to(w.device)


def search_weight_clip(x_hat: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, fmt: str,
                       group_size: int | None = None, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel clip ratio [N] minimizing mean over rows of (X̂Ŵᵀ − Y)² for each channel.

    With D = Ŵ − W and R = X̂Wᵀ − Y, channel o's error is ‖X̂d_o + r_o‖² = d_oᵀHd_o + 2d_oᵀ(X̂ᵀR)_o + ‖r_o‖²,
    H = X̂ᵀX̂. When there are more rows than input channels (n > K) that Gram form costs N·K² per
    candidate instead of N·K·n; its terms are all error-sized (no cancellation against ‖Y‖²)."""
    n, k = w.shape
    rows = x_hat.shape[0]
    cands = (weight_clip_candidates(fmt) if candidates is None else candidates.float()).to(w.device)
    step = max(1, CHUNK_ELEMS // (n * max(k, rows)))
    gram = rows > k
    if gram:
        h = x_hat.T @ x_hat                       # [K, K]
        cross = (x_hat @ w.T - y_ref).T @ x_hat   # [N, K] = (X̂ᵀR)ᵀ
    errs = []
    for i in range(0, len(cands), step):
        c = cands[i:i + step]
        # one quantize_weight call for the whole chunk: row j·N + o is channel o at clip c[j]
        w_c = fake_quant_weight(w.repeat(len(c), 1), fmt, c.repeat_interleave(n), group_size).reshape(len(c), n, k)
        if gram:
            d = w_c - w
            errs.append(((d @ h) * d).sum(-1) + 2 * (d * cross).sum(-1))  # [C, N], up to a per-channel constant
        else:
            errs.append(((w_c @ x_hat.T - y_ref.T) ** 2).mean(-1))  # [C, N]
    best = torch.cat(errs).argmin(0)
    return cands[best].cpu()


def search_act(x: torch.Tensor, w_hat: torch.Tensor, y_ref: torch.Tensor, candidates: torch.Tensor,
               quant: ActQuant) -> tuple[float, float]:
    """(best candidate, its output MSE) over `candidates` for the activation quantizer `quant`.

    With D = X̂ − X and R = XŴᵀ − Y, the error is ‖DŴᵀ + R‖² = Σ(DG)⊙D + 2ΣD⊙(RŴ) + ‖R‖², G = ŴᵀŴ: N/K
    times cheaper per candidate when the layer widens (N > K). The candidates are ranked by whichever
    form is cheaper; after the Gram form, the winner's error is computed directly."""
    cands = candidates.float().to(x.device)
    step = max(1, CHUNK_ELEMS // max(x.numel(), x.shape[0] * w_hat.shape[0]))
    gram = w_hat.shape[0] > w_hat.shape[1]
    if gram:
        g = w_hat.T @ w_hat                       # [K, K]
        cross = (x @ w_hat.T - y_ref) @ w_hat     # [n, K] = RŴ
    errs = []
    for i in range(0, len(cands), step):
        x_c = quant(x, cands[i:i + step, None, None])  # [C, n, K]
        if gram:
            d = x_c - x
            errs.append(((d @ g) * d).sum((1, 2)) + 2 * (d * cross).sum((1, 2)))
        else:
            errs.append(((x_c @ w_hat.T - y_ref) ** 2).mean((1, 2)))
    errs = torch.cat(errs)
    i = int(errs.argmin())
    best = float(cands[i])
    if not gram:
        return best, float(errs[i])
    return best, float(((quant(x, best) @ w_hat.T - y_ref) ** 2).mean())  # the Gram value is only up to a constant


def search_linear(rows: list[torch.Tensor | None], w: torch.Tensor, weight_fmt: str,
                  candidates: list[torch.Tensor | None], quant: ActQuant, init: list[float | None],
                  rounds: int = 3, out_weights: list[torch.Tensor | None] | None = None
                  ) -> tuple[torch.Tensor, list[float | None], list[float]]:
    """Alternating W / A search for one linear layer with per-group activation parameters.

    rows[g]: calibration input rows of group g ([n, K], None for an unvisited group); candidates[g]:
    activation parameter grid of group g; init[g]: its starting value (λ = 1). Returns
    (per-channel weight clips [N], per-group activation parameters, per-group final output MSE).

    out_weights[g] (optional, [N] ≥ 0): TQ-DiT's Hessian-guided objective with a diagonal Fisher per
    output channel: group g's activation search minimizes mean(f ⊙ (X̂Ŵᵀ − Y)²), which is the plain
    error with the rows of Ŵ and the columns of Y scaled by √f. The weight search is per output channel,
    so a per-channel factor leaves its argmin unchanged: it stays the plain output MSE.
    """
    w = w.float()
    groups = [g for g, r in enumerate(rows) if r is not None and len(r)]
    if not groups:
        raise ValueError("search_linear needs calibration rows in at least one time group")
    x = {g: rows[g].to(w.device) for g in groups}
    y = {g: x[g] @ w.T for g in groups}
    act = list(init)
    clips = torch.ones(w.shape[0])
    errs = [float("nan")] * len(rows)
    for _ in range(rounds):
        x_hat = torch.cat([quant(x[g], act[g]) for g in groups])
        clips = search_weight_clip(x_hat, w, torch.cat([y[g] for g in groups]), weight_fmt)
        w_hat = fake_quant_weight(w, weight_fmt, clips.to(w.device))
        for g in groups:
            f = None if out_weights is None else out_weights[g]
            if f is None:
                act[g], errs[g] = search_act(x[g], w_hat, y[g], candidates[g], quant)
            else:
                r = f.float().clamp_min(0).sqrt().to(w.device)
                act[g], errs[g] = search_act(x[g], w_hat * r[:, None], y[g] * r, candidates[g], quant)
    return clips, act, errs
