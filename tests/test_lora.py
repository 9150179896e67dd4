"""LoRA on quantized layers: a floating-point side branch next to the packed GEMM (nn/lora.py)."""
import pytest
import torch

import dtq_kernels as dtq
from dtq_kernels.nn.linear import QuantLinear
from dtq_kernels.nn.lora import apply_lora
from helpers_models import dit_inputs, rel, run_dit, tiny_dit

S = dtq.LinearQuantSpec


def _layer_case(spec, k=256, n=384, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    smooth = torch.rand(k, generator=g) + 0.5 if spec.smooth else None
    q = QuantLinear.from_linear(lin, spec, smooth=smooth)
    A, B = torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1
    x = torch.randn(3, 17, k, generator=g)
    return lin, q, A, B, x


@pytest.mark.parametrize("spec", [S(), S(weight="int4"), S(smooth=True, rotate=True),
                                  S(weight="fp4_e2m1", act=None, group_size=32)],
                         ids=["w8a8", "w4a8", "w8a8-smooth-rotate", "fp4-weight-only-g32"])
def test_branch_is_exact_and_output_matches_fp_plus_lora(spec):
    lin, q, A, B, x = _layer_case(spec)
    base = q(x)
    q.add_lora(A, B, scale=0.5)
    lora = 0.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(q(x) - base, lora, rtol=1e-5, atol=1e-5)  # the packed GEMM is untouched
    with torch.no_grad():
        fp = lin(x) + lora
    tol = 0.02 if spec.weight == "int8" else 0.2  # the base format's own error (test_quant_linear's bounds)
    assert rel(q(x), fp) < tol
    assert rel(q(x), fp) <= rel(base, lin(x).detach()) * 1.5 + 1e-3
    q.remove_lora()
    assert torch.equal(q(x), base)


def test_fusing_requantizes_and_says_so():
    lin, q, A, B, x = _layer_case(S(smooth=True))
    q.add_lora(A, B, 1.0)
    fused = q.fused_with_lora()
    assert not fused.lora and fused.spec == q.spec and torch.equal(fused.smooth, q.smooth)
    with torch.no_grad():
        fp = lin(x) + (x @ A.T) @ B.T
    assert rel(fused(x), fp) < 0.02
    assert "quantized again" in QuantLinear.fused_with_lora.__doc__


def test_model_adapter_file_on_a_quantized_dit(tmp_path):
    fp = tiny_dit()
    q = dtq.quantize(tiny_dit(), "viditq-w8a8")
    g = torch.Generator().manual_seed(1)
    sd = {}
    for b in range(2):
        for m, (k, n) in {f"transformer_blocks.{b}.attn1.to_q": (64, 64), f"transformer_blocks.{b}.ff.net.2": (256, 64),
                          f"transformer_blocks.{b}.norm1.linear": (64, 384)}.items():
            sd[f"transformer.{m}.lora_A.weight"] = torch.randn(4, k, generator=g) * 0.1
            sd[f"transformer.{m}.lora_B.weight"] = torch.randn(n, 4, generator=g) * 0.1
            sd[f"transformer.{m}.alpha"] = torch.tensor(8.0)  # scale alpha / r = 2
    x = dit_inputs()
    base_err = rel(run_dit(q, **x), run_dit(fp, **x))
    done = apply_lora(q, sd)
    assert done["transformer_blocks.0.attn1.to_q"] == "branch" and done["transformer_blocks.1.norm1.linear"] == "merged"
    assert apply_lora(fp, sd)["transformer_blocks.0.attn1.to_q"] == "merged"  # the FP reference: every layer merged
    err = rel(run_dit(q, **x), run_dit(fp, **x))
    assert err < 0.05 and err < 2 * base_err + 1e-3, (err, base_err)
    # adapters are not part of the quantized checkpoint
    dtq.save_quantized(q, tmp_path / "q")
    assert not any("lora" in k for k in q.state_dict())


def test_bad_adapters_change_nothing():
    q = dtq.quantize(tiny_dit(), "viditq-w8a8")
    good = {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
            "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2)}
    for bad, match in [({"transformer_blocks.0.attn1.to_k.lora_A.weight": torch.zeros(2, 65),
                         "transformer_blocks.0.attn1.to_k.lora_B.weight": torch.zeros(64, 2)}, "LoRA shapes"),
                       ({"nope.lora_A.weight": torch.zeros(2, 64), "nope.lora_B.weight": torch.zeros(64, 2)},
                        "not a linear layer"),
                       ({"transformer_blocks.0.attn1.to_k.lora_A.weight": torch.zeros(2, 64)}, "lacks its B"),
                       ({"transformer_blocks.0.attn1.to_k.weight": torch.zeros(2, 64)}, "is not a lora_A"),
                       ({"transformer_blocks.0.attn1.to_k.lora_A.weight": torch.full((2, 64), float("nan")),
                         "transformer_blocks.0.attn1.to_k.lora_B.weight": torch.zeros(64, 2)}, "non-finite")]:
        with pytest.raises(ValueError, match=match):
            apply_lora(q, {**good, **bad})
        assert not any(isinstance(m, QuantLinear) and m.lora for m in q.modules())
    apply_lora(q, good)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(q, good)
    with pytest.raises(KeyError, match="no LoRA adapter named 'x'"):
        q.transformer_blocks[0].attn1.to_qkv.remove_lora("x")


def _qkv_adapters(blocks=2, r=3, seed=2):
    """An adapter file naming to_q / to_k / to_v (ranks r, r+1, r+2; alphas 6, 4, none) and fc2."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(blocks):
        for i, m in enumerate(("to_q", "to_k", "to_v")):
            path = f"transformer_blocks.{b}.attn1.{m}"
            sd[f"{path}.lora_A.weight"] = torch.randn(r + i, 64, generator=g) * 0.1
            sd[f"{path}.lora_B.weight"] = torch.randn(64, r + i, generator=g) * 0.1
            if i < 2:
                sd[f"{path}.alpha"] = torch.tensor(6.0 - 2 * i)
        sd[f"transformer_blocks.{b}.ff.net.2.lora_A.weight"] = torch.randn(r, 256, generator=g) * 0.1
        sd[f"transformer_blocks.{b}.ff.net.2.lora_B.weight"] = torch.randn(64, r, generator=g) * 0.1
    return sd


def test_member_adapters_on_a_fused_qkv_match_the_per_layer_model():
    """to_q / to_k / to_v adapters land on their rows of the fused to_qkv: the fused model with the adapter
    gives the per-layer model's output with the same adapter (up to float rounding of the stacked branch),
    the fast block path hands LoRA'd layers their float input, and removing the adapter restores it all."""
    fused = dtq.quantize(tiny_dit(), "viditq-w8a8")
    per_layer = dtq.quantize(tiny_dit(), "viditq-w8a8", fuse=False)
    attn = fused.transformer_blocks[0].attn1
    assert not hasattr(attn, "to_q") and isinstance(attn.to_qkv, QuantLinear)
    x = dit_inputs()
    base = run_dit(fused, **x)
    sd = _qkv_adapters()
    done = apply_lora(fused, sd, scale=0.5)
    assert done["transformer_blocks.1.attn1.to_k"] == "branch" and set(attn.to_qkv.lora) == {"default"}
    branch = attn.to_qkv.lora["default"]
    assert branch.A.shape == (3 + 4 + 5, 64) and branch.B.shape == (192, 12)
    assert not branch.B[:64, 3:].any() and not branch.B[64:128, :3].any() and not branch.B[128:, :7].any()
    apply_lora(per_layer, sd, scale=0.5)
    with_lora = run_dit(fused, **x)
    assert rel(with_lora, base) > 0.01  # the adapter does change the output
    torch.testing.assert_close(with_lora, run_dit(per_layer, **x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(fused, sd)
    for m in fused.modules():
        if isinstance(m, QuantLinear) and m.lora:
            m.remove_lora()
    assert torch.equal(run_dit(fused, **x), base)


def test_compiles_with_a_branch():
    lin, q, A, B, x = _layer_case(S())
    q.add_lora(A, B, 0.7)
    eager = q(x)
    out = torch.compile(q, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, eager)
