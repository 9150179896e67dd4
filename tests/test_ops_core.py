"""The core ops: reference semantics, Triton (interpreted) vs reference, opcheck, compile, errors."""
import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels.ops import reference
from helpers_data import with_outliers

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ reference = the written spec

def test_reference_quantize_per_token_matches_spec():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.25, 0.0, 0.125]])
    q, s = ops.quantize_per_token(x)
    assert torch.equal(s, torch.tensor([4 / 127, 0.0, 1 / 127]))
    # 1/(4/127) = 31.75 -> 32; -2 -> -63.5 -> -64 (half to even); 0.5 -> 15.875 -> 16; 4 -> 127
    assert q[0].tolist() == [32, -64, 16, 127]
    assert q[1].tolist() == [0, 0, 0, 0]
    # 0.25 * 127 = 31.75 -> 32; 0.125 * 127 = 15.875 -> 16
    assert q[2].tolist() == [-127, 32, 0, 16]


def test_reference_quantize_per_token_bits():
    x = with_outliers(16, 64)
    for bits in (4, 6, 8):
        q, s = ops.quantize_per_token(x, bits)
        qmax = 2 ** (bits - 1) - 1
        assert int(q.abs().max()) == qmax
        assert torch.allclose(s, x.abs().amax(1) / qmax)


def test_reference_int8_gemm_matches_float_math():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 4608), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (40, 4608), dtype=torch.int8, generator=g)
    a_s, w_s = torch.rand(33, generator=g), torch.rand(40, generator=g)
    bias = torch.randn(40, generator=g)
    out = ops.int8_gemm(a, a_s, w, w_s, bias, torch.float32)
    acc = a.long() @ w.long().T  # exact int64 oracle
    assert torch.equal(reference.int_matmul(a, w), acc.to(torch.int32))
    assert torch.allclose(out, acc.float() * a_s[:, None] * w_s[None] + bias, rtol=1e-6, atol=1e-5)
    per_tensor = ops.int8_gemm(a, a_s[:1], w, w_s, None, torch.bfloat16)
    assert per_tensor.dtype == torch.bfloat16
    assert torch.allclose(per_tensor.float(), acc.float() * a_s[0] * w_s[None], rtol=8e-3)


def test_reference_int_matmul_exact_on_small_and_ragged_shapes():
    # the CPU path is torch._int_mm (oneDNN), whose degenerate shapes have had bugs (K = 1 in torch 2.13)
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 1, 1), (1, 9, 1), (17, 65, 1), (1, 3, 2), (3, 7, 5), (17, 65, 33), (33, 8, 127), (2, 3, 1025)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        exact = a.long() @ w.long().T
        assert torch.equal(reference.int_matmul(a, w), exact.to(torch.int32)), (m, n, k)
        assert torch.equal(reference.int_matmul_float(a, w), exact.float()), (m, n, k)


@pytest.mark.parametrize("k", [0, 1, 1024, 1025, 4608 + 77])
def test_reference_int_matmul_exact_at_the_extremes(k):
    # -128 · -128 everywhere: each fp32 chunk sums to exactly 2^24 (the exactness bound), tails ragged
    a = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.cat([torch.full((2, k), -128, dtype=torch.int8), torch.full((1, k), 127, dtype=torch.int8)])
    assert torch.equal(reference.int_matmul(a, w), (a.long() @ w.long().T).to(torch.int32))


def test_w8a8_via_ops_approximates_float_linear():
    # Gaussian rows: absmax ≈ 3.5σ, so the int8 step is 3.5σ/127 and the rounding error σ·0.008 per
    # operand; activations and weights together give ≈ 1.1% relative output error. (With outlier
    # channels per-token int8 is much worse: that is what smoothing and rotation are for.)
    x = torch.randn(64, 256)
    w = torch.randn(128, 256) * 0.05
    q, s = ops.quantize_per_token(x)
    from dtq_kernels import formats
    qw = formats.quantize_weight(w, "int8")
    y = ops.int8_gemm(q, s, qw.codes, qw.scale, None, torch.float32)
    ref = x @ w.T
    assert float((y - ref).norm() / ref.norm()) < 0.02  # 8-bit per-token/per-channel: ~1% typical


# --------------------------------------------------------------- Triton (interpreter) vs reference

@pytest.mark.parametrize("m,k", [(1, 1152), (77, 72), (256, 1152), (1000, 3072), (8, 4608), (3, 5000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_quantize_per_token_is_bit_exact(m, k, dtype):
    x = with_outliers(m, k, dtype, seed=m + k)
    q_ref, s_ref = reference.quantize_per_token(x, 8)
    with ops.use_backend("triton"):
        q, s = ops.quantize_per_token(x)
    assert ops.last_backend["quantize_per_token"] == "triton"
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_triton_quantize_per_token_narrow_widths(bits):
    x = with_outliers(40, 1152, torch.float16, seed=bits)
    with ops.use_backend("triton"):
        q, s = ops.quantize_per_token(x, bits)
    q_ref, s_ref = reference.quantize_per_token(x, bits)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_triton_quantize_per_token_strided_rows_and_empty():
    x = with_outliers(16, 2048)[:, :1152]  # row stride 2048: not contiguous, must be rejected clearly
    with pytest.raises(ValueError, match="contiguous"):
        ops.quantize_per_token(x)
    with ops.use_backend("triton"):
        q, s = ops.quantize_per_token(torch.empty(0, 64))
    assert q.shape == (0, 64) and s.shape == (0,)


# ----------------------------------------------------------------------- dispatch and env control

def test_cpu_defaults_to_reference_and_env_var_forces(monkeypatch):
    x = torch.randn(4, 64)
    ops.quantize_per_token(x)
    assert ops.last_backend["quantize_per_token"] == "reference"
    monkeypatch.setenv("DTQ_BACKEND", "triton")
    ops.quantize_per_token(x)
    assert ops.last_backend["quantize_per_token"] == "triton"
    monkeypatch.setenv("DTQ_BACKEND", "cuda")
    with pytest.raises(ops.BackendError, match="needs CUDA tensors"):
        ops.quantize_per_token(x)
    monkeypatch.setenv("DTQ_BACKEND", "fastest")
    with pytest.raises(ops.BackendError, match="DTQ_BACKEND"):
        ops.quantize_per_token(x)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"), pytest.raises(ops.BackendError, match="TRITON_INTERPRET"):
        ops.quantize_per_token(torch.randn(2, 8))


# ------------------------------------------------------------------------------- bad inputs

def test_quantize_per_token_rejects_bad_inputs():
    with pytest.raises(TypeError, match="dtype"):
        ops.quantize_per_token(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        ops.quantize_per_token(torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="bits"):
        ops.quantize_per_token(torch.zeros(4, 8), 9)


def test_int8_gemm_rejects_bad_inputs():
    a = torch.zeros(4, 32, dtype=torch.int8)
    w = torch.zeros(8, 32, dtype=torch.int8)
    a_s, w_s = torch.ones(4), torch.ones(8)
    f32 = torch.float32
    with pytest.raises(ValueError, match="K mismatch"):
        ops.int8_gemm(a, a_s, torch.zeros(8, 16, dtype=torch.int8), w_s, None, f32)
    with pytest.raises(TypeError, match="a must have dtype"):
        ops.int8_gemm(a.float(), a_s, w, w_s, None, f32)
    with pytest.raises(ValueError, match="a_scale must have M=4"):
        ops.int8_gemm(a, torch.ones(3), w, w_s, None, f32)
    with pytest.raises(ValueError, match="w_scale must have N=8"):
        ops.int8_gemm(a, a_s, w, torch.ones(7), None, f32)
    with pytest.raises(ValueError, match="bias must have N=8"):
        ops.int8_gemm(a, a_s, w, w_s, torch.ones(5), f32)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_gemm(a, a_s, w, w_s, None, torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        ops.int8_gemm(a, a_s, torch.zeros(32, 8, dtype=torch.int8).T, w_s, None, f32)
    with pytest.raises(TypeError, match="a_scale must have dtype"):
        ops.int8_gemm(a, a_s.half(), w, w_s, None, f32)
    with pytest.raises(ValueError, match="one device"):
        ops.int8_gemm(a, a_s, w, w_s.to("meta"), None, f32)


# ------------------------------------------------------------------ opcheck and torch.compile

def test_opcheck_quantize_per_token():
    for x, bits in [(torch.randn(5, 64), 8), (torch.randn(3, 72, dtype=torch.float16), 6)]:
        torch.library.opcheck(torch.ops.dtq.quantize_per_token.default, (x, bits))


def test_opcheck_int8_gemm():
    a = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    w = torch.randint(-127, 128, (7, 64), dtype=torch.int8)
    args = (a, torch.rand(5), w, torch.rand(7), torch.randn(7), torch.bfloat16)
    torch.library.opcheck(torch.ops.dtq.int8_gemm.default, args)
    torch.library.opcheck(torch.ops.dtq.int8_gemm.default, (a, torch.rand(1), w, torch.rand(7), None, torch.float32))


def test_torch_compile_fullgraph_w8a8_linear():
    from dtq_kernels import formats
    w = torch.randn(32, 64)
    qw = formats.quantize_weight(w, "int8")

    def w8a8(x):
        q, s = torch.ops.dtq.quantize_per_token(x.reshape(-1, 64), 8)
        return torch.ops.dtq.int8_gemm(q, s, qw.codes, qw.scale, None, torch.float32).reshape(*x.shape[:-1], 32)

    x = torch.randn(2, 9, 64)
    compiled = torch.compile(w8a8, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), w8a8(x))
