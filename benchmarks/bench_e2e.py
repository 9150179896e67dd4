"""End to end: one transformer forward (the unit a sampler repeats), bf16 vs torchao vs dtq, floors first.

    python benchmarks/bench_e2e.py [--out DIR] [--rep MS] [--models M,..] [--batches 1,2] [--only SUBSTR,..]
    python benchmarks/bench_e2e.py --dry-run     # CPU: tiny models, eager rows and one compiled row

FLOORS (per transformer block, batch 2; H100 SXM: HBM 3.35 TB/s, BF16 989 TFLOP/s dense, INT8 1979 TOPS,
FP8 1979 TFLOP/s). `block_floor` below is the arithmetic; the script prints its table with the results.
GEMM FLOPs = 2·rows·K·N over every block Linear; attention FLOPs = 4·B·Sq·Sk·C. Bytes = weights read once
(bf16 2 B, int8 1 B, int4 0.5 B per weight, +4 B scale per output channel; the adaLN Linears the adapters
keep FP stay bf16) + activations: every GEMM input read once (bf16 2 B; 1 B as codes) and output written
once (bf16), the producer of a quantized input writing 1 B instead of 2, q/k/v read and the attention
output written in bf16, two residual updates (read + write). Elementwise work (LN, modulate, gates,
GELU) is assumed fused into its neighbours (dtq's fused quantizers, inductor): a lower bound. Time floor =
max(compute, bytes / bandwidth).

  block (tokens), batch 2     | GFLOP GEMM / attn | MB bf16 / W8A8 / W4A8 | floor us: bf16 | W8A8 | +qattn | W4A8+qattn
  DiT-XL/2 256 px (256)       |    16.3 /   0.6   |    84 /   60 /   52   |      25        |   18 |     18     |     16
  DiT-XL/2 512 px (1024)      |    65.2 /   9.7   |   194 /  145 /  137   |      76        |   43 |     43     |     41
  PixArt-Σ 1024 px (4096+300) |   307.6 / 165.9   |   682 /  527 /  517   |     479        |  323 |    239     |    239
  Flux-dev double (4096+512)  |  2087   / 522     |  2435 / 1812 / 1699   |    2638        | 1582 |   1318     |   1318
  Flux-dev single (4608)      |  2087   / 522     |  1982 / 1472 / 1416   |    2638        | 1582 |   1318     |   1318
(batch 1 halves the FLOPs; the ratios stay within 0.05 of these, DiT 512 px falls to 1.43x: memory-bound.)

What the floors say: DiT-XL/2 at 256 px is memory-bound in every format (84 MB against 17 GFLOP per
block), and the adaLN weights kept in bf16 (6·1152² per block, 16 MB) are a fifth of the bf16 bytes and
a quarter of W8A8's: the W8A8 ceiling there is 1.4x, and only fewer activation passes (the fast path) or
quantized adaLN weights move it; W4A8 gains little over W8A8 once activations dominate. At 512 px batch 2
bf16 is compute-bound and W8A8 memory-bound (1.75x). PixArt-Σ at 1024 px and Flux are compute-bound:
W8A8 GEMMs with bf16 attention cap at 1.5-1.7x over bf16, and the 1.5x PixArt target needs the attention
quantized too (2.0x floor). Launch overhead (~10 kernels per block, 28-57 blocks) is ~1 ms per forward
unless CUDA-graphed: the cudagraphs rows remove it. None of these expectations is a measurement; the
table this script writes is, and nothing here has been measured on a GPU yet.

Models (random weights: speed does not depend on them; diffusers modules as shipped):
* DiT-XL/2 (28 blocks, width 1152) at 256 px (256 tokens) and 512 px (1024 tokens), class-conditional;
* PixArt-Σ-sized (28 blocks, width 1152, 1024 px: 4096 tokens) with cross-attention on a 300-token
  caption (T5 width 4096), no caption mask (every token valid: a padding mask would be served by the
  quantized attention's key-padding path but costs a host sync to classify);
* a Flux-dev-sized stack (width 3072, 24 heads of 128, 4096 image + 512 text tokens): --flux-double
  double-stream and --flux-single single-stream blocks (default 2 + 4; Flux-dev has 19 + 38);
at batch 1 and 2 (classifier-free guidance doubles the batch).
Contenders: bf16 eager and + torch.compile; torchao int8 dynamic and float8 row-wise, + compile (skipped
with the reason when torchao is not importable); dtq W8A8 (dynamic per token), W8A8 static (10 time
groups), W4A8 (packed int4 weights) and FP4 W4A4 (w4a4_gemm: the `paths` column shows which path each layer took), each with and without quantized attention (dynamic; Flux through QuantFluxAttnProcessor), each compiled (fullgraph) and CUDA-graphed
(mode="reduce-overhead"); and dtq W8A8 on the per-layer path (fuse=False) to show what the fast path buys.
Per row: median forward latency, speedup vs bf16 + compile, peak memory of the forward (weights +
activations), weight bytes, which backend ran each dtq op and which QuantLinear path each layer took,
error vs bf16 eager. Also: a per-op breakdown of one block (profiler, self time per op/kernel) and a
plot of speedup vs tokens.
"""
from __future__ import annotations

import copy
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import _setup  # noqa: E402  (first: it picks the interpreter before triton loads)


def _extra_args(p):
    p.add_argument("--models", help="comma-separated subset of: " + ", ".join(
        ["dit-xl2-256", "dit-xl2-512", "pixart-sigma-1024", "flux-dev-stack"]))
    p.add_argument("--batches", default="1,2", help="comma-separated batch sizes (default 1,2)")
    p.add_argument("--only", help="comma-separated substrings: run only contenders whose name contains one "
                   "(and bf16 eager, the baseline; name \"bf16 + compile\" to keep that one)")
    p.add_argument("--flux-double", type=int, default=2, help="double-stream blocks in the Flux stack")
    p.add_argument("--flux-single", type=int, default=4, help="single-stream blocks in the Flux stack")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-op profile of one block")


ARGS = _setup.parse_args(__doc__.split("\n")[0], "tiny models on CPU, eager rows and one compiled row",
                         extra=_extra_args)

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import common  # noqa: E402
import dtq_kernels as dtq  # noqa: E402
from dtq_kernels.cli import random_model  # noqa: E402
from dtq_kernels.eval.cli import LogCollector  # noqa: E402
from dtq_kernels.eval.harness import weight_bytes  # noqa: E402
from dtq_kernels.nn import QuantLinear  # noqa: E402
from dtq_kernels.nn.attention import set_quant_attention  # noqa: E402
from dtq_kernels.ops import _dispatch  # noqa: E402
from dtq_kernels.plan import uniform_plan  # noqa: E402

BF16 = torch.bfloat16
S = dtq.LinearQuantSpec

# ----------------------------------------------------------------------------------------------- floors

H100 = dict(bandwidth=3.35e12, bf16=989e12, int8=1979e12, fp8=1979e12)


@dataclass(frozen=True)
class Geometry:
    """What the floor arithmetic needs about one block kind."""
    kind: str          # "dit", "pixart", "flux_double", "flux_single"
    width: int         # C
    tokens: int        # image tokens S
    text_tokens: int = 0


def _block_gemms(g: Geometry, batch: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], int]:
    """(quantized GEMMs [(rows, K, N)], FP adaLN GEMMs, attention (Sq·Sk summed)) of one block."""
    C, B = g.width, batch
    M, T = B * g.tokens, B * g.text_tokens
    stream = lambda r: [(r, C, 3 * C), (r, C, C), (r, C, 4 * C), (r, 4 * C, C)]  # noqa: E731
    if g.kind == "dit":
        return stream(M), [(B, C, 6 * C)], g.tokens ** 2
    if g.kind == "pixart":
        cross = [(M, C, C), (T, C, 2 * C), (M, C, C)]
        return stream(M) + cross, [], g.tokens ** 2 + g.tokens * g.text_tokens
    joint = (g.tokens + g.text_tokens) ** 2
    if g.kind == "flux_double":
        return stream(M) + stream(T), [(B, C, 6 * C)] * 2, joint
    r = M + T  # flux_single: qkv, proj_mlp, proj_out over [attention, mlp]
    return [(r, C, 3 * C), (r, C, 4 * C), (r, 5 * C, C)], [(B, C, 3 * C)], joint


def block_floor(g: Geometry, batch: int, weight_bytes_per: float | None, act_quantized: bool,
                attention_rate: str) -> dict[str, float]:
    """GFLOP, MB and the time floor (us) of one block; weight_bytes_per None = bf16 throughout."""
    gemms, adaln, attn_pairs = _block_gemms(g, batch)
    gemm_flops = sum(2 * r * k * n for r, k, n in gemms)
    attn_flops = 4 * batch * attn_pairs * g.width
    wb = 2.0 if weight_bytes_per is None else weight_bytes_per
    weights = sum(k * n * wb + (0 if weight_bytes_per is None else 4 * n) for _, k, n in gemms)
    weights += sum(k * n * 2 for _, k, n in adaln)
    in_bytes = 1 if act_quantized else 2
    shared = {}  # one read per distinct input (q/k/v share theirs)
    acts = 0.0
    for r, k, n in gemms:
        shared[(r, k, n if n != 3 * g.width else "qkv")] = r * k
        acts += r * n * 2
    acts += sum(v * (in_bytes + (1 if act_quantized else 2)) for v in shared.values())  # read + producer write
    rows = batch * (g.tokens + g.text_tokens)
    acts += 4 * rows * g.width * 2 + 2 * 2 * rows * g.width * 2  # q, k, v, attention out; two residuals
    compute = gemm_flops / (H100["int8"] if weight_bytes_per else H100["bf16"]) + attn_flops / H100[attention_rate]
    total_bytes = weights + acts
    return {"gemm_gflop": gemm_flops / 1e9, "attn_gflop": attn_flops / 1e9, "mb": total_bytes / 1e6,
            "floor_us": max(compute, total_bytes / H100["bandwidth"]) * 1e6}


def floor_rows(geometries: dict[str, Geometry], batch: int) -> list[dict[str, Any]]:
    rows = []
    for name, g in geometries.items():
        bf16 = block_floor(g, batch, None, False, "bf16")
        w8 = block_floor(g, batch, 1.0, True, "bf16")
        w8q = block_floor(g, batch, 1.0, True, "fp8")
        w4q = block_floor(g, batch, 0.5, True, "fp8")
        rows.append({"block": name, "batch": batch, "gemm_gflop": bf16["gemm_gflop"], "attn_gflop": bf16["attn_gflop"],
                     "MB_bf16": bf16["mb"], "MB_w8a8": w8["mb"], "MB_w4a8": w4q["mb"],
                     "floor_us_bf16": bf16["floor_us"], "floor_us_w8a8": w8["floor_us"],
                     "floor_us_w8a8_qattn": w8q["floor_us"], "floor_us_w4a8_qattn": w4q["floor_us"]})
    return rows


# ----------------------------------------------------------------------------------------------- models

@dataclass
class ModelCase:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, int, torch.device, torch.dtype], dict[str, Any]]
    tokens: int
    geometry: dict[str, Geometry]


def _dit_inputs(model, batch, device, dtype):
    cfg, g = model.config, torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return dict(hidden_states=x.to(device, dtype), timestep=torch.full((batch,), 500, device=device),
                class_labels=torch.arange(batch, device=device) % cfg.num_embeds_ada_norm)


def _pixart_inputs(model, batch, device, dtype, caption_tokens):
    cfg, g = model.config, torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(batch, caption_tokens, cfg.caption_channels, generator=g)
    return dict(hidden_states=x.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                timestep=torch.full((batch,), 500, device=device))


def _flux_inputs(model, batch, device, dtype, image_tokens, text_tokens):
    cfg, g = model.config, torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(batch, image_tokens, cfg.in_channels, generator=g).to(device, dtype),
              encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim,
                                                generator=g).to(device, dtype),
              pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
              timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
              img_ids=torch.zeros(image_tokens, 3, device=device), txt_ids=torch.zeros(text_tokens, 3, device=device))
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return kw


def model_cases(dry: bool) -> list[ModelCase]:
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel
    if dry:
        dit = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, out_channels=8, sample_size=8)
        pix = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, out_channels=8, sample_size=8,
                   cross_attention_dim=64, caption_channels=32, norm_type="ada_norm_single",
                   use_additional_conditions=False)
        flux = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8))
        return [
            ModelCase("tiny-dit", lambda: random_model(DiTTransformer2DModel, 0, **dit), _dit_inputs, 16,
                      {"dit": Geometry("dit", 64, 16)}),
            ModelCase("tiny-pixart", lambda: random_model(PixArtTransformer2DModel, 0, **pix),
                      lambda m, b, d, t: _pixart_inputs(m, b, d, t, 5), 16, {"pixart": Geometry("pixart", 64, 16, 5)}),
            ModelCase("tiny-flux", lambda: random_model(FluxTransformer2DModel, 0, **flux),
                      lambda m, b, d, t: _flux_inputs(m, b, d, t, 16, 5), 21,
                      {"flux_double": Geometry("flux_double", 32, 16, 5)}),
        ]
    pix = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
               sample_size=128, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
               use_additional_conditions=False, interpolation_scale=2)
    flux = dict(patch_size=1, in_channels=64, num_layers=ARGS.flux_double, num_single_layers=ARGS.flux_single,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return [
        ModelCase("dit-xl2-256", lambda: random_model(DiTTransformer2DModel, 0, num_layers=28, out_channels=8,
                                                      sample_size=32), _dit_inputs, 256,
                  {"DiT-XL/2 256 px": Geometry("dit", 1152, 256)}),
        ModelCase("dit-xl2-512", lambda: random_model(DiTTransformer2DModel, 0, num_layers=28, out_channels=8,
                                                      sample_size=64), _dit_inputs, 1024,
                  {"DiT-XL/2 512 px": Geometry("dit", 1152, 1024)}),
        ModelCase("pixart-sigma-1024", lambda: random_model(PixArtTransformer2DModel, 0, **pix),
                  lambda m, b, d, t: _pixart_inputs(m, b, d, t, 300), 4096,
                  {"PixArt-Σ 1024 px": Geometry("pixart", 1152, 4096, 300)}),
        ModelCase("flux-dev-stack", lambda: random_model(FluxTransformer2DModel, 0, **flux),
                  lambda m, b, d, t: _flux_inputs(m, b, d, t, 4096, 512), 4608,
                  {"Flux-dev double": Geometry("flux_double", 3072, 4096, 512),
                   "Flux-dev single": Geometry("flux_single", 3072, 4096, 512)}),
    ]


# ------------------------------------------------------------------------------------------ contenders

@dataclass
class Contender:
    name: str
    make: Callable[[torch.nn.Module], torch.nn.Module]  # FP model -> the model to run (a copy when changed)
    mode: str = "eager"                                   # "eager", "compile", "cudagraphs"
    fullgraph: bool = False


def _torchao(config_name: str) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def make(fp):
        try:
            import torchao.quantization as tq
            config = (tq.Int8DynamicActivationInt8WeightConfig() if config_name == "int8"
                      else tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow()))
        except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip, reported in the table
            raise common.Skip(f"torchao not importable ({type(e).__name__}: {e})")
        model = copy.deepcopy(fp)
        tq.quantize_(model, config)
        return model
    return make


DTQ_SPECS = {  # name -> (spec, static table, time groups)
    "W8A8": (S(), None, 1),
    "W8A8 static-10": (S(act_mode="static", time_groups=10), [0.05] * 10, 10),
    "W4A8": (S(weight="int4"), None, 1),
    "FP4 W4A4": (S(weight="fp4_e2m1", act="fp4_e2m1", group_size=32), None, 1),
}


def _dtq(fmt: str, attention: bool, fuse: bool = True) -> Callable[[torch.nn.Module], torch.nn.Module]:
    spec, table, groups = DTQ_SPECS[fmt]

    def make(fp):
        model = copy.deepcopy(fp)
        dtq.quantize(model, uniform_plan(model, spec, table, groups, recipe=f"bench-{fmt}"), fuse=fuse)
        if attention:
            try:
                set_quant_attention(model)
            except ValueError as e:  # a model without attention modules dtq has a processor for
                raise common.Skip(f"no quantized attention for this model: {e}")
        return model
    return make


def contenders() -> list[Contender]:
    out = [Contender("bf16 eager", lambda fp: fp), Contender("bf16 + compile", lambda fp: fp, "compile"),
           Contender("torchao int8 dynamic + compile", _torchao("int8"), "compile"),
           Contender("torchao float8 row-wise + compile", _torchao("float8"), "compile")]
    for fmt in DTQ_SPECS:
        for attention in (False, True):
            if fmt == "W8A8 static-10" and attention:
                continue  # static attention needs calibrated per-head tables: not a random-weight row
            label = f"dtq {fmt}" + (" + quant attention" if attention else "")
            for mode in ("compile", "cudagraphs"):
                out.append(Contender(f"{label} + {mode}", _dtq(fmt, attention), mode, fullgraph=True))
    out.append(Contender("dtq W8A8 per-layer path (fuse=False) + compile", _dtq("W8A8", False, fuse=False),
                         "compile", fullgraph=True))
    out.append(Contender("dtq W8A8 fast path, eager", _dtq("W8A8", False)))
    if ARGS.only:
        keep = [s.strip() for s in ARGS.only.split(",") if s.strip()]
        out = [c for c in out if c.name == "bf16 eager" or any(k in c.name for k in keep)]
    return out


# ------------------------------------------------------------------------------------------ measuring

def _note_worthy(msg: str) -> str | None:
    """A logged fallback or CUDA-graph skip, shortened for the row's note; None for other messages."""
    return msg[:160] if "skipping cudagraphs" in msg or "fall" in msg.lower() else None


def _runner(model, contender: Contender, device, first_case: bool) -> Callable[..., Any]:
    if contender.mode == "eager":
        return model
    if contender.mode == "cudagraphs" and device.type != "cuda":
        raise common.Skip("CUDA graphs need a GPU")
    if ARGS.dry_run and (not contender.name.startswith("dtq W8A8 + compile") or not first_case):
        raise common.Skip("the dry run compiles one contender of one model (CPU time)")
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    mode = "reduce-overhead" if contender.mode == "cudagraphs" else None
    compiled = torch.compile(model, fullgraph=contender.fullgraph, backend=backend, mode=mode)
    if contender.mode != "cudagraphs":
        return compiled

    def step(**kw):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(**kw)
    return step


def _output(out) -> torch.Tensor:
    return (out.sample if hasattr(out, "sample") else out[0]).float()


def _paths(model) -> str:
    paths = Counter(m.path for m in model.modules() if isinstance(m, QuantLinear))
    procs = Counter(type(m.processor).__name__ + (f"/{m.processor.mode}" if hasattr(m.processor, "mode") else "")
                    for m in model.modules() if hasattr(m, "processor") and m.processor is not None)
    return "; ".join([", ".join(f"{k}x{v}" for k, v in paths.items()), ", ".join(f"{k}x{v}" for k, v in procs.items())])


def measure(case: ModelCase, fp, contender: Contender, batch: int, ref: torch.Tensor, device, dtype,
            first_case: ModelCase) -> dict:
    row: dict[str, Any] = {"model": case.name, "tokens": case.tokens, "batch": batch, "contender": contender.name}
    handler = LogCollector(logging.INFO, _note_worthy)
    for name in ("dtq_kernels", "torch._inductor"):
        logging.getLogger(name).addHandler(handler)
    try:
        model = contender.make(fp)
        run = _runner(model, contender, device, case is first_case)
        kw = case.inputs(fp, batch, device, dtype)
        _dispatch.last_backend.clear()
        skips = counters["inductor"]["cudagraph_skips"]
        with torch.no_grad():
            out = _output(run(**kw))  # warm-up: compilation, Triton JIT, graph capture
            run(**kw)
            backends = dict(_dispatch.last_backend)
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run(**kw)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            ms = common.time_ms(lambda: run(**kw), device=device, rep_ms=ARGS.rep)
        skipped = counters["inductor"]["cudagraph_skips"] - skips
        if skipped:  # inductor ran these graphs without CUDA graphs: the row must say so
            handler.messages.append(f"CUDA graphs skipped for {skipped} graph(s) (TORCH_LOGS=perf_hints says why)")
        try:
            wbytes = weight_bytes(model)
        except Exception as e:  # noqa: BLE001 - tensor subclasses without a plain storage: keep the timing
            wbytes, row["note"] = None, f"weight bytes not countable: {type(e).__name__}"
    except common.Skip as e:
        return {**row, "note": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - a failing contender is reported in the table, not hidden
        return {**row, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    finally:
        for name in ("dtq_kernels", "torch._inductor"):
            logging.getLogger(name).removeHandler(handler)
    notes = [row.get("note", "")] + sorted(set(handler.messages))
    return {**row, "ms": ms, "weights_MB": None if wbytes is None else wbytes / 1e6,
            "peak_MB": None if peak is None or wbytes is None else (wbytes + peak) / 1e6,
            "rel_err_vs_bf16": float((out - ref).norm() / ref.norm()),
            "backends": ", ".join(f"{k}={v}" for k, v in sorted(backends.items())), "paths": _paths(model),
            "note": "; ".join(n for n in notes if n)}


def block_breakdown(case: ModelCase, model, batch: int, device, dtype, label: str, reps: int = 3) -> list[dict]:
    """Self time per op / kernel of one call of the first transformer block (its real inputs)."""
    from torch.profiler import ProfilerActivity, profile
    block = model.transformer_blocks[0]
    captured = {}
    hook = block.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    kw = case.inputs(model, batch, device, dtype)
    with torch.no_grad():
        model(**kw)
    hook.remove()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        block(*captured["args"], **captured["kwargs"])
        with profile(activities=activities) as prof:
            for _ in range(reps):
                block(*captured["args"], **captured["kwargs"])
            if device.type == "cuda":
                torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: -getattr(e, attr))
    return [{"model": case.name, "contender": label, "batch": batch, "op": e.key[:70], "calls": e.count / reps,
             "us_per_block": getattr(e, attr) / reps, "share": getattr(e, attr) / total} for e in events[:15]]


def plot_speedup(rows: list[dict], path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batch = max(r["batch"] for r in rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["contender"] for r in rows):
        pts = sorted((r["tokens"], r["speedup_vs_bf16_compile"]) for r in rows
                     if r["contender"] == name and r["batch"] == batch and r.get("speedup_vs_bf16_compile"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image tokens")
    ax.set_ylabel("speedup vs bf16 + torch.compile")
    ax.set_title(f"one transformer forward, batch {batch}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main() -> int:
    if not ARGS.dry_run and not torch.cuda.is_available():
        print("bench_e2e: no CUDA GPU (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    dtype = torch.float32 if ARGS.dry_run else BF16
    cases = model_cases(ARGS.dry_run)
    if ARGS.models:
        wanted = {m.strip() for m in ARGS.models.split(",")}
        cases = [c for c in cases if c.name in wanted]
    batches = [2] if ARGS.dry_run else [int(b) for b in ARGS.batches.split(",")]
    floors = [f for case in cases for f in floor_rows(case.geometry, 2)]
    for f in floors:
        print("floor:", ", ".join(f"{k}={common.fmt(v)}" for k, v in f.items()), flush=True)
    rows, breakdown = [], []
    with common.TimeLimit() as limit:
        for case in cases:
            fp = case.build().to(device, dtype)
            for batch in batches:
                with torch.no_grad():
                    ref = _output(fp(**case.inputs(fp, batch, device, dtype)))
                for contender in contenders():
                    r = measure(case, fp, contender, batch, ref, device, dtype, cases[0])
                    rows.append(r)
                    print(", ".join(f"{k}={common.fmt(v)}" for k, v in r.items()), flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                base = next((r.get("ms") for r in rows if r["model"] == case.name and r["batch"] == batch
                             and r["contender"] == "bf16 + compile" and r.get("ms")), None)
                base = base or next(r["ms"] for r in rows if r["model"] == case.name and r["batch"] == batch
                                    and r["contender"] == "bf16 eager")
                for r in rows:
                    if r["model"] == case.name and r["batch"] == batch and r.get("ms"):
                        r["speedup_vs_bf16_compile"] = base / r["ms"]
            if not ARGS.no_breakdown and (case is cases[0] or not ARGS.dry_run):
                for label, make in (("bf16 eager", lambda m: m), ("dtq W8A8 fast path", _dtq("W8A8", False)),
                                    ("dtq W8A8 per-layer path", _dtq("W8A8", False, fuse=False))):
                    breakdown += block_breakdown(case, make(fp), max(batches), device, dtype, label)
            del fp
    header = common.env_header(device, note="random weights, one transformer forward; speedup vs bf16 + "
                                            "torch.compile (vs bf16 eager where compile did not run)")
    out_dir = common.results_dir(ARGS.out)
    cols = ["model", "tokens", "batch", "contender", "ms", "speedup_vs_bf16_compile", "peak_MB", "weights_MB",
            "rel_err_vs_bf16", "backends", "paths", "note"]
    paths = list(common.write_results("bench_e2e", header, rows, out_dir, columns=cols,
                                      notes=limit.notes + ["Floors per block (batch 2, H100 SXM):", "",
                                             common.to_markdown(floors), ""]))
    if breakdown:
        paths += common.write_results("bench_e2e_block_ops", header, breakdown, out_dir)
    plot = plot_speedup([r for r in rows if r.get("ms")], out_dir / "bench_e2e_speedup.png")
    print("wrote", *paths, plot or "(no plot: matplotlib missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
