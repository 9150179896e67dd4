"""Quantized attention in Triton: INT8 QKᵀ on tensor cores, fp32 online softmax in the log2 domain,
8-bit P·V (FP8 e4m3 on sm_89/90, FP16 on sm_80; integer codes in fp16 for the static modes).

Three kernels per call:
1. `quant_rows_kernel` (Q, then K): per-token INT8 codes, dynamic (absmax / 127, K mean-subtracted) or
   static (per-head table entry at group_idx[0]); writes codes [B·H, S, CW] (zero past the head dim)
   and per-token fp32 scales (Q's carry sm_scale·log2e). One read of q/k, one write of 1-byte codes.
2. `quant_v_kernel`: V codes transposed to [B·H, CW, Skp] (keys contiguous: the reduction dim of P·V,
   which FP8 wgmma needs K-major) in the P·V dtype.
3. `attn_fwd_kernel`: one program per (BLOCK_M queries, batch·head). P_MODE 0 (dynamic): online softmax
   with the running max rounded up to an integer (reference.py explains why: exact power-of-two
   rescaling, kernel == one-shot spec up to exp2 ulps); P·448 (the 448 folded into the row offset of
   exp2) rounded to e4m3 (or fp16) against V codes.
   P_MODE 1/2 (static uniform / two-region): a first pass for the row max and sum, then a second that
   quantizes the normalized P with the calibrated per-group quantizer and accumulates P·V exactly
   (integer codes in fp16: ≤ 255 · 127 per product, exact; two-region keeps two accumulators).
Head dims (head_dims): up to 64 run as one power-of-two chunk >= 32 (int8 dots need a 32-deep
reduction); 65..96 as two chunks of 64 + 32 channels, two dots each for QKᵀ and P·V, so 72 (DiT-XL/2,
PixArt) wastes 25% of the MMA work instead of the 44% of padding to 128 (64 + 16 for
P·V alone would waste less, but Q/K codes then need their own 96-wide layout); 97..128 as 128.

Configs are fixed per arch, not autotuned, and NOT yet timed on a GPU (benchmarks/bench_attention.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import reference
from .._dispatch import BackendError, register_kernel
from .common import INTERPRETING, absmax_propagating_nan, nonfinite, round_to_e4m3_grid, rne
from .gemm_int8 import round_to_bf16

# P_MODE values
DYNAMIC, UNIFORM, TWO_REGION = 0, 1, 2
# PV_KIND values: how V (and P) are coded for the P·V dot
PV_FP8, PV_FP16, PV_INT = 0, 1, 2
LOG2_P_SCALE = tl.constexpr(reference.LOG2_P_SCALE)  # dynamic P is coded as P · 448
NAN = tl.constexpr(tl.PropagateNan.ALL)  # min/max/clamp that keep a NaN (the default may drop it)


@triton.jit
def _int_to_f32(x):
    """Exact int32 -> fp32 for |x| < 2^22 with an integer add and a float subtract (1.5·2^23's bits plus x
    are the float 1.5·2^23 + x), instead of I2F, which shares the quarter-rate unit with exp2.
    |QKᵀ| <= 127² · 128 < 2^21 for head dims <= 128."""
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _to_e4m3(x, SOFTWARE: tl.constexpr):
    """fp32 -> float8e4nv, round to nearest even, saturating at ±448 (formats.quantize_fp8_e4m3). On sm_90
    Triton emits cvt.rn.satfinite.e4m3x2.f32, exactly that in one instruction. On sm_89 it converts
    through f16 (double rounding: off by one e4m3 step near ties) and the interpreter's cast rounds some
    values wrongly, so there the value is first put on the e4m3 grid in software (a dozen ALU ops)."""
    if SOFTWARE:
        x = round_to_e4m3_grid(x)
    else:
        x = tl.clamp(x, -448.0, 448.0)
    return x.to(tl.float8e4nv)


@triton.jit
def quant_rows_kernel(x_ptr, codes_ptr, scale_ptr, mean_ptr, table_ptr, group_ptr,
                      H, S, D, stride_b, stride_s, stride_h, mult, qmax, num_groups,
                      STATIC: tl.constexpr, HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr,
                      CW: tl.constexpr):
    """Codes [B·H, S, CW] (channels past D zero) and per-token scales; DP >= CW is the register tile.
    A row holding NaN/±Inf gets codes 0 and scale NaN (formats.mark_nonfinite_rows)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rs = pid * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, DP)
    ok = (rs < S)[:, None] & (rd < D)[None, :]
    x = tl.load(x_ptr + b * stride_b + h * stride_h + rs[:, None] * stride_s + rd[None, :], mask=ok,
                other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(ok, x - tl.load(mean_ptr + bh * D + rd, mask=rd < D, other=0.0)[None, :], 0.0)
    absmax = absmax_propagating_nan(x, 1)  # NaN or Inf for a row holding NaN/±Inf
    bad = nonfinite(absmax) != 0
    if STATIC:
        g = tl.minimum(tl.maximum(tl.load(group_ptr), 0), num_groups - 1)
        scale = tl.zeros((BLOCK,), tl.float32) + tl.load(table_ptr + g * H + h)
    else:
        scale = tl.math.div_rn(absmax, qmax)  # formats.absmax_scale, bit for bit
    safe = tl.where(scale == 0, 1.0, scale)
    q = tl.clamp(rne(tl.math.div_rn(x, safe[:, None])), -qmax, qmax)  # formats.quantize_int
    q = tl.where((scale == 0)[:, None] | bad[:, None], 0.0, q)
    tl.store(codes_ptr + bh * S * CW + rs[:, None] * CW + rd[None, :], q.to(tl.int8),
             mask=(rs < S)[:, None] & (rd < CW)[None, :])
    tl.store(scale_ptr + bh * S + rs, tl.where(bad, float("nan"), scale * mult), mask=rs < S)


@triton.jit
def quant_v_kernel(v_ptr, vt_ptr, vscale_ptr, H, S, SP, D, stride_b, stride_s, stride_h, qmax,
                   PV_KIND: tl.constexpr, SOFT_FP8_ROUND: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr,
                   CW: tl.constexpr):
    """V / scale[channel] coded for the P·V dot, stored transposed [B·H, CW, SP]; zeros past S and D."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rs = pid * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, DP)
    ok = (rs < S)[:, None] & (rd < D)[None, :]
    x = tl.load(v_ptr + b * stride_b + h * stride_h + rs[:, None] * stride_s + rd[None, :], mask=ok,
                other=0.0).to(tl.float32)
    scale = tl.load(vscale_ptr + bh * CW + rd, mask=rd < CW, other=0.0)
    y = tl.math.div_rn(x, tl.where(scale == 0, 1.0, scale)[None, :])
    if PV_KIND == 0:
        y = _to_e4m3(y, SOFT_FP8_ROUND)
    elif PV_KIND == 1:
        y = y.to(tl.float16)
    else:  # static integer codes, exact in fp16; a non-finite V element stays NaN (fp16 holds it)
        y = tl.where(nonfinite(x) != 0, float("nan"), tl.clamp(rne(y), -qmax, qmax)).to(tl.float16)
    tl.store(vt_ptr + bh * CW * SP + rd[:, None] * SP + rs[None, :], tl.trans(y),
             mask=(rd < CW)[:, None] & (rs < SP)[None, :])


@triton.jit
def _scores(qa, qb, qs, k_ptr, ks_ptr, mask_ptr, bh, b, n0, SK, HAS_MASK: tl.constexpr,
            BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, SPLIT: tl.constexpr, CW: tl.constexpr):
    """Log2-domain scores of one key tile [BLOCK_M, BLOCK_N], -inf where the key is absent or masked.
    The head dim is DA channels, plus DB more in a second int8 dot when SPLIT (head dim 72 = 64 + 32)."""
    rn = n0 + tl.arange(0, BLOCK_N)
    valid = rn < SK
    k_rows = k_ptr + bh * SK * CW + rn[:, None] * CW
    ka = tl.load(k_rows + tl.arange(0, DA)[None, :], mask=valid[:, None], other=0)
    ks = tl.load(ks_ptr + bh * SK + rn, mask=valid, other=0.0)
    acc = tl.dot(qa, tl.trans(ka), out_dtype=tl.int32)
    if SPLIT:
        kb = tl.load(k_rows + DA + tl.arange(0, DB)[None, :], mask=valid[:, None], other=0)
        acc = tl.dot(qb, tl.trans(kb), acc, out_dtype=tl.int32)
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b * SK + rn, mask=valid, other=0) != 0)
    s = _int_to_f32(acc) * qs[:, None] * ks[None, :]
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _row_max_step(m_i, s):
    """Running max rounded up to an integer (finite or -inf) and its finite stand-in for subtraction."""
    m_new = tl.maximum(m_i, tl.math.floor(tl.max(s, axis=1)) + 1.0)
    return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def _inv_row_sum(l):
    """1 / l, 0 for a row without any unmasked key (l = 0), NaN for a NaN row sum."""
    return tl.where(l == 0.0, 0.0, 1.0 / tl.where(l == 0.0, 1.0, l))


@triton.jit
def _vt_tile(vt_ptr, bh, rn, SKP, D0: tl.constexpr, DW: tl.constexpr, CW: tl.constexpr):
    """V codes of channels D0 .. D0+DW for the keys rn, as [DW, BLOCK_N] (keys contiguous)."""
    rows = D0 + tl.arange(0, DW)
    return tl.load(vt_ptr + bh * CW * SKP + rows[:, None] * SKP + rn[None, :], mask=(rn < SKP)[None, :], other=0.0)


@triton.jit
def _pv(p, vt, FP8: tl.constexpr, BLOCK_N: tl.constexpr):
    if FP8:
        # Hopper's FP8 wgmma accumulates in reduced precision (~fp22): Triton's default lets that run over
        # every key tile; max_num_imprecise_acc=BLOCK_N adds each tile's product into the fp32 accumulator
        # instead (SageAttention2's two-level accumulation).
        return tl.dot(p, tl.trans(vt), out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_N)
    return tl.dot(p, tl.trans(vt), out_dtype=tl.float32)


@triton.jit
def _store(out_ptr, out, b, h, rm, SQ, D, stride_ob, stride_os, stride_oh, D0: tl.constexpr, DW: tl.constexpr):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = round_to_bf16(out)
    rd = D0 + tl.arange(0, DW)
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + rm[:, None] * stride_os + rd[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rm < SQ)[:, None] & (rd < D)[None, :])


@triton.jit
def attn_fwd_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, vt_ptr, vs_ptr, mask_ptr, ptab_ptr, group_ptr, out_ptr,
                    H, SQ, SK, SKP, D, num_groups, qmax, stride_ob, stride_os, stride_oh,
                    P_MODE: tl.constexpr, PV_KIND: tl.constexpr, HAS_MASK: tl.constexpr, SOFT_FP8_ROUND: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                    SPLIT: tl.constexpr, CW: tl.constexpr):
    # With SPLIT every head-dim quantity is in two chunks, channels [0, DA) and [DA, DA+DB), CW = DA + DB;
    # without, one chunk of DA = CW channels (the DB-wide values are then placeholders, never stored).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_rows = q_ptr + bh * SQ * CW + rm[:, None] * CW
    qa = tl.load(q_rows + tl.arange(0, DA)[None, :], mask=(rm < SQ)[:, None], other=0)
    if SPLIT:
        qb = tl.load(q_rows + DA + tl.arange(0, DB)[None, :], mask=(rm < SQ)[:, None], other=0)
        acc_b = tl.zeros((BLOCK_M, DB), tl.float32)
    else:
        qb = qa  # placeholder argument, never read
    qs = tl.load(qs_ptr + bh * SQ + rm, mask=rm < SQ, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_a = tl.zeros((BLOCK_M, DA), tl.float32)
    if P_MODE == 0:
        for n0 in range(0, SK, BLOCK_N):
            s = _scores(qa, qb, qs, k_ptr, ks_ptr, mask_ptr, bh, b, n0, SK, HAS_MASK, BLOCK_N, DA, DB, SPLIT, CW)
            m_new, m_sub = _row_max_step(m_i, s)
            alpha = tl.exp2(m_i - m_sub)  # an exact power of two (or 0 before the first valid key)
            p = tl.exp2(s - (m_sub - LOG2_P_SCALE)[:, None])  # P · 448, in [0, 448)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if PV_KIND == 0:
                pc = _to_e4m3(p, SOFT_FP8_ROUND)
            else:
                pc = p.to(tl.float16)
            rn = n0 + tl.arange(0, BLOCK_N)
            acc_a = acc_a * alpha[:, None] + _pv(pc, _vt_tile(vt_ptr, bh, rn, SKP, 0, DA, CW), PV_KIND == 0, BLOCK_N)
            if SPLIT:
                acc_b = acc_b * alpha[:, None] + _pv(pc, _vt_tile(vt_ptr, bh, rn, SKP, DA, DB, CW), PV_KIND == 0,
                                                     BLOCK_N)
            m_i = m_new
        inv_l = _inv_row_sum(l_i)
        acc_a = acc_a * inv_l[:, None]
        if SPLIT:
            acc_b = acc_b * inv_l[:, None]
    else:
        # pass 1: row max and sum of the final softmax
        for n0 in range(0, SK, BLOCK_N):
            s = _scores(qa, qb, qs, k_ptr, ks_ptr, mask_ptr, bh, b, n0, SK, HAS_MASK, BLOCK_N, DA, DB, SPLIT, CW)
            m_new, m_sub = _row_max_step(m_i, s)
            l_i = l_i * tl.exp2(m_i - m_sub) + tl.sum(tl.exp2(s - m_sub[:, None]), axis=1)
            m_i = m_new
        m_sub = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = _inv_row_sum(l_i)
        g = tl.minimum(tl.maximum(tl.load(group_ptr), 0), num_groups - 1)
        if P_MODE == 1:
            step = tl.load(ptab_ptr + g)
            inv_step = 1.0 / step
            top = 2.0 * qmax + 1.0  # unsigned codes 0 .. 2^bits - 1
        else:
            c_pos = tl.load(ptab_ptr + 2 * g)
            c_neg = tl.load(ptab_ptr + 2 * g + 1)
            inv_pos = 1.0 / c_pos
            inv_neg = 1.0 / c_neg
            split = c_pos * qmax
            neg_a = tl.zeros((BLOCK_M, DA), tl.float32)
            if SPLIT:
                neg_b = tl.zeros((BLOCK_M, DB), tl.float32)
        # pass 2: quantize the normalized P with the group's quantizer, P·V exact in integer codes (fp16).
        # A NaN row sum (a non-finite q row, or a non-finite unmasked key: their scales are NaN) makes
        # inv_l and so every P of the row NaN; the NaN-propagating clamps keep it as a NaN fp16 code, and
        # the P·V dot makes the output row NaN
        for n0 in range(0, SK, BLOCK_N):
            s = _scores(qa, qb, qs, k_ptr, ks_ptr, mask_ptr, bh, b, n0, SK, HAS_MASK, BLOCK_N, DA, DB, SPLIT, CW)
            p = tl.exp2(s - m_sub[:, None]) * inv_l[:, None]
            rn = n0 + tl.arange(0, BLOCK_N)
            vta = _vt_tile(vt_ptr, bh, rn, SKP, 0, DA, CW)
            if SPLIT:
                vtb = _vt_tile(vt_ptr, bh, rn, SKP, DA, DB, CW)
            if P_MODE == 1:
                u = tl.minimum(rne(p * inv_step), top, propagate_nan=NAN).to(tl.float16)
                acc_a += _pv(u, vta, False, BLOCK_N)
                if SPLIT:
                    acc_b += _pv(u, vtb, False, BLOCK_N)
            else:  # formats.quantize_two_region, mode "split"
                q_lo = rne(p * inv_pos)
                c = tl.clamp(tl.where((p < split) & (q_lo <= qmax), q_lo, rne(p * inv_neg)), -qmax, qmax,
                             propagate_nan=NAN)
                c_hi = tl.minimum(c, 0.0, propagate_nan=NAN).to(tl.float16)
                c = tl.maximum(c, 0.0, propagate_nan=NAN).to(tl.float16)
                acc_a += _pv(c, vta, False, BLOCK_N)
                neg_a += _pv(c_hi, vta, False, BLOCK_N)
                if SPLIT:
                    acc_b += _pv(c, vtb, False, BLOCK_N)
                    neg_b += _pv(c_hi, vtb, False, BLOCK_N)
        if P_MODE == 1:
            acc_a = acc_a * step
            if SPLIT:
                acc_b = acc_b * step
        else:
            acc_a = acc_a * c_pos + neg_a * c_neg
            if SPLIT:
                acc_b = acc_b * c_pos + neg_b * c_neg
    # times the per-channel V scale, then stored (dynamic mode: a NaN row sum made inv_l and the row NaN)
    vsa = tl.load(vs_ptr + bh * CW + tl.arange(0, DA))
    _store(out_ptr, acc_a * vsa[None, :], b, h, rm, SQ, D, stride_ob, stride_os, stride_oh, 0, DA)
    if SPLIT:
        vsb = tl.load(vs_ptr + bh * CW + DA + tl.arange(0, DB))
        _store(out_ptr, acc_b * vsb[None, :], b, h, rm, SQ, D, stride_ob, stride_os, stride_oh, DA, DB)


# --------------------------------------------------------------------------------------- launch

class HeadDims(NamedTuple):
    """How a head dim D is laid out in the kernels: codes rows of CW channels (zero past D), processed as
    one chunk of DA channels or, with split, DA + DB; the prep kernels hold a DP-wide register tile."""
    da: int
    db: int  # placeholder width (16) without split
    split: bool
    cw: int
    dp: int


def head_dims(d: int) -> HeadDims:
    """int8 dots need a reduction tile >= 32 and Triton tiles are powers of two: 72 (DiT-XL/2, PixArt)
    runs as 64 + 32 = 96 channels (25% of the MMA work is padding) rather than 128 (44%)."""
    if d <= 64:
        w = max(32, triton.next_power_of_2(d))
        return HeadDims(w, 16, False, w, w)
    if d <= 96:
        return HeadDims(64, 32, True, 96, 128)
    return HeadDims(128, 16, False, 128, 128)


def attn_config(major: int, cw: int, p_mode: int) -> dict:
    """Tile sizes and launch options for a CUDA arch major (8: sm_80/89, 9: sm_90) and code width CW, the
    largest tiles for which ptxas reports no spill (registers in the AOT_SPECS comment; tests check it).
    sm_80/89 (mma.sync, accumulators in registers) need narrower key tiles than sm_90 (wgmma). NOT yet
    timed on a GPU (benchmarks/bench_attention.py)."""
    if major >= 9:
        bm, bn = (64, 64) if p_mode == TWO_REGION else (128, 128 if cw <= 64 else 64)
    else:
        bm, bn = 128, (32 if p_mode == TWO_REGION or cw >= 128 else 64)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=8, num_stages=3 if major >= 9 else 2)


# The interpreter pays per program and loop iteration; tiles of 64 keep tests fast.
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)


def _launch_config(device: torch.device, cw: int, p_mode: int) -> dict:
    if INTERPRETING or device.type != "cuda":
        return INTERPRETER_CONFIG
    return attn_config(torch.cuda.get_device_capability(device)[0], cw, p_mode)


def soft_fp8_round(device: torch.device) -> bool:
    """Whether fp32 -> e4m3 needs the software grid rounding (see _to_e4m3): interpreter and sm_8x."""
    return INTERPRETING or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9


PREP_BLOCK = 64
PREP_WARPS = 8  # 4 warps hold a 64x128 fp32 tile in 255 registers (no spill, but low occupancy)


def _quant_rows(x, hd: HeadDims, *, mult, qmax, mean=None, table=None, group_idx=None):
    B, S, H, D = x.shape
    codes = torch.empty((B * H, S, hd.cw), dtype=torch.int8, device=x.device)
    scale = torch.empty((B * H, S), dtype=torch.float32, device=x.device)
    dummy = scale
    quant_rows_kernel[(triton.cdiv(S, PREP_BLOCK), B * H)](
        x, codes, scale, dummy if mean is None else mean, dummy if table is None else table,
        dummy if group_idx is None else group_idx, H, S, D, x.stride(0), x.stride(1), x.stride(2), mult, qmax,
        1 if table is None else table.shape[0], STATIC=table is not None, HAS_MEAN=mean is not None,
        BLOCK=PREP_BLOCK, DP=hd.dp, CW=hd.cw, num_warps=PREP_WARPS)
    return codes, scale


def _quant_v(v, hd: HeadDims, v_scale, pv_kind: int, qmax: float):
    """v_scale: per (batch·head, channel) fp32 [B·H, D]; returns (vt [B·H, CW, Skp], scale [B·H, CW])."""
    B, S, H, D = v.shape
    sp = triton.cdiv(S, 16) * 16  # 16-byte aligned rows of the transposed codes
    vs = torch.zeros((B * H, hd.cw), dtype=torch.float32, device=v.device)
    vs[:, :D] = v_scale
    dtype = torch.float8_e4m3fn if pv_kind == PV_FP8 else torch.float16
    vt = torch.empty((B * H, hd.cw, sp), dtype=dtype, device=v.device)
    quant_v_kernel[(triton.cdiv(sp, PREP_BLOCK), B * H)](
        v, vt, vs, H, S, sp, D, v.stride(0), v.stride(1), v.stride(2), qmax, PV_KIND=pv_kind,
        SOFT_FP8_ROUND=soft_fp8_round(v.device), BLOCK=PREP_BLOCK, DP=hd.dp, CW=hd.cw, num_warps=4)
    return vt, vs


def _attend(q, hd: HeadDims, qc, qs, kc, ks, vt, vs, key_padding_mask, *, p_mode, pv_kind, qmax=127.0,
            p_table=None, group_idx=None, config: dict | None = None):
    """The attention kernel on prepared codes; `config` overrides attn_config (the benchmark's sweep)."""
    B, SQ, H, D = q.shape
    SK = kc.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cfg = config or _launch_config(q.device, hd.cw, p_mode)
    mask = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    dummy = qs
    grid = (triton.cdiv(SQ, cfg["BLOCK_M"]), B * H)
    attn_fwd_kernel[grid](
        qc, qs, kc, ks, vt, vs, dummy if mask is None else mask, dummy if p_table is None else p_table,
        dummy if group_idx is None else group_idx, out, H, SQ, SK, vt.shape[-1], D,
        1 if p_table is None else p_table.shape[0], qmax, out.stride(0), out.stride(1), out.stride(2),
        P_MODE=p_mode, PV_KIND=pv_kind, HAS_MASK=mask is not None, SOFT_FP8_ROUND=soft_fp8_round(q.device),
        DA=hd.da, DB=hd.db, SPLIT=hd.split, CW=hd.cw, **cfg)
    return out


def _check_arch(device: torch.device, pv_format: str) -> None:
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        raise BackendError(f"dtq.quant_attention: the Triton kernel needs sm_80 or newer, got sm_{cap[0]}{cap[1]}")
    if pv_format == "fp8_e4m3" and cap < (8, 9):
        raise BackendError(f"dtq.quant_attention: pv_format='fp8_e4m3' needs FP8 tensor cores (sm_89/90), this GPU "
                           f"is sm_{cap[0]}{cap[1]}: use pv_format='fp16'")


@register_kernel("quant_attention", "triton")
def quant_attention(q, k, v, key_padding_mask, scale, pv_format, smooth_k):
    _check_arch(q.device, pv_format)
    B, _, H, D = q.shape
    hd = head_dims(D)
    mult = (D ** -0.5 if scale is None else scale) * reference.LOG2E
    mean = reference.attention_k_mean(k).reshape(B, H, D).contiguous() if smooth_k else None
    qc, qs = _quant_rows(q, hd, mult=mult, qmax=127.0)
    kc, ks = _quant_rows(k, hd, mult=1.0, qmax=127.0, mean=mean)
    pv_kind = PV_FP8 if pv_format == "fp8_e4m3" else PV_FP16
    vt, vs = _quant_v(v, hd, reference.attention_v_scale(v).reshape(B * H, D), pv_kind, 0.0)
    return _attend(q, hd, qc, qs, kc, ks, vt, vs, key_padding_mask, p_mode=DYNAMIC, pv_kind=pv_kind)


@register_kernel("quant_attention_static", "triton")
def quant_attention_static(q, k, v, key_padding_mask, q_scales, k_scales, v_scales, p_table, group_idx, bits,
                           p_mode, scale):
    _check_arch(q.device, "fp16")
    B, _, H, D = q.shape
    hd = head_dims(D)
    qmax = float(2 ** (bits - 1) - 1)
    mult = (D ** -0.5 if scale is None else scale) * reference.LOG2E
    qc, qs = _quant_rows(q, hd, mult=mult, qmax=qmax, table=q_scales, group_idx=group_idx)
    kc, ks = _quant_rows(k, hd, mult=1.0, qmax=qmax, table=k_scales, group_idx=group_idx)
    # the per-head V scale of the current group, gathered on the device (no host sync)
    v_scale = v_scales.index_select(0, group_idx.long()).reshape(1, H, 1).expand(B, H, D).reshape(B * H, D)
    vt, vs = _quant_v(v, hd, v_scale, PV_INT, qmax)
    return _attend(q, hd, qc, qs, kc, ks, vt, vs, key_padding_mask, pv_kind=PV_INT, qmax=qmax, p_table=p_table,
                   p_mode=UNIFORM if p_mode == "uniform" else TWO_REGION, group_idx=group_idx)


# ------------------------------------------------------------------ offline-compile specs (aot.py)
# QKᵀ must be int8 MMA (wgmma ...s32.s8.s8 on sm_90, mma.sync m16n8k32 ...s8 on sm_80/89); dynamic P·V
# e4m3 MMA on sm_89/90 and f16 mma.sync on sm_80; static P·V f16 (exact integer codes).
# ptxas (Triton 3.6) registers per thread for the configs attn_config returns, 8 warps, no spill anywhere
# (`python -m dtq_kernels.ops.triton.aot --only attn_` reprints them; tests/test_attention.py checks the
# one-arch specs):
#   dynamic f16 P·V (sm_80)   d64: 146   d72 (64+32): 187   d128: 198
#   dynamic fp8 P·V  sm_89    d64: 154   d72: 184   d128: 184;   sm_90  d64: 205   d72: 203   d128: 227
#   static uniform d128: 216 (sm_80), 205 (sm_90); two-region d72: 254 (sm_80/89), 219 (sm_90)
# The sm_90 dynamic PTX holds no cvt.rn.f32.s32 (see _int_to_f32): exp2 and the e4m3 packing are the
# only per-score work on the quarter-rate unit.
_INT8_MMA = {80: ["mma.sync.aligned.m16n8k32", ".s32.s8.s8.s32"], 89: ["mma.sync.aligned.m16n8k32", ".s32.s8.s8.s32"],
             90: ["wgmma.mma_async.sync.aligned", ".s32.s8.s8"]}
_F16_PV = {80: ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"], 89: [".f32.f16.f16.f32"],
           90: ["wgmma.mma_async.sync.aligned", ".f32.f16.f16"]}
_FP8_PV = {89: ["mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"], 90: [".f32.e4m3.e4m3", "cvt.rn.satfinite.e4m3x2.f32"]}


def _expect(*parts: dict) -> dict:
    return {a: [f for p in parts for f in p.get(a, [])] for a in (80, 89, 90)}


def _attn_spec(name: str, d: int, major: int, p_mode: int, pv_kind: int) -> dict:
    sig = {"q_ptr": "*i8", "qs_ptr": "*fp32", "k_ptr": "*i8", "ks_ptr": "*fp32",
           "vt_ptr": "*fp8e4nv" if pv_kind == PV_FP8 else "*fp16", "vs_ptr": "*fp32", "mask_ptr": "*u8",
           "ptab_ptr": "*fp32", "group_ptr": "*i32", "out_ptr": "*bf16", "H": "i32", "SQ": "i32", "SK": "i32",
           "SKP": "i32", "D": "i32", "num_groups": "i32", "qmax": "fp32", "stride_ob": "i32", "stride_os": "i32",
           "stride_oh": "i32"}
    hd = head_dims(d)
    cfg = attn_config(major, hd.cw, p_mode)
    return dict(name=f"{name}_d{d}_sm{major}x", fn=attn_fwd_kernel, signature=sig,
                constexprs=dict(P_MODE=p_mode, PV_KIND=pv_kind, HAS_MASK=True, SOFT_FP8_ROUND=major < 9,
                                DA=hd.da, DB=hd.db, SPLIT=hd.split, CW=hd.cw, BLOCK_M=cfg["BLOCK_M"],
                                BLOCK_N=cfg["BLOCK_N"]),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                expect=_expect(_INT8_MMA, _FP8_PV if pv_kind == PV_FP8 else _F16_PV),
                divisible_by_16=[k for k in sig if k.endswith("_ptr")] + ["SKP", "stride_ob", "stride_os", "stride_oh"])


def _prep_specs(pv_kind: int, major: int = 9) -> list[dict]:
    rows = dict(name="attn_quant_rows", fn=quant_rows_kernel,
                signature={"x_ptr": "*bf16", "codes_ptr": "*i8", "scale_ptr": "*fp32", "mean_ptr": "*fp32",
                           "table_ptr": "*fp32", "group_ptr": "*i32", "H": "i32", "S": "i32", "D": "i32",
                           "stride_b": "i32", "stride_s": "i32", "stride_h": "i32", "mult": "fp32", "qmax": "fp32",
                           "num_groups": "i32"},
                constexprs=dict(STATIC=False, HAS_MEAN=True, BLOCK=PREP_BLOCK, DP=128, CW=96), num_warps=PREP_WARPS,
                expect={})
    v = dict(name=f"attn_quant_v_{'fp8' if pv_kind == PV_FP8 else 'f16'}", fn=quant_v_kernel,
             signature={"v_ptr": "*bf16", "vt_ptr": "*fp8e4nv" if pv_kind == PV_FP8 else "*fp16",
                        "vscale_ptr": "*fp32", "H": "i32", "S": "i32", "SP": "i32", "D": "i32", "stride_b": "i32",
                        "stride_s": "i32", "stride_h": "i32", "qmax": "fp32"},
             constexprs=dict(PV_KIND=pv_kind, SOFT_FP8_ROUND=major < 9, BLOCK=PREP_BLOCK, DP=128, CW=96), num_warps=4,
             expect={90: ["cvt.rn.satfinite.e4m3x2.f32"]} if pv_kind == PV_FP8 and major >= 9 else {})
    return ([rows] if pv_kind != PV_FP8 else []) + [v]


# aot.py compiles every spec for sm_80, 89 and 90 ...
AOT_SPECS = [
    *[_attn_spec("attn_dyn_f16pv", d, 8, DYNAMIC, PV_FP16) for d in (64, 72, 128)],
    _attn_spec("attn_static_uniform", 128, 9, UNIFORM, PV_INT),
    _attn_spec("attn_static_two_region", 72, 8, TWO_REGION, PV_INT),
    *_prep_specs(PV_INT),
]
# ... but sm_80 has no FP8 MMA (Triton refuses fp8e4nv there), and a config tuned for sm_90's wgmma may
# spill on sm_80/89 where it never runs: these specs carry the one arch they are for, and
# tests/test_attention.py compiles them (aot.py has no per-spec arch list).
AOT_SPECS_ONE_ARCH = [
    *[dict(_attn_spec("attn_dyn_fp8pv", d, major, DYNAMIC, PV_FP8), arch=arch)
      for d in (64, 72, 128) for major, arch in ((8, 89), (9, 90))],
    *[dict(spec, arch=arch) for major, arch in ((8, 89), (9, 90)) for spec in _prep_specs(PV_FP8, major)],
    dict(_attn_spec("attn_static_two_region", 72, 9, TWO_REGION, PV_INT), arch=90),
]
