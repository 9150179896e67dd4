"""W4A4 GEMM in Triton: 4-bit codes (FP4 E2M1/E1M2/E3M0 or INT4) decoded exactly to int8 in
registers, int8 x int8 -> int32 tensor-core dots per block of K, fp32 rescale of every block's partial
sum (the semantics of w4a4_ops / reference.w4a4_gemm).

GPUs before Blackwell (sm_80/89/90) have no 4-bit MMA. Every nibble is decoded through its operand's
16-entry table (formats.code4_int_table: value × factor, exact in int8), passed as four int32 words of
packed bytes (kernel arguments, neither constexprs nor specialized), so one compiled kernel (per tile
config and group size) serves every pair of formats: HQ-DiT's per-layer format choice costs no
recompile. The decode factors (E2M1 ×2, E1M2/E3M0 ×4) become one power-of-two multiply of the fp32
result, exact. E3M0 ×4 tops out at 64, inside int8, so there is
no need for the FP8 MMA (whose throughput on sm_89/90 equals int8's).

Blocks along K: the K-tile is max(group_size, 32) (an int8 MMA K-step is 32). A block of 32..128 is
one K-tile, a dot from zero; group 16 (NVFP4) runs two dots per K-tile, each on the tile with the other
block's activation codes zeroed, at twice the MMA work. After each block's dot the int32 partial sum is
converted and accumulated in fp32 with that block's a_scale · w_scale.

Cost model (datasheet rates; the measured rates are in the last sentence below). An H100 SM does ~8.5K int8 MMA ops per clock
but only 64 int32 and 128 fp32 ALU ops. Per K-tile of a 128x64 tile at group 32, the MMA is
2·128·64·32 = 524K ops (~61 clocks); decoding (128 + 64)·32 codes at ~12 int32 ops each (nibble split,
table select, shift, sign extension, repack) is ~74K ops (~1150 clocks), and the rescale of the
128x64 partial sum (convert, multiply, add) ~32K fp32 ops (~250 clocks). So this kernel is bound by the
decode, ~20x the MMA time: expect W4A4 well BELOW bf16 cuBLAS speed on sm_90 until the decode changes;
its gains today are 4-bit weight and activation memory. A byte-permute decode is built beside it
(PRMT_DECODE_ASM: PTX prmt through the same 16-entry table, ~3 instructions per code instead of
~12), the default on CUDA since it was measured faster (PRMT_DECODE_DEFAULT); with it the per-block
rescale bounds group 32 (~4x the MMA) while group 128 is closer to balanced. benchmarks/bench_gemm.py
measures both. Measured on an H200: 57-100 TOP/s, 7-13x slower than bf16 cuBLAS at the Flux shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import formats
from .._dispatch import register_kernel
from .common import INTERPRETING
from .gemm_int8 import GemmConfig, _unique, device_sms, first_filling, grouped_tile, round_to_bf16


@triton.jit
def decode_nibble(n, lut0, lut1, lut2, lut3):
    """int32 nibbles n in 0..15 -> int32 table[n], the table packed little-endian into four int32 words
    (entry n is byte n % 4 of word n // 4), sign-extended from its byte."""
    word = tl.where(n < 8, tl.where(n < 4, lut0, lut1), tl.where(n < 12, lut2, lut3))
    return ((word >> ((n & 3) * 8)) << 24) >> 24


# The same table lookup with byte permutes, four codes at a time (GPU only: the interpreter runs no PTX).
# Per 32-bit register of 4 packed bytes: gather the 3-bit indices of the low (then high) nibbles into a
# prmt selector, look up entries 0-7 in (lut0, lut1) and 8-15 in (lut2, lut3), and pick per byte by the
# nibble's bit 3 (lop3 0xE4 = (l1 & m) | (l0 & ~m)). prmt reads only the selector's low 16 bits.
# Operands: $0 lo / $1 hi (4 int8 each), $2 the 4 packed bytes, $3-$6 lut0, $7-$10 lut1, $11-$14 lut2,
# $15-$18 lut3 (a 32-bit argument takes one register per element of the pack).
_PRMT_HALF = """
    and.b32 t, {src}, 0x07070707;
    shr.b32 s, t, 4;
    or.b32 t, t, s;
    and.b32 t, t, 0x00FF00FF;
    shr.b32 s, t, 8;
    or.b32 t, t, s;
    prmt.b32 l0, $3, $7, t;
    prmt.b32 l1, $11, $15, t;
    shr.b32 m, $2, {bit3};
    and.b32 m, m, 0x01010101;
    mul.lo.u32 m, m, 255;
    lop3.b32 {dst}, l1, l0, m, 0xE4;"""
PRMT_DECODE_ASM = tl.constexpr("{\n    .reg .b32 t, s, l0, l1, m, h;"
                                + _PRMT_HALF.format(src="$2", bit3=3, dst="$0")
                                + "\n    shr.b32 h, $2, 4;"
                                + _PRMT_HALF.format(src="h", bit3=7, dst="$1") + "\n}")


@triton.jit
def decode_codes(packed, lut0, lut1, lut2, lut3, ROWS: tl.constexpr, COLS: tl.constexpr, PRMT: tl.constexpr):
    """uint8 [ROWS, COLS/2] of two codes per byte (element 2j in the low nibble) -> int8 [ROWS, COLS]."""
    if PRMT:
        zero = tl.zeros_like(packed.to(tl.int32))
        lo, hi = tl.inline_asm_elementwise(PRMT_DECODE_ASM, "=r,=r" + ",r" * 17,
                                           [packed, lut0 + zero, lut1 + zero, lut2 + zero, lut3 + zero],
                                           dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        b = packed.to(tl.int32)
        lo = decode_nibble(b & 15, lut0, lut1, lut2, lut3).to(tl.int8)
        hi = decode_nibble(b >> 4, lut0, lut1, lut2, lut3).to(tl.int8)
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))


# the decode tables are data: never specialized on their values (a word divisible by 16, or equal to 1,
# would otherwise compile a variant of its own per format)
_LUT_ARGS = [f"{o}_lut{i}" for o in "aw" for i in range(4)]


@triton.jit(do_not_specialize=_LUT_ARGS)
def w4a4_gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                     M, N, K, stride_am, stride_wn, stride_om, stride_asm, stride_wsn,
                     a_lut0, a_lut1, a_lut2, a_lut3, w_lut0, w_lut1, w_lut2, w_lut3, out_mult,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, PRMT: tl.constexpr = False):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows/cols wrap onto valid ones and are never stored (as in gemm_int8)
    ram = rm % M
    rwn = rn % N
    rb = tl.arange(0, BLOCK_K // 2)  # bytes of a packed row tile
    a_ptrs = a_ptr + ram[:, None] * stride_am + rb[None, :]
    w_ptrs = w_ptr + rwn[:, None] * stride_wn + rb[None, :]
    num_groups = K // GROUP

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:  # K % BLOCK_K == group 16: the last tile's second block is zero codes with zero scales
            b_ok = ((k0 + 2 * rb) < K)[None, :]
            a = tl.load(a_ptrs, mask=b_ok, other=0)
            w = tl.load(w_ptrs, mask=b_ok, other=0)
        a = decode_codes(a, a_lut0, a_lut1, a_lut2, a_lut3, BLOCK_M, BLOCK_K, PRMT)
        w = decode_codes(w, w_lut0, w_lut1, w_lut2, w_lut3, BLOCK_N, BLOCK_K, PRMT)
        for s in tl.static_range(BLOCK_K // GROUP):  # blocks per K-tile: 2 for group 16, else 1
            if BLOCK_K == GROUP:
                part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
            else:
                in_block = (tl.arange(0, BLOCK_K) // GROUP) == s
                part = tl.dot(tl.where(in_block[None, :], a, tl.zeros_like(a)), tl.trans(w), out_dtype=tl.int32)
            g = k0 // GROUP + s
            g_ok = g < num_groups
            sa = tl.load(a_scale_ptr + ram * stride_asm + g, mask=g_ok, other=0.0)
            sw = tl.load(w_scale_ptr + rwn * stride_wsn + g, mask=g_ok, other=0.0)
            acc = acc + part.to(tl.float32) * (sa[:, None] * sw[None, :])
        a_ptrs += BLOCK_K // 2
        w_ptrs += BLOCK_K // 2

    out = acc * out_mult  # 1 / (factor_a · factor_w): a power of two
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rwn).to(tl.float32)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = round_to_bf16(out)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def lut_words(fmt: str) -> tuple[int, int, int, int]:
    """formats.code4_int_table(fmt) packed into four signed int32 words (decode_nibble's layout)."""
    table = [int(v) & 0xFF for v in formats.code4_int_table(fmt)[0]]
    words = [sum(table[4 * j + i] << (8 * i) for i in range(4)) for j in range(4)]
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in words)


def block_k(group_size: int) -> int:
    return max(32, group_size)


# (BLOCK_M, BLOCK_N, warps, stages) per arch; block_k here is the largest K-tile (group 128), the launch
# uses block_k(group_size). Not timed on a GPU (bench_gemm.py --sweep). Both operand tiles are decoded in
# registers beside an fp32 accumulator and an int32 partial sum. ptxas on sm_80/89/90 (no spills, checked
# by tests/test_triton_offline.py at groups 32 and 128): 128x64 and 64x128 with 4 warps take 183-255
# registers. 128x128 with 8 warps fits sm_80/89 (216-254) but spills 24-172 bytes on sm_90, so it is not a
# candidate anywhere. Group 16 keeps a masked copy of the activation tile for its second dot: 128-row
# tiles spill there, 64x128 with 4 warps does not (228-255).
CONFIGS = {
    90: (GemmConfig(128, 64, 128, 4, 3), GemmConfig(64, 128, 128, 4, 3)),
    80: (GemmConfig(128, 64, 128, 4, 3), GemmConfig(64, 128, 128, 4, 3)),
}
GROUP16_CONFIGS = {90: (GemmConfig(64, 128, 32, 4, 3),), 80: (GemmConfig(64, 128, 32, 4, 3),)}
INTERPRETER_CONFIG = GemmConfig(128, 128, 128, 4, 1)


def choose_config(device: torch.device, M: int, N: int, group_size: int) -> GemmConfig:
    if INTERPRETING or device.type != "cuda":
        c = INTERPRETER_CONFIG
    else:
        table = GROUP16_CONFIGS if group_size == 16 else CONFIGS
        c = first_filling(table[90 if torch.cuda.get_device_capability(device)[0] == 9 else 80], M, N,
                          device_sms(device))
    return c._replace(block_k=block_k(group_size))


# The byte-permute decode (PRMT_DECODE_ASM) is the default on CUDA since its first GPU run (H200, 2026-12-04,
# benchmarks/results/2026-12-04_NVIDIA_H200): tests/test_w4a4.py's GPU tests pass with both decodes, and
# bench_gemm timed it faster at 20 of 21 shapes, 1.7x at every compute-bound one (Flux, M = 4096: 3.08 ms vs
# 5.28 ms at 4096x3072x12288), though both stay far below bf16 (decode-bound, as the cost model above says).
PRMT_DECODE_DEFAULT = True


def launch(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype,
           config: GemmConfig | None = None, prmt: bool | None = None) -> torch.Tensor:
    """Run the kernel; `config` overrides the heuristic (its block_k is replaced by the group's K-tile),
    `prmt` the choice of decode (CUDA only)."""
    prmt = PRMT_DECODE_DEFAULT and a.device.type == "cuda" if prmt is None else prmt
    if prmt and (INTERPRETING or a.device.type != "cuda"):
        raise ValueError("the prmt decode is inline PTX: it runs on CUDA tensors only, not in the interpreter")
    M, N, K = a.shape[0], w.shape[0], 2 * a.shape[1]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_((bias.float() if bias is not None else torch.zeros(N, device=a.device)).expand(M, N))
    c = (config._replace(block_k=block_k(group_size)) if config is not None
         else choose_config(a.device, M, N, group_size))
    fa, fw = formats.code4_int_table(a_fmt)[1], formats.code4_int_table(w_fmt)[1]
    grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)
    w4a4_gemm_kernel[grid](
        a, w, out, a_scale, w_scale, w_scale if bias is None else bias,
        M, N, K, a.stride(0), w.stride(0), out.stride(0), a_scale.stride(0), w_scale.stride(0),
        *lut_words(a_fmt), *lut_words(w_fmt), 1.0 / (fa * fw),
        HAS_BIAS=bias is not None, EVEN_K=K % c.block_k == 0, GROUP=group_size,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m, PRMT=prmt,
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out


@register_kernel("w4a4_gemm", "triton")
def w4a4_gemm(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype):
    return launch(a, a_scale, w, w_scale, bias, group_size, a_fmt, w_fmt, out_dtype)


# ------------------------------------------------------------------ offline-compile specs (aot.py)

# The decoded operands must reach the int8 tensor cores: int8 mma.sync on sm_80/89, int8 wgmma on sm_90.
_INT8_MMA = {80: ["mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"],
             89: ["mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"],
             90: ["wgmma.mma_async.sync.aligned", ".s32.s8.s8"]}


def _aot_spec(cfg: GemmConfig, group_size: int, out: str = "bf16", prmt: bool = False) -> dict:
    cfg = cfg._replace(block_k=block_k(group_size))
    sig = {"a_ptr": "*u8", "w_ptr": "*u8", "out_ptr": f"*{out}", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
           "bias_ptr": "*fp32", **{n: "i32" for n in ("M", "N", "K", "stride_am", "stride_wn", "stride_om",
                                                      "stride_asm", "stride_wsn")},
           **{f"{o}_lut{i}": "i32" for o in "aw" for i in range(4)}, "out_mult": "fp32"}
    constexprs = {"HAS_BIAS": True, "EVEN_K": True, "GROUP": group_size, "BLOCK_M": cfg.block_m,
                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "PRMT": prmt}
    tag = f"g{group_size}_{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
    expect = {arch: frags + (["prmt.b32"] if prmt else []) for arch, frags in _INT8_MMA.items()}
    return dict(name=f"w4a4_gemm{'_prmt' if prmt else ''}_{tag}", fn=w4a4_gemm_kernel, signature=sig,
                constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect=expect,
                divisible_by_16=[k for k in sig if k.endswith("_ptr") or k in ("N", "K", "stride_am", "stride_wn",
                                                                              "stride_om")])


AOT_SPECS = [*[_aot_spec(c, g) for c in _unique(CONFIGS) for g in (32, 128)],
             *[_aot_spec(c, 16) for c in _unique(GROUP16_CONFIGS)],
             # the byte-permute decode (off by default) on the largest tile; the other tiles and groups
             # compiled without spills too when it was written (ptxas: 220-255 registers)
             _aot_spec(CONFIGS[90][0], 32, prmt=True)]
