"""Pure-torch implementations of the `dtq` ops: the executable spec, the CPU path and the test oracle.

Inputs are assumed validated by the op layer. All quantization math comes from `dtq_kernels.formats`.

Non-finite activations propagate (formats.mark_nonfinite_rows): every activation quantizer gives a row
holding NaN/±Inf (after its fused transforms) the scale NaN and codes 0, or, for two-region codes, the
code formats.NONFINITE_CODE over the whole row; the GEMMs and attention turn those into NaN outputs.
"""
from __future__ import annotations

import torch

from .. import formats


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization: scale = absmax(row) / (2^(bits-1) - 1), codes round half to even;
    a row holding NaN/±Inf gets scale NaN and codes 0."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    scale = formats.absmax_scale(absmax, f"int{bits}")
    return formats.mark_nonfinite_rows(xf, formats.quantize_int(xf, scale[:, None], bits), scale, absmax)


# Chunk of K for which fp32 BLAS is exact: |a·w| <= 2^14 per product, so every partial sum of up to
# 1024 products is an integer of magnitude <= 2^24, which fp32 holds exactly in any summation order.
EXACT_FP32_K = 1024


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 a · wᵀ for int8 a [M, K], w [N, K].

    On the CPU torch._int_mm (oneDNN's int8 GEMM, VNNI/AMX where the CPU has them): 5-8x faster than fp32
    BLAS on the reference DiT's layers; not for K = 1, where torch 2.13's CPU _int_mm returns garbage
    (tests/test_ops_core.py checks the shapes against an int64 oracle). Elsewhere (the oracle on a GPU,
    where _int_mm wants M > 16 and K, N multiples of 8) fp32 BLAS on chunks of K <= EXACT_FP32_K
    (exact, see above) summed in int32.
    """
    if a.device.type == "cpu" and a.shape[1] >= 2:
        return torch._int_mm(a, w.T)
    af, wf = a.float(), w.float()
    out = torch.zeros(a.shape[0], w.shape[0], dtype=torch.int32, device=a.device) if a.shape[1] == 0 else None
    for k0 in range(0, a.shape[1], EXACT_FP32_K):
        part = (af[:, k0:k0 + EXACT_FP32_K] @ wf[:, k0:k0 + EXACT_FP32_K].T).to(torch.int32)
        out = part if out is None else out + part
    return out


def int_matmul_float(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int_matmul(a, w).float(), without the int32 round trip when fp32 BLAS runs it with K <=
    EXACT_FP32_K (one call whose result is already the exact integer): the same values either way."""
    if (a.device.type != "cpu" or a.shape[1] < 2) and a.shape[1] <= EXACT_FP32_K:
        return a.float() @ w.float().T
    return int_matmul(a, w).float()


def weight_codes(w: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] of a GEMM weight operand: int8 as is, or int4 packed two per byte (uint8 [N, K/2])."""
    return formats.unpack_int4(w) if w.dtype == torch.uint8 else w


def group_scaled_matmul(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Σ_g (a_g · w_gᵀ) · w_scale[:, g] in fp32, groups in ascending K order (the kernels' order), for
    int8 codes a [M, K], w [N, K] and w_scale [N, K/G]. Each group's integer product is exact
    (int_matmul; in fp32 for G <= EXACT_FP32_K)."""
    n_groups = w_scale.shape[1]
    g = a.shape[1] // n_groups
    ws = w_scale.float()
    acc = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float32, device=a.device)
    for i in range(n_groups):
        k = slice(i * g, (i + 1) * g)
        acc = acc + int_matmul_float(a[:, k].contiguous(), w[:, k].contiguous()) * ws[None, :, i]
    return acc


def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(a · wᵀ in int32) · a_scale[:, None] · w_scale[None, :] + bias, computed in fp32, cast last; with
    per-group scales [N, K/G]: group_scaled_matmul(a, w, w_scale) · a_scale[:, None] + bias. A NaN
    a_scale, the quantizers' mark of a non-finite row, makes that output row NaN."""
    if w_scale.dim() == 2:
        out = group_scaled_matmul(a, weight_codes(w), w_scale) * a_scale.float()[:, None]
    else:
        out = int_matmul_float(a, weight_codes(w)) * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_gemm_static(a: torch.Tensor, scale_table: torch.Tensor, group_idx: torch.Tensor, w: torch.Tensor,
                     w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """int8_gemm with the per-tensor activation scale scale_table[group_idx[0]] (a static, per time
    group scale); the op layer has checked the index."""
    return int8_gemm(a, scale_table[group_idx.long()], w, w_scale, bias, out_dtype)


def int8_gemm_wzp(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  w_zero: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Asymmetric weights (formats.quantize_weight(..., symmetric=False): w ≈ w_scale·(q − z)):
    (a · (w − z)ᵀ in int32) · a_scale · w_scale + bias, the integer part computed as
    a · wᵀ exactly (int_matmul) minus rowsum(a) · z, the same integer as a · (w − z)ᵀ."""
    zero_term = a.sum(dim=1, dtype=torch.int32)[:, None] * w_zero.to(torch.int32)[None, :]
    acc = int_matmul(a, weight_codes(w)) - zero_term
    out = acc.float() * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_gemm_two_region(a: torch.Tensor, coef_table: torch.Tensor, group_idx: torch.Tensor, w: torch.Tensor,
                         w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Two-region codes a (formats.quantize_two_region: value = q·c_pos if q >= 0 else q·c_neg) times
    int8 weights: (c_pos · (max(a,0)·wᵀ) + c_neg · (min(a,0)·wᵀ)) · w_scale + bias, both integer parts
    exact, (c_pos, c_neg) = coef_table[group_idx[0]]. A row whose first code is
    formats.NONFINITE_CODE (quantize_two_region's mark of a non-finite row) gives NaN."""
    c_pos, c_neg = coef_table[group_idx.long()].float().unbind(-1)  # each [1]
    w = weight_codes(w)
    acc_pos = int_matmul_float(a.clamp(min=0), w)
    acc_neg = int_matmul_float(a.clamp(max=0), w)
    out = (acc_pos * c_pos + acc_neg * c_neg) * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    if a.shape[1]:
        out = torch.where(a[:, :1] == formats.NONFINITE_CODE, torch.full_like(out, float("nan")), out)
    return out.to(out_dtype)


def w4a16_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only int4 (see gemm_ops.w4a16_gemm). Per channel: (x · codesᵀ) · w_scale + bias in fp32. Per
    group: the weights are dequantized first, x · dequantize_w4_groups(codes, w_scale, x.dtype)ᵀ + bias in fp32."""
    codes = weight_codes(w)
    if w_scale.dim() == 2:
        out = x.float() @ dequantize_w4_groups(codes, w_scale, x.dtype).float().T
    else:
        out = (x.float() @ codes.float().T) * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def dequantize_w4_groups(codes: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit weights of a per-group w4a16_gemm: code · w_scale[n, k // G] in fp32, rounded once to dtype
    (fp16/bf16, round to nearest even), as every kernel computes them before its 16-bit MMA."""
    group = codes.shape[1] // w_scale.shape[1]
    return formats.dequantize_weight(formats.QuantizedWeight(codes, w_scale, "int4", group)).to(dtype)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 E4M3 W8A8: (a · wᵀ in fp32) · a_scale[:, None] · w_scale[None, :] + bias. Each product of two
    e4m3 values is exact in fp32; the sum is the fp32 matmul's."""
    out = (a.float() @ w.float().T) * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ------------------------------------- fused activation quantization (smoothing, Hadamard, LN, GELU)

def _smooth_rotate(xf: torch.Tensor, smooth: torch.Tensor | None, rotate: bool) -> torch.Tensor:
    """x / smooth (per input channel), then x @ H_K: the transforms applied before quantization."""
    from .. import hadamard
    if smooth is not None:
        xf = xf / smooth.float()
    return hadamard.rotate(xf) if rotate else xf


def _quantize_rows(xf: torch.Tensor, bits: int, scale_table: torch.Tensor | None,
                   group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per token (quantize_per_token semantics) without a table, else static per tensor with
    scale = scale_table[group_idx[0]] (formats.quantize_int: round half even, clamp ±qmax), returned
    per row [M] so that a row holding NaN/±Inf can carry the scale NaN (formats.mark_nonfinite_rows)."""
    if scale_table is None:
        return quantize_per_token(xf, bits)
    scale = scale_table[group_idx.long()].float()  # [1]
    rows = scale.expand(xf.shape[0]).contiguous()  # an op returns its own storage, never a stride-0 view
    return formats.mark_nonfinite_rows(xf, formats.quantize_int(xf, scale, bits), rows)


def quantize_act(x: torch.Tensor, bits: int, smooth: torch.Tensor | None, rotate: bool,
                 scale_table: torch.Tensor | None, group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of (x / smooth) @ H_K, computed in fp32 (see quantize_ops.quantize_act)."""
    return _quantize_rows(_smooth_rotate(x.float(), smooth, rotate), bits, scale_table, group_idx)


def quantize_act_fp8(x: torch.Tensor, smooth: torch.Tensor | None,
                     rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 E4M3 codes of (x / smooth) @ H_K in fp32: scale = absmax(row) / 448,
    codes = formats.quantize_fp8_e4m3(row, scale) (a zero row: scale 0, codes 0). A row holding NaN or
    ±Inf gets scale NaN and codes 0 (formats.mark_nonfinite_rows), so whatever consumes the codes with
    their scale yields NaN for that row: a broken input is never hidden."""
    xs = _smooth_rotate(x.float(), smooth, rotate)
    absmax = xs.abs().amax(dim=-1)
    scale = formats.absmax_scale(absmax, "fp8_e4m3")
    # marked in fp32 (exact for every E4M3 value): torch.where has no float8 kernel on every device
    codes, scale = formats.mark_nonfinite_rows(xs, formats.quantize_fp8_e4m3(xs, scale[:, None]).float(), scale,
                                               absmax)
    return codes.to(torch.float8_e4m3fn), scale


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens_per_batch: int,
                       eps: float) -> torch.Tensor:
    """DiT's adaLN modulate in fp32: LN(x, no affine) · (1 + scale[b]) + shift[b], b = row // tokens."""
    h = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    b = torch.arange(x.shape[0], device=x.device) // tokens_per_batch
    return h * (1 + scale.float()[b]) + shift.float()[b]


def layernorm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens_per_batch: int,
                                eps: float, bits: int, smooth: torch.Tensor | None, rotate: bool,
                                scale_table: torch.Tensor | None,
                                group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    h = layernorm_modulate(x, shift, scale, tokens_per_batch, eps)
    return _quantize_rows(_smooth_rotate(h, smooth, rotate), bits, scale_table, group_idx)


def gelu_quantize(h: torch.Tensor, bits: int, approximate: str, smooth: torch.Tensor | None, rotate: bool,
                  scale_table: torch.Tensor | None, group_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.nn.functional.gelu(h.float(), approximate=approximate)
    return _quantize_rows(_smooth_rotate(g, smooth, rotate), bits, scale_table, group_idx)


def quantize_two_region(x: torch.Tensor, coef_table: torch.Tensor, group_idx: torch.Tensor, bits: int, mode: str,
                        gelu: bool, approximate: str) -> torch.Tensor:
    """formats.quantize_two_region of x (or of GELU(x)) with (c_pos, c_neg) = coef_table[group_idx[0]];
    every code of a row holding NaN/±Inf is formats.NONFINITE_CODE."""
    xf = torch.nn.functional.gelu(x.float(), approximate=approximate) if gelu else x.float()
    c_pos, c_neg = coef_table[group_idx.long()].float().unbind(-1)  # each [1]
    q = formats.quantize_two_region(xf, c_pos, c_neg, bits, mode)
    if formats.all_finite(xf):
        return q
    return torch.where(formats.nonfinite_rows(xf)[:, None], torch.full_like(q, formats.NONFINITE_CODE), q)


# ------------------------------------------------------------------- quantized attention (attention_ops)
#
# Layout [B, S, H, D] (what a diffusers Attention's to_q/to_k/to_v give after a free view). Scores live
# in the log2 domain: s = (q_codes · k_codesᵀ in int32) · (q_scale · sm_scale · log2 e) · k_scale, and the
# softmax uses exp2. The row maximum is rounded up to an integer, m = floor(max s) + 1, so that the
# online softmax of the kernel (a running maximum per key tile) differs from this one-shot spec only by
# exact power-of-two factors: exp2(s − m_tile) = exp2(s − m) · 2^(m − m_tile), which leaves the
# floating-point rounding of P (fp8/fp16 codes) unchanged and makes kernel vs reference tight.

LOG2E = 1.4426950408889634
# Dynamic mode codes P · 448 (the whole e4m3 range) and gets it as exp2(s − (m − log2 448)): the scale
# rides on the per-row offset instead of a multiply per score; the row sum l is in the same units.
LOG2_P_SCALE = 8.807354922057604  # log2(448)
ATTN_PV_FORMATS = ("fp8_e4m3", "fp16")
ATTN_P_MODES = ("uniform", "two_region")


def attention_k_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of K over tokens per (batch, head, channel), [B, 1, H, D] fp32. Subtracting it shifts every
    score of a query row by the same q·μ, which softmax ignores, and removes the channel bias that
    dominates K's range (SageAttention's smoothing)."""
    return k.mean(dim=1, keepdim=True, dtype=torch.float32)  # fp32 accumulation without an fp32 copy of k


def attention_v_scale(v: torch.Tensor) -> torch.Tensor:
    """Dynamic per-channel V scale, [B, H, D] fp32: absmax over tokens / 448 (the e4m3 range; the fp16
    P·V path uses the same scale so both formats share one code layout)."""
    lo, hi = torch.aminmax(v, dim=1)  # absmax without a full-size |v| temporary
    return formats.absmax_scale(torch.maximum(-lo, hi), "fp8_e4m3")


def _attn_scores(qc, q_scale, kc, k_scale, mult: float, key_padding_mask):
    """Log2-domain scores [B, H, Sq, Sk] fp32 from int8 codes [B, S, H, D] and per-token scales [B, S, H];
    the integer product is exact through float64 (|products| < 2^14, sums < 2^21)."""
    acc = torch.einsum("bqhd,bkhd->bhqk", qc.double(), kc.double()).float()
    qf = (q_scale.float() * torch.tensor(mult, dtype=torch.float32)).permute(0, 2, 1)  # [B, H, Sq]
    s = acc * qf[..., None] * k_scale.float().permute(0, 2, 1)[:, :, None, :]
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return s


def _attn_probs(s: torch.Tensor, log2_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp2(s − (m − log2_scale)), row sum l) with m = floor(max s) + 1, all fp32; rows with every key
    masked give p = 0, l = 0."""
    m = torch.floor(s.amax(dim=-1, keepdim=True)) + 1
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    if log2_scale:
        m = m - torch.tensor(log2_scale, dtype=torch.float32)
    p = torch.exp2(s - m)
    return p, p.sum(dim=-1)


def _safe_recip(l: torch.Tensor) -> torch.Tensor:
    return torch.where(l > 0, 1.0 / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(l))


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                    scale: float | None, pv_format: str, smooth_k: bool) -> torch.Tensor:
    """Dynamic quantized attention (see attention_ops.quant_attention), computed in fp32/float64."""
    d = q.shape[-1]
    mult = (d ** -0.5 if scale is None else scale) * LOG2E
    kf = k.float() - attention_k_mean(k) if smooth_k else k.float()
    q_max, k_max = q.float().abs().amax(-1), kf.abs().amax(-1)  # per token and head
    q_scale, k_scale = formats.absmax_scale(q_max, "int8"), formats.absmax_scale(k_max, "int8")
    qc, q_scale = formats.mark_nonfinite_rows(q, formats.quantize_int(q, q_scale[..., None], 8), q_scale, q_max)
    kc, k_scale = formats.mark_nonfinite_rows(kf, formats.quantize_int(kf, k_scale[..., None], 8), k_scale, k_max)
    p, l = _attn_probs(_attn_scores(qc, q_scale, kc, k_scale, mult, key_padding_mask), LOG2_P_SCALE)
    v_scale = attention_v_scale(v)  # [B, H, D]
    vs = v_scale[:, None]  # [B, 1, H, D] against v [B, S, H, D]
    if pv_format == "fp8_e4m3":
        p_c = formats.quantize_fp8_e4m3(p).float()
        v_c = formats.quantize_fp8_e4m3(v, vs).float()
    else:  # fp16 codes of the same scaled values (sm_80 has no fp8 tensor cores)
        p_c = p.half().float()
        v_c = (v.float() / torch.where(vs == 0, torch.ones_like(vs), vs)).half().float()
    acc = torch.einsum("bhqk,bkhd->bhqd", p_c, v_c)
    out = acc * _safe_recip(l)[..., None] * v_scale[:, :, None, :]
    return _nan_rows(out, l).permute(0, 2, 1, 3).contiguous().to(q.dtype)


def _nan_rows(out: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """out [B, H, Sq, D] with NaN rows where the softmax row sum l [B, H, Sq] is NaN: a query row holding
    NaN/±Inf, or an unmasked key that does (their scales are NaN, formats.mark_nonfinite_rows)."""
    return torch.where(torch.isnan(l)[..., None], torch.full_like(out, float("nan")), out)


def quant_attention_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_padding_mask: torch.Tensor | None, q_scales: torch.Tensor, k_scales: torch.Tensor,
                           v_scales: torch.Tensor, p_table: torch.Tensor, group_idx: torch.Tensor, bits: int,
                           p_mode: str, scale: float | None) -> torch.Tensor:
    """Static quantized attention (see attention_ops.quant_attention_static): per-head Q/K/V scales and the
    P quantizer of time group g = group_idx[0]; P is the normalized softmax, quantized with
    formats.quantize_int (uniform, unsigned) or formats.quantize_two_region (split), P·V exact in integers."""
    d = q.shape[-1]
    mult = (d ** -0.5 if scale is None else scale) * LOG2E
    g = group_idx.long()
    sq, sk, sv = (t[g].float()[:, None, :] for t in (q_scales, k_scales, v_scales))  # [1, 1, H]
    qc, q_rows = formats.mark_nonfinite_rows(q, formats.quantize_int(q, sq[..., None], bits), sq.expand(q.shape[:3]))
    kc, k_rows = formats.mark_nonfinite_rows(k, formats.quantize_int(k, sk[..., None], bits), sk.expand(k.shape[:3]))
    vc = formats.quantize_int(v, sv[..., None], bits)
    p, l = _attn_probs(_attn_scores(qc, q_rows, kc, k_rows, mult, key_padding_mask))
    p = p * _safe_recip(l)[..., None]
    coef = p_table[g].float()[0]
    # a non-finite V element becomes a NaN code (the kernel's V codes are fp16): every row reading it is NaN
    vcd = vc.double()
    if not formats.all_finite(v):
        vcd = torch.where(torch.isfinite(v), vcd, torch.full_like(vcd, float("nan")))
    if p_mode == "uniform":  # unsigned codes 0 .. 2^bits − 1: the asymmetric code with zero point −2^(bits−1)
        zero = torch.tensor(-(2 ** (bits - 1)), dtype=torch.int32)
        u = formats.quantize_int(p, coef[0], bits, zero).double() - zero
        out = torch.einsum("bhqk,bkhd->bhqd", u, vcd).float() * coef[0]
    else:
        qp = formats.quantize_two_region(p, coef[0], coef[1], bits, "split").double()
        acc_pos = torch.einsum("bhqk,bkhd->bhqd", qp.clamp(min=0), vcd).float()
        acc_neg = torch.einsum("bhqk,bkhd->bhqd", qp.clamp(max=0), vcd).float()
        out = acc_pos * coef[0] + acc_neg * coef[1]
    out = out * sv.permute(0, 2, 1)[..., None]  # [1, H, 1, 1]
    return _nan_rows(out, l).permute(0, 2, 1, 3).contiguous().to(q.dtype)


# ----------------------------------------------------------- W4A4: 4-bit codes with block scales (w4a4_ops)

def w4a4_int_operand(packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """The exact integers (value × factor, formats.code4_int_table) of packed 4-bit codes, as fp32."""
    table, _ = formats.code4_int_table(fmt)
    return table.to(packed.device)[formats.unpack_nibbles(packed).long()].float()


def w4a4_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, group_size: int, a_fmt: str, w_fmt: str,
              out_dtype: torch.dtype) -> torch.Tensor:
    """Σ_b (a_b · w_bᵀ in integers) · (a_scale[:, b] · w_scale[:, b]), blocks b in order, in fp32; then
    × 1/(factor_a · factor_w) (a power of two: exact) + bias; cast last (see w4a4_ops.w4a4_gemm).

    Each block's integer product is exact in fp32 matmul: |decoded| <= 64, so |partial sums| <=
    64 · 64 · group_size < 2^24 for group_size <= 4096."""
    ai, wi = w4a4_int_operand(a, a_fmt), w4a4_int_operand(w, w_fmt)
    out = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float32, device=a.device)
    for b in range(a_scale.shape[1]):
        k = slice(b * group_size, (b + 1) * group_size)
        acc = ai[:, k] @ wi[:, k].T
        out = out + acc * (a_scale[:, b, None].float() * w_scale[None, :, b].float())
    factor = formats.code4_int_table(a_fmt)[1] * formats.code4_int_table(w_fmt)[1]
    out = out * torch.tensor(1.0 / factor, dtype=torch.float32)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def quantize_act_4bit(x: torch.Tensor, fmt: str, group_size: int, smooth: torch.Tensor | None,
                      rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """formats.quantize_blockwise of (x / smooth) @ H_K, codes packed two per byte (see w4a4_ops)."""
    codes, scale = formats.quantize_blockwise(_smooth_rotate(x.float(), smooth, rotate), fmt, group_size)
    return formats.pack_4bit(codes, fmt), scale
