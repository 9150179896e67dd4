"""Quality evaluation of (quantized) diffusion transformers: FID, classifier metrics, PSNR/SSIM vs FP,
per-layer SQNR, activation statistics, and the quality report.

`dtq eval` is `cli_eval(args)` with a parser filled by `add_arguments(parser)` (or `main(argv)`)."""
from .cli import add_arguments, cli_eval, main
from .harness import evaluate

__all__ = ["add_arguments", "cli_eval", "main", "evaluate"]
