"""Thin wrappers over dtq_kernels._C: raw device pointers plus the current stream.

Importing this module never fails: without the built extension, or without a usable GPU,
`available()` is False and `unavailable_reason()` says why; the kernels then raise that reason.
Shape/dtype validation is the op layer's job; these wrappers only check what the raw-pointer
interface itself needs (a contiguous CUDA tensor of a supported dtype).
"""
from __future__ import annotations

import functools
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

from ._dispatch import register_kernel

try:
    from .. import _C
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built (no nvcc or DTQ_SKIP_CUDA=1 at install time), or built for another Python
    _C = None
    _PKG = Path(__file__).resolve().parent.parent
    if not any(True for suffix in EXTENSION_SUFFIXES for _ in _PKG.glob("_C*" + suffix)):
        _IMPORT_ERROR = (f"dtq_kernels._C is not built (no _C extension in {_PKG}); to build it, install with "
                         "nvcc available: pip install --no-build-isolation --no-deps -e .")
    else:
        _IMPORT_ERROR = f"dtq_kernels._C failed to import: {e}"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    status = _C.cuda_status()
    return None if status == "ok" else f"CUDA is not usable here: {status}"


def available() -> bool:
    return unavailable_reason() is None


def _require(x: torch.Tensor, what: str) -> None:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"dtq cuda backend: {reason}")
    if x.device.type != "cuda":
        raise ValueError(f"dtq cuda backend: {what} must be a CUDA tensor, got {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"dtq cuda backend: {what} must be contiguous")


@register_kernel("quantize_per_token", "cuda")
def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    _require(x, "x")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"dtq cuda backend: x dtype {x.dtype} not supported")
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _C.quantize_per_token(x.data_ptr(), q.data_ptr(), scale.data_ptr(), M, K, _DTYPE_CODES[x.dtype], bits,
                              torch.cuda.current_stream(x.device).cuda_stream)
    return q, scale
