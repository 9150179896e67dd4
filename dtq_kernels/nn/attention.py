"""A diffusers attention processor that runs attention through dtq's quantized attention ops.

`QuantAttnProcessor` does what diffusers' AttnProcessor2_0 does (spatial/group norm, to_q/k/v, q/k
norms, to_out, residual, rescale) but computes softmax(q·kᵀ·scale)·v with
* dtq.quant_attention (mode "dynamic": INT8 Q/K per token, FP8 P·V on sm_89/90, FP16 on sm_80), or
* dtq.quant_attention_static (mode "static": per-head per-time-group scales from a calibrated plan
  entry, P uniform or two-region; the time group is read on the device from `group_idx`).
q/k/v stay in the [B, S, H, D] layout the projections give (a view, no transpose copy).

Masks: a key padding mask (bool [B, Sk] / [B, 1, Sk], or an additive float mask whose entries are 0 or
<= -1e4, which is how PixArt passes its caption mask) is served by the kernel. Anything else (a
per-query or per-head mask, a general additive bias, head dims over 128, float64) falls back to
torch SDPA, logged once per module and reason, and counted in `processor.fallbacks`.
A query whose keys are all masked gets zeros from the kernel where SDPA averages over all keys.

`QuantFluxAttnProcessor` does the same for Flux's `FluxAttention` and `QuantJointAttnProcessor` for
SD3's joint attention (dynamic mode, or "fp"; both read fused or separate projections, and the fast
blocks of nn/fused_blocks.py hand them projections computed from pre-quantized inputs).

`set_quant_attention(model, settings=None, group_idx=None)` installs processors module by module:
DiTTransformer2DModel has no set_attn_processor, and per-module installation also serves PixArt.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from .fused import ADDED_QKV, FUSED_ADDED_QKV, FUSED_QKV, QKV

log = logging.getLogger("dtq_kernels.nn.attention")

# An additive mask entry at or below this is a masked key: exp(-1e4) underflows to 0 in fp32 softmax.
MASKED_BIAS = -1e4
PROCESSOR_MODES = ("dynamic", "static", "fp")
STATIC_KEYS = ("q_scales", "k_scales", "v_scales", "p_scales", "bits", "heads")


def default_pv_format(device: torch.device) -> str:
    """FP8 P·V where the GPU has FP8 tensor cores (sm_89/90), FP16 on sm_80; CPU runs the reference,
    which emulates FP8 exactly."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "fp16"
    return "fp8_e4m3"


class QuantAttnProcessor:
    """Processor for one diffusers `Attention` module.

    mode "fp": float attention (SDPA on [B, S, H, D] views); what a module whose q/k/v were fused into
    one `to_qkv` (nn/fused.py) gets when its attention is not quantized. Every mode reads a fused
    `to_qkv` when the module has one.
    mode "dynamic": no calibration. mode "static": `static` is a plan entry (QuantPlan.attention[name]:
    heads, bits, q_scales / k_scales / v_scales [G][H], p_mode "two_region" (p_scales [G][2], split
    mode) or "uniform" (p_scales [G][1])) and `group_idx` the int32 [1] device tensor holding the time
    group, or an object with a `.group_idx` attribute (the model's TimestepTracker: its buffer object is
    replaced by model.to(device), so it is read at every call rather than captured once).
    """

    def __init__(self, mode: str = "dynamic", *, static: dict | None = None, group_idx: Any = None,
                 pv_format: str | None = None, smooth_k: bool = True, name: str = ""):
        if mode not in PROCESSOR_MODES:
            raise ValueError(f"mode must be one of {PROCESSOR_MODES}, got {mode!r}")
        if mode == "static":
            if static is None:
                raise ValueError("mode='static' needs the calibrated settings (static=plan.attention[name])")
            missing = [k for k in STATIC_KEYS if k not in static]
            if missing:
                raise ValueError(f"static attention settings for {name or 'module'} lack {missing}")
            if group_idx is None:
                raise ValueError("mode='static' needs group_idx (the model's TimestepTracker or its int32 [1] "
                                 "group tensor): static scales are per time group")
            if static.get("two_region_mode", "split") != "split":
                raise ValueError(f"post-softmax two-region mode must be 'split', got {static['two_region_mode']!r}")
            self._tables = {k: torch.tensor(static[k], dtype=torch.float32)
                            for k in ("q_scales", "k_scales", "v_scales", "p_scales")}
            self.p_mode = static.get("p_mode", "two_region")
            self.bits = int(static["bits"])
            self.heads = int(static["heads"])
        if pv_format is not None and pv_format not in ops.attention_ops.PV_FORMATS:
            raise ValueError(f"pv_format must be one of {ops.attention_ops.PV_FORMATS} or None (by GPU), "
                             f"got {pv_format!r}")
        self.mode, self.pv_format, self.smooth_k, self.name = mode, pv_format, smooth_k, name
        self._group_source = group_idx
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.fallbacks: dict[str, int] = {}

    # ------------------------------------------------------------------------------ helpers

    def _group_idx(self) -> torch.Tensor:
        src = self._group_source
        return src if isinstance(src, torch.Tensor) else src.group_idx

    def _tables_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = {k: t.to(device) for k, t in self._tables.items()}
        return self._device_tables[device]

    def _fallback(self, reason: str) -> None:
        if reason not in self.fallbacks:
            log.warning("dtq quantized attention %s: falling back to SDPA: %s", self.name or "", reason)
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    @staticmethod
    def key_padding_mask(mask: torch.Tensor | None, batch: int, keys: int) -> tuple[torch.Tensor | None, str | None]:
        """(bool [B, Sk] mask or None, None) when the kernel can serve `mask`, else (None, reason).
        A float mask costs one device sync here (its values decide whether it is a padding mask)."""
        if mask is None:
            return None, None
        m = mask
        if m.dim() == 3 and m.shape[1] == 1:
            m = m[:, 0]
        if m.dim() != 2 or tuple(m.shape) != (batch, keys):
            return None, f"attention mask of shape {tuple(mask.shape)} is not a key padding mask [B, 1, Sk]"
        if m.dtype == torch.bool:
            return m.contiguous(), None
        keep = m == 0
        if not bool((keep | (m <= MASKED_BIAS)).all()):
            return None, "additive attention mask holds values other than 0 and <= -1e4 (a bias, not padding)"
        return keep.contiguous(), None

    def _attend(self, attn, query, key, value, mask) -> torch.Tensor:
        """query [B, Sq, H, D], key / value [B, Sk, H, D] -> [B, Sq, H·D]."""
        B, Sq, H, D = query.shape
        reason, kpm = None, None
        if self.mode == "fp":
            pass  # float attention by choice, not a fallback
        elif query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reason = f"dtype {query.dtype} (the kernel takes fp16/bf16/fp32)"
        elif D > ops.attention_ops.MAX_HEAD_DIM:
            reason = f"head dim {D} > {ops.attention_ops.MAX_HEAD_DIM}"
        else:
            kpm, reason = self.key_padding_mask(mask, B, key.shape[1])
        if reason is not None or self.mode == "fp":
            if reason is not None:
                self._fallback(reason)
            sdpa_mask = mask
            if mask is not None:  # as AttnProcessor2_0 does: [B·H or B, Sq or 1, Sk] -> [B, H or 1, ., Sk]
                sdpa_mask = attn.prepare_attention_mask(mask, key.shape[1], B).view(B, attn.heads, -1, mask.shape[-1])
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 attn_mask=sdpa_mask, scale=getattr(attn, "scale", None))
            return out.transpose(1, 2).reshape(B, Sq, H * D)
        # FluxAttention has no `scale`: 1/sqrt(D), as its own processor uses
        scale = float(attn.scale) if hasattr(attn, "scale") else None
        if self.mode == "dynamic":
            out = ops.quant_attention(query, key, value, kpm, scale,
                                      self.pv_format or default_pv_format(query.device), self.smooth_k)
        else:
            if H != self.heads:
                raise ValueError(f"{self.name}: static attention settings are for {self.heads} heads, the module "
                                 f"has {H}")
            t = self._tables_on(query.device)
            out = ops.quant_attention_static(query, key, value, kpm, t["q_scales"], t["k_scales"], t["v_scales"],
                                             t["p_scales"], self._group_idx(), self.bits, self.p_mode, scale)
        return out.reshape(B, Sq, H * D)

    def attend_streams(self, attn, image: tuple, text: tuple | None = None, *, text_first: bool = False,
                       rotary: Any = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the projections of one stream, or of two streams attending together.

        image / text: (q, k, v) [B, S, H·D] each (views of a fused projection's output are fine). Each
        stream's q / k get their own norms (norm_q / norm_k; norm_added_q / norm_added_k) on the
        [B, S, H, D] view: they normalize the head dim, so this layout gives what [B, H, S, D] gives. The
        text tokens go first when `text_first` (Flux), after the image tokens otherwise (SD3); `rotary`
        (Flux's cos / sin) applies to the joint sequence. -> [B, S_image + S_text, H·D] in q's dtype."""
        streams = [(image, "norm_q", "norm_k")] + ([(text, "norm_added_q", "norm_added_k")] if text is not None else [])
        heads = []
        for qkv, norm_q, norm_k in streams:
            q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in qkv)
            if getattr(attn, norm_q, None) is not None:
                q = getattr(attn, norm_q)(q)
            if getattr(attn, norm_k, None) is not None:
                k = getattr(attn, norm_k)(k)
            heads.append((q, k, v))
        if text_first:
            heads.reverse()
        query, key, value = heads[0] if len(heads) == 1 else (torch.cat(p, dim=1) for p in zip(*heads))
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        return self._attend(attn, query, key, value, mask).to(query.dtype)

    def attend_qkv(self, attn, qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention on a fused projection's output qkv [B, S, 3·H·D] (nn/fused.py): q, k and v are
        [B, S, H, D] views of it, no copy or transpose -> [B, S, H·D] (before to_out)."""
        return self.attend_streams(attn, qkv.chunk(3, dim=-1), mask=mask)

    # ------------------------------------------------------------------ the diffusers protocol

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0] if encoder_hidden_states is None else encoder_hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        fused_qkv = getattr(attn, "to_qkv", None) if not hasattr(attn, "to_q") else None
        if fused_qkv is not None:
            if encoder_hidden_states is not None:
                raise ValueError(f"{self.name}: q/k/v are fused (self-attention), but encoder_hidden_states was given")
            hidden_states = self.attend_qkv(attn, fused_qkv(hidden_states), attention_mask)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
            hidden_states = self.attend_streams(attn, (query, key, value), mask=attention_mask)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def projections(attn, x: torch.Tensor, fused_name: str, names: tuple[str, str, str]) -> tuple:
    """(q, k, v) [B, S, H·D] of one stream: views of the fused layer's output when q/k/v were fused
    (nn/fused.py), else the three layers' outputs."""
    fused = getattr(attn, fused_name, None)
    if fused is not None and not hasattr(attn, names[0]):
        return fused(x).chunk(3, dim=-1)
    return tuple(getattr(attn, n)(x) for n in names)


class QuantFluxAttnProcessor(QuantAttnProcessor):
    """Processor for Flux's `FluxAttention` (double-stream blocks: image + text streams attending
    together; single-stream blocks): diffusers' FluxAttnProcessor (separate or fused projections,
    RMS q/k norms, text tokens first, rotary embeddings on [B, S, H, D]) with the attention itself run by
    dtq.quant_attention ("dynamic" mode; static per-head tables are not calibrated for Flux) or SDPA
    ("fp": what a Flux attention whose projections were fused gets when its attention is not quantized)."""

    def __init__(self, mode: str = "dynamic", **kwargs):
        if mode == "static":
            raise ValueError("Flux attention has no calibrated static settings: use mode='dynamic' (or 'fp')")
        super().__init__(mode, **kwargs)

    def attend_projected(self, attn, image: tuple, text: tuple | None = None, image_rotary_emb: Any = None,
                         attention_mask: torch.Tensor | None = None):
        """The processor's output from the streams' projections (q, k, v) [B, S, H·D] (the fast Flux blocks
        of nn/fused_blocks.py compute them from codes their LN-modulate made): the image stream's
        attention output [B, S, H·D] (single stream, no output projection), or (image, text) through
        to_out / to_add_out (double stream)."""
        out = self.attend_streams(attn, image, text, text_first=True, rotary=image_rotary_emb, mask=attention_mask)
        if text is None:
            return out
        n_text = text[0].shape[1]
        enc_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(enc_out.contiguous())

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        image = projections(attn, hidden_states, FUSED_QKV, QKV)
        text = None
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text = projections(attn, encoder_hidden_states, FUSED_ADDED_QKV, ADDED_QKV)
        return self.attend_projected(attn, image, text, image_rotary_emb, attention_mask)


class QuantJointAttnProcessor(QuantAttnProcessor):
    """Processor for SD3's joint attention (an `Attention` with a text stream, add_q/k/v_proj):
    diffusers' JointAttnProcessor2_0 (image tokens first, then the text tokens; optional q/k norms per
    stream; to_add_out on the text output unless context_pre_only; like it, no attention mask) with
    separate or fused projections, the attention run by dtq.quant_attention ("dynamic") or SDPA ("fp")."""

    def __init__(self, mode: str = "dynamic", **kwargs):
        if mode == "static":
            raise ValueError("joint attention has no calibrated static settings: use mode='dynamic' (or 'fp')")
        super().__init__(mode, **kwargs)

    def attend_projected(self, attn, image: tuple, text: tuple | None = None):
        """The processor's output from the streams' projections (q, k, v) [B, S, H·D]: to_out(image
        output), or (that, the text output through to_add_out unless context_pre_only)."""
        out = self.attend_streams(attn, image, text)
        n_image = image[0].shape[1]
        out, enc_out = out[:, :n_image], out[:, n_image:]
        out = attn.to_out[1](attn.to_out[0](out))
        if text is None:
            return out
        return out, (enc_out if attn.context_pre_only else attn.to_add_out(enc_out))

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if hidden_states.ndim != 3 or (encoder_hidden_states is not None and encoder_hidden_states.ndim != 3):
            raise ValueError(f"{self.name}: joint attention takes [B, S, C] inputs, got {tuple(hidden_states.shape)}")
        image = projections(attn, hidden_states, FUSED_QKV, QKV)
        text = None if encoder_hidden_states is None else \
            projections(attn, encoder_hidden_states, FUSED_ADDED_QKV, ADDED_QKV)
        return self.attend_projected(attn, image, text)


def is_joint_attention(m: torch.nn.Module) -> bool:
    """An SD3-style joint attention (diffusers sets context_pre_only True / False only there)."""
    return getattr(m, "context_pre_only", None) is not None and getattr(m, "added_kv_proj_dim", None) is not None


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention_processor import Attention
    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def flux_attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention
    except ImportError:  # a diffusers without FluxAttention
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, FluxAttention)}


def set_quant_attention(model: torch.nn.Module, settings: dict[str, dict] | None = None, group_idx: Any = None, *,
                        pv_format: str | None = None, smooth_k: bool = True) -> dict[str, QuantAttnProcessor]:
    """Install QuantAttnProcessor on the model's diffusers Attention modules, one by one; returns them.

    settings None: the dynamic processor on every Attention module (QuantJointAttnProcessor on SD3's
    joint attention, QuantFluxAttnProcessor on Flux's FluxAttention modules). settings {module path: plan entry}
    (QuantPlan.attention): the static processor on exactly those modules; the others keep their
    processor (calibration skips cross-attention, whose P depends on a caption mask it does not see).
    group_idx (static only): the int32 [1] group tensor or the TimestepTracker; defaults to the tracker
    that dtq.quantize / attach_timestep_tracker put on the model (`model.dtq_timestep`).
    """
    modules = attention_modules(model)
    flux = flux_attention_modules(model)
    if not modules and not (flux and settings is None):
        raise ValueError(f"{type(model).__name__} has no diffusers Attention modules")
    if settings is None:
        procs = {name: (QuantJointAttnProcessor if is_joint_attention(m) else QuantAttnProcessor)(
                     "dynamic", pv_format=pv_format, smooth_k=smooth_k, name=name) for name, m in modules.items()}
        procs.update({name: QuantFluxAttnProcessor("dynamic", pv_format=pv_format, smooth_k=smooth_k, name=name)
                      for name in flux})
        modules = {**modules, **flux}
    else:
        unknown = sorted(set(settings) - set(modules))
        if unknown:
            raise ValueError(f"attention settings name modules the model lacks: {unknown[:5]}")
        if group_idx is None:
            group_idx = getattr(model, "dtq_timestep", None)
            if group_idx is None:
                raise ValueError("static quantized attention needs group_idx: pass the TimestepTracker (or its "
                                 "group tensor), or call dtq.nn.attach_timestep_tracker(model, G) first")
        procs = {name: QuantAttnProcessor("static", static=entry, group_idx=group_idx, pv_format=pv_format,
                                          name=name) for name, entry in settings.items()}
        kept = sorted(set(modules) - set(procs))
        if kept:
            log.info("quantized attention: %d Attention modules keep their processor (no settings): %s",
                     len(kept), kept[:4])
    for name, proc in procs.items():
        modules[name].set_processor(proc)
    return procs
