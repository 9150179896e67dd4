"""Quantized-weight GEMMs in Triton: one tiled kernel, int8 / 16-bit / FP8 tensor-core dots, fused fp32
epilogue.

One kernel serves every op; constexpr switches pick the operand kinds, the activation-scale source and
the integer correction, so every variant shares the tiling, program order and masking:
* int8_gemm           a_scale per token [M] or per tensor [1]
* int8_gemm_static    per-tensor scale read on the device as scale_table[group_idx[0]] (no host sync)
* int8_gemm_wzp       asymmetric weights: acc = a·wᵀ − rowsum(a)·zᵀ, exact in int32
* int8_gemm_two_region two accumulations max(q,0)·wᵀ and min(q,0)·wᵀ, scaled by (c_pos, c_neg); a row
                      whose first code is -128 (a non-finite input row) gives NaN
* w4a16_gemm          A_KIND=1: fp16/bf16 activations, int4 codes converted exactly to 16 bits in
                      registers for the 16-bit MMA (fp32 accumulation), no activation scale
* fp8_gemm            A_KIND=2: float8_e4m3 activations and weights on the FP8 MMA (sm_89/sm_90),
                      each K-tile's product promoted into an fp32 accumulator
A NaN activation scale (the quantizers' mark of a non-finite row) gives a NaN output row by arithmetic.
The epilogue is evaluated in fp32 in the reference's order, so results differ from it only by FMA
contraction (the integer part is exact). W6A6 and narrower codes are the same op: codes are smaller.
W4A8: every variant also takes int4 weights packed two per byte (uint8 [N, K/2], formats.pack_int4);
constexpr W_INT4 loads the packed tile (half the weight bytes) and unpacks it in registers to int8
for the same int8 dot, so 4-bit weights are never expanded in memory.
W_GROUPED: per-group weight scales [N, K/G] with BLOCK_K = G. Integer activations: each K-tile's dot
starts from zero and is added to an fp32 accumulator times its group's scales (the per-group rescale
inside the K loop). W4A16: each tile's codes are dequantized (code · scale in fp32, rounded once to x's
16-bit type) before the 16-bit MMA, as the op's contract says (docs/formats.md).
SPLIT_K > 1 (W4A16 and W4A8 at M <= 16): programs also split K; each writes its fp32 partial (scales applied)
to a workspace that splitk_reduce_kernel sums in order, adds the bias to and casts.

Configs are chosen per arch by a fixed heuristic, not @triton.autotune: the choice is deterministic,
costs nothing at the first call and is safe inside CUDA-graph capture. They have NOT been timed on a
GPU yet (benchmarks/bench_gemm.py --sweep times every candidate per shape to settle them).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._dispatch import register_kernel
from .common import INTERPRETING, require_fp8_tensor_cores

# activation-scale sources (constexpr ASCALE); W4A16 has none
PER_ROW, SCALAR, TABLE, NO_ASCALE = 0, 1, 2, 3


@triton.jit
def round_to_bf16(x):
    """Round fp32 to the nearest bf16 value, ties to even, still in fp32 (so the cast after it is
    exact): the interpreter's fp32 -> bf16 cast truncates. Inf and NaN stay Inf and NaN."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def unpack_int4(packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """uint8 [BLOCK_N, BLOCK_K/2] of two's-complement nibbles (formats.pack_int4: element 2j in the low
    nibble, 2j+1 in the high one) -> int8 codes [BLOCK_N, BLOCK_K] in [-8, 7]."""
    b = packed.to(tl.int8, bitcast=True)
    lo = (b << 4) >> 4  # arithmetic shifts on int8 sign-extend the nibble (and keep registers 8-bit)
    hi = b >> 4
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row-tiles share each column of w tiles
    while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def int8_gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, w_zero_ptr, group_ptr,
                     M, N, K, stride_am, stride_wn, stride_om, num_groups,
                     ASCALE: tl.constexpr, TWO_REGION: tl.constexpr, W_ZERO: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, W_INT4: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, A_KIND: tl.constexpr = 0, W_GROUPED: tl.constexpr = False,
                     SPLIT_K: tl.constexpr = 1, DOT_F32: tl.constexpr = False):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT_K == 1:
        k_start = 0
        k_end = K
    else:  # split-K: program (pid, s) sums the K-tiles [s·tiles_per_split, (s+1)·tiles_per_split)
        tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        k_start = tl.program_id(1) * tiles_per_split * BLOCK_K
        k_end = tl.minimum(K, k_start + tiles_per_split * BLOCK_K)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols wrap onto valid ones (their results are never stored), so loads need
    # only the K mask. No contiguity hints on them: a wrapped tile is not contiguous, and a false hint
    # would vectorize the w_scale / bias loads past N. (The a / w loads vectorize along K anyway.)
    ram = rm % M
    rwn = rn % N
    rk = tl.arange(0, BLOCK_K)
    if W_INT4:
        rkw = tl.arange(0, BLOCK_K // 2)  # bytes of a packed weight row
        a_ptrs = a_ptr + ram[:, None] * stride_am + (k_start + rk)[None, :]
        w_ptrs = w_ptr + rwn[:, None] * stride_wn + (k_start // 2 + rkw)[None, :]
    else:
        rkw = rk
        a_ptrs = a_ptr + ram[:, None] * stride_am + (k_start + rk)[None, :]
        w_ptrs = w_ptr + rwn[:, None] * stride_wn + (k_start + rkw)[None, :]

    # Accumulators: int32 for int8 activations (exact), fp32 for 16-bit and FP8 ones. With W_GROUPED
    # each K-tile is one weight group: its dot starts from zero and is added to the fp32 `acc_f`
    # times that group's scale (the per-group rescale inside the K loop).
    if A_KIND == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_GROUPED and A_KIND == 0:
        acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TWO_REGION:
        acc_neg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if W_ZERO:
        rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:  # ragged K: zeros contribute nothing to any accumulation (K is even when W_INT4)
            k_ok = (k0 + rk) < K
            if A_KIND == 0:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            else:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if W_INT4:
                w = tl.load(w_ptrs, mask=((k0 + 2 * rkw) < K)[None, :], other=0)
            elif A_KIND == 2:
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            else:
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        if W_INT4:
            w = unpack_int4(w, BLOCK_N, BLOCK_K)
        if W_GROUPED and A_KIND == 1:  # W4A16 per group: this tile's 16-bit weights, rounded once
            w_s_group = tl.load(w_scale_ptr + rwn * (K // BLOCK_K) + k0 // BLOCK_K)
            w = w.to(tl.float32) * w_s_group[:, None]
            if a.dtype == tl.bfloat16:
                w = round_to_bf16(w)  # exact from here: the interpreter's fp32 -> bf16 cast truncates
            w = w.to(a.dtype)
        if DOT_F32:  # the interpreter's bf16 dot (and int8 -> bf16 cast) is wrong: same values in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        elif A_KIND == 1:  # W4A16: the int4 codes become 16-bit floats exactly, for the 16-bit MMA
            w = w.to(a.dtype)
        if TWO_REGION:
            a_pos = tl.maximum(a, tl.zeros_like(a))  # stays int8 (a literal 0 would promote to int32)
            acc = tl.dot(a_pos, tl.trans(w), acc, out_dtype=tl.int32)
            acc_neg = tl.dot(a - a_pos, tl.trans(w), acc_neg, out_dtype=tl.int32)
        elif W_GROUPED and A_KIND == 0:
            part = tl.dot(a, tl.trans(w), out_dtype=tl.int32).to(tl.float32)
            # loaded after the dot, not once above for both per-group kinds: live across the MMA, the scales
            # spill registers on sm_90 (W4A8-g64, 128x128x64 tile, tests/test_triton_offline.py)
            w_s_group = tl.load(w_scale_ptr + rwn * (K // BLOCK_K) + k0 // BLOCK_K)
            acc_f = acc_f + part * w_s_group[None, :]
        elif A_KIND == 0:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        elif A_KIND == 2:
            # Hopper's FP8 wgmma accumulates in reduced precision: max_num_imprecise_acc=BLOCK_K adds
            # every K-tile's product into the fp32 accumulator (two-level accumulation)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.float32)
        if W_ZERO:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
        a_ptrs += BLOCK_K
        if W_INT4:
            w_ptrs += BLOCK_K // 2
        else:
            w_ptrs += BLOCK_K

    # ---- epilogue, fp32, in the reference's order
    if ASCALE == 2:
        # time-group index read on the device; clamped so a bad index never reads past the table
        # (the op layer's device-side assert reports it)
        g = tl.minimum(tl.maximum(tl.load(group_ptr), 0), num_groups - 1)
    if TWO_REGION:
        w_s = tl.load(w_scale_ptr + rwn)
        c_pos = tl.load(a_scale_ptr + 2 * g)
        c_neg = tl.load(a_scale_ptr + 2 * g + 1)
        out = (acc.to(tl.float32) * c_pos + acc_neg.to(tl.float32) * c_neg) * w_s[None, :]
    else:
        if W_ZERO:
            acc = acc - rowsum[:, None] * tl.load(w_zero_ptr + rwn)[None, :]
        if W_GROUPED and A_KIND == 0:
            out = acc_f
        else:
            out = acc.to(tl.float32)
        if ASCALE == 0:
            out = out * tl.load(a_scale_ptr + ram)[:, None]
        elif ASCALE == 1:
            out = out * tl.load(a_scale_ptr)
        elif ASCALE == 2:
            out = out * tl.load(a_scale_ptr + g)
        if not W_GROUPED:
            out = out * tl.load(w_scale_ptr + rwn)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rwn).to(tl.float32)[None, :]
    if TWO_REGION:
        # quantize_two_region marks a row holding NaN/±Inf by codes -128 (formats.NONFINITE_CODE), never
        # a two-region code: one byte per row read here makes that output row NaN (K >= 1 here)
        marked = tl.load(a_ptr + ram * stride_am) == -128
        out = tl.where(marked[:, None], float("nan"), out)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = round_to_bf16(out)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K > 1:
        out_ptr += tl.program_id(1) * M * N  # each split writes its own fp32 slice
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1


# Candidates per arch and accumulator count, largest tile first (not yet timed on a GPU; see the module
# docstring). Registers per ptxas for sm_80/89/90, none spills (tests/test_triton_offline.py checks):
# sm_90 (wgmma): 128x256x128 with 8 warps holds a 128-register int32 accumulator per thread (232 regs,
# 144 KiB of the 227 KiB shared memory in 3 stages). The two-region kernel keeps two accumulators, so
# its largest tile is 128x128 (254 regs).
# sm_80/89 (mma.sync): BK=64 keeps 3-4 stages well under sm_89's 99 KiB of shared memory; the
# two-region 128x128 tile needs 8 warps (4 warps spill).
CONFIGS = {
    90: (GemmConfig(128, 256, 128, 8, 3), GemmConfig(128, 128, 128, 8, 4), GemmConfig(64, 128, 128, 4, 4)),
    80: (GemmConfig(128, 256, 64, 8, 3), GemmConfig(128, 128, 64, 4, 4), GemmConfig(64, 128, 64, 4, 4)),
}
TWO_REGION_CONFIGS = {
    90: (GemmConfig(128, 128, 128, 8, 4), GemmConfig(64, 128, 64, 4, 4)),
    80: (GemmConfig(128, 128, 64, 8, 4), GemmConfig(64, 128, 64, 4, 4)),
}
# Packed int4 weights: the unpack holds a second copy of the weight tile in registers, and the
# 128x256 tiles (and sm_80/89's 4-warp 128x128) spill; these do not (ptxas: 254/241/195 and
# 218/209/188 registers on sm_80/89/90). With W_ZERO as well the 128x128 tile spills 12-16 bytes on
# sm_80/89, and the two-region kernel is at 255 registers without the unpack: both accept packed
# weights (and are tested on them) but are not register-checked that way, so QuantLinear hands packed
# weights only to int8_gemm / int8_gemm_static.
W4_CONFIGS = {
    90: (GemmConfig(128, 128, 128, 8, 4), GemmConfig(64, 128, 64, 4, 4)),
    80: (GemmConfig(128, 128, 128, 8, 4), GemmConfig(64, 128, 64, 4, 4)),
}
# Per-group weights: one K-tile is one group (BLOCK_K = group size), whose partial product is rescaled
# into an fp32 accumulator: a second [BM, BN] accumulator. ptxas, no spills: group 64 at 128x128 holds
# 255/213/210 registers on sm_90/80/89; group 128's 128x128 (242/240 on sm_80/89) spills on sm_90, so
# sm_90 takes 64x256 (188 registers) there.
GROUPED_W4_CONFIGS = {
    64: {90: (GemmConfig(128, 128, 64, 8, 4), GemmConfig(64, 128, 64, 4, 4)),
         80: (GemmConfig(128, 128, 64, 8, 4), GemmConfig(64, 128, 64, 4, 4))},
    128: {90: (GemmConfig(64, 256, 128, 8, 3), GemmConfig(64, 128, 128, 4, 4)),
          80: (GemmConfig(128, 128, 128, 8, 4), GemmConfig(64, 128, 128, 4, 4))},
}
# W4A16 (16-bit activations x int4 weights made 16-bit in registers), keyed by group size (None: per
# channel), the same on every arch: at M <= 16 the GEMM is a weight stream (4x fewer bytes than bf16),
# so the 16-row tile with narrow columns and split-K puts every SM on it; larger M gets wider tiles.
# The 16-bit tiles take twice the registers of int8 ones, and per-group ones a second accumulator: the
# grouped kernels stay at 64-row tiles (128x128 spills 28 bytes on sm_90 at group 64, and everywhere at
# group 128), and group 64's 16-row tile needs 2 warps (4 spill 8 bytes on sm_90).
W4A16_CONFIGS = {
    None: (GemmConfig(128, 128, 64, 8, 3), GemmConfig(64, 128, 64, 4, 4), GemmConfig(16, 64, 128, 4, 4)),
    64: (GemmConfig(64, 256, 64, 8, 3), GemmConfig(64, 128, 64, 4, 4), GemmConfig(16, 64, 64, 2, 4)),
    128: (GemmConfig(64, 128, 128, 8, 3), GemmConfig(64, 64, 128, 4, 4), GemmConfig(16, 64, 128, 4, 4)),
}
# W4A8 at M <= 16 (packed int4 weights, per channel or per group): the same weight stream as W4A16, so
# the same 16-row tile (mma.sync on every arch: wgmma needs 64 rows) and split-K.
W4_SMALL_M_CONFIGS = {None: GemmConfig(16, 64, 128, 4, 4), 64: GemmConfig(16, 64, 64, 4, 4),
                      128: GemmConfig(16, 64, 128, 4, 4)}
# FP8 E4M3 x E4M3 (sm_89 / sm_90 only): the int8 tiles, except sm_90's 128x256, which spills with the
# two-level accumulation (max_num_imprecise_acc keeps a second accumulator).
FP8_CONFIGS = {90: CONFIGS[90][1:], 80: CONFIGS[80]}
# The interpreter pays per program and per loop iteration: few, large tiles (K-tile >= 32 as on GPUs).
INTERPRETER_CONFIG = GemmConfig(128, 128, 128, 4, 1)
MAX_SPLIT_K = 8

# kinds of launch, each with its config table
INT8, TWO_REGION_KIND, W4, W4A16, FP8 = "int8", "two_region", "w4", "w4a16", "fp8"


def config_candidates(kind: str, major: int, group: int | None = None) -> tuple[GemmConfig, ...]:
    """The tile configs a launch of `kind` may use on an arch of this major version, largest first."""
    arch = 90 if major == 9 else 80
    if kind == W4A16:
        return W4A16_CONFIGS[group]
    if group is not None:
        return GROUPED_W4_CONFIGS[group][arch]
    return {INT8: CONFIGS, TWO_REGION_KIND: TWO_REGION_CONFIGS, W4: W4_CONFIGS, FP8: FP8_CONFIGS}[kind][arch]


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(c: GemmConfig, M: int, N: int, K: int, sms: int) -> GemmConfig:
    """Split K over more programs when the output tiles alone leave SMs idle (tiny M), keeping at
    least two K-tiles per split."""
    tiles = triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n)
    k_tiles = triton.cdiv(K, c.block_k)
    split = 1
    while split < MAX_SPLIT_K and tiles * split < sms and k_tiles >= 4 * split:
        split *= 2
    return c._replace(split_k=split)


def choose_config(device: torch.device, M: int, N: int, two_region: bool, w_int4: bool = False, *,
                  kind: str | None = None, K: int = 0, group: int | None = None) -> GemmConfig:
    """The largest candidate tile that still gives every SM a program; small GEMMs (DiT-XL/2 at 256 px,
    M=512) fall through to smaller tiles so more SMs work. W4A16 and W4A8 at M <= 16 take a 16-row tile
    and split-K."""
    kind = kind or (TWO_REGION_KIND if two_region else W4 if w_int4 else INT8)
    if INTERPRETING or device.type != "cuda":
        return INTERPRETER_CONFIG if group is None else INTERPRETER_CONFIG._replace(block_k=group)
    candidates = config_candidates(kind, torch.cuda.get_device_capability(device)[0], group)
    sms = device_sms(device)
    if kind == W4A16 and M <= 16:
        return _split_k(candidates[-1], M, N, K, sms)
    if kind == W4 and M <= 16:
        return _split_k(W4_SMALL_M_CONFIGS[group], M, N, K, sms)
    return first_filling(candidates, M, N, sms)


def first_filling(candidates, M: int, N: int, sms: int) -> GemmConfig:
    """The first (largest) candidate whose tile grid gives every SM a program, else the last."""
    for c in candidates:
        if triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n) >= sms:
            return c
    return candidates[-1]


def device_sms(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


# activation kinds (constexpr A_KIND) and the extra activation-scale source of W4A16
A_INT8, A_16BIT, A_FP8 = 0, 1, 2
_A_KIND = {torch.int8: A_INT8, torch.float16: A_16BIT, torch.bfloat16: A_16BIT, torch.float8_e4m3fn: A_FP8}


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """out = Σ_s ws[s] (+ bias), the split-K partials summed in order, cast once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = round_to_bf16(acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def launch(a, w, w_scale, bias, out_dtype, *, a_scale, ascale, group_idx=None, w_zero=None,
           two_region=False, config: GemmConfig | None = None) -> torch.Tensor:
    """Run the kernel; `config` overrides the heuristic (the benchmark's sweep uses it).

    a: int8, fp16/bf16 (W4A16) or float8_e4m3fn codes [M, K]; w: int8 / float8 [N, K] or packed int4
    uint8 [N, K/2]; w_scale [N] or [N, K / group] (per-group weights, group = the K-tile)."""
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_((bias.float() if bias is not None else torch.zeros(N, device=a.device))
                         .expand(M, N))
    w_int4 = w.dtype == torch.uint8
    a_kind = _A_KIND[a.dtype]
    group = K // w_scale.shape[1] if w_scale.dim() == 2 else None
    kind = (TWO_REGION_KIND if two_region else W4A16 if a_kind == A_16BIT else FP8 if a_kind == A_FP8
            else W4 if w_int4 else INT8)
    c = config or choose_config(a.device, M, N, two_region, w_int4, kind=kind, K=K, group=group)
    if group is not None and c.block_k != group:
        raise ValueError(f"per-group weights need BLOCK_K == group size {group}, got config {c}")
    split = c.split_k
    target = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n), split)
    dummy = w_scale  # pointer for absent optional operands; never read (constexpr flags)
    int8_gemm_kernel[grid](
        a, w, target, dummy if a_scale is None else a_scale, w_scale, dummy if bias is None else bias,
        dummy if w_zero is None else w_zero, dummy if group_idx is None else group_idx, M, N, K,
        a.stride(0), w.stride(0), N if split > 1 else out.stride(0),
        1 if a_scale is None else a_scale.shape[0],  # number of time groups when ASCALE reads a table
        ASCALE=ascale, TWO_REGION=two_region, W_ZERO=w_zero is not None, HAS_BIAS=bias is not None and split == 1,
        EVEN_K=K % c.block_k == 0, W_INT4=w_int4,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=c.group_m, A_KIND=a_kind, W_GROUPED=group is not None, SPLIT_K=split,
        DOT_F32=INTERPRETING and a_kind == A_16BIT, num_warps=c.num_warps, num_stages=c.num_stages)
    if split > 1:
        block = 1024
        splitk_reduce_kernel[(triton.cdiv(M * N, block),)](target, w_scale if bias is None else bias, out, M * N, N,
                                                          SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def _ascale_kind(a, a_scale) -> int:
    return PER_ROW if a_scale.shape[0] == a.shape[0] and a.shape[0] != 1 else SCALAR


@register_kernel("int8_gemm", "triton")
def int8_gemm(a, a_scale, w, w_scale, bias, out_dtype):
    return launch(a, w, w_scale, bias, out_dtype, a_scale=a_scale, ascale=_ascale_kind(a, a_scale))


@register_kernel("int8_gemm_static", "triton")
def int8_gemm_static(a, scale_table, group_idx, w, w_scale, bias, out_dtype):
    return launch(a, w, w_scale, bias, out_dtype, a_scale=scale_table, ascale=TABLE, group_idx=group_idx)


@register_kernel("int8_gemm_wzp", "triton")
def int8_gemm_wzp(a, a_scale, w, w_scale, w_zero, bias, out_dtype):
    return launch(a, w, w_scale, bias, out_dtype, a_scale=a_scale, ascale=_ascale_kind(a, a_scale), w_zero=w_zero)


@register_kernel("int8_gemm_two_region", "triton")
def int8_gemm_two_region(a, coef_table, group_idx, w, w_scale, bias, out_dtype):
    return launch(a, w, w_scale, bias, out_dtype, a_scale=coef_table, ascale=TABLE, group_idx=group_idx,
                  two_region=True)


@register_kernel("w4a16_gemm", "triton")
def w4a16_gemm(x, w, w_scale, bias, out_dtype):
    return launch(x, w, w_scale, bias, out_dtype, a_scale=None, ascale=NO_ASCALE)


@register_kernel("fp8_gemm", "triton")
def fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype):
    require_fp8_tensor_cores(a.device, "fp8_gemm")
    return launch(a, w, w_scale, bias, out_dtype, a_scale=a_scale, ascale=_ascale_kind(a, a_scale))


# ------------------------------------------------------------------ offline-compile specs (aot.py)
# Every spec is compiled for sm_80, sm_89 and sm_90 unless it names its archs; the int8 dots must
# become wgmma on sm_90 and mma.sync on sm_80/89, the FP8 ones e4m3 wgmma / mma.sync (sm_89/90 only:
# sm_80 has no FP8 MMA), the W4A16 ones 16-bit MMA. The configs named are the ones choose_config returns.
_MMA = {80: ["mma.sync"], 89: ["mma.sync"], 90: ["wgmma"]}
_F16_MMA = {80: ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"],
            89: ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"], 90: [".f32.bf16.bf16"]}
_MMA_SMALL = {a: ["mma.sync.aligned.m16n8k32", ".s32.s8.s8.s32"] for a in (80, 89, 90)}
_F16_MMA_SMALL = {a: ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"] for a in (80, 89, 90)}
_FP8_MMA = {89: ["mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"],
            90: ["wgmma.mma_async.sync.aligned", ".f32.e4m3.e4m3"]}


def _aot_spec(name: str, cfg: GemmConfig, expect=None, a_type="*i8", **flags) -> dict:
    sig = {"a_ptr": a_type, "w_ptr": "*i8", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
           "bias_ptr": "*fp32", "w_zero_ptr": "*i32", "group_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_wn": "i32", "stride_om": "i32", "num_groups": "i32"}
    if flags.get("W_INT4"):
        sig["w_ptr"] = "*u8"
    if a_type == "*fp8e4nv":
        sig["w_ptr"] = "*fp8e4nv"
    if flags.get("SPLIT_K", 1) > 1:
        sig["out_ptr"] = "*fp32"
    constexprs = {"ASCALE": PER_ROW, "TWO_REGION": False, "W_ZERO": False, "HAS_BIAS": True, "EVEN_K": False,
                  "W_INT4": False, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                  "GROUP_M": cfg.group_m, "A_KIND": A_INT8, "W_GROUPED": False, "SPLIT_K": 1, "DOT_F32": False,
                  **flags}
    tag = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
    return dict(name=f"{name}_{tag}", fn=int8_gemm_kernel, signature=sig, constexprs=constexprs,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect=expect or _MMA,
                # as the JIT specializes DiT shapes (K, N multiples of 16; torch's aligned pointers)
                divisible_by_16=[k for k in sig if k.endswith("_ptr") or k in ("N", "K") or k.startswith("stride")])


def _unique(tables: dict) -> list[GemmConfig]:
    return list(dict.fromkeys(c for table in tables.values() for c in table))


AOT_SPECS = [
    *[_aot_spec("int8_gemm", c) for c in _unique(CONFIGS)],
    *[_aot_spec("int8_gemm_two_region", c, ASCALE=TABLE, TWO_REGION=True) for c in _unique(TWO_REGION_CONFIGS)],
    _aot_spec("int8_gemm_static", CONFIGS[90][0], ASCALE=TABLE),
    _aot_spec("int8_gemm_wzp", CONFIGS[90][0], W_ZERO=True),
    _aot_spec("int8_gemm_wzp", CONFIGS[80][0], W_ZERO=True),
    # W4A8: packed int4 weights (ViDiT-Q W4A8 runs the static variant)
    *[_aot_spec("int8_gemm_static_w4", c, ASCALE=TABLE, W_INT4=True) for c in _unique(W4_CONFIGS)],
    _aot_spec("int8_gemm_w4", W4_CONFIGS[90][0], W_INT4=True),
    # per-group W4A8 (groups 64 and 128: BLOCK_K = group, EVEN_K by construction)
    *[dict(_aot_spec(f"int8_gemm_w4_g{g}", c, W_INT4=True, W_GROUPED=True, EVEN_K=True),
           archs=tuple(a for a in (80, 89, 90) if c in table[90 if a == 90 else 80]))
      for g, table in GROUPED_W4_CONFIGS.items() for c in _unique(table)],
    # W4A16: bf16 activations, per-channel and per-group packed int4 weights, split-K at tiny M
    *[_aot_spec(f"w4a16_gemm_g{g}" if g else "w4a16_gemm", c, _F16_MMA if c.block_m >= 64 else _F16_MMA_SMALL,
                a_type="*bf16", W_INT4=True, A_KIND=A_16BIT, ASCALE=NO_ASCALE, W_GROUPED=g is not None,
                EVEN_K=g is not None) for g, table in W4A16_CONFIGS.items() for c in table],
    # W4A8 at M <= 16: 16-row tiles, split-K
    *[_aot_spec(f"int8_gemm_w4_small_g{g}" if g else "int8_gemm_w4_small", c, _MMA_SMALL, W_INT4=True,
                W_GROUPED=g is not None, EVEN_K=g is not None) for g, c in W4_SMALL_M_CONFIGS.items()],
    _aot_spec("int8_gemm_w4_small_splitk4_g128", W4_SMALL_M_CONFIGS[128], _MMA_SMALL, W_INT4=True, W_GROUPED=True,
              EVEN_K=True, SPLIT_K=4, HAS_BIAS=False),
    _aot_spec("w4a16_gemm_splitk4_g128", W4A16_CONFIGS[128][-1], _F16_MMA_SMALL, a_type="*bf16",
              W_INT4=True, A_KIND=A_16BIT, ASCALE=NO_ASCALE, W_GROUPED=True, EVEN_K=True, SPLIT_K=4, HAS_BIAS=False),
    dict(name="splitk_reduce", fn=splitk_reduce_kernel, num_warps=4,
         signature={"ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "MN": "i32", "N": "i32"},
         constexprs={"SPLIT_K": 4, "HAS_BIAS": True, "BLOCK": 1024}, expect={}),
    # FP8 W8A8 (sm_89 / sm_90 only)
    *[dict(_aot_spec("fp8_gemm", c, _FP8_MMA, a_type="*fp8e4nv", A_KIND=A_FP8), archs=(arch,))
      for arch in (89, 90) for c in FP8_CONFIGS[90 if arch == 90 else 80]],
]
