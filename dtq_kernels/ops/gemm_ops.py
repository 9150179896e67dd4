"""GEMM ops on quantized operands: schema, fake impl and dispatch.

The INT8 family takes int8 activation codes a [M, K] and weight codes w: int8 [N, K] (W6A6 and
narrower codes are the same ops: the codes are just smaller), or int4 codes packed two per byte as
uint8 [N, K/2] (formats.pack_int4; W4A8). They return out [M, N] in out_dtype (fp32, fp16 or bf16),
with the integer product exact in int32 and the scaling epilogue in fp32.

Weight scales are per output channel, w_scale f32 [N], or (int8_gemm and int8_gemm_static) per group
of G consecutive input channels, w_scale f32 [N, K/G] with G in GEMM_GROUP_SIZES: each group's int32
partial product is scaled by its own scale and the groups are summed in fp32 in ascending K order.

Beside them: w4a16_gemm (16-bit activations x packed int4 weights, weight-only quantization) and
fp8_gemm (FP8 E4M3 activations and weights, sm_89/sm_90 on CUDA).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._checks import (check, check_bias_out, check_group_idx, check_group_in_range, check_same_device,
                      check_tensor)
from ._dispatch import dispatch, register_kernel

register_kernel("int8_gemm", "reference")(reference.int8_gemm)
register_kernel("int8_gemm_static", "reference")(reference.int8_gemm_static)
register_kernel("int8_gemm_wzp", "reference")(reference.int8_gemm_wzp)
register_kernel("int8_gemm_two_region", "reference")(reference.int8_gemm_two_region)
register_kernel("w4a16_gemm", "reference")(reference.w4a16_gemm)
register_kernel("fp8_gemm", "reference")(reference.fp8_gemm)

# Group sizes (input channels per weight scale) the per-group kernels take: one K-tile per group.
GEMM_GROUP_SIZES = (64, 128)


def _check_operands(op, a, w, w_scale, bias, out_dtype, grouped_ok: bool = False) -> None:
    """What every GEMM of the family needs: int8 a [M, K], w int8 [N, K] or packed int4 uint8 [N, K/2],
    f32 w_scale [N] (or [N, K/G] where grouped_ok), bias [N]?"""
    check_tensor(a, op, "a", (torch.int8,), ndim=2)
    check_tensor(w, op, "w", (torch.int8, torch.uint8), ndim=2)
    _check_weight_k(op, a, w)
    _check_w_scale(op, a, w, w_scale, grouped_ok)
    check_bias_out(op, bias, w.shape[0], out_dtype)


def _check_weight_k(op, a, w) -> None:
    if w.dtype == torch.uint8:
        check(a.shape[1] % 2 == 0, op, f"packed int4 weights need an even K, got K={a.shape[1]}")
        check(a.shape[1] == 2 * w.shape[1], op, f"K mismatch: a is {tuple(a.shape)} but the packed int4 w is "
              f"{tuple(w.shape)} (it must be [N, K/2], two codes per byte)")
    else:
        check(a.shape[1] == w.shape[1], op, f"K mismatch: a is {tuple(a.shape)} but w is {tuple(w.shape)} "
              "(w must be [N, K])")


def _check_w_scale(op, a, w, w_scale, grouped_ok: bool) -> None:
    check_tensor(w_scale, op, "w_scale", (torch.float32,))
    n, k = w.shape[0], a.shape[1]
    if w_scale.dim() == 2 and grouped_ok:
        check(w_scale.shape[0] == n and w_scale.shape[1] >= 1 and k % w_scale.shape[1] == 0
              and k // w_scale.shape[1] in GEMM_GROUP_SIZES, op,
              f"per-group w_scale must be [N={n}, K/G] with K={k} divisible by a group size G in "
              f"{GEMM_GROUP_SIZES}, got {tuple(w_scale.shape)}")
        return
    check(w_scale.dim() == 1, op, f"w_scale must be 1-D [N={n}] (one scale per output channel)"
          + (" or 2-D [N, K/G] (per group)" if grouped_ok else "") + f", got shape {tuple(w_scale.shape)}")
    check(w_scale.shape[0] == n, op, f"w_scale must have N={n} entries, got {w_scale.shape[0]}")


def _check_a_scale(op, a, a_scale) -> None:
    check_tensor(a_scale, op, "a_scale", (torch.float32,), ndim=1)
    check(a_scale.shape[0] in (a.shape[0], 1), op,
          f"a_scale must have M={a.shape[0]} entries (per token) or 1 (per tensor), got {a_scale.shape[0]}")


# ------------------------------------------------------------------------------------ int8_gemm

def _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype) -> None:
    op = "int8_gemm"
    _check_operands(op, a, w, w_scale, bias, out_dtype, grouped_ok=True)
    _check_a_scale(op, a, a_scale)
    check_same_device(op, a=a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::int8_gemm", mutates_args=())
def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """out[M, N] = (a · wᵀ in int32) · a_scale[:, None] · w_scale[None, :] + bias, in out_dtype; with
    per-group w_scale [N, K/G]: (Σ_g (a_g · w_gᵀ in int32) · w_scale[:, g]) · a_scale[:, None] + bias."""
    _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return dispatch("int8_gemm", a.device)(a, a_scale, w, w_scale, bias, out_dtype)


@int8_gemm.register_fake
def _(a, a_scale, w, w_scale, bias, out_dtype):
    _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------- int8_gemm_static

def _check_int8_gemm_static(a, scale_table, group_idx, w, w_scale, bias, out_dtype) -> None:
    op = "int8_gemm_static"
    _check_operands(op, a, w, w_scale, bias, out_dtype, grouped_ok=True)
    check_tensor(scale_table, op, "scale_table", (torch.float32,), ndim=1)
    check(scale_table.shape[0] >= 1, op, "scale_table must have at least one time group")
    check_group_idx(op, group_idx)
    check_same_device(op, a=a, scale_table=scale_table, group_idx=group_idx, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::int8_gemm_static", mutates_args=())
def int8_gemm_static(a: torch.Tensor, scale_table: torch.Tensor, group_idx: torch.Tensor, w: torch.Tensor,
                     w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """int8_gemm with a per-tensor activation scale scale_table[group_idx[0]], read on the device
    (static scales per time group: no host sync, CUDA-graph safe)."""
    _check_int8_gemm_static(a, scale_table, group_idx, w, w_scale, bias, out_dtype)
    check_group_in_range("int8_gemm_static", group_idx, scale_table.shape[0])
    return dispatch("int8_gemm_static", a.device)(a, scale_table, group_idx, w, w_scale, bias, out_dtype)


@int8_gemm_static.register_fake
def _(a, scale_table, group_idx, w, w_scale, bias, out_dtype):
    _check_int8_gemm_static(a, scale_table, group_idx, w, w_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# -------------------------------------------------------------------------------- int8_gemm_wzp

def _check_int8_gemm_wzp(a, a_scale, w, w_scale, w_zero, bias, out_dtype) -> None:
    op = "int8_gemm_wzp"
    _check_operands(op, a, w, w_scale, bias, out_dtype)
    _check_a_scale(op, a, a_scale)
    check_tensor(w_zero, op, "w_zero", (torch.int32,), ndim=1)
    check(w_zero.shape[0] == w.shape[0], op, f"w_zero must have N={w.shape[0]} entries, got {w_zero.shape[0]}")
    check_same_device(op, a=a, a_scale=a_scale, w=w, w_scale=w_scale, w_zero=w_zero, bias=bias)


@torch.library.custom_op("dtq::int8_gemm_wzp", mutates_args=())
def int8_gemm_wzp(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  w_zero: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """Asymmetric weights w ≈ w_scale·(q − w_zero): out = (a · (w − w_zero)ᵀ in int32) · a_scale ·
    w_scale + bias, the integer part computed as a·wᵀ − rowsum(a)·w_zeroᵀ."""
    _check_int8_gemm_wzp(a, a_scale, w, w_scale, w_zero, bias, out_dtype)
    return dispatch("int8_gemm_wzp", a.device)(a, a_scale, w, w_scale, w_zero, bias, out_dtype)


@int8_gemm_wzp.register_fake
def _(a, a_scale, w, w_scale, w_zero, bias, out_dtype):
    _check_int8_gemm_wzp(a, a_scale, w, w_scale, w_zero, bias, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------- int8_gemm_two_region

def _check_int8_gemm_two_region(a, coef_table, group_idx, w, w_scale, bias, out_dtype) -> None:
    op = "int8_gemm_two_region"
    _check_operands(op, a, w, w_scale, bias, out_dtype)
    check_tensor(coef_table, op, "coef_table", (torch.float32,), ndim=2)
    check(coef_table.shape[0] >= 1 and coef_table.shape[1] == 2, op,
          f"coef_table must be [G, 2] (c_pos, c_neg per time group), got {tuple(coef_table.shape)}")
    check_group_idx(op, group_idx)
    check_same_device(op, a=a, coef_table=coef_table, group_idx=group_idx, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::int8_gemm_two_region", mutates_args=())
def int8_gemm_two_region(a: torch.Tensor, coef_table: torch.Tensor, group_idx: torch.Tensor, w: torch.Tensor,
                         w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """Two-region activation codes (formats.quantize_two_region) times int8 weights:
    out = (c_pos · (max(a,0)·wᵀ) + c_neg · (min(a,0)·wᵀ)) · w_scale + bias with
    (c_pos, c_neg) = coef_table[group_idx[0]]; both integer accumulations exact in int32. A row whose
    first code is formats.NONFINITE_CODE (−128: quantize_two_region's mark of a NaN/±Inf input row) is NaN."""
    _check_int8_gemm_two_region(a, coef_table, group_idx, w, w_scale, bias, out_dtype)
    check_group_in_range("int8_gemm_two_region", group_idx, coef_table.shape[0])
    return dispatch("int8_gemm_two_region", a.device)(a, coef_table, group_idx, w, w_scale, bias, out_dtype)


@int8_gemm_two_region.register_fake
def _(a, coef_table, group_idx, w, w_scale, bias, out_dtype):
    _check_int8_gemm_two_region(a, coef_table, group_idx, w, w_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------------ w4a16_gemm

def _check_w4a16_gemm(x, w, w_scale, bias, out_dtype) -> None:
    op = "w4a16_gemm"
    check_tensor(x, op, "x", (torch.float16, torch.bfloat16), ndim=2)
    check_tensor(w, op, "w", (torch.uint8,), ndim=2)
    _check_weight_k(op, x, w)
    _check_w_scale(op, x, w, w_scale, grouped_ok=True)
    check_bias_out(op, bias, w.shape[0], out_dtype)
    check_same_device(op, x=x, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::w4a16_gemm", mutates_args=())
def w4a16_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
               out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only int4: x fp16/bf16 [M, K] times int4 codes packed two per byte w uint8 [N, K/2]
    (formats.pack_int4), w_scale f32 [N] or per group [N, K/G]. Per channel: out = (x · codesᵀ in fp32) ·
    w_scale + bias (the codes are exact in 16 bits). Per group: out = x · w16ᵀ in fp32 + bias with
    w16 = code · w_scale[n, k / G] in fp32 rounded once to x.dtype (reference.dequantize_w4_groups; why:
    docs/formats.md). In out_dtype."""
    _check_w4a16_gemm(x, w, w_scale, bias, out_dtype)
    return dispatch("w4a16_gemm", x.device)(x, w, w_scale, bias, out_dtype)


@w4a16_gemm.register_fake
def _(x, w, w_scale, bias, out_dtype):
    _check_w4a16_gemm(x, w, w_scale, bias, out_dtype)
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


# -------------------------------------------------------------------------------------- fp8_gemm

def _check_fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype) -> None:
    op = "fp8_gemm"
    check_tensor(a, op, "a", (torch.float8_e4m3fn,), ndim=2)
    check_tensor(w, op, "w", (torch.float8_e4m3fn,), ndim=2)
    _check_weight_k(op, a, w)
    _check_a_scale(op, a, a_scale)
    _check_w_scale(op, a, w, w_scale, grouped_ok=False)
    check_bias_out(op, bias, w.shape[0], out_dtype)
    check_same_device(op, a=a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::fp8_gemm", mutates_args=())
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 W8A8: a float8_e4m3fn [M, K] (per-token scales a_scale f32 [M], or [1] per tensor) times
    w float8_e4m3fn [N, K] (per-channel w_scale f32 [N]): out = (a · wᵀ in fp32) · a_scale[:, None] ·
    w_scale[None, :] + bias, in out_dtype. The fast kernel needs FP8 tensor cores (sm_89 / sm_90)."""
    _check_fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return dispatch("fp8_gemm", a.device)(a, a_scale, w, w_scale, bias, out_dtype)


@fp8_gemm.register_fake
def _(a, a_scale, w, w_scale, bias, out_dtype):
    _check_fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)
