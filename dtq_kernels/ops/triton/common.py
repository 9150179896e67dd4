"""Triton helpers shared by the kernels. Each is exact on the GPU and in the interpreter."""
import os

import triton
import triton.language as tl

# In the interpreter, cost grows with programs x loop iterations and a multi-config autotuner fails
# ("0 active drivers"): kernels pick large single configs there and their tuned ones on a GPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def rne(x):
    """Round half to even for |x| < 2^22 (no libdevice in the interpreter; the GPU keeps the order)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def round_to_e4m3_grid(x):
    """Saturating round-to-nearest-even onto float8_e4m3fn values, in fp32, so the later cast is exact
    (the interpreter's fp32 -> fp8 cast rounds some values wrongly)."""
    a = tl.minimum(tl.abs(x), 448.0)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    q = rne(a * ((130 - e) << 23).to(tl.float32, bitcast=True)) * ((124 + e) << 23).to(tl.float32, bitcast=True)
    return tl.where(x < 0, -q, q)


@triton.jit
def nonfinite(x):
    """int32 1 where x is NaN or ±Inf, else 0 (NaN fails every ordered comparison)."""
    return tl.where(tl.abs(x) < float("inf"), 0, 1)


@triton.jit
def max_propagating_nan(a, b):
    """Elementwise tl.maximum that returns NaN when either side is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def absmax_propagating_nan(x, axis: tl.constexpr):
    """max |x| along `axis`, NaN where that slice holds a NaN (tl.max alone may drop NaN on the GPU).
    Built from the standard reductions on purpose: a tl.reduce with a custom combine function runs
    element by element in Python under the interpreter, hundreds of times slower."""
    a = tl.abs(x)
    has_nan = tl.max(tl.where(a == a, 0, 1), axis)  # NaN is the one value unequal to itself
    return tl.where(has_nan > 0, float("nan"), tl.max(a, axis))


def require_fp8_tensor_cores(device, op: str) -> None:
    """FP8 E4M3 kernels (conversions and MMA) need sm_89 or sm_90: a clear BackendError on older GPUs."""
    import torch

    from .._dispatch import BackendError
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise BackendError(f"dtq.{op}: FP8 E4M3 needs sm_89 or sm_90 (FP8 tensor cores), this GPU is "
                           f"sm_{major}{minor}; use int8 activations there (LinearQuantSpec(weight='int8', act='int8'))")
