"""dtq as a diffusers quantization backend: registration, from_pretrained on FP and on dtq-quantized
checkpoints, save_pretrained round trips, pipelines, torch.compile, and the bad inputs."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import dtq_kernels as dtq  # noqa: E402
from dtq_kernels.nn.fused import fast_block_class  # noqa: E402
from dtq_kernels.nn.linear import QuantLinear  # noqa: E402
from helpers_models import dit_inputs, own_memory, run_dit, tiny_dit, tiny_dit_pipeline, uniform_plan  # noqa: E402

DiT = diffusers.DiTTransformer2DModel


def test_registered_in_diffusers_mappings():
    """Fails loudly if a diffusers release moves the mappings third-party backends have to extend."""
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin
    from dtq_kernels.diffusers_quantizer import DtqQuantizer
    assert auto.AUTO_QUANTIZER_MAPPING["dtq"] is DtqQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["dtq"] is dtq.DtqConfig
    assert issubclass(DtqQuantizer, DiffusersQuantizer) and issubclass(dtq.DtqConfig, QuantizationConfigMixin)
    cfg = auto.DiffusersAutoQuantizer.from_dict({"quant_method": "dtq", "recipe": "viditq-w8a8"})
    assert isinstance(auto.DiffusersAutoQuantizer.from_config(cfg), DtqQuantizer)
    assert cfg.quant_method.value == "dtq"  # diffusers reads .value


def test_register_says_what_is_missing_when_the_mappings_move(monkeypatch):
    from dtq_kernels import diffusers_quantizer as dq
    monkeypatch.delattr(dq._auto, "AUTO_QUANTIZER_MAPPING")
    with pytest.raises(RuntimeError, match="AUTO_QUANTIZER_MAPPING"):
        dq.register()


# ------------------------------------------------------------------------ loading (needs accelerate)

@pytest.fixture(scope="module")
def accelerate():
    return pytest.importorskip("accelerate", reason="diffusers quantizes in from_pretrained only with accelerate")


@pytest.fixture(scope="module")
def fp_dir(accelerate, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    tiny_dit().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def q_dir(fp_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "model"
    DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig("viditq-w8a8")).save_pretrained(d)
    return d


def _digest(d):
    """SHA-256 of every file under d, by relative path (a pipeline save holds a folder per component)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_data_free_recipe_quantizes_an_fp_checkpoint(fp_dir):
    model = DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig("viditq-w8a8"))
    assert isinstance(model.transformer_blocks[0].ff.net[2], QuantLinear)
    assert model.hf_quantizer.is_compileable and model.is_quantized
    ref = dtq.quantize(DiT.from_pretrained(fp_dir), "viditq-w8a8")
    x = dit_inputs()
    assert torch.equal(run_dit(own_memory(model), **x), run_dit(own_memory(ref), **x))  # the same layers as dtq.quantize builds


def test_save_pretrained_round_trip_is_bit_identical(fp_dir, q_dir):
    first = DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig("viditq-w8a8"))
    cfg = json.loads((q_dir / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "dtq" and cfg["format_version"] == 1 and cfg["plan"]["recipe"] == "viditq-w8a8"
    again = DiT.from_pretrained(q_dir)  # no quantization_config argument: config.json carries it
    assert isinstance(again.transformer_blocks[1].attn1.to_qkv, QuantLinear)  # the fast path, as first's
    assert type(again.transformer_blocks[1]) is type(first.transformer_blocks[1]) is fast_block_class()
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    x = dit_inputs()
    assert torch.equal(run_dit(own_memory(first), **x), run_dit(own_memory(again), **x))


def test_checkpoint_is_per_layer_and_fuse_false_keeps_it(fp_dir, q_dir, tmp_path):
    """save_pretrained splits fused layers into their members; DtqConfig(fuse=False) keeps the per-layer
    path through save and load, with the same outputs as the fused model on this backend (fp32)."""
    from safetensors import safe_open
    with safe_open(str(q_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer_blocks.0.attn1.to_q.qweight" in keys and not any("to_qkv" in k for k in keys)
    unfused = DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig("viditq-w8a8", fuse=False))
    assert isinstance(unfused.transformer_blocks[0].attn1.to_q, QuantLinear) and not getattr(unfused, "dtq_fused", None)
    unfused.save_pretrained(tmp_path / "u")
    assert json.loads((tmp_path / "u" / "config.json").read_text())["quantization_config"]["fuse"] is False
    again = DiT.from_pretrained(tmp_path / "u")
    assert isinstance(again.transformer_blocks[0].attn1.to_k, QuantLinear)
    assert type(again.transformer_blocks[0]) is not fast_block_class()
    x = dit_inputs()
    assert torch.equal(run_dit(own_memory(again), **x), run_dit(own_memory(DiT.from_pretrained(q_dir)), **x))


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux"])
def test_other_architectures_round_trip(accelerate, kind, tmp_path):
    import helpers_models as h
    model, inputs = {"pixart": (h.tiny_pixart, lambda: dict(hidden_states=torch.randn(1, 4, 8, 8),
                                                            encoder_hidden_states=torch.randn(1, 7, 32),
                                                            timestep=torch.tensor([300]))),
                     "sd3": (h.tiny_sd3, h.sd3_inputs), "flux": (h.tiny_flux, h.flux_inputs)}[kind]
    model().save_pretrained(tmp_path / "fp")
    cls = type(model())
    q = cls.from_pretrained(tmp_path / "fp", quantization_config=dtq.DtqConfig("viditq-w8a8"))
    assert any(isinstance(m, QuantLinear) for m in q.modules())
    q.save_pretrained(tmp_path / "q")
    again = cls.from_pretrained(tmp_path / "q")
    a, b = q.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    torch.manual_seed(0)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(own_memory(q)(**x).sample, own_memory(again)(**x).sample)


def test_prequantized_load_keeps_scales_fp32_under_torch_dtype(q_dir):
    model = DiT.from_pretrained(q_dir, torch_dtype=torch.bfloat16)
    q = model.transformer_blocks[0].attn1.to_qkv  # fused after the file's fp32 tensors were assigned
    assert q.qweight.dtype == torch.int8 and q.wscale.dtype == torch.float32 and q.bias.dtype == torch.float32
    assert model.pos_embed.proj.weight.dtype == torch.bfloat16  # kept-FP layers take the requested dtype
    x = {k: (v.bfloat16() if v.is_floating_point() and k == "hidden_states" else v) for k, v in dit_inputs().items()}
    fp32 = run_dit(DiT.from_pretrained(q_dir), **dit_inputs())
    out = run_dit(model, **x).float()
    assert torch.isfinite(out).all() and float((out - fp32).norm() / fp32.norm()) < 0.05  # bf16 FP layers


def test_static_plan_with_time_groups_round_trips(fp_dir, tmp_path):
    spec = dtq.LinearQuantSpec(weight="int4", act="int8", act_mode="static", time_groups=4)
    plan = uniform_plan(tiny_dit(), spec, act_scales=[0.02, 0.03, 0.04, 0.05], time_groups=4)
    model = DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig(plan=plan))
    model.save_pretrained(tmp_path / "q")
    again = own_memory(DiT.from_pretrained(tmp_path / "q"))
    own_memory(model)
    for t in (30, 900):
        x = dit_inputs(t=t)
        assert torch.equal(run_dit(model, **x), run_dit(again, **x))
    assert torch.equal(again.transformer_blocks[0].attn1.to_qkv.act_table, torch.tensor([0.02, 0.03, 0.04, 0.05]))


def test_pipeline_quantization_config(accelerate, tmp_path):
    from diffusers.quantizers import PipelineQuantizationConfig
    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": dtq.DtqConfig("viditq-w8a8")})
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "pipe", quantization_config=pq)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_qkv, QuantLinear)
    assert not any(isinstance(m, QuantLinear) for m in pipe.vae.modules())
    img = pipe(class_labels=[1], num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and bool((img >= 0).all() and (img <= 1).all())


def test_loaded_model_compiles_without_graph_breaks(accelerate, tmp_path):
    tiny_dit(layers=1).save_pretrained(tmp_path / "fp")
    DiT.from_pretrained(tmp_path / "fp", quantization_config=dtq.DtqConfig("viditq-w8a8")).save_pretrained(tmp_path / "q")
    model = DiT.from_pretrained(tmp_path / "q")
    assert model.hf_quantizer.is_compileable
    x = dit_inputs(batch=1)
    eager = run_dit(model, **x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(**x).sample
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- bad inputs

def test_calibrating_recipe_is_refused_before_loading(fp_dir):
    before = _digest(fp_dir)
    with pytest.raises(ValueError, match=r"calibrates on data.*dtq calibrate"):
        DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig("tqdit-w8a8"))
    assert _digest(fp_dir) == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of recipe"),
    (dict(recipe="viditq-w8a8", plan={}), "exactly one of recipe"),
    (dict(recipe="viditq-w8a8", format_version=2), "format_version 2 is not supported"),
    (dict(recipe="viditq-w8a8", extra=1), "unknown fields"),
    (dict(plan=42), "plan must be"),
    (dict(plan={"recipe": "x"}), "invalid quantization plan"),
])
def test_config_rejects_bad_fields(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dtq.DtqConfig(**kwargs)


def test_unknown_recipe_is_a_clear_error(fp_dir):
    with pytest.raises(ValueError, match="unknown recipe"):
        DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig("no-such-recipe"))


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_newer_format_version_in_a_checkpoint_is_refused(q_dir, tmp_path):
    d = _copy(q_dir, tmp_path / "newer")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    before = _digest(d)
    with pytest.raises(ValueError, match="format_version 99"):
        DiT.from_pretrained(d)
    assert _digest(d) == before


def test_checkpoint_of_another_architecture_is_refused(q_dir, tmp_path):
    d = _copy(q_dir, tmp_path / "other")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_layers"] = 3  # the plan names the layers of a 2-block model; block 2 has no plan entries
    cfg["quantization_config"]["plan"]["layers"]["transformer_blocks.5.attn1.to_q"] = \
        cfg["quantization_config"]["plan"]["layers"]["transformer_blocks.0.attn1.to_q"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="transformer_blocks.5.attn1.to_q"):
        DiT.from_pretrained(d)


def test_truncated_weights_file_is_refused(q_dir, tmp_path):
    d = _copy(q_dir, tmp_path / "trunc")
    f = d / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(Exception, match="(?i)incomplete|truncat|invalid|error|deserializ"):
        DiT.from_pretrained(d)


def test_plan_directory_that_is_not_a_dtq_plan_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a dtq checkpoint"):
        dtq.DtqConfig(plan=tmp_path)


# ------------------------------------------------------------------------- atomic, refusing saves

def _quantized_from(fp_dir):
    return DiT.from_pretrained(fp_dir, quantization_config=dtq.DtqConfig("viditq-w8a8"))


def _leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.dtq-"))


def test_an_interrupted_save_pretrained_leaves_the_previous_save(fp_dir, q_dir, tmp_path, monkeypatch):
    d = _copy(q_dir, tmp_path / "q")
    before = _digest(d)

    def dies_after_one_file(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted mid-save
    model = _quantized_from(fp_dir)
    monkeypatch.setattr(DiT, "save_pretrained", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(d, overwrite=True)
    monkeypatch.undo()
    assert _digest(d) == before and _leftovers(d) == []
    assert isinstance(DiT.from_pretrained(d).transformer_blocks[0].attn1.to_qkv, QuantLinear)


def test_save_pretrained_refuses_to_overwrite_without_the_flag(fp_dir, tmp_path):
    from dtq_kernels.checkpoint import CheckpointError
    first = _quantized_from(fp_dir)
    d = tmp_path / "q"
    first.save_pretrained(d)
    before = _digest(d)
    with pytest.raises(CheckpointError, match="already holds a checkpoint.*overwrite=True"):
        first.save_pretrained(d)
    assert _digest(d) == before
    model = DiT.from_pretrained(d)  # a pre-quantized load saves atomically too
    with torch.no_grad():
        model.proj_out_2.bias.add_(1.0)  # a different model: the replaced save must show it
    model.save_pretrained(d, overwrite=True)
    assert _digest(d) != before and _leftovers(d) == []
    assert torch.equal(DiT.from_pretrained(d).proj_out_2.bias, model.proj_out_2.bias)


def test_save_pretrained_refuses_foreign_directories_and_files(fp_dir, tmp_path):
    from dtq_kernels.checkpoint import CheckpointError
    model = _quantized_from(fp_dir)
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    fp_copy = _copy(fp_dir, tmp_path / "fp")  # a floating-point diffusers save: not dtq's to replace
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target, match in [(users, "holding other files"), (fp_copy, "config.json that dtq did not write"),
                          (a_file, "not a directory")]:
        before = _digest(target) if target.is_dir() else target.read_bytes()
        with pytest.raises(CheckpointError, match=match):
            model.save_pretrained(target, overwrite=True)
        assert (_digest(target) if target.is_dir() else target.read_bytes()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save_pretrained(empty)  # an empty directory is fine
    assert (empty / "config.json").is_file()


def test_save_pretrained_refuses_a_read_only_place(fp_dir, read_only_dir):
    from dtq_kernels.checkpoint import CheckpointError
    ro = read_only_dir
    model = _quantized_from(fp_dir)
    for target in (ro / "new", ro / "empty"):  # the new save is built next to the target: ro must be writable
        with pytest.raises(CheckpointError, match=f"no permission to write in {ro}"):
            model.save_pretrained(target)
        with pytest.raises(CheckpointError, match=f"no permission to write in {ro}"):
            dtq.save_quantized(dtq.quantize(tiny_dit(), "viditq-w8a8"), target)
    assert sorted(p.name for p in ro.iterdir()) == ["empty"] and not any((ro / "empty").iterdir())


def test_save_pretrained_keeps_the_class_signature_and_survives_copies(fp_dir, tmp_path, monkeypatch):
    import copy
    import inspect
    import pickle
    model = _quantized_from(fp_dir)
    params = inspect.signature(model.save_pretrained).parameters
    assert {"safe_serialization", "variant", "max_shard_size", "overwrite"} <= set(params)  # what pipelines pass
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.save_pretrained.model is twin
    calls = []

    def records(self, save_directory, is_main_process=True, push_to_hub=False, **kwargs):
        calls.append((self, push_to_hub, kwargs))
    monkeypatch.setattr(DiT, "save_pretrained", records)
    assert model.save_pretrained(tmp_path / "x", False) is None  # is_main_process=False: the main process saves
    assert calls == [] and not (tmp_path / "x").exists()
    with pytest.raises(RuntimeError, match="wrote no config.json"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True, token="t")
    assert calls == [(model, True, {"repo_id": "hub", "token": "t"})]  # hub arguments forwarded, repo named as the dir
    assert not (tmp_path / "hub").exists() and _leftovers(tmp_path / "hub") == []


def test_pipeline_save_pretrained_is_atomic_and_refusing(accelerate, tmp_path, monkeypatch):
    pipe = dtq.quantize_pipeline(tiny_dit_pipeline(), "viditq-w8a8", progress=False)
    target = tmp_path / "pipe"
    pipe.save_pretrained(target, variant="v1")
    assert (target / "transformer" / "diffusion_pytorch_model.v1.safetensors").is_file()
    assert _leftovers(target) == [] and _leftovers(target / "transformer") == []
    again = diffusers.DiTPipeline.from_pretrained(target, variant="v1")
    assert isinstance(again.transformer.transformer_blocks[0].attn1.to_qkv, QuantLinear)
    before = _digest(target)
    from dtq_kernels.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="overwrite=True"):  # refused before any component is written
        pipe.save_pretrained(target, variant="v1")
    vae_save = type(pipe.vae).save_pretrained

    def dies_mid_save(self, save_directory, *args, **kwargs):  # the VAE is written, then the save dies
        vae_save(self, save_directory, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(type(pipe.vae), "save_pretrained", dies_mid_save)
    with pytest.raises(KeyboardInterrupt):
        pipe.save_pretrained(target, variant="v1", overwrite=True)
    assert _digest(target) == before
    assert _leftovers(target) == []
    monkeypatch.undo()
    pipe.save_pretrained(target, variant="v1", overwrite=True)
    assert _leftovers(target) == []
    (tmp_path / "fp").mkdir()
    tiny_dit_pipeline().save_pretrained(tmp_path / "fp")
    with pytest.raises(CheckpointError, match="dtq did not write"):  # a float pipeline is not replaced
        pipe.save_pretrained(tmp_path / "fp", overwrite=True)
