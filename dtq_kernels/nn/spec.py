"""LinearQuantSpec: how one linear layer is quantized (docs/formats.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..formats import TWO_REGION_MODES, get_format

ACT_MODES = ("dynamic", "static", "two_region")
WEIGHT_FORMATS = ("int8", "int6", "int4", "fp8_e4m3", "fp4_e2m1", "fp4_e1m2", "fp4_e3m0")
ACT_FORMATS = ("int8", "int6", "int4", "fp8_e4m3", "fp4_e2m1", "fp4_e1m2", "fp4_e3m0")


@dataclass(frozen=True)
class LinearQuantSpec:
    """Weight format (+ optional group size along K) and activation format / mode of a linear layer.

    act=None means weight-only (e.g. W4A16). act_mode:
      "dynamic"    per-token scales computed in the kernel each call;
      "static"     one per-tensor scale per time group (a table [time_groups]);
      "two_region" MRQ codes (docs/formats.md, docs/methods.md): a table [time_groups, 2] of (c_pos, c_neg), with
                   two_region_mode "sign" (post-GELU inputs) or "split" (post-softmax inputs).
    smooth / rotate: a per-channel smoothing vector divides the input (folded into W), and an online
    Hadamard rotation of the input (W rotated offline) — both fused into the activation quantizer.
    FP4 activations are quantized dynamically per token in blocks of group_size, and so are INT4
    activations of a W4A4 spec (4-bit weights, dynamic mode, group_size set): see act_block_size.
    allow_simulated: run the layer on CUDA even when no kernel serves the spec, by the simulated
    dequant-matmul path (see nn/linear.py PATHS); without it (or DTQ_ALLOW_SIMULATED=1) such a layer
    raises on CUDA tensors. It changes no numbers, only whether the slow path may run.
    """

    weight: str = "int8"
    act: str | None = "int8"
    act_mode: str = "dynamic"
    group_size: int | None = None
    time_groups: int = 1
    weight_symmetric: bool = True
    two_region_mode: str | None = None
    smooth: bool = False
    rotate: bool = False
    allow_simulated: bool = False

    def __post_init__(self):
        if self.weight not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {self.weight!r} not supported; choose from {WEIGHT_FORMATS}")
        if self.act is not None and self.act not in ACT_FORMATS:
            raise ValueError(f"activation format {self.act!r} not supported; choose from {ACT_FORMATS} or None")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"act_mode {self.act_mode!r} not one of {ACT_MODES}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 16):
            raise ValueError(f"group_size must be a positive multiple of 16, got {self.group_size}")
        if self.time_groups < 1:
            raise ValueError(f"time_groups must be >= 1, got {self.time_groups}")
        if self.act_mode == "two_region":
            if self.two_region_mode not in TWO_REGION_MODES:
                raise ValueError(f"two_region act_mode needs two_region_mode in {TWO_REGION_MODES}")
            if self.act is None or not get_format(self.act).is_int:
                raise ValueError("two_region activations need an integer act format")
        if self.act is None and (self.smooth or self.rotate or self.act_mode != "dynamic"):
            raise ValueError("weight-only specs (act=None) take no activation mode, smoothing or rotation")
        if self.act is not None and get_format(self.act).kind == "fp4":
            if self.act_mode != "dynamic" or self.group_size is None:
                raise ValueError("FP4 activations are quantized dynamically in blocks: set group_size")
        if not self.weight_symmetric and not get_format(self.weight).is_int:
            raise ValueError("asymmetric weights need an integer weight format")

    @property
    def act_block_size(self) -> int | None:
        """Block size along K of the dynamic activation scales, or None (one scale per token / tensor):
        group_size for FP4 activations and for W4A4 (4-bit weights and activations, dynamic)."""
        if self.act is None or self.group_size is None or self.act_mode != "dynamic":
            return None
        act, weight = get_format(self.act), get_format(self.weight)
        if act.kind == "fp4" or (act.bits == 4 and weight.bits == 4):
            return self.group_size
        return None

    @property
    def static(self) -> bool:
        return self.act is not None and self.act_mode in ("static", "two_region")

    @property
    def name(self) -> str:
        """Short label such as W8A8, W4A16-g128, W4A4(fp4_e2m1)."""
        wbits, abits = get_format(self.weight).bits, (get_format(self.act).bits if self.act else 16)
        label = f"W{wbits}A{abits}"
        if self.weight.startswith("fp") or (self.act or "").startswith("fp"):
            label += f"({self.weight}/{self.act or 'fp'})"
        return label + (f"-g{self.group_size}" if self.group_size else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LinearQuantSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LinearQuantSpec fields {sorted(unknown)}")
        return cls(**d)
