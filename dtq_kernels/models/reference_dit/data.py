"""Fashion-MNIST from the Debian package dataset-fashion-mnist, as 32×32 images in [-1, 1]."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 32, 32] in [-1, 1], labels int64 [N]); 28×28 padded by 2 px of background."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path, lbl_path = data_dir / f"{prefix}-images-idx3-ubyte.gz", data_dir / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise FileNotFoundError(f"Fashion-MNIST not found in {data_dir}: install the Debian package "
                                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    images = torch.from_numpy(_read_idx(img_path).copy()).float().div(127.5).sub(1.0)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)[:, None]
    return images, torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
