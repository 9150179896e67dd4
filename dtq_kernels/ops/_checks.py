"""Input validation shared by the real and fake implementations of every op.

Checks only metadata (dtype, shape, device, layout), never values, so they cost no host sync and
run identically under FakeTensor / torch.compile.
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(cond: bool, op: str, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(f"dtq.{op}: {msg}")


def check_tensor(t: torch.Tensor, op: str, name: str, dtypes: Sequence[torch.dtype], ndim: int | None = None,
                 contiguous: bool = True) -> None:
    check(isinstance(t, torch.Tensor), op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    check(t.dtype in dtypes, op, f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}",
          TypeError)
    if ndim is not None:
        check(t.dim() == ndim, op, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if contiguous:
        check(t.is_contiguous(), op, f"{name} must be contiguous (call .contiguous() first)")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    check(len(devices) == 1, op, "all tensors must be on one device, got "
          + ", ".join(f"{k} on {v.device}" for k, v in present.items()))
    return devices.pop()


def check_bits(bits: int, op: str) -> None:
    check(isinstance(bits, int) and 2 <= bits <= 8, op, f"bits must be in 2..8, got {bits!r}")


def check_out_dtype(dtype: torch.dtype, op: str) -> None:
    check(dtype in FLOAT_DTYPES, op, f"out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}",
          TypeError)
