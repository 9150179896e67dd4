"""Dynamic per-block 4-bit activation quantization (FP4 E2M1/E1M2/E3M0 or INT4) with smoothing and
the online Hadamard rotation fused: quantize_act_4bit, the operand maker of the W4A4 GEMM.

Same row tiling as quantize.act_quant_kernel (whole rows on chip as [BLOCK_M, MPAD, P] tiles, the
rotation by quantize.hadamard_rows); blocks of GROUP consecutive columns are GROUP consecutive
elements of the flattened tile, so a block's absmax is a reduction over a [BLOCK_M, MPAD·P/GROUP, GROUP]
view. Bit-exact with formats.quantize_blockwise: IEEE divisions (div_rn), FP4 rounding as the count of
grid midpoints below |x|/scale plus one at an odd midpoint (ties to the even code), INT4 round half to
even clamped to ±7; a block with NaN/Inf gets a NaN scale and zero codes.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ... import formats
from .._dispatch import register_kernel
from .common import rne
from .quantize import hadamard_rows, load_row_tile, plan_rows  # the row tiling and rotation of quantize_act


@triton.jit
def act_quant_4bit_kernel(x_ptr, q_ptr, scale_ptr, smooth_ptr, hm_ptr, mid_ptr, M, K, stride_xm, stride_qm,
                          stride_sm, rot_norm,
                          HAS_SMOOTH: tl.constexpr, ROTATE: tl.constexpr, MFAC: tl.constexpr, MPAD: tl.constexpr,
                          P: tl.constexpr, LOG2P: tl.constexpr, INT4: tl.constexpr, MAXVAL: tl.constexpr,
                          GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    rows, col, col_ok, _, x = load_row_tile(x_ptr, M, K, stride_xm, MFAC, MPAD, P, BLOCK_M)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + col, mask=col_ok, other=1.0)
        x = tl.math.div_rn(x, s[None, :, :])
    if ROTATE:
        x = hadamard_rows(x, hm_ptr, MFAC, MPAD, P, LOG2P, BLOCK_M) * rot_norm

    xg = tl.reshape(x, [BLOCK_M, MPAD * P // GROUP, GROUP])            # blocks of the padded row tile
    # x · 0 is NaN exactly where x is NaN or ±Inf, so `bad` is NaN for such a block and 0 otherwise
    # (a max reduction on the GPU may drop NaN: this does not depend on it)
    bad = tl.sum(xg * 0.0, axis=2)
    scale = tl.math.div_rn(tl.max(tl.abs(xg), axis=2), tl.full((BLOCK_M, MPAD * P // GROUP), MAXVAL, tl.float32)) + bad
    gi = tl.arange(0, MPAD * P // GROUP)
    tl.store(scale_ptr + rows[:, None] * stride_sm + gi[None, :], scale,
             mask=(rows < M)[:, None] & (gi < K // GROUP)[None, :])
    zero = (scale == 0.0) | (scale != scale)                            # zero codes: zero or NaN scale
    xs = tl.math.div_rn(xg, tl.where(zero, 1.0, scale)[:, :, None])
    if INT4:
        q = tl.minimum(tl.maximum(rne(xs), -7.0), 7.0)
        code = q.to(tl.int32) & 15                                      # two's-complement nibble
    else:
        mag = tl.abs(xs)
        idx = tl.zeros_like(mag.to(tl.int32))
        for j in tl.static_range(7):                                    # the grid's 7 midpoints, ascending
            mid = tl.load(mid_ptr + j)
            idx += (mag > mid).to(tl.int32)
            if j % 2 == 1:                                              # a tie goes to the even index j + 1
                idx += (mag == mid).to(tl.int32)
        code = idx | tl.where((xs < 0.0) & (idx > 0), 8, 0)           # no negative-zero code
    code = tl.where(zero[:, :, None], 0, code)
    pairs = tl.reshape(code, [BLOCK_M, MPAD * P // 2, 2])
    lo, hi = tl.split(pairs)
    byte = tl.arange(0, MPAD * P // 2)
    tl.store(q_ptr + rows[:, None] * stride_qm + byte[None, :], (lo | (hi << 4)).to(tl.uint8),
             mask=(rows < M)[:, None] & (2 * byte < K)[None, :])


@functools.lru_cache(maxsize=None)
def _midpoints(fmt: str, device: torch.device) -> torch.Tensor:
    return formats.fp4_midpoints(fmt).to(device)


@register_kernel("quantize_act_4bit", "triton")
def quantize_act_4bit(x, fmt, group_size, smooth, rotate):
    M, K = x.shape
    plan = plan_rows(x, rotate)
    q = torch.empty((M, K // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((M, K // group_size), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, scale
    f = formats.get_format(fmt)
    mids = x if f.is_int else _midpoints(f.name, x.device)
    act_quant_4bit_kernel[(triton.cdiv(M, plan.block_m),)](
        x, q, scale, x if smooth is None else smooth, x if plan.hm is None else plan.hm, mids,
        M, K, x.stride(0), q.stride(0), scale.stride(0), (1.0 / K ** 0.5) if rotate else 1.0,
        HAS_SMOOTH=smooth is not None, ROTATE=rotate, MFAC=plan.mfac, MPAD=plan.mpad, P=plan.p,
        LOG2P=plan.p.bit_length() - 1, INT4=f.is_int, MAXVAL=float(f.maxval), GROUP=group_size,
        BLOCK_M=plan.block_m, num_warps=plan.num_warps)
    return q, scale


def _spec(name, *, group, int4=False, maxval=6.0, dtype="fp16", num_warps, **constexprs):
    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*u8", "scale_ptr": "*fp32", "smooth_ptr": "*fp32", "hm_ptr": "*fp32",
           "mid_ptr": "*fp32", **{n: "i32" for n in ("M", "K", "stride_xm", "stride_qm", "stride_sm")},
           "rot_norm": "fp32"}
    base = dict(HAS_SMOOTH=False, ROTATE=False, MFAC=1, MPAD=1, INT4=int4, MAXVAL=maxval, GROUP=group, BLOCK_M=1)
    base.update(constexprs)
    base["LOG2P"] = base["P"].bit_length() - 1
    return dict(name=name, fn=act_quant_4bit_kernel, num_warps=num_warps, signature=sig, constexprs=base,
                divisible_by_16=("x_ptr", "q_ptr", "K", "stride_xm", "stride_qm"),
                expect={arch: ["div.rn.f32"] for arch in (80, 89, 90)})


# HQ-DiT's online rotation on the DiT widths (H_36 ⊗ H_32 = 1152, H_36 ⊗ H_128 = 4608, H_12 ⊗ H_256 = 3072,
# one row per program as quantize_act launches them), and plain rows.
AOT_SPECS = [
    _spec("act_quant_4bit_e2m1_rot_1152_g32_fp16", group=32, num_warps=4, HAS_SMOOTH=True, ROTATE=True, MFAC=36,
          MPAD=64, P=32),
    _spec("act_quant_4bit_int4_rot_4608_g128_bf16", group=128, int4=True, maxval=7.0, dtype="bf16", num_warps=8,
          ROTATE=True, MFAC=36, MPAD=64, P=128),
    _spec("act_quant_4bit_e3m0_rot_3072_g64_bf16", group=64, maxval=16.0, dtype="bf16", num_warps=4, ROTATE=True,
          MFAC=12, MPAD=16, P=256),
    _spec("act_quant_4bit_e2m1_4608_g16_fp16", group=16, num_warps=8, P=8192),
]
