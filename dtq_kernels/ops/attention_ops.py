"""Quantized attention ops: schema, fake impl and dispatch (kernels: reference.py, triton/attention.py).

Layout: q [B, Sq, H, D], k and v [B, Sk, H, D], out [B, Sq, H, D] contiguous in q's dtype. This is what a
diffusers Attention gives for free: to_q(x) is [B, S, H·D], a view makes it [B, S, H, D], and the output
views back to [B, Sq, H·D] for to_out without a transpose copy. Inputs may be strided views (the
kernels read strides) but their last dimension must be contiguous. Sq and Sk may differ
(cross-attention); key_padding_mask is bool [B, Sk], True = attend. A query row whose keys are all
masked gets zeros (not NaN). Head dims up to 128.

* quant_attention (dynamic, no calibration): Q per token and head, K per token and head after
  subtracting K's mean over tokens (smooth_k), both INT8 symmetric absmax codes, QKᵀ in int32; scores
  in the log2 domain with sm_scale·log2e folded into the Q scale; softmax in fp32; P (in [0, 1) after
  the online max) coded as P·448 and V per channel (absmax over tokens / 448) in pv_format:
  "fp8_e4m3" (FP8 tensor cores, sm_89/90) or "fp16" (sm_80). The exact semantics, including the
  integer-rounded row maximum that makes the online softmax match a one-shot reference, are in
  reference.quant_attention.
* quant_attention_static (TQ-DiT / PTQ4DiT recipes): per-head static Q/K/V scales read from [G, H]
  tables at the time group group_idx[0] (no host sync); P is the normalized softmax quantized per time
  group, "uniform" (unsigned codes 0..2^bits−1, step p_table[g, 0]; PTQ4DiT) or "two_region"
  (formats.quantize_two_region "split" mode with (c_pos, c_neg) = p_table[g]; TQ-DiT MRQ). P·V is
  exact in integers. The kernel takes two passes over the keys (row max and sum first), because the
  static P quantizer is defined on the normalized probabilities.

Non-finite inputs are never hidden (both ops, reference and kernel): a q or k row (token, head) holding
NaN/±Inf gets scale NaN (formats.mark_nonfinite_rows), so the softmax row sum of every query that reads
it is NaN and that output row is NaN (a masked key is never read); a non-finite v makes its channel NaN
for every query of that head (dynamic: through the per-channel V scale; static: its code stays NaN).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._checks import (FLOAT_DTYPES, check, check_bits, check_group_idx, check_group_in_range, check_same_device,
                      check_tensor)
from ._dispatch import dispatch, register_kernel

register_kernel("quant_attention", "reference")(reference.quant_attention)
register_kernel("quant_attention_static", "reference")(reference.quant_attention_static)

MAX_HEAD_DIM = 128  # the kernel's head-dim tiles (triton/attention.py head_dims) stop at 128
PV_FORMATS = reference.ATTN_PV_FORMATS
P_MODES = reference.ATTN_P_MODES


def _check_qkv(op: str, q, k, v, key_padding_mask, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, op, name, FLOAT_DTYPES, ndim=4, contiguous=False)
        check(t.stride(-1) == 1, op, f"{name} must have a contiguous last (head) dimension, got strides "
              f"{tuple(t.stride())}")
    check(k.dtype == q.dtype and v.dtype == q.dtype, op,
          f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    B, _, H, D = q.shape
    check(k.shape == v.shape, op, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check(k.shape[0] == B and k.shape[2] == H and k.shape[3] == D, op,
          f"k/v must be [B={B}, Sk, H={H}, D={D}] (layout [B, S, H, D]), got {tuple(k.shape)}")
    check(1 <= D <= MAX_HEAD_DIM, op, f"head dim must be in 1..{MAX_HEAD_DIM}, got {D}")
    check(k.shape[1] >= 1, op, "k/v need at least one token")
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, op, "key_padding_mask", (torch.bool,), ndim=2)
        check(tuple(key_padding_mask.shape) == (B, k.shape[1]), op,
              f"key_padding_mask must be bool [B={B}, Sk={k.shape[1]}], got {tuple(key_padding_mask.shape)}")
    check(scale is None or (isinstance(scale, float) and scale > 0), op,
          f"scale must be None (1/sqrt(D)) or a positive float, got {scale!r}")


def _out(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ------------------------------------------------------------------------------ quant_attention

def _check_dynamic(q, k, v, key_padding_mask, scale, pv_format, smooth_k) -> None:
    op = "quant_attention"
    _check_qkv(op, q, k, v, key_padding_mask, scale)
    check(pv_format in PV_FORMATS, op, f"pv_format must be one of {PV_FORMATS}, got {pv_format!r}")
    check(isinstance(smooth_k, bool), op, f"smooth_k must be a bool, got {smooth_k!r}")
    check_same_device(op, q=q, k=k, v=v, key_padding_mask=key_padding_mask)


@torch.library.custom_op("dtq::quant_attention", mutates_args=())
def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, pv_format: str = "fp8_e4m3", smooth_k: bool = True) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v with INT8 Q/K (per token, K mean-subtracted) and 8-bit (fp8) or fp16 P·V.
    q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D]; scale defaults to 1/sqrt(D)."""
    _check_dynamic(q, k, v, key_padding_mask, scale, pv_format, smooth_k)
    return dispatch("quant_attention", q.device)(q, k, v, key_padding_mask, scale, pv_format, smooth_k)


@quant_attention.register_fake
def _(q, k, v, key_padding_mask=None, scale=None, pv_format="fp8_e4m3", smooth_k=True):
    _check_dynamic(q, k, v, key_padding_mask, scale, pv_format, smooth_k)
    return _out(q)


# ----------------------------------------------------------------------- quant_attention_static

def _check_static(q, k, v, key_padding_mask, q_scales, k_scales, v_scales, p_table, group_idx, bits, p_mode,
                  scale) -> None:
    op = "quant_attention_static"
    _check_qkv(op, q, k, v, key_padding_mask, scale)
    check_bits(bits, op)
    check(p_mode in P_MODES, op, f"p_mode must be one of {P_MODES}, got {p_mode!r}")
    H = q.shape[2]
    G = q_scales.shape[0] if q_scales.dim() == 2 else -1
    for name, t in (("q_scales", q_scales), ("k_scales", k_scales), ("v_scales", v_scales)):
        check_tensor(t, op, name, (torch.float32,), ndim=2)
        check(t.shape[0] == G and G >= 1 and t.shape[1] == H, op,
              f"{name} must be [G, H={H}] with the same G >= 1 as q_scales, got {tuple(t.shape)}")
    check_tensor(p_table, op, "p_table", (torch.float32,), ndim=2)
    width = 1 if p_mode == "uniform" else 2
    check(tuple(p_table.shape) == (G, width), op,
          f"p_table must be [G={G}, {width}] for p_mode={p_mode!r} "
          f"({'step' if width == 1 else 'c_pos, c_neg'} per time group), got {tuple(p_table.shape)}")
    check_group_idx(op, group_idx)
    check_same_device(op, q=q, k=k, v=v, key_padding_mask=key_padding_mask, q_scales=q_scales, k_scales=k_scales,
                      v_scales=v_scales, p_table=p_table, group_idx=group_idx)


@torch.library.custom_op("dtq::quant_attention_static", mutates_args=())
def quant_attention_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_padding_mask: Optional[torch.Tensor], q_scales: torch.Tensor, k_scales: torch.Tensor,
                           v_scales: torch.Tensor, p_table: torch.Tensor, group_idx: torch.Tensor, bits: int = 8,
                           p_mode: str = "two_region", scale: Optional[float] = None) -> torch.Tensor:
    """Attention with static per-head Q/K/V scales (tables f32 [G, H], q's before the softmax scale) and a
    static P quantizer per time group (p_table f32 [G, 1] uniform step or [G, 2] two-region (c_pos, c_neg)),
    all read at g = group_idx[0] (int32 [1]) on the device. Codes are `bits` wide (symmetric ±(2^(bits−1)−1)
    for Q/K/V). q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D]."""
    _check_static(q, k, v, key_padding_mask, q_scales, k_scales, v_scales, p_table, group_idx, bits, p_mode, scale)
    check_group_in_range("quant_attention_static", group_idx, q_scales.shape[0])
    return dispatch("quant_attention_static", q.device)(q, k, v, key_padding_mask, q_scales, k_scales, v_scales,
                                                         p_table, group_idx, bits, p_mode, scale)


@quant_attention_static.register_fake
def _(q, k, v, key_padding_mask, q_scales, k_scales, v_scales, p_table, group_idx, bits=8, p_mode="two_region",
      scale=None):
    _check_static(q, k, v, key_padding_mask, q_scales, k_scales, v_scales, p_table, group_idx, bits, p_mode, scale)
    return _out(q)
