"""Equivalent per-input-channel transforms and where their division goes (docs/methods.md).

X·Wᵀ = (X·diag(m)⁻¹)·(W·diag(m))ᵀ for any positive m: PTQ4DiT's channel salience balancing,
SmoothQuant's smoothing and DilateQuant's weight dilation all pick an m per input channel, multiply the
weight columns by it offline, and divide the layer's input by it. The division is folded OFFLINE into
the op that produces the input whenever that op is linear in it, so inference runs the plain kernels:

* q/k/v and fc1 of a DiT block with adaLN-zero (diffusers BasicTransformerBlock, norm_type
  "ada_norm_zero"): the input is h = LN(x)·(1+γ)+β with (β, γ) chunks of the FP adaLN linear's output
  (shift_msa, scale_msa = chunks 0, 1 for attention; shift_mlp, scale_mlp = chunks 3, 4 for the MLP).
  h/m needs (1+γ') = (1+γ)/m and β' = β/m: rows of the adaLN weight divided by m, the γ bias
  b_γ' = b_γ/m + (1/m − 1), the β bias b_β' = b_β/m. Exact for every condition (class, timestep).
* the attention out-projection: its input is concat_heads(P·V), linear in V per channel, so the rows
  of W_v and b_v are divided by m (attention without a joint text stream only).

Where no fold applies (PixArt's adaLN-single shares its γ across blocks; post-GELU inputs; joint
attention) the layer gets a smoothing vector instead (LinearQuantSpec.smooth: the division is fused
into the activation quantizer, the multiplication folded into the weight by QuantLinear).

q, k and v read one input, so they are balanced as ONE group: one m from the concatenated weight
[W_q; W_k; W_v] (their fused GEMM needs one activation quantization anyway). The out-projection group
is balanced first: its fold scales the rows of W_v, which the qkv group's factor then sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..formats import get_format
from ..nn.spec import LinearQuantSpec
from ..plan import LayerPlan, QuantPlan
from .search import LAMBDAS, delta0, fake_quant_int, search_linear
from .tgq import fill_unvisited

ADALN_CHUNKS = {"qkv": (0, 1), "fc1": (3, 4)}  # (shift, scale) chunk of AdaLayerNormZero's 6·D output
_ORDER = {"attn_out": 0}  # groups whose fold touches another group's weights go first


@dataclass
class InputGroup:
    """Quantized linear layers that read the same input tensor (one m, one activation quantizer)."""

    key: str
    role: str
    layers: list[str]


def input_groups(adapter, layers) -> list[InputGroup]:
    """The layers grouped by shared input: q/k/v of one attention (and one stream) together, every
    other layer alone; out-projections first (see the module docstring)."""
    groups: dict[str, InputGroup] = {}
    for name in layers:
        role = adapter.role(name)
        if role == "qkv":
            parent, leaf = name.rsplit(".", 1)
            key = f"{parent}.{'add_qkv' if leaf.startswith('add_') else 'qkv'}"
        else:
            key = name
        groups.setdefault(key, InputGroup(key, role, [])).layers.append(name)
    return sorted(groups.values(), key=lambda g: _ORDER.get(g.role, 1))


def _adaln_zero_block(model: torch.nn.Module, block_path: str):
    try:
        block = model.get_submodule(block_path)
    except AttributeError:
        return None
    norm1 = getattr(block, "norm1", None)
    lin = getattr(norm1, "linear", None)
    if (getattr(block, "norm_type", None) != "ada_norm_zero" or getattr(block, "pos_embed", None) is not None
            or getattr(block, "only_cross_attention", False) or not isinstance(lin, torch.nn.Linear)
            or lin.out_features % 6):
        return None
    return block


def fold_target(model: torch.nn.Module, group: InputGroup) -> tuple | None:
    """Where this group's input division folds: ("adaln", linear path, shift chunk, scale chunk),
    ("v_rows", V projection path), or None (a smoothing vector is needed)."""
    first = group.layers[0]
    if group.role == "qkv" and ".attn1." in first and group.key.endswith(".qkv"):
        block_path = first.split(".attn1.")[0]
        if _adaln_zero_block(model, block_path) is not None:
            return ("adaln", f"{block_path}.norm1.linear", *ADALN_CHUNKS["qkv"])
    if group.role == "fc1" and first.endswith(".ff.net.0.proj"):
        block_path = first[: -len(".ff.net.0.proj")]
        if _adaln_zero_block(model, block_path) is not None:
            return ("adaln", f"{block_path}.norm1.linear", *ADALN_CHUNKS["fc1"])
    if group.role == "attn_out" and first.endswith(".to_out.0"):
        attn_path = first[: -len(".to_out.0")]
        attn = model.get_submodule(attn_path)
        to_v = getattr(attn, "to_v", None)
        if isinstance(to_v, torch.nn.Linear) and getattr(attn, "add_v_proj", None) is None \
                and to_v.out_features == model.get_submodule(first).in_features:
            return ("v_rows", f"{attn_path}.to_v")
    return None


class _Params:
    """New values of model parameters (fp32 CPU copies, made on first touch)."""

    def __init__(self, model: torch.nn.Module):
        self._params = dict(model.named_parameters())
        self.values: dict[str, torch.Tensor] = {}

    def get(self, path: str) -> torch.Tensor:
        if path not in self.values:
            self.values[path] = self._params[path].detach().float().cpu().clone()
        return self.values[path]

    def peek(self, path: str) -> torch.Tensor:
        return self.values[path] if path in self.values else self._params[path].detach().float().cpu()

    def has(self, path: str) -> bool:
        return path in self._params


@dataclass
class Balanced:
    """The outcome of balancing: new parameter values (reparam), smoothing vectors of the layers whose
    division could not be folded, and the factor m and fold target of every balanced group."""

    reparam: dict[str, torch.Tensor] = field(default_factory=dict)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    folded_into: dict[str, str | None] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # weight each layer is quantized from

    def to_plan(self, plan: QuantPlan) -> None:
        for path, value in self.reparam.items():
            plan.tensors[path] = value
        plan.reparam = sorted(self.reparam)
        for name, s in self.smooth.items():
            plan.tensors[f"{name}.smooth"] = s


FactorFn = Callable[[InputGroup, torch.Tensor], "torch.Tensor | None"]


def _fold_adaln(params: _Params, path: str, shift_chunk: int, scale_chunk: int, m: torch.Tensor) -> None:
    w, d = params.get(f"{path}.weight"), m.numel()
    inv = (1.0 / m.double())
    for chunk in (shift_chunk, scale_chunk):
        rows = slice(chunk * d, (chunk + 1) * d)
        w[rows] = (w[rows].double() * inv[:, None]).float()
    if params.has(f"{path}.bias"):
        b = params.get(f"{path}.bias")
        sh, sc = slice(shift_chunk * d, (shift_chunk + 1) * d), slice(scale_chunk * d, (scale_chunk + 1) * d)
        b[sh] = (b[sh].double() * inv).float()
        b[sc] = (b[sc].double() * inv + (inv - 1)).float()  # (1 + γ') = (1 + γ)/m
    elif not torch.allclose(m, torch.ones_like(m)):
        raise ValueError(f"{path} has no bias: (1 + γ)/m cannot be folded into it")


def balance(model: torch.nn.Module, groups: list[InputGroup], factor_fn: FactorFn, fold: bool = True) -> Balanced:
    """Apply factor_fn(group, current concatenated weight [ΣN, K]) -> m [K] (or None: leave the group
    alone) to every group in order; fold 1/m upstream where possible (fold=False: always smooth)."""
    params, out = _Params(model), Balanced()
    for group in groups:
        w = torch.cat([params.peek(f"{n}.weight") for n in group.layers])
        m = factor_fn(group, w)
        if m is None:
            continue
        m = m.float().cpu()
        if m.shape != (w.shape[1],) or not bool(torch.isfinite(m).all() and (m > 0).all()):
            raise ValueError(f"balancing factors of {group.key} must be {w.shape[1]} positive finite values")
        target = fold_target(model, group) if fold else None
        out.factors[group.key] = m
        out.folded_into[group.key] = None if target is None else target[1]
        if target is None:
            for n in group.layers:
                out.smooth[n] = m
            continue
        for n in group.layers:
            wn = params.get(f"{n}.weight")
            wn.copy_((wn.double() * m.double()[None, :]).float())
        if target[0] == "adaln":
            _fold_adaln(params, target[1], target[2], target[3], m)
        else:
            wv = params.get(f"{target[1]}.weight")
            wv.copy_((wv.double() / m.double()[:, None]).float())
            if params.has(f"{target[1]}.bias"):
                bv = params.get(f"{target[1]}.bias")
                bv.copy_((bv.double() / m.double()).float())
    out.reparam = params.values
    for group in groups:
        for n in group.layers:
            w = params.peek(f"{n}.weight")
            out.weights[n] = w * out.smooth[n][None, :] if n in out.smooth else w
    return out


def input_factor(bal: Balanced, group: InputGroup) -> torch.Tensor | None:
    """The divisor the group's input sees after balancing (None: unchanged)."""
    return bal.factors.get(group.key)


def apply_reparam(model: torch.nn.Module, reparam: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Write re-parameterized values into `model` in place (for FP equivalence checks)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path, value in reparam.items():
            params[path].copy_(value.to(params[path].device, params[path].dtype))
    return model


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two vectors (ties ranked by position)."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


# --------------------------------------------------------------------- static scales of a balanced group

def search_static_group(stats, group: InputGroup, bal: Balanced, weight_fmt: str, act_fmt: str,
                        time_groups: int, rounds: int = 3, out_weights: list | None = None):
    """TQ-DiT's alternating output-MSE search (search.search_linear) on the balanced rows X/m and the
    balanced weights of a whole input group: per-output-channel weight clips of each layer, and ONE
    static per-tensor activation scale per time group shared by the group. Returns
    ({layer: clips list}, act table [G], per-group errors)."""
    st = stats.layers[group.layers[0]]
    if not bool(st.visited.any()):
        raise ValueError(f"layer {group.layers[0]!r} never ran during calibration: the calibration forwards do "
                         "not reach it, so it has no activation statistics")
    m = input_factor(bal, group)
    bits = get_format(act_fmt).bits
    rows = []
    for g in range(time_groups):
        if not st.visited[g]:
            rows.append(None)
            continue
        r = st.group_rows(g)
        rows.append(r / m if m is not None else r)
    absmax = st.chan_absmax / m if m is not None else st.chan_absmax
    init = [delta0(float(absmax[g].max()), bits) if st.visited[g] else None for g in range(time_groups)]
    cands = [d * LAMBDAS if d is not None else None for d in init]
    w = torch.cat([bal.weights[n] for n in group.layers])
    clips, act, errs = search_linear(rows, w, weight_fmt, cands, lambda x, c: fake_quant_int(x, c, bits), init,
                                     rounds, out_weights=out_weights)
    table = fill_unvisited(torch.tensor([a if a is not None else 0.0 for a in act]), st.visited)
    per_layer, start = {}, 0
    for n in group.layers:
        rows_n = bal.weights[n].shape[0]
        per_layer[n] = [round(c, 6) for c in clips[start:start + rows_n].tolist()]
        start += rows_n
    return per_layer, table.tolist(), errs


def static_group_plans(stats, groups, bal: Balanced, plan: QuantPlan, weight_fmt: str, act_fmt: str,
                       time_groups: int, note: str, rounds: int = 3) -> None:
    """LayerPlans for every layer of `groups`: static per-time-group activations, searched clips."""
    for group in groups:
        clips, table, errs = search_static_group(stats, group, bal, weight_fmt, act_fmt, time_groups, rounds)
        smooth = any(n in bal.smooth for n in group.layers)
        spec = LinearQuantSpec(weight=weight_fmt, act=act_fmt, act_mode="static", time_groups=time_groups,
                               smooth=smooth)
        worst = max(e for e in errs if e == e)
        for n in group.layers:
            plan.layers[n] = LayerPlan(spec, act_scales=table, weight_clip=clips[n], note=f"{note} mse={worst:.3g}")
