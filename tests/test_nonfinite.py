"""NaN is never hidden: every activation quantizer, in the reference and in every Triton kernel
(interpreter), turns a row holding NaN, +Inf or -Inf into a non-finite output for that row (scale NaN,
or two-region codes -128), and leaves the other rows exactly as they were; the GEMMs, attention and each
QuantLinear mode carry that through to NaN outputs."""
import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels import LinearQuantSpec, QuantLinear, formats

I32 = torch.int32
BACKENDS = ["reference", "triton"]
BAD_ROWS = {1: float("nan"), 4: float("inf"), 6: float("-inf")}
M, K = 9, 128


def poisoned(m=M, k=K, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    for r, v in BAD_ROWS.items():
        x[r, (7 * r) % k] = v
    return x.to(dtype)


def good_rows(m=M):
    return [r for r in range(m) if r not in BAD_ROWS]


def run(backend, op, *args):
    with ops.use_backend(backend):
        out = getattr(ops, op)(*args)
    assert ops.last_backend[op] == backend
    return out


def check_marked(x, q, scale, backend, op, *args, bad=tuple(BAD_ROWS)):
    """Bad rows: codes 0 and scale NaN; good rows: what the op gives without the bad rows."""
    good = [r for r in range(x.shape[0]) if r not in bad]
    assert torch.isnan(scale[list(bad)]).all() and not q[list(bad)].any()
    assert torch.isfinite(scale[good]).all()
    q_good, s_good = run(backend, op, x[good], *args)
    assert torch.equal(q[good], q_good) and torch.equal(scale[good], s_good)


TAB, IDX = torch.tensor([0.02, 0.05]), torch.tensor([1], dtype=I32)
ACT_VARIANTS = {  # (bits, smooth, rotate, scale_table, group_idx)
    "dynamic": (8, None, False, None, None),
    "dynamic-smooth-rotate": (8, torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.5, True, None, None),
    "static": (8, None, False, TAB, IDX),
    "static-int6-rotate": (6, None, True, TAB, IDX),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_per_token(backend):
    x = poisoned()
    q, s = run(backend, "quantize_per_token", x, 8)
    check_marked(x, q, s, backend, "quantize_per_token", 8)


@pytest.mark.parametrize("variant", list(ACT_VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_act(backend, variant):
    x = poisoned(dtype=torch.float16)
    args = ACT_VARIANTS[variant]
    q, s = run(backend, "quantize_act", x, *args)
    assert s.shape == (M,)
    check_marked(x, q, s, backend, "quantize_act", *args)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_act_fp8(backend, rotate):
    x = poisoned(dtype=torch.float16)
    q, s = run(backend, "quantize_act_fp8", x, None, rotate)
    assert s.shape == (M,) and q.dtype == torch.float8_e4m3fn
    good = good_rows()
    assert torch.isnan(s[list(BAD_ROWS)]).all() and not q[list(BAD_ROWS)].float().any()
    q_good, s_good = run(backend, "quantize_act_fp8", x[good], None, rotate)
    assert torch.equal(q[good].float(), q_good.float()) and torch.equal(s[good], s_good)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_quantize(backend, static):
    x = poisoned()
    args = (8, "tanh", None, False) + ((TAB, IDX) if static else (None, None))
    q, s = run(backend, "gelu_quantize", x, *args)
    check_marked(x, q, s, backend, "gelu_quantize", *args)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_modulate_quantize(backend, static):
    T = 3  # 3 batches of 3 tokens: rows 1, 4, 6 (x) are bad, and batch 2 through an Inf in its shift
    x = poisoned()
    shift, mod = torch.randn(3, K) * 0.1, torch.randn(3, K) * 0.1
    shift[2, 5] = float("inf")
    tab = (TAB, IDX) if static else (None, None)
    q, s = run(backend, "layernorm_modulate_quantize", x, shift, mod, T, 1e-6, 8, None, False, *tab)
    bad = [1, 4, 6, 7, 8]
    assert torch.isnan(s[bad]).all() and not q[bad].any()
    good = [0, 2, 3, 5]
    assert torch.isfinite(s[good]).all()
    ref_q, ref_s = run(backend, "layernorm_modulate_quantize", x[:3], shift[:1], mod[:1], T, 1e-6, 8, None,
                       False, *tab)
    assert torch.equal(q[[0, 2]], ref_q[[0, 2]]) and torch.equal(s[[0, 2]], ref_s[[0, 2]])


@pytest.mark.parametrize("mode,gelu", [("sign", False), ("sign", True), ("split", False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_two_region_marks_rows_and_the_gemm_makes_them_nan(backend, mode, gelu):
    x = poisoned().abs() if mode == "split" else poisoned()
    if mode == "split":
        x[1, 7] = float("nan")
    coef = torch.tensor([[0.02, 0.01]]) if mode == "sign" else torch.tensor([[0.002, -0.03]])
    g0 = torch.tensor([0], dtype=I32)
    q = run(backend, "quantize_two_region", x, coef, g0, 8, mode, gelu)
    assert (q[list(BAD_ROWS)] == formats.NONFINITE_CODE).all()
    assert torch.equal(q[good_rows()], run(backend, "quantize_two_region", x[good_rows()], coef, g0, 8, mode, gelu))
    assert int(q[good_rows()].min()) >= -127  # -128 is never a two-region code
    w = torch.randint(-127, 128, (64, K), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    y = run(backend, "int8_gemm_two_region", q, coef, g0, w, torch.rand(64) * 0.01, torch.randn(64), torch.bfloat16)
    assert torch.isnan(y[list(BAD_ROWS)]).all() and torch.isfinite(y[good_rows()]).all()
    deq = formats.dequantize_two_region(q, coef[0, 0], coef[0, 1])
    assert torch.isnan(deq[list(BAD_ROWS)]).all() and torch.isfinite(deq[good_rows()]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_gemms_turn_marked_rows_into_nan(backend):
    x = poisoned()
    w = torch.randint(-127, 128, (64, K), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    ws, bias = torch.rand(64) * 0.01, torch.randn(64)
    for args in ((8, None, False, None, None), (8, None, False, TAB, IDX)):
        q, s = run(backend, "quantize_act", x, *args)
        outs = [run(backend, "int8_gemm", q, s, w, ws, bias, torch.float16),
                run(backend, "int8_gemm_wzp", q, s, w, ws, torch.randint(-3, 4, (64,), dtype=I32), bias,
                    torch.float32)]
        for y in outs:
            assert torch.isnan(y[list(BAD_ROWS)]).all() and torch.isfinite(y[good_rows()]).all()


# ------------------------------------------------------------------------------------------ attention

def _qkv(seed=0, B=1, S=64, H=2, D=64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, S, H, D, generator=g) for _ in range(3))


def _attention(backend, static, q, k, v, mask, p_mode="two_region"):
    if not static:
        return run(backend, "quant_attention", q, k, v, mask, None, "fp16")
    tabs = tuple((t.abs().amax((0, 1, 3)) / 127)[None, :] for t in _qkv())
    p_table = torch.tensor([[2.0 ** -5 / 127, -1.0 / 127]]) if p_mode == "two_region" else torch.tensor([[1 / 255]])
    return run(backend, "quant_attention_static", q, k, v, mask, *tabs, p_table, torch.tensor([0], dtype=I32), 8,
               p_mode)


# every value on the reference; NaN and -Inf through the (interpreted, slower) kernels
ATTN_CASES = [("reference", v) for v in (float("nan"), float("inf"), float("-inf"))] + \
             [("triton", v) for v in (float("nan"), float("-inf"))]


@pytest.mark.parametrize("static,p_mode", [(False, None), (True, "two_region"), (True, "uniform")])
@pytest.mark.parametrize("backend,value", ATTN_CASES)
def test_attention_propagates_non_finite_q_k_v(backend, static, p_mode, value):
    q, k, v = _qkv()
    mask = torch.ones(1, 64, dtype=torch.bool)
    mask[0, 60:] = False
    clean = _attention(backend, static, q, k, v, mask, p_mode)
    assert torch.isfinite(clean).all()
    # a query row: that row (and head) only
    qb = q.clone()
    qb[0, 5, 1, 3] = value
    out = _attention(backend, static, qb, k, v, mask, p_mode)
    assert not torch.isfinite(out[0, 5, 1]).any()
    keep = torch.ones(64, 2, dtype=torch.bool)
    keep[5, 1] = False
    assert torch.equal(out[0][keep], clean[0][keep])
    # an unmasked key: every query of that head reads it; a masked one is ignored
    kb = k.clone()
    kb[0, 10, 0, 0] = value
    out = _attention(backend, static, q, kb, v, mask, p_mode)
    assert not torch.isfinite(out[0, :, 0]).any() and torch.equal(out[0, :, 1], clean[0, :, 1])
    kb = k.clone()
    kb[0, 62, 0, 0] = value
    if not static:
        kb[0, 62, 0, 0] = 1e3  # dynamic K is mean-centred over all tokens: a masked key still shifts it
    assert torch.isfinite(_attention(backend, static, q, kb, v, mask, p_mode)).all()
    # a value: the channel it sits in, for every query of that head
    vb = v.clone()
    vb[0, 20, 1, 7] = value
    out = _attention(backend, static, q, k, vb, mask, p_mode)
    assert not torch.isfinite(out[0, :, 1, 7]).any() and torch.equal(out[0, :, 0], clean[0, :, 0])


# ------------------------------------------------------------------------------------ QuantLinear modes

S = LinearQuantSpec
MODES = {
    "w8a8-dynamic": (S(), None),
    "w8a8-static": (S(act_mode="static"), [0.05]),
    "w8a8-two-region": (S(act_mode="two_region", two_region_mode="sign"), [[0.03, 0.02]]),
    "w8a8-asym-weights": (S(weight_symmetric=False), None),
    "w4a8-static": (S(weight="int4", act_mode="static"), [0.05]),
    "w8a8-smooth-rotate": (S(smooth=True, rotate=True), None),
    "w4a8-group": (S(weight="int4", group_size=32), None),
    "fp4-fp4": (S(weight="fp4_e2m1", group_size=32, act="fp4_e2m1"), None),
    "fp8-fp8": (S(weight="fp8_e4m3", act="fp8_e4m3"), None),
    "w8-weight-only": (S(act=None), None),
    "w8a6-two-region-asym": (S(weight_symmetric=False, act="int6", act_mode="two_region",
                                    two_region_mode="sign"), [[0.03, 0.02]]),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_linear_never_hides_non_finite_rows(backend, mode):
    spec, act_scales = MODES[mode]
    lin = torch.nn.Linear(K, 64)
    kw = {"smooth": torch.rand(K) + 0.5} if spec.smooth else {}
    layer = QuantLinear.from_linear(lin, spec, act_scales, **kw)
    x = poisoned()
    with ops.use_backend(backend):
        y = layer(x)
        y_good = layer(x[good_rows()])
    assert not torch.isfinite(y[list(BAD_ROWS)]).any(), (mode, y[list(BAD_ROWS)])
    assert torch.allclose(y[good_rows()], y_good, rtol=1e-6, atol=1e-6) and torch.isfinite(y_good).all()
