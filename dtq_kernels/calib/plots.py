"""Diagnostic plots (PNG, matplotlib Agg) of what calibration saw and decided.

From CalibStats: activation range over timesteps (why TGQ: per-layer input absmax drifts with t) and
channel salience (why balancing: a few input channels dominate, and weights' salient channels are
elsewhere). From a QuantPlan: the same range plot from plan.meta, the static scale tables per time
group, and the mixed-precision allocation when there is one.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..plan import QuantPlan  # noqa: E402
from .stats import CalibStats  # noqa: E402

MAX_LINES = 6


def _short(name: str) -> str:
    return name.replace("transformer_blocks.", "b").replace("attn1.", "").replace("ff.net.", "ff")


def _range_over_t(by_t: dict, time_groups: int, T: int, path: Path) -> Path:
    ts = np.array(by_t["timesteps"], dtype=float)
    rows = {n: np.array([np.nan if v is None else v for v in vals], dtype=float)
            for n, vals in by_t["layers"].items()}
    drift = {n: np.nanmax(v) / max(np.nanmin(v), 1e-12) for n, v in rows.items() if np.isfinite(v).any()}
    top = sorted(drift, key=drift.get, reverse=True)[:MAX_LINES]
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    for n in top:
        ax.plot(ts, rows[n], marker="o", ms=3, label=f"{_short(n)} (×{drift[n]:.2f})")
    for g in range(1, time_groups):
        ax.axvline(g * T / time_groups, color="0.85", lw=0.8, zorder=0)
    ax.set(xlabel="diffusion timestep t", ylabel="input max |x|", yscale="log",
           title=f"Input range over timesteps (most drifting layers; grid: {time_groups} time groups)")
    ax.legend(fontsize=7)
    names = list(rows)
    mat = np.stack([rows[n] / np.nanmax(rows[n]) for n in names]) if names else np.zeros((1, 1))
    im = hm.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    hm.set(xlabel="timestep", ylabel="layer", title="max |x| / layer max")
    hm.set_xticks(range(len(ts)), [f"{t:.0f}" for t in ts], rotation=90, fontsize=6)
    hm.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=5 if len(names) > 30 else 7)
    fig.colorbar(im, ax=hm)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _salience(stats: CalibStats, path: Path) -> Path:
    act = {n: s.chan_absmax[s.visited].amax(0).numpy() for n, s in stats.layers.items() if bool(s.visited.any())}
    spread = {n: a.max() / max(np.median(a), 1e-12) for n, a in act.items()}
    top = []
    for n in sorted(spread, key=spread.get, reverse=True):  # q/k/v share one input: show it once
        if len(top) < 4 and not any(np.array_equal(act[n], act[m]) for m in top):
            top.append(n)
    fig, axes = plt.subplots(len(top), 1, figsize=(11, 2.4 * len(top)), squeeze=False)
    for ax, n in zip(axes[:, 0], top):
        k = np.arange(len(act[n]))
        ax.plot(k, act[n], lw=0.8, label="activation max |X_j|")
        ax.plot(k, stats.layers[n].w_chan_absmax.numpy(), lw=0.8, label="weight max |W_j|", alpha=0.8)
        ax.set(yscale="log", ylabel="max |·|",
               title=f"{n}: channel salience (activation max/median ×{spread[n]:.1f})")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("input channel j")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scale_tables(plan: QuantPlan, path: Path) -> Path | None:
    tables = {}
    for n, lp in plan.layers.items():
        if lp.act_scales:
            a = np.array(lp.act_scales, dtype=float)
            tables[n] = a[:, 0] if a.ndim == 2 else a  # two-region: the positive step
    if not tables:
        return None
    names = list(tables)
    mat = np.stack([tables[n] / tables[n].max() for n in names])
    fig, ax = plt.subplots(figsize=(7, 0.18 * len(names) + 2))
    im = ax.imshow(mat, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set(xlabel="time group", ylabel="layer", title=f"{plan.recipe}: static activation scale / layer max")
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=6)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mixed_precision(plan: QuantPlan, path: Path) -> Path | None:
    names = [n for n, lp in plan.layers.items() if lp.step_group_specs]
    if not names:
        return None
    from ..formats import get_format
    mat = np.array([[get_format(s.weight).bits for s in plan.layers[n].step_group_specs] for n in names])
    fig, ax = plt.subplots(figsize=(6, 0.18 * len(names) + 2))
    im = ax.imshow(mat, aspect="auto", cmap="coolwarm", vmin=4, vmax=8, interpolation="nearest")
    ax.set(xlabel="time group (high t = first sampling steps)", ylabel="layer",
           title=f"{plan.recipe}: weight bits per step group")
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=6)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(stats_or_plan: CalibStats | QuantPlan, out_dir) -> list[Path]:
    """Write the diagnostic PNGs into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(stats_or_plan, CalibStats):
        st = stats_or_plan
        return [_range_over_t(st.absmax_by_t(), st.config.time_groups, st.config.num_train_timesteps,
                              out / "act_range_over_t.png"),
                _salience(st, out / "channel_salience.png")]
    if isinstance(stats_or_plan, QuantPlan):
        plan = stats_or_plan
        paths = []
        if "act_absmax_by_t" in plan.meta:
            paths.append(_range_over_t(plan.meta["act_absmax_by_t"], plan.time_groups, plan.num_train_timesteps,
                                       out / "act_range_over_t.png"))
        paths += [p for p in (_scale_tables(plan, out / "act_scale_tables.png"),
                              _mixed_precision(plan, out / "mixed_precision.png")) if p is not None]
        if not paths:
            raise ValueError(f"plan {plan.recipe!r} carries nothing to plot (no calibration statistics, "
                             "static scales or mixed precision)")
        return paths
    raise TypeError(f"make_plots takes CalibStats or QuantPlan, got {type(stats_or_plan).__name__}")
