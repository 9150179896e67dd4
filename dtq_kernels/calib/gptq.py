"""GPTQ (Frantar et al., ICLR 2023): error-compensating rounding of a weight matrix, generic over the
grid a column is rounded onto (any formats.py format with fixed per-channel / per-group scales).

Columns are rounded one at a time in input-channel order; the rounding error of column j, divided by
the j-th diagonal of the upper Cholesky factor U of H⁻¹ (H = XᵀX + λI), is spread over the columns
not yet rounded along U's j-th row, which minimizes ‖X(Ŵ − W)ᵀ‖² greedily. Lazy batch updates in
blocks of `block` columns. λ = damp · mean(diag H); input channels that never fire (H_jj = 0) are zeroed.
"""
from __future__ import annotations

from typing import Callable

import torch

RoundFn = Callable[[torch.Tensor, int], torch.Tensor]  # (column [N], its index j) -> rounded column [N]


def gptq(w: torch.Tensor, hessian: torch.Tensor, round_fn: RoundFn, block: int = 128,
         damp: float = 0.01) -> torch.Tensor:
    """The rounded weight [N, K] (fp32), every column an output of round_fn."""
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian must be [{w.shape[1]}, {w.shape[1]}], got {tuple(hessian.shape)}")
    W = w.double().clone()
    H = hessian.double().clone()
    k = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * float(H.diagonal().mean()) * torch.eye(k, dtype=H.dtype, device=H.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = W[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = round_fn(col.float(), i1 + i).double()
            Q[:, i1 + i] = q
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ u[i1:i2, i2:]
    return Q.float()
