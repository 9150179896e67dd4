"""Model adapters: what dtq needs to know about each diffusers transformer.

Which Linear layers are quantized and which stay floating point (docs/methods.md, "Kept in floating point": adaLN,
timestep/label/caption embedders, patch embedding, final layer), the role of each quantized layer (the
calibration methods treat qkv, attention out-proj, fc1 and the post-GELU fc2 differently), where the
timestep comes from in forward(), and how it maps onto the 0..T training timesteps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# (suffix of the module path, role) — the first match wins. SD3/Flux joint attention: the image stream
# (attn.to_*) and the text stream (attn.add_*_proj, attn.to_add_out) attend together, so both are
# "qkv" / "attn_out"; ff_context is the text stream's MLP. Flux single blocks: proj_mlp feeds a GELU
# (fc1); proj_out reads [attention output, GELU(mlp)] concatenated, so it is no pure post-GELU input.
# to_qkv / to_added_qkv: q/k/v fused after quantization (nn/fused.py).
_ROLES = (("attn1.to_q", "qkv"), ("attn1.to_k", "qkv"), ("attn1.to_v", "qkv"), ("attn1.to_qkv", "qkv"),
          ("attn1.to_out.0", "attn_out"),
          ("attn2.to_q", "cross_q"), ("attn2.to_k", "cross_kv"), ("attn2.to_v", "cross_kv"),
          ("attn2.to_out.0", "attn_out"), ("ff.net.0.proj", "fc1"), ("ff.net.2", "fc2"),
          ("attn.to_q", "qkv"), ("attn.to_k", "qkv"), ("attn.to_v", "qkv"), ("attn.to_qkv", "qkv"),
          ("attn.to_added_qkv", "qkv"), ("attn.add_q_proj", "qkv"),
          ("attn.add_k_proj", "qkv"), ("attn.add_v_proj", "qkv"), ("attn.to_out.0", "attn_out"),
          ("attn.to_add_out", "attn_out"), ("ff_context.net.0.proj", "fc1"), ("ff_context.net.2", "fc2"),
          ("proj_mlp", "fc1"), ("proj_out", "attn_out_mlp"))


@dataclass(frozen=True)
class ModelAdapter:
    model_type: str
    class_name: str
    timestep_arg_index: int      # position of `timestep` in forward(*args)
    quantized_pattern: str       # regex over module paths of the Linear layers that get quantized
    num_train_timesteps: int = 1000
    flow_matching: bool = False  # timestep given as sigma in [0, 1]: t = sigma · T

    def quantizable_linears(self, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        pat = re.compile(self.quantized_pattern)
        return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pat.fullmatch(n)}

    def kept_fp(self, model: torch.nn.Module) -> list[str]:
        quantized = self.quantizable_linears(model)
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]

    @staticmethod
    def role(name: str) -> str:
        for suffix, role in _ROLES:
            if name.endswith(suffix):
                return role
        return "other"

    def timestep(self, args: tuple, kwargs: dict):
        """The raw timestep argument of a forward call (tensor or number), or None if absent."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[self.timestep_arg_index] if len(args) > self.timestep_arg_index else None

    def train_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep on the 0..num_train_timesteps scale that time groups are defined on."""
        return t * self.num_train_timesteps if self.flow_matching else t

    def attention_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """diffusers `Attention` modules (the quantized attention processor's hook points, and what
        attention calibration covers). Flux's `FluxAttention` has its own processor interface and is not
        listed: it gets dynamic quantized attention only (nn.attention.QuantFluxAttnProcessor)."""
        from diffusers.models.attention_processor import Attention
        return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


_BLOCK_LINEARS = r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"

_JOINT_LINEARS = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|"
                  r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))")
_FLUX_SINGLE_LINEARS = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"

ADAPTERS = {
    # forward(hidden_states, timestep, class_labels, ...); adaLN (norm1.linear) and its per-block
    # embedders, pos_embed and proj_out_1/2 stay FP
    "DiTTransformer2DModel": ModelAdapter("dit", "DiTTransformer2DModel", 1, _BLOCK_LINEARS),
    # forward(hidden_states, encoder_hidden_states, timestep, ...); adaln_single, caption_projection,
    # proj_out stay FP
    "PixArtTransformer2DModel": ModelAdapter("pixart", "PixArtTransformer2DModel", 2, _BLOCK_LINEARS),
    # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...). The SD3 pipeline
    # passes t = σ·1000 already (scheduler timesteps), so no mapping. adaLN (norm1/norm1_context/
    # norm_out .linear), time_text_embed, context_embedder, pos_embed and proj_out stay FP.
    "SD3Transformer2DModel": ModelAdapter("sd3", "SD3Transformer2DModel", 3, _JOINT_LINEARS),
    # same argument order; the Flux pipeline passes σ in [0, 1] (timestep / 1000): t = σ·T. Also FP:
    # x_embedder and the single blocks' norm.linear.
    "FluxTransformer2DModel": ModelAdapter("flux", "FluxTransformer2DModel", 3,
                                           f"({_JOINT_LINEARS})|({_FLUX_SINGLE_LINEARS})", flow_matching=True),
}


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise TypeError(f"no dtq model adapter for {type(model).__name__}; supported: {', '.join(ADAPTERS)}")
