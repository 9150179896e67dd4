"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, in the diffusion model's layout.

Images come out as float [N, 1, 32, 32] in [-1, 1]: the 28×28 digits-style images padded by two
background pixels on every side (background 0 -> -1), the layout the reference DiT is trained on.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch

DATA_DIR = os.environ.get("DTQ_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: str, header: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: install the Debian package dataset-fashion-mnist "
                                f"(apt-get install dataset-fashion-mnist) or set DTQ_FMNIST_DIR")
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def load_uint8(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of split 'train' (60k) or 'test' (10k)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_file, lbl_file = _FILES[split]
    images = _read_idx(os.path.join(DATA_DIR, img_file), 16).reshape(-1, 28, 28)
    labels = _read_idx(os.path.join(DATA_DIR, lbl_file), 8)
    if images.shape[0] != labels.shape[0]:
        raise RuntimeError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 32, 32] in [-1, 1], padded with background."""
    x = images_u8.float().div(127.5).sub(1.0)[:, None]
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float [N, 1, 32, 32] in [-1, 1], labels int64 [N])."""
    images, labels = load_uint8(split)
    return to_model_range(images), labels


def balanced_subset(labels: torch.Tensor, n: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of the first ⌈n/10⌉ images of each class (then cut to n, class-interleaved): a
    deterministic subset with balanced classes, like the generated samples it is compared with."""
    per = -(-n // num_classes)
    by_class = [torch.nonzero(labels == c).flatten()[:per] for c in range(num_classes)]
    if min(len(b) for b in by_class) < per:
        raise ValueError(f"not enough images for {per} per class")
    return torch.stack(by_class, 1).flatten()[:n]  # interleaved: class 0, 1, ..., 9, 0, 1, ...


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images onto the 256 levels a saved PNG (and the test set) has."""
    return (images.clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1))
