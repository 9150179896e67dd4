"""Host cost of one dtq op call: where the time goes when the kernel itself is short.

    python benchmarks/bench_overhead.py [--out DIR]
    python benchmarks/bench_overhead.py --dry-run     # CPU: reference backend, proves the script runs

bench_gemm on an H200 (benchmarks/results/2026-12-04_NVIDIA_H200) timed every dtq GEMM at 0.13-0.35 ms for
shapes whose bf16 F.linear takes 8-12 µs (DiT-XL/2, M = 1 and 16), and the eager DiT-XL/2 forward with dtq
W8A8 at 2.3x the bf16 eager one: per call, something costs some 150 µs of host time, and a GPU waiting for
its host runs no faster with fewer bytes. This script splits one call into its layers, each timed as
back-to-back calls (wall clock over N calls, synchronised at the end only, so a layer that launches work
is timed at the host's rate, which is what bounds an eager model):

  1. torch.ops.dtq.<op>: the whole public op (torch.library custom op, argument checks, dispatch, kernel);
  2. the op's argument checks alone;
  3. dispatch() alone (backend choice, last_backend bookkeeping);
  4. the registered kernel function called directly (the Triton wrapper: config choice, allocation, launch);
  5. F.linear in bf16 on the same shape, the floor an eager framework call sets;
then cProfile's top entries over 300 calls of the whole op. No floor applies: this measures host time.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import _setup  # noqa: E402  (first: it picks the interpreter before triton loads)

ARGS = _setup.parse_args(__doc__.split("\n")[0], "CPU tensors, reference backend, few calls")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from dtq_kernels import ops  # noqa: E402
from dtq_kernels.ops import _dispatch, gemm_ops  # noqa: E402


def per_call_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(min(50, calls)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def cases(device: torch.device, M: int, K: int, N: int):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                    generator=g)
    a = torch.randint(-127, 128, (M, K), device=device, dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8, generator=g)
    sa = torch.rand(M, device=device, generator=g) + 0.5
    sw = torch.rand(N, device=device, generator=g) + 0.5
    wf = torch.randn(N, K, device=device, dtype=x.dtype, generator=g)
    gemm_args = (a, sa, w, sw, None, x.dtype)
    return {
        "int8_gemm": [
            ("1. torch.ops.dtq.int8_gemm", lambda: torch.ops.dtq.int8_gemm(*gemm_args)),
            ("2. argument checks", lambda: gemm_ops._check_int8_gemm(*gemm_args)),
            ("3. dispatch()", lambda: _dispatch.dispatch("int8_gemm", device)),
            ("4. kernel function", lambda: _dispatch.dispatch("int8_gemm", device)(*gemm_args)),
            ("5. F.linear bf16", lambda: F.linear(x, wf)),
        ],
        "quantize_per_token": [
            ("1. torch.ops.dtq.quantize_per_token", lambda: torch.ops.dtq.quantize_per_token(x, 8)),
            ("4. kernel function", lambda: _dispatch.dispatch("quantize_per_token", device)(x, 8)),
            ("5. x.clone()", lambda: x.clone()),
        ],
    }, (lambda: torch.ops.dtq.int8_gemm(*gemm_args))


def main() -> int:
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_overhead: no CUDA GPU (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    calls = 20 if ARGS.dry_run else 2000
    shapes = [(16, 64, 64)] if ARGS.dry_run else [(16, 1152, 1152), (4096, 1152, 1152)]
    header = common.env_header(device, note="bench_overhead: microseconds of wall time per call, "
                                            f"{calls} back-to-back calls, one sync at the end")
    rows, profiles = [], []
    with common.TimeLimit() as limit:
        for M, K, N in shapes:
            table, whole = cases(device, M, K, N)
            for op, layers in table.items():
                for name, fn in layers:
                    us = per_call_us(fn, calls, device)
                    rows.append({"M": M, "K": K, "N": N, "op": op, "layer": name, "us_per_call": us,
                                 "backend": ops.last_backend.get(op)})
                    print(f"{M}x{K}x{N} {op} {name}: {common.fmt(us)} µs/call", flush=True)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(min(300, calls)):
                whole()
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
            profiles.append(f"cProfile, {min(300, calls)} calls of torch.ops.dtq.int8_gemm at {M}x{K}x{N}:\n"
                            + text.getvalue())
            print(profiles[-1], flush=True)
    out = common.results_dir(ARGS.out)
    paths = common.write_results("bench_overhead", header, rows, out,
                                 ["M", "K", "N", "op", "layer", "us_per_call", "backend"],
                                 notes=limit.notes + ["```\n" + p + "\n```" for p in profiles])
    print("wrote", *map(str, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
