"""Per-group W4A8 (int8_gemm with w_scale [N, K/G]), W4A16 (w4a16_gemm), FP8 W8A8 (fp8_gemm) and the
FP8 activation quantizer (quantize_act_fp8): Triton (interpreted) vs the reference, clear errors, opcheck,
torch.compile.

Tolerances, by format:
* per-group W4A8: every group's int32 product is exact and the kernel adds the scaled groups in the
  reference's order, so the interpreter is bit-identical (torch.equal); a GPU may contract each
  multiply-add into an FMA, one rounding (2^-24 of the terms) per group plus the epilogue's.
* W4A16 and FP8: the products are exact in fp32 (16-bit x int4 codes, or per group 16-bit x the 16-bit
  dequantized weights, which every backend rounds identically; e4m3 x e4m3) but their sums are
  rounded in the kernel's order, which differs from the fp32 matmul's: each sum of n terms is off by at
  most n·2^-24·Σ|terms| for either, so |Δ| ≤ 2·(K + 4)·2^-24·mag (mag = the same sum of |terms|), plus
  one unit in the last place of a fp16/bf16 output. When every partial sum is an exact fp32 integer
  (FP8 codes that are small integers) the kernel must be bit-exact.
* quantize_act_fp8: without rotation absmax, two correctly rounded divisions and the e4m3 rounding are
  exact, so codes and scales are bit-identical; a rotation reassociates sums (scales within 1e-5, codes
  within one e4m3 step), as for the int8 quantizer.
"""
import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels import formats
from dtq_kernels.ops import reference
from dtq_kernels.ops.triton import gemm_int8

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(op, args, backend="triton"):
    with ops.use_backend(backend):
        out = getattr(ops, op)(*args)
    assert ops.last_backend[op] == backend
    return out


def assert_close_sum(out, ref, mag, k):
    """The float-accumulation bound of the module docstring."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = 2 * (k + 4) * 2.0 ** -24 * mag + ULP[out.dtype] * ref.float().abs()
    err = (out.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"


def grouped_args(m, k, n, group, out_dtype, seed=0, packed=True, static=False, bias=True):
    g = gen(seed)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    w_s = torch.rand(n, k // group, generator=g) * 1e-3 + 1e-5
    b = torch.randn(n, generator=g) if bias else None
    w_arg = formats.pack_int4(w) if packed else w
    if static:
        return "int8_gemm_static", (a, torch.rand(3, generator=g) * 0.05, torch.tensor([2], dtype=torch.int32),
                                    w_arg, w_s, b, out_dtype)
    return "int8_gemm", (a, torch.rand(m, generator=g) * 0.05, w_arg, w_s, b, out_dtype)


# ------------------------------------------------------------------------------- per-group W4A8

@pytest.mark.parametrize("m,k,n", [(1, 256, 72), (77, 384, 130), (1000, 256, 200)])
def test_grouped_w4a8_bit_exact_every_dtype(m, k, n):
    for i, dtype in enumerate(OUT_DTYPES):
        group = (64, 128)[(i + m) % 2]
        op, args = grouped_args(m, k, n, group, dtype, seed=m + i, static=i == 1, bias=i != 2)
        out = run(op, args)
        ref = run(op, args, "reference")
        assert out.dtype == dtype and torch.equal(out, ref), (dtype, group)


def test_grouped_is_the_sum_of_per_group_products():
    # independent computation: each group through the per-channel op with its own scale column
    op, args = grouped_args(33, 256, 96, 64, torch.float32, seed=4, packed=False, bias=False)
    a, a_s, w, w_s, _, _ = args
    parts = [ops.int8_gemm(a[:, i * 64:(i + 1) * 64].contiguous(), torch.ones(33), w[:, i * 64:(i + 1) * 64].contiguous(),
                           w_s[:, i].contiguous(), None, torch.float32) for i in range(4)]
    expected = (((parts[0] + parts[1]) + parts[2]) + parts[3]) * a_s[:, None]
    assert torch.equal(run(op, args), expected)
    # packed int4 and int8 containers of the same codes give the same result
    packed = (a, a_s, formats.pack_int4(w), w_s, None, torch.float32)
    assert torch.equal(run(op, packed), run(op, args))


@pytest.mark.parametrize("group", [None, 64])
def test_w4a8_split_k_matches_reference(group):
    # the tiny-M GPU config: 16-row tile, K split over 4 programs; each split's groups are exact and
    # scaled as in the reference, only the fp32 additions of the splits' partials are reordered
    op, args = grouped_args(3, 1024, 128, group or 64, torch.bfloat16, seed=7)
    a, a_s, w, w_s, b, dt = args
    if group is None:
        w_s = w_s[:, 0].contiguous()
    cfg = gemm_int8.GemmConfig(16, 64, group or 128, 4, 1, 8, 4)
    out = gemm_int8.launch(a, w, w_s, b, dt, a_scale=a_s, ascale=gemm_int8.PER_ROW, config=cfg)
    ref = reference.int8_gemm(a, a_s, w, w_s, b, dt)
    codes = formats.unpack_int4(w).abs()
    mag = (reference.group_scaled_matmul(a.abs(), codes, w_s) if group else
           reference.int_matmul(a.abs(), codes).float() * w_s) * a_s[:, None] + b.abs()
    assert_close_sum(out, ref, mag, 1024 // (group or 1024) + 8)


@pytest.mark.parametrize("m,k,n,group", [(16, 1152, 256, 128), (8, 4608, 128, 64), (4, 3072, 128, 128)])
def test_grouped_w4a8_model_widths(m, k, n, group):
    op, args = grouped_args(m, k, n, group, torch.bfloat16, seed=k)
    assert torch.equal(run(op, args), run(op, args, "reference"))


# ------------------------------------------------------------------------------------ W4A16

def w4a16_args(m, k, n, group, x_dtype, out_dtype, seed=0, bias=True):
    g = gen(seed)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    x[:, 3] *= 30  # an outlier channel
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    w_s = (torch.rand(n, generator=g) if group is None else torch.rand(n, k // group, generator=g)) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    return (x, formats.pack_int4(codes), w_s, b, out_dtype), codes


def w4a16_mag(args, codes):
    x, _, w_s, b, _ = args
    if w_s.dim() == 1:
        mag = (x.float().abs() @ codes.float().abs().T) * w_s
    else:  # per group: the sum runs over x times the 16-bit dequantized weights
        mag = x.float().abs() @ reference.dequantize_w4_groups(codes, w_s, x.dtype).float().abs().T
    return mag if b is None else mag + b.abs()


@pytest.mark.parametrize("m,k,n", [(1, 256, 72), (77, 384, 130), (1000, 256, 200)])
def test_w4a16_matches_reference_every_dtype(m, k, n):
    for i, out_dtype in enumerate(OUT_DTYPES):
        group = (None, 64, 128)[(i + m) % 3]
        x_dtype = torch.bfloat16 if i % 2 == 0 else torch.float16
        args, codes = w4a16_args(m, k, n, group, x_dtype, out_dtype, seed=m + i, bias=i != 1)
        assert_close_sum(run("w4a16_gemm", args), run("w4a16_gemm", args, "reference"), w4a16_mag(args, codes), k)


def test_w4a16_ragged_k_per_channel_and_dit_widths():
    args, codes = w4a16_args(5, 200, 64, None, torch.bfloat16, torch.float32)  # K not a multiple of the tile
    assert_close_sum(run("w4a16_gemm", args), run("w4a16_gemm", args, "reference"), w4a16_mag(args, codes), 200)
    args, codes = w4a16_args(2, 4608, 128, 128, torch.bfloat16, torch.bfloat16, seed=3)
    assert_close_sum(run("w4a16_gemm", args), run("w4a16_gemm", args, "reference"), w4a16_mag(args, codes), 4608)


def test_w4a16_split_k_matches_reference():
    # the tiny-M GPU config: 16-row tile, K split over 4 programs, partials reduced in order (+ bias)
    args, codes = w4a16_args(3, 1024, 128, 128, torch.bfloat16, torch.bfloat16, seed=5)
    x, w, w_s, b, dt = args
    cfg = gemm_int8.GemmConfig(16, 64, 128, 4, 1, 8, 4)
    out = gemm_int8.launch(x, w, w_s, b, dt, a_scale=None, ascale=gemm_int8.NO_ASCALE, config=cfg)
    assert_close_sum(out, reference.w4a16_gemm(*args), w4a16_mag(args, codes), 1024)


@pytest.mark.parametrize("x_dtype,unit", [(torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)])
def test_w4a16_is_x_times_dequantized_weight(x_dtype, unit):
    # independent of the reference: formats' fp32 dequantization, rounded to x's 16-bit type (per group),
    # in float64; and that rounding moves each weight by at most half a unit of its 16-bit value, far
    # below the int4 step itself
    args, codes = w4a16_args(20, 256, 64, 64, x_dtype, torch.float32, seed=6)
    x, w, w_s, b, _ = args
    dq = formats.dequantize_weight(formats.QuantizedWeight(codes, w_s, "int4", 64))
    out = run("w4a16_gemm", args).double()
    expected = x.double() @ dq.to(x_dtype).double().T + b.double()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4)
    exact = x.double() @ dq.double().T + b.double()
    mag = x.double().abs() @ dq.double().abs().T
    assert bool(((out - exact).abs() <= unit / 2 * mag + 1e-4).all())


# -------------------------------------------------------------------------------------- FP8

def fp8_args(m, k, n, out_dtype, seed=0, small_ints=False, per_tensor=False, bias=True):
    g = gen(seed)
    if small_ints:  # integers |v| <= 16 are exact e4m3 values; every partial sum is an exact fp32 integer
        a = torch.randint(-16, 17, (m, k), generator=g).float()
        w = torch.randint(-16, 17, (n, k), generator=g).float()
    else:
        a, w = torch.randn(m, k, generator=g) * 40, torch.randn(n, k, generator=g) * 40
        a[:, 5] *= 10
    a8, w8 = formats.quantize_fp8_e4m3(a), formats.quantize_fp8_e4m3(w)
    a_s = torch.rand(1 if per_tensor else m, generator=g) * 0.01
    w_s = torch.rand(n, generator=g) * 0.01
    b = torch.randn(n, generator=g) if bias else None
    mag = (a8.float().abs() @ w8.float().abs().T) * a_s[:, None] * w_s
    return (a8, a_s, w8, w_s, b, out_dtype), (mag if b is None else mag + b.abs())


@pytest.mark.parametrize("m,k,n", [(1, 256, 72), (77, 200, 130), (1000, 256, 200)])
def test_fp8_gemm_matches_reference_every_dtype(m, k, n):
    for i, dtype in enumerate(OUT_DTYPES):
        args, mag = fp8_args(m, k, n, dtype, seed=m + i, per_tensor=i == 2, bias=i != 1)
        assert_close_sum(run("fp8_gemm", args), run("fp8_gemm", args, "reference"), mag, k)


def test_fp8_gemm_exact_when_sums_are_exact():
    args, _ = fp8_args(64, 1152, 256, torch.float32, seed=9, small_ints=True, bias=False)
    a8, a_s, w8, w_s, _, _ = args
    ones = (a8, torch.ones(64), w8, torch.ones(256), None, torch.float32)
    exact = a8.float().double() @ w8.float().double().T
    assert torch.equal(run("fp8_gemm", ones).double(), exact)
    assert torch.equal(run("fp8_gemm", args), run("fp8_gemm", args, "reference"))


def test_quantize_act_fp8_bit_exact_and_rotated():
    g = gen(11)
    x = torch.randn(77, 1152, generator=g) * 2
    x[:, 10] *= 50
    x[3] = 0  # a zero row: scale 0, codes 0
    smooth = torch.rand(1152, generator=g) + 0.5
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        q, s = run("quantize_act_fp8", (xd, smooth, False))
        q_ref, s_ref = reference.quantize_act_fp8(xd, smooth, False)
        # equal values (a tiny negative may round to -0 in one and +0 in the other: the same zero)
        assert q.dtype == torch.float8_e4m3fn and torch.equal(s, s_ref)
        assert torch.equal(q.float(), q_ref.float()) and float(s[3]) == 0
    q, s = run("quantize_act_fp8", (x, smooth, True))
    q_ref, s_ref = reference.quantize_act_fp8(x, smooth, True)
    assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)
    step = 2.0 ** (torch.floor(torch.log2(q_ref.float().abs().clamp(min=2 ** -6))) - 3)  # one e4m3 step
    assert bool(((q.float() - q_ref.float()).abs() <= step + 1e-12).all())


def test_quantize_act_fp8_then_gemm_is_close_to_float():
    g = gen(12)
    x, wf = torch.randn(64, 1152, generator=g), torch.randn(256, 1152, generator=g) * 0.02
    q, s = run("quantize_act_fp8", (x, None, False))
    qw = formats.quantize_weight(wf, "fp8_e4m3")
    out = run("fp8_gemm", (q, s, qw.codes, qw.scale, None, torch.float32))
    ref = x @ wf.T
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 per operand, ~2^-4/√3 rms each,
    # √2 of that for two operands: ≈5% worst case, measured ≈3%
    assert float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's Inf / Inf
def test_quantize_act_fp8_non_finite_rows_stay_non_finite(bad):
    x = torch.randn(8, 256)
    x[2, 7] = bad
    qw = formats.quantize_weight(torch.randn(32, 256) * 0.02, "fp8_e4m3")
    for backend in ("reference", "triton"):
        q, s = run("quantize_act_fp8", (x, None, False), backend)
        assert not bool(torch.isfinite(s[2])) and bool(torch.isfinite(s[[0, 1, 3]]).all())
        out = run("fp8_gemm", (q, s, qw.codes, qw.scale, None, torch.float32), backend)
        assert not bool(torch.isfinite(out[2]).any()) and bool(torch.isfinite(out[[0, 1, 3]]).all())


def test_fp8_refused_before_sm89(monkeypatch):
    from dtq_kernels.ops.triton.common import require_fp8_tensor_cores
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ops.BackendError, match="sm_89 or sm_90.*sm_80"):
        require_fp8_tensor_cores(torch.device("cuda"), "fp8_gemm")
    require_fp8_tensor_cores(torch.device("cpu"), "fp8_gemm")  # CPU: the reference / interpreter run


# ------------------------------------------------------------------------------- clear errors

def test_bad_inputs_raise_clearly():
    a, f32 = torch.zeros(4, 256, dtype=torch.int8), torch.float32
    wp = torch.zeros(8, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"per-group w_scale must be \[N=8, K/G\].*\(8, 3\)"):  # 256/3: no group
        ops.int8_gemm(a, torch.ones(4), wp, torch.ones(8, 3), None, f32)
    with pytest.raises(ValueError, match=r"group size G in \(64, 128\).*\(8, 8\)"):  # group 32: no kernel
        ops.int8_gemm(a, torch.ones(4), wp, torch.ones(8, 8), None, f32)
    with pytest.raises(ValueError, match=r"per-group w_scale must be \[N=8"):
        ops.int8_gemm(a, torch.ones(4), wp, torch.ones(7, 4), None, f32)
    with pytest.raises(ValueError, match="w_scale must be 1-D"):  # no per-group two-region kernel
        ops.int8_gemm_two_region(a, torch.ones(1, 2), torch.zeros(1, dtype=torch.int32), wp, torch.ones(8, 4), None, f32)
    x = torch.zeros(4, 255, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="even K, got K=255"):
        ops.w4a16_gemm(x, wp, torch.ones(8), None, f32)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.w4a16_gemm(torch.zeros(4, 256), wp, torch.ones(8), None, f32)
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.w4a16_gemm(torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(8, 256, dtype=torch.int8),
                       torch.ones(8), None, f32)
    a8 = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    w8 = torch.zeros(8, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="w_scale must be 1-D"):
        ops.fp8_gemm(a8, torch.ones(4), w8, torch.ones(8, 2), None, f32)
    with pytest.raises(ValueError, match="a_scale must have M=4"):
        ops.fp8_gemm(a8, torch.ones(3), w8, torch.ones(8), None, f32)
    with pytest.raises(TypeError, match="a must have dtype"):
        ops.fp8_gemm(a8.view(torch.int8), torch.ones(4), w8, torch.ones(8), None, f32)
    with pytest.raises(ValueError, match="K mismatch"):
        ops.fp8_gemm(a8, torch.ones(4), w8[:, :128].contiguous(), torch.ones(8), None, f32)
    with pytest.raises(ValueError, match="smooth must have K=256"):
        ops.quantize_act_fp8(torch.zeros(4, 256), torch.ones(255))


# ------------------------------------------------------------------------- opcheck and compile

def _op_cases():
    _, grouped = grouped_args(5, 128, 7, 64, torch.bfloat16)
    _, static = grouped_args(5, 256, 7, 128, torch.float32, static=True, bias=False)
    w4a16, _ = w4a16_args(5, 128, 7, 64, torch.bfloat16, torch.bfloat16)
    w4a16_pc, _ = w4a16_args(5, 128, 7, None, torch.float16, torch.float32, bias=False)
    fp8, _ = fp8_args(5, 64, 7, torch.bfloat16)
    return [("int8_gemm", grouped), ("int8_gemm_static", static), ("w4a16_gemm", w4a16), ("w4a16_gemm", w4a16_pc),
            ("fp8_gemm", fp8), ("quantize_act_fp8", (torch.randn(5, 64), torch.rand(64) + 0.5, True))]


# opcheck's test_schema compares tensors with a multiply that torch's CPU build lacks for float8
# ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'): the FP8 ops run every other check.
NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _op_cases()[case]
    fp8 = "fp8" in op
    torch.library.opcheck(getattr(torch.ops.dtq, op).default, args, **({"test_utils": NO_SCHEMA} if fp8 else {}))


def test_torch_compile_fullgraph():
    cases = _op_cases()

    def f(g, w, e, x):
        q, s = torch.ops.dtq.quantize_act_fp8(*x)
        return (torch.ops.dtq.int8_gemm(*g).float().sum() + torch.ops.dtq.w4a16_gemm(*w).float().sum()
                + torch.ops.dtq.fp8_gemm(*e).float().sum() + (q.float() * s[:, None]).sum())

    args = (cases[0][1], cases[2][1], cases[4][1], cases[5][1])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), f(*args))


# --------------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(1, 1152, 1152), (16, 1152, 4608), (77, 4608, 1152), (4096, 3072, 3072)])
def test_gpu_new_gemms_match_reference(m, k, n):
    dev = torch.device("cuda")
    for group in (64, 128):
        op, args = grouped_args(m, k, n, group, torch.bfloat16, seed=group)
        args = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in args)
        a, a_s, w, w_s, b, _ = args
        mag = reference.group_scaled_matmul(a.abs(), formats.unpack_int4(w).abs(), w_s) * a_s[:, None] + b.abs()
        # per-group FMA contraction: one rounding per group and three in the epilogue
        out, ref = run(op, args), run(op, args, "reference")
        tol = (k // group + 3) * 2.0 ** -24 * mag + ULP[torch.bfloat16] * ref.float().abs()
        assert bool(((out.float() - ref.float()).abs() <= tol).all())
        wargs, codes = w4a16_args(m, k, n, group, torch.bfloat16, torch.bfloat16, seed=group)
        wargs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in wargs)
        assert_close_sum(run("w4a16_gemm", wargs), run("w4a16_gemm", wargs, "reference"),
                         w4a16_mag(wargs, codes.to(dev)), k)
    if torch.cuda.get_device_capability(dev) >= (8, 9):
        fargs, mag = fp8_args(m, k, n, torch.bfloat16)
        fargs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in fargs)
        # Hopper's FP8 MMA adds each K-tile's products with ~14 mantissa bits before the fp32 promotion
        out, ref = run("fp8_gemm", fargs), run("fp8_gemm", fargs, "reference")
        tol = 2.0 ** -13 * mag.to(dev) + ULP[torch.bfloat16] * ref.float().abs()
        assert bool(((out.float() - ref.float()).abs() <= tol).all())
