"""Named calibration recipes: which method, which formats, which constants (docs/methods.md)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """A calibration recipe. Customize one with dataclasses.replace(get_recipe(name), ...).

    method: "rtn" (round-to-nearest baselines), "viditq", "tqdit", "ptq4dit", "smoothquant",
      "dilatequant", "hqdit" (docs/methods.md).
    weight / act: formats of LinearQuantSpec; act_mode "static" or "dynamic".
    time_groups: G of the statistics and of static activation tables (TGQ); for ViDiT-Q it is the
      number of time ranges the smoothing statistics (and mixed precision step groups) are split into.
    act_clip: static scales from "minmax" (absmax) or "percentile" (of |x|, at `percentile`).
    rows_per_group: reservoir rows per (layer, group) kept for the search objectives.
    """

    name: str
    description: str
    method: str
    weight: str
    act: str
    act_mode: str
    time_groups: int = 1
    act_clip: str = "minmax"
    percentile: float = 99.99
    rows_per_group: int = 0
    # ViDiT-Q
    smooth_alpha: float | None = None
    mixed_precision: bool = False
    mp_budget_bits: float = 6.0      # average weight bits (parameter-weighted) in the W4 step groups
    mp_w8_fraction: float = 0.25     # the first (noisiest) 25% of the timestep range runs all-W8
    # TQ-DiT
    search_rounds: int = 3
    mrq: bool = False
    objective: str = "mse"           # "mse" (output MSE) or "fisher" (diagonal-Fisher weighted output error)
    # PTQ4DiT
    ssc: bool = True                 # Spearman-ρ salience calibration (False: CSB on the all-time channel max)
    # DilateQuant
    tpq: bool = False                # one activation scale per calibration timestep (time_groups = steps)
    # HQ-DiT
    group_size: int | None = None    # block size along K of FP4 weight scales and activation blocks
    gptq: bool = True                # GPTQ error-compensating rounding (False: round to nearest)

    def __post_init__(self):
        if self.objective not in ("mse", "fisher"):
            raise ValueError(f"objective must be 'mse' or 'fisher', got {self.objective!r}")
        if self.objective == "fisher" and self.method != "tqdit":
            raise ValueError("the Fisher objective is a TQ-DiT search option (method 'tqdit')")

    @property
    def needs_stats(self) -> bool:
        return not (self.method == "viditq" and self.smooth_alpha is None)


_RECIPES = {r.name: r for r in [
    Recipe("rtn-w8a8", "round-to-nearest baseline: int8 per-channel absmax weights, int8 static "
           "per-tensor activations from the calibration min-max", "rtn", "int8", "int8", "static"),
    Recipe("rtn-w4a8", "round-to-nearest baseline: int4 per-channel absmax weights, int8 static "
           "per-tensor activations from the calibration min-max", "rtn", "int4", "int8", "static"),
    Recipe("viditq-w8a8", "ViDiT-Q W8A8: int8 per-channel weights, dynamic per-token int8 activations "
           "(no calibration data needed)", "viditq", "int8", "int8", "dynamic"),
    Recipe("viditq-w4a8", "ViDiT-Q W4A8: int4 per-channel weights, dynamic per-token int8 activations, "
           "static SmoothQuant channel balancing (alpha 0.11, EMA 0.95 channel max)", "viditq", "int4",
           "int8", "dynamic", time_groups=2, rows_per_group=64, smooth_alpha=0.11),
    Recipe("viditq-w4a8-mp", "ViDiT-Q W4A8-MP: viditq-w4a8 plus sensitivity-based W8 promotion under a "
           "6-bit average budget per step group; the first 25% of steps all W8", "viditq", "int4", "int8",
           "dynamic", time_groups=4, rows_per_group=64, smooth_alpha=0.11, mixed_precision=True),
    Recipe("tqdit-w8a8", "TQ-DiT W8A8: 10 time groups of static activation scales, multi-region "
           "post-softmax / post-GELU quantizers, output-MSE grid search of weight and activation scales",
           "tqdit", "int8", "int8", "static", time_groups=10, rows_per_group=128, mrq=True),
    Recipe("tqdit-w6a6", "TQ-DiT W6A6: as tqdit-w8a8 with 6-bit weights and activations", "tqdit",
           "int6", "int6", "static", time_groups=10, rows_per_group=128, mrq=True),
    Recipe("ptq4dit-w8a8", "PTQ4DiT W8A8: Spearman-weighted salience calibration and channel salience "
           "balancing folded into adaLN and V (plain kernels), static per-tensor int8 activations, "
           "output-MSE searched scales", "ptq4dit", "int8", "int8", "static", rows_per_group=128,
           search_rounds=1),
    Recipe("ptq4dit-w4a8", "PTQ4DiT W4A8: as ptq4dit-w8a8 with int4 per-channel weights", "ptq4dit", "int4",
           "int8", "static", rows_per_group=128, search_rounds=1),
    Recipe("smoothquant-w8a8", "SmoothQuant W8A8 baseline: alpha 0.5 smoothing of the q/k/v and fc1 inputs "
           "folded into adaLN, int8 per-channel weights, static per-tensor int8 activations (min-max)",
           "smoothquant", "int8", "int8", "static", smooth_alpha=0.5),
    Recipe("dilatequant-w4a8", "DilateQuant W4A8: range-preserving weight dilation folded into adaLN / V, "
           "one static activation scale per calibration step (TPQ), output-MSE searched scales",
           "dilatequant", "int4", "int8", "static", rows_per_group=64, search_rounds=1, tpq=True),
    Recipe("dilatequant-w6a6", "DilateQuant W6A6: as dilatequant-w4a8 with 6-bit weights and activations",
           "dilatequant", "int6", "int6", "static", rows_per_group=64, search_rounds=1, tpq=True),
    Recipe("hqdit-w4a4-fp4", "HQ-DiT FP4 W4A4: per-layer E2M1/E1M2/E3M0 choice for weights and activations, "
           "Hadamard rotation, GPTQ onto the FP4 grid, blocks of 32 (FP4 simulated until the W4A4 kernel lands)",
           "hqdit", "fp4_e2m1", "fp4_e2m1", "dynamic", rows_per_group=256, group_size=32),
]}


def recipes() -> dict[str, str]:
    """{recipe name: one-line description}."""
    return {name: r.description for name, r in _RECIPES.items()}


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    try:
        return _RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; available recipes: {', '.join(_RECIPES)}") from None
