"""QuantPlan: what calibration decided, per layer; what `dtq.quantize` applies and checkpoints store.

The JSON part (formats, modes, small scale tables, which layers stay FP) is human-readable; large
per-channel vectors (smoothing factors, calibrated weights) live in `tensors` and are saved in
safetensors beside the JSON by the checkpoint module.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .nn.spec import LinearQuantSpec

PLAN_FORMAT_VERSION = 1


@dataclass
class LayerPlan:
    """One quantized linear layer.

    act_scales: None (dynamic / weight-only), [G] per time group (static), or [G][2] (two-region
    (c_pos, c_neg) per time group). weight_clip: None (absmax), a float, or a per-output-channel list
    of clip ratios applied to the weight scales. Tensor entries for the layer live in
    QuantPlan.tensors under "<layer>.<name>": "smooth" [K] (input divisor, folded into the weight),
    "weight" [N, K] (a calibrated weight replacing the module's, e.g. after balancing or GPTQ),
    "wscale" [N] or [N, K/group_size] (explicit weight scales: the grid GPTQ rounded "weight" onto).
    step_group_specs: None (`spec` at every timestep), or one spec per plan time group (length
    QuantPlan.time_groups, group g = min(floor(t·G/T), G−1)) for per-step-group precision such as
    ViDiT-Q-MP's W4/W8; they differ from `spec` only in the weight format, and `spec` is the lowest
    precision the layer uses.
    """

    spec: LinearQuantSpec
    act_scales: list | None = None
    weight_clip: float | list[float] | None = None
    note: str = ""
    step_group_specs: list[LinearQuantSpec] | None = None

    def to_dict(self) -> dict:
        sgs = None if self.step_group_specs is None else [s.to_dict() for s in self.step_group_specs]
        return {"spec": self.spec.to_dict(), "act_scales": self.act_scales, "weight_clip": self.weight_clip,
                "note": self.note, "step_group_specs": sgs}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        sgs = d.get("step_group_specs")
        return cls(spec=LinearQuantSpec.from_dict(d["spec"]), act_scales=d.get("act_scales"),
                   weight_clip=d.get("weight_clip"), note=d.get("note", ""),
                   step_group_specs=None if sgs is None else [LinearQuantSpec.from_dict(s) for s in sgs])


@dataclass
class QuantPlan:
    """recipe: its name in dtq.recipes(); model_type: the adapter that applies ("dit", "pixart", ...);
    time_groups / num_train_timesteps: the TGQ grouping g = min(floor(t·G/T), G−1) (docs/architecture.md);
    layers: module path -> LayerPlan (a Linear absent from it stays floating point);
    attention: module path -> attention quantization settings (dict), if the recipe quantizes it;
    kept_fp: Linear layers deliberately kept in floating point (for `dtq info`);
    reparam: parameters of the floating-point model that the plan replaces before quantizing (an
    equivalent re-parameterization folded offline, e.g. PTQ4DiT's channel balancing folded into the
    adaLN linear and the V projection); their new values are tensors[<parameter path>], the same key
    a quantized layer's calibrated weight ("<layer>.weight") uses.

    Attention entries (TQ-DiT recipes, calib/methods.py): {"heads": H, "head_dim": d, "bits": b,
    "time_groups": G, "qkv_mode": "static_per_head", "q_scales" / "k_scales" / "v_scales": [G][H]
    symmetric per-head scales (absmax / (2^(b−1)−1), q before the 1/√d softmax scale), "p_mode":
    "two_region", "two_region_mode": "split", "p_scales": [G][2] (c_pos, c_neg) of
    formats.quantize_two_region for the post-softmax P}.
    meta (informational, JSON): "calibration" (forwards, timesteps seen, statistics bytes),
    "act_absmax_by_t" (per-layer input absmax per calibration timestep, for plots), "smoothing"
    (ViDiT-Q: α and the measured cost of one smoothing vector per layer), "mixed_precision"."""

    recipe: str
    model_type: str
    num_train_timesteps: int = 1000
    time_groups: int = 1
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    attention: dict[str, dict] = field(default_factory=dict)
    kept_fp: list[str] = field(default_factory=list)
    reparam: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in ("layers", "tensors")}
        d["layers"] = {name: lp.to_dict() for name, lp in self.layers.items()}
        d["tensor_names"] = sorted(self.tensors)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, tensors: dict[str, torch.Tensor] | None = None) -> "QuantPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"quantization plan is not valid JSON: {e}") from None
        version = d.get("version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(f"quantization plan format version {version!r} is not supported "
                             f"(this dtq_kernels reads version {PLAN_FORMAT_VERSION})")
        tensors = dict(tensors or {})
        missing = set(d.pop("tensor_names", [])) - set(tensors)
        if missing:
            raise ValueError(f"quantization plan names tensors that are missing: {sorted(missing)[:5]}")
        layers = {name: LayerPlan.from_dict(lp) for name, lp in d.pop("layers").items()}
        unknown = set(d.get("reparam", [])) - set(tensors)
        if unknown:
            raise ValueError(f"quantization plan re-parameterizes {sorted(unknown)[:5]} without their values")
        return cls(**d, layers=layers, tensors=tensors)


def uniform_plan(model: torch.nn.Module, spec: LinearQuantSpec, act_scales: list | None = None,
                 time_groups: int = 1, recipe: str = "uniform") -> QuantPlan:
    """Every Linear the model's adapter quantizes gets the same spec (and static table), with no
    calibration: for speed and memory measurements, and tests, where the values do not matter."""
    from .models.adapters import get_adapter
    adapter = get_adapter(model)
    layers = {n: LayerPlan(spec, act_scales) for n in adapter.quantizable_linears(model)}
    return QuantPlan(recipe=recipe, model_type=adapter.model_type, time_groups=time_groups, layers=layers,
                     kept_fp=adapter.kept_fp(model))
