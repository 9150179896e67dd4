"""End to end: one DiT-XL/2 transformer forward (the unit a sampler repeats) in bf16 vs dtq-quantized.

    python benchmarks/bench_e2e.py [--out DIR] [--rep MS]   # CUDA
    python benchmarks/bench_e2e.py --dry-run                # CPU: a 2-block DiT, one forward each

The same random-weight DiT-XL/2 (diffusers DiTTransformer2DModel, 28 blocks, width 1152, bf16) and the
same inputs for every contender, at 256 px (32x32 latents, 256 tokens) and 512 px (1024 tokens), batch 2
(classifier-free guidance doubles the batch). Per contender: median forward latency, peak GPU memory
of the forward, and the bytes of the model's weights (parameters + quantized buffers). Contenders:
* bf16: diffusers as shipped (SDPA attention);
* dtq viditq-w8a8: every block Linear a W8A8 QuantLinear (dynamic per-token activations);
* dtq viditq-w8a8 + quant attention: the same plus the dynamic quantized attention processor;
* dtq rtn-w4a8: int4 weights packed in the GEMM, static int8 activations (scales calibrated on random
  inputs: this row measures speed and memory, not quality);
* torchao int8 dynamic activation + int8 weight on every Linear, when `import torchao` works.
The layers the model adapter keeps in floating point (embeddings, adaLN modulation, final layer) stay
bf16 in every dtq row.

The floor, before any measurement (H100 SXM: BF16 989 TFLOP/s dense, INT8 1979 TOPS, HBM 3.35 TB/s).
Block GEMMs per forward: 28 blocks x 2·M·(4·1152² + 2·1152·4608) = 28 x 31.9 MFLOP per row of M.
256 px, M = 512 rows: 0.46 TFLOP -> 0.46 ms bf16 / 0.23 ms int8 at peak; weights 1.35 GB bf16 (of which
0.24 GB adaLN, kept bf16) -> 0.40 ms to read once in bf16, 0.27 ms with int8 block weights. So at 256 px
the forward is near the ridge for bf16 and memory-bound for int8: expect at most ~1.3-1.5x.
512 px, M = 2048 rows: 1.83 TFLOP -> 1.85 ms bf16 / 0.93 ms int8; attention (16 heads, 1024 tokens,
head dim 72) adds 28 x 4·B·H·S²·D = 0.27 TFLOP; compute-bound, so the ceiling is the INT8/BF16 ratio on the
GEMMs (2x at peak, 1.3-1.6x for a Triton kernel at 60-75 % of peak, see bench_gemm.py) minus the
activation-quantization passes (memory-bound, ~3 B per element; bench_quantize.py). Launch overhead
(~28 x 10 kernels) costs ~1 ms at 256 px unless the forward is CUDA-graphed; none of the rows is.
None of these expectations is a measurement: the table this script writes is.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Callable

import _setup  # noqa: E402  (first: it picks the interpreter before triton loads)

ARGS = _setup.parse_args(__doc__.split("\n")[0], "a 2-block DiT on CPU, one forward per contender")

import torch  # noqa: E402

import common  # noqa: E402
import dtq_kernels as dtq  # noqa: E402
from dtq_kernels.cli import drive_random_inputs, random_model  # noqa: E402
from dtq_kernels.eval.harness import weight_bytes  # noqa: E402
from dtq_kernels.nn.attention import set_quant_attention  # noqa: E402

BF16 = torch.bfloat16
RESOLUTIONS = [(256, 32), (512, 64)]  # (pixels, latent side)
DRY_RESOLUTIONS = [(64, 8)]
BATCH = 2


def build_dit(dry: bool, sample_size: int) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel
    size = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32) if dry else dict(num_layers=28)
    return random_model(DiTTransformer2DModel, 0, out_channels=8, sample_size=sample_size, **size)


def quantized(fp: torch.nn.Module, recipe: str, attention: bool = False) -> torch.nn.Module:
    model = copy.deepcopy(fp)
    plan = dtq.calibrate(model, recipe, progress=False, num_inference_steps=4,
                         run_fn=lambda m: drive_random_inputs(m, 2, 4, 2, None))
    dtq.quantize(model, plan)
    if attention:
        set_quant_attention(model)
    return model


def torchao_int8(fp: torch.nn.Module) -> torch.nn.Module:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip, reported in the table
        raise common.Skip(f"torchao not importable ({type(e).__name__}: {e})")
    model = copy.deepcopy(fp)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


CONTENDERS: list[tuple[str, Callable[[torch.nn.Module], torch.nn.Module]]] = [
    ("bf16 (diffusers, SDPA)", lambda fp: fp),
    ("dtq viditq-w8a8", lambda fp: quantized(fp, "viditq-w8a8")),
    ("dtq viditq-w8a8 + quant attention", lambda fp: quantized(fp, "viditq-w8a8", attention=True)),
    ("dtq rtn-w4a8 (packed int4 weights)", lambda fp: quantized(fp, "rtn-w4a8")),
    ("torchao int8 dynamic", torchao_int8),
]


def inputs(cfg, device, dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return dict(hidden_states=x.to(device, dtype), timestep=torch.full((BATCH,), 500, device=device),
                class_labels=torch.arange(BATCH, device=device))


def measure(name: str, make: Callable, fp: torch.nn.Module, device, dtype, rep: int) -> dict[str, Any]:
    row: dict[str, Any] = {"contender": name}
    try:
        model = make(fp)
        kw = inputs(fp.config, device, dtype)
        with torch.no_grad():
            ref = fp(**kw).sample.float()
            out = model(**kw).sample.float()  # also the warm-up (Triton compiles here)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                model(**kw)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = None
            ms = common.time_ms(lambda: model(**kw), device=device, rep_ms=rep)
        try:
            weights_mb, note = weight_bytes(model) / 1e6, ""
        except Exception as e:  # noqa: BLE001 - e.g. tensor subclasses without a plain storage: keep the timing
            weights_mb, note = None, f"weight bytes not countable: {type(e).__name__}"
    except common.Skip as e:
        return {**row, "note": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - a failing contender is reported in the table, not hidden
        return {**row, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    rel = float((out - ref).norm() / ref.norm())
    return {**row, "ms": ms, "weights_MB": weights_mb,
            "forward_peak_MB": None if peak is None else peak / 1e6, "rel_err_vs_bf16": rel, "note": note}


def main() -> int:
    if not ARGS.dry_run and not torch.cuda.is_available():
        print("bench_e2e: no CUDA GPU (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    dtype = torch.float32 if ARGS.dry_run else BF16
    rows = []
    for px, side in (DRY_RESOLUTIONS if ARGS.dry_run else RESOLUTIONS):
        fp = build_dit(ARGS.dry_run, side).to(device, dtype)
        for name, make in CONTENDERS:
            r = {"px": px, "tokens": (side // 2) ** 2, "batch": BATCH,
                 **measure(name, make, fp, device, dtype, ARGS.rep)}
            rows.append(r)
            print(", ".join(f"{k}={common.fmt(v)}" for k, v in r.items()), flush=True)
        base = next(r["ms"] for r in rows if r["px"] == px and r["contender"].startswith("bf16"))
        for r in rows:
            if r["px"] == px and r.get("ms"):
                r["speedup_vs_bf16"] = base / r["ms"]
        del fp
    header = common.env_header(device, note="DiT-XL/2 random weights, one transformer forward")
    cols = ["px", "tokens", "batch", "contender", "ms", "speedup_vs_bf16", "weights_MB", "forward_peak_MB",
            "rel_err_vs_bf16", "note"]
    paths = common.write_results("bench_e2e", header, rows, common.results_dir(ARGS.out), columns=cols)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
