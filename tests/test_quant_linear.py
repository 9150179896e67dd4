"""QuantLinear: every spec against float math with format-justified bounds, paths, state_dict, errors."""
import pytest
import torch

import dtq_kernels as dtq
from dtq_kernels import formats
from dtq_kernels.nn import linear as qlinear
from dtq_kernels.nn.linear import QuantLinear

S = dtq.LinearQuantSpec


def layer(k=256, n=192, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n).requires_grad_(False)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def gaussian(m=64, k=256, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def test_w8a8_dynamic_is_close_to_float_and_uses_the_int8_kernels():
    lin, x = layer(), gaussian()
    q = QuantLinear.from_linear(lin, S())
    assert q.path == "int8_gemm"
    # int8 per-token x per-channel on Gaussian data: ~0.8% per operand (see test_ops_core) -> < 2%
    assert rel(q(x), lin(x)) < 0.02
    # and it computes exactly quantize_per_token + int8_gemm
    codes, s = dtq.ops.quantize_per_token(x)
    ref = dtq.ops.int8_gemm(codes, s, q.qweight, q.wscale, q.bias, torch.float32)
    assert torch.equal(q(x), ref)


def test_w4a8_hands_packed_int4_weights_to_the_gemm():
    lin, x = layer(), gaussian()
    q = QuantLinear.from_linear(lin, S(weight="int4", act="int8", act_mode="dynamic"))
    assert q.path == "int8_gemm" and q.qweight.dtype == torch.uint8 and q.qweight.shape == (192, 128)
    codes, s = dtq.ops.quantize_act(x, 8, None, False, None, None)
    unpacked = dtq.ops.int8_gemm(codes, s, formats.unpack_int4(q.qweight), q.wscale, q.bias, torch.float32)
    assert torch.equal(q(x), unpacked)
    with dtq.ops.use_backend("triton"):  # the interpreted kernel takes the packed bytes as they are
        assert torch.equal(q(x), unpacked)
        assert dtq.ops.last_backend["int8_gemm"] == "triton"


def test_leading_dims_and_dtypes_are_preserved():
    lin = layer(64, 32)
    q = QuantLinear.from_linear(lin, S())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = q(torch.randn(2, 5, 64, dtype=dtype))
        assert y.shape == (2, 5, 32) and y.dtype == dtype


@pytest.mark.parametrize("spec,bound", [
    (S(weight="int8", act="int8"), 0.02),
    (S(weight="int6", act="int6"), 0.06),     # 4x coarser steps than int8
    (S(weight="int4", act="int8"), 0.15),     # int4 per-channel weights: step absmax/7
    (S(weight="int4", group_size=64, act="int8"), 0.12),
    (S(weight="int4", group_size=64, act=None), 0.12),
    (S(weight="int8", act="int8", weight_symmetric=False), 0.02),
    (S(weight="fp8_e4m3", act="fp8_e4m3"), 0.06),   # 3 mantissa bits: relative step 2^-3
    (S(weight="fp4_e2m1", group_size=32, act="fp4_e2m1"), 0.25),
])
def test_error_of_each_format_is_within_its_bound(spec, bound):
    lin, x = layer(), gaussian()
    q = QuantLinear.from_linear(lin, spec)
    err = rel(q(x), lin(x))
    assert err < bound, (spec.name, err)


def test_error_falls_as_bits_rise():
    lin, x = layer(), gaussian()
    errs = [rel(QuantLinear.from_linear(lin, S(weight=f"int{b}", act=f"int{b}"))(x), lin(x)) for b in (4, 6, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_spec_without_a_kernel_runs_the_logged_simulation_on_cpu(caplog):
    spec = S(weight="int8", group_size=32, act="fp4_e2m1")  # FP4 activations with 8-bit weights: no kernel
    qlinear._logged.clear()  # logged once per spec and path: forget earlier tests' layers
    with caplog.at_level("WARNING", logger="dtq_kernels.nn"):
        q = QuantLinear.from_linear(layer(), spec)
    assert "SIMULATED" in caplog.text
    assert q.path == "dequant-matmul" and q.kernel_path.simulated
    assert "path=dequant-matmul" in repr(q)
    assert q(gaussian()).shape == (64, 192)


def test_dequantized_weight_is_what_the_layer_multiplies_by():
    # W4A16 per group: the activations are 16-bit (fp32 inputs rounded to bf16), the weights the dequantized
    # codes rounded to the same 16-bit type (the op's contract, docs/formats.md)
    lin, x = layer(), gaussian()
    q = QuantLinear.from_linear(lin, S(weight="int4", act=None, group_size=64))
    assert q.path == "w4a16_gemm"
    expected = x.bfloat16().double() @ q.dequantized_weight().bfloat16().double().T + lin.bias.double()
    assert torch.allclose(q(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (192, 128)  # two codes per byte


def test_static_and_two_region_need_tables_and_a_group():
    lin, x = layer(), gaussian()
    with pytest.raises(ValueError, match="act_scales"):
        QuantLinear.from_linear(lin, S(act_mode="static"))
    table = torch.full((1,), float(x.abs().max()) / 127)
    q = QuantLinear.from_linear(lin, S(act_mode="static"), table)
    assert rel(q(x), lin(x)) < 0.05  # per-tensor scale on Gaussian data: step = absmax/127
    q10 = QuantLinear.from_linear(lin, S(act_mode="static", time_groups=10), table.repeat(10))
    with pytest.raises(RuntimeError, match="timestep tracker"):
        q10(x)


def test_smoothing_and_rotation_fold_into_the_weights_exactly():
    lin = layer()
    x = gaussian()
    x[:, 7] *= 40  # an outlier channel
    plain = rel(QuantLinear.from_linear(lin, S())(x), lin(x))
    smooth = x.abs().amax(0).clamp(min=1e-5) ** 0.5
    sm = QuantLinear.from_linear(lin, S(smooth=True), smooth=smooth)
    rot = QuantLinear.from_linear(lin, S(rotate=True))
    assert rel(sm(x), lin(x)) < plain
    assert rel(rot(x), lin(x)) < plain
    # the stored weight is exactly the quantized W·H, and without quantization the rotation is an identity
    from dtq_kernels.hadamard import hadamard_matrix, rotate
    w_rot = lin.weight @ hadamard_matrix(256)
    assert torch.equal(rot.dequantized_weight(), formats.dequantize_weight(formats.quantize_weight(w_rot, "int8")))
    assert torch.allclose(rotate(x, 256) @ w_rot.T, x @ lin.weight.T, rtol=1e-4, atol=1e-3)


def test_state_dict_round_trip_and_half_keeps_scales():
    lin, x = layer(), gaussian()
    q = QuantLinear.from_linear(lin, S(weight="int4", group_size=64, act="int8"))
    fresh = QuantLinear(256, 192, q.spec)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    q.half()
    assert q.wscale.dtype == torch.float32 and q.qweight.dtype == torch.uint8


def test_bad_inputs_raise_clearly():
    q = QuantLinear.from_linear(layer(64, 32), S())
    with pytest.raises(ValueError, match="64 features"):
        q(torch.randn(3, 63))
    with pytest.raises(TypeError, match="float32"):
        q(torch.zeros(3, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(60, 8, S(weight="int4", group_size=32))
    with pytest.raises(ValueError, match="not supported"):
        S(weight="int3")
    with pytest.raises(ValueError, match="non-finite"):
        bad = layer(64, 32)
        bad.weight.data[0, 0] = float("nan")
        QuantLinear.from_linear(bad, S())


def _gpu_cases():
    k = 1152  # DiT-XL/2 width (36·32: the non-power-of-two Hadamard)
    table = [3.0 / 127]  # Gaussian inputs: |x| < 3 on all but ~0.3% of entries (those clamp)
    return [(S(), None), (S(weight="int6", act="int6"), None), (S(weight="int4", act="int8"), None),
            (S(weight_symmetric=False), None), (S(rotate=True), None), (S(smooth=True), None),
            (S(act_mode="static"), table),
            (S(act_mode="two_region", two_region_mode="sign"), [[3.0 / 127, 0.17 / 128]]),
            (S(weight="int4", group_size=128, act="int8"), None), (S(weight="int4", group_size=64, act=None), None)], k


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(10))
def test_cuda_layer_matches_the_cpu_reference(case):
    cases, k = _gpu_cases()
    spec, table = cases[case]
    lin, x = layer(k, 4608), gaussian(333, k)  # ragged M
    smooth = torch.rand(k) + 0.5 if spec.smooth else None
    q = QuantLinear.from_linear(lin, spec, table, smooth=smooth)
    ref = q(x)
    y = q.cuda()(x.cuda()).cpu()
    # identical codes and int32 products; the fused quantizer may round a value at a .5 tie the other way
    # (reciprocal multiply vs divide): a one-code flip moves one of 1152 terms by one step (~1/127 of it)
    assert rel(y, ref) < 2e-3, rel(y, ref)
    yb = q(x.cuda().bfloat16())
    assert yb.dtype == torch.bfloat16 and rel(yb.float().cpu(), ref) < 2e-2  # bf16 input/output rounding


@pytest.mark.gpu
def test_static_layer_reads_the_group_on_device_without_sync_and_under_cuda_graphs():
    from dtq_kernels.nn.timestep import TimestepTracker
    lin, x = layer(1152, 1152), gaussian(256, 1152).cuda()
    table = torch.tensor([1.0, 3.0, 9.0]) / 127
    q = QuantLinear.from_linear(lin, S(act_mode="static", time_groups=3), table).cuda()
    tracker = TimestepTracker(3, 1000).cuda()
    q.bind_timestep_tracker(tracker)
    outs, steps = {}, [(torch.full((2,), t, device="cuda"), g) for t, g in ((100, 0), (500, 1), (900, 2))]
    tracker.update(steps[0][0])
    q(x)  # warm-up: Triton compilation may sync
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the group update or the layer raises
    try:
        for t, g in steps:
            tracker.update(t)
            outs[g] = q(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(tracker.group_idx) == 2
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    # a captured graph reads the group tensor at replay time: update it outside the graph
    tracker.update(steps[0][0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q(x)  # warm-up (Triton compilation) off the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = q(x)
    for t, g in reversed(steps):
        tracker.update(t)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, outs[g]), (t, g)


# ------------------------------------------------------------------------------ the path table

def test_every_path_row_is_reachable_and_the_simulation_is_last():
    specs = {"w4a4_gemm": S(weight="fp4_e2m1", act="int4", group_size=32),
             "int8_gemm": S(weight="int6", act="int6", act_mode="static"),
             "int8_gemm_grouped": S(weight="int4", group_size=128),
             "int8_gemm_wzp": S(weight="int4", weight_symmetric=False),
             "int8_gemm_two_region": S(weight="int4", act_mode="two_region", two_region_mode="split"),
             "w4a16_gemm": S(weight="int4", act=None),
             "fp8_gemm": S(weight="fp8_e4m3", act="fp8_e4m3", smooth=True),
             "dequant-matmul": S(weight="int4", group_size=32)}  # group 32: no kernel
    assert [p.name for p in qlinear.PATHS] == list(specs)
    for name, spec in specs.items():
        assert qlinear.select_path(spec).name == name
    assert qlinear.PATHS[-1].simulated and not any(p.simulated for p in qlinear.PATHS[:-1])
    # FP8 has no kernel before sm_89: there the spec falls to the simulation row
    fp8 = specs["fp8_gemm"]
    assert qlinear.select_path(fp8, 90).name == "fp8_gemm" and qlinear.select_path(fp8, 80).simulated


def test_simulation_is_refused_on_cuda_unless_opted_in(monkeypatch):
    monkeypatch.delenv(qlinear.ALLOW_SIMULATED_ENV, raising=False)
    cap = {"v": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["v"])
    cuda = torch.device("cuda")
    fp4 = QuantLinear.from_linear(layer(), S(weight="int8", group_size=32, act="fp4_e2m1"))  # no kernel
    with pytest.raises(qlinear.SimulatedPathError, match="has no kernel.*allow_simulated=True.*DTQ_ALLOW_SIMULATED=1"):
        fp4._path_for(cuda)
    fp8 = QuantLinear.from_linear(layer(), S(weight="fp8_e4m3", act="fp8_e4m3"))
    assert fp8._path_for(cuda).name == "fp8_gemm"
    cap["v"] = (8, 0)
    with pytest.raises(qlinear.SimulatedPathError, match="sm_\\(89, 90\\) only, this GPU is sm_80"):
        fp8._path_for(cuda)
    allowed = QuantLinear.from_linear(layer(), S(weight="fp8_e4m3", act="fp8_e4m3", allow_simulated=True))
    assert allowed._path_for(cuda).simulated
    monkeypatch.setenv(qlinear.ALLOW_SIMULATED_ENV, "1")
    assert fp8._path_for(cuda).simulated and fp4._path_for(cuda).simulated
    assert fp8._path_for(torch.device("cpu")).name == "fp8_gemm"  # CPU: the kernel's reference


def test_weights_are_stored_as_the_kernel_reads_them_and_weight_bytes_counts_them():
    n, k = 192, 256
    cases = [(S(weight="int4", group_size=64), torch.uint8, (n, k // 2), n * k // 2 + n * (k // 64) * 4),
             (S(weight="int4", act=None), torch.uint8, (n, k // 2), n * k // 2 + n * 4),
             (S(weight="int4", weight_symmetric=False), torch.int8, (n, k), n * k + n * 4 + n * 4),
             (S(weight="int4", act_mode="two_region", two_region_mode="sign"), torch.int8, (n, k), n * k + n * 4),
             (S(weight="fp8_e4m3", act="fp8_e4m3"), torch.float8_e4m3fn, (n, k), n * k + n * 4)]
    for spec, dtype, shape, nbytes in cases:
        q = QuantLinear(k, n, spec)
        assert q.qweight.dtype == dtype and tuple(q.qweight.shape) == shape, spec
        assert q.weight_bytes() == nbytes, spec


def _fake_quant_reference(lin, x, spec):
    """Independent fake quantization: activations and weights rounded to their grids in float64 from
    the format definitions, multiplied in float64."""
    xd, wd = x.double(), lin.weight.double()
    if spec.act == "int8":
        s = xd.abs().amax(1, keepdim=True) / 127
        xq = torch.round(xd / s).clamp(-127, 127) * s
    elif spec.act == "fp8_e4m3":
        s = (xd.abs().amax(1, keepdim=True) / 448).float()
        xq = (x / s).to(torch.float8_e4m3fn).double() * s.double()
    else:
        xq = x.bfloat16().double()
    if spec.weight == "fp8_e4m3":
        ws = (wd.abs().amax(1, keepdim=True) / 448).float()
        wq = (lin.weight / ws).to(torch.float8_e4m3fn).double() * ws.double()
    else:
        g = spec.group_size or wd.shape[1]
        wg = wd.reshape(wd.shape[0], -1, g)
        ws = (wg.abs().amax(-1, keepdim=True) / 7).float().double()
        wq = (torch.round(wg / ws).clamp(-7, 7) * ws).reshape(wd.shape)
        if spec.act is None and spec.group_size:  # per-group W4A16 multiplies 16-bit (bf16) dequantized weights
            wq = wq.float().bfloat16().double()
    return xq @ wq.T + lin.bias.double()


@pytest.mark.parametrize("spec", [S(weight="int4", group_size=64), S(weight="int4", group_size=128, act=None),
                                  S(weight="int4", act=None), S(weight="fp8_e4m3", act="fp8_e4m3")])
def test_new_kernel_paths_match_independent_fake_quant(spec):
    lin, x = layer(), gaussian()
    q = QuantLinear.from_linear(lin, spec)
    assert not q.kernel_path.simulated
    ref = _fake_quant_reference(lin, x, spec)
    # same grids, different arithmetic (fp32 scales and sums vs float64): a code at an exact rounding
    # tie can flip, so compare relative to the output norm
    for backend in ("reference", "triton"):
        with dtq.ops.use_backend(backend):
            y = q(x)
        assert rel(y, ref) < 1e-5, (spec.name, backend, rel(y, ref))


def test_layers_compile_fullgraph():
    # the path is resolved and logged when the layer is built or moved, so forward traces without breaks
    lin, x = layer(), gaussian(8)
    for spec in (S(weight="int4", group_size=128), S(weight="int4", act=None),
                 S(weight="fp8_e4m3", act="fp8_e4m3", rotate=True), S(act_mode="two_region", two_region_mode="sign")):
        table = [[0.03, 0.002]] if spec.act_mode == "two_region" else None
        q = QuantLinear.from_linear(lin, spec, table)
        compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), q(x)), spec.name
