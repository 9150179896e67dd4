"""Input validation shared by the real and fake implementations of every op.

Checks only metadata (dtype, shape, device, layout), never values, so they cost no host sync and
run identically under FakeTensor / torch.compile; the one exception, check_group_in_range, reads the
time-group index only in the real impl and only where that costs no sync.
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
    if len(devices) != 1:  # the message is built only on failure: this runs on every op call
        check(False, op, "all tensors must be on one device, got "
              + ", ".join(f"{k} on {v.device}" for k, v in present.items()))
    return devices.pop()


def check_bits(bits: int, op: str) -> None:
    check(isinstance(bits, int) and 2 <= bits <= 8, op, f"bits must be in 2..8, got {bits!r}")


def check_out_dtype(dtype: torch.dtype, op: str) -> None:
    check(dtype in FLOAT_DTYPES, op, f"out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}",
          TypeError)


def check_bias_out(op: str, bias: torch.Tensor | None, n: int, out_dtype: torch.dtype) -> None:
    """A GEMM epilogue's arguments: bias float [N] or None, and a float out_dtype."""
    if bias is not None:
        check_tensor(bias, op, "bias", FLOAT_DTYPES, ndim=1)
        check(bias.shape[0] == n, op, f"bias must have N={n} entries, got {bias.shape[0]}")
    check_out_dtype(out_dtype, op)


def check_group_idx(op, group_idx) -> None:
    check_tensor(group_idx, op, "group_idx", (torch.int32,), ndim=1)
    check(group_idx.shape[0] == 1, op, f"group_idx must have 1 entry, got {group_idx.shape[0]}")


def check_group_in_range(op, group_idx: torch.Tensor, groups: int) -> None:
    """Values are checked only in the real impl (fake tensors have none). On CPU the value is at hand:
    a clear ValueError. On CUDA, reading it would sync the host and break CUDA-graph capture, so a
    device-side assert is queued before the kernel: an out-of-range index fails the next CUDA call
    with "dtq: group_idx out of range" instead of reading past the table. (The kernels also clamp the
    index so they never read out of bounds before the assert is reported.)"""
    if group_idx.device.type == "cuda":
        torch._assert_async((group_idx[0] >= 0) & (group_idx[0] < groups),
                            f"dtq.{op}: group_idx out of range [0, {groups})")
    elif group_idx.device.type == "cpu":
        g = int(group_idx[0])
        check(0 <= g < groups, op, f"group_idx {g} is out of range for a table of {groups} time groups")
