"""`dtq calibrate / quantize --model DIR` on local diffusers directories (a pipeline, a transformer)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import dtq_kernels as dtq  # noqa: E402
from dtq_kernels import cli  # noqa: E402
from dtq_kernels.nn import QuantLinear  # noqa: E402
from helpers_models import dit_inputs, own_memory, run_dit, tiny_dit_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    tiny_dit_pipeline().save_pretrained(d)
    return d


def test_calibrate_with_a_local_pipeline_then_quantize(pipe_dir, tmp_path):
    plan = cli.run(["calibrate", "--recipe", "rtn-w8a8", "--model", str(pipe_dir), "--num-samples", "2", "--steps",
                    "2", "--class-labels", "1,2", "--out", str(tmp_path / "plan"), "--device", "cpu"])
    assert plan.recipe == "rtn-w8a8" and plan.meta["calibration"]["forwards"] > 0
    model = cli.run(["quantize", "--plan", str(tmp_path / "plan"), "--model", str(pipe_dir), "--out",
                     str(tmp_path / "ck"), "--device", "cpu"])
    assert isinstance(model.transformer_blocks[0].attn1.to_qkv, QuantLinear)
    loaded = own_memory(dtq.load_quantized(diffusers.DiTTransformer2DModel, tmp_path / "ck"))
    assert torch.equal(run_dit(loaded, **dit_inputs()), run_dit(own_memory(model), **dit_inputs()))


def test_transformer_directory_takes_data_free_recipes_only(pipe_dir, tmp_path, capsys):
    model = cli.run(["quantize", "--recipe", "viditq-w8a8", "--model", str(pipe_dir / "transformer"), "--out",
                     str(tmp_path / "ck"), "--device", "cpu"])
    assert isinstance(model.transformer_blocks[1].ff.net[2], QuantLinear)
    with pytest.raises(SystemExit):
        cli.run(["calibrate", "--recipe", "rtn-w8a8", "--model", str(pipe_dir / "transformer"), "--out",
                 str(tmp_path / "p"), "--device", "cpu"])
    assert "holds a transformer alone" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run(["calibrate", "--recipe", "rtn-w8a8", "--model", str(pipe_dir), "--out", str(tmp_path / "p2"),
                 "--device", "cpu"])
    assert "--class-labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run(["quantize", "--recipe", "viditq-w8a8", "--model", str(pipe_dir / "vae"), "--out",
                 str(tmp_path / "x"), "--device", "cpu"])
    assert "no dtq model adapter for AutoencoderKL" in capsys.readouterr().err
