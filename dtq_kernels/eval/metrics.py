"""Image-quality and error metrics: Fréchet distance (FID from features), PSNR, SSIM, SQNR.

Images are float tensors [N, C, H, W] in [-1, 1] (the diffusion model's output range), so the data
range for PSNR/SSIM is 2. Every per-image metric returns one value per image; callers average.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DATA_RANGE = 2.0  # images live in [-1, 1]


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"{what}: expected images [N, C, H, W], got shape {tuple(a.shape)}")


def _as_f64(feats: np.ndarray | torch.Tensor) -> np.ndarray:
    return feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)


def feature_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features [N, D] in float64, the sufficient statistics of FID."""
    f = _as_f64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two Gaussians (Heusel et al. 2017).

    Tr((Σ1Σ2)^½) is computed as Σ√λ of the symmetric PSD matrix Σ1^½·Σ2·Σ1^½, which has the same
    eigenvalues as Σ1Σ2: two symmetric eigendecompositions (~1 s at 2048-d) instead of scipy's
    general sqrtm (~20 s at 2048-d), real by construction, and well defined for the singular
    covariances that fewer samples than dimensions give. Negative eigenvalues from round-off are
    clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: statistics differ in shape {mu1.shape}/{sigma1.shape} vs "
                         f"{mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(feats_a, feats_b) -> float:
    """Fréchet distance between two feature sets [N, D]; with Inception pool features this is FID.

    With fewer samples than dimensions (CPU-sized FID: a few hundred samples, D = 2048) it uses the
    exact low-rank identity Tr((Σa·Σb)^½) = ‖Xa·Xbᵀ‖_* / √((Na−1)(Nb−1)) (X the centred features;
    the nonzero eigenvalues of Σa·Σb are the squared singular values of Xa·Xbᵀ/√(...)), an Na×Nb
    SVD instead of D×D eigendecompositions. Otherwise it goes through the covariances.
    """
    a, b = _as_f64(feats_a), _as_f64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"fid_from_features needs [N >= 2, D] features of equal D, got {a.shape} and {b.shape}")
    if min(a.shape[0], b.shape[0]) >= a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = a - mu_a, b - mu_b
    na, nb = a.shape[0] - 1, b.shape[0] - 1
    tr_covmean = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    diff = mu_a - mu_b
    return float(diff @ diff + (xa * xa).sum() / na + (xb * xb).sum() / nb - 2.0 * tr_covmean)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-image PSNR in dB, [N]; +inf where the images are identical."""
    _check_pair(a, b, "psnr")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range ** 2 / mse)).float()  # mse = 0 -> +inf


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE, win_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), [N]: 11×11 Gaussian window σ=1.5, K1=0.01, K2=0.03, valid
    convolution (no padding), averaged over pixels and channels; 1 for identical images."""
    _check_pair(a, b, "ssim")
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images {tuple(a.shape[-2:])} are smaller than the {win_size}-pixel window")
    c = a.shape[1]
    w = _gaussian_window(win_size, sigma).expand(c, 1, win_size, win_size).contiguous()
    x, y = a.double(), b.double()

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(y * y) - mu_y ** 2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(Σref² / Σ(ref−test)²) in dB; +inf if identical."""
    if ref.shape != test.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(ref.shape)} vs {tuple(test.shape)}")
    r = ref.detach().double()
    signal = r.pow(2).sum().item()
    noise = (r - test.detach().double()).pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))
