"""Activation quantization ops: schema, fake impl and dispatch (the kernels live in their backends)."""
from __future__ import annotations

import torch

from . import reference
from ._checks import FLOAT_DTYPES, check_bits, check_tensor
from ._dispatch import dispatch, register_kernel

register_kernel("quantize_per_token", "reference")(reference.quantize_per_token)


def _check_quantize_per_token(x: torch.Tensor, bits: int) -> None:
    check_tensor(x, "quantize_per_token", "x", FLOAT_DTYPES, ndim=2)
    check_bits(bits, "quantize_per_token")


@torch.library.custom_op("dtq::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q int8 [M, K], scale f32 [M]); scale = absmax(row) / (2^(bits-1) - 1)."""
    _check_quantize_per_token(x, bits)
    return dispatch("quantize_per_token", x.device)(x, bits)


@quantize_per_token.register_fake
def _(x, bits=8):
    _check_quantize_per_token(x, bits)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)
