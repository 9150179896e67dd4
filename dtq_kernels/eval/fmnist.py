"""Fashion-MNIST for evaluation: the reference DiT's loader (Debian package dataset-fashion-mnist,
float [N, 1, 32, 32] in [-1, 1], 28×28 padded with background), balanced subsets, 8-bit rounding.
"""
from __future__ import annotations

import torch

from dtq_kernels.models.reference_dit import data as _data

CLASSES = _data.CLASSES
DATA_DIR = _data.DATA_DIR


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float [N, 1, 32, 32] in [-1, 1], labels int64 [N]): the reference DiT's own loader,
    so the evaluation sees exactly the layout the model was trained on."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _data.load_fashion_mnist(split)


def balanced_subset(labels: torch.Tensor, n: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of the first ⌈n/10⌉ images of each class (then cut to n, class-interleaved): a
    deterministic subset with balanced classes, like the generated samples it is compared with."""
    per = -(-n // num_classes)
    by_class = [torch.nonzero(labels == c).flatten()[:per] for c in range(num_classes)]
    if min(len(b) for b in by_class) < per:
        raise ValueError(f"not enough images for {per} per class")
    return torch.stack(by_class, 1).flatten()[:n]  # interleaved: class 0, 1, ..., 9, 0, 1, ...


def _levels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> their 8-bit levels 0..255, as floats."""
    return images.clamp(-1, 1).add(1).mul(127.5).round()


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images onto the 256 levels a saved PNG (and the test set) has."""
    return _levels(images).div(127.5).sub(1)


def to_8bit_codes(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] finite images -> their 8-bit levels as uint8 (1 byte a pixel: what a deferred FID keeps)."""
    return _levels(images).to(torch.uint8)


def from_8bit_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 levels -> the images quantize_8bit gives, bit for bit (the levels are exact in float32)."""
    return codes.float().div(127.5).sub(1)
