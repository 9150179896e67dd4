"""GEMM ops on quantized operands: schema, fake impl and dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._checks import FLOAT_DTYPES, check, check_out_dtype, check_same_device, check_tensor
from ._dispatch import dispatch, register_kernel

register_kernel("int8_gemm", "reference")(reference.int8_gemm)


def _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype) -> None:
    op = "int8_gemm"
    check_tensor(a, op, "a", (torch.int8,), ndim=2)
    check_tensor(w, op, "w", (torch.int8,), ndim=2)
    check(a.shape[1] == w.shape[1], op, f"K mismatch: a is {tuple(a.shape)} but w is {tuple(w.shape)} "
          "(w must be [N, K])")
    check_tensor(a_scale, op, "a_scale", (torch.float32,), ndim=1)
    check(a_scale.shape[0] in (a.shape[0], 1), op,
          f"a_scale must have M={a.shape[0]} entries (per token) or 1 (per tensor), got {a_scale.shape[0]}")
    check_tensor(w_scale, op, "w_scale", (torch.float32,), ndim=1)
    check(w_scale.shape[0] == w.shape[0], op, f"w_scale must have N={w.shape[0]} entries, got {w_scale.shape[0]}")
    if bias is not None:
        check_tensor(bias, op, "bias", FLOAT_DTYPES, ndim=1)
        check(bias.shape[0] == w.shape[0], op, f"bias must have N={w.shape[0]} entries, got {bias.shape[0]}")
    check_out_dtype(out_dtype, op)
    check_same_device(op, a=a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)


@torch.library.custom_op("dtq::int8_gemm", mutates_args=())
def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """out[M, N] = (a · wᵀ in int32) · a_scale[:, None] · w_scale[None, :] + bias, in out_dtype."""
    _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return dispatch("int8_gemm", a.device)(a, a_scale, w, w_scale, bias, out_dtype)


@int8_gemm.register_fake
def _(a, a_scale, w, w_scale, bias, out_dtype):
    _check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)
