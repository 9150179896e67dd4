"""Activation quantization kernels in Triton."""
import torch
import triton
import triton.language as tl

from .._dispatch import register_kernel
from .common import INTERPRETING, rne


@triton.jit
def quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
                              QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_M rows per program; pass 1 finds each row's absmax, pass 2 writes the codes.

    Bit-exact with the reference: fp32 absmax, correctly rounded divisions (div_rn), round half to
    even, and a zero row gives scale 0 and codes 0.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + cols)[None, :], mask=mask, other=0.0)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.math.div_rn(absmax, tl.full((BLOCK_M,), QMAX, tl.float32))
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    divisor = tl.where(scale == 0.0, 1.0, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + cols)[None, :], mask=mask, other=0.0)
        q = rne(tl.math.div_rn(x.to(tl.float32), divisor[:, None]))
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        tl.store(q_ptr + rows[:, None] * stride_qm + (k0 + cols)[None, :], q.to(tl.int8), mask=mask)


def _quantize_per_token_config(K: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K): whole rows up to 4096 wide in one pass tile, else 4096-wide chunks.
    The interpreter pays per program, so it gets 64-row tiles."""
    block_k = min(triton.next_power_of_2(K), 4096)
    return (64 if INTERPRETING else max(1, 4096 // block_k)), block_k


@register_kernel("quantize_per_token", "triton")
def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    block_m, block_k = _quantize_per_token_config(max(K, 1))
    grid = (triton.cdiv(M, block_m),)
    quantize_per_token_kernel[grid](x, q, scale, M, K, x.stride(0), q.stride(0),
                                    QMAX=float(2 ** (bits - 1) - 1), BLOCK_M=block_m, BLOCK_K=block_k)
    return q, scale


# Offline-compile specs (see aot.py): what each arch's PTX must contain.
AOT_SPECS = [
    dict(name="quantize_per_token_fp16", fn=quantize_per_token_kernel,
         signature={"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32", "M": "i32", "K": "i32",
                    "stride_xm": "i32", "stride_qm": "i32"},
         constexprs={"QMAX": 127.0, "BLOCK_M": 4, "BLOCK_K": 1024},
         expect={80: ["div.rn.f32"], 89: ["div.rn.f32"], 90: ["div.rn.f32"]}),
]
