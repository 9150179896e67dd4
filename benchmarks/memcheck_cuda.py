"""Runs every CUDA (_C) kernel once on small ragged shapes, for compute-sanitizer (benchmarks/gpu_check.sh):

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/memcheck_cuda.py

Each call is checked against the reference too, so a kernel that stays in bounds but computes garbage
also fails. M = 77 leaves a partial tile in M; N and K are DiT-XL/2 sizes.
"""
import sys

import torch

import dtq_kernels.ops as ops
from dtq_kernels.ops import cuda, reference


def main() -> int:
    if not torch.cuda.is_available() or not cuda.available():
        print(f"memcheck_cuda: nothing to check: {cuda.unavailable_reason() or 'no CUDA GPU'}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    M, K, N = 77, 1152, 4608
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g).cuda()
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).cuda()
    a_s, w_s, bias = torch.rand(M).cuda() * 0.01, torch.rand(N).cuda() * 1e-3, torch.randn(N).cuda()
    table, gi = torch.rand(3).cuda() * 0.01, torch.tensor([2], dtype=torch.int32).cuda()
    x = torch.randn(M, K, generator=g).cuda()
    calls = [("quantize_per_token", (x.to(dt), 8)) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        calls += [("int8_gemm", (a, a_s, w, w_s, bias, dt)), ("int8_gemm", (a, a_s[:1], w, w_s, None, dt)),
                  ("int8_gemm_static", (a, table, gi, w, w_s, bias, dt))]
    if torch.cuda.get_device_capability() == (9, 0):  # the mixed-input (packed int4) kernels: sm_90a only
        from dtq_kernels import formats
        w4 = formats.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=g)).cuda()
        w_s_g128 = torch.rand(N, K // 128).cuda() * 1e-3  # per-group W4A16 (the scaled mainloop)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            calls += [("int8_gemm", (a, a_s, w4, w_s, bias, dt)), ("int8_gemm", (a, a_s[:1], w4, w_s, None, dt)),
                      ("int8_gemm_static", (a, table, gi, w4, w_s, bias, dt))]
            calls += [("w4a16_gemm", (x.to(x_dt), w4, scale, bias if x_dt == dt else None, dt))
                      for x_dt in (torch.float16, torch.bfloat16) for scale in (w_s, w_s_g128)]
    with ops.use_backend("cuda"):
        for op, args in calls:
            out = getattr(ops, op)(*args)
            ref = getattr(reference, op)(*args)
            for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
                torch.testing.assert_close(o.float(), r.float(), rtol=1e-2, atol=1e-2 * float(r.float().abs().max()))
            print(f"memcheck_cuda: {op} {[tuple(t.shape) if torch.is_tensor(t) else t for t in args]} ok", flush=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
