"""Activation quantization ops: schema, fake impl and dispatch (the kernels live in their backends)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import formats, hadamard
from . import reference
from ._checks import (FLOAT_DTYPES, check, check_bits, check_group_idx, check_group_in_range, check_same_device,
                      check_tensor)
from ._dispatch import dispatch, register_kernel
# group-index checks are shared with the static GEMMs, which read the same (scale_table, group_idx)

register_kernel("quantize_per_token", "reference")(reference.quantize_per_token)


def _check_quantize_per_token(x: torch.Tensor, bits: int) -> None:
    check_tensor(x, "quantize_per_token", "x", FLOAT_DTYPES, ndim=2)
    check_bits(bits, "quantize_per_token")


@torch.library.custom_op("dtq::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q int8 [M, K], scale f32 [M]); scale = absmax(row) / (2^(bits-1) - 1).
    A row holding NaN or ±Inf gets scale NaN and codes 0 (formats.mark_nonfinite_rows): never hidden."""
    _check_quantize_per_token(x, bits)
    return dispatch("quantize_per_token", x.device)(x, bits)


@quantize_per_token.register_fake
def _(x, bits=8):
    _check_quantize_per_token(x, bits)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


# ------------------------------------------- fused activation quantization: quantize_act and friends
#
# Every op below produces the int8 codes (narrower widths inside int8: W6A6 is bits=6) that the INT8
# GEMM family consumes, after optional transforms applied in this order, all in fp32:
#   [LayerNorm-modulate | GELU] -> x / smooth (per input channel) -> x @ H_K (orthonormal Hadamard,
#   dtq_kernels.hadamard) -> quantize
# and quantize is either dynamic per token (scale_table None: scale f32[M], the semantics of
# quantize_per_token) or static per tensor (scale = scale_table[group_idx[0]], read on the device with
# no host sync; formats.quantize_int: round half even, clamp ±qmax; the scale comes back per row, f32[M],
# every entry scale_table[group_idx[0]] unless the row is non-finite).
# Non-finite inputs are never hidden: a row whose quantizer input (after the fused transforms, which
# turn any NaN/±Inf of x, shift or scale into NaN/±Inf) holds NaN or ±Inf gets codes 0 and scale NaN in
# both modes, so the INT8 GEMM that consumes (codes, scale) outputs NaN for that row. (Static scales were
# f32[1] before; a per-row f32[M] costs 4 bytes per row and is what int8_gemm already takes.)
# The Triton kernel fuses the whole chain into one read of x and one write of the codes.

register_kernel("quantize_act", "reference")(reference.quantize_act)
register_kernel("layernorm_modulate_quantize", "reference")(reference.layernorm_modulate_quantize)
register_kernel("gelu_quantize", "reference")(reference.gelu_quantize)
register_kernel("quantize_two_region", "reference")(reference.quantize_two_region)

GELU_APPROXIMATIONS = ("none", "tanh")


def _check_act(op: str, x, bits, smooth, rotate, scale_table, group_idx, **others) -> None:
    """Metadata checks shared by quantize_act, layernorm_modulate_quantize and gelu_quantize."""
    check_tensor(x, op, "x", FLOAT_DTYPES, ndim=2)
    check_bits(bits, op)
    k = x.shape[1]
    if smooth is not None:
        check_tensor(smooth, op, "smooth", (torch.float32,), ndim=1)
        check(smooth.shape[0] == k, op, f"smooth must have K={k} entries (one per input channel), "
              f"got {smooth.shape[0]}")
    # int(): the Hadamard order must be concrete (a symbolic K is specialized, as a model width is)
    check(not rotate or hadamard.supported(int(k)), op,
          f"rotate=True needs a Hadamard order: K={k} is not 2^k, 12·2^k or 36·2^k")
    check((scale_table is None) == (group_idx is None), op,
          "scale_table and group_idx go together: pass both (static) or neither (dynamic per token)")
    if scale_table is not None:
        check_tensor(scale_table, op, "scale_table", (torch.float32,), ndim=1)
        check(scale_table.shape[0] >= 1, op, "scale_table must have at least one time group")
        check_group_idx(op, group_idx)
    check_same_device(op, x=x, smooth=smooth, scale_table=scale_table, group_idx=group_idx, **others)


def _act_outputs(x, scale_table):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


def _check_table_range(op, scale_table, group_idx) -> None:
    if scale_table is not None:
        check_group_in_range(op, group_idx, scale_table.shape[0])


# ---------------------------------------------------------------------------------- quantize_act

@torch.library.custom_op("dtq::quantize_act", mutates_args=())
def quantize_act(x: torch.Tensor, bits: int = 8, smooth: Optional[torch.Tensor] = None, rotate: bool = False,
                 scale_table: Optional[torch.Tensor] = None,
                 group_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q int8 [M, K], scale f32 [M]).

    q = codes of ((x / smooth) @ H_K) with smooth f32 [K] optional and the rotation when rotate=True
    (K must be 2^k, 12·2^k or 36·2^k). Dynamic per token when scale_table is None, else the static
    scale scale_table[group_idx[0]] (scale_table f32 [G], group_idx int32 [1], read on the device),
    repeated per row. A row holding NaN/±Inf gets codes 0 and scale NaN (see the note above).
    """
    _check_act("quantize_act", x, bits, smooth, rotate, scale_table, group_idx)
    _check_table_range("quantize_act", scale_table, group_idx)
    return dispatch("quantize_act", x.device)(x, bits, smooth, rotate, scale_table, group_idx)


@quantize_act.register_fake
def _(x, bits=8, smooth=None, rotate=False, scale_table=None, group_idx=None):
    _check_act("quantize_act", x, bits, smooth, rotate, scale_table, group_idx)
    return _act_outputs(x, scale_table)


# ------------------------------------------------------------------- layernorm_modulate_quantize

def _check_ln(x, shift, scale, tokens_per_batch, eps, bits, smooth, rotate, scale_table, group_idx) -> None:
    op = "layernorm_modulate_quantize"
    _check_act(op, x, bits, smooth, rotate, scale_table, group_idx, shift=shift, scale=scale)
    check(isinstance(tokens_per_batch, int) and tokens_per_batch >= 1, op,
          f"tokens_per_batch must be a positive int, got {tokens_per_batch!r}")
    check(isinstance(eps, float) and eps > 0, op, f"eps must be a positive float, got {eps!r}")
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(t, op, name, FLOAT_DTYPES, ndim=2)
        check(t.shape[1] == x.shape[1], op, f"{name} must be [B, C={x.shape[1]}], got {tuple(t.shape)}")
        check(t.shape[0] * tokens_per_batch == x.shape[0], op,
              f"x has {x.shape[0]} rows but {name} has B={t.shape[0]} batches of {tokens_per_batch} tokens")


@torch.library.custom_op("dtq::layernorm_modulate_quantize", mutates_args=())
def layernorm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens_per_batch: int,
                                eps: float = 1e-6, bits: int = 8, smooth: Optional[torch.Tensor] = None,
                                rotate: bool = False, scale_table: Optional[torch.Tensor] = None,
                                group_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT's AdaLayerNormZero modulate fused with the activation quantization of its consumers.

    x [B·T, C] (rows batch-major, T = tokens_per_batch), shift and scale [B, C] (the adaLN chunks):
    h = LayerNorm(x, no affine, eps) · (1 + scale[b]) + shift[b] with b = row // T, computed in fp32;
    returns (q int8 [B·T, C], act_scale) = quantize_act(h, bits, smooth, rotate, scale_table, group_idx)
    exactly as quantize_act defines them, so the q/k/v QuantLinears (one shared input) take the codes
    and skip their own quantization. h itself is not returned: in a DiT block nothing else reads it
    (the gate and residual use x), and writing it would add 2 bytes per element to a 3-byte kernel.
    """
    _check_ln(x, shift, scale, tokens_per_batch, eps, bits, smooth, rotate, scale_table, group_idx)
    _check_table_range("layernorm_modulate_quantize", scale_table, group_idx)
    return dispatch("layernorm_modulate_quantize", x.device)(x, shift, scale, tokens_per_batch, eps, bits, smooth,
                                                             rotate, scale_table, group_idx)


@layernorm_modulate_quantize.register_fake
def _(x, shift, scale, tokens_per_batch, eps=1e-6, bits=8, smooth=None, rotate=False, scale_table=None,
      group_idx=None):
    _check_ln(x, shift, scale, tokens_per_batch, eps, bits, smooth, rotate, scale_table, group_idx)
    return _act_outputs(x, scale_table)


# --------------------------------------------------------------------------------- gelu_quantize

def _check_gelu(op, approximate) -> None:
    check(approximate in GELU_APPROXIMATIONS, op,
          f"approximate must be one of {GELU_APPROXIMATIONS} (DiT uses 'tanh'), got {approximate!r}")


@torch.library.custom_op("dtq::gelu_quantize", mutates_args=())
def gelu_quantize(h: torch.Tensor, bits: int = 8, approximate: str = "tanh", smooth: Optional[torch.Tensor] = None,
                  rotate: bool = False, scale_table: Optional[torch.Tensor] = None,
                  group_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (torch semantics: approximate 'tanh' or 'none' = erf) fused with quantize_act:
    returns quantize_act(gelu(h) in fp32, bits, smooth, rotate, scale_table, group_idx)."""
    _check_act("gelu_quantize", h, bits, smooth, rotate, scale_table, group_idx)
    _check_gelu("gelu_quantize", approximate)
    _check_table_range("gelu_quantize", scale_table, group_idx)
    return dispatch("gelu_quantize", h.device)(h, bits, approximate, smooth, rotate, scale_table, group_idx)


@gelu_quantize.register_fake
def _(h, bits=8, approximate="tanh", smooth=None, rotate=False, scale_table=None, group_idx=None):
    _check_act("gelu_quantize", h, bits, smooth, rotate, scale_table, group_idx)
    _check_gelu("gelu_quantize", approximate)
    return _act_outputs(h, scale_table)


# --------------------------------------------------------------------------- quantize_two_region

def _check_two_region(x, coef_table, group_idx, bits, mode, gelu, approximate) -> None:
    op = "quantize_two_region"
    check_tensor(x, op, "x", FLOAT_DTYPES, ndim=2)
    check_bits(bits, op)
    check_tensor(coef_table, op, "coef_table", (torch.float32,), ndim=2)
    check(coef_table.shape[0] >= 1 and coef_table.shape[1] == 2, op,
          f"coef_table must be [G, 2] (c_pos, c_neg per time group), got {tuple(coef_table.shape)}")
    check_group_idx(op, group_idx)
    check(mode in formats.TWO_REGION_MODES, op, f"mode must be one of {formats.TWO_REGION_MODES}, got {mode!r}")
    check(isinstance(gelu, bool), op, f"gelu must be a bool, got {gelu!r}")
    _check_gelu(op, approximate)
    check_same_device(op, x=x, coef_table=coef_table, group_idx=group_idx)


@torch.library.custom_op("dtq::quantize_two_region", mutates_args=())
def quantize_two_region(x: torch.Tensor, coef_table: torch.Tensor, group_idx: torch.Tensor, bits: int = 8,
                        mode: str = "sign", gelu: bool = False, approximate: str = "tanh") -> torch.Tensor:
    """Two-region (MRQ) codes int8 [M, K] of x, or of GELU(x) when gelu=True (post-GELU fc2 input), exactly
    formats.quantize_two_region with (c_pos, c_neg) = coef_table[group_idx[0]] (coef_table f32 [G, 2]):
    the codes int8_gemm_two_region consumes with the same table and index. Every code of a row holding
    NaN/±Inf is formats.NONFINITE_CODE (−128, never a two-region code), which int8_gemm_two_region turns
    into a NaN output row and formats.dequantize_two_region into NaN: the schema (codes only) is unchanged."""
    _check_two_region(x, coef_table, group_idx, bits, mode, gelu, approximate)
    check_group_in_range("quantize_two_region", group_idx, coef_table.shape[0])
    return dispatch("quantize_two_region", x.device)(x, coef_table, group_idx, bits, mode, gelu, approximate)


@quantize_two_region.register_fake
def _(x, coef_table, group_idx, bits=8, mode="sign", gelu=False, approximate="tanh"):
    _check_two_region(x, coef_table, group_idx, bits, mode, gelu, approximate)
    return torch.empty_like(x, dtype=torch.int8)


# ------------------------------------------------------------------------------ quantize_act_fp8

register_kernel("quantize_act_fp8", "reference")(reference.quantize_act_fp8)


@torch.library.custom_op("dtq::quantize_act_fp8", mutates_args=())
def quantize_act_fp8(x: torch.Tensor, smooth: Optional[torch.Tensor] = None,
                     rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q float8_e4m3fn [M, K], scale f32 [M]): dynamic per-token FP8 codes of
    (x / smooth) @ H_K (the transforms of quantize_act), scale = absmax(row) / 448, round to nearest
    even, the activations fp8_gemm consumes. A row with NaN/Inf gets a non-finite scale."""
    _check_act("quantize_act_fp8", x, 8, smooth, rotate, None, None)
    return dispatch("quantize_act_fp8", x.device)(x, smooth, rotate)


@quantize_act_fp8.register_fake
def _(x, smooth=None, rotate=False):
    _check_act("quantize_act_fp8", x, 8, smooth, rotate, None, None)
    return torch.empty_like(x, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], dtype=torch.float32)
