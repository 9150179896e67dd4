"""Small diffusers models and plans shared by the model-level tests."""
import torch

import dtq_kernels as dtq
from dtq_kernels import plan as plan_lib


def tiny_dit(seed=0, layers=2):
    """seed None: draw from the current RNG state."""
    from diffusers import DiTTransformer2DModel
    if seed is not None:
        torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, out_channels=8, num_layers=layers,
                                 sample_size=8).eval().requires_grad_(False)


def tiny_pixart(seed=0):
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, out_channels=8, num_layers=2,
                                    cross_attention_dim=64, caption_channels=32, sample_size=8,
                                    norm_type="ada_norm_single", use_additional_conditions=False
                                    ).eval().requires_grad_(False)


def dit_inputs(batch=2, t=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.full((batch,), t),
                class_labels=torch.arange(batch) % 10)


def uniform_plan(model, spec, act_scales=None, time_groups=1):
    """Every quantizable layer with the same spec (a plan without calibration, for tests)."""
    return plan_lib.uniform_plan(model, spec, act_scales, time_groups, recipe="test")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_dit(model, **kw):
    with torch.no_grad():
        return model(**kw).sample


__all__ = ["dtq", "tiny_dit", "tiny_pixart", "dit_inputs", "uniform_plan", "rel", "run_dit"]


def tiny_sd3(seed=0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4).eval().requires_grad_(False)


def sd3_inputs(t=500.0, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), t))


def tiny_flux(seed=0):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(4, 4, 8)).eval().requires_grad_(False)


def flux_inputs(sigma=0.5, batch=2, seed=0):
    """Flux takes σ in [0, 1] as its timestep (the pipeline divides by 1000)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), sigma),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))


__all__ += ["tiny_sd3", "sd3_inputs", "tiny_flux", "flux_inputs"]


def tiny_dit_pipeline(seed=0):
    """A DiTPipeline around tiny_dit() with a two-level VAE (8x8 latents <-> 16x16 images)."""
    import diffusers
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32)
    return diffusers.DiTPipeline(transformer=tiny_dit(seed=None), vae=vae, scheduler=diffusers.DDIMScheduler(),
                                 id2label={1: "goldfish", 2: "shark"})


__all__ += ["tiny_dit_pipeline"]


def own_memory(model):
    """Give every parameter and buffer its own fresh allocation. Tensors loaded from a safetensors file
    can sit at any 8-byte offset of its mapping, and CPU BLAS may sum in another order for an unaligned
    operand (an ulp of difference): comparing the outputs of two loads is exact only on equal footing."""
    with torch.no_grad():
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for k, t in store.items():
                    if t is not None:
                        t.data = t.data.clone()
    return model


__all__ += ["own_memory"]


def reference_dit_or_skip():
    """The shipped reference DiT; the calling test is skipped where its module or weights are absent."""
    import pytest
    ref = pytest.importorskip("dtq_kernels.models.reference_dit")
    try:
        return ref.load_reference_dit()
    except FileNotFoundError:
        pytest.skip("no shipped reference DiT weights")


__all__ += ["reference_dit_or_skip"]
