"""The fast path through a quantized transformer block: one activation quantization per shared input.

Applied by `dtq.quantize` (and `load_quantized`) after the plan's layers are installed; `fuse=False`
keeps the per-layer path. Two rewrites, each logged (logger `dtq_kernels.nn`):

* QKV fusion (`fuse_qkv`): an attention's to_q / to_k / to_v QuantLinears (one input) become one
  `to_qkv` QuantLinear over the concatenated output channels: one activation quantization, one GEMM,
  the split is a view of its output; SD3 / Flux's text-stream add_q/k/v_proj likewise become
  `to_added_qkv`. Calibration still sees and
  scales the three layers separately: the fusion happens after the plan is applied. Per-output-channel
  weight scales (and zero points, biases) concatenate. Their activation quantizers must agree: the same spec and the same smoothing
  vector (ViDiT-Q smoothing computes one per layer, so a smoothed q/k/v stays unfused, logged), and
  one static table: the three tables describe one input, and where calibration left them different
  the fused layer takes their elementwise maximum (no consumer clips more than it was calibrated to;
  logged with the largest ratio). A plain self-attention then gets a `QuantAttnProcessor` that reads
  `to_qkv` ("fp" mode: float SDPA on the same views, unless quantized attention is installed); SD3's
  joint attention a `QuantJointAttnProcessor`, Flux's a `QuantFluxAttnProcessor` (also where their
  projections stay separate: the fast blocks hand them projections).
  `model.dtq_fused` records {fused path: {member path: width}}; a checkpoint stores it and
  `split_fused_state` turns a fused state dict back into the per-layer one, so checkpoints load
  fused or unfused either way.
* Block rewrite (`FastBasicTransformerBlock`): a diffusers BasicTransformerBlock with adaLN-zero (DiT)
  or adaLN-single (PixArt) norms runs
      layernorm_modulate_quantize -> to_qkv GEMM -> attention on [B, S, H, D] views -> to_out
      (quantize + GEMM) -> gate + residual -> [PixArt: cross-attention, per layer] ->
      layernorm_modulate_quantize -> fc1 GEMM -> gelu_quantize -> fc2 GEMM -> gate + residual
  Each producer quantizes with its consumer's quantizer (bits, smoothing, rotation, static table and
  time group; a sign-mode two-region fc2 gets quantize_two_region(gelu=True)); a consumer without a
  fused quantizer (dequant-matmul formats, a two-region qkv/fc1) or with a LoRA branch (nn/lora.py:
  the branch reads the float input) gets the float tensor and quantizes itself, as before. On the reference backend the result is bit-identical to the per-layer path in
  fp32 (the same ops in the same order). Training mode, chunked feed-forward or extra
  cross_attention_kwargs run diffusers' own forward.
* SD3 (JointTransformerBlock) and Flux (FluxTransformerBlock, FluxSingleTransformerBlock) blocks get the
  same treatment in nn/fused_blocks.py (per-block routes and op counts there), built on this module's
  ln_modulate_into_all / modulated_feed_forward. Any other block shape keeps the per-layer path, logged
  once per reason (`rewrite_blocks`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from ..formats import get_format
from .linear import QuantLinear

log = logging.getLogger("dtq_kernels.nn")

QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")  # SD3 / Flux text stream
FUSED_QKV, FUSED_ADDED_QKV = "to_qkv", "to_added_qkv"


# ------------------------------------------------------------------------------------------ QKV fusion

def fusion_obstacle(layers: list[torch.nn.Module]) -> str | None:
    """Why `layers` (consumers of one input) cannot become one QuantLinear, or None if they can."""
    if not all(type(m) is QuantLinear for m in layers):
        return "not all plain QuantLinear (step-group precision or floating point)"
    first = layers[0]
    if any(m.spec != first.spec for m in layers):
        return "different quantization specs"
    if any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None) for m in layers):
        return "different input widths or bias presence"
    if first.smooth is not None and any(not torch.equal(m.smooth, first.smooth) for m in layers):
        return "different smoothing vectors (one activation quantizer cannot serve them)"
    if len({m.qweight.device for m in layers}) > 1:
        return "layers on different devices"
    return None


def fuse_linears(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing torch.cat([m(x) for m in layers], -1) with one activation quantization
    (see the module docstring for the static-table rule). Raises ValueError if they cannot fuse."""
    reason = fusion_obstacle(layers)
    if reason is not None:
        raise ValueError(f"cannot fuse these layers: {reason}")
    if any(t.is_meta for m in layers for t in m.buffers()):
        raise ValueError("cannot fuse layers whose tensors are on the meta device (not loaded yet): install the "
                         "plan with fuse=False, load the tensors, then apply_fast_path(model)")
    if any(len(m.lora) for m in layers):
        raise ValueError("cannot fuse layers that carry LoRA adapters: fuse first, then apply_lora (which "
                         "places each member's adapter on its rows of the fused layer)")
    first = layers[0]
    fused = QuantLinear(first.in_features, sum(m.out_features for m in layers), first.spec,
                        bias=first.bias is not None).to(first.qweight.device)
    for name in ("qweight", "wscale", "wzero", "bias"):
        if getattr(fused, name) is not None:
            torch.cat([getattr(m, name) for m in layers], 0, out=getattr(fused, name))  # no temporary copy
    if fused.smooth is not None:
        fused.smooth.copy_(first.smooth)
    if fused.act_table is not None:
        tables = torch.stack([m.act_table for m in layers])
        table = tables.amax(0)
        if not bool((tables == table).all()):
            ratio = float((table / tables.abs().clamp_min(1e-30)).max())
            log.info("fused QKV: the members' static activation tables differ (largest ratio %.3g); the fused "
                     "layer uses their elementwise maximum", ratio)
        fused.act_table.copy_(table)
    fused.bind_timestep_tracker(first._tracker)
    return fused


def _fusion_targets(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, list[tuple[str, tuple]], Any]]:
    """{module path: (attention module, [(fused attribute, member attributes)], how its processor learns of
    the fusion)} for the attention modules whose processor can read fused projections:
    * plain self-attention (DiT, PixArt attn1; AttnProcessor(2_0) or QuantAttnProcessor): one `to_qkv`,
      read by QuantAttnProcessor ("fp" mode unless quantized attention is installed);
    * SD3 joint attention (JointAttnProcessor2_0 or QuantJointAttnProcessor): `to_qkv` + `to_added_qkv`
      (the text stream), read by QuantJointAttnProcessor ("fp" mode unless quantized attention is installed);
    * Flux attention (FluxAttnProcessor or QuantFluxAttnProcessor): `to_qkv` (+ `to_added_qkv` in
      double-stream blocks), read by QuantFluxAttnProcessor ("fp" unless quantized attention is installed;
      `fused_projections` is set as well, for diffusers' processors).
    Cross-attention (PixArt attn2: q from the image, k/v from the caption) has no shared input for q."""
    from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,
                                                      JointAttnProcessor2_0)
    from .attention import QuantAttnProcessor, QuantFluxAttnProcessor, QuantJointAttnProcessor
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
    except ImportError:  # older diffusers: no FluxAttention class
        FluxAttention = FluxAttnProcessor = None
    targets = {}
    for name, m in model.named_modules():
        proc = getattr(m, "processor", None)
        if isinstance(m, Attention) and not m.is_cross_attention and m.added_kv_proj_dim is None \
                and type(proc) in (AttnProcessor, AttnProcessor2_0, QuantAttnProcessor):
            targets[name] = (m, [(FUSED_QKV, QKV)], "dtq")
        elif isinstance(m, Attention) and type(proc) in (JointAttnProcessor2_0, QuantJointAttnProcessor) \
                and m.added_kv_proj_dim is not None:
            targets[name] = (m, [(FUSED_QKV, QKV), (FUSED_ADDED_QKV, ADDED_QKV)], "sd3")
        elif FluxAttention is not None and isinstance(m, FluxAttention) \
                and type(proc) in (FluxAttnProcessor, QuantFluxAttnProcessor):
            groups = [(FUSED_QKV, QKV)] + ([(FUSED_ADDED_QKV, ADDED_QKV)] if m.added_kv_proj_dim is not None else [])
            targets[name] = (m, groups, "flux")
    return {n: t for n, t in targets.items() if all(hasattr(t[0], a) for _, members in t[1] for a in members)}


def fuse_qkv(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Fuse q/k/v (and the text stream's add_q/k/v) of every attention module `_fusion_targets` lists
    whose projections can share one quantizer, and give it the dtq processor that reads them (SD3 / Flux
    attention gets it with separate projections too). Returns and
    records in model.dtq_fused {"<attn>.to_qkv": {"<attn>.to_q": out_features, ...}, ...}."""
    from .attention import QuantAttnProcessor, QuantFluxAttnProcessor, QuantJointAttnProcessor
    fused_map = dict(getattr(model, "dtq_fused", {}))
    skipped = {}
    readers = {"dtq": QuantAttnProcessor, "sd3": QuantJointAttnProcessor, "flux": QuantFluxAttnProcessor}
    for name, (attn, groups, reader) in _fusion_targets(model).items():
        reason = next((r for _, members in groups if (r := fusion_obstacle([getattr(attn, a) for a in members]))),
                      None)
        if reason is not None:
            skipped[name] = reason
        else:
            for fused_attr, members in groups:
                layers = [getattr(attn, a) for a in members]
                setattr(attn, fused_attr, fuse_linears(layers))
                for a in members:
                    delattr(attn, a)
                fused_map[f"{name}.{fused_attr}"] = {f"{name}.{a}": m.out_features for a, m in zip(members, layers)}
            if reader == "flux":
                attn.fused_projections = True
        # SD3 / Flux get dtq's processor with separate projections too: their fast blocks
        # (nn/fused_blocks.py) hand it projections; a plain self-attention needs it only to read to_qkv
        if (reason is None or reader != "dtq") and not isinstance(attn.processor, readers[reader]):
            attn.set_processor(readers[reader]("fp", name=name))
    if skipped:
        first = next(iter(skipped))
        log.info("QKV fusion: %d attention modules keep separate projections (e.g. %s: %s)", len(skipped), first,
                 skipped[first])
    model.dtq_fused = fused_map
    return fused_map


def split_fused_state(state: dict[str, torch.Tensor], fused: dict[str, dict[str, int]]) -> dict[str, torch.Tensor]:
    """The per-layer state dict of a model saved with fused layers: each "<fused>.<buffer>" split along
    its output channels into its members (fused: {fused path: {member path: out_features}}, as
    model.dtq_fused records it). Buffers without an output-channel axis (smooth, act_table: shared by
    construction) are copied to every member."""
    out = dict(state)
    for fused_name, member_widths in fused.items():
        members, widths = list(member_widths), list(member_widths.values())
        prefix = fused_name + "."
        for key in [k for k in state if k.startswith(prefix)]:
            buf, t = key[len(prefix):], out.pop(key)
            parts = t.split(widths, 0) if buf in ("qweight", "wscale", "wzero", "bias") else [t] * len(members)
            for m, p in zip(members, parts):
                out[f"{m}.{buf}"] = p.clone()
    return out


# -------------------------------------------------------------------------------------- block rewrite

def _fusable(layer: torch.nn.Module, *, gelu: bool = False) -> bool:
    """Whether a producer can hand `layer` its activation codes: an integer-activation kernel path with a
    quantizer the fused LN / GELU ops implement (dynamic or static; two-region only after GELU, in sign mode)."""
    if type(layer) is not QuantLinear or not layer.takes_codes() or len(layer.lora):
        return False  # a LoRA branch reads the layer's float input: the layer quantizes it itself
    mode = layer.spec.act_mode
    return mode in ("dynamic", "static") or (gelu and mode == "two_region" and layer.spec.two_region_mode == "sign")


def _quantizer_args(layer: QuantLinear) -> tuple:
    """(bits, smooth, rotate, scale_table, group_idx) of the layer's own activation quantizer."""
    s = layer.spec
    static = s.act_mode == "static"
    return (get_format(s.act).bits, layer.smooth, s.rotate, layer.act_table if static else None,
            layer._group_idx() if static else None)


def ln_modulate_plain(norm: torch.nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """The adaLN modulate in the model's dtype, exactly as diffusers' blocks compute it."""
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


@torch.compiler.assume_constant_result  # buffers fixed once quantized: no data-dependent branch under compile
def _same_quantizer(a: QuantLinear, b: QuantLinear) -> bool:
    """Whether two fusable layers quantize an input to the same codes (then one pass serves both)."""
    (bits, smooth, rotate, table, _), (bits_b, smooth_b, rotate_b, table_b, _) = _quantizer_args(a), _quantizer_args(b)

    def same(t, u):
        return (t is None and u is None) or (t is not None and u is not None and torch.equal(t, u))
    return bits == bits_b and rotate == rotate_b and same(smooth, smooth_b) and same(table, table_b) \
        and (table is None or a._tracker is b._tracker)


def ln_modulate_into_all(layers: list[torch.nn.Module], norm: torch.nn.LayerNorm, x: torch.Tensor,
                         shift: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """[layer(LayerNorm(x) · (1 + scale[b]) + shift[b]) for layer in layers] for x [B, S, C], shift / scale
    [B, C]: one fused LN-modulate-quantize pass per distinct activation quantizer among the layers that
    take codes, feeding their GEMMs; the float tensor (computed once) for the others."""
    B, S, C = x.shape
    outs, plain, passes = [], None, []  # passes: [(layer whose quantizer made them, (codes, scales))]
    for layer in layers:
        if not _fusable(layer):
            plain = ln_modulate_plain(norm, x, shift, scale) if plain is None else plain
            outs.append(layer(plain))
            continue
        made = next((codes for owner, codes in passes if _same_quantizer(owner, layer)), None)
        if made is None:
            # shift / scale are chunks of the adaLN output: [B, C] slices, contiguous copies of B·C elements
            made = ops.layernorm_modulate_quantize(x.reshape(B * S, C).contiguous(), shift.contiguous(),
                                                   scale.contiguous(), S, float(norm.eps), *_quantizer_args(layer))
            passes.append((layer, made))
        outs.append(layer.forward_quantized(*made, x.dtype).view(B, S, -1))
    return outs


def ln_modulate_into(layer: torch.nn.Module, norm: torch.nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """ln_modulate_into_all for one consumer."""
    return ln_modulate_into_all([layer], norm, x, shift, scale)[0]


def gelu_into(layer: torch.nn.Module, h: torch.Tensor, approximate: str, dropout: torch.nn.Module) -> torch.Tensor:
    """layer(dropout(GELU(h))) with GELU fused into the layer's activation quantization when it can be
    (the dropout is the identity in eval mode; in training mode the block runs diffusers' forward)."""
    if not _fusable(layer, gelu=True):
        return layer(dropout(F.gelu(h, approximate=approximate)))
    lead, h2 = h.shape[:-1], h.reshape(-1, h.shape[-1])
    s = layer.spec
    if s.act_mode == "two_region":
        q = ops.quantize_two_region(h2, layer.act_table, layer._group_idx(), get_format(s.act).bits, "sign", True,
                                    approximate)
        a_scale = None
    else:
        bits, smooth, rotate, table, g = _quantizer_args(layer)
        q, a_scale = ops.gelu_quantize(h2, bits, approximate, smooth, rotate, table, g)
    return layer.forward_quantized(q, a_scale, h.dtype).view(*lead, -1)


def plain_layernorm(norm: torch.nn.Module) -> bool:
    """A torch LayerNorm without affine weights: what the fused LN-modulate computes."""
    return type(norm) is torch.nn.LayerNorm and norm.weight is None


def feed_forward_obstacle(ff: torch.nn.Module) -> str | None:
    """Why a diffusers FeedForward cannot run as modulated_feed_forward, or None."""
    from diffusers.models.activations import GELU
    net = ff.net
    if not (isinstance(net[0], GELU) and len(net) == 3):
        return "feed-forward is not Linear -> GELU -> Linear"
    return None


def modulated_feed_forward(ff: torch.nn.Module, norm: torch.nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor) -> torch.Tensor:
    """ff(LayerNorm(x) · (1 + scale) + shift): LN-modulate-quantize -> fc1 GEMM -> GELU-quantize -> fc2 GEMM."""
    fc1, dropout, fc2 = ff.net[0].proj, ff.net[1], ff.net[2]
    return gelu_into(fc2, ln_modulate_into(fc1, norm, x, shift, scale), ff.net[0].approximate, dropout)


def _block_obstacle(block: torch.nn.Module) -> str | None:
    """Why `block` keeps the per-layer path, or None if FastBasicTransformerBlock can run it."""
    from diffusers.models.attention import BasicTransformerBlock
    if not isinstance(block, BasicTransformerBlock):
        return f"{type(block).__name__} is not a BasicTransformerBlock"
    if block.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        return f"norm_type {block.norm_type!r} (the rewrite covers ada_norm_zero and ada_norm_single)"
    if block.pos_embed is not None or block.only_cross_attention:
        return "positional embedding inside the block or cross-attention-only attn1"
    if block.norm_type == "ada_norm_zero" and block.attn2 is not None:
        return "adaLN-zero with cross-attention (a LayerNorm before attn2 the rewrite does not run)"
    norms = (block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1,
             block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2)
    if not all(plain_layernorm(n) for n in norms):
        return "its LayerNorms carry affine weights (the fused LN-modulate has none)"
    if (reason := feed_forward_obstacle(block.ff)) is not None:
        return reason
    a = block.attn1
    if a.spatial_norm is not None or a.group_norm is not None or a.residual_connection or a.rescale_output_factor != 1:
        return "attn1 has spatial/group norm, a residual connection or output rescaling"
    return None


def _adaln_chunks(block, hidden_states, timestep, class_labels):
    """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp): shifts and scales [B, C], gates
    broadcastable against [B, S, C], computed as BasicTransformerBlock computes them."""
    B = hidden_states.shape[0]
    if block.norm_type == "ada_norm_zero":
        n1 = block.norm1
        emb = n1.linear(n1.silu(n1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return shift_msa, scale_msa, gate_msa.unsqueeze(1), shift_mlp, scale_mlp, gate_mlp.unsqueeze(1)
    chunks = (block.scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)  # each [B, 1, C]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
    return shift_msa[:, 0], scale_msa[:, 0], gate_msa, shift_mlp[:, 0], scale_mlp[:, 0], gate_mlp


def _self_attention(attn, ln, x, shift, scale, attention_mask):
    """attn1 on LN-modulate(x): through the fused to_qkv and the processor's attention when both are
    there, else the module's own call on the float LN-modulated input."""
    from .attention import QuantAttnProcessor
    qkv_layer = getattr(attn, FUSED_QKV, None)
    if qkv_layer is None or not isinstance(attn.processor, QuantAttnProcessor):
        return attn(ln_modulate_plain(ln, x, shift, scale), attention_mask=attention_mask)
    out = attn.processor.attend_qkv(attn, ln_modulate_into(qkv_layer, ln, x, shift, scale), attention_mask)
    return attn.to_out[1](attn.to_out[0](out))


def _fast_block_forward(block, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                        timestep, class_labels):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _adaln_chunks(block, hidden_states, timestep,
                                                                                  class_labels)
    zero = block.norm_type == "ada_norm_zero"
    ln1, ln2 = (block.norm1.norm, block.norm3) if zero else (block.norm1, block.norm2)
    attn_output = _self_attention(block.attn1, ln1, hidden_states, shift_msa, scale_msa, attention_mask)
    hidden_states = gate_msa * attn_output + hidden_states
    if block.attn2 is not None:  # PixArt: cross-attention on the un-normalized stream, per layer
        hidden_states = block.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    attention_mask=encoder_attention_mask) + hidden_states
    ff_output = modulated_feed_forward(block.ff, ln2, hidden_states, shift_mlp, scale_mlp)
    return gate_mlp * ff_output + hidden_states


def _make_fast_class():
    from diffusers.models.attention import BasicTransformerBlock

    class FastBasicTransformerBlock(BasicTransformerBlock):
        """A BasicTransformerBlock (same modules, parameters and state dict) whose adaLN forward runs
        the fused quantized path of this module's docstring; diffusers' forward otherwise."""
        dtq_fast_block = True

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                    added_cond_kwargs=None):
            if self.training or self._chunk_size is not None or cross_attention_kwargs or hidden_states.ndim != 3:
                return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                       timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
            return _fast_block_forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                       encoder_attention_mask, timestep, class_labels)

    FastBasicTransformerBlock.__module__ = __name__
    FastBasicTransformerBlock.__qualname__ = "FastBasicTransformerBlock"
    return FastBasicTransformerBlock


_FAST_CLASS = None


def fast_block_class():
    """The BasicTransformerBlock subclass the rewrite swaps in (built on first use: diffusers is optional)."""
    global _FAST_CLASS
    if _FAST_CLASS is None:
        _FAST_CLASS = _make_fast_class()
    return _FAST_CLASS


def __getattr__(name: str):
    if name == "FastBasicTransformerBlock":  # pickle finds the class by this name
        return fast_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rewrite_blocks(model: torch.nn.Module) -> list[str]:
    """Swap the class of every transformer block the fast path recognizes (modules and state dict stay
    as they are): BasicTransformerBlock here, SD3 / Flux blocks in nn/fused_blocks.py; returns their
    paths. Other blocks keep the per-layer path, logged per reason."""
    from diffusers.models.attention import BasicTransformerBlock
    from .fused_blocks import fast_class_for
    done, kept = {}, {}
    for name, m in model.named_modules():
        is_block = isinstance(m, BasicTransformerBlock) or type(m).__name__.endswith("TransformerBlock")
        if not is_block or getattr(m, "dtq_fast_block", False):
            continue
        if isinstance(m, BasicTransformerBlock):
            reason = _block_obstacle(m)
            fast = fast_block_class() if reason is None else None
        else:
            fast, reason = fast_class_for(m)
        if fast is None:
            kept.setdefault(reason, []).append(name)
        else:
            done.setdefault(type(m).__name__, []).append(name)
            m.__class__ = fast
    for reason, names in kept.items():
        log.info("fast block path: %d blocks keep the per-layer path (%s), e.g. %s", len(names), reason, names[0])
    if done:
        log.info("fast block path: %s run LN-modulate-quantize into the fused QKV (and fc1 / proj_mlp), "
                 "GELU-quantize into fc2", ", ".join(f"{len(n)} {cls}" for cls, n in done.items()))
    return [n for names in done.values() for n in names]


def apply_fast_path(model: torch.nn.Module) -> dict[str, list[str]]:
    """QKV fusion, then the block rewrite (what dtq.quantize does by default); returns the fusions."""
    fused = fuse_qkv(model)
    rewrite_blocks(model)
    return fused
