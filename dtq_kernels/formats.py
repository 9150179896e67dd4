"""Number formats: the single source of truth for quantize / dequantize math.

Everything that turns floats into codes (reference ops, calibration, QuantLinear, tests) calls into this
module, so the conventions below hold everywhere:

* Symmetric INTn: scale = absmax / (2^(n-1) - 1), codes in ±(2^(n-1) - 1), stored in int8 containers.
* Asymmetric INTn: codes in [-2^(n-1), 2^(n-1) - 1] with an integer zero point z:
  x ≈ scale · (q - z).
* FP formats: scale = absmax / maxval (E4M3 448, E2M1 6, E1M2 1.75, E3M0 16).
* Rounding is to the nearest representable value, ties to even (for INT: even integer; for FP4: the
  grid value whose code has an even mantissa/index). Values beyond the range saturate.
* A zero scale (all-zero row, group or block) gives zero codes.
* FP4 codes are 4 bits: bit 3 is the sign, bits 0-2 index the format's 8 magnitudes. Zero is always
  code 0 (no negative zero), so packed tensors are canonical.
* 4-bit packing: two codes per byte along the last dimension, element 2i in the low nibble.
* Non-finite activations are never hidden: int8 codes cannot hold NaN, so an activation quantizer
  marks a row (last dimension) holding NaN or ±Inf through its scale, which becomes NaN
  (mark_nonfinite_rows; the row's codes are 0), and two-region codes mark it with the code −128
  (NONFINITE_CODE), which no two-region code uses (they are ±qmax) and which decodes to NaN.
* Block scales (W4A4, NVFP4, MXFP4): one fp32 scale per block of consecutive elements along the last
  dimension (quantize_blockwise); a block holding NaN/Inf gets a NaN scale, never a plausible one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Format", "get_format", "FORMAT_NAMES", "check_finite", "all_finite", "int_qmax", "int_qrange", "absmax_scale",
    "quantize_int", "dequantize_int", "asymmetric_params", "fp4_grid", "fp4_table", "fp4_int_table",
    "quantize_fp4", "dequantize_fp4", "quantize_fp8_e4m3", "pack_nibbles", "unpack_nibbles",
    "pack_int4", "unpack_int4", "quantize_nvfp4", "dequantize_nvfp4", "quantize_mxfp4",
    "dequantize_mxfp4", "quantize_weight", "dequantize_weight", "QuantizedWeight", "fake_quantize",
    "TWO_REGION_MODES", "quantize_two_region", "dequantize_two_region", "NONFINITE_CODE", "nonfinite_rows",
    "mark_nonfinite_rows",
    "FOUR_BIT_FORMATS", "code4_int_table", "fp4_midpoints", "pack_4bit", "unpack_4bit", "quantize_blockwise",
    "dequantize_blockwise", "nvfp4_scales_fp32", "mxfp4_scales_fp32",
]

# Magnitudes of the three 4-bit float formats (sign handled separately), indexed by the 3-bit code.
_FP4_GRIDS = {
    # 2 exponent bits (bias 1), 1 mantissa bit; the OCP/NVIDIA E2M1.
    "fp4_e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    # 1 exponent bit, 2 mantissa bits: a uniform grid of step 0.25.
    "fp4_e1m2": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    # 3 exponent bits (bias 3), no mantissa: zero and powers of two 2^-2 .. 2^4.
    "fp4_e3m0": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
}
# Exact integer images of the grids (grid · factor), used by 8-bit MMA kernels on pre-Blackwell GPUs:
# the factor is folded into the scale, so decoding to int8 loses nothing.
_FP4_INT_FACTOR = {"fp4_e2m1": 2, "fp4_e1m2": 4, "fp4_e3m0": 4}

FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class Format:
    """A number format. `maxval` is the largest code magnitude (INT) or value (FP)."""

    name: str
    kind: str  # "int", "fp8", "fp4", "block_fp4"
    bits: int
    maxval: float
    block_size: int | None = None  # for nvfp4 / mxfp4

    @property
    def is_int(self) -> bool:
        return self.kind == "int"


def _build_formats() -> dict[str, Format]:
    fmts = {f"int{n}": Format(f"int{n}", "int", n, float(2 ** (n - 1) - 1)) for n in range(2, 9)}
    fmts["fp8_e4m3"] = Format("fp8_e4m3", "fp8", 8, FP8_E4M3_MAX)
    for name, grid in _FP4_GRIDS.items():
        fmts[name] = Format(name, "fp4", 4, grid[-1])
    fmts["nvfp4"] = Format("nvfp4", "block_fp4", 4, 6.0, block_size=16)
    fmts["mxfp4"] = Format("mxfp4", "block_fp4", 4, 6.0, block_size=32)
    return fmts


_FORMATS = _build_formats()
FORMAT_NAMES = tuple(_FORMATS)


def get_format(name: str | Format) -> Format:
    if isinstance(name, Format):
        return name
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMAT_NAMES)}") from None


def all_finite(x: torch.Tensor) -> bool:
    """Whether x holds no NaN/±Inf, from its absmax (amax propagates NaN): one reduction, several times
    faster on the CPU than reducing isfinite(x)."""
    return x.numel() == 0 or bool(torch.isfinite(x.abs().amax()))


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise a clear error for NaN/Inf: a scale computed from them would silently poison every code."""
    if x.is_floating_point() and not all_finite(x):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} Inf); "
                         "quantization needs finite data")


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [...]: which rows (over the last dimension) of x hold a NaN or ±Inf: those whose absmax is not
    finite (amax propagates NaN), six times faster on the CPU than reducing isfinite(x)."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    return ~torch.isfinite(x.abs().amax(dim=-1))


def mark_nonfinite_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                        row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of a row-wise activation quantizer with every row of x that holds NaN/±Inf marked:
    its codes 0 and its scale NaN, so whatever consumes the row (dequantization, an INT8 GEMM's
    epilogue) gives NaN for it. `scale` has x's row shape (x.shape[:-1]). A caller that has the rows'
    absmax passes it as row_absmax: it is non-finite exactly where the row is (amax propagates NaN),
    which spares a pass over x; and when no row is bad, codes and scale come back as they are."""
    bad = nonfinite_rows(x) if row_absmax is None else ~torch.isfinite(row_absmax)
    if not bad.any():
        return codes, scale
    return (torch.where(bad[..., None], torch.zeros_like(codes), codes),
            torch.where(bad, torch.full_like(scale, float("nan")), scale))


# ----------------------------------------------------------------------------------------------- INT

def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8 (int8 containers), got {bits!r}")


def int_qmax(bits: int) -> int:
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def int_qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    qmax = int_qmax(bits)
    return (-qmax, qmax) if symmetric else (-qmax - 1, qmax)


def absmax_scale(absmax: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """scale = absmax / maxval, in fp32 with IEEE division (kernels use div_rn to match bit for bit)."""
    return absmax.float() / get_format(fmt).maxval


def _safe_div(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in fp32, treating a zero scale as 1 (its data is all zero, or it is forced to code 0)."""
    scale = scale.float()
    return x.float() / torch.where(scale == 0, torch.ones_like(scale), scale)


def _zero_where_scale_is_zero(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q with code 0 wherever its (broadcast) scale is 0; a pass over q only when some scale is."""
    zero_scale = torch.as_tensor(scale).float() == 0
    return torch.where(zero_scale, torch.zeros_like(q), q) if zero_scale.any() else q


def quantize_int(x: torch.Tensor, scale: torch.Tensor, bits: int,
                 zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Codes q = clamp(round_half_even(x / scale) + z, qmin, qmax) as int8. `scale` broadcasts against x.

    Symmetric when zero_point is None (codes in ±qmax), else asymmetric (codes in [-qmax-1, qmax]).
    """
    qmin, qmax = int_qrange(bits, symmetric=zero_point is None)
    q = _zero_where_scale_is_zero(torch.round(_safe_div(x, scale)), scale)  # torch.round: half to even
    if zero_point is not None:
        q = q + zero_point.float()
    return q.clamp(qmin, qmax).to(torch.int8)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    qf = q.float()
    if zero_point is not None:
        qf = qf - zero_point.float()
    return qf * scale.float()


def asymmetric_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) mapping [min(xmin,0), max(xmax,0)] onto the full signed range of `bits`."""
    qmin, qmax = int_qrange(bits, symmetric=False)
    lo = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    hi = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    scale = (hi - lo) / (qmax - qmin)
    zero = torch.round(qmin - lo / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(qmin, qmax)
    return scale, zero.to(torch.int32)


# ----------------------------------------------------------------------------------------------- FP4

def _fp4_name(fmt: str | Format) -> str:
    f = get_format(fmt)
    if f.kind == "block_fp4":
        return "fp4_e2m1"  # NVFP4 and MXFP4 elements are E2M1
    if f.kind != "fp4":
        raise ValueError(f"{f.name} is not a 4-bit float format")
    return f.name


def fp4_grid(fmt: str | Format) -> torch.Tensor:
    """The 8 non-negative magnitudes of a 4-bit float format, ascending (fp32)."""
    return torch.tensor(_FP4_GRIDS[_fp4_name(fmt)], dtype=torch.float32)


def fp4_table(fmt: str | Format) -> torch.Tensor:
    """16-entry decode table: code c -> value (codes 8..15 are the negatives; code 8 decodes to -0.0)."""
    g = fp4_grid(fmt)
    return torch.cat([g, -g])


def fp4_int_table(fmt: str | Format) -> tuple[torch.Tensor, int]:
    """(int8 table[16], factor): table[c] == fp4_table[c] · factor exactly, for 8-bit MMA decoding."""
    name = _fp4_name(fmt)
    factor = _FP4_INT_FACTOR[name]
    return (fp4_table(name) * factor).to(torch.int8), factor


def fp4_midpoints(fmt: str | Format) -> torch.Tensor:
    """The 7 rounding boundaries of a 4-bit float format (midpoints of adjacent magnitudes, exact in fp32)."""
    grid = fp4_grid(fmt)
    return (grid[1:] + grid[:-1]) / 2


def _round_to_grid(mag: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest grid value to mag >= 0; ties go to the even index; saturates at the top.
    Computed as the kernels do: the number of midpoints strictly below mag, plus one where mag sits exactly
    on an odd midpoint (between grid[j] and grid[j + 1] for odd j, the tie goes up to j + 1). Seven
    compares per element: three times faster on the CPU than torch.bucketize; a NaN gives index 0."""
    idx = torch.zeros(mag.shape, dtype=torch.uint8, device=mag.device)
    for j, mid in enumerate(((grid[1:] + grid[:-1]) / 2).tolist()):  # midpoints, exact in fp32
        idx += mag > mid
        if j % 2:
            idx += mag == mid
    return idx


def quantize_fp4(x: torch.Tensor, scale: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """4-bit codes (uint8 in 0..15) of x / scale rounded to the format's grid, saturating."""
    grid = fp4_grid(fmt).to(x.device)
    xs = _safe_div(x, scale)
    idx = _round_to_grid(xs.abs(), grid)
    sign = ((xs < 0) & (idx > 0)).to(torch.uint8)  # canonical zero: no -0 code
    return _zero_where_scale_is_zero(idx | (sign << 3), scale)


def dequantize_fp4(codes: torch.Tensor, scale: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    return fp4_table(fmt).to(codes.device)[codes.long()] * scale.float()


# ----------------------------------------------------------------------------------------------- FP8

def quantize_fp8_e4m3(x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """float8_e4m3fn of x / scale, round to nearest even, saturating at ±448 (the cast alone gives NaN)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return _safe_div(x, scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


# ------------------------------------------------------------------------------------------- packing

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (values 0..15, any integer dtype) per uint8 along the last dim (must be even)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed 4-bit data must be uint8, got {packed.dtype}")
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes in [-8, 7] (two's complement nibbles) packed two per byte."""
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    return pack_nibbles(q.to(torch.int16) & 0xF)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n = unpack_nibbles(packed).to(torch.int16)
    return torch.where(n >= 8, n - 16, n).to(torch.int8)


# ------------------------------------------------------------------------------- block-scaled FP4

def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the block size {block}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quantize_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4: E2M1 codes in 16-element blocks, an E4M3 scale per block and one fp32 tensor scale.

    tensor_scale = amax / (6 · 448) so that every block scale fits E4M3; block scale =
    e4m3(block_amax / 6 / tensor_scale). Returns (packed uint8 [..., K/2], block scales float8_e4m3fn
    [..., K/16], tensor_scale fp32 scalar).
    """
    check_finite(x, "nvfp4 input")
    xb = _blocks(x, 16)
    tensor_scale = xb.abs().amax() / (6.0 * FP8_E4M3_MAX)
    ts = tensor_scale if float(tensor_scale) > 0 else torch.ones_like(tensor_scale)
    block_scale = quantize_fp8_e4m3(xb.abs().amax(-1) / 6.0 / ts)
    eff = block_scale.float() * ts
    codes = quantize_fp4(xb, eff[..., None], "fp4_e2m1")
    return pack_nibbles(codes.flatten(-2)), block_scale, tensor_scale


def nvfp4_scales_fp32(block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The fp32 scale of every 16-element NVFP4 block: e4m3 block scale × fp32 tensor scale (one fp32
    product, as dequantize_nvfp4 and the block-scaled GEMMs apply it)."""
    return block_scale.float() * tensor_scale.float()


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    return dequantize_blockwise(unpack_nibbles(packed), nvfp4_scales_fp32(block_scale, tensor_scale), "fp4_e2m1")


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP MX): E2M1 codes in 32-element blocks with a shared E8M0 power-of-two scale.

    scale = 2^(floor(log2(block_amax)) - 2) (2 is E2M1's largest exponent), stored as a biased uint8
    exponent (bias 127); an all-zero block stores 0 (2^-127). Values above 6·scale saturate.
    Returns (packed uint8 [..., K/2], scales uint8 [..., K/32]).
    """
    check_finite(x, "mxfp4 input")
    xb = _blocks(x, 32)
    amax = xb.abs().amax(-1)
    _, e = torch.frexp(amax)  # amax = m · 2^e with m in [0.5, 1): floor(log2 amax) = e - 1
    exp = torch.where(amax > 0, e - 1 - 2, torch.full_like(e, -127)).clamp(-127, 127)
    scale = torch.ldexp(torch.ones_like(amax), exp)
    codes = quantize_fp4(xb, scale[..., None], "fp4_e2m1")
    return pack_nibbles(codes.flatten(-2)), (exp + 127).to(torch.uint8)


def mxfp4_scales_fp32(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 block scales (uint8 biased exponents) as fp32 2^(e − 127); 0xFF is the format's NaN.
    2^-127 is an fp32 subnormal, represented exactly."""
    if scales.dtype != torch.uint8:
        raise TypeError(f"E8M0 scales must be uint8 biased exponents, got {scales.dtype}")
    e = scales.to(torch.int32)
    pow2 = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 127)
    return torch.where(e == 255, torch.full_like(pow2, float("nan")), pow2)


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return dequantize_blockwise(unpack_nibbles(packed), mxfp4_scales_fp32(scales), "fp4_e2m1")


# ------------------------------------------------------------------ 4-bit codes with block scales
#
# The W4A4 GEMM's operands (FP4 as HQ-DiT, and INT4 at equal bits): 4-bit codes packed two per byte
# along K (element 2i in the low nibble: the OCP MX / NVFP4 / torch.float4_e2m1fn_x2 order) and one fp32
# scale per block of `block` consecutive elements along K. NVFP4 and MXFP4 tensors are this layout
# with their block scales converted by nvfp4_scales_fp32 / mxfp4_scales_fp32.
# GPUs before Blackwell have no 4-bit MMA: kernels decode every nibble through code4_int_table to an
# exact int8 (value × factor) and run the int8 MMA; 1/(factor_a · factor_w), a power of two, is applied
# to the fp32 result exactly. E3M0 × 4 reaches 64, so its integer grid fits int8 too (no FP8 needed),
# and |products| <= 64 · 64 keep int32 (and fp32 block sums up to 4096 elements) exact.

FOUR_BIT_FORMATS = ("int4", "fp4_e2m1", "fp4_e1m2", "fp4_e3m0")


def _four_bit(fmt: str | Format) -> Format:
    f = get_format(fmt)
    if f.name not in FOUR_BIT_FORMATS:
        raise ValueError(f"{f.name} is not a 4-bit code format; expected one of {FOUR_BIT_FORMATS}")
    return f


def code4_int_table(fmt: str | Format) -> tuple[torch.Tensor, int]:
    """(int8 table[16], factor): table[nibble] = decoded value × factor exactly, for a nibble as
    pack_4bit stores it (INT4: two's complement, factor 1; FP4: sign bit 3, see fp4_int_table)."""
    f = _four_bit(fmt)
    if f.is_int:
        return torch.tensor([*range(8), *range(-8, 0)], dtype=torch.int8), 1
    return fp4_int_table(f)


def pack_4bit(codes: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Codes of a 4-bit format (int8 INT4 codes or uint8 FP4 codes) packed two per byte along the last dim."""
    return pack_int4(codes) if _four_bit(fmt).is_int else pack_nibbles(codes)


def unpack_4bit(packed: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    return unpack_int4(packed) if _four_bit(fmt).is_int else unpack_nibbles(packed)


def quantize_blockwise(x: torch.Tensor, fmt: str | Format, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-block quantization along the last dim: (codes [..., K], scale f32 [..., K/block]).

    scale = absmax(block) / maxval (7 for INT4, E2M1 6, E1M2 1.75, E3M0 16); codes by quantize_int (±7) or
    quantize_fp4. A block holding NaN or Inf gets a NaN scale and zero codes, so everything computed from
    it is NaN instead of a plausible number.
    """
    f = _four_bit(fmt)
    if not isinstance(block, int) or block <= 0 or block % 2:
        raise ValueError(f"block must be a positive even int, got {block!r}")
    xb = _blocks(x, block)
    absmax = xb.abs().amax(-1)
    finite = torch.isfinite(absmax)  # amax propagates NaN: non-finite exactly where the block is
    scale = absmax_scale(torch.where(finite, absmax, torch.zeros_like(absmax, dtype=torch.float32)), f)
    codes = quantize_int(xb, scale[..., None], 4) if f.is_int else quantize_fp4(xb, scale[..., None], f)
    return codes.flatten(-2), torch.where(finite, scale, torch.full_like(scale, float("nan")))


def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """codes [..., K] (unpacked) × their block's scale [..., K/block] -> fp32 [..., K]."""
    f = _four_bit(fmt)
    block = codes.shape[-1] // max(scale.shape[-1], 1)
    cb = codes.reshape(*codes.shape[:-1], scale.shape[-1], block)
    vals = dequantize_int(cb, scale[..., None]) if f.is_int else dequantize_fp4(cb, scale[..., None], f)
    return vals.flatten(-2)


# ------------------------------------------------------------------------------------------ weights

@dataclass
class QuantizedWeight:
    """Weight codes [N, K] (int8 for INT, uint8 4-bit codes for FP4, float8 for FP8), unpacked, plus
    scales [N] (per output channel) or [N, K / group_size] (per group along K)."""

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: str
    group_size: int | None = None
    zero_point: torch.Tensor | None = None


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return w.float()[:, None, :]  # [N, 1, K]: one group spanning K
    if group_size <= 0 or w.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide in_features {w.shape[1]}")
    return w.float().reshape(w.shape[0], w.shape[1] // group_size, group_size)


def quantize_weight(w: torch.Tensor, fmt: str | Format, group_size: int | None = None,
                    clip_ratio: torch.Tensor | float = 1.0, symmetric: bool = True,
                    scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest weight quantization with absmax (× clip_ratio) scales per channel or group.

    clip_ratio broadcasts against the scale ([N] or [N, G]); calibration methods pass searched clips.
    `scale` ([N] or [N, K / group_size], symmetric formats only) replaces the absmax scales: a weight
    already on a calibrated grid (GPTQ) keeps exactly the codes it was rounded to.
    """
    f = get_format(fmt)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    check_finite(w, "weight")
    wg = _grouped(w, group_size)
    clip = torch.as_tensor(clip_ratio, dtype=torch.float32)
    clip = clip[:, None] if clip.ndim == 1 else clip  # per-channel clips apply to every group
    zero = None
    if f.is_int and not symmetric:
        if scale is not None:
            raise ValueError("explicit weight scales are supported for symmetric formats only")
        scale, zero = asymmetric_params(wg.amin(-1) * clip, wg.amax(-1) * clip, f.bits)
        codes = quantize_int(wg, scale[..., None], f.bits, zero[..., None])
    elif f.kind == "block_fp4":
        raise ValueError(f"{f.name} carries its own block scales: use quantize_{f.name}")
    else:
        if scale is None:
            scale = absmax_scale(wg.abs().amax(-1) * clip, f)
        else:
            scale = scale.float().reshape(wg.shape[:2]).to(wg.device)
            check_finite(scale, "weight scale")
            if bool((scale < 0).any()):
                raise ValueError("explicit weight scales must be non-negative")
        if f.is_int:
            codes = quantize_int(wg, scale[..., None], f.bits)
        elif f.kind == "fp4":
            codes = quantize_fp4(wg, scale[..., None], f)
        else:
            codes = quantize_fp8_e4m3(wg, scale[..., None])
    if group_size is None:
        scale = scale[:, 0]
        zero = None if zero is None else zero[:, 0]
    return QuantizedWeight(codes.reshape(w.shape), scale, f.name, group_size, zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Symmetric quantize→dequantize of x with a given scale (broadcast against x) in any INT, FP8 or
    FP4 format: the value a kernel multiplies by (GPTQ's rounding, calibration searches)."""
    f = get_format(fmt)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if f.is_int:
        return dequantize_int(quantize_int(x, scale, f.bits), scale)
    if f.kind == "fp4":
        return dequantize_fp4(quantize_fp4(x, scale, f), scale, f)
    if f.kind == "fp8":
        return quantize_fp8_e4m3(x, scale).float() * scale
    raise ValueError(f"{f.name} carries its own block scales: use quantize_{f.name}")


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The float weights a kernel multiplies by: codes × scale (− zero point), shape [N, K]."""
    n, k = qw.codes.shape
    g = qw.group_size or k
    codes = qw.codes.reshape(n, k // g, g)
    scale = (qw.scale if qw.group_size else qw.scale[:, None])[..., None]
    zero = None if qw.zero_point is None else (qw.zero_point if qw.group_size else qw.zero_point[:, None])[..., None]
    f = get_format(qw.fmt)
    if f.is_int:
        out = dequantize_int(codes, scale, zero)
    elif f.kind == "fp4":
        out = dequantize_fp4(codes, scale, f)
    else:
        out = codes.float() * scale
    return out.reshape(n, k)


# ------------------------------------------------------------------------- two-region (MRQ) codes
#
# One signed int8 code serves both two-region quantizers of TQ-DiT (docs/formats.md, docs/methods.md). A code q
# decodes as  value = q · c_pos  if q >= 0,  q · c_neg  if q < 0,  so a GEMM consumes it exactly as two
# integer accumulations (positive and negative parts of the codes) scaled by c_pos and c_neg.
# * mode "sign" (post-GELU): c_pos = Δ₊ > 0 for x >= 0, c_neg = Δ₋ > 0 for x < 0.
# * mode "split" (post-softmax, x in [0, 1]): low region [0, p) has step Δ_lo = c_pos and
#   p = Δ_lo · qmax; the high region has step Δ_hi, stored as c_neg = -Δ_hi so that its codes are
#   negative and decode to positive values. The ratio Δ_hi / Δ_lo is a power of two in TQ-DiT.

TWO_REGION_MODES = ("sign", "split")
NONFINITE_CODE = -128  # a NaN/±Inf input: never a two-region code (they are ±qmax), decodes to NaN


def quantize_two_region(x: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor, bits: int,
                        mode: str) -> torch.Tensor:
    """Two-region codes (int8, ±qmax) of x; c_pos / c_neg broadcast against x (see the note above).
    A NaN or ±Inf element gets NONFINITE_CODE."""
    if mode not in TWO_REGION_MODES:
        raise ValueError(f"two-region mode must be one of {TWO_REGION_MODES}, got {mode!r}")
    qmax = int_qmax(bits)
    xf = x.float()
    c_pos, c_neg = torch.as_tensor(c_pos).float(), torch.as_tensor(c_neg).float()
    # one division per element by the step of its region (selected first: half the work of two divisions)
    if mode == "sign":
        q = torch.round(xf / torch.where(xf >= 0, c_pos, c_neg))
    else:
        low = xf < c_pos * qmax
        q = torch.round(xf / torch.where(low, c_pos, c_neg))
        # a value just under p can round up to qmax + 1 in the low region: the high region then holds it
        q = torch.where(low & (q > qmax), torch.round(xf / c_neg), q)
    q = q.clamp(-qmax, qmax)
    if not all_finite(xf):
        q = torch.where(torch.isfinite(xf), q, torch.full_like(q, NONFINITE_CODE))
    return q.to(torch.int8)


def dequantize_two_region(q: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor) -> torch.Tensor:
    """Values of two-region codes; NONFINITE_CODE decodes to NaN."""
    qf = q.float()
    out = qf * torch.where(qf >= 0, torch.as_tensor(c_pos).float(), torch.as_tensor(c_neg).float())
    return torch.where(q == NONFINITE_CODE, torch.full_like(out, float("nan")), out)
