"""Quantized attention (dtq.quant_attention / quant_attention_static) vs torch SDPA bf16 and SageAttention.

    python benchmarks/bench_attention.py [--out DIR] [--rep MS] [--sweep]   # CUDA
    python benchmarks/bench_attention.py --dry-run                          # CPU: tiny shapes, proves it runs

Shapes: sequence 1024, 4096, 16384 (self-attention, Sq = Sk) x head dim 64, 72 (DiT-XL/2, PixArt), 128
(Flux, video DiTs), 16 heads, batch 16 / 4 / 1 so every shape does comparable work. Providers, each in
its native layout (SDPA [B, H, S, D]; dtq and SageAttention "NHD" [B, S, H, D], what diffusers' to_q
gives), all inputs bf16, all outputs bf16:
* torch SDPA bf16 with the FLASH_ATTENTION backend and with CUDNN_ATTENTION (a backend that refuses a
  shape is reported as skipped with torch's reason);
* SageAttention (PyPI `sageattention` 1.0.6, Triton: INT8 QKᵀ per block, FP16 P·V) when importable (the GPU
  machine is offline: carry its py3-none-any wheel in .whl/); head dim 72 zero-padded to 96 for it;
* dtq quant_attention with FP8 P·V (sm_89/90) and FP16 P·V, end to end (Q/K/V quantization kernels
  included), and the attention kernel alone on pre-quantized codes (to show what the prep costs);
* dtq quant_attention_static (two-region P, TQ-DiT), end to end.
Accuracy of every provider on the same inputs: cosine similarity and relative L2 against fp32 SDPA on
the first 1024 query rows. TFLOP/s counts 4·B·H·Sq·Sk·D (QKᵀ and P·V).
--sweep also times the dynamic kernel alone with every candidate tile config (SWEEP_CONFIGS) at sequence
>= 4096 (minutes: run it on its own, not inside gpu_check.sh's 150 s), to settle triton/attention.py attn_config (whose picks are not yet timed); configs that fail to compile
or run out of shared memory are reported, not fatal.

Targets (issue 4, H100): >= 1.5x SDPA bf16 at sequence >= 4096, and at least SageAttention's speed at
equal or better accuracy. Published reference points (head dim 128, bf16): FlashAttention-2 ~370,
cuDNN ~600, FA3 ~640 TFLOP/s; FA3 FP8 ~1170. Head dim 72 runs as 64 + 32 channels in the dtq kernel
(25% of its MMA work is padding), so expect its TFLOP/s (counted on 72) below those at 64 and 128.
No number in this file's output is claimed until it ran on a GPU.
"""
from __future__ import annotations

import sys
from typing import Callable

import _setup  # noqa: E402  (first: it picks the interpreter before triton loads)

ARGS = _setup.parse_args(__doc__.split("\n")[0], "one tiny shape on CPU (reference + interpreter)", sweep=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import dtq_kernels.ops as ops  # noqa: E402
from dtq_kernels.ops import reference  # noqa: E402
from dtq_kernels.ops.triton import attention as tri  # noqa: E402

BF16 = torch.bfloat16
HEADS = 16
SHAPES = [(16384 // s if s < 16384 else 1, s, d) for s in (1024, 4096, 16384) for d in (64, 72, 128)]  # (B, S, D)
DRY_SHAPES = [(1, 96, 64), (1, 96, 72)]
DRY_HEADS = 2
ACC_ROWS = 1024  # query rows compared with fp32 attention


def _dtq(op: str, backend: str, *extra) -> Callable:
    def call(q, k, v):
        with ops.use_backend(backend):
            return getattr(ops, op)(q, k, v, *extra)
    return call


def _static_tables(q, k, v):
    """Per-head absmax scales and a two-region P split at 2^-6, for one time group (as calibration makes)."""
    scales = [(t.float().abs().amax((0, 1, 3)) / 127)[None] for t in (q, k, v)]
    p_table = torch.tensor([[2.0 ** -6 / 127, -1.0 / 127]], device=q.device)
    return (*scales, p_table, torch.zeros(1, dtype=torch.int32, device=q.device))


SWEEP_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                 for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]


def _kernel_only(pv_format: str, config: dict | None = None) -> Callable:
    """The attention kernel alone on codes quantized beforehand (prep cost excluded)."""
    def prepare(q, k, v):
        B, _, H, D = q.shape
        hd = tri.head_dims(D)
        mult = D ** -0.5 * reference.LOG2E
        qc, qs = tri._quant_rows(q, hd, mult=mult, qmax=127.0)
        kc, ks = tri._quant_rows(k, hd, mult=1.0, qmax=127.0,
                                 mean=reference.attention_k_mean(k).reshape(B, H, D).contiguous())
        kind = tri.PV_FP8 if pv_format == "fp8_e4m3" else tri.PV_FP16
        vt, vs = tri._quant_v(v, hd, reference.attention_v_scale(v).reshape(B * H, D), kind, 0.0)
        return (lambda: tri._attend(q, hd, qc, qs, kc, ks, vt, vs, None, p_mode=tri.DYNAMIC, pv_kind=kind,
                                    config=config))
    return prepare


def providers(device: torch.device, dry: bool) -> list[tuple[str, str, Callable]]:
    """(name, layout "HND" or "NHD", fn(q, k, v) -> out in that layout; or a 'prepare' returning a thunk)."""
    out: list[tuple[str, str, Callable]] = []
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            out.append((f"torch SDPA bf16 {label}", "HND", sdpa))
        out.append(("SageAttention (Triton)", "NHD", _sage))
        cap = torch.cuda.get_device_capability(device)
        formats = (["fp8_e4m3"] if cap >= (8, 9) else []) + ["fp16"]
        backend = "triton"
    else:
        out.append(("torch SDPA fp32 (CPU)", "HND", lambda q, k, v: F.scaled_dot_product_attention(q, k, v)))
        formats = ["fp8_e4m3", "fp16"]
        backend = "triton" if dry else "reference"
    for fmt in formats:
        out.append((f"dtq quant_attention {fmt} P·V", "NHD", _dtq("quant_attention", backend, None, None, fmt)))
        out.append((f"dtq kernel only {fmt} P·V", "NHD-prepared", _kernel_only(fmt)))

    def static(q, k, v):
        with ops.use_backend(backend):
            return ops.quant_attention_static(q, k, v, None, *_static_tables(q, k, v), 8, "two_region")
    out.append(("dtq quant_attention_static two-region P", "NHD", static))
    return out


SAGE_HEAD_DIMS = (64, 96, 128)  # sageattention 1.0.6 asserts one of these


def _sage(q, k, v):
    """SageAttention 1.0.6 (Triton). Other head dims (72) are zero-padded to the next one it takes, with
    the softmax scale of the real head dim, as a user would run it; the pad copies are inside the timing."""
    try:
        from sageattention import sageattn
    except ImportError as e:
        raise common.Skip(f"sageattention not importable ({e}): carry sageattention-1.0.6-py3-none-any.whl in .whl/") \
            from None
    D = q.shape[-1]
    Dp = next((d for d in SAGE_HEAD_DIMS if d >= D), None)
    if Dp is None:
        raise common.Skip(f"head dim {D} > {SAGE_HEAD_DIMS[-1]}")
    if Dp != D:
        q, k, v = (F.pad(t, (0, Dp - D)) for t in (q, k, v))
    out = sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=D ** -0.5)
    return out[..., :D]


def accuracy(out_nhd: torch.Tensor, ref_nhd: torch.Tensor) -> tuple[float, float]:
    a, b = out_nhd[:, :ACC_ROWS].double().flatten(), ref_nhd.double().flatten()
    return float(F.cosine_similarity(a, b, dim=0)), float((a - b).norm() / b.norm())


def measure(name: str, layout: str, fn: Callable, q_nhd, k_nhd, v_nhd, ref, device, rep) -> dict:
    B, S, H, D = q_nhd.shape
    row = {"provider": name, "ms": None, "TFLOPs": None, "cos": None, "rel_l2": None, "note": ""}
    try:
        if layout == "HND":
            args = tuple(t.transpose(1, 2).contiguous() for t in (q_nhd, k_nhd, v_nhd))
            call = (lambda: fn(*args))
            to_nhd = (lambda o: o.transpose(1, 2))
        elif layout == "NHD-prepared":
            call = fn(q_nhd, k_nhd, v_nhd)
            to_nhd = (lambda o: o)
        else:
            call = (lambda: fn(q_nhd, k_nhd, v_nhd))
            to_nhd = (lambda o: o)
        out = call()
        row["cos"], row["rel_l2"] = accuracy(to_nhd(out).float(), ref)
        row["ms"] = common.time_ms(call, device, rep_ms=rep)
        row["TFLOPs"] = common.tops(4.0 * B * H * S * S * D, row["ms"])
    except common.Skip as e:
        row["note"] = f"skipped: {e}"
    except Exception as e:  # a backend refusing a shape, a config out of resources: reported with the reason
        row["note"] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row


def sweep(device, shapes, heads, dtype) -> list[dict]:
    fmt = "fp8_e4m3" if torch.cuda.get_device_capability(device) >= (8, 9) else "fp16"
    major = torch.cuda.get_device_capability(device)[0]
    rows = []
    for B, S, D in [s for s in shapes if s[1] >= 4096]:  # where the speed target is; ~100 compiles in all
        g = torch.Generator(device=device).manual_seed(S + D)
        q, k, v = (torch.randn(B, S, heads, D, device=device, generator=g, dtype=dtype) for _ in range(3))
        ref = F.scaled_dot_product_attention(*(t[:, :ACC_ROWS if i == 0 else None].transpose(1, 2).float()
                                               for i, t in enumerate((q, k, v)))).transpose(1, 2)
        pick = tri.attn_config(major, tri.head_dims(D).cw, tri.DYNAMIC)
        for cfg in SWEEP_CONFIGS:
            r = measure(f"dtq kernel only {fmt} P·V", "NHD-prepared", _kernel_only(fmt, cfg), q, k, v, ref, device,
                        ARGS.rep)
            rows.append({"B": B, "H": heads, "S": S, "D": D, **r, "heuristic_pick": cfg == pick,
                         "config": "BM{BLOCK_M} BN{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)})
            print(f"sweep B{B} S{S} D{D} {rows[-1]['config']}: {common.fmt(r['ms'])} ms {r['note']}", flush=True)
    return rows


def main() -> int:
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    shapes, heads = (DRY_SHAPES, DRY_HEADS) if ARGS.dry_run else (SHAPES, HEADS)
    dtype = torch.float32 if ARGS.dry_run else BF16
    header = common.env_header(device, note=f"bench_attention: self-attention, {heads} heads, inputs/outputs "
                                            f"{str(dtype).replace('torch.', '')}")
    contenders = providers(device, ARGS.dry_run)
    rows = []
    with common.TimeLimit() as limit:
        for B, S, D in shapes:
            g = torch.Generator(device=device).manual_seed(S + D)
            q, k, v = (torch.randn(B, S, heads, D, device=device, generator=g, dtype=dtype) for _ in range(3))
            ref = F.scaled_dot_product_attention(*(t[:, :ACC_ROWS if i == 0 else None].transpose(1, 2).float()
                                                   for i, t in enumerate((q, k, v)))).transpose(1, 2)
            shape_rows = []
            for name, layout, fn in contenders:
                r = {"B": B, "H": heads, "S": S, "D": D, **measure(name, layout, fn, q, k, v, ref, device, ARGS.rep)}
                shape_rows.append(r)
                print(f"B{B} S{S} D{D} {name}: {common.fmt(r['ms'])} ms {common.fmt(r['TFLOPs'])} TFLOP/s "
                      f"cos {common.fmt(r['cos'])} relL2 {common.fmt(r['rel_l2'])} {r['note']}", flush=True)
            timed = {r["provider"]: r["ms"] for r in shape_rows if r["ms"]}
            sdpa = [ms for n, ms in timed.items() if n.startswith("torch SDPA")]
            best_sdpa, sage = (min(sdpa) if sdpa else None), timed.get("SageAttention (Triton)")
            for r in shape_rows:
                r["speedup_vs_best_sdpa"] = best_sdpa / r["ms"] if best_sdpa and r["ms"] else None
                r["speedup_vs_sage"] = sage / r["ms"] if sage and r["ms"] else None
            rows += shape_rows
            del q, k, v, ref
    sweep_rows = sweep(device, shapes, heads, dtype) if ARGS.sweep and device.type == "cuda" else []
    out = common.results_dir(ARGS.out)
    cols = ["B", "H", "S", "D", "provider", "ms", "TFLOPs", "speedup_vs_best_sdpa", "speedup_vs_sage", "cos",
            "rel_l2", "note"]
    notes = limit.notes + [f"Accuracy: cosine and relative L2 vs fp32 SDPA over the first {ACC_ROWS} query rows of each shape.",
             "TFLOP/s = 4·B·H·S²·D / time (head dim 72 counted as 72 although the dtq kernel computes 96)."]
    paths = common.write_results("bench_attention", header, rows, out, cols, notes=notes)
    if sweep_rows:
        paths += common.write_results("bench_attention_sweep", header, sweep_rows, out,
                                      ["B", "H", "S", "D", "provider", "config", "heuristic_pick", "ms", "TFLOPs",
                                       "cos", "note"])
    print("wrote", *map(str, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
