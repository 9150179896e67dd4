"""Calibration statistics: forward hooks that summarize what each quantizable layer sees, per timestep
and per time group, in bounded memory (never raw full tensors).

Per linear layer (LayerStats), indexed by time group g (nn.timestep.group_of):
  chan_absmax [G, K]  running max |x| per input channel (SmoothQuant / salience plots / TGQ ranges)
  chan_ema    [G, K]  EMA (momentum 0.95) of each call's per-channel max (ViDiT-Q "momentum_act_max")
  tmin / tmax [G]     per-tensor min / max
  rows        [G, R, K] a uniform reservoir sample of R input rows (tokens), fp16 (fp32 if the layer's
                      values exceed fp16's range): the data the search objectives run on
  t_range     {t: [min, max]} per diffusion timestep (the "why TGQ" plot)
  w_chan_absmax [K]   max_o |W[o, k]| (weight salience, for the balancing plot and SmoothQuant)
  t_chan_absmax {t: [K]} (optional) max |x| per input channel per diffusion timestep (PTQ4DiT's SSC)
  gram        [K, K]  (optional) Σ xᵀx over every calibration row, fp64 (GPTQ's Hessian)
Per attention module (AttnStats): per-head running max |q|, |k|, |v| per group, and a reservoir of up to
ATTN_SNAPSHOTS snapshots per group of (P rows [ATTN_ROWS, keys], V [keys, head_dim]) for one head of
one sample, keys subsampled to at most ATTN_KEYS: the post-softmax MRQ objective ‖P̂V − PV‖² runs on
these.
The timestep of each forward comes from the adapter (`adapter.timestep(args, kwargs)`, mapped onto
0..T by `adapter.train_timestep`) in a pre-hook on the transformer, so hooks on layers know which group their input belongs to; a batch may mix timesteps
(each sample is binned by its own timestep).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from ..nn.timestep import group_of

MAX_ROWS_PER_GROUP = 256   # the bound on reservoir rows per (layer, group)
ATTN_ROWS = 32             # query rows per post-softmax snapshot
ATTN_KEYS = 512            # keys kept per snapshot (subsampled uniformly beyond this)
ATTN_SNAPSHOTS = 4         # snapshots per (attention module, group)
FP16_MAX = 65504.0


@dataclass
class StatsConfig:
    time_groups: int
    num_train_timesteps: int = 1000
    rows_per_group: int = 0          # reservoir rows per (layer, group); 0 keeps none
    attention: bool = False          # collect post-softmax snapshots and per-head Q/K/V ranges
    capture_inputs: bool = False     # keep the transformer's inputs of one forward per group
    per_timestep_channels: bool = False  # channel max per diffusion timestep (t_chan_absmax)
    gram: bool = False               # accumulate xᵀx per layer (K² values each)
    ema_momentum: float = 0.95       # ViDiT-Q's momentum for the channel-max EMA
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.rows_per_group <= MAX_ROWS_PER_GROUP:
            raise ValueError(f"rows_per_group must be in 0..{MAX_ROWS_PER_GROUP}, got {self.rows_per_group}")


def _reservoir_slots(n_seen: int, m: int, capacity: int, gen: torch.Generator):
    """(slots, sources) for Vitter's algorithm R on m new items after n_seen: item i goes to slot
    j ~ U[0, n_seen+i] when j < capacity. Later items win a shared slot, as in the sequential version."""
    pos = torch.arange(n_seen, n_seen + m)
    j = (torch.rand(m, generator=gen, dtype=torch.float64) * (pos + 1)).long()
    slot = torch.where(pos < capacity, pos, j)
    src = torch.nonzero(slot < capacity).flatten()
    if not len(src):
        return src, src
    uniq, inv = torch.unique(slot[src], return_inverse=True)
    last = torch.full((len(uniq),), -1, dtype=torch.long).scatter_reduce_(0, inv, src, "amax")
    return uniq, last


class LayerStats:
    def __init__(self, name: str, linear: torch.nn.Linear, role: str | None, cfg: StatsConfig):
        G, K = cfg.time_groups, linear.in_features
        self.name, self.role, self.in_features = name, role, K
        self.momentum = cfg.ema_momentum
        self.chan_absmax = torch.zeros(G, K)
        self.chan_ema = torch.zeros(G, K)
        self.tmin = torch.full((G,), float("inf"))
        self.tmax = torch.full((G,), float("-inf"))
        self.calls = torch.zeros(G, dtype=torch.long)
        R = cfg.rows_per_group
        self.rows = torch.zeros(G, R, K, dtype=torch.float16) if R else None
        self.rows_seen = torch.zeros(G, dtype=torch.long)
        self.t_range: dict[int, list[float]] = {}
        self.w_chan_absmax = linear.weight.detach().abs().amax(0).float().cpu()
        self.t_chan_absmax: dict[int, torch.Tensor] | None = {} if cfg.per_timestep_channels else None
        self.gram = torch.zeros(K, K, dtype=torch.float64) if cfg.gram else None
        self.gram_rows = 0

    @property
    def visited(self) -> torch.Tensor:
        return self.calls > 0

    def group_rows(self, g: int) -> torch.Tensor:
        """The reservoir rows collected for group g, fp32 [n, K] (n <= R)."""
        if self.rows is None:
            raise ValueError(f"layer {self.name}: no rows were collected (rows_per_group=0)")
        return self.rows[g, : min(int(self.rows_seen[g]), self.rows.shape[1])].float()

    def nbytes(self) -> int:
        tensors = [self.chan_absmax, self.chan_ema, self.tmin, self.tmax, self.calls, self.rows_seen,
                   self.w_chan_absmax] + ([self.rows] if self.rows is not None else []) \
            + ([self.gram] if self.gram is not None else []) + list((self.t_chan_absmax or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors) + 16 * len(self.t_range)

    def update(self, x: torch.Tensor, g: int, t: float, gen: torch.Generator) -> None:
        """x: [m, K] input rows from diffusion timestep t, in time group g."""
        xf = x.float()
        ca = xf.abs().amax(0).cpu()
        lo, hi = float(xf.min()), float(xf.max())
        self.chan_absmax[g] = torch.maximum(self.chan_absmax[g], ca)
        self.chan_ema[g] = ca if self.calls[g] == 0 else self.momentum * self.chan_ema[g] + (1 - self.momentum) * ca
        self.tmin[g], self.tmax[g] = min(float(self.tmin[g]), lo), max(float(self.tmax[g]), hi)
        self.calls[g] += 1
        r = self.t_range.setdefault(int(round(t)), [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)
        if self.t_chan_absmax is not None:
            key = int(round(t))
            prev = self.t_chan_absmax.get(key)
            self.t_chan_absmax[key] = ca if prev is None else torch.maximum(prev, ca)
        if self.gram is not None:
            xd = x.double()
            self.gram += (xd.T @ xd).cpu()
            self.gram_rows += x.shape[0]
        if self.rows is not None:
            if max(-lo, hi) > FP16_MAX and self.rows.dtype == torch.float16:
                self.rows = self.rows.float()
            slots, src = _reservoir_slots(int(self.rows_seen[g]), x.shape[0], self.rows.shape[1], gen)
            if len(slots):
                self.rows[g, slots] = x[src.to(x.device)].to("cpu", self.rows.dtype)
            self.rows_seen[g] += x.shape[0]


class AttnStats:
    def __init__(self, name: str, heads: int, head_dim: int, cfg: StatsConfig):
        G = cfg.time_groups
        self.name, self.heads, self.head_dim = name, heads, head_dim
        self.q_absmax = torch.zeros(G, heads)
        self.k_absmax = torch.zeros(G, heads)
        self.v_absmax = torch.zeros(G, heads)
        self.snapshots: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(G)]
        self.snapshots_seen = torch.zeros(G, dtype=torch.long)

    @property
    def visited(self) -> torch.Tensor:
        return self.snapshots_seen > 0

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.q_absmax, self.k_absmax, self.v_absmax))
        return n + sum(p.numel() * p.element_size() + v.numel() * v.element_size()
                       for snaps in self.snapshots for p, v in snaps)

    def update(self, q, k, v, g: int, scale: float, gen: torch.Generator) -> None:
        """q [b, Nq, H, d], k / v [b, Nk, H, d] of samples in group g (after any q/k norm)."""
        for stat, t in ((self.q_absmax, q), (self.k_absmax, k), (self.v_absmax, v)):
            stat[g] = torch.maximum(stat[g], t.float().abs().amax(dim=(0, 1, 3)).cpu())
        b = int(torch.randint(q.shape[0], (1,), generator=gen))
        h = int(torch.randint(self.heads, (1,), generator=gen))
        rows = torch.randperm(q.shape[1], generator=gen)[:ATTN_ROWS].to(q.device)
        p = attention_probs(q[b, rows, h], k[b, :, h], scale)
        vv = v[b, :, h]
        if p.shape[1] > ATTN_KEYS:
            keys = torch.randperm(p.shape[1], generator=gen)[:ATTN_KEYS].to(q.device)
            p, vv = p[:, keys], vv[keys]
        snap = (p.cpu(), vv.to("cpu", torch.float16 if float(vv.abs().max()) < FP16_MAX else torch.float32))
        slots, _ = _reservoir_slots(int(self.snapshots_seen[g]), 1, ATTN_SNAPSHOTS, gen)
        if len(slots):
            s = int(slots[0])
            if s < len(self.snapshots[g]):
                self.snapshots[g][s] = snap
            else:
                self.snapshots[g].append(snap)
        self.snapshots_seen[g] += 1


@dataclass
class CalibStats:
    config: StatsConfig
    model_type: str
    layers: dict[str, LayerStats] = field(default_factory=dict)
    attention: dict[str, AttnStats] = field(default_factory=dict)
    inputs: dict[int, tuple[tuple, dict]] = field(default_factory=dict)
    forwards: int = 0

    @property
    def timesteps(self) -> list[int]:
        return sorted({t for s in self.layers.values() for t in s.t_range})

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers.values()) + sum(a.nbytes() for a in self.attention.values())

    def absmax_by_t(self) -> dict:
        """{"timesteps": [...], "layers": {name: [input absmax at each timestep, None if unseen]}}:
        small enough for plan.meta, and what the TGQ plot draws."""
        ts = self.timesteps
        return {"timesteps": ts, "layers": {
            name: [max(-s.t_range[t][0], s.t_range[t][1]) if t in s.t_range else None for t in ts]
            for name, s in self.layers.items()}}


def _tree_clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _tree_clone(v) for k, v in obj.items()}
    return obj


def split_heads(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """to_q / to_k / to_v outputs [B, N, H·d] -> [B, N, H, d] each, with the module's q/k norms applied,
    as diffusers' attention processors do before scaled_dot_product_attention."""
    H = attn.heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], H, t.shape[-1] // H) for t in (q, k, v))
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return q, k, v


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Post-softmax P = softmax(q·kᵀ·scale) in fp32 for q [..., Nq, d], k [..., Nk, d]."""
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)


def self_attention_modules(adapter, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The adapter's attention modules whose post-softmax P we can rebuild from the to_q / to_k outputs.

    Skipped: cross-attention (P depends on a text padding mask the hooks do not see) and joint
    attention with added projections (SD3 / Flux: P spans text and image tokens)."""
    return {n: m for n, m in adapter.attention_modules(model).items()
            if not m.is_cross_attention and getattr(m, "add_q_proj", None) is None}


class StatsCollector:
    """Context manager: hooks installed on enter, removed on exit; `.stats` holds the result."""

    def __init__(self, model: torch.nn.Module, adapter, layers: dict[str, torch.nn.Linear],
                 cfg: StatsConfig, progress=None):
        self.model, self.adapter, self.cfg, self.progress = model, adapter, cfg, progress
        self.layers = layers
        self.stats = CalibStats(cfg, adapter.model_type)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self._handles: list = []
        self._t: torch.Tensor | None = None
        self._attn_scratch: dict[str, dict] = {}

    def __enter__(self) -> "StatsCollector":
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._on_model_pre, with_kwargs=True))
        h.append(self.model.register_forward_hook(self._on_model_post))
        for name, lin in self.layers.items():
            self.stats.layers[name] = LayerStats(name, lin, self.adapter.role(name), self.cfg)
            h.append(lin.register_forward_pre_hook(partial(self._on_linear, name)))
        if self.cfg.attention:
            for name, attn in self_attention_modules(self.adapter, self.model).items():
                head_dim = attn.to_q.out_features // attn.heads
                self.stats.attention[name] = AttnStats(name, attn.heads, head_dim, self.cfg)
                for which in ("q", "k", "v"):
                    h.append(getattr(attn, f"to_{which}").register_forward_hook(
                        partial(self._on_qkv, name, attn, which)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._t = None

    # -- hooks ------------------------------------------------------------------------------------

    def _on_model_pre(self, module, args, kwargs):
        t = self.adapter.timestep(args, kwargs)
        if t is None:
            raise ValueError("calibration needs the timestep of every transformer forward; "
                             f"the {self.adapter.model_type!r} adapter found none in this call")
        t = self.adapter.train_timestep(torch.as_tensor(t).detach().float())  # flow matching: σ·T
        self._t = t.flatten().cpu()
        self._g = group_of(self._t, self.cfg.time_groups, self.cfg.num_train_timesteps)
        g0 = int(self._g[0])
        if self.cfg.capture_inputs and g0 not in self.stats.inputs and bool((self._g == g0).all()):
            self.stats.inputs[g0] = (_tree_clone(args), _tree_clone(kwargs))
        self.stats.forwards += 1
        if self.progress is not None:
            self.progress.update(1)

    def _on_model_post(self, module, args, output):
        self._t = None

    def _split_by_timestep(self, x: torch.Tensor, what: str):
        """Yield (group, timestep, the samples of x at that timestep) for a batch-first tensor x."""
        if self._t is None:
            raise RuntimeError(f"{what} ran outside a transformer forward: no timestep is known")
        t, g = self._t, self._g
        if bool((t == t[0]).all()):
            yield int(g[0]), float(t[0]), x
            return
        if x.shape[0] != len(t):
            raise ValueError(f"{what}: the batch mixes timesteps {t.tolist()} but its input has batch "
                             f"{x.shape[0]}; cannot tell which rows belong to which timestep")
        for tv in t.unique().tolist():
            sel = t == tv
            yield int(g[sel][0]), tv, x[sel.to(x.device)]

    def _on_linear(self, name, module, args):
        x = args[0]
        if not bool(torch.isfinite(x).all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise ValueError(f"calibration data for layer {name!r} contains non-finite values "
                             f"({n_nan} NaN, {n_inf} Inf); the model's FP forward already overflows "
                             "or the inputs are broken, so no scale can be calibrated")
        for g, t, xs in self._split_by_timestep(x.detach(), f"layer {name!r}"):
            self.stats.layers[name].update(xs.reshape(-1, xs.shape[-1]), g, t, self.gen)

    def _on_qkv(self, name, attn, which, module, args, output):
        scratch = self._attn_scratch.setdefault(name, {})
        scratch[which] = output.detach()
        if which != "v":
            return
        q, k, v = scratch.pop("q"), scratch.pop("k"), scratch.pop("v")
        if k.shape[-1] != q.shape[-1]:
            raise ValueError(f"attention {name!r}: key width {k.shape[-1]} differs from query width "
                             f"{q.shape[-1]} (grouped KV heads are not supported)")
        qkv = torch.stack(split_heads(attn, q, k, v), 1)  # [B, 3, N, H, d]: split by sample together
        for g, _, part in self._split_by_timestep(qkv, f"attention {name!r}"):
            self.stats.attention[name].update(part[:, 0], part[:, 1], part[:, 2], g, attn.scale, self.gen)
