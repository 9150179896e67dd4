"""GEMM ops on quantized operands: schema, fake impl and dispatch.

All take int8 activation codes a [M, K] and weight codes w: int8 [N, K] (W6A6 and narrower codes are
the same ops: the codes are just smaller), or int4 codes packed two per byte as uint8 [N, K/2]
(formats.pack_int4; W4A8). They return out [M, N] in out_dtype (fp32, fp16 or bf16), with the integer
product exact in int32 and the scaling epilogue in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._checks import (FLOAT_DTYPES, check, check_group_idx, check_group_in_range, check_out_dtype,
                      check_same_device, check_tensor)
from ._dispatch import dispatch, register_kernel

register_kernel("int8_gemm", "reference")(reference.int8_gemm)
register_kernel("int8_gemm_static", "reference")(reference.int8_gemm_static)
register_kernel("int8_gemm_wzp", "reference")(reference.int8_gemm_wzp)
register_kernel("int8_gemm_two_region", "reference")(reference.int8_gemm_two_region)


def _check_operands(op, a, w, w_scale, bias, out_dtype) -> None:
    """What every GEMM of the family needs: int8 a [M, K], w int8 [N, K] or packed int4 uint8 [N, K/2],
    f32 w_scale [N], bias [N]?"""
    check_tensor(a, op, "a", (torch.int8,), ndim=2)
    check_tensor(w, op, "w", (torch.int8, torch.uint8), ndim=2)
    if w.dtype == torch.uint8:
        check(a.shape[1] == 2 * w.shape[1], op, f"K mismatch: a is {tuple(a.shape)} but the packed int4 w is "
              f"{tuple(w.shape)} (it must be [N, K/2], two codes per byte)")
    else:
        check(a.shape[1] == w.shape[1], op, f"K mismatch: a is {tuple(a.shape)} but w is {tuple(w.shape)} "
              "(w must be [N, K])")
    check_tensor(w_scale, op, "w_scale", (torch.float32,), ndim=1)
    check(w_scale.shape[0] == w.shape[0], op, f"w_scale must have N={w.shape[0]} entries, got {w_scale.shape[0]}")
    if bias is not None:
        check_tensor(bias, op, "bias", FLOAT_DTYPES, ndim=1)
        check(bias.shape[0] == w.shape[0], op, f"bias must have N={w.shape[0]} entries, got {bias.shape[0]}")
    check_out_dtype(out_dtype, op)


def _check_a_scale(op, a, a_scale) -> None:
    check_tensor(a_scale, op, "a_scale", (torch.float32,), ndim=1)
    check(a_scale.shape[0] in (a.shape[0], 1), op,
          f"a_scale must have M={a.shape[0]} entries (per token) or 1 (per tensor), got {a_scale.shape[0]}")


# ------------------------------------------------------------------------------------ int8_gemm

def _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype) -> None:
    op = "int8_gemm"
    _check_operands(op, a, w, w_scale, bias, out_dtype)
    _check_a_scale(op, a, a_scale)
    check_same_device(op, a=a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::int8_gemm", mutates_args=())
def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """out[M, N] = (a · wᵀ in int32) · a_scale[:, None] · w_scale[None, :] + bias, in out_dtype."""
    _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return dispatch("int8_gemm", a.device)(a, a_scale, w, w_scale, bias, out_dtype)


@int8_gemm.register_fake
def _(a, a_scale, w, w_scale, bias, out_dtype):
    _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------- int8_gemm_static

def _check_int8_gemm_static(a, scale_table, group_idx, w, w_scale, bias, out_dtype) -> None:
    op = "int8_gemm_static"
    _check_operands(op, a, w, w_scale, bias, out_dtype)
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
