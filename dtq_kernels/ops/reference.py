"""Pure-torch implementations of the `dtq` ops: the executable spec, the CPU path and the test oracle.

Inputs are assumed validated by the op layer. All quantization math comes from `dtq_kernels.formats`.
"""
from __future__ import annotations

import torch

from .. import formats


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization: scale = absmax(row) / (2^(bits-1) - 1), codes round half to even."""
    scale = formats.absmax_scale(x.float().abs().amax(dim=-1), f"int{bits}")
    return formats.quantize_int(x, scale[:, None], bits), scale


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 a · wᵀ for int8 a [M, K], w [N, K].

    Goes through float64 BLAS: every product is < 2^14 and every partial sum < K · 2^14 < 2^53, so the
    result is exact, and much faster on CPU than torch's integer matmul.
    """
    return (a.double() @ w.double().T).to(torch.int32)


def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(a · wᵀ in int32) · a_scale[:, None] · w_scale[None, :] + bias, computed in fp32, cast last."""
    out = int_matmul(a, w).float() * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
