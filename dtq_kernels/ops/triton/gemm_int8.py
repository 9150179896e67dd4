"""INT8 GEMM family in Triton: int8 x int8 -> int32 tensor-core dots with a fused fp32 epilogue.

One kernel serves the four ops; constexpr switches pick the activation-scale source and the integer
correction, so every variant shares the tiling, program order and masking:
* int8_gemm           a_scale per token [M] or per tensor [1]
* int8_gemm_static    per-tensor scale read on the device as scale_table[group_idx[0]] (no host sync)
* int8_gemm_wzp       asymmetric weights: acc = a·wᵀ − rowsum(a)·zᵀ, exact in int32
* int8_gemm_two_region two accumulations max(q,0)·wᵀ and min(q,0)·wᵀ, scaled by (c_pos, c_neg); a row
                      whose first code is -128 (a non-finite input row) gives NaN
A NaN activation scale (the quantizers' mark of a non-finite row) gives a NaN output row by arithmetic.
The epilogue is evaluated in fp32 in the reference's order, so results differ from it only by FMA
contraction (the integer part is exact). W6A6 and narrower codes are the same op: codes are smaller.
W4A8: every variant also takes int4 weights packed two per byte (uint8 [N, K/2], formats.pack_int4);
constexpr W_INT4 loads the packed tile (half the weight bytes) and unpacks it in registers to int8
for the same int8 dot, so 4-bit weights are never expanded in memory.

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
from .common import INTERPRETING

# activation-scale sources (constexpr ASCALE)
PER_ROW, SCALAR, TABLE = 0, 1, 2


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
def int8_gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, w_zero_ptr, group_ptr,
                     M, N, K, stride_am, stride_wn, stride_om, num_groups,
                     ASCALE: tl.constexpr, TWO_REGION: tl.constexpr, W_ZERO: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, W_INT4: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    # Grouped program order: GROUP_M row-tiles share each column of w tiles while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

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
    else:
        rkw = rk
    a_ptrs = a_ptr + ram[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rwn[:, None] * stride_wn + rkw[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if TWO_REGION:
        acc_neg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if W_ZERO:
        rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:  # ragged K: zeros contribute nothing to any accumulation (K is even when W_INT4)
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            if W_INT4:
                w = tl.load(w_ptrs, mask=((k0 + 2 * rkw) < K)[None, :], other=0)
            else:
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        if W_INT4:
            w = unpack_int4(w, BLOCK_N, BLOCK_K)
        if TWO_REGION:
            a_pos = tl.maximum(a, tl.zeros_like(a))  # stays int8 (a literal 0 would promote to int32)
            acc = tl.dot(a_pos, tl.trans(w), acc, out_dtype=tl.int32)
            acc_neg = tl.dot(a - a_pos, tl.trans(w), acc_neg, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        if W_ZERO:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
        a_ptrs += BLOCK_K
        if W_INT4:
            w_ptrs += BLOCK_K // 2
        else:
            w_ptrs += BLOCK_K

    # ---- epilogue, fp32, in the reference's order
    w_s = tl.load(w_scale_ptr + rwn)
    if ASCALE == 2:
        # time-group index read on the device; clamped so a bad index never reads past the table
        # (the op layer's device-side assert reports it)
        g = tl.minimum(tl.maximum(tl.load(group_ptr), 0), num_groups - 1)
    if TWO_REGION:
        c_pos = tl.load(a_scale_ptr + 2 * g)
        c_neg = tl.load(a_scale_ptr + 2 * g + 1)
        out = (acc.to(tl.float32) * c_pos + acc_neg.to(tl.float32) * c_neg) * w_s[None, :]
    else:
        if ASCALE == 0:
            a_s = tl.load(a_scale_ptr + ram)[:, None]
        elif ASCALE == 1:
            a_s = tl.load(a_scale_ptr)
        else:
            a_s = tl.load(a_scale_ptr + g)
        if W_ZERO:
            acc = acc - rowsum[:, None] * tl.load(w_zero_ptr + rwn)[None, :]
        out = acc.to(tl.float32) * a_s * w_s[None, :]
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
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


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
# The interpreter pays per program and per loop iteration: few, large tiles (K-tile >= 32 as on GPUs).
INTERPRETER_CONFIG = GemmConfig(128, 128, 128, 4, 1)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_config(device: torch.device, M: int, N: int, two_region: bool, w_int4: bool = False) -> GemmConfig:
    """The largest candidate tile that still gives every SM a program; small GEMMs (DiT-XL/2 at 256 px,
    M=512) fall through to smaller tiles so more SMs work."""
    if INTERPRETING or device.type != "cuda":
        return INTERPRETER_CONFIG
    major, _ = torch.cuda.get_device_capability(device)
    table = TWO_REGION_CONFIGS if two_region else W4_CONFIGS if w_int4 else CONFIGS
    candidates = table[90 if major == 9 else 80]
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    for c in candidates:
        if triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n) >= sms:
            return c
    return candidates[-1]


def launch(a, w, w_scale, bias, out_dtype, *, a_scale, ascale, group_idx=None, w_zero=None,
           two_region=False, config: GemmConfig | None = None) -> torch.Tensor:
    """Run the kernel; `config` overrides the heuristic (the benchmark's sweep uses it)."""
    M, K = a.shape  # w is int8 [N, K] or packed int4 uint8 [N, K/2]
    N = w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_((bias.float() if bias is not None else torch.zeros(N, device=a.device))
                         .expand(M, N))
    w_int4 = w.dtype == torch.uint8
    c = config or choose_config(a.device, M, N, two_region, w_int4)
    grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)
    dummy = w_scale  # pointer for absent optional operands; never read (constexpr flags)
    int8_gemm_kernel[grid](
        a, w, out, a_scale, w_scale, dummy if bias is None else bias, dummy if w_zero is None else w_zero,
        dummy if group_idx is None else group_idx, M, N, K, a.stride(0), w.stride(0), out.stride(0),
        a_scale.shape[0],  # number of time groups when ASCALE reads a table
        ASCALE=ascale, TWO_REGION=two_region, W_ZERO=w_zero is not None, HAS_BIAS=bias is not None,
        EVEN_K=K % c.block_k == 0, W_INT4=w_int4,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=c.group_m, num_warps=c.num_warps, num_stages=c.num_stages)
    return out


@register_kernel("int8_gemm", "triton")
def int8_gemm(a, a_scale, w, w_scale, bias, out_dtype):
    ascale = PER_ROW if a_scale.shape[0] == a.shape[0] and a.shape[0] != 1 else SCALAR
    return launch(a, w, w_scale, bias, out_dtype, a_scale=a_scale, ascale=ascale)


@register_kernel("int8_gemm_static", "triton")
def int8_gemm_static(a, scale_table, group_idx, w, w_scale, bias, out_dtype):
    return launch(a, w, w_scale, bias, out_dtype, a_scale=scale_table, ascale=TABLE, group_idx=group_idx)


@register_kernel("int8_gemm_wzp", "triton")
def int8_gemm_wzp(a, a_scale, w, w_scale, w_zero, bias, out_dtype):
    ascale = PER_ROW if a_scale.shape[0] == a.shape[0] and a.shape[0] != 1 else SCALAR
    return launch(a, w, w_scale, bias, out_dtype, a_scale=a_scale, ascale=ascale, w_zero=w_zero)


@register_kernel("int8_gemm_two_region", "triton")
def int8_gemm_two_region(a, coef_table, group_idx, w, w_scale, bias, out_dtype):
    return launch(a, w, w_scale, bias, out_dtype, a_scale=coef_table, ascale=TABLE, group_idx=group_idx,
                  two_region=True)


# ------------------------------------------------------------------ offline-compile specs (aot.py)
# Every spec is compiled for sm_80, sm_89 and sm_90; the int8 dots must become wgmma on sm_90 and
# mma.sync on sm_80/89. The configs named are the ones choose_config can return.
_MMA = {80: ["mma.sync"], 89: ["mma.sync"], 90: ["wgmma"]}


def _aot_spec(name: str, cfg: GemmConfig, **flags) -> dict:
    sig = {"a_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
           "bias_ptr": "*fp32", "w_zero_ptr": "*i32", "group_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_wn": "i32", "stride_om": "i32", "num_groups": "i32"}
    if flags.get("W_INT4"):
        sig["w_ptr"] = "*u8"
    constexprs = {"ASCALE": PER_ROW, "TWO_REGION": False, "W_ZERO": False, "HAS_BIAS": True, "EVEN_K": False,
                  "W_INT4": False,
                  "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
                  **flags}
    tag = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
    return dict(name=f"{name}_{tag}", fn=int8_gemm_kernel, signature=sig, constexprs=constexprs,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect=_MMA,
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
]
