"""Property tests of the number formats (the single source of quantization math)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dtq_kernels import formats as F

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
rows = st.lists(finite, min_size=1, max_size=64)


def all_e4m3_values() -> torch.Tensor:
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)].unique()


@pytest.mark.parametrize("bits", range(2, 9))
@given(data=rows)
@settings(max_examples=40, deadline=None)
def test_int_symmetric_round_trip_within_half_step(bits, data):
    x = torch.tensor(data)
    scale = F.absmax_scale(x.abs().amax(), f"int{bits}")
    q = F.quantize_int(x, scale, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax
    err = (F.dequantize_int(q, scale) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-6) + 1e-30).all())
    if float(scale) > 0:  # the absmax element maps to ±qmax exactly
        assert int(q.abs().max()) == qmax


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_int_grid_values_are_exact_and_ties_go_to_even(bits):
    qmax = 2 ** (bits - 1) - 1
    scale = torch.tensor(0.5)
    codes = torch.arange(-qmax, qmax + 1)
    assert torch.equal(F.quantize_int(codes * 0.5, scale, bits), codes.to(torch.int8))
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5]) * 0.5
    assert F.quantize_int(halves, scale, bits).tolist() == [0, 2, 2, 0, -2, -2]
    # saturation
    assert F.quantize_int(torch.tensor([1e9, -1e9]), scale, bits).tolist() == [qmax, -qmax]


def test_int_zero_scale_gives_zero_codes():
    q = F.quantize_int(torch.zeros(5), torch.tensor(0.0), 8)
    assert q.tolist() == [0] * 5


@pytest.mark.parametrize("bits", [4, 8])
@given(data=rows)
@settings(max_examples=40, deadline=None)
def test_int_asymmetric_round_trip(bits, data):
    x = torch.tensor(data)
    scale, zero = F.asymmetric_params(x.min(), x.max(), bits)
    q = F.quantize_int(x, scale, bits, zero)
    qmin, qmax = F.int_qrange(bits, symmetric=False)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (F.dequantize_int(q, scale, zero) - x).abs()
    # half a step, plus the half step the rounded zero point may shift the grid
    assert bool((err <= scale * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"])
def test_fp4_every_grid_value_is_exact(fmt):
    table = F.fp4_table(fmt)
    codes = F.quantize_fp4(table, torch.tensor(1.0), fmt)
    assert torch.equal(F.dequantize_fp4(codes, torch.tensor(1.0), fmt), table.abs() * torch.sign(table))
    assert int(codes[8]) == 0  # -0 is canonicalized to code 0


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"])
@given(data=rows)
@settings(max_examples=40, deadline=None)
def test_fp4_rounds_to_nearest_grid_value(fmt, data):
    x = torch.tensor(data)
    scale = F.absmax_scale(x.abs().amax(), fmt)
    deq = F.dequantize_fp4(F.quantize_fp4(x, scale, fmt), scale, fmt)
    grid = F.fp4_table(fmt)[:8] * scale
    xs = x.abs().clamp(max=float(grid[-1]))
    best = (xs[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.allclose((deq.abs() - xs).abs(), best, rtol=1e-6, atol=1e-30)


def test_fp4_ties_go_to_even_code():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    codes = F.quantize_fp4(mids, torch.tensor(1.0), "fp4_e2m1")
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert F.quantize_fp4(torch.tensor([100.0, -100.0]), torch.tensor(1.0), "fp4_e2m1").tolist() == [7, 15]


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"])
def test_fp4_int_tables_are_exact_multiples(fmt):
    table, factor = F.fp4_int_table(fmt)
    assert torch.equal(table.float(), F.fp4_table(fmt) * factor)


def test_fp8_e4m3_rounds_to_nearest_even_and_saturates():
    grid = all_e4m3_values()
    assert torch.equal(F.quantize_fp8_e4m3(grid).float(), grid)
    pos = grid[grid >= 0]
    mids = (pos[1:] + pos[:-1]) / 2
    got = F.quantize_fp8_e4m3(mids).float()
    lo_code = torch.arange(len(mids))  # index of the lower neighbour in pos: ties go to the even code
    lo_bits = pos[:-1].to(torch.float8_e4m3fn).view(torch.uint8)
    expect = torch.where(lo_bits % 2 == 0, pos[lo_code], pos[lo_code + 1])
    assert torch.equal(got, expect)
    assert F.quantize_fp8_e4m3(torch.tensor([1e6, -1e6])).float().tolist() == [448.0, -448.0]


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_nibble_packing_round_trip(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = F.pack_nibbles(c)
    assert packed.numel() == len(codes) // 2
    assert torch.equal(F.unpack_nibbles(packed), c)
    assert int(packed[0]) == codes[0] | (codes[1] << 4)


def test_int4_pack_round_trip_and_range_check():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(F.unpack_int4(F.pack_int4(q)), q)
    with pytest.raises(ValueError, match="int4"):
        F.pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match="even"):
        F.pack_nibbles(torch.zeros(3, dtype=torch.uint8))


def test_nvfp4_round_trip_and_zero_blocks():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    x[1, :16] = 0  # an all-zero block
    packed, bscale, tscale = F.quantize_nvfp4(x)
    assert packed.shape == (8, 32) and bscale.shape == (8, 4) and bscale.dtype == torch.float8_e4m3fn
    y = F.dequantize_nvfp4(packed, bscale, tscale)
    assert torch.equal(y[1, :16], torch.zeros(16))
    # error per element is at most half the E2M1 step at its magnitude (step 2 near 6) times block scale,
    # plus the block scale's own E4M3 rounding (relative 2^-4)
    eff = bscale.float() * tscale
    bound = (eff * 1.0).repeat_interleave(16, dim=1) * 1.0 + x.abs() * 2 ** -4
    assert bool(((y - x).abs() <= bound + 1e-7).all())


def test_mxfp4_power_of_two_scales():
    torch.manual_seed(1)
    x = torch.randn(4, 64) * 10
    x[2, 32:] = 0
    packed, scales = F.quantize_mxfp4(x)
    assert scales.dtype == torch.uint8 and scales.shape == (4, 2) and int(scales[2, 1]) == 0
    y = F.dequantize_mxfp4(packed, scales)
    amax = x.reshape(4, 2, 32).abs().amax(-1)
    expect_exp = torch.floor(torch.log2(amax[amax > 0])) - 2
    assert torch.equal(scales[amax > 0].float() - 127, expect_exp)
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=1)
    # E2M1 saturates at 6·scale, and amax/scale lies in [4, 8): saturation error is < 2·scale
    assert bool(((y - x).abs() <= 2 * scale).all())


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("int6", None), ("fp4_e2m1", 32),
                                       ("fp8_e4m3", None), ("fp4_e1m2", 16)])
def test_quantize_weight_round_trip(fmt, group):
    torch.manual_seed(2)
    w = torch.randn(48, 128)
    qw = F.quantize_weight(w, fmt, group_size=group)
    assert qw.scale.shape == ((48,) if group is None else (48, 128 // group))
    w_hat = F.dequantize_weight(qw)
    rel = float((w_hat - w).norm() / w.norm())
    limits = {"int8": 0.01, "int6": 0.04, "int4": 0.15, "fp4_e2m1": 0.15, "fp8_e4m3": 0.04, "fp4_e1m2": 0.15}
    assert rel < limits[fmt]


def test_asymmetric_weight_beats_symmetric_on_shifted_data():
    torch.manual_seed(3)
    w = torch.rand(16, 64)  # all positive: symmetric wastes the negative half of the grid
    sym = F.dequantize_weight(F.quantize_weight(w, "int4"))
    asym = F.dequantize_weight(F.quantize_weight(w, "int4", symmetric=False))
    assert (asym - w).norm() < 0.6 * (sym - w).norm()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad):
    w = torch.randn(4, 32)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        F.quantize_weight(w, "int8")
    with pytest.raises(ValueError, match="non-finite"):
        F.quantize_nvfp4(w)


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="unknown format"):
        F.get_format("int9")
    with pytest.raises(ValueError, match="bits"):
        F.int_qmax(9)
    with pytest.raises(ValueError, match="group_size"):
        F.quantize_weight(torch.randn(4, 30), "int4", group_size=32)
    with pytest.raises(ValueError, match="multiple of the block"):
        F.quantize_mxfp4(torch.randn(2, 48))
    assert math.isclose(F.get_format("fp4_e1m2").maxval, 1.75)


def test_two_region_sign_mode_post_gelu():
    x = torch.tensor([-0.17, -0.05, 0.0, 0.3, 5.0, 100.0])
    c_pos, c_neg = torch.tensor(0.05), torch.tensor(0.17 / 127)
    q = F.quantize_two_region(x, c_pos, c_neg, 8, "sign")
    assert q.tolist() == [-127, round(-0.05 / (0.17 / 127)), 0, 6, 100, 127]
    y = F.dequantize_two_region(q, c_pos, c_neg)
    assert torch.allclose(y[:5], torch.tensor([-0.17, -0.05, 0.0, 0.3, 5.0]), atol=float(c_neg) / 2 + 1e-6)


def test_two_region_split_mode_post_softmax():
    bits, qmax = 8, 127
    p = 2.0 ** -4
    d_lo, d_hi = p / qmax, 1.0 / qmax
    x = torch.tensor([0.0, p / 3, p * (1 - 1e-4), p, 0.5, 1.0])
    q = F.quantize_two_region(x, torch.tensor(d_lo), torch.tensor(-d_hi), bits, "split")
    assert int(q[0]) == 0 and 0 < int(q[1]) <= qmax and int(q[4]) < 0 and int(q[5]) == -qmax
    y = F.dequantize_two_region(q, torch.tensor(d_lo), torch.tensor(-d_hi))
    assert bool((y >= 0).all())
    low = x < p
    assert bool(((y - x).abs()[low] <= d_lo / 2 + 1e-9).all())
    assert bool(((y - x).abs()[~low] <= d_hi / 2 + 1e-9).all())
    # values in the low region keep 2^4 times finer resolution than a single 8-bit grid would give
    with pytest.raises(ValueError, match="mode"):
        F.quantize_two_region(x, d_lo, d_hi, 8, "both")


# ------------------------------------------------------- NVFP4 / MXFP4 layouts, worked by hand

def test_nvfp4_worked_by_hand():
    # amax 10.5 = 6 · 448 · 2^-8: tensor scale 2^-8. Block 1 (amax 10.5): E4M3 block scale 10.5/6/2^-8 = 448,
    # effective 1.75. Block 2 (amax 1.0): 1/6/2^-8 = 42.67 -> E4M3 44 (grid step 4 in [32, 64)), effective
    # 0.171875. x/1.75: 6, -3, 1.5, 0.5, 0, 2.5 (tie 2|3 -> even code 4: 2), 5 (tie 4|6 -> code 6: 4), -1;
    # x/0.171875: 5.82 -> 6, 2.91 -> 3, -0.58 -> -0.5, 0.23 -> 0.
    x = torch.zeros(1, 32)
    x[0, :8] = torch.tensor([10.5, -5.25, 2.625, 0.875, 0.0, 4.375, 8.75, -1.75])
    x[0, 16:20] = torch.tensor([1.0, 0.5, -0.1, 0.04])
    packed, bscale, tscale = F.quantize_nvfp4(x)
    assert float(tscale) == 2.0 ** -8 and bscale.float().tolist() == [[448.0, 44.0]]
    # codes 7, 13, 3, 1, 0, 4, 6, 10 | 7, 5, 9, 0; element 2i in the low nibble of byte i
    assert packed[0, :4].tolist() == [7 | 13 << 4, 3 | 1 << 4, 0 | 4 << 4, 6 | 10 << 4]
    assert packed[0, 8:10].tolist() == [7 | 5 << 4, 9] and int(packed[0, 4:8].sum() + packed[0, 10:].sum()) == 0
    y = F.dequantize_nvfp4(packed, bscale, tscale)
    assert y[0, :8].tolist() == [10.5, -5.25, 2.625, 0.875, 0.0, 3.5, 7.0, -1.75]
    assert y[0, 16:20].tolist() == [1.03125, 0.515625, -0.0859375, 0.0]
    assert torch.equal(F.nvfp4_scales_fp32(bscale, tscale), torch.tensor([[1.75, 0.171875]]))
    # the same codes and fp32 block scales are the W4A4 GEMM's operand layout
    codes, scale = F.unpack_4bit(packed, "fp4_e2m1"), F.nvfp4_scales_fp32(bscale, tscale)
    assert torch.equal(F.dequantize_blockwise(codes, scale, "fp4_e2m1"), y)


def test_mxfp4_worked_by_hand():
    # block 1 amax 5: E8M0 exponent floor(log2 5) - 2 = 0 (stored 127), scale 1: 5 (tie 4|6 -> 4),
    # -0.75 (tie 0.5|1 -> even code 2: -1), 2.4 -> 2, 0.2 -> 0, 3 -> 3.
    # block 2 amax 100: exponent 6 - 2 = 4 (stored 131), scale 16: 6.25 saturates to 6 (96), -2.5 -> -2 (-32).
    # block 3 all zero: stored 0.
    x = torch.zeros(1, 96)
    x[0, :5] = torch.tensor([5.0, -0.75, 2.4, 0.2, 3.0])
    x[0, 32:34] = torch.tensor([100.0, -40.0])
    packed, scales = F.quantize_mxfp4(x)
    assert scales.tolist() == [[127, 131, 0]]
    assert packed[0, :3].tolist() == [6 | 10 << 4, 4 | 0 << 4, 5] and packed[0, 16].tolist() == 7 | 12 << 4
    y = F.dequantize_mxfp4(packed, scales)
    assert y[0, :5].tolist() == [4.0, -1.0, 2.0, 0.0, 3.0] and y[0, 32:34].tolist() == [96.0, -32.0]
    assert int(y.ne(0).sum()) == 6
    # E8M0: 2^(e - 127), 0xFF is NaN; only uint8 exponents are accepted
    s = F.mxfp4_scales_fp32(torch.tensor([0, 126, 127, 131, 254, 255], dtype=torch.uint8))
    assert s[:5].tolist() == [2.0 ** -127, 0.5, 1.0, 16.0, 2.0 ** 127] and bool(s[5].isnan())
    with pytest.raises(TypeError, match="uint8"):
        F.mxfp4_scales_fp32(torch.tensor([127]))


@pytest.mark.parametrize("fmt", F.FOUR_BIT_FORMATS)
def test_blockwise_round_trip_and_pack(fmt):
    torch.manual_seed(5)
    x = torch.randn(6, 128) * torch.logspace(-3, 3, 6)[:, None]
    x[1, :32] = 0
    codes, scale = F.quantize_blockwise(x, fmt, 32)
    assert scale.shape == (6, 4) and float(scale[1, 0]) == 0 and int(codes[1, :32].abs().sum()) == 0
    assert torch.equal(F.unpack_4bit(F.pack_4bit(codes, fmt), fmt), codes)
    y = F.dequantize_blockwise(codes, scale, fmt)
    # each block's absmax element is exact up to the division's rounding, the rest within the grid's
    # largest half step: 1/2 (INT4, of 7 levels), 1 (E2M1, 4 -> 6), 0.125 (E1M2), 4 (E3M0, 8 -> 16)
    half_step = {"int4": 0.5, "fp4_e2m1": 1.0, "fp4_e1m2": 0.125, "fp4_e3m0": 4.0}[fmt]
    bound = (scale * half_step * (1 + 1e-6)).repeat_interleave(32, dim=1)
    assert bool(((y - x).abs() <= bound).all())
    assert torch.allclose(y.reshape(6, 4, 32).abs().amax(-1), x.reshape(6, 4, 32).abs().amax(-1), rtol=1e-6)


def test_explicit_weight_scales_keep_a_calibrated_grid():
    """A weight already on a grid (GPTQ's output) re-quantized with that grid's scales keeps its codes."""
    from dtq_kernels.formats import dequantize_weight, fake_quantize, quantize_weight
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    for fmt, gs in (("fp4_e1m2", 32), ("fp4_e3m0", 16), ("int4", None), ("int8", 32)):
        qw = quantize_weight(w, fmt, gs, clip_ratio=0.8)
        again = quantize_weight(dequantize_weight(qw), fmt, gs, scale=qw.scale)
        assert torch.equal(again.codes, qw.codes) and torch.equal(again.scale, qw.scale)
        scale = qw.scale if gs is None else qw.scale.repeat_interleave(gs, 1)
        assert torch.equal(fake_quantize(w, scale if gs else scale[:, None], fmt), dequantize_weight(qw))
    with pytest.raises(ValueError, match="symmetric formats only"):
        quantize_weight(w, "int4", symmetric=False, scale=torch.ones(8))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(w, "int4", scale=torch.full((8,), float("nan")))
