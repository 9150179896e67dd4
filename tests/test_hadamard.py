"""Hadamard matrices: orthonormality, entries, the supported orders, and what rotation does to outliers."""
import pytest
import torch

from dtq_kernels import hadamard
from helpers_data import minilm_linears

ORDERS = [1, 2, 64, 128, 12, 36, 384, 1152, 1536, 3072, 4608]


@pytest.mark.parametrize("n", ORDERS)
def test_orthonormal_with_entries_pm_one_over_sqrt_n(n):
    h = hadamard.hadamard_matrix(n)
    assert h.shape == (n, n) and hadamard.supported(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-5)
    # ±1/√n in fp32: exactly the two values, nothing else
    vals = set(h.unique().tolist())
    inv = float(torch.tensor(1.0 / n ** 0.5, dtype=torch.float32))
    assert vals <= {inv, -inv} and len(vals) == (1 if n == 1 else 2)


def test_base_factors_are_the_paley_matrices():
    h12, h36 = hadamard.base_matrix(12), hadamard.base_matrix(36)
    assert torch.equal(h12 @ h12.T, 12 * torch.eye(12, dtype=torch.float64))
    assert torch.equal(h12 + h12.T, 2 * torch.eye(12, dtype=torch.float64))  # Paley I gives a skew Hadamard
    assert torch.equal(h36 @ h36.T, 36 * torch.eye(36, dtype=torch.float64))
    assert torch.equal(h36, h36.T)  # Paley II with q ≡ 1 mod 4 is symmetric
    assert hadamard.factor(1152) == (36, 32) and hadamard.factor(4608) == (36, 128)
    assert hadamard.factor(3072) == (12, 256) and hadamard.factor(1024) == (1, 1024)


@pytest.mark.parametrize("n", [0, 40, 100, 1000, 5000, 15 * 1024])
def test_unsupported_orders_raise_naming_what_is_supported(n):
    assert not hadamard.supported(n)
    with pytest.raises(ValueError, match=r"2\^k, 12·2\^k and 36·2\^k"):
        hadamard.hadamard_matrix(n)
    if n:
        with pytest.raises(ValueError, match="supported orders"):
            hadamard.rotate(torch.zeros(2, n))


@pytest.mark.parametrize("n", [64, 384, 1152, 3072])
def test_rotate_is_x_times_h(n):
    x = torch.randn(5, n, dtype=torch.float64)
    ref = x @ hadamard.hadamard_matrix(n).double()
    assert torch.allclose(hadamard.rotate(x).double(), ref, rtol=1e-5, atol=1e-5)
    # orthonormal: the rotation preserves each row's norm
    assert torch.allclose(hadamard.rotate(x).double().norm(dim=1), x.norm(dim=1), rtol=1e-5)


@pytest.mark.parametrize("n", [1152, 4608])
def test_rotation_spreads_a_single_outlier_channel(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(16, n, generator=g)
    x[:, 7] = 200.0  # one outlier channel ~ what LayerNorm outputs show in trained transformers

    def peak(t):
        return t.abs().amax(1) / t.pow(2).mean(1).sqrt()

    before, after = peak(x), peak(hadamard.rotate(x))
    assert float(before.min()) > 20  # the outlier dominates every row
    # after the rotation the outlier is spread over all n channels: near a Gaussian row's ≈3.5–4.5
    assert float(after.max()) < 6


@pytest.fixture(scope="module")
def minilm_linear_inputs():
    """Per-token inputs of the q/k/v (LayerNorm output, 384) and fc2 (post-GELU, 1536) linears of all six
    layers of the trained MiniLM-L6, on real sentences."""
    return {k: torch.cat([x for x, _, _ in layers]) for k, layers in minilm_linears().items()}


def _peak(t):
    return float((t.abs().amax(1) / t.pow(2).mean(1).sqrt()).mean())


def _block_diag(x, b):
    return hadamard.rotate(x.reshape(x.shape[0], -1, b), b).reshape(x.shape)


def test_full_width_vs_block_diagonal_on_real_activations(minilm_linear_inputs):
    # The measurement recorded in hadamard.py's docstring (there on 8 sentences; here 4, same ordering).
    qkv, fc2 = minilm_linear_inputs["qkv"], minilm_linear_inputs["fc2"]
    assert _peak(qkv) > 5  # real outlier channels
    full, blocks = _peak(hadamard.rotate(qkv)), _peak(_block_diag(qkv, 128))
    assert full < 0.5 * _peak(qkv)
    assert full < blocks  # LayerNorm outputs: the full-width H₁₂ ⊗ H₃₂ spreads outliers further
    # post-GELU rows: both help, but 128-blocks beat H₁₂ ⊗ H₁₂₈ (the common mean concentrates)
    assert _peak(_block_diag(fc2, 128)) < _peak(hadamard.rotate(fc2)) < _peak(fc2)
