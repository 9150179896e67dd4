"""The fast path through the MMDiT blocks: SD3's JointTransformerBlock, Flux's FluxTransformerBlock
(double stream) and FluxSingleTransformerBlock, in the style of nn/fused.py's FastBasicTransformerBlock
(the shared pieces, LN-modulate-quantize into its consumers and GELU-quantize into fc2, live there).

* SD3 joint block / Flux double-stream block: per stream (image; text)
      layernorm_modulate_quantize -> to_qkv GEMM (image) / to_added_qkv GEMM (text) -> joint attention
      (the processor's attend_projected: q/k norms, Flux's rotary embedding, one attention over both
      streams) -> to_out / to_add_out (quantize + GEMM) -> gate + residual ->
      layernorm_modulate_quantize -> fc1 GEMM -> gelu_quantize -> fc2 GEMM -> gate + residual
  An SD3 block with context_pre_only (the last one) modulates the text stream with its
  AdaLayerNormContinuous (scale, shift) into to_added_qkv and has no text output projection or
  feed-forward, as in diffusers.
* Flux single-stream block: the text and image tokens concatenated, then ONE layernorm_modulate_quantize
  whose codes feed both the fused to_qkv GEMM and the proj_mlp GEMM when their activation quantizers
  agree (the same bits, smoothing, rotation and static table; otherwise one pass per quantizer) ->
  attention | GELU(proj_mlp) in float -> concatenated -> proj_out (quantize + GEMM) -> gate + residual.
Per-block op counts (W8A8, fused q/k/v, float attention): SD3 joint / Flux double: 4
layernorm_modulate_quantize, 2 gelu_quantize, 2 quantize_act (the two output projections), 8 GEMMs, 2
float matmuls (the adaLN linears), 1 attention; SD3 context_pre_only: 3, 1, 1, 5, 2, 1; Flux single: 1
layernorm_modulate_quantize, 1 quantize_act (proj_out), 3 GEMMs, 1 float matmul, 1 attention.

A consumer without a fused quantizer (nn/fused.py `_fusable`) gets the float tensor and quantizes itself;
separate q/k/v (left unfused, e.g. smoothed differently) each get the codes of their own quantizer. On
the reference backend the result is bit-identical to the per-layer path in fp32. Diffusers' own forward
runs in training mode, with joint_attention_kwargs, chunked feed-forward or an attention processor
other than dtq's (QuantJointAttnProcessor / QuantFluxAttnProcessor, which fuse_qkv installs), logged
once per block type and reason; SD3.5's dual-attention blocks keep the per-layer path (logged by
rewrite_blocks).
"""
from __future__ import annotations

import logging

import torch

from .attention import QuantFluxAttnProcessor, QuantJointAttnProcessor
from .fused import (ADDED_QKV, FUSED_ADDED_QKV, FUSED_QKV, QKV, feed_forward_obstacle, ln_modulate_into_all,
                    modulated_feed_forward, plain_layernorm)

log = logging.getLogger("dtq_kernels.nn")
_LOGGED: set[tuple[str, str]] = set()


# ---------------------------------------------------------------------------------------- pieces

def _adaln_zero_chunks(norm: torch.nn.Module, emb: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """AdaLayerNormZero(Single)'s modulation chunks, [B, C] each, as diffusers computes them."""
    return norm.linear(norm.silu(emb)).chunk(n, dim=1)


def _qkv_layers(attn: torch.nn.Module, fused_name: str, names: tuple[str, str, str]) -> list[torch.nn.Module]:
    """[the fused projection] when q/k/v were fused, else the three layers."""
    if not hasattr(attn, names[0]) and hasattr(attn, fused_name):
        return [getattr(attn, fused_name)]
    return [getattr(attn, n) for n in names]


def _as_qkv(outputs: list[torch.Tensor]) -> tuple:
    """(q, k, v) [B, S, H·D] from the outputs of `_qkv_layers` (views of a fused output)."""
    return outputs[0].chunk(3, dim=-1) if len(outputs) == 1 else tuple(outputs)


def _stream_qkv(attn, fused_name, names, norm, x, shift, scale) -> tuple:
    """(q, k, v) of one stream from LN-modulate(x) quantized once per distinct quantizer."""
    return _as_qkv(ln_modulate_into_all(_qkv_layers(attn, fused_name, names), norm, x, shift, scale))


def _joint_attention(attn, image: tuple, text: tuple, **kwargs):
    """The processor's (image, text) outputs for (norm, x, shift, scale) of each stream."""
    return attn.processor.attend_projected(attn, _stream_qkv(attn, FUSED_QKV, QKV, *image),
                                           _stream_qkv(attn, FUSED_ADDED_QKV, ADDED_QKV, *text), **kwargs)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# -------------------------------------------------------------------------------------- forwards

def _sd3_forward(block, hidden_states, encoder_hidden_states, temb):
    n1, nc = block.norm1, block.norm1_context
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _adaln_zero_chunks(n1, temb, 6)
    if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
        c_scale_msa, c_shift_msa = nc.linear(nc.silu(temb).to(encoder_hidden_states.dtype)).chunk(2, dim=1)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _adaln_zero_chunks(nc, temb, 6)
    attn_output, context_attn_output = _joint_attention(
        block.attn, (n1.norm, hidden_states, shift_msa, scale_msa),
        (nc.norm, encoder_hidden_states, c_shift_msa, c_scale_msa))
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    ff_output = modulated_feed_forward(block.ff, block.norm2, hidden_states, shift_mlp, scale_mlp)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
    if block.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    context_ff_output = modulated_feed_forward(block.ff_context, block.norm2_context, encoder_hidden_states,
                                               c_shift_mlp, c_scale_mlp)
    return encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output, hidden_states


def _flux_double_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
    n1, nc = block.norm1, block.norm1_context
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _adaln_zero_chunks(n1, temb, 6)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _adaln_zero_chunks(nc, temb, 6)
    attn_output, context_attn_output = _joint_attention(
        block.attn, (n1.norm, hidden_states, shift_msa, scale_msa),
        (nc.norm, encoder_hidden_states, c_shift_msa, c_scale_msa), image_rotary_emb=image_rotary_emb)
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    ff_output = modulated_feed_forward(block.ff, block.norm2, hidden_states, shift_mlp, scale_mlp)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    context_ff_output = modulated_feed_forward(block.ff_context, block.norm2_context, encoder_hidden_states,
                                               c_shift_mlp, c_scale_mlp)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    return _clip_fp16(encoder_hidden_states), hidden_states


def _flux_single_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    shift, scale, gate = _adaln_zero_chunks(block.norm, temb, 3)
    attn = block.attn
    qkv_layers = _qkv_layers(attn, FUSED_QKV, QKV)
    # one normed input, two consumers: attention's q/k/v and proj_mlp share its codes where they can
    *qkv, mlp = ln_modulate_into_all(qkv_layers + [block.proj_mlp], block.norm.norm, hidden_states, shift, scale)
    attn_output = attn.processor.attend_projected(attn, _as_qkv(qkv), None, image_rotary_emb)
    hidden_states = torch.cat([attn_output, block.act_mlp(mlp)], dim=2)
    hidden_states = _clip_fp16(residual + gate.unsqueeze(1) * block.proj_out(hidden_states))
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


# ------------------------------------------------------------------------------------- obstacles

def _adaln_zero_obstacle(norm: torch.nn.Module, name: str) -> str | None:
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
    if type(norm) not in (AdaLayerNormZero, AdaLayerNormZeroSingle) or getattr(norm, "emb", None) is not None:
        return f"{name} is not an adaLN-zero norm on a given embedding"
    if not plain_layernorm(norm.norm):
        return f"{name}'s LayerNorm is not a plain LayerNorm without affine weights"
    return None


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


def _joint_obstacle(block) -> str | None:
    """SD3 JointTransformerBlock / Flux FluxTransformerBlock."""
    from diffusers.models.normalization import AdaLayerNormContinuous
    if getattr(block, "use_dual_attention", False):
        return "SD3.5 dual attention (a second self-attention on its own modulated input)"
    context_pre_only = getattr(block, "context_pre_only", False)
    nc = block.norm1_context
    if context_pre_only:
        context = None if type(nc) is AdaLayerNormContinuous and plain_layernorm(nc.norm) else \
            "norm1_context is not an AdaLayerNormContinuous over a plain LayerNorm"
    else:
        context = _first(_adaln_zero_obstacle(nc, "norm1_context"),
                         None if plain_layernorm(block.norm2_context) else "norm2_context has affine weights",
                         feed_forward_obstacle(block.ff_context))
    return _first(_adaln_zero_obstacle(block.norm1, "norm1"), context,
                  None if plain_layernorm(block.norm2) else "norm2 has affine weights", feed_forward_obstacle(block.ff))


def _single_obstacle(block) -> str | None:
    """Flux FluxSingleTransformerBlock."""
    if type(block.act_mlp) is not torch.nn.GELU:
        return "act_mlp is not a GELU"
    return _adaln_zero_obstacle(block.norm, "norm")


# ---------------------------------------------------------------------------------------- classes

def _diffusers_forward_reason(block, joint_attention_kwargs, hidden_states, processor_cls) -> str | None:
    """Why this call runs diffusers' forward (logged once per block type and reason), or None."""
    if block.training:
        reason = "training mode"
    elif joint_attention_kwargs:
        reason = f"joint_attention_kwargs {sorted(joint_attention_kwargs)}"
    elif getattr(block, "_chunk_size", None) is not None:
        reason = "chunked feed-forward"
    elif hidden_states.ndim != 3:
        reason = f"{hidden_states.ndim}-d hidden states"
    elif not isinstance(block.attn.processor, processor_cls):
        reason = f"attention processor {type(block.attn.processor).__name__} (not {processor_cls.__name__})"
    else:
        return None
    key = (type(block).__name__, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("fast block path: %s runs diffusers' forward for this call: %s", key[0], reason)
    return reason


def _fast_flux_class(base: type, name: str, fast_forward, doc: str) -> type:
    """A subclass of the Flux block class `base` whose forward runs fast_forward(block, ...) unless this
    call needs diffusers' forward (the double- and single-stream blocks share the signature)."""
    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        if _diffusers_forward_reason(self, joint_attention_kwargs, hidden_states, QuantFluxAttnProcessor):
            return base.forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                joint_attention_kwargs)
        return fast_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb)

    return type(name, (base,), {"__doc__": doc, "dtq_fast_block": True, "forward": forward})


def _make_classes() -> dict[type, tuple[type, object]]:
    """{diffusers block class: (its fast subclass, its obstacle function)} for the classes this
    diffusers has."""
    from diffusers.models.attention import JointTransformerBlock

    class FastJointTransformerBlock(JointTransformerBlock):
        """An SD3 JointTransformerBlock (same modules and state dict) running this module's fast path."""
        dtq_fast_block = True

        def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
            if _diffusers_forward_reason(self, joint_attention_kwargs, hidden_states, QuantJointAttnProcessor):
                return super().forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
            return _sd3_forward(self, hidden_states, encoder_hidden_states, temb)

    classes = {JointTransformerBlock: (FastJointTransformerBlock, _joint_obstacle)}
    try:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    except ImportError:  # a diffusers without these Flux blocks
        FluxTransformerBlock = None
    if FluxTransformerBlock is not None:
        FastFluxTransformerBlock = _fast_flux_class(
            FluxTransformerBlock, "FastFluxTransformerBlock", _flux_double_forward,
            "A Flux double-stream block (same modules and state dict) running this module's fast path.")
        FastFluxSingleTransformerBlock = _fast_flux_class(
            FluxSingleTransformerBlock, "FastFluxSingleTransformerBlock", _flux_single_forward,
            "A Flux single-stream block (same modules and state dict) running this module's fast path.")
        classes[FluxTransformerBlock] = (FastFluxTransformerBlock, _joint_obstacle)
        classes[FluxSingleTransformerBlock] = (FastFluxSingleTransformerBlock, _single_obstacle)
    for fast, _ in classes.values():
        fast.__module__ = __name__  # pickle finds them through this module's __getattr__
        fast.__qualname__ = fast.__name__
    return classes


_CLASSES: dict | None = None


def _classes() -> dict[type, tuple[type, object]]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


def __getattr__(name: str):
    for fast, _ in _classes().values():
        if fast.__name__ == name:
            return fast
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fast_class_for(block: torch.nn.Module) -> tuple[type | None, str | None]:
    """(the fast subclass to swap in, None) for an SD3 / Flux block this module runs, else (None, why not).
    The type must match exactly: a subclass may have changed the forward."""
    entry = _classes().get(type(block))
    if entry is None:
        return None, f"{type(block).__name__} is not a block the rewrite knows"
    fast, obstacle = entry
    reason = obstacle(block)
    return (fast, None) if reason is None else (None, reason)
