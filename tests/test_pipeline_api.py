"""dtq.quantize_pipeline and the README's quick start, on a small random DiT pipeline."""
import re
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import dtq_kernels as dtq  # noqa: E402
from dtq_kernels.nn.linear import QuantLinear  # noqa: E402
from helpers_models import own_memory, tiny_dit_pipeline  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    section = README.read_text().split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs():
    code = quick_start()
    assert len(code.strip().splitlines()) == 3
    env = {"pipe": tiny_dit_pipeline()}
    exec(compile(code, "README.md quick start", "exec"), env)
    assert isinstance(env["pipe"].transformer.transformer_blocks[0].attn1.to_qkv, QuantLinear)
    assert len(env["images"]) == 2 and env["images"][0].size == (16, 16)


def test_calibrating_recipe_then_save_and_load(tmp_path):
    pytest.importorskip("accelerate")  # diffusers loads quantized models only with it
    pipe = dtq.quantize_pipeline(tiny_dit_pipeline(), "rtn-w8a8", num_samples=2, num_inference_steps=2,
                                 pipe_kwargs={"class_labels": [1, 2]}, progress=False)
    q = pipe.transformer.transformer_blocks[1].ff.net[2]
    assert isinstance(q, QuantLinear) and q.spec.act_mode == "static"
    pipe.save_pretrained(tmp_path / "pipe")
    again = diffusers.DiTPipeline.from_pretrained(tmp_path / "pipe")
    own_memory(pipe.transformer)
    own_memory(again.transformer)
    assert isinstance(again.transformer.transformer_blocks[1].ff.net[2], QuantLinear)
    run = dict(class_labels=[2], num_inference_steps=2, output_type="np")
    a = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    b = again(**run, generator=torch.Generator().manual_seed(0)).images
    assert (a == b).all()


def test_bad_inputs():
    pipe = dtq.quantize_pipeline(tiny_dit_pipeline(), "viditq-w8a8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        dtq.quantize_pipeline(pipe, "viditq-w8a8")
    with pytest.raises(TypeError, match="needs a diffusers pipeline"):
        dtq.quantize_pipeline(torch.nn.Linear(2, 2), "viditq-w8a8")
    with pytest.raises(ValueError, match="unknown recipe"):
        dtq.quantize_pipeline(tiny_dit_pipeline(), "no-such-recipe")
