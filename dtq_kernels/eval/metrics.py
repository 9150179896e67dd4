"""Image-quality and error metrics: Fréchet distance (FID from features), PSNR, SSIM, SQNR.

Images are float tensors [N, C, H, W] in [-1, 1] (the diffusion model's output range), so the data
range for PSNR/SSIM is 2. Every per-image metric returns one value per image; callers average.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

DATA_RANGE = 2.0  # images live in [-1, 1]


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"{what}: expected images [N, C, H, W], got shape {tuple(a.shape)}")


def feature_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features [N, D] in float64, the sufficient statistics of FID."""
    f = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two Gaussians (Heusel et al. 2017).

    With fewer samples than feature dimensions the covariances are singular and sqrtm can return
    non-finite values; like pytorch-fid, retry with a 1e-6 ridge on both diagonals. The imaginary
    part sqrtm leaves from round-off is dropped (it is checked to be small first).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: statistics differ in shape {mu1.shape}/{sigma1.shape} vs "
                         f"{mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        if np.abs(covmean.imag).max() > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ValueError("frechet_distance: sqrtm returned a large imaginary part; statistics are broken")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(feats_a, feats_b) -> float:
    """Fréchet distance between two feature sets [N, D]; with Inception pool features this is FID."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


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
