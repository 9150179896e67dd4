"""The reference DiT's training script: DiT-paper initialisation, min-SNR weighting, learning-rate schedule,
and a run that stops and resumes with its optimizer state (training spans several sessions)."""
import math

import pytest
import torch

from dtq_kernels.models.reference_dit import data as ref_data
from dtq_kernels.models.reference_dit.model import build_reference_dit
from dtq_kernels.models.reference_dit.train import (ddpm_alphas_cumprod, dit_initialize, learning_rate, main,
                                                    parse_args, snr_weight)


def test_dit_initialisation_makes_every_block_the_identity_and_the_output_zero():
    torch.manual_seed(0)
    model = build_reference_dit(num_layers=2, heads=2, head_dim=16)
    dit_initialize(model)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([1, 500, 999]), class_labels=torch.tensor([0, 4, 10])).sample
    assert torch.equal(out, torch.zeros_like(out))
    for blk in model.transformer_blocks:  # adaLN-zero: gates 0, so each block adds nothing at step 0
        assert blk.norm1.linear.weight.abs().sum() == 0 and blk.norm1.linear.bias.abs().sum() == 0
    assert model.transformer_blocks[0].attn1.to_q.weight.std() > 0  # the rest is not zero


def test_min_snr_weight():
    abar = ddpm_alphas_cumprod()
    w = snr_weight(abar, 5.0)
    snr = abar / (1 - abar)
    assert torch.allclose(w[snr <= 5], torch.ones_like(w[snr <= 5]))          # noisy steps: full weight
    assert torch.allclose(w[snr > 5], 5.0 / snr[snr > 5])                      # clean steps: capped
    assert torch.equal(snr_weight(abar, 0.0), torch.ones_like(abar))          # 0 = plain MSE


def test_learning_rate_warmup_then_cosine_to_ten_percent():
    args = parse_args(["--lr", "1e-3", "--warmup", "10", "--lr-decay-steps", "100"])
    assert math.isclose(learning_rate(args, 0), 1e-4)
    assert math.isclose(learning_rate(args, 10), 1e-3)
    assert math.isclose(learning_rate(args, 60), 1e-3 * (0.1 + 0.9 * 0.5))
    assert math.isclose(learning_rate(args, 110), 1e-4) and math.isclose(learning_rate(args, 10_000), 1e-4)
    constant = parse_args(["--lr", "1e-3", "--warmup", "10"])
    assert learning_rate(constant, 5_000) == 1e-3


@pytest.mark.skipif(not ref_data.DATA_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_training_stops_and_resumes_with_its_optimizer_state(tmp_path):
    common = ["--layers", "1", "--heads", "1", "--head-dim", "16", "--patch-size", "4", "--batch", "4",
              "--threads", "1", "--dit-init", "--min-snr", "5", "--state", str(tmp_path / "state.pt"),
              "--export", str(tmp_path / "export")]
    main(common + ["--max-steps", "3"])
    first = torch.load(tmp_path / "state.pt")
    assert first["step"] == 3 and len(first["losses"]) == 3
    assert first["opt"]["state"], "the optimizer moments must be saved for a later session to resume"
    assert (tmp_path / "export" / "config.json").is_file()
    main(common + ["--max-steps", "5", "--resume", "--layers", "6"])  # the run's own size wins over flags
    second = torch.load(tmp_path / "state.pt")
    assert second["step"] == 5 and second["losses"][:3] == first["losses"]
    assert second["size"]["num_layers"] == 1
    step_counts = {int(s["step"]) for s in second["opt"]["state"].values()}
    assert step_counts == {5}, "AdamW continued from its saved moments instead of restarting"
