"""dtq.quantize on diffusers DiT / PixArt: accuracy ordering, timestep plumbing, errors, full-size DiT-XL/2."""
import time

import pytest
import torch

pytest.importorskip("diffusers")

import dtq_kernels as dtq  # noqa: E402
from dtq_kernels.nn import MissingTimestepError, QuantLinear  # noqa: E402
from helpers_models import (dit_inputs, flux_inputs, rel, run_dit, sd3_inputs, tiny_dit, tiny_flux,  # noqa: E402
                            tiny_pixart, tiny_sd3, uniform_plan)

S = dtq.LinearQuantSpec


def test_w8a8_dynamic_dit_is_close_to_fp():
    fp, q = tiny_dit(), tiny_dit()
    dtq.quantize(q, "viditq-w8a8")
    n_q = sum(isinstance(m, QuantLinear) for m in q.modules())
    assert n_q == 8  # 4 per block: qkv (fused), out, fc1, fc2; adaLN, embedders and final layer stay FP
    # int8 per token x per channel, 12 layers deep: each ~0.5-1% on these activations -> < 3% total
    assert rel(run_dit(q, **dit_inputs()), run_dit(fp, **dit_inputs())) < 0.03


def test_error_falls_as_bits_rise():
    fp = run_dit(tiny_dit(), **dit_inputs())
    errs = []
    for b in (4, 6, 8):
        m = tiny_dit()
        dtq.quantize(m, uniform_plan(m, S(weight=f"int{b}", act=f"int{b}")))
        errs.append(rel(run_dit(m, **dit_inputs()), fp))
    assert errs[0] > errs[1] > errs[2], errs


def test_pixart_quantizes_with_cross_attention():
    fp, q = tiny_pixart(), tiny_pixart()
    dtq.quantize(q, "viditq-w8a8")
    kw = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 7, 32),
              timestep=torch.tensor([300]))
    with torch.no_grad():
        a, b = q(**kw).sample, fp(**kw).sample
    assert isinstance(q.transformer_blocks[0].attn2.to_k, QuantLinear)
    assert not isinstance(q.adaln_single.linear, QuantLinear)
    assert rel(a, b) < 0.03


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_sd3_and_flux_quantize_their_joint_blocks(kind):
    from dtq_kernels.models import get_adapter
    build, inputs = (tiny_sd3, sd3_inputs) if kind == "sd3" else (tiny_flux, flux_inputs)
    fp, q = build(), build()
    dtq.quantize(q, "viditq-w8a8")
    adapter = get_adapter(q)
    quantized = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and all(adapter.role(n) != "other" for n in quantized)
    assert not quantized & {"proj_out", "norm_out.linear", "context_embedder", "transformer_blocks.0.norm1.linear"}
    with torch.no_grad():
        a, b = q(**inputs()).sample, fp(**inputs()).sample
    assert rel(a, b) < 0.03  # the same per-layer int8 error as the DiT test, 1-2 blocks deep


def test_flux_sigma_timestep_maps_to_train_timesteps():
    m = tiny_flux()
    dtq.quantize(m, uniform_plan(m, S(act_mode="static", time_groups=10), [0.05] * 10, time_groups=10))
    for sigma, g in ((0.0, 0), (0.25, 2), (0.75, 7), (1.0, 9)):
        with torch.no_grad():
            m(**flux_inputs(sigma))
        assert int(m.dtq_timestep.group_idx) == g, (sigma, g)


def test_static_tables_follow_the_timestep_group():
    m = tiny_dit()
    table = torch.linspace(0.01, 0.1, 10)
    dtq.quantize(m, uniform_plan(m, S(act_mode="static", time_groups=10), table.tolist(), time_groups=10))
    tracker = m.dtq_timestep
    for t, g in ((0, 0), (99, 0), (100, 1), (555, 5), (999, 9), (1000, 9)):
        run_dit(m, **dit_inputs(t=t))
        assert int(tracker.group_idx) == g, (t, g)


def test_missing_timestep_and_mixed_groups_raise():
    m = tiny_dit()
    dtq.quantize(m, uniform_plan(m, S(act_mode="static", time_groups=10), [0.05] * 10, time_groups=10))
    kw = dit_inputs()
    del kw["timestep"]
    with pytest.raises(MissingTimestepError, match="timestep"):
        run_dit(m, **kw)
    kw = dit_inputs()
    kw["timestep"] = torch.tensor([10, 990])
    with pytest.raises(ValueError, match="mixes timesteps"):
        run_dit(m, **kw)


def test_two_region_post_gelu_layers_read_their_time_group():
    """fc2 (post-GELU input) layers with sign-mode two-region codes, G=2: the table row follows t."""
    from dtq_kernels.models import get_adapter
    from dtq_kernels.plan import LayerPlan
    fp = tiny_dit()
    adapter = get_adapter(fp)
    fc2 = [n for n in adapter.quantizable_linears(fp) if adapter.role(n) == "fc2"]
    inputs = {}
    hooks = [fp.get_submodule(n).register_forward_hook(lambda mod, a, out, n=n: inputs.__setitem__(n, a[0]))
             for n in fc2]
    ref = run_dit(fp, **dit_inputs(t=200))
    for h in hooks:
        h.remove()
    # c_pos: the measured positive range / 127; c_neg: GELU's minimum (-0.17) / 128 (docs/methods.md)
    good = {n: [float(x.max()) / 127, 0.17 / 128] for n, x in inputs.items()}
    spec2 = S(act_mode="two_region", two_region_mode="sign", time_groups=2)

    def quantized(coarse_group_1: float):
        m = tiny_dit()
        plan = uniform_plan(m, S(), time_groups=2)
        for n in fc2:
            plan.layers[n] = LayerPlan(spec2, [good[n], [coarse_group_1 * c for c in good[n]]])
        return dtq.quantize(m, plan)
    ok, bad = quantized(1.0), quantized(8.0)  # bad: group 1 (t >= 500) steps 8x too coarse
    assert ok.get_submodule(fc2[0]).path == "int8_gemm_two_region"
    # int8 everywhere, 8-bit two-region fc2 steps at the measured range: as close as W8A8 dynamic (< 3%)
    assert rel(run_dit(ok, **dit_inputs(t=200)), ref) < 0.03
    assert torch.equal(run_dit(ok, **dit_inputs(t=200)), run_dit(bad, **dit_inputs(t=200)))  # same group 0
    fp700 = run_dit(fp, **dit_inputs(t=700))
    assert rel(run_dit(bad, **dit_inputs(t=700)), fp700) > 2 * rel(run_dit(ok, **dit_inputs(t=700)), fp700)


def test_recipe_needing_calibration_is_refused_by_name():
    with pytest.raises(ValueError, match="needs calibration data"):
        dtq.quantize(tiny_dit(), "tqdit-w8a8")


def test_plan_for_another_model_is_refused_and_model_untouched():
    dit, pix = tiny_dit(), tiny_pixart()
    plan = uniform_plan(dit, S())
    with pytest.raises(ValueError, match="plan is for a 'dit'"):
        dtq.quantize(pix, plan)
    big = tiny_dit(layers=3)
    plan3 = uniform_plan(big, S())
    with pytest.raises(ValueError, match="not a Linear of this model"):
        dtq.quantize(dit, plan3)
    assert not any(isinstance(m, QuantLinear) for m in dit.modules())


def test_full_size_dit_xl_2_quantizes_within_budget():
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    with torch.device("meta"):  # skip diffusers' slow random init of 675M weights: fill them cheaply instead
        model = DiTTransformer2DModel(num_layers=28, out_channels=8)
    model = model.to_empty(device="cpu").eval().requires_grad_(False)
    # quantization cost does not depend on the values: copy slices of one random pool (a memcpy) rather
    # than drawing 675M normals (~25 s here)
    pool = torch.randn(max(p.numel() for p in model.parameters())) * 0.02
    for p in model.parameters():
        p.copy_(pool[:p.numel()].view_as(p))
    start = time.time()
    dtq.quantize(model, "viditq-w8a8")
    elapsed = time.time() - start
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 28 * 4  # q/k/v fused into one layer per block
    assert elapsed < 60, elapsed  # measured 18 s on the shared 2-core CPU (168 layers, 446M weights)
    fp_bytes = sum(m.in_features * m.out_features * 2 for m in qls)  # their bf16 weights
    assert sum(q.weight_bytes() for q in qls) < 0.51 * fp_bytes  # int8 codes + fp32 per-channel scales


def test_deepcopy_of_a_static_model_tracks_its_own_timesteps():
    import copy
    m = tiny_dit()
    dtq.quantize(m, uniform_plan(m, S(act_mode="static", time_groups=10), torch.linspace(0.01, 0.1, 10).tolist(),
                                 time_groups=10))
    run_dit(m, **dit_inputs(t=50))
    c = copy.deepcopy(m)
    for t in (950, 450):
        assert torch.equal(run_dit(c, **dit_inputs(t=t)), run_dit(m, **dit_inputs(t=t)))
        run_dit(c, **dit_inputs(t=50))  # the copy's own tracker moves; the original's does not
        assert int(c.dtq_timestep.group_idx) == 0 and int(m.dtq_timestep.group_idx) == t // 100
