"""LoRA adapters on quantized layers: a low-rank floating-point side branch next to the packed GEMM.

A LoRA adapter changes a linear layer to y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ, with A [r, K] and B [N, r]
(PEFT's lora_A / lora_B weights; scale = alpha / r). On a QuantLinear the base term keeps running on
the packed weights through the integer kernels; the branch is two small floating-point matmuls on the
layer's original input (before any smoothing or rotation the base path applies), so the quantized
weights are never dequantized and any number of adapters can be added and removed.

Folding an adapter into the weights is not free on a quantized layer: W + scale·B·A has to be
quantized again (a second rounding, and the static activation tables were calibrated without it).
`fused_with_lora` does exactly that and returns a new QuantLinear; the side branch stays exact.

On a model whose q/k/v were fused into one `to_qkv` layer (nn/fused.py, dtq.quantize's default), an
adapter file still names to_q / to_k / to_v: `apply_lora` places each member's adapter on the member's
output rows of the fused layer, as one branch per fused layer and adapter name: A = the members' A
stacked [Σr, K], B block-diagonal [N, Σr] with each member's scale folded into its block. The output
equals the per-layer adapters' up to float rounding; removing the adapter removes all of it.

Adapters are runtime state: they are not part of the quantized checkpoint (save the adapter file
separately, as diffusers does), and they move with the layer across devices.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

log = logging.getLogger("dtq_kernels.nn")


class LoraBranch(torch.nn.Module):
    """scale·(x·Aᵀ)·Bᵀ; A [r, K] and B [N, r] kept in the dtype they were given."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("A", A.detach().clone(), persistent=False)
        self.register_buffer("B", B.detach().clone(), persistent=False)
        self.scale = float(scale)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, scale={self.scale:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale·B·A [N, K] in fp32: what the adapter adds to the weight."""
        return self.scale * (self.B.float() @ self.A.float())


def check_lora(A: torch.Tensor, B: torch.Tensor, scale: float, in_features: int, out_features: int) -> None:
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
            raise ValueError(f"LoRA {name} must be a 2-D floating-point tensor, got "
                             f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (tuple(t.shape), t.dtype)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"LoRA {name} contains non-finite values")
    if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA shapes must be A [r, {in_features}] and B [{out_features}, r], got A "
                         f"{tuple(A.shape)} and B {tuple(B.shape)}")
    if not isinstance(scale, (int, float)) or scale != scale:
        raise ValueError(f"LoRA scale must be a number, got {scale!r}")


# PEFT / diffusers adapter files: "<module>.lora_A.weight" / "<module>.lora_B.weight" (optionally with
# an adapter name "<module>.lora_A.<name>.weight"), the module path possibly prefixed with "transformer.";
# kohya-style "<module>.lora_down.weight" / "lora_up" with an optional "<module>.alpha".
_KEY = re.compile(r"^(?:transformer\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")
_ALPHA = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.alpha$")


def parse_lora_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, alpha / r or 1)} from a PEFT / diffusers / kohya LoRA state dict."""
    parts: dict[str, dict] = {}
    for key, t in state_dict.items():
        m = _KEY.match(key)
        if m:
            kind = "A" if m["kind"] in ("lora_A", "lora_down") else "B"
            parts.setdefault(m["module"], {})[kind] = t
            continue
        m = _ALPHA.match(key)
        if m:
            parts.setdefault(m["module"], {})["alpha"] = float(t)
            continue
        raise ValueError(f"LoRA state dict key {key!r} is not a lora_A / lora_B (or lora_down / lora_up / alpha) "
                         "weight")
    out = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise ValueError(f"LoRA for {module} lacks its {'A (down)' if 'A' not in p else 'B (up)'} matrix")
        rank = p["A"].shape[0]
        out[module] = (p["A"], p["B"], p["alpha"] / rank if "alpha" in p else 1.0)
    return out


def _fused_members(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """{member path: (fused layer path, first output row, width)} from model.dtq_fused (nn/fused.py)."""
    out = {}
    for fused, widths in (getattr(model, "dtq_fused", None) or {}).items():
        row = 0
        for member, width in widths.items():
            out[member] = (fused, row, int(width))
            row += int(width)
    return out


def _stack_member_adapters(fused: torch.nn.Module, parts: list[tuple[int, torch.Tensor, torch.Tensor, float]]):
    """One branch (A, B, scale 1) on the fused layer equal to the members' adapters on their rows:
    parts [(first row, A [r, K], B [width, r], scale)] -> A [Σr, K], B [N, Σr] block-diagonal."""
    A = torch.cat([a.float() for _, a, _, _ in parts], 0)
    B = torch.zeros(fused.out_features, A.shape[0])
    col = 0
    for row, a, b, s in parts:
        B[row:row + b.shape[0], col:col + a.shape[0]] = s * b.float()
        col += a.shape[0]
    return A, B


def apply_lora(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], scale: float = 1.0,
               name: str = "default") -> dict[str, str]:
    """Add a LoRA adapter (PEFT / diffusers / kohya state dict, e.g. safetensors.torch.load_file of an
    adapter file) to a model quantized with dtq: a side branch on every QuantLinear it names; layers
    kept in floating point (nn.Linear) get the low-rank update merged into their weight, which is exact
    for them but cannot be removed again. Adapters for members of a fused layer (to_q / to_k / to_v of
    a `to_qkv`) become one branch on the fused layer's rows (module docstring). Everything is checked
    before anything changes. Returns {module path: "branch" | "merged"}."""
    from .linear import QuantLinear, StepGroupQuantLinear
    adapters = parse_lora_state_dict(state_dict)
    modules = dict(model.named_modules())
    members = _fused_members(model)
    plan, on_fused = {}, {}
    for path, (A, B, s) in adapters.items():
        mod = modules.get(path)
        if mod is None and path in members:  # a member of a fused layer: its rows of that layer
            fused_path, row, width = members[path]
            fused = modules[fused_path]
            check_lora(A, B, s * scale, fused.in_features, width)
            if name in fused.lora:
                raise ValueError(f"{fused_path} (fused {path}) already has a LoRA adapter named {name!r}: "
                                 "remove_lora it first")
            on_fused.setdefault(fused_path, []).append((path, row, A, B, s * scale))
            continue
        if isinstance(mod, StepGroupQuantLinear):
            targets = list(mod.variants)
        elif isinstance(mod, (QuantLinear, torch.nn.Linear)):
            targets = [mod]
        else:
            found = "missing" if mod is None else type(mod).__name__
            raise ValueError(f"LoRA names {path!r}, which is not a linear layer of this model ({found})")
        for t in targets:
            check_lora(A, B, s * scale, t.in_features, t.out_features)
            if isinstance(t, QuantLinear) and name in t.lora:
                raise ValueError(f"{path} already has a LoRA adapter named {name!r}: remove_lora it first")
        plan[path] = (targets, A, B, s * scale)
    done = {}
    for fused_path, parts in on_fused.items():
        fused = modules[fused_path]
        A, B = _stack_member_adapters(fused, [(row, a, b, s) for _, row, a, b, s in parts])
        fused.add_lora(A, B, 1.0, name=name)
        done.update({path: "branch" for path, *_ in parts})
        log.info("LoRA %s: %s on their rows of the fused %s", name, ", ".join(p for p, *_ in parts), fused_path)
    for path, (targets, A, B, s) in plan.items():
        for t in targets:
            if isinstance(t, QuantLinear):
                t.add_lora(A, B, s, name=name)
                done[path] = "branch"
            else:
                with torch.no_grad():
                    t.weight += (s * (B.float() @ A.float())).to(t.weight)
                done[path] = "merged"
    merged = [p for p, how in done.items() if how == "merged"]
    if merged:
        log.info("LoRA %s: merged into %d floating-point layers (e.g. %s)", name, len(merged), merged[0])
    return done
