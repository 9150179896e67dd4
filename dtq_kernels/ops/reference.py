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


def int8_gemm_static(a: torch.Tensor, scale_table: torch.Tensor, group_idx: torch.Tensor, w: torch.Tensor,
                     w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """int8_gemm with the per-tensor activation scale scale_table[group_idx[0]] (a static, per time
    group scale); the op layer has checked the index."""
    return int8_gemm(a, scale_table[group_idx.long()], w, w_scale, bias, out_dtype)


def int8_gemm_wzp(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  w_zero: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Asymmetric weights (formats.quantize_weight(..., symmetric=False): w ≈ w_scale·(q − z)):
    (a · (w − z)ᵀ in int32) · a_scale · w_scale + bias. Exact through float64 like int_matmul: products
    are < 2^15 and K · 2^15 < 2^53."""
    acc = (a.double() @ (w.double() - w_zero.double()[:, None]).T).to(torch.int32)
    out = acc.float() * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_gemm_two_region(a: torch.Tensor, coef_table: torch.Tensor, group_idx: torch.Tensor, w: torch.Tensor,
                         w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Two-region codes a (formats.quantize_two_region: value = q·c_pos if q >= 0 else q·c_neg) times
    int8 weights: (c_pos · (max(a,0)·wᵀ) + c_neg · (min(a,0)·wᵀ)) · w_scale + bias, both integer parts
    exact, (c_pos, c_neg) = coef_table[group_idx[0]]."""
    c_pos, c_neg = coef_table[group_idx.long()].float().unbind(-1)  # each [1]
    acc_pos = int_matmul(a.clamp(min=0), w).float()
    acc_neg = int_matmul(a.clamp(max=0), w).float()
    out = (acc_pos * c_pos + acc_neg * c_neg) * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ------------------------------------- fused activation quantization (smoothing, Hadamard, LN, GELU)

def _smooth_rotate(xf: torch.Tensor, smooth: torch.Tensor | None, rotate: bool) -> torch.Tensor:
    """x / smooth (per input channel), then x @ H_K: the transforms applied before quantization."""
    from .. import hadamard
    if smooth is not None:
        xf = xf / smooth.float()
    return hadamard.rotate(xf) if rotate else xf


def _quantize_rows(xf: torch.Tensor, bits: int, scale_table: torch.Tensor | None,
                   group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per token (quantize_per_token semantics) without a table, else static per tensor with
    scale = scale_table[group_idx[0]] (formats.quantize_int: round half even, clamp ±qmax)."""
    if scale_table is None:
        return quantize_per_token(xf, bits)
    scale = scale_table[group_idx.long()].float()  # [1]
    return formats.quantize_int(xf, scale, bits), scale


def quantize_act(x: torch.Tensor, bits: int, smooth: torch.Tensor | None, rotate: bool,
                 scale_table: torch.Tensor | None, group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of (x / smooth) @ H_K, computed in fp32 (see quantize_ops.quantize_act)."""
    return _quantize_rows(_smooth_rotate(x.float(), smooth, rotate), bits, scale_table, group_idx)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens_per_batch: int,
                       eps: float) -> torch.Tensor:
    """DiT's adaLN modulate in fp32: LN(x, no affine) · (1 + scale[b]) + shift[b], b = row // tokens."""
    h = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    b = torch.arange(x.shape[0], device=x.device) // tokens_per_batch
    return h * (1 + scale.float()[b]) + shift.float()[b]


def layernorm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens_per_batch: int,
                                eps: float, bits: int, smooth: torch.Tensor | None, rotate: bool,
                                scale_table: torch.Tensor | None,
                                group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    h = layernorm_modulate(x, shift, scale, tokens_per_batch, eps)
    return _quantize_rows(_smooth_rotate(h, smooth, rotate), bits, scale_table, group_idx)


def gelu_quantize(h: torch.Tensor, bits: int, approximate: str, smooth: torch.Tensor | None, rotate: bool,
                  scale_table: torch.Tensor | None, group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.nn.functional.gelu(h.float(), approximate=approximate)
    return _quantize_rows(_smooth_rotate(g, smooth, rotate), bits, scale_table, group_idx)


def quantize_two_region(x: torch.Tensor, coef_table: torch.Tensor, group_idx: torch.Tensor, bits: int, mode: str,
                        gelu: bool, approximate: str) -> torch.Tensor:
    """formats.quantize_two_region of x (or of GELU(x)) with (c_pos, c_neg) = coef_table[group_idx[0]]."""
    xf = torch.nn.functional.gelu(x.float(), approximate=approximate) if gelu else x.float()
    c_pos, c_neg = coef_table[group_idx.long()].float().unbind(-1)  # each [1]
    return formats.quantize_two_region(xf, c_pos, c_neg, bits, mode)
