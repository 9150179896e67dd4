"""Activation quantization kernels in Triton: quantize_per_token, and one fused kernel for
quantize_act / layernorm_modulate_quantize / gelu_quantize / quantize_two_region."""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import hadamard
from .._dispatch import register_kernel
from .common import INTERPRETING, absmax_propagating_nan, max_propagating_nan, nonfinite, require_fp8_tensor_cores, rne, round_to_e4m3_grid


@triton.jit
def quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
                              QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_M rows per program; pass 1 finds each row's absmax, pass 2 writes the codes.

    Bit-exact with the reference: fp32 absmax, correctly rounded divisions (div_rn), round half to
    even, a zero row gives scale 0 and codes 0, and a row holding NaN/±Inf scale NaN and codes 0.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + cols)[None, :], mask=mask, other=0.0)
        # NaN-propagating: a row holding NaN/±Inf ends with absmax NaN/Inf
        absmax = max_propagating_nan(absmax, absmax_propagating_nan(x.to(tl.float32), 1))
    bad = nonfinite(absmax) != 0
    scale = tl.math.div_rn(absmax, tl.full((BLOCK_M,), QMAX, tl.float32))
    tl.store(scale_ptr + rows, tl.where(bad, float("nan"), scale), mask=row_ok)
    divisor = tl.where(scale == 0.0, 1.0, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + cols)[None, :], mask=mask, other=0.0)
        q = rne(tl.math.div_rn(x.to(tl.float32), divisor[:, None]))
        q = tl.where(bad[:, None], 0.0, tl.minimum(tl.maximum(q, -QMAX), QMAX))
        tl.store(q_ptr + rows[:, None] * stride_qm + (k0 + cols)[None, :], q.to(tl.int8), mask=mask)


def _quantize_per_token_config(K: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K): whole rows up to 4096 wide in one pass tile, else 4096-wide chunks.
    The interpreter pays per program, so it gets 64-row tiles."""
    block_k = min(triton.next_power_of_2(K), 4096)
    return (64 if INTERPRETING else max(1, 4096 // block_k)), block_k


@register_kernel("quantize_per_token", "triton")
def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    block_m, block_k = _quantize_per_token_config(max(K, 1))
    grid = (triton.cdiv(M, block_m),)
    quantize_per_token_kernel[grid](x, q, scale, M, K, x.stride(0), q.stride(0),
                                    QMAX=float(2 ** (bits - 1) - 1), BLOCK_M=block_m, BLOCK_K=block_k)
    return q, scale


# ------------------------------------------------------------------------- fused activation quantize
#
# One program holds BLOCK_M whole rows in registers as a [BLOCK_M, MPAD, P] tile: column c = a·P + b
# (a < MFAC, b < P) is the Kronecker index of H_K = H_MFAC ⊗ H_P (dtq_kernels.hadamard), so the
# rotation is H_MFACᵀ · X · H_P per row. Without rotation the tile is [BLOCK_M, 1, next_pow2(K)].
#
# Cost vs the memory floor. Bytes per element: 2 read (fp16/bf16) + 1 written = 3 (LayerNorm adds
# nothing per element: shift/scale are per batch and stay in L2), so on an H100 (≈3.0 TB/s measured
# copy) the floor is ≈1.0e12 elements/s. Work per element:
# * H_P by a fast Walsh–Hadamard transform: log2(P) stages (7 for P = 128), each two size-2
#   reductions and a select over the register tile (plus a layout shuffle through shared memory);
#   ≈3 FLOP/element/stage ≈ 21, below the ≈67 TFLOP/s fp32 SIMT rate / 1e12 = 67 FLOP/element budget.
# * H_MFAC (12 or 36, padded to 16 or 64) as a tensor-core dot in 3xTF32: 3 passes · 2 · MPAD
#   FLOP/element = 384 for MPAD 64, against ≈495 TFLOP/s dense TF32 → ≈1.3e12 elements/s, just above
#   the memory floor; the 36 → 64 padding (1.8× the tile) is the price of a power-of-two tile. A single
#   TF32 pass would be 3× cheaper but flips 0.6% of the int8 codes by one (measured by emulating TF32
#   operand rounding on K = 4608 rows with outliers); 3xTF32 is fp32-accurate. If the benchmark shows
#   the dot limits the rotated rows, that trade is the one to revisit.
# * quantization: two correctly rounded divisions (div_rn) and a few min/max per element.
# Estimates from datasheet rates, NOT measured (no GPU this session): benchmarks/bench_quantize.py
# measures GB/s against the device copy bandwidth.

PRE_NONE, PRE_LN, PRE_GELU_ERF, PRE_GELU_TANH = 0, 1, 2, 3
MODE_DYNAMIC, MODE_STATIC, MODE_TWO_REGION_SIGN, MODE_TWO_REGION_SPLIT = 0, 1, 2, 3
MODE_FP8 = 4  # dynamic per-token FP8 E4M3 codes (scale = absmax / 448)
MAX_ROW_TILE = 16384  # padded elements of one row held in registers
# A rotated row tile also passes through shared memory (the FWHT's layout shuffles, the dot operands):
# 8192 elements take 64 KB on every arch; 16384 would take 128 KB, over sm_89's 99 KB per block.
MAX_ROTATE_TILE = 8192


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    """torch's GELU in fp32. tanh is not a core Triton op (libdevice only, absent in the interpreter):
    tanh(u) = 1 − 2/(e^{2u} + 1), absolute error ≈1e-7; u is capped at 40 (tanh(40) is 1 in fp32) so
    e^{2u} never overflows."""
    if TANH:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(u, 40.0)) + 1.0)
        return 0.5 * x * (1.0 + t)
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def load_row_tile(x_ptr, M, K, stride_xm, MFAC: tl.constexpr, MPAD: tl.constexpr, P: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """This program's BLOCK_M whole rows of x as a [BLOCK_M, MPAD, P] fp32 tile in the layout above
    (padding 0). Returns (rows [BLOCK_M], col [MPAD, P] the column of each tile element, col_ok [MPAD, P]
    the real columns, mask [BLOCK_M, MPAD, P] the real elements, the tile)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    a = tl.arange(0, MPAD)
    b = tl.arange(0, P)
    col = a[:, None] * P + b[None, :]
    col_ok = (a[:, None] < MFAC) & (col < K)
    mask = (rows < M)[:, None, None] & col_ok[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + col[None, :, :], mask=mask, other=0.0)
    return rows, col, col_ok, mask, x.to(tl.float32)


@triton.jit
def hadamard_rows(x, hm_ptr, MFAC: tl.constexpr, MPAD: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """x [BLOCK_M, MPAD, P] (row tiles in the Kronecker layout above) -> H_MFACᵀ · X · H_P per row, the
    unnormalized ±1 rotation."""
    # X · H_P on the last axis, a radix-2 FWHT: stage j views the row as [P / 2^(j+1), 2, 2^j] and
    # replaces the pair (u, v) on the middle axis by (u + v, u − v). The pair is combined with
    # size-2 reductions and a select, never a permute (permuted register tiles spill).
    y = tl.reshape(x, [BLOCK_M * MPAD, P])
    for j in tl.static_range(LOG2P):
        y4 = tl.reshape(y, [BLOCK_M * MPAD, P // (2 << j), 2, 1 << j])
        pair = tl.arange(0, 2)[None, None, :, None]
        total = tl.sum(y4, axis=2)
        diff = tl.sum(tl.where(pair == 0, y4, -y4), axis=2)
        y = tl.reshape(tl.where(pair == 0, total[:, :, None, :], diff[:, :, None, :]), [BLOCK_M * MPAD, P])
    x = tl.reshape(y, [BLOCK_M, MPAD, P])
    if MFAC > 1:
        # H_MFACᵀ · X per row: the ±1 factor, transposed and zero-padded to MPAD on the host
        a = tl.arange(0, MPAD)
        hm = tl.load(hm_ptr + a[:, None] * MPAD + a[None, :])
        if BLOCK_M == 1:  # the GPU launch: a 2-D dot (a batched one spills at MPAD = 64)
            x2 = tl.dot(hm, tl.reshape(x, [MPAD, P]), input_precision="tf32x3")
            x = tl.reshape(x2, [1, MPAD, P])
        else:
            x = tl.dot(tl.broadcast_to(hm[None, :, :], [BLOCK_M, MPAD, MPAD]), x, input_precision="tf32x3")
    return x


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, scale_ptr, smooth_ptr, hm_ptr, shift_ptr, mod_ptr, table_ptr, group_ptr,
                     M, K, stride_xm, stride_qm, tokens_per_batch, num_groups, eps, rot_norm,
                     PRE: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROTATE: tl.constexpr, MFAC: tl.constexpr,
                     MPAD: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr, MODE: tl.constexpr,
                     QMAX: tl.constexpr, BLOCK_M: tl.constexpr):
    rows, col, col_ok, mask, x = load_row_tile(x_ptr, M, K, stride_xm, MFAC, MPAD, P, BLOCK_M)

    if PRE == 1:  # DiT adaLN modulate: LN(x, no affine) * (1 + scale[b]) + shift[b]
        mean = tl.sum(tl.sum(x, axis=2), axis=1) / K
        d = tl.where(mask, x - mean[:, None, None], 0.0)
        var = tl.sum(tl.sum(d * d, axis=2), axis=1) / K
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        moff = (rows // tokens_per_batch)[:, None, None] * K + col[None, :, :]
        sh = tl.load(shift_ptr + moff, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(mod_ptr + moff, mask=mask, other=0.0).to(tl.float32)
        x = (d * rstd[:, None, None]) * (1.0 + sc) + sh                 # padding stays 0: d, sh are 0 there
    elif PRE == 2:
        x = _gelu(x, False)                                             # gelu(0) = 0 keeps the padding 0
    elif PRE == 3:
        x = _gelu(x, True)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + col, mask=col_ok, other=1.0)
        x = tl.math.div_rn(x, s[None, :, :])                            # IEEE division, as the reference

    if ROTATE:
        x = hadamard_rows(x, hm_ptr, MFAC, MPAD, P, LOG2P, BLOCK_M) * rot_norm  # 1/√K in fp32

    qmax = QMAX
    # rows holding NaN/±Inf (any non-finite x, shift or scale makes the transformed row non-finite):
    # scale NaN and codes 0, or two-region codes -128 (formats.NONFINITE_CODE) over the row
    absmax = absmax_propagating_nan(absmax_propagating_nan(x, 2), 1)
    bad = nonfinite(absmax) != 0
    if MODE == 0:  # dynamic per token: quantize_per_token's arithmetic
        scale = tl.math.div_rn(absmax, tl.full((BLOCK_M,), QMAX, tl.float32))
        tl.store(scale_ptr + rows, tl.where(bad, float("nan"), scale), mask=rows < M)
        divisor = tl.where(scale == 0.0, 1.0, scale)
        q = rne(tl.math.div_rn(x, divisor[:, None, None]))
    elif MODE == 4:  # dynamic per-token FP8 E4M3: reference.quantize_act_fp8's arithmetic
        scale = tl.math.div_rn(absmax, tl.full((BLOCK_M,), 448.0, tl.float32))
        tl.store(scale_ptr + rows, tl.where(bad, float("nan"), scale), mask=rows < M)
        divisor = tl.where(scale == 0.0, 1.0, scale)
        q = round_to_e4m3_grid(tl.math.div_rn(x, divisor[:, None, None]))  # on the grid: the cast is exact
    else:
        # time-group index read on the device, clamped so a bad one never reads past the table (the op
        # layer's device-side assert reports it)
        g = tl.minimum(tl.maximum(tl.load(group_ptr), 0), num_groups - 1)
        if MODE == 1:  # static per tensor: formats.quantize_int (zero scale -> zero codes), scale per row
            s_t = tl.load(table_ptr + g)
            tl.store(scale_ptr + rows, tl.where(bad, float("nan"), s_t), mask=rows < M)
            q = rne(tl.math.div_rn(x, tl.where(s_t == 0.0, 1.0, s_t) + tl.zeros_like(x)))
            q = tl.where(s_t == 0.0, 0.0, q)
        else:  # two-region: formats.quantize_two_region
            c_pos = tl.load(table_ptr + 2 * g) + tl.zeros_like(x)
            c_neg = tl.load(table_ptr + 2 * g + 1) + tl.zeros_like(x)
            q_pos = rne(tl.math.div_rn(x, c_pos))
            q_neg = rne(tl.math.div_rn(x, c_neg))
            if MODE == 2:  # sign: Δ₊ for x >= 0, Δ₋ below
                q = tl.where(x >= 0.0, q_pos, q_neg)
            else:  # split: low region [0, c_pos·qmax) unless it rounds past qmax
                q = tl.where((x < c_pos * qmax) & (q_pos <= qmax), q_pos, q_neg)
    if MODE != 4:
        q = tl.minimum(tl.maximum(q, -qmax), qmax)
    q = tl.where(bad[:, None, None], -128.0 if (MODE == 2 or MODE == 3) else 0.0, q)
    if MODE == 4:
        tl.store(q_ptr + rows[:, None, None] * stride_qm + col[None, :, :], q.to(tl.float8e4nv), mask=mask)
    else:
        tl.store(q_ptr + rows[:, None, None] * stride_qm + col[None, :, :], q.to(tl.int8), mask=mask)


@functools.lru_cache(maxsize=None)
def _hm_transposed(m: int, mpad: int, device: torch.device) -> torch.Tensor:
    """H_mᵀ (±1, fp32) zero-padded to [mpad, mpad], cached per device."""
    out = torch.zeros(mpad, mpad, dtype=torch.float32)
    out[:m, :m] = hadamard.base_matrix(m).T.float()
    return out.to(device)


def _tile(K: int, rotate: bool) -> tuple[int, int, int]:
    """(MFAC, MPAD, P) of the row tile."""
    if rotate:
        m, p = hadamard.factor(K)
        mpad = 1 if m == 1 else max(16, triton.next_power_of_2(m))  # tl.dot needs dims >= 16
        if m > 1 and p < 16:
            raise ValueError(f"fused rotation of K={K} = {m}·{p} needs the power-of-two factor >= 16 "
                             "(tl.dot shape); use the reference backend for such narrow rows")
        return m, mpad, p
    return 1, 1, triton.next_power_of_2(K)


class RowPlan(NamedTuple):
    """How a fused row kernel tiles [M, K]: the row tile [MPAD, P] (MFAC Kronecker factor), rows per
    program, warps, and the padded H_MFACᵀ (None without the dot)."""
    mfac: int
    mpad: int
    p: int
    block_m: int
    num_warps: int
    hm: torch.Tensor | None


def plan_rows(x: torch.Tensor, rotate: bool) -> RowPlan:
    M, K = x.shape
    mfac, mpad, p = _tile(K, rotate)
    row_tile = mpad * p
    if row_tile > (MAX_ROTATE_TILE if rotate else MAX_ROW_TILE):
        raise ValueError(f"dtq fused activation quantization holds a row on chip: K={K} pads to {row_tile} "
                         f"elements, over the {MAX_ROTATE_TILE} (rotated) / {MAX_ROW_TILE} (plain) it supports")
    if M * K >= 2 ** 31:
        raise ValueError(f"dtq fused activation quantization uses int32 offsets: {M}x{K} is too large, "
                         "split the rows")
    # the interpreter pays per program: big row blocks; a GPU wants ≈4–8K elements per program
    # (one row per program when the H_m dot runs: its 2-D form is the one that does not spill)
    block_m = 1 if (mfac > 1 and not INTERPRETING) else 64 if INTERPRETING else max(1, 8192 // row_tile)
    block_m = min(block_m, triton.next_power_of_2(max(M, 1)))
    num_warps = 4 if block_m * row_tile <= 4096 else 8 if block_m * row_tile <= 8192 else 16
    hm = _hm_transposed(mfac, mpad, x.device) if rotate and mfac > 1 else None
    return RowPlan(mfac, mpad, p, block_m, num_warps, hm)


def _launch(x, *, bits, pre, smooth=None, rotate=False, mode=MODE_DYNAMIC, table=None, group_idx=None,
            shift=None, mod=None, tokens_per_batch=1, eps=0.0):
    M, K = x.shape
    mfac, mpad, p, block_m, num_warps, hm = plan_rows(x, rotate)
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn if mode == MODE_FP8 else torch.int8, device=x.device)
    scale = torch.empty((M if mode in (MODE_DYNAMIC, MODE_STATIC, MODE_FP8) else 0,), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, scale
    hm = x if hm is None else hm
    act_quant_kernel[(triton.cdiv(M, block_m),)](
        x, q, scale, x if smooth is None else smooth, hm, x if shift is None else shift, x if mod is None else mod,
        x if table is None else table, x if group_idx is None else group_idx,
        M, K, x.stride(0), q.stride(0), tokens_per_batch, 1 if table is None else table.shape[0], eps,
        (1.0 / K ** 0.5) if rotate else 1.0,
        PRE=pre, HAS_SMOOTH=smooth is not None, ROTATE=rotate, MFAC=mfac, MPAD=mpad, P=p,
        LOG2P=p.bit_length() - 1, MODE=mode, QMAX=float(2 ** (bits - 1) - 1), BLOCK_M=block_m,
        num_warps=num_warps)
    return q, scale


def _mode(scale_table):
    return MODE_DYNAMIC if scale_table is None else MODE_STATIC


@register_kernel("quantize_act", "triton")
def quantize_act(x, bits, smooth, rotate, scale_table, group_idx):
    return _launch(x, bits=bits, pre=PRE_NONE, smooth=smooth, rotate=rotate, mode=_mode(scale_table),
                   table=scale_table, group_idx=group_idx)


@register_kernel("layernorm_modulate_quantize", "triton")
def layernorm_modulate_quantize(x, shift, scale, tokens_per_batch, eps, bits, smooth, rotate, scale_table, group_idx):
    return _launch(x, bits=bits, pre=PRE_LN, smooth=smooth, rotate=rotate, mode=_mode(scale_table), table=scale_table,
                   group_idx=group_idx, shift=shift, mod=scale, tokens_per_batch=tokens_per_batch, eps=eps)


@register_kernel("quantize_act_fp8", "triton")
def quantize_act_fp8(x, smooth, rotate):
    require_fp8_tensor_cores(x.device, "quantize_act_fp8")
    return _launch(x, bits=8, pre=PRE_NONE, smooth=smooth, rotate=rotate, mode=MODE_FP8)


_GELU_PRE = {"none": PRE_GELU_ERF, "tanh": PRE_GELU_TANH}


@register_kernel("gelu_quantize", "triton")
def gelu_quantize(h, bits, approximate, smooth, rotate, scale_table, group_idx):
    return _launch(h, bits=bits, pre=_GELU_PRE[approximate], smooth=smooth, rotate=rotate, mode=_mode(scale_table),
                   table=scale_table, group_idx=group_idx)


@register_kernel("quantize_two_region", "triton")
def quantize_two_region(x, coef_table, group_idx, bits, mode, gelu, approximate):
    kernel_mode = MODE_TWO_REGION_SIGN if mode == "sign" else MODE_TWO_REGION_SPLIT
    q, _ = _launch(x, bits=bits, pre=_GELU_PRE[approximate] if gelu else PRE_NONE, mode=kernel_mode,
                   table=coef_table, group_idx=group_idx)
    return q


# Offline-compile specs (see aot.py): what each arch's PTX must contain.
AOT_SPECS = [
    dict(name="quantize_per_token_fp16", fn=quantize_per_token_kernel,
         signature={"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32", "M": "i32", "K": "i32",
                    "stride_xm": "i32", "stride_qm": "i32"},
         constexprs={"QMAX": 127.0, "BLOCK_M": 4, "BLOCK_K": 1024},
         expect={80: ["div.rn.f32"], 89: ["div.rn.f32"], 90: ["div.rn.f32"]}),
]


def _act_spec(name, *, dtype="fp16", num_warps, expect_extra=None, **constexprs):
    ptrs = {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "scale_ptr": "*fp32", "smooth_ptr": "*fp32", "hm_ptr": "*fp32",
            "shift_ptr": f"*{dtype}", "mod_ptr": f"*{dtype}", "table_ptr": "*fp32", "group_ptr": "*i32"}
    scalars = {n: "i32" for n in ("M", "K", "stride_xm", "stride_qm", "tokens_per_batch", "num_groups")}
    base = dict(PRE=PRE_NONE, HAS_SMOOTH=False, ROTATE=False, MFAC=1, MPAD=1, MODE=MODE_DYNAMIC, QMAX=127.0,
                BLOCK_M=1)
    base.update(constexprs)
    base["LOG2P"] = base["P"].bit_length() - 1
    return dict(name=name, fn=act_quant_kernel, num_warps=num_warps,
                signature={**ptrs, **scalars, "eps": "fp32", "rot_norm": "fp32"}, constexprs=base,
                divisible_by_16=("x_ptr", "q_ptr", "K", "stride_xm", "stride_qm"),
                expect={arch: ["div.rn.f32", *(expect_extra or {}).get(arch, ())]
                        for arch in (80, 89, 90)})


# The DiT/Flux launches: rotations by H_36 ⊗ H_128 (4608), H_36 ⊗ H_32 (1152), H_12 ⊗ H_256 (3072).
# The H_m dot must run on TF32 tensor cores (3 passes): mma.sync on sm80/89; on sm90 a 64-row tile
# becomes wgmma (tf32) and a 16-row one stays mma.sync, so sm90 checks the tf32 operand type only.
_TF32_MMA = {80: ["mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"],
             89: ["mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"], 90: [".tf32"]}
AOT_SPECS += [
    _act_spec("act_quant_rot_4608_smooth_fp16", num_warps=8, HAS_SMOOTH=True, ROTATE=True, MFAC=36, MPAD=64,
              P=128, expect_extra=_TF32_MMA),
    _act_spec("act_quant_rot_3072_static_int6_bf16", dtype="bf16", num_warps=4, ROTATE=True, MFAC=12, MPAD=16,
              P=256, MODE=MODE_STATIC, QMAX=31.0, expect_extra=_TF32_MMA),
    _act_spec("act_quant_rot_1024_bf16", dtype="bf16", num_warps=8, ROTATE=True, P=1024, BLOCK_M=8),
    _act_spec("ln_modulate_quant_rot_1152_fp16", num_warps=4, PRE=PRE_LN, ROTATE=True, MFAC=36, MPAD=64, P=32,
              expect_extra=_TF32_MMA),
    _act_spec("ln_modulate_quant_1152_bf16", dtype="bf16", num_warps=8, PRE=PRE_LN, P=2048, BLOCK_M=4),
    _act_spec("gelu_tanh_quant_4608_fp16", num_warps=8, PRE=PRE_GELU_TANH, P=8192),
    _act_spec("gelu_erf_quant_static_4608_bf16", dtype="bf16", num_warps=8, PRE=PRE_GELU_ERF, P=8192,
              MODE=MODE_STATIC),
    _act_spec("two_region_split_gelu_4608_fp16", num_warps=8, PRE=PRE_GELU_TANH, P=8192,
              MODE=MODE_TWO_REGION_SPLIT),
    _act_spec("two_region_sign_4608_bf16", dtype="bf16", num_warps=8, P=8192, MODE=MODE_TWO_REGION_SIGN),
    # Flux's MLP hidden width 12288 = 12·1024: the widest rows, 16384-element tiles on 16 warps
    _act_spec("gelu_tanh_quant_12288_bf16", dtype="bf16", num_warps=16, PRE=PRE_GELU_TANH, P=16384),
]
# FP8 E4M3 activations (the codes fp8_gemm reads; sm_89/90 only: sm_80 has no FP8 conversions in Triton)
AOT_SPECS += [
    dict(spec, signature={**spec["signature"], "q_ptr": "*fp8e4nv"}, archs=(89, 90))
    for spec in (_act_spec("act_quant_fp8_rot_4608_smooth_bf16", dtype="bf16", num_warps=8, HAS_SMOOTH=True,
                           ROTATE=True, MFAC=36, MPAD=64, P=128, MODE=MODE_FP8, expect_extra=_TF32_MMA),
                 _act_spec("act_quant_fp8_1152_fp16", num_warps=8, P=2048, BLOCK_M=4, MODE=MODE_FP8))
]
