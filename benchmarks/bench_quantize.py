"""Fused activation quantization kernels vs the device copy bandwidth, on DiT-XL/2 and Flux shapes.

    python benchmarks/bench_quantize.py [--out DIR] [--rep MS]   # CUDA
    python benchmarks/bench_quantize.py --dry-run                # CPU: tiny shapes, interpreter, proves it runs

These kernels are memory-bound: each reads x once and writes int8 codes once. GB/s counts the bytes
that must move (x read + codes written + scales; LayerNorm adds its [B, C] shift and scale), and is
compared with x.clone() measured in the same run (read + write of the bf16 x). Target: ≥ 80% of the
copy bandwidth at the large shapes.

The floor, before any measurement: bf16 input, so 2 B read + 1 B written = 3 B per element. At the
≈3.0 TB/s device copy measured on H100 SXM machines (a bf16 copy kernel; not a result of this repository):

| model | M | K | elements | bytes moved | floor µs |
|---|---|---|---|---|---|
| DiT-XL/2 | 512 | 1152 | 0.59 M | 1.8 MB | 0.59 |
| DiT-XL/2 | 2048 | 1152 | 2.36 M | 7.1 MB | 2.4 |
| DiT-XL/2 | 8192 | 1152 | 9.44 M | 28.3 MB | 9.4 |
| DiT-XL/2 | 512 | 4608 | 2.36 M | 7.1 MB | 2.4 |
| DiT-XL/2 | 2048 | 4608 | 9.44 M | 28.3 MB | 9.4 |
| DiT-XL/2 | 8192 | 4608 | 37.7 M | 113 MB | 38 |
| Flux | 4096 | 3072 | 12.6 M | 37.7 MB | 12.6 |

What to expect: below ≈5 µs (M = 512, and M = 2048 at K = 1152) launch overhead (≈2–4 µs) dominates
and no kernel can reach 80% of copy bandwidth; the copy itself is launch-bound there too, so the
ratio is still meaningful. The rotation adds a log2(P)-stage FWHT and a 3xTF32 H_m dot (cost analysis
in dtq_kernels/ops/triton/quantize.py): if a rotating row falls short of the plain one, that dot is
the first suspect. The "unfused eager" row (torch LayerNorm + modulate in bf16, then
quantize_per_token) is what the fusion saves. None of these expectations is a measurement: the table
this script writes is.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import _setup  # noqa: E402  (first: it picks the interpreter before triton loads)

ARGS = _setup.parse_args(__doc__.split("\n")[0], "tiny shapes on CPU (Triton interpreter)", sweep=False)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import dtq_kernels.ops as ops  # noqa: E402
from dtq_kernels import hadamard  # noqa: E402
from dtq_kernels.ops import reference  # noqa: E402

SHAPES = [("DiT-XL/2", m, k) for m in (512, 2048, 8192) for k in (1152, 4608)] + [("Flux", 4096, 3072)]
DRY_SHAPES = [("tiny (dry run)", 8, 1152), ("tiny (dry run)", 4, 3072)]
BATCHES = 2  # LayerNorm-modulate rows are 2 batches (CFG) of M/2 tokens
GROUPS = 10


class Inputs(NamedTuple):
    """bf16 activations and the small side inputs any provider may use (a tuple of tensors, so
    common.Rotating sizes its copies to defeat L2)."""
    x: torch.Tensor
    smooth: torch.Tensor
    shift: torch.Tensor
    mod: torch.Tensor
    table: torch.Tensor
    coef: torch.Tensor
    idx: torch.Tensor


def make_inputs(M, K, device) -> Inputs:
    x = torch.randn(M, K, device=device)
    x[:, :4] *= 30  # outlier channels
    return Inputs(x=x.bfloat16(), smooth=torch.rand(K, device=device) + 0.5,
                  shift=torch.randn(BATCHES, K, device=device).bfloat16(),
                  mod=(0.1 * torch.randn(BATCHES, K, device=device)).bfloat16(),
                  table=torch.linspace(0.01, 0.05, GROUPS, device=device),
                  coef=torch.tensor([[0.05, 0.0013]] * GROUPS, device=device),
                  idx=torch.tensor([3], dtype=torch.int32, device=device))


def providers(K):
    """(name, fn(inputs), extra bytes beyond x read + codes written + per-row scales) per contender."""
    rot = hadamard.supported(K)
    ln_bytes = 2 * BATCHES * K * 2  # shift + scale, bf16

    def ln(i, rotate):
        return ops.layernorm_modulate_quantize(i.x, i.shift, i.mod, i.x.shape[0] // BATCHES, 1e-6, 8,
                                               None, rotate)

    def unfused_ln(i):
        x = i.x
        b = torch.arange(x.shape[0], device=x.device) // (x.shape[0] // BATCHES)
        h = F.layer_norm(x, (x.shape[1],), eps=1e-6) * (1 + i.mod[b]) + i.shift[b]
        return ops.quantize_per_token(h, 8)

    rows = [
        ("copy x.clone()", lambda i: i.x.clone(), None),
        ("quantize_per_token", lambda i: ops.quantize_per_token(i.x, 8), 0),
        ("quantize_act smooth", lambda i: ops.quantize_act(i.x, 8, i.smooth), 4 * K),
        ("quantize_act static int6", lambda i: ops.quantize_act(i.x, 6, None, False, i.table, i.idx), 0),
        ("layernorm_modulate_quantize", lambda i: ln(i, False), ln_bytes),
        ("unfused eager LN+modulate, quantize_per_token", unfused_ln, ln_bytes),
        ("gelu_quantize tanh", lambda i: ops.gelu_quantize(i.x, 8, "tanh"), 0),
        ("quantize_two_region sign+gelu", lambda i: ops.quantize_two_region(i.x, i.coef, i.idx, 8, "sign",
                                                                            True, "tanh"), 0),
    ]
    if rot:
        rows += [
            ("quantize_act smooth+rotate", lambda i: ops.quantize_act(i.x, 8, i.smooth, True), 4 * K),
            ("layernorm_modulate_quantize rotate", lambda i: ln(i, True), ln_bytes),
            ("gelu_quantize tanh rotate", lambda i: ops.gelu_quantize(i.x, 8, "tanh", None, True), 0),
        ]
    return rows


def check_correct(inputs):
    """The fast kernels agree with the reference on this shape before anything is timed (±1 code where
    the kernel reassociates fp32 sums, as tests/test_quantize_act.py justifies)."""
    x, rot = inputs.x, hadamard.supported(inputs.x.shape[1])
    pairs = [(ops.quantize_act(x, 8, inputs.smooth, rot), reference.quantize_act(x, 8, inputs.smooth, rot, None, None)),
             (ops.gelu_quantize(x, 8, "tanh"), reference.gelu_quantize(x, 8, "tanh", None, False, None, None))]
    for (q, s), (q_ref, s_ref) in pairs:
        d = (q.int() - q_ref.int()).abs()
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 2e-3, "kernel disagrees with the reference"
        assert torch.allclose(s, s_ref, rtol=1e-5)


def main() -> int:
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_quantize: no CUDA GPU (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    shapes = DRY_SHAPES if ARGS.dry_run else SHAPES
    header = common.env_header(device, note="bench_quantize: bf16 inputs, int8 codes out; GB/s = bytes that "
                                            "must move / median time; pct_copy vs x.clone() in the same run")
    rows = []
    with common.TimeLimit() as limit:
        for model, M, K in shapes:
            with ops.use_backend("triton"):
                check_correct(make_inputs(M, K, device))
                shape_rows = []
                for name, fn, extra in providers(K):
                    runner = common.Rotating(lambda *t, fn=fn: fn(Inputs(*t)), lambda: make_inputs(M, K, device),
                                             device=device)
                    ms = common.time_ms(runner, device=device, rep_ms=ARGS.rep)
                    moved = 4 * M * K if extra is None else 2 * M * K + M * K + 4 * M + extra
                    shape_rows.append({"model": model, "M": M, "K": K, "provider": name, "ms": ms,
                                       "GB/s": moved / (ms * 1e-3) / 1e9, "bytes": moved})
            copy_gbs = shape_rows[0]["GB/s"]
            for r in shape_rows:
                r["pct_copy"] = 100.0 * r["GB/s"] / copy_gbs
                print(f"{model} {M}x{K} {r['provider']}: {common.fmt(r['ms'])} ms {common.fmt(r['GB/s'])} GB/s "
                      f"({common.fmt(r['pct_copy'])}% of copy)", flush=True)
            rows += shape_rows
    out = common.results_dir(ARGS.out)
    cols = ["model", "M", "K", "provider", "ms", "GB/s", "pct_copy", "bytes"]
    notes = limit.notes + ["Rows below ≈5 µs are launch-bound (see the floor table in benchmarks/bench_quantize.py)."]
    print("wrote", *map(str, common.write_results("bench_quantize", header, rows, out, cols, notes=notes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
