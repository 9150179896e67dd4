"""HQ-DiT (arXiv 2405.19751; docs/methods.md): FP4 W4A4 with a per-layer format choice, Hadamard
rotation and GPTQ rounding onto the chosen FP4 grid.

Per input group (q/k/v share one input, so one activation format and one weight format for the group,
the unit a fused QKV GEMM runs; every other layer alone):
1. Rotation: X·H and W·H with H the orthonormal Hadamard matrix of the input width (hadamard.py);
   XWᵀ = (XH)(WH)ᵀ. Activations are rotated online inside the activation quantizer (spec.rotate), the
   weights offline. Widths without a Hadamard construction stay unrotated.
2. Activation format: FP4 activations are quantized dynamically per token in blocks of group_size
   (absmax block scale, the kernels' scheme). Among E2M1 / E1M2 / E3M0 the format with the least layer
   output error ‖Q(XH)(WH)ᵀ − XWᵀ‖² on the calibration rows wins. The clip of a dynamic block scale is
   its absmax (no static activation clip: the paper's static clip has no place in a per-block dynamic
   scheme; LinearQuantSpec carries the per-layer format, which is all the choice needs).
3. Weight format and clip: for each FP4 format, per-output-channel clip ratios on TQ-DiT's λ grid
   minimizing the output error with the quantized activations (search.search_weight_clip); the format
   with the least error wins.
4. GPTQ (calib/gptq.py) rounds the rotated weights onto the chosen grid, with the block scales fixed by
   step 3, H = Hᵀ·(Σ xᵀx)·H from every calibration row. The plan stores the rounded weight (rotated back)
   and its scales ("<layer>.weight", "<layer>.wscale"), so QuantLinear keeps exactly GPTQ's codes.

The plan's specs are the standard FP4 LinearQuantSpecs (weights and activations FP4, group 32,
dynamic, rotated), which QuantLinear runs on its `w4a4_gemm` kernel path.
"""
from __future__ import annotations

import torch

from ..formats import absmax_scale, fake_quantize, quantize_weight
from ..hadamard import hadamard_matrix, supported
from ..nn.spec import LinearQuantSpec
from ..plan import LayerPlan, QuantPlan
from .balance import input_groups
from .gptq import gptq
from .search import fake_quant_weight, search_weight_clip

FP4_FORMATS = ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0")
# clip ratios searched per output channel: a coarser grid than TQ-DiT's 85 points keeps the search over
# 3 formats affordable (32-element blocks already track the local range)
WEIGHT_CLIPS = torch.linspace(0.6, 1.0, 9)


def fake_quant_act_blocks(x: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """Dynamic per-token 4-bit quantize→dequantize in blocks of group_size along K (QuantLinear's math)."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scale = absmax_scale(xb.abs().amax(-1, keepdim=True), fmt)
    return fake_quantize(xb, scale, fmt).reshape(x.shape)


def output_mse(x_hat: torch.Tensor, w_hat: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x_hat @ w_hat.T - y) ** 2).mean())


def candidate_formats(fmt: str) -> tuple[str, ...]:
    """The per-layer choice: any FP4 format when the recipe names one (HQ-DiT), else just `fmt` (the
    INT4 ablation runs the same rotation, clip search and GPTQ on the int4 grid: FP4 vs INT4 at equal bits)."""
    return FP4_FORMATS if fmt in FP4_FORMATS else (fmt,)


def choose_act_format(xr: torch.Tensor, wr: torch.Tensor, y: torch.Tensor, group_size: int,
                      formats: tuple[str, ...] = FP4_FORMATS) -> tuple[str, dict]:
    errs = {f: output_mse(fake_quant_act_blocks(xr, f, group_size), wr, y) for f in formats}
    return min(errs, key=errs.get), errs


def choose_weight_format(x_hat: torch.Tensor, wr: torch.Tensor, y: torch.Tensor, group_size: int,
                         formats: tuple[str, ...] = FP4_FORMATS):
    """(format, per-channel clips, {format: output error}) over `formats`."""
    best, errs = None, {}
    for f in formats:
        clips = search_weight_clip(x_hat, wr, y, f, group_size, WEIGHT_CLIPS)
        errs[f] = output_mse(x_hat, fake_quant_weight(wr, f, clips, group_size), y)
        if best is None or errs[f] < errs[best[0]]:
            best = (f, clips)
    return best[0], best[1], errs


def gptq_fp4(wr: torch.Tensor, gram: torch.Tensor, fmt: str, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """GPTQ onto the grid `fmt` × scale ([N] or [N, K/group_size])."""
    def round_col(col, j):
        s = scale if group_size is None else scale[:, j // group_size]
        return fake_quantize(col, s, fmt)
    return gptq(wr, gram, round_col)


def build_hqdit(recipe, stats, layers: dict, plan: QuantPlan, model: torch.nn.Module, adapter) -> None:
    gs = recipe.group_size
    report = {}
    for group in input_groups(adapter, layers):
        st = stats.layers[group.layers[0]]
        if not bool(st.visited.any()):
            raise ValueError(f"layer {group.layers[0]!r} never ran during calibration: no activation statistics")
        x = torch.cat([st.group_rows(g) for g in range(len(st.visited)) if st.visited[g]])
        w = torch.cat([layers[n].weight.detach().float().cpu() for n in group.layers])
        k = w.shape[1]
        rotate = supported(k)
        h = hadamard_matrix(k).double() if rotate else None
        xr = (x.double() @ h).float() if rotate else x
        wr = (w.double() @ h).float() if rotate else w
        y = x @ w.T
        a_fmt, a_errs = choose_act_format(xr, wr, y, gs, candidate_formats(recipe.act))
        x_hat = fake_quant_act_blocks(xr, a_fmt, gs)
        w_fmt, clips, w_errs = choose_weight_format(x_hat, wr, y, gs, candidate_formats(recipe.weight))
        qw = quantize_weight(wr, w_fmt, gs, clip_ratio=clips)
        w_rtn = fake_quant_weight(wr, w_fmt, clips, gs)
        if recipe.gptq:
            gram = st.gram if not rotate else (h.T @ st.gram @ h)
            w_q = gptq_fp4(wr, gram, w_fmt, qw.scale, gs)
        else:
            w_q = w_rtn
        err_rtn, err_q = output_mse(x_hat, w_rtn, y), output_mse(x_hat, w_q, y)
        w_back = (w_q.double() @ h.T).float() if rotate else w_q
        spec = LinearQuantSpec(weight=w_fmt, act=a_fmt, act_mode="dynamic", group_size=gs, rotate=rotate)
        start = 0
        for n in group.layers:
            rows = layers[n].out_features
            plan.tensors[f"{n}.weight"] = w_back[start:start + rows].contiguous()
            plan.tensors[f"{n}.wscale"] = qw.scale[start:start + rows].contiguous()
            start += rows
            plan.layers[n] = LayerPlan(spec, note=f"hqdit {w_fmt}/{a_fmt}" + (" gptq" if recipe.gptq else "")
                                       + f" mse={err_q:.3g}")
        report[group.key] = {"act_format": a_fmt, "weight_format": w_fmt, "rotate": rotate,
                             "act_format_mse": a_errs, "weight_format_mse": w_errs,
                             "rtn_mse": err_rtn, "gptq_mse": err_q if recipe.gptq else None}
    plan.meta["hqdit"] = {"group_size": gs, "groups": report,
                          "note": "layer output MSE on the calibration rows"}
