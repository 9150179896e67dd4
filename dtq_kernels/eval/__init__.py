"""Quality evaluation of (quantized) diffusion transformers: FID, classifier metrics, PSNR/SSIM vs FP,
per-layer SQNR, activation statistics, and the quality report."""
