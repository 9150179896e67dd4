"""W4A4 ops: 4-bit weights and activations with block scales along K (FP4 as HQ-DiT, and INT4).

Operands are 4-bit codes packed two per byte along K (formats.pack_4bit: element 2i in the low nibble)
with one fp32 scale per block of `group_size` consecutive elements of K:
    a uint8 [M, K/2], a_scale f32 [M, K/group_size]; w uint8 [N, K/2], w_scale f32 [N, K/group_size].
The code format of each operand is an argument (formats.FOUR_BIT_FORMATS: "int4", "fp4_e2m1",
"fp4_e1m2", "fp4_e3m0"), so HQ-DiT's per-layer format choice, separately for weights and activations,
and INT4 at equal bits all run on one kernel. NVFP4 (group 16) and MXFP4 (group 32) tensors are the
E2M1 case with scales from formats.nvfp4_scales_fp32 / mxfp4_scales_fp32.

Semantics (reference.w4a4_gemm, evaluated in this order in fp32): every nibble decodes exactly to the
integer value × factor (formats.code4_int_table: E2M1 ×2, E1M2 ×4, E3M0 ×4, INT4 ×1); per block b the
integer product a_b · w_bᵀ is exact; out = Σ_b acc_b · (a_scale[:, b] · w_scale[:, b]) over b in order,
times 1/(factor_a · factor_w) (a power of two, exact), plus bias, cast to out_dtype last.

quantize_act_4bit makes the activation operand: dynamic per-block FP4 or INT4 codes of
(x / smooth) @ H_K (smoothing and the online Hadamard rotation fused, as in quantize_act). A block
holding NaN or Inf gets a NaN scale (zero codes), so the GEMM output of its row is NaN, never plausible.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import formats, hadamard
from . import reference
from ._checks import FLOAT_DTYPES, check, check_bias_out, check_same_device, check_tensor
from ._dispatch import dispatch, register_kernel

register_kernel("w4a4_gemm", "reference")(reference.w4a4_gemm)
register_kernel("quantize_act_4bit", "reference")(reference.quantize_act_4bit)

# Block sizes the kernels take: one int8 MMA K-step (32) holds whole blocks, or a block is whole K-steps.
W4A4_GROUP_SIZES = (16, 32, 64, 128)


def _check_format(op: str, name: str, fmt) -> None:
    check(fmt in formats.FOUR_BIT_FORMATS, op, f"{name} must be one of {formats.FOUR_BIT_FORMATS}, got {fmt!r}")


def _check_group(op: str, k: int, group_size) -> None:
    check(isinstance(group_size, int) and group_size in W4A4_GROUP_SIZES, op,
          f"group_size must be one of {W4A4_GROUP_SIZES}, got {group_size!r}")
    check(k % group_size == 0, op, f"K={k} is not divisible by group_size {group_size}")


# ------------------------------------------------------------------------------------ w4a4_gemm

def _check_w4a4_gemm(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype) -> None:
    op = "w4a4_gemm"
    check_tensor(a, op, "a", (torch.uint8,), ndim=2)
    check_tensor(w, op, "w", (torch.uint8,), ndim=2)
    check(a.shape[1] == w.shape[1], op, f"K mismatch: a is {tuple(a.shape)} and w is {tuple(w.shape)} "
          "(both [rows, K/2], two 4-bit codes per byte)")
    k = 2 * a.shape[1]
    _check_group(op, k, group_size)
    groups = k // group_size
    for name, scale, rows in (("a_scale", a_scale, a.shape[0]), ("w_scale", w_scale, w.shape[0])):
        check_tensor(scale, op, name, (torch.float32,), ndim=2)
        check(tuple(scale.shape) == (rows, groups), op, f"{name} must be [{rows}, K/group_size={groups}] "
              f"(K={k}, group_size={group_size}), got {tuple(scale.shape)}")
    check_bias_out(op, bias, w.shape[0], out_dtype)
    _check_format(op, "a_fmt", a_fmt)
    _check_format(op, "w_fmt", w_fmt)
    check_same_device(op, a=a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::w4a4_gemm", mutates_args=())
def w4a4_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, a_fmt: str, w_fmt: str,
              out_dtype: torch.dtype) -> torch.Tensor:
    """out[M, N] = Σ_b dec(a)_b · dec(w)_bᵀ · a_scale[:, b] · w_scale[:, b] + bias (module docstring)."""
    _check_w4a4_gemm(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype)
    return dispatch("w4a4_gemm", a.device)(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype)


@w4a4_gemm.register_fake
def _(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype):
    _check_w4a4_gemm(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------------------- quantize_act_4bit

def _check_quantize_act_4bit(x, fmt, group_size, smooth, rotate) -> None:
    op = "quantize_act_4bit"
    check_tensor(x, op, "x", FLOAT_DTYPES, ndim=2)
    _check_format(op, "fmt", fmt)
    k = x.shape[1]
    check(k % 2 == 0, op, f"K={k} must be even (two 4-bit codes per byte)")
    _check_group(op, k, group_size)
    if smooth is not None:
        check_tensor(smooth, op, "smooth", (torch.float32,), ndim=1)
        check(smooth.shape[0] == k, op, f"smooth must have K={k} entries (one per input channel), "
              f"got {smooth.shape[0]}")
    check(isinstance(rotate, bool), op, f"rotate must be a bool, got {rotate!r}")
    check(not rotate or hadamard.supported(int(k)), op,
          f"rotate=True needs a Hadamard order: K={k} is not 2^k, 12·2^k or 36·2^k")
    check_same_device(op, x=x, smooth=smooth)


@torch.library.custom_op("dtq::quantize_act_4bit", mutates_args=())
def quantize_act_4bit(x: torch.Tensor, fmt: str, group_size: int, smooth: Optional[torch.Tensor] = None,
                      rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (codes uint8 [M, K/2], scale f32 [M, K/group_size]): formats.quantize_blockwise
    of ((x / smooth) @ H_K) in fmt, packed two per byte (formats.pack_4bit), all in fp32."""
    _check_quantize_act_4bit(x, fmt, group_size, smooth, rotate)
    return dispatch("quantize_act_4bit", x.device)(x, fmt, group_size, smooth, rotate)


@quantize_act_4bit.register_fake
def _(x, fmt, group_size, smooth=None, rotate=False):
    _check_quantize_act_4bit(x, fmt, group_size, smooth, rotate)
    m, k = x.shape
    return x.new_empty((m, k // 2), dtype=torch.uint8), x.new_empty((m, k // group_size), dtype=torch.float32)
