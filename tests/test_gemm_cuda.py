"""The CUTLASS backend ("cuda") of dtq::int8_gemm (8-bit or, on sm_90a, packed int4 weights),
dtq::int8_gemm_static, dtq::fp8_gemm and dtq::w4a16_gemm.

Without a GPU: the argument validation the CUTLASS kernels need (checked on CPU tensors: it runs before
any device check) and the dispatch defaults. On a GPU (@pytest.mark.gpu): every kernel against the
reference on DiT-XL/2, PixArt and Flux layer shapes, ragged M, every output dtype, with and without bias,
per-token and per-tensor activation scales, and the static kernel under CUDA-graph replay. Tolerance:
tests/test_gemm_int8.py's assert_matches (exact int32 accumulation; the fp32 epilogue in the reference's
order, up to FMA contraction; one rounding to the output dtype); W4A16: tests/test_gemm_lowbit.py's
assert_close_sum (exact products, fp32 sums in another order).
"""
import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels.ops import cuda, reference
from dtq_kernels.ops._dispatch import CUDA_DEFAULTS
from dtq_kernels import formats
from test_gemm_int8 import OUT_DTYPES, ULP, assert_matches, make_args, run
from test_gemm_lowbit import assert_close_sum, w4a16_args, w4a16_mag


def _int8_args(m=32, k=64, n=48, device="cpu"):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return [t.to(device) for t in (a, torch.rand(m), w, torch.rand(n), torch.randn(n))]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


# ------------------------------------------------------------------------- validation, on CPU

@pytest.mark.parametrize("case,exc,match", [
    ("k_not_16", ValueError, r"K=40 must be a positive multiple of 16"),
    ("n_not_16", ValueError, r"N=40 must be a positive multiple of 16"),
    ("packed_int4_fp8", TypeError, r"packed int4 weights .* use the triton backend"),
    ("w4a8_k_not_32", ValueError, r"K=48 must be a positive multiple of 32 \(rows of 16-byte chunks of packed"),
    ("w4a8_k_mismatch", ValueError, r"a \[M, K\] and w \[N, K/2\] \(packed int4\) must share K"),
    ("a_dtype", TypeError, r"a must be torch.int8, got torch.int16"),
    ("grouped_w_scale", ValueError, r"per-group weight scales have no CUDA kernel"),
    ("scale_dtype", TypeError, r"a_scale and w_scale must be float32"),
    ("misaligned_a", ValueError, r"a must start on a 16-byte boundary"),
    ("misaligned_w_scale", ValueError, r"w_scale must start on a 16-byte boundary"),
    ("strided_a_scale", ValueError, r"a_scale must be contiguous"),
    ("a_scale_len", ValueError, r"a_scale must have M=32 entries or 1, got 5"),
    ("w_scale_len", ValueError, r"w_scale and bias must have N=48 entries"),
    ("cpu", ValueError, r"a must be a CUDA tensor, got cpu"),
])
def test_validation_names_the_argument(case, exc, match):
    a, a_s, w, w_s, b = _int8_args()
    if case == "k_not_16":
        a, w = a[:, :40].contiguous(), w[:, :40].contiguous()
    elif case == "n_not_16":
        w, w_s, b = w[:40].contiguous(), w_s[:40].contiguous(), b[:40].contiguous()
    elif case == "packed_int4_fp8":  # packed int4 weights have CUDA kernels with int8 activations only
        with pytest.raises(exc, match=match):
            cuda.validate_scaled_gemm("fp8_gemm", a.to(torch.float8_e4m3fn), a_s,
                                      w[:, :32].contiguous().view(torch.uint8), w_s, b, codes=torch.float8_e4m3fn)
        return
    elif case == "w4a8_k_not_32":
        a, w = a[:, :48].contiguous(), w[:, :24].contiguous().view(torch.uint8)
    elif case == "w4a8_k_mismatch":
        w = w.view(torch.uint8)
    elif case == "a_dtype":
        a = a.to(torch.int16)
    elif case == "grouped_w_scale":
        w_s = torch.rand(w.shape[0], 1)
    elif case == "scale_dtype":
        a_s = a_s.double()
    elif case == "misaligned_a":
        a = _misaligned(a)
    elif case == "misaligned_w_scale":
        w_s = _misaligned(w_s)
    elif case == "strided_a_scale":
        a_s = torch.rand(2 * a.shape[0])[::2]
    elif case == "a_scale_len":
        a_s = torch.rand(5)
    elif case == "w_scale_len":
        w_s = torch.rand(47)
    with pytest.raises(exc, match=match):
        cuda.validate_scaled_gemm("int8_gemm", a, a_s, w, w_s, b, packed_ok=case.startswith("w4a8"))


def test_valid_cpu_arguments_fail_only_on_the_device():
    a, a_s, w, w_s, b = _int8_args()
    with pytest.raises(ValueError, match="CUDA tensor"):  # everything else is valid: only the device fails
        cuda.validate_scaled_gemm("int8_gemm", a, a_s, w, w_s, b.to(torch.bfloat16))


def test_w4a8_packed_weights_pass_validation_up_to_the_device():
    args, _ = make_args("int8_gemm", 32, 64, 48, torch.bfloat16, w4=True)
    a, a_s, w, w_s, b, _ = args
    assert w.dtype == torch.uint8 and w.shape == (48, 32)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda.validate_scaled_gemm("int8_gemm", a, a_s, w, w_s, b, packed_ok=True)
    with pytest.raises(ValueError, match="CUDA tensor"):  # the cuda kernels validate before they need a GPU
        cuda.int8_gemm(a, a_s, w, w_s, b, torch.bfloat16)
    (a, table, gi, w, w_s, b, dt), _ = make_args("int8_gemm_static", 32, 64, 48, torch.float32, w4=True)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda.int8_gemm_static(a, table, gi, w, w_s, b, dt)
    with pytest.raises(ValueError, match="K=48 must be a positive multiple of 32"):
        cuda.int8_gemm_static(a[:, :48].contiguous(), table, gi, w[:, :24].contiguous(), w_s, b, dt)


def test_fp8_validation_wants_e4m3_codes():
    a, a_s, w, w_s, b = _int8_args()
    with pytest.raises(TypeError, match="a must be torch.float8_e4m3fn, got torch.int8"):
        cuda.validate_scaled_gemm("fp8_gemm", a, a_s, w, w_s, b, codes=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda.validate_scaled_gemm("fp8_gemm", a.to(torch.float8_e4m3fn), a_s, w.to(torch.float8_e4m3fn), w_s, b,
                                  codes=torch.float8_e4m3fn)


def test_kernel_validates_before_it_needs_a_gpu():
    a, a_s, w, w_s, b = _int8_args(k=40)
    with pytest.raises(ValueError, match="K=40"):
        cuda.int8_gemm(a[:, :40], a_s, w[:, :40], w_s, b, torch.bfloat16)


def test_triton_stays_the_default_until_measured():
    for op in ("int8_gemm", "int8_gemm_static", "fp8_gemm", "w4a16_gemm"):
        assert "cuda" in ops.kernels_for(op)
        assert CUDA_DEFAULTS[op] == {"any": "triton"}


# W4A16 (CUTLASS mixed-input GEMM, sm_90a): validation on CPU

def _w4a16_cpu_args(m=32, k=64, n=48, group=None):
    args, _ = w4a16_args(m, k, n, group, torch.bfloat16, torch.bfloat16)
    return list(args)


@pytest.mark.parametrize("case,exc,match", [
    ("x_dtype", TypeError, r"x must be torch.float16 or torch.bfloat16, got torch.float32"),
    ("w_int8", TypeError, r"w must be packed int4 codes, uint8 \[N, K/2\], got torch.int8"),
    ("k_not_32", ValueError, r"K=48 must be a positive multiple of 32"),
    ("n_not_16", ValueError, r"N=40 must be a positive multiple of 16"),
    ("group_32", ValueError, r"group size that is a multiple of 64 \(the kernel's K tile\), got w_scale \(48, 2\)"),
    ("scale_dtype", TypeError, r"w_scale must be float32"),
    ("w_scale_len", ValueError, r"w_scale \[N\] or \[N, K/G\] and bias \[N\] must have N=48 rows, got \(47,\)"),
    ("out_dtype", TypeError, r"out_dtype torch.int8 is not one of"),
    ("misaligned_x", ValueError, r"x must start on a 16-byte boundary"),
    ("strided_w_scale", ValueError, r"w_scale must be contiguous"),
    ("cpu", ValueError, r"x must be a CUDA tensor, got cpu"),
])
def test_w4a16_validation_names_the_argument(case, exc, match):
    x, w, w_s, b, out_dtype = _w4a16_cpu_args(group=32 if case == "group_32" else None)
    if case == "x_dtype":
        x = x.float()
    elif case == "w_int8":
        w = w.view(torch.int8)
    elif case == "k_not_32":
        x, w = x[:, :48].contiguous(), w[:, :24].contiguous()
    elif case == "n_not_16":
        w, w_s, b = w[:40].contiguous(), w_s[:40].contiguous(), b[:40].contiguous()
    elif case == "scale_dtype":
        w_s = w_s.double()
    elif case == "w_scale_len":
        w_s = torch.rand(47)
    elif case == "out_dtype":
        out_dtype = torch.int8
    elif case == "misaligned_x":
        x = _misaligned(x)
    elif case == "strided_w_scale":
        w_s = torch.rand(2 * w.shape[0])[::2]
    with pytest.raises(exc, match=match):
        cuda.validate_w4a16_gemm(x, w, w_s, b, out_dtype)


def test_w4a16_kernel_validates_before_it_needs_a_gpu():
    x, w, w_s, b, out_dtype = _w4a16_cpu_args(k=48)
    with pytest.raises(ValueError, match="K=48"):
        cuda.w4a16_gemm(x, w, w_s, b, out_dtype)
    for group in (None, 64, 128):
        x, w, w_s, b, out_dtype = _w4a16_cpu_args(k=256, group=group)
        with pytest.raises(ValueError, match="CUDA tensor"):  # everything else is valid: only the device fails
            cuda.validate_w4a16_gemm(x, w, w_s, b.half(), out_dtype)


def test_packed_int4_is_cutlass_int4b_order():
    """The kernel reads formats.pack_int4's bytes as CUTLASS int4b_t arrays without a repack: element 2i in the
    low nibble, 2i + 1 in the high nibble, two's complement (-8..7)."""
    codes = torch.tensor([[-8, 7, -1, 0, 1, -2, 3, -4]], dtype=torch.int8)
    packed = formats.pack_int4(codes)
    assert packed.tolist() == [[0x78, 0x0F, 0xE1, 0xC3]]
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    as_int4b = torch.stack([low, high], -1).flatten(-2)
    assert torch.equal(torch.where(as_int4b >= 8, as_int4b - 16, as_int4b).to(torch.int8), codes)


# ------------------------------------------------------------------------------- on a GPU

# The CUTLASS mixed-input kernels (W4A8, W4A16) are Hopper kernels: sm_90a only.
needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the CUTLASS mixed-input kernels are built for sm_90a only")

SHAPES = [(1, 1152, 1152), (77, 1152, 4608), (300, 4608, 1152), (1029, 1152, 6912),  # DiT-XL/2 / PixArt
          (4096, 1152, 4608), (333, 3072, 3072), (4103, 3072, 12288), (260, 12288, 3072)]  # Flux


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["int8_gemm", "int8_gemm_static"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gpu_cuda_matches_reference(op, m, k, n):
    for i, dtype in enumerate(OUT_DTYPES):
        for bias in (True, False):
            args, mag = make_args(op, m, k, n, dtype, bias=bias, seed=i, device="cuda")
            assert_matches(run(op, args, "cuda"), run(op, args, "reference"), mag)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("op", ["int8_gemm", "int8_gemm_static"])
@pytest.mark.parametrize("m,k,n", SHAPES + [(5, 160, 48), (130, 96, 272)])  # and K tails past the 128-wide tile
def test_gpu_cuda_w4a8_matches_reference(op, m, k, n):
    """Packed int4 weights on sm_90a: int4 -> int8 in registers, int32 accumulation, both exact; the int8
    epilogue's tolerance."""
    for i, dtype in enumerate(OUT_DTYPES):
        for bias in (True, False):
            args, mag = make_args(op, m, k, n, dtype, bias=bias, seed=i, per_tensor=i == 1 and bias,
                                  device="cuda", w4=True)
            assert args[-4].dtype == torch.uint8
            assert_matches(run(op, args, "cuda"), run(op, args, "reference"), mag)


@pytest.mark.gpu
@needs_sm90
def test_gpu_cuda_w4a8_static_under_cuda_graph_follows_the_group_index():
    args, _ = make_args("int8_gemm_static", 1029, 1152, 4608, torch.bfloat16, device="cuda", w4=True)
    a, table, gi, w, w_s, b, dt = args
    run("int8_gemm_static", args, "cuda")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with ops.use_backend("cuda"), torch.cuda.graph(graph):
        out = torch.ops.dtq.int8_gemm_static(a, table, gi, w, w_s, b, dt)
    codes = formats.unpack_int4(w)
    for g in (0, 2, 1):
        gi.fill_(g)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.int8_gemm_static(a, table, gi, w, w_s, b, dt)
        assert_matches(out, ref, reference.int_matmul(a.abs(), codes.abs()).float() * table[g] * w_s + b.abs())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 100, 4096])
def test_gpu_cuda_per_tensor_scale_and_half_bias(m):
    args, mag = make_args("int8_gemm", m, 1152, 1152, torch.float16, per_tensor=True, device="cuda")
    a, a_s, w, w_s, b, dt = args
    args = (a, a_s, w, w_s, b.half(), dt)
    assert_matches(run("int8_gemm", args, "cuda"), run("int8_gemm", args, "reference"), mag)


@pytest.mark.gpu
def test_gpu_cuda_empty_m():
    args, _ = make_args("int8_gemm", 0, 64, 32, torch.bfloat16, device="cuda")
    assert run("int8_gemm", args, "cuda").shape == (0, 32)


@pytest.mark.gpu
def test_gpu_cuda_static_clamps_the_index_in_the_kernel():
    """Called below the op layer (which queues a device assert), an index past the table reads its last entry."""
    args, mag = make_args("int8_gemm_static", 64, 1152, 1152, torch.float32, device="cuda")
    a, table, gi, w, w_s, b, dt = args
    gi.fill_(7)
    out = cuda.int8_gemm_static(a, table, gi, w, w_s, b, dt)
    assert_matches(out, reference.int8_gemm(a, table[2:3], w, w_s, b, dt), mag)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_gpu_cuda_static_under_cuda_graph_follows_the_group_index(dtype):
    args, _ = make_args("int8_gemm_static", 1029, 1152, 4608, dtype, device="cuda")
    a, table, gi, w, w_s, b, dt = args
    run("int8_gemm_static", args, "cuda")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with ops.use_backend("cuda"), torch.cuda.graph(graph):
        out = torch.ops.dtq.int8_gemm_static(a, table, gi, w, w_s, b, dt)
    for g in (0, 2, 1):
        gi.fill_(g)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.int8_gemm_static(a, table, gi, w, w_s, b, dt)
        assert_matches(out, ref, reference.int_matmul(a.abs(), w.abs()).float() * table[g] * w_s + b.abs())


@pytest.mark.gpu
def test_gpu_dtq_backend_env_forces_cuda(monkeypatch):
    args, mag = make_args("int8_gemm", 64, 1152, 1152, torch.bfloat16, device="cuda")
    monkeypatch.setenv("DTQ_BACKEND", "cuda")
    out = ops.int8_gemm(*args)
    assert ops.last_backend["int8_gemm"] == "cuda"
    assert_matches(out, reference.int8_gemm(*args), mag)


# FP8 E4M3: dtq::fp8_gemm (schema and reference live with the op in gemm_ops.py / reference.py).
needs_fp8_op = pytest.mark.skipif(not hasattr(reference, "fp8_gemm"), reason="dtq::fp8_gemm is not defined here")


def _fp8_args(m, k, n, dtype, bias, seed, per_tensor=False):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(m, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    a_s = torch.rand(1 if per_tensor else m, generator=g) * 1e-2
    w_s, b = torch.rand(n, generator=g) * 1e-3, (torch.randn(n, generator=g) if bias else None)
    abs_sum = a.float().abs() @ w.float().abs().T  # exact products; fp32 sum of |a·w|
    mag = abs_sum * a_s[:, None] * w_s
    args = tuple(None if t is None else t.cuda() for t in (a, a_s, w, w_s, b)) + (dtype,)
    return args, mag.cuda(), k


def assert_fp8_matches(out, ref, mag, k):
    """Both sides sum K exact products: the reference in fp32 (within (K-1)·2^-24·Σ|a·w| of the exact sum), the
    kernel in fp32 too, except that Hopper's FP8 MMA adds the products of each short K chunk at about 14 bits
    before the mainloop promotes them into fp32 (2^-13 of the magnitude; tests/test_gemm_lowbit.py uses the
    same bound). So |Δ| ≤ max(2K·2^-24, 2^-13) of the magnitude, plus the epilogue's roundings and the
    output's rounding."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = (max(2 * k * 2.0 ** -24, 2.0 ** -13) + 4 * 2.0 ** -24) * mag + ULP[out.dtype] * ref.float().abs()
    err = (out.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"


@pytest.mark.gpu
@needs_fp8_op
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gpu_cuda_fp8_matches_reference(m, k, n):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89 or newer")
    for i, dtype in enumerate(OUT_DTYPES):
        for bias in (True, False):
            args, mag, k_ = _fp8_args(m, k, n, dtype, bias, seed=i, per_tensor=(i == 1))
            out = run("fp8_gemm", args, "cuda")
            ref = reference.fp8_gemm(*args)
            assert_fp8_matches(out, ref, mag + (0 if args[4] is None else args[4].abs()), k_)


# W4A16: sm_90a only.


def _w4a16_gpu_args(m, k, n, x_dtype, out_dtype, bias, seed, group=None):
    args, codes = w4a16_args(m, k, n, group, x_dtype, out_dtype, seed=seed, bias=bias)
    args = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in args)
    return args, w4a16_mag(args, codes.cuda())


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gpu_cuda_w4a16_matches_reference(m, k, n):
    # per channel and per group of 64 / 128 (dequantized weights rounded identically: only the fp32 sums differ)
    for i, out_dtype in enumerate(OUT_DTYPES):
        for j, x_dtype in enumerate((torch.bfloat16, torch.float16)):
            for group in (None, 64, 128):
                args, mag = _w4a16_gpu_args(m, k, n, x_dtype, out_dtype, bias=(i + j) % 2 == 0, seed=3 * i + j,
                                            group=group)
                assert_close_sum(run("w4a16_gemm", args, "cuda"), run("w4a16_gemm", args, "reference"), mag, k)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("m,k,n", [(5, 160, 48), (130, 96, 272), (1, 4128, 144)])  # K tails past the 64-wide tile
def test_gpu_cuda_w4a16_ragged_k_and_narrow_n(m, k, n):
    for j, x_dtype in enumerate((torch.bfloat16, torch.float16)):
        args, mag = _w4a16_gpu_args(m, k, n, x_dtype, torch.float32, bias=j == 0, seed=j)
        assert_close_sum(run("w4a16_gemm", args, "cuda"), run("w4a16_gemm", args, "reference"), mag, k)


@pytest.mark.gpu
@needs_sm90
def test_gpu_cuda_w4a16_empty_m_and_grouped_m1():
    for group in (None, 128):
        args, _ = _w4a16_gpu_args(0, 256, 32, torch.bfloat16, torch.bfloat16, bias=True, seed=0, group=group)
        assert run("w4a16_gemm", args, "cuda").shape == (0, 32)
        args, mag = _w4a16_gpu_args(1, 4608, 1152, torch.bfloat16, torch.bfloat16, bias=True, seed=1, group=group)
        assert_close_sum(run("w4a16_gemm", args, "cuda"), run("w4a16_gemm", args, "reference"), mag, 4608)
