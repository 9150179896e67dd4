"""The INT8 GEMM family: Triton (interpreted on CPU, compiled on a GPU) vs the reference, exactness of
the integer part, real activations with outlier channels, clear errors, opcheck.

Tolerance (one rule for every op, `assert_matches`): the integer accumulations are exact, and the
kernels evaluate the fp32 epilogue in the reference's order. The interpreter (numpy) performs each
operation as written, so there the results are bit-identical and the tests demand torch.equal. A GPU
compile may contract a multiply and the following add into one FMA (one rounding instead of two): each
contraction moves the fp32 result by at most one rounding of the terms involved, 2^-24 relative to
their magnitude, and the epilogue has at most three such roundings, so |Δ| ≤ 4·2^-24·mag, where mag is
the sum of the absolute values of the terms (|acc·scales| + |bias|). fp16/bf16 outputs round that fp32
value once more, which can move it by one unit in the last place of the output format.
"""
import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels import formats
from dtq_kernels.ops import reference
from dtq_kernels.ops.triton.common import INTERPRETING
from helpers_data import MINILM_SENTENCES_B, minilm_capture

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
OPS = ["int8_gemm", "int8_gemm_static", "int8_gemm_wzp", "int8_gemm_two_region"]


def codes(m, k, bits=8, gen=None):
    qmax = 2 ** (bits - 1) - 1
    return torch.randint(-qmax, qmax + 1, (m, k), dtype=torch.int8, generator=gen)


def make_args(op, m, k, n, out_dtype, bias=True, seed=0, bits=8, per_tensor=False, device="cpu", w4=False):
    """Random arguments for `op` on `device`, plus the magnitude of the epilogue terms (for the GPU
    tolerance), computed where the data lives. w4: int4 weight codes (full range [-8, 7]) passed packed."""
    g = torch.Generator().manual_seed(seed)
    a, w = codes(m, k, bits, g), codes(n, k, bits, g)
    if op == "int8_gemm_wzp":  # asymmetric weights use the full signed range and zero points
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    if w4:
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    zero = torch.randint(-128, 128, (n,), dtype=torch.int32, generator=g)
    w_s = torch.rand(n, generator=g) * 1e-3 + 1e-4
    b = torch.randn(n, generator=g) if bias else None
    a_s = torch.rand(1 if per_tensor else m, generator=g) * 0.05
    table, coef = torch.rand(3, generator=g) * 0.05, torch.rand(3, 2, generator=g) * 0.05
    a, w, zero, w_s, a_s, table, coef = (t.to(device) for t in (a, w, zero, w_s, a_s, table, coef))
    b = None if b is None else b.to(device)
    group = torch.tensor([1], dtype=torch.int32, device=device)
    abs_acc = reference.int_matmul(a.abs(), w.abs()).float()
    if op == "int8_gemm":
        args, mag = (a, a_s, w, w_s, b, out_dtype), abs_acc * a_s[:, None] * w_s
    elif op == "int8_gemm_static":
        args, mag = (a, table, group, w, w_s, b, out_dtype), abs_acc * table[1] * w_s
    elif op == "int8_gemm_wzp":
        w_eff = (w.double() - zero.double()[:, None]).abs()
        args = (a, a_s, w, w_s, zero, b, out_dtype)
        mag = (a.abs().double() @ w_eff.T).float() * a_s[:, None] * w_s
    else:
        args, mag = (a, coef, group, w, w_s, b, out_dtype), abs_acc * coef[1].max() * w_s
    if w4:
        args = tuple(formats.pack_int4(t) if t is w else t for t in args)
    return args, (mag if b is None else mag + b.abs())


def run(op, args, backend="triton"):
    with ops.use_backend(backend):
        out = getattr(ops, op)(*args)
    assert ops.last_backend[op] == backend
    return out


def assert_matches(out, ref, mag):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if INTERPRETING and out.device.type == "cpu":
        assert torch.equal(out, ref), f"max |Δ| {float((out.float() - ref.float()).abs().max())}"
        return
    tol = 4 * 2.0 ** -24 * mag + ULP[out.dtype] * ref.float().abs()
    err = (out.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"


# ------------------------------------------------------------------- exact integer accumulation

def test_int32_accumulation_is_exact_for_every_op():
    # All scales 1 and no bias: the output is the integer result itself, exact in fp32 while |acc| < 2^24
    # (K·127·127 ≤ 16.1M for K=1000; the asymmetric weights' (w − z) reach 255, so K=500 there).
    g = torch.Generator().manual_seed(1)
    a, w = codes(77, 1000, gen=g), codes(130, 1000, gen=g)
    one, ones_n = torch.ones(1), torch.ones(130)
    exact = a.long() @ w.long().T
    f32 = torch.float32
    assert torch.equal(run("int8_gemm", (a, one, w, ones_n, None, f32)).long(), exact)
    assert torch.equal(run("int8_gemm_static", (a, torch.tensor([3.0, 1.0]), torch.tensor([1], dtype=torch.int32),
                                                w, ones_n, None, f32)).long(), exact)
    # two-region: (c_pos, c_neg) = (1, 0) isolates the positive accumulation, (0, 1) the negative one
    coef = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for gi, part in ((0, a.clamp(min=0)), (1, a.clamp(max=0))):
        out = run("int8_gemm_two_region", (a, coef, torch.tensor([gi], dtype=torch.int32), w, ones_n, None, f32))
        assert torch.equal(out.long(), part.long() @ w.long().T)
    a2, w2 = a[:, :500].contiguous(), torch.randint(-128, 128, (130, 500), dtype=torch.int8, generator=g)
    zero = torch.randint(-128, 128, (130,), dtype=torch.int32, generator=g)
    out = run("int8_gemm_wzp", (a2, torch.ones(77), w2, ones_n, zero, None, f32))
    assert torch.equal(out.long(), a2.long() @ (w2.long() - zero.long()[:, None]).T)


# ------------------------------------------------------------------ Triton vs reference

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("m,k,n", [(1, 1000, 72), (77, 72, 130), (1000, 1000, 200)])
def test_ragged_shapes_every_dtype(op, m, k, n):
    for i, dtype in enumerate(OUT_DTYPES):
        args, mag = make_args(op, m, k, n, dtype, bias=i != 1, seed=m + k + i)
        assert_matches(run(op, args), run(op, args, "reference"), mag)


@pytest.mark.parametrize("op,m,k,n,dtype", [
    ("int8_gemm", 256, 1152, 1152, torch.bfloat16),        # attention projections, 256 px, no CFG
    ("int8_gemm_static", 512, 1152, 3072, torch.float16),  # 512 rows (CFG), Flux-width output
    ("int8_gemm_two_region", 256, 4608, 1152, torch.bfloat16),  # fc2: post-GELU input, K = 4608
    ("int8_gemm", 2048, 1152, 1152, torch.float32),        # 512 px: 1024 tokens x 2 (CFG)
])
def test_dit_shapes(op, m, k, n, dtype):
    args, mag = make_args(op, m, k, n, dtype, seed=k)
    assert_matches(run(op, args), run(op, args, "reference"), mag)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("m,k,n", [(1, 1000, 72), (77, 72, 130), (256, 1152, 1152)])
def test_packed_int4_weights(op, m, k, n):
    # W4A8: the same ops take int4 codes packed two per byte; the result is the int8-code result exactly
    args, mag = make_args(op, m, k, n, torch.bfloat16, seed=m + k, w4=True)
    w_pos = next(i for i, t in enumerate(args) if isinstance(t, torch.Tensor) and t.dtype == torch.uint8)
    unpacked = tuple(formats.unpack_int4(t) if i == w_pos else t for i, t in enumerate(args))
    assert args[w_pos].shape == (n, k // 2)
    ref = run(op, unpacked, "reference")
    assert torch.equal(run(op, args, "reference"), ref)
    assert_matches(run(op, args), ref, mag)


def test_packed_int4_errors():
    a, wp = torch.zeros(4, 64, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"packed int4 w is \(8, 64\)"):
        ops.int8_gemm(a, torch.ones(4), torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8), None, torch.float32)
    with pytest.raises(ValueError, match="packed int4 weights need an even K, got K=63"):
        ops.int8_gemm(torch.zeros(4, 63, dtype=torch.int8), torch.ones(4), wp, torch.ones(8), None, torch.float32)
    torch.library.opcheck(torch.ops.dtq.int8_gemm.default, (a, torch.ones(4), wp, torch.ones(8), None, torch.float32))


def test_per_tensor_scale_and_single_row():
    for m in (1, 64):  # M == 1 with a [1] scale is both per token and per tensor
        args, mag = make_args("int8_gemm", m, 1152, 256, torch.float16, per_tensor=True)
        assert_matches(run("int8_gemm", args), run("int8_gemm", args, "reference"), mag)


def test_static_reads_the_group_on_the_device():
    # same codes, different group index: the output scales with scale_table[g]
    args, _ = make_args("int8_gemm_static", 64, 256, 128, torch.float32, bias=False)
    a, table, _, w, w_s, b, dt = args
    table = torch.tensor([0.5, 0.01, 0.02])
    outs = [run("int8_gemm_static", (a, table, torch.tensor([g], dtype=torch.int32), w, w_s, b, dt)) for g in range(3)]
    assert torch.equal(outs[2], outs[1] * 2)  # exact: scaling by 2 is exact in fp32
    direct = run("int8_gemm", (a, table[:1].clone(), w, w_s, b, dt))
    assert torch.equal(outs[0], direct)


def test_w6a6_and_narrower_codes_are_the_same_op():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(96, 1152, generator=g)
    wf = torch.randn(256, 1152, generator=g) * 0.02
    for bits, max_err in ((6, 0.06), (4, 0.25)):
        q, s = ops.quantize_per_token(x, bits)
        qw = formats.quantize_weight(wf, f"int{bits}")
        assert int(q.abs().max()) == 2 ** (bits - 1) - 1
        out = run("int8_gemm", (q, s, qw.codes, qw.scale, None, torch.float32))
        assert_matches(out, reference.int8_gemm(q, s, qw.codes, qw.scale, None, torch.float32), out.abs())
        # Gaussian rows of 1152: absmax ≈ 3.3σ, step 3.3σ/qmax, rounding noise 3.3/(qmax·√12) of σ per
        # operand; the two operands' noises add in quadrature: √2·3.3/(qmax·√12) relative output error,
        # 4.4% at 6 bit (bound 6%) and 19% at 4 bit (bound 25%).
        ref = x @ wf.T
        assert float((out - ref).norm() / ref.norm()) < max_err


def test_wzp_matches_formats_asymmetric_weights():
    # codes / zero points from formats.quantize_weight(symmetric=False): x ≈ scale·(q − z)
    g = torch.Generator().manual_seed(2)
    wf = torch.randn(192, 1152, generator=g) * 0.02 + 0.01  # skewed rows: zero points ≠ 0
    qw = formats.quantize_weight(wf, "int8", symmetric=False)
    assert qw.zero_point is not None and bool((qw.zero_point != 0).any())
    x = torch.randn(100, 1152, generator=g)
    q, s = ops.quantize_per_token(x)
    out = run("int8_gemm_wzp", (q, s, qw.codes, qw.scale, qw.zero_point, None, torch.float32))
    dq = formats.dequantize_weight(qw)
    expected = (q.double() @ (dq.double() / qw.scale.double()[:, None]).round().T) * s.double()[:, None] \
        * qw.scale.double()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert float((out - x @ wf.T).norm() / (x @ wf.T).norm()) < 0.02


# -------------------------------------------------------------- real activations (MiniLM)

@pytest.fixture(scope="module")
def minilm_ffn_output():
    """The input (post-GELU, real outlier channels) and weights of MiniLM-L6's first FFN output linear
    (1536 -> 384), on a few real sentences."""
    got, mods, _ = minilm_capture(lambda model: {"x": model.encoder.layer[0].output.dense},
                                  sentences=MINILM_SENTENCES_B)
    dense = mods["x"]
    x = got["x"].reshape(-1, dense.in_features).contiguous()
    return x, dense.weight.detach().clone(), dense.bias.detach().clone()


def test_real_activations_have_outliers_and_match(minilm_ffn_output):
    x, wf, bias = minilm_ffn_output
    chan = x.abs().amax(0)
    assert float(chan.max() / chan.median()) > 20  # the outlier channels this test is about
    q, s = ops.quantize_per_token(x)
    qw = formats.quantize_weight(wf, "int8")
    args = (q, s, qw.codes, qw.scale, bias, torch.float16)
    out = run("int8_gemm", args)
    assert_matches(out, run("int8_gemm", args, "reference"), out.float().abs() + bias.abs())
    ref = torch.nn.functional.linear(x, wf, bias)
    # per-token int8 with 44x outlier channels: each row's step is set by its outlier, the other
    # channels get fewer levels; measured 1.07% relative error on these sentences, bound 2%
    assert float((out.float() - ref).norm() / ref.norm()) < 0.02


def test_two_region_on_real_post_gelu(minilm_ffn_output):
    # TQ-DiT's post-GELU quantizer: Δ₊ from the max, Δ₋ = GELU's minimum / 2^(b−1) (docs/methods.md)
    x, wf, bias = minilm_ffn_output
    c_pos, c_neg = float(x.max()) / 127, 0.16997 / 128
    a = formats.quantize_two_region(x, torch.tensor(c_pos), torch.tensor(c_neg), 8, "sign")
    coef = torch.tensor([[1.0, 1.0], [c_pos, c_neg]])
    qw = formats.quantize_weight(wf, "int8")
    args = (a, coef, torch.tensor([1], dtype=torch.int32), qw.codes, qw.scale, bias, torch.float32)
    out = run("int8_gemm_two_region", args)
    mag = reference.int_matmul(a.abs(), qw.codes.abs()).float() * c_pos * qw.scale + bias.abs()
    assert_matches(out, run("int8_gemm_two_region", args, "reference"), mag)
    # the op computes exactly dequantize_two_region(a) @ dequantized weightsᵀ + bias
    dq = formats.dequantize_two_region(a, torch.tensor(c_pos), torch.tensor(c_neg))
    assert torch.allclose(out, dq @ formats.dequantize_weight(qw).T + bias, rtol=1e-4, atol=1e-4)
    # and beats one per-tensor scale (static int8) on the same data, because the negative half keeps
    # its levels: measured 1.85% vs 3.55% relative error
    s = torch.tensor([float(x.abs().max()) / 127])
    static = run("int8_gemm_static", (formats.quantize_int(x, s, 8), s, torch.tensor([0], dtype=torch.int32),
                                      qw.codes, qw.scale, bias, torch.float32))
    ref = torch.nn.functional.linear(x, wf, bias)
    assert float((out - ref).norm()) < float((static - ref).norm())


# --------------------------------------------------------------------------- clear errors

def test_errors_wrong_dtype_shape_contiguity_device():
    a, w = torch.zeros(4, 64, dtype=torch.int8), torch.zeros(8, 64, dtype=torch.int8)
    w_s, gi, f32 = torch.ones(8), torch.tensor([0], dtype=torch.int32), torch.float32
    table, coef, zero = torch.ones(3), torch.ones(3, 2), torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="K mismatch"):
        ops.int8_gemm_static(a, table, gi, torch.zeros(8, 32, dtype=torch.int8), w_s, None, f32)
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.int8_gemm_two_region(a, coef, gi, w.float(), w_s, None, f32)
    with pytest.raises(TypeError, match="group_idx must have dtype"):
        ops.int8_gemm_static(a, table, gi.long(), w, w_s, None, f32)
    with pytest.raises(ValueError, match="coef_table must be"):
        ops.int8_gemm_two_region(a, torch.ones(3), gi, w, w_s, None, f32)
    with pytest.raises(ValueError, match="coef_table must be"):
        ops.int8_gemm_two_region(a, torch.ones(3, 3), gi, w, w_s, None, f32)
    with pytest.raises(TypeError, match="w_zero must have dtype"):
        ops.int8_gemm_wzp(a, torch.ones(4), w, w_s, zero.to(torch.int8), None, f32)
    with pytest.raises(ValueError, match="w_zero must have N=8"):
        ops.int8_gemm_wzp(a, torch.ones(4), w, w_s, zero[:5], None, f32)
    with pytest.raises(ValueError, match="contiguous"):
        ops.int8_gemm_wzp(torch.zeros(64, 4, dtype=torch.int8).T, torch.ones(4), w, w_s, zero, None, f32)
    with pytest.raises(ValueError, match="one device"):
        ops.int8_gemm_two_region(a, coef.to("meta"), gi, w, w_s, None, f32)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_gemm_static(a, table, gi, w, w_s, None, torch.int8)


@pytest.mark.parametrize("g", [3, -1])
def test_group_index_out_of_range_is_a_clear_error(g):
    a, w = torch.zeros(4, 64, dtype=torch.int8), torch.zeros(8, 64, dtype=torch.int8)
    gi = torch.tensor([g], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"group_idx {g} is out of range for a table of 3"):
        ops.int8_gemm_static(a, torch.ones(3), gi, w, torch.ones(8), None, torch.float32)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="out of range"):
        ops.int8_gemm_two_region(a, torch.ones(3, 2), gi, w, torch.ones(8), None, torch.float32)


# ---------------------------------------------------------------------- opcheck and compile

@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    for i, (dtype, bias) in enumerate([(torch.bfloat16, True), (torch.float32, False)]):
        args, _ = make_args(op, 5, 64, 7, dtype, bias=bias, seed=i)
        torch.library.opcheck(getattr(torch.ops.dtq, op).default, args)


def test_torch_compile_fullgraph_static_and_two_region():
    args_s, _ = make_args("int8_gemm_static", 9, 64, 16, torch.float32)
    args_t, _ = make_args("int8_gemm_two_region", 9, 64, 16, torch.float32)

    def f(sa, ta):
        return torch.ops.dtq.int8_gemm_static(*sa) + torch.ops.dtq.int8_gemm_two_region(*ta)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(args_s, args_t), f(args_s, args_t))


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("m,k,n", [(1, 1152, 1152), (77, 1000, 200), (512, 1152, 4608), (4096, 4608, 1152),
                                   (2048, 3072, 3072)])
def test_gpu_matches_reference(op, m, k, n):
    for i, dtype in enumerate(OUT_DTYPES):
        args, mag = make_args(op, m, k, n, dtype, bias=i != 1, seed=i, device="cuda")
        out = run(op, args)
        assert_matches(out, run(op, args, "reference"), mag)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["int8_gemm", "int8_gemm_static"])
@pytest.mark.parametrize("m,k,n", [(1, 1152, 1152), (77, 1000, 200), (4096, 4608, 1152)])
def test_gpu_packed_int4_matches_reference(op, m, k, n):
    args, mag = make_args(op, m, k, n, torch.bfloat16, seed=3, device="cuda", w4=True)
    assert_matches(run(op, args), run(op, args, "reference"), mag)


@pytest.mark.gpu
def test_gpu_static_under_cuda_graph_follows_the_group_index():
    args, _ = make_args("int8_gemm_static", 512, 1152, 1152, torch.bfloat16, device="cuda")
    a, table, gi, w, w_s, b, dt = args
    run("int8_gemm_static", args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dtq.int8_gemm_static(a, table, gi, w, w_s, b, dt)
    for g in (0, 2, 1):
        gi.fill_(g)  # what the timestep pre-hook does between denoising steps
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.int8_gemm_static(a, table, gi, w, w_s, b, dt)
        assert_matches(out, ref, reference.int_matmul(a.abs(), w.abs()).float() * table[g] * w_s + b.abs())
