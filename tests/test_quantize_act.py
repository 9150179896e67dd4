"""Fused activation quantization: quantize_act, layernorm_modulate_quantize, gelu_quantize and
quantize_two_region. Reference semantics, Triton (interpreted) vs reference on DiT shapes, real
activations, opcheck, clear errors, and GPU checks."""
import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels import formats, hadamard
from dtq_kernels.ops import reference
from helpers_data import MINILM_SENTENCES_B, minilm_capture, with_outliers

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
I32 = torch.int32


def triton(op, *args):
    with ops.use_backend("triton"):
        out = getattr(ops, op)(*args)
    assert ops.last_backend[op] == "triton"
    return out


def assert_codes_close(q, q_ref, max_frac=2e-3):
    """Codes from a computation that reassociates fp32 sums (FWHT stages, the 3xTF32 H_m dot, the
    LayerNorm reductions) or evaluates erf/tanh differently from torch. Those differ from the reference
    by a few fp32 ulps of the row's magnitude, ≈1e-3 of a quantization step at K = 4608 (the step is
    ≈absmax/127 ≈ 3.5·rms/127, the error ≈ 1e-7·rms·√K); a code can only change where x/scale lies
    that close to a rounding boundary (a .5), i.e. on ≈0.1–0.2% of the elements, and then by one code.
    So: never more than ±1, on at most max_frac of the elements."""
    assert q.dtype == torch.int8 and q.shape == q_ref.shape
    d = (q.int() - q_ref.int()).abs()
    assert d.numel() == 0 or int(d.max()) <= 1
    assert float((d > 0).float().mean()) <= max_frac, float((d > 0).float().mean())


def table(groups=10, base=0.05):
    return torch.linspace(base, 4 * base, groups)


# ------------------------------------------------------------------ reference = the written spec

def test_reference_quantize_act_is_quantize_per_token_of_the_transformed_input():
    x = with_outliers(33, 1152)
    smooth = torch.rand(1152) + 0.5
    for bits in (8, 6, 4):
        q, s = ops.quantize_act(x, bits)
        assert [torch.equal(a, b) for a, b in zip((q, s), ops.quantize_per_token(x, bits))] == [True, True]
        q, s = ops.quantize_act(x, bits, smooth, True)
        q_ref, s_ref = ops.quantize_per_token(hadamard.rotate(x / smooth), bits)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_reference_static_uses_the_table_entry_and_formats():
    x = with_outliers(16, 256)
    tab = table()
    for g in (0, 4, 9):
        q, s = ops.quantize_act(x, 6, None, False, tab, torch.tensor([g], dtype=I32))
        assert s.shape == (16,) and bool((s == tab[g]).all())  # per row: a non-finite row could carry NaN
        assert torch.equal(q, formats.quantize_int(x, tab[g], 6))
        assert int(q.abs().max()) <= 31


def test_reference_layernorm_modulate_matches_dit_adaln():
    # diffusers AdaLayerNormZero: norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None], LN without affine
    B, T, C = 2, 16, 1152
    x = torch.randn(B, T, C) * 3 + 1
    shift, scale = torch.randn(B, C), torch.randn(B, C) * 0.1
    h = torch.nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)(x) * (1 + scale[:, None]) + shift[:, None]
    q, s = ops.layernorm_modulate_quantize(x.reshape(B * T, C), shift, scale, T, 1e-6, 8)
    q_ref, s_ref = ops.quantize_per_token(h.reshape(B * T, C))
    assert torch.allclose(s, s_ref, rtol=1e-5)
    assert_codes_close(q, q_ref)


def test_reference_two_region_is_formats():
    x = torch.randn(64, 256) * 2
    coef = torch.tensor([[0.02, 0.001], [0.01, -0.04]])
    for g, mode in ((0, "sign"), (1, "split")):
        c_pos, c_neg = coef[g]
        q = ops.quantize_two_region(x.abs() if mode == "split" else x, coef, torch.tensor([g], dtype=I32), 8, mode)
        ref = formats.quantize_two_region(x.abs() if mode == "split" else x, c_pos, c_neg, 8, mode)
        assert torch.equal(q, ref)


# --------------------------------------------------------------- Triton (interpreter) vs reference

@pytest.mark.parametrize("m,k", [(1, 1152), (77, 4608), (256, 3072), (1000, 1152), (5, 5000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_quantize_act_without_rotation_is_bit_exact(m, k, dtype):
    # no reassociation: absmax, div_rn by smooth and by the scale, round half even are all exact
    x = with_outliers(m, k, dtype, seed=m + k)
    smooth = torch.rand(k, generator=torch.Generator().manual_seed(k)) * 4 + 0.25
    for bits, sm in ((8, None), (6, smooth), (4, smooth)):
        q, s = triton("quantize_act", x, bits, sm)
        q_ref, s_ref = reference.quantize_act(x, bits, sm, False, None, None)
        assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


ROTATION_CASES = [(m, k, d) for m, k in [(1, 1152), (77, 4608), (256, 3072), (3, 1024), (1, 4608)] for d in DTYPES]


@pytest.mark.parametrize("m,k,dtype", ROTATION_CASES + [(1000, 1152, torch.bfloat16)])
def test_triton_quantize_act_with_rotation(m, k, dtype):
    x = with_outliers(m, k, dtype, seed=m * k)
    smooth = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5
    for bits, sm in ((8, None), (6, smooth)):
        q, s = triton("quantize_act", x, bits, sm, True)
        q_ref, s_ref = reference.quantize_act(x, bits, sm, True, None, None)
        assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)  # absmax of a rotated row: a few ulps
        assert_codes_close(q, q_ref)


@pytest.mark.parametrize("g", [0, 3, 9])
def test_triton_quantize_act_static_table(g):
    x = with_outliers(77, 1152, torch.float16, seed=g)
    tab, idx = table(), torch.tensor([g], dtype=I32)
    q, s = triton("quantize_act", x, 8, None, False, tab, idx)
    q_ref, s_ref = reference.quantize_act(x, 8, None, False, tab, idx)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and bool((s == tab[g]).all()) and s.shape == (77,)
    smooth = torch.rand(1152, generator=torch.Generator().manual_seed(g)) + 0.5
    q, s = triton("quantize_act", x, 6, smooth, True, tab, idx)
    q_ref, s_ref = reference.quantize_act(x, 6, smooth, True, tab, idx)
    assert torch.equal(s, s_ref)
    assert_codes_close(q, q_ref)
    # a zero table entry gives zero codes (formats.quantize_int), not NaN or garbage
    q, _ = triton("quantize_act", x, 8, None, False, torch.zeros(10), idx)
    assert not q.any()


@pytest.mark.parametrize("batches,tokens,c,dtype", [(2, 256, 1152, torch.float16), (1, 1, 1152, torch.bfloat16),
                                                    (3, 77, 4608, torch.bfloat16), (4, 3, 3072, torch.float32)])
def test_triton_layernorm_modulate_quantize(batches, tokens, c, dtype):
    g = torch.Generator().manual_seed(c + tokens)
    x = (torch.randn(batches * tokens, c, generator=g) * 2 + 0.5)
    x[:, 11] *= 30  # DiT hidden states carry outlier channels before the LayerNorm too
    x = x.to(dtype)
    shift = (torch.randn(batches, c, generator=g) * 0.5).to(dtype)
    scale = (torch.randn(batches, c, generator=g) * 0.2).to(dtype)
    for bits, rot, static in ((8, False, False), (8, True, False), (6, True, True)):
        tab_args = (table(), torch.tensor([7], dtype=I32)) if static else (None, None)
        args = (x, shift, scale, tokens, 1e-6, bits, None, rot, *tab_args)
        q, s = triton("layernorm_modulate_quantize", *args)
        q_ref, s_ref = reference.layernorm_modulate_quantize(*args)
        assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)
        assert_codes_close(q, q_ref)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("m,k,dtype", [(1, 4608, torch.float16), (100, 4608, torch.bfloat16),
                                       (77, 3072, torch.float32)])
def test_triton_gelu_quantize(approximate, m, k, dtype):
    h = with_outliers(m, k, dtype, seed=k) * 0.5  # fc1 outputs: mostly in GELU's curved region
    for bits, rot, static in ((8, False, False), (4, False, True), (8, True, False)):
        tab_args = (table(base=0.01), torch.tensor([2], dtype=I32)) if static else (None, None)
        args = (h, bits, approximate, None, rot, *tab_args)
        q, s = triton("gelu_quantize", *args)
        q_ref, s_ref = reference.gelu_quantize(*args)
        assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)
        assert_codes_close(q, q_ref)


@pytest.mark.parametrize("mode", ["sign", "split"])
@pytest.mark.parametrize("bits", [8, 6])
def test_triton_quantize_two_region(mode, bits):
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    if mode == "sign":  # post-GELU: (Δ₊, Δ₋) as TQ-DiT sets them
        x = torch.nn.functional.gelu(torch.randn(77, 4608, generator=g) * 2, approximate="tanh")
        coef = torch.tensor([[float(x.max()) / qmax * f, 0.16997 / (qmax + 1)] for f in torch.linspace(0.5, 1, 10)])
    else:  # post-softmax: values in [0, 1], p = Δ_lo·qmax, Δ_hi = 2^j·Δ_lo stored negated
        x = torch.softmax(torch.randn(77, 1024, generator=g) * 4, -1)
        lo = [2.0 ** -e / qmax for e in range(3, 13)]
        coef = torch.tensor([[d, -d * 2 ** 6] for d in lo])
        # values straddling each split point p exercise the "rounds past qmax" rule
        p = coef[5, 0] * qmax
        x[0, :64] = p * (1 + torch.linspace(-2e-3, 2e-3, 64))
    for grp in (0, 5, 9):
        idx = torch.tensor([grp], dtype=I32)
        q = triton("quantize_two_region", x.half(), coef, idx, bits, mode)
        assert torch.equal(q, reference.quantize_two_region(x.half(), coef, idx, bits, mode, False, "tanh"))
        assert int(q.abs().max()) <= qmax


def test_triton_quantize_two_region_fused_gelu():
    h = torch.randn(256, 4608, generator=torch.Generator().manual_seed(3)) * 2
    coef, idx = torch.tensor([[0.05, 0.0013], [0.04, 0.0013]]), torch.tensor([1], dtype=I32)
    for approximate in ("tanh", "none"):
        q = triton("quantize_two_region", h.bfloat16(), coef, idx, 8, "sign", True, approximate)
        assert_codes_close(q, reference.quantize_two_region(h.bfloat16(), coef, idx, 8, "sign", True, approximate))


def test_triton_rows_too_wide_for_one_tile_are_refused_clearly():
    # Flux's 12288 = 12·1024 rotated would need 128 KB of shared memory (over sm_89's limit)
    with pytest.raises(ValueError, match="K=12288 pads to 16384"):
        triton("quantize_act", torch.randn(2, 12288), 8, None, True)
    h = torch.randn(2, 12288)
    q, s = triton("gelu_quantize", h, 8, "tanh")  # unrotated, it fits
    q_ref, s_ref = reference.gelu_quantize(h, 8, "tanh", None, False, None, None)
    assert torch.allclose(s, s_ref, rtol=1e-5)
    assert_codes_close(q, q_ref)


def test_triton_empty_rows():
    q, s = triton("quantize_act", torch.empty(0, 1152), 8, None, True)
    assert q.shape == (0, 1152) and s.shape == (0,)


# ------------------------------------------------------------------------- real activations

@pytest.fixture(scope="module")
def minilm():
    """MiniLM-L6 layer 2: the q/k/v input (LayerNorm output, 384 = 12·32) and fc1's pre-GELU output
    (1536 = 12·128), on real sentences; they carry real outlier channels."""
    got, _, _ = minilm_capture(lambda model: {"qkv": model.encoder.layer[2].attention.self.query},
                               lambda model: {"fc1_out": model.encoder.layer[2].intermediate.dense},
                               sentences=MINILM_SENTENCES_B)
    return {k: v.reshape(-1, v.shape[-1]).contiguous() for k, v in got.items()}


def test_real_activations_rotation_cuts_quantization_error(minilm):
    x = minilm["qkv"]
    chan = x.abs().amax(0)
    assert float(chan.max() / chan.median()) > 5  # the outlier channels this test is about
    q, s = triton("quantize_act", x, 6, None, True)
    q_ref, s_ref = reference.quantize_act(x, 6, None, True, None, None)
    assert torch.allclose(s, s_ref, rtol=1e-5)
    assert_codes_close(q, q_ref)
    h = hadamard.hadamard_matrix(384)
    err_rot = float(((q.float() * s[:, None]) @ h.T - x).norm() / x.norm())
    q0, s0 = triton("quantize_act", x, 6)
    err_plain = float((q0.float() * s0[:, None] - x).norm() / x.norm())
    # W6A6-style per-token int6: rotating spreads the outliers; measured 2.8% vs 7.0% relative error (2.5×)
    assert err_rot < 0.6 * err_plain


def test_real_activations_gelu_quantize(minilm):
    h = minilm["fc1_out"]  # BERT uses the erf GELU
    q, s = triton("gelu_quantize", h.half(), 8, "none", None, True)
    q_ref, s_ref = reference.gelu_quantize(h.half(), 8, "none", None, True, None, None)
    assert torch.allclose(s, s_ref, rtol=1e-5)
    assert_codes_close(q, q_ref)


# ----------------------------------------------------------------------------------- bad inputs

def test_clear_errors():
    x = torch.randn(4, 1152)
    idx = torch.tensor([0], dtype=I32)
    with pytest.raises(ValueError, match="smooth must have K=1152"):
        ops.quantize_act(x, 8, torch.ones(1000))
    with pytest.raises(TypeError, match="smooth must have dtype"):
        ops.quantize_act(x, 8, torch.ones(1152, dtype=torch.float16))
    with pytest.raises(ValueError, match="not 2\\^k, 12·2\\^k or 36·2\\^k"):
        ops.quantize_act(torch.randn(4, 1000), 8, None, True)
    with pytest.raises(ValueError, match="bits"):
        ops.quantize_act(x, 9)
    with pytest.raises(ValueError, match="go together"):
        ops.quantize_act(x, 8, None, False, torch.ones(10))
    with pytest.raises(ValueError, match="out of range"):
        ops.quantize_act(x, 8, None, False, torch.ones(10), torch.tensor([10], dtype=I32))
    with pytest.raises(ValueError, match="out of range"):
        ops.gelu_quantize(x, 8, "tanh", None, False, torch.ones(10), torch.tensor([-1], dtype=I32))
    with pytest.raises(TypeError, match="group_idx must have dtype"):
        ops.quantize_act(x, 8, None, False, torch.ones(10), torch.tensor([0]))
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu_quantize(x, 8, "erf")
    with pytest.raises(ValueError, match="B=3 batches of 2 tokens"):
        ops.layernorm_modulate_quantize(x, torch.zeros(3, 1152), torch.zeros(3, 1152), 2)
    with pytest.raises(ValueError, match="shift must be"):
        ops.layernorm_modulate_quantize(x, torch.zeros(2, 1024), torch.zeros(2, 1152), 2)
    with pytest.raises(ValueError, match="coef_table must be"):
        ops.quantize_two_region(x, torch.ones(10), idx)
    with pytest.raises(ValueError, match="mode must be"):
        ops.quantize_two_region(x, torch.ones(10, 2), idx, 8, "both")
    with pytest.raises(ValueError, match="out of range"):
        ops.quantize_two_region(x, torch.ones(10, 2), torch.tensor([12], dtype=I32))
    with pytest.raises(ValueError, match="contiguous"):
        ops.quantize_act(torch.randn(1152, 4).T, 8)


# ------------------------------------------------------------------ opcheck and torch.compile

def test_opcheck():
    x = with_outliers(5, 384, torch.float16)
    tab, idx = table(), torch.tensor([3], dtype=I32)
    sm = torch.rand(384) + 0.5
    for args in [(x, 8, None, False, None, None), (x, 6, sm, True, None, None), (x, 8, sm, True, tab, idx)]:
        torch.library.opcheck(torch.ops.dtq.quantize_act.default, args)
    shift, scale = torch.randn(1, 384), torch.randn(1, 384)
    torch.library.opcheck(torch.ops.dtq.layernorm_modulate_quantize.default,
                          (x, shift, scale, 5, 1e-6, 8, None, True, None, None))
    torch.library.opcheck(torch.ops.dtq.layernorm_modulate_quantize.default,
                          (x.float(), shift, scale, 5, 1e-5, 6, sm, False, tab, idx))
    torch.library.opcheck(torch.ops.dtq.gelu_quantize.default, (x, 8, "tanh", None, False, None, None))
    torch.library.opcheck(torch.ops.dtq.gelu_quantize.default, (x, 4, "none", sm, True, tab, idx))
    coef = torch.tensor([[0.02, 0.001]] * 10)
    torch.library.opcheck(torch.ops.dtq.quantize_two_region.default, (x, coef, idx, 8, "sign", True, "tanh"))
    torch.library.opcheck(torch.ops.dtq.quantize_two_region.default, (x.abs(), coef, idx, 6, "split", False, "none"))


def test_torch_compile_fullgraph_dit_block_entry():
    def fused(x, shift, scale, idx):
        q, s = torch.ops.dtq.layernorm_modulate_quantize(x, shift, scale, 8, 1e-6, 8, None, True, None, None)
        q2, s2 = torch.ops.dtq.gelu_quantize(x, 6, "tanh", None, False, table(), idx)
        return q, s, q2, s2

    args = (torch.randn(16, 384), torch.randn(2, 384), torch.randn(2, 384), torch.tensor([4], dtype=I32))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(compiled(*args), fused(*args)))


# ------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(512, 1152), (2048, 4608), (4096, 3072), (1, 1152), (77, 4608)])
def test_gpu_triton_matches_reference(m, k):
    x = with_outliers(m, k, torch.bfloat16, seed=k).cuda()
    sm = (torch.rand(k) + 0.5).cuda()
    tab, idx = table().cuda(), torch.tensor([6], dtype=I32, device="cuda")
    for rot in (False, True):
        q, s = ops.quantize_act(x, 8, sm, rot)
        assert ops.last_backend["quantize_act"] == "triton"
        q_ref, s_ref = reference.quantize_act(x, 8, sm, rot, None, None)
        assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)
        if rot:
            assert_codes_close(q, q_ref)
        else:
            assert torch.equal(q, q_ref)
        q, s = ops.gelu_quantize(x, 6, "tanh", None, rot, tab, idx)
        assert_codes_close(q, reference.gelu_quantize(x, 6, "tanh", None, rot, tab, idx)[0])
    shift, scale = torch.randn(1, k, device="cuda"), torch.randn(1, k, device="cuda") * 0.1
    q, s = ops.layernorm_modulate_quantize(x, shift, scale, m, 1e-6, 8, None, True)
    q_ref, s_ref = reference.layernorm_modulate_quantize(x, shift, scale, m, 1e-6, 8, None, True, None, None)
    assert torch.allclose(s, s_ref, rtol=1e-5)
    assert_codes_close(q, q_ref)
    coef = torch.tensor([[0.05, 0.0013]] * 10, device="cuda")
    q = ops.quantize_two_region(x, coef, idx, 8, "sign")
    assert torch.equal(q, reference.quantize_two_region(x, coef, idx, 8, "sign", False, "tanh"))


@pytest.mark.gpu
def test_gpu_group_index_out_of_range_asserts_on_device():
    # in a child process: a device-side assert poisons the CUDA context for every later test
    import subprocess
    import sys
    code = ("import torch, dtq_kernels.ops as ops\n"
            "x = torch.randn(8, 1152, device='cuda')\n"
            "ops.quantize_act(x, 8, None, False, torch.ones(10, device='cuda'),"
            " torch.tensor([10], dtype=torch.int32, device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "out of range" in res.stderr, res.stderr[-2000:]
