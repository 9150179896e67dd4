"""The shipped reference DiT: loads offline from the package, has the documented config, runs forward
and samples (DDIM + classifier-free guidance) to images in [-1, 1]. Also the Fashion-MNIST loader."""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dtq_kernels.models import reference_dit as ref  # noqa: E402
from dtq_kernels.models.reference_dit import data as ref_data  # noqa: E402

HAS_DATA = ref_data.DATA_DIR.is_dir()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ref.load_reference_dit()


def test_checkpoint_files_are_shipped_and_small():
    from dtq_kernels.models.reference_dit.model import WEIGHTS_DIR
    st = WEIGHTS_DIR / "diffusion_pytorch_model.safetensors"
    assert (WEIGHTS_DIR / "config.json").is_file() and st.is_file()
    assert st.stat().st_size <= 40 * 2**20
    assert (Path(ref.__file__).parent / "MODEL_CARD.md").is_file()


def test_config_matches_reference_config(model):
    want = ref.reference_config()
    for k, v in want.items():
        assert model.config[k] == v, k
    assert want["patch_size"] == 4 and want["num_layers"] >= 6
    width = want["num_attention_heads"] * want["attention_head_dim"]
    assert 256 <= width <= 384 and width % 16 == 0
    from dtq_kernels.models.reference_dit.model import WEIGHTS_DIR
    cfg = json.loads((WEIGHTS_DIR / "config.json").read_text())
    assert cfg["_class_name"] == "DiTTransformer2DModel"


def test_model_is_fp32_eval_with_null_class_embedding(model):
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == ref.NUM_CLASSES + 1 and ref.NULL_CLASS == ref.NUM_CLASSES


def test_forward_is_finite_with_the_right_shape(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    y = torch.tensor([0, 3, 9, ref.NULL_CLASS])
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    assert out.shape == (4, 1, 32, 32)
    assert torch.isfinite(out).all()
    # a trained epsilon predictor: at t=999 the input is almost pure noise, so eps ≈ x
    assert torch.nn.functional.cosine_similarity(out[2].flatten(), x[2].flatten(), dim=0) > 0.9


def test_sample_is_deterministic_and_in_range(model):
    kw = dict(num_inference_steps=4, guidance_scale=3.0)
    a = ref.sample(model, [1, 7], generator=torch.Generator().manual_seed(0), **kw)
    b = ref.sample(model, [1, 7], generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 1, 32, 32) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert a.std() > 0.1  # not a constant image


def test_guidance_one_runs_only_the_conditional_half(model):
    """guidance 1 is eps_u + 1 * (eps_c - eps_u) = eps_c: the sampler skips the unconditional batch (half the
    transformer calls' work) and gets the conditional model's images."""
    batches, forward = [], model.forward

    def counting(hidden_states, *args, **kwargs):
        batches.append((hidden_states.shape[0], kwargs["class_labels"].tolist()))
        return forward(hidden_states, *args, **kwargs)

    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    model.forward = counting
    try:
        plain = ref.sample(model, [1, 7], num_inference_steps=3, guidance_scale=1.0, noise=noise)
        assert batches == [(2, [1, 7])] * 3
        batches.clear()
        guided = ref.sample(model, [1, 7], num_inference_steps=3, guidance_scale=1.0 + 1e-6, noise=noise)
        assert batches == [(4, [1, 7, ref.NULL_CLASS, ref.NULL_CLASS])] * 3
    finally:
        del model.forward
    torch.testing.assert_close(plain, guided, atol=1e-3, rtol=0)  # 1e-6 of (eps_c - eps_u) apart


def test_scheduler_matches_training_schedule():
    from dtq_kernels.models.reference_dit.train import ddpm_alphas_cumprod
    s = ref.reference_scheduler()
    assert s.config.num_train_timesteps == 1000 and s.config.prediction_type == "epsilon"
    assert torch.allclose(s.alphas_cumprod.float(), ddpm_alphas_cumprod(), atol=1e-6)
    s.set_timesteps(25)  # trailing: the first step starts at the last training timestep
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 39 and len(s.timesteps) == 25


@pytest.mark.skipif(not HAS_DATA, reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_loader():
    x, y = ref.load_fashion_mnist("test")
    assert x.shape == (10000, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.min() == 0 and y.max() == 9
    assert x.min() == -1 and x.max() == 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # 2 px of background padding


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        ref.load_fashion_mnist("train", data_dir=tmp_path)
