"""The `dtq` command on tiny random models: quantize -> info -> sample, calibrate -> plan -> quantize, errors."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

import dtq_kernels as dtq  # noqa: E402
from dtq_kernels import cli  # noqa: E402
from dtq_kernels.nn import QuantLinear  # noqa: E402
from helpers_models import tiny_dit, uniform_plan  # noqa: E402


def test_quantize_info_sample_round_trip(tmp_path, capsys):
    ck = tmp_path / "ck"
    model = cli.run(["quantize", "--recipe", "viditq-w8a8", "--model", "tiny-random", "--out", str(ck)])
    assert "transformer_blocks.1.ff.net.2" in capsys.readouterr().out

    d = cli.run(["info", str(ck), "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(d))
    q = [r for r in d["rows"] if not r["kept_fp"]]
    assert len(q) == 12 and {r["format"] for r in q} == {"W8A8 dynamic"}
    fused_in = {m: (f, w) for f, group in model.dtq_fused.items() for m, w in group.items()}  # q/k/v
    for r in q:  # int8 codes (1 byte per weight) + one fp32 scale per output channel, exactly
        saved_as, _ = fused_in.get(r["name"], (r["name"], None))
        lin = model.get_submodule(saved_as)
        n, k = fused_in.get(r["name"], (None, lin.out_features))[1], lin.in_features
        assert r["bytes"] == n * k + 4 * n
        assert r["fp16_bytes"] == 2 * n * k
    kept = {r["name"] for r in d["rows"] if r["kept_fp"]}
    assert "transformer_blocks.0.norm1.linear" in kept and "proj_out_2" in kept
    assert d["totals"]["quantized_bytes"] < 0.6 * d["totals"]["quantized_fp16_bytes"]

    # the grid sampled from the checkpoint is exactly the one the in-memory quantized model samples
    grid = tmp_path / "g.png"
    cli.run(["sample", str(ck), "--num", "10", "--steps", "2", "--out", str(grid), "--device", "cpu"])
    from dtq_kernels.models.reference_dit import sample
    expected = tmp_path / "expected.png"
    cli.save_grid(sample(model, torch.arange(10), 2, torch.Generator().manual_seed(0)), expected)
    from PIL import Image
    a, b = Image.open(grid), Image.open(expected)
    assert a.size == ((10 * 34 + 2) * 3, 36 * 3)
    assert a.tobytes() == b.tobytes()


def test_calibrate_saves_a_plan_that_quantize_applies(tmp_path, capsys):
    plan_dir, plots = tmp_path / "plan", tmp_path / "plots"
    plan = cli.run(["calibrate", "--recipe", "rtn-w8a8", "--model", "tiny-random", "--num-samples", "2",
                    "--steps", "2", "--out", str(plan_dir), "--plots", str(plots)])
    assert (plots / "act_scale_tables.png").is_file()
    d = cli.run(["info", str(plan_dir), "--json"])
    assert d["recipe"] == "rtn-w8a8" and all(r["bytes"] is None for r in d["rows"])  # no weights in a plan
    model = cli.run(["quantize", "--plan", str(plan_dir), "--model", "tiny-random", "--out", str(tmp_path / "ck")])
    with pytest.raises(SystemExit):  # calibrated on the 2-block model: refused for the 6-block one
        cli.run(["quantize", "--plan", str(plan_dir), "--model", "reference-random", "--out", str(tmp_path / "x")])
    assert "calibrated for another model" in capsys.readouterr().err
    attn = "transformer_blocks.0.attn1"
    layer = model.get_submodule(attn + ".to_qkv")  # q/k/v fused: one table for their one input
    assert isinstance(layer, QuantLinear) and layer.spec.act_mode == "static"
    tables = torch.tensor([plan.layers[f"{attn}.{p}"].act_scales for p in ("to_q", "to_k", "to_v")])
    assert torch.equal(layer.act_table, tables.amax(0))


def test_recipes_and_console_entry_point(capsys):
    assert cli.main(["recipes"]) is None  # a returned value would become the process exit status
    out = capsys.readouterr().out
    assert all(name in out for name in dtq.recipes())


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit) as e:
            cli.run(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err

    fails(["quantize", "--recipe", "w1a1", "--model", "tiny-random", "--out", str(tmp_path / "x")], "unknown recipe")
    fails(["quantize", "--recipe", "viditq-w8a8", "--model", "nope", "--out", str(tmp_path / "x")], "unknown model")
    fails(["quantize", "--model", "tiny-random", "--out", str(tmp_path / "x")], "exactly one of --recipe and --plan")
    fails(["info", str(tmp_path)], "not a dtq checkpoint")
    other = tiny_dit()  # a latent-space DiT: not what the reference sampler draws
    dtq.quantize(other, uniform_plan(other, dtq.LinearQuantSpec()))
    dtq.save_quantized(other, tmp_path / "other")
    fails(["sample", str(tmp_path / "other"), "--out", str(tmp_path / "g.png")], "drives the reference DiT sampler")
    f = tmp_path / "other" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    fails(["info", str(tmp_path / "other")], "corrupt or truncated")


def test_random_model_builds_the_depth_independent_buffers():
    from diffusers import DiTTransformer2DModel
    cfg = dict(num_attention_heads=2, attention_head_dim=32, out_channels=8, num_layers=3, sample_size=8)
    fast = cli.random_model(DiTTransformer2DModel, 0, **cfg)
    slow = DiTTransformer2DModel(**cfg)
    assert torch.equal(fast.pos_embed.pos_embed, slow.pos_embed.pos_embed)
    assert all(torch.isfinite(p).all() and p.std() > 0.01 for p in fast.parameters() if p.numel() > 1)


def test_folding_recipe_from_the_cli(tmp_path, capsys):
    """A recipe that re-parameterizes the FP model (PTQ4DiT's balancing folded into adaLN / V) through
    `dtq calibrate` -> plan -> `dtq quantize --plan`, and `dtq quantize --recipe` directly."""
    plan_dir = tmp_path / "plan"
    plan = cli.run(["calibrate", "--recipe", "ptq4dit-w8a8", "--model", "tiny-random", "--num-samples", "2",
                    "--steps", "2", "--out", str(plan_dir)])
    assert any(p.endswith("norm1.linear.weight") for p in plan.reparam)
    model = cli.run(["quantize", "--plan", str(plan_dir), "--model", "tiny-random", "--out", str(tmp_path / "ck")])
    adaln = model.get_submodule("transformer_blocks.0.norm1.linear")
    assert torch.equal(adaln.weight.detach(), plan.tensors["transformer_blocks.0.norm1.linear.weight"])
    model = cli.run(["quantize", "--recipe", "dilatequant-w4a8", "--model", "tiny-random", "--num-samples", "2",
                     "--steps", "2", "--out", str(tmp_path / "ck2")])
    assert model.dtq_plan.time_groups == 2  # TPQ: one time group per calibration step


# ------------------------------------------------------------------- bad arguments: refused up front

@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A full checkpoint, a plan directory, a user's directory, a plain file."""
    from dtq_kernels.checkpoint import save_plan
    root = tmp_path_factory.mktemp("places")
    m = tiny_dit()
    dtq.quantize(m, uniform_plan(m, dtq.LinearQuantSpec()))
    dtq.save_quantized(m, root / "ck")
    save_plan(m.dtq_plan, root / "plan", m)
    (root / "users").mkdir()
    (root / "users" / "model.safetensors").write_bytes(b"mine")
    (root / "file").write_text("a file")
    return root


Q = ["quantize", "--recipe", "rtn-w8a8", "--model", "tiny-random"]
C = ["calibrate", "--recipe", "rtn-w8a8", "--model", "tiny-random"]
NUMERIC = [("--num-samples", "0"), ("--num-samples", "-4"), ("--num-samples", "x"), ("--steps", "0"),
           ("--steps", "-1"), ("--batch-size", "0"), ("--guidance", "nan"), ("--guidance", "inf"),
           ("--guidance", "-inf"), ("--time-groups", "0"), ("--seed", "-1"), ("--device", "tpu"),
           ("--device", "cuda:99")]
BAD = (
    [(Q + ["--out", "{new}", opt, val], opt) for opt, val in NUMERIC]
    + [(C + ["--out", "{new}", opt, val], opt) for opt, val in NUMERIC]
    + [(Q + ["--out", "{file}"], "not a directory"), (Q + ["--out", "{file}/sub"], "is a file"),
       (Q + ["--out", "{ck}"], "already holds a checkpoint"), (Q + ["--out", "{users}", "--force"], "other files"),
       (Q + ["--out", "{plan}", "--force"], "plan-only directory"), (Q + ["--out", "", ], "--out"),
       (["quantize", "--plan", "{new}", "--model", "tiny-random", "--out", "{new}"], "--plan"),
       (["quantize", "--plan", "{file}", "--model", "tiny-random", "--out", "{new}"], "--plan"),
       (Q[:-2] + ["--model", "nope", "--out", "{new}"], "unknown model"),
       (["quantize", "--recipe", "w1a1", "--model", "tiny-random", "--out", "{new}"], "unknown recipe"),
       (Q + ["--out", "{new}", "--fp-dtype", "fp8"], "--fp-dtype"),
       (C + ["--out", "{ck}", "--force"], "quantized-model checkpoint"), (C + ["--out", "{plan}"], "already holds"),
       (C + ["--out", "{new}", "--plots", "{file}"], "--plots"),
       (["info", "{new}"], "not an existing directory"), (["info", "{file}"], "is a file"),
       (["info", "{users}"], "not a dtq checkpoint"), (["info", "{ck}", "--plots", "{file}"], "--plots")]
    + [(["sample", "{ck}", "--out", "{new}.png", opt, val], opt)
       for opt, val in [("--num", "0"), ("--num", "-3"), ("--steps", "0"), ("--steps", "-1"), ("--guidance", "nan"),
                        ("--guidance", "inf"), ("--seed", "-2"), ("--device", "nope")]]
    + [(["sample", "{ck}", "--out", out], "--out")
       for out in ("{new}", "{new}.txt", "{file}/g.png", "{ck}")]
    + [(["sample", "{new}", "--out", "{new}.png"], "checkpoint"), (["sample", "{plan}", "--out", "{new}.png"], "")]
    + [(["eval", "--tiny", opt, val], opt)
       for opt, val in [("--n-samples", "0"), ("--n-samples", "-1"), ("--steps", "0"), ("--guidance", "nan"),
                        ("--batch-size", "0"), ("--fid-ref-n", "0"), ("--cls-ref-n", "0"), ("--sqnr-samples", "-1"),
                        ("--threads", "0"), ("--seed", "-1"), ("--quantized", "noequals"), ("--quantized", "a={new}"),
                        ("--quantized", "={ck}"), ("--out-dir", "{file}"), ("--recipes", "nope"), ("--device", "x")]]
)


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[1:])[:60] for a, _ in BAD])
def test_every_bad_argument_is_refused_before_any_model_loads(argv, message, places, tmp_path, monkeypatch,
                                                               capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    for name in ("_build_model", "model_from_checkpoint", "_make_plan"):
        monkeypatch.setattr(cli, name, no_model)
    import dtq_kernels.eval.cli as eval_cli
    monkeypatch.setattr(eval_cli, "_run", no_model)
    subst = {"new": str(tmp_path / "new"), **{k: str(places / k) for k in ("ck", "plan", "users", "file")}}
    argv = [a.format(**subst) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.run(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"dtq {argv[0]}: error:") and message in err, err
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.png").exists()


def test_a_read_only_place_is_refused_before_any_model_loads(read_only_dir, monkeypatch, capsys):
    ro = read_only_dir
    monkeypatch.setattr(cli, "_build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    # a new directory, and an existing writable one: the checkpoint is built next to it, in ro
    for out in (ro / "new", ro / "empty"):
        for command in (Q, C):
            with pytest.raises(SystemExit) as e:
                cli.run(command + ["--out", str(out)])
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert e.value.code == 2 and err.startswith(f"dtq {command[0]}: error:") and "no permission" in err, err
    assert sorted(p.name for p in ro.iterdir()) == ["empty"]
