"""Low-bit GEMMs (INT8, per-group W4A8, W4A16, FP8 W8A8) vs bf16 cuBLAS, torch._int_mm and _scaled_mm.

The shapes are the linear layers of DiT-XL/2, PixArt-Σ and Flux.

Floors for the new formats, before any measurement (H100 SXM: HBM 3.35 TB/s, BF16 989 TFLOP/s dense,
INT8/FP8 1979 TOPS dense). At M <= 16 a GEMM is a weight stream: time >= weight bytes / bandwidth
(codes + fp32 scales; W4-g128 = K·N/2 + 4·N·K/128 bytes). At M = 4096 it is compute-bound:

| model | K→N | bf16 weight µs | W8 weight µs | W4-g128 weight µs | M=4096 bf16 compute µs | M=4096 int8/fp8 compute µs |
|---|---|---|---|---|---|---|
| DiT-XL/2 | 1152→1152 | 0.79 | 0.40 | 0.21 | 11.0 | 5.5 |
| DiT-XL/2 | 1152→4608 | 3.17 | 1.59 | 0.84 | 44.0 | 22.0 |
| DiT-XL/2 | 4608→1152 | 3.17 | 1.59 | 0.84 | 44.0 | 22.0 |
| Flux | 3072→3072 | 5.63 | 2.82 | 1.50 | 78.2 | 39.1 |
| Flux | 3072→12288 | 22.54 | 11.28 | 5.99 | 312.7 | 156.3 |
| Flux | 12288→3072 | 22.54 | 11.27 | 5.99 | 312.7 | 156.3 |

What that allows (targets of the low-bit formats, ratios measured in one run): W4A16 and W4A8 can
reach the ≥ 3× over bf16 at M <= 16 only where the weight read dominates the ≈2-4 µs launch and tail
cost, i.e. the Flux widths (bf16 reads 22.5 µs, int4 6 µs); on DiT-XL/2's 1152-wide layers every
kernel is below a microsecond of traffic and the ratio is launch-bound, near 1×. W4A16 multiplies on
the 16-bit MMA, so at large M it is at best bf16 speed (the unpack costs a little); W4A8 (per channel
or per group) runs the int8 MMA, ceiling 2× bf16 at M >= 4096 (the per-group rescale adds a
[BM, BN] conversion and FMA per K-tile: ≈1/64 of the MMA work at group 128, more at 64). FP8 W8A8
has the same peak as torch._scaled_mm: the target is ≥ 0.95× its time with the scales and bias fused.
PixArt-Σ's linear widths are DiT-XL/2's (1152, 4608): its rows are the DiT-XL/2 rows.

    python benchmarks/bench_gemm.py [--out DIR] [--full] [--sweep] [--rep MS]   # CUDA
    python benchmarks/bench_gemm.py --dry-run                          # CPU: one tiny shape, proves it runs

What is timed (all outputs bf16 [M, N], bias included unless a row says otherwise):
* dtq int8_gemm (per-token a_scale, fused epilogue), int8_gemm_static (scale_table[group] read on the
  device), int8_gemm_two_region (two int8 accumulations), int8_gemm with int4 weights packed two per
  byte (W4A8: unpacked in registers; same int8 MMA work, half the weight bytes, so it can only gain
  where the weight read matters — small M), and dtq quantize_per_token + int8_gemm from
  bf16 activations (the dynamic W8A8 linear, comparable with torchao's);
* dtq w4a4_gemm (W4A4: 4-bit codes two per byte for both operands, fp32 block scales along K, decoded to
  int8 in registers for the int8 MMA): FP4 E2M1 with group 32 (HQ-DiT's format, MXFP4's block), INT4 with
  group 128 (equal bits), and dtq quantize_act_4bit (E2M1, group 32, online Hadamard rotation fused) +
  w4a4_gemm from bf16 activations: the whole W4A4 linear; and w4a4_gemm with the table decode, which the
  byte-permute (prmt) decode replaced as the default once measured (gemm_w4a4.PRMT_DECODE_DEFAULT);
* int8_gemm, int8_gemm_static and fp8_gemm on the CUDA backend ("[cuda]" rows; CUTLASS: sm_90a TMA +
  wgmma, sm_80/89 mma.sync; scales and bias fused in the epilogue), and int8_gemm with packed int4 weights
  (W4A8, per channel) and w4a16_gemm, per channel and g128 (CUTLASS mixed-input GEMM, sm_90a only), skipped
  with the reason where the extension is not built or not usable;
* torch.matmul bf16 (cuBLAS, via F.linear), torch._int_mm alone (int32 out) and with the scaling as
  separate eager kernels, torch._scaled_mm FP8 E4M3 with row-wise scales, torchao's int8 dynamic-
  activation config when `import torchao` works (otherwise a printed reason).
* dtq int8_gemm with per-group (g128) packed int4 weights (W4A8-g128), w4a16_gemm (bf16 x packed
  int4, per channel and g128; split-K at M <= 16), fp8_gemm (E4M3 per-token x per-channel, the peer of
  _scaled_mm row-wise) and quantize_act_fp8 + fp8_gemm from bf16 activations; FP8 rows need sm_89+.
A weight-bytes table per format is written with the results.
--sweep also times every candidate tile config of the dtq kernels per shape (to settle CONFIGS, and
gemm_w4a4's CONFIGS / GROUP16_CONFIGS at groups 16, 32, 128 with either decode).

The INT8 floor, before any measurement (H100 SXM: INT8 1979 TOPS dense, HBM 3.35 TB/s, so the INT8 ridge
is 591 ops/byte; BF16 989 TFLOP/s, ridge 295). Bytes = int8 a + int8 w + bf16 out (scales, bias ≈ 0):

| DiT-XL/2 M | K→N | int8 compute µs | int8 memory µs | ops/byte | bf16 compute µs | bf16 memory µs |
|---|---|---|---|---|---|---|
| 512 | 1152→1152 | 0.69 | 0.92 | 439 | 1.37 | 1.50 |
| 512 | 1152→4608 | 2.75 | 3.17 | 512 | 5.50 | 4.93 |
| 512 | 4608→1152 | 2.75 | 2.64 | 614 | 5.50 | 4.93 |
| 512 | 1152→3456 | 2.06 | 2.42 | 503 | 4.12 | 3.79 |
| 2048 | 1152→1152 | 2.75 | 2.51 | 647 | 5.50 | 3.61 |
| 2048 | 1152→4608 | 10.99 | 7.92 | 819 | 21.99 | 10.21 |
| 2048 | 4608→1152 | 10.99 | 5.81 | 1117 | 21.99 | 10.21 |
| 2048 | 1152→3456 | 8.24 | 6.12 | 796 | 16.49 | 8.01 |
| 8192 | 1152→1152 | 10.99 | 8.85 | 734 | 21.99 | 12.06 |
| 8192 | 1152→4608 | 43.95 | 26.94 | 964 | 87.94 | 31.34 |
| 8192 | 4608→1152 | 43.95 | 18.49 | 1404 | 87.94 | 31.34 |
| 8192 | 1152→3456 | 32.96 | 20.91 | 931 | 65.96 | 24.91 |

What to expect: at M=512 (DiT-XL/2 at 256 px with CFG) every GEMM is a few microseconds at the floor,
near the ridge, and fewer tiles than the 132 SMs: launch overhead (≈ 2-4 µs) and wave quantization
dominate, so INT8 can at best match bf16 there; its gain comes from halving the weight bytes and
fusing the scaling (torch._int_mm + eager scaling adds two passes over an int32/fp32 [M, N]). At
M ≥ 2048 the GEMMs are compute-bound for INT8 as for bf16, so the ceiling is 2x over bf16; a Triton
kernel typically reaches 60-75% of the INT8 peak on Hopper, so 1.3-1.6x over cuBLAS bf16 is the
realistic target, and parity with torch._int_mm's kernel while also doing the epilogue. FP8 row-wise
_scaled_mm has the same peak and is the peer to match. The two-region kernel issues two MMAs per
K-tile, so its ceiling is half of int8_gemm's when compute-bound: about bf16 speed.
W4A4 on sm_80/89/90 (no 4-bit MMA): the same int8 MMA work as int8_gemm with a quarter of the bf16
operand bytes, but every K-tile also decodes (BLOCK_M + BLOCK_N)·BLOCK_K nibbles (~9 int32 ops each) and
rescales the [BLOCK_M, BLOCK_N] partial sum in fp32 once per block (3 ops per element): by the count in
ops/triton/gemm_w4a4.py's docstring these, not the MMA, bound it, more so at group 32 than at 128. The
floor for it is therefore ALU-bound, not the int8 MMA peak; the first GPU run says by how much.
None of these expectations is a measurement: the tables this script writes are.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

M_VALUES = (1, 16, 64, 256, 1024, 4096, 16384)
DIT_WIDTHS = ((1152, 1152), (1152, 4608), (4608, 1152), (1152, 3456))
FLUX_WIDTHS = ((3072, 3072), (3072, 12288), (12288, 3072))
# --full: every M of the targets on every width (an estimated 10-15 min on an H100); the default run fits the 150 s a
# benchmark gets in gpu_check.sh: the small-M (<= 16) and large-M (4096) ends the targets are set at
FULL_SHAPES = ([("DiT-XL/2", m, k, n) for m in (*M_VALUES, 512, 2048, 8192) for k, n in DIT_WIDTHS]
               + [("Flux", m, k, n) for m in M_VALUES for k, n in FLUX_WIDTHS])
SHAPES = [(model, m, k, n) for model, widths in (("DiT-XL/2", DIT_WIDTHS[:3]), ("Flux", FLUX_WIDTHS))
          for m in (1, 16, 4096) for k, n in widths]
DRY_SHAPES = [("tiny (dry run)", 64, 128, 96)]

import _setup  # noqa: E402  (first: it picks the interpreter before triton loads)

ARGS = _setup.parse_args(__doc__.split("\n")[0], "one tiny shape on CPU (reference + interpreter)", sweep=True,
                         full="every M in 1..16384 on every width (FULL_SHAPES) instead of the quick grid")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import dtq_kernels.ops as ops  # noqa: E402
from dtq_kernels import formats  # noqa: E402
from dtq_kernels.ops import cuda, reference  # noqa: E402
from dtq_kernels.ops.triton import gemm_int8, gemm_w4a4  # noqa: E402

BF16 = torch.bfloat16


def _codes(*shape, device):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)


def _dtq(op: str, backend: str) -> Callable:
    def call(*args):
        with ops.use_backend(backend):
            return getattr(ops, op)(*args)
    return call


def providers(device: torch.device, dry: bool) -> list[tuple[str, Callable, Callable]]:
    """(name, fn, make_inputs(M, K, N)) for every contender."""
    dtq_backend = "triton"
    groups = 8

    def mk_int8(M, K, N):
        return (_codes(M, K, device=device), torch.rand(M, device=device) * 0.01, _codes(N, K, device=device),
                torch.rand(N, device=device) * 1e-3, torch.randn(N, device=device, dtype=BF16), BF16)

    def mk_static(M, K, N):
        a, _, w, w_s, b, dt = mk_int8(M, K, N)
        gi = torch.tensor([3], dtype=torch.int32, device=device)
        return a, torch.rand(groups, device=device) * 0.01, gi, w, w_s, b, dt

    def mk_w4(M, K, N):  # W4A8: int4 weight codes packed two per byte (half the weight bytes)
        a, a_s, _, w_s, b, dt = mk_int8(M, K, N)
        w4 = torch.randint(-8, 8, (N, K), dtype=torch.int8, device=device)
        return a, a_s, formats.pack_int4(w4), w_s, b, dt

    def mk_two(M, K, N):
        a, _, w, w_s, b, dt = mk_int8(M, K, N)
        gi = torch.tensor([3], dtype=torch.int32, device=device)
        return a, torch.rand(groups, 2, device=device) * 0.01, gi, w, w_s, b, dt

    def mk_bf16(M, K, N):
        return (torch.randn(M, K, device=device, dtype=BF16), torch.randn(N, K, device=device, dtype=BF16) * 0.02,
                torch.randn(N, device=device, dtype=BF16))

    def quant_gemm(x, w, w_s, b):
        q, s = ops.quantize_per_token(x)
        return ops.int8_gemm(q, s, w, w_s, b, BF16)

    def mk_quant(M, K, N):
        x, _, b = mk_bf16(M, K, N)
        return x, _codes(N, K, device=device), torch.rand(N, device=device) * 1e-3, b

    def mk_w4_g128(M, K, N):  # W4A8-g128: per-group scales [N, K/128], rescaled inside the K loop
        a, a_s, w4, _, b, dt = mk_w4(M, K, N)
        return a, a_s, w4, torch.rand(N, K // 128, device=device) * 1e-3, b, dt

    def mk_w4a16(M, K, N, group=None):
        x, _, b = mk_bf16(M, K, N)
        w4 = formats.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8, device=device))
        w_s = torch.rand(N, device=device) if group is None else torch.rand(N, K // group, device=device)
        return x, w4, w_s * 1e-2, b, BF16

    def need_fp8():
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise common.Skip("FP8 E4M3 needs a CUDA GPU with sm_89 or newer")

    def mk_dtq_fp8(M, K, N):
        need_fp8()
        a = formats.quantize_fp8_e4m3(torch.randn(M, K, device=device))
        w = formats.quantize_fp8_e4m3(torch.randn(N, K, device=device))
        return (a, torch.rand(M, device=device), w, torch.rand(N, device=device),
                torch.randn(N, device=device, dtype=BF16), BF16)

    def fp8_linear(x, w, w_s, b):
        q, s = ops.quantize_act_fp8(x)
        return ops.fp8_gemm(q, s, w, w_s, b, BF16)

    def mk_fp8_linear(M, K, N):
        need_fp8()
        x, _, b = mk_bf16(M, K, N)
        return x, formats.quantize_fp8_e4m3(torch.randn(N, K, device=device)), torch.rand(N, device=device) * 1e-3, b
    def mk_w4a4(fmt, group):
        def make(M, K, N):
            if K % group:
                raise common.Skip(f"K={K} is not a multiple of group {group}")
            a = torch.randint(0, 256, (M, K // 2), dtype=torch.uint8, device=device)
            w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
            a_s, w_s = torch.rand(M, K // group, device=device) * 0.1, torch.rand(N, K // group, device=device) * 1e-2
            return a, a_s, w, w_s, torch.randn(N, device=device, dtype=BF16), group, fmt, fmt, BF16
        return make

    def w4a4_other_decode(*args):  # the decode gemm_w4a4.PRMT_DECODE_DEFAULT does not choose for the op
        if device.type != "cuda":
            raise common.Skip("the prmt decode is inline PTX: CUDA only")
        return gemm_w4a4.launch(*args, prmt=not gemm_w4a4.PRMT_DECODE_DEFAULT)

    def w4a4_linear(x, w, w_s, b):
        a, a_s = ops.quantize_act_4bit(x, "fp4_e2m1", 32, None, True)
        return ops.w4a4_gemm(a, a_s, w, w_s, b, 32, "fp4_e2m1", "fp4_e2m1", BF16)

    def mk_w4a4_linear(M, K, N):
        from dtq_kernels import hadamard
        if not hadamard.supported(K):
            raise common.Skip(f"no Hadamard rotation of K={K}")
        x, _, b = mk_bf16(M, K, N)
        return x, torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device), \
            torch.rand(N, K // 32, device=device) * 1e-2, b

    def int_mm(a, a_s, w, w_s, b, dt):
        return torch._int_mm(a, w.t())

    def int_mm_scaled(a, a_s, w, w_s, b, dt):
        return (torch._int_mm(a, w.t()).float() * a_s[:, None] * w_s[None, :] + b.float()).to(dt)

    def mk_fp8(M, K, N):
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise common.Skip("FP8 _scaled_mm needs a CUDA GPU with sm_89 or newer")
        a = torch.randn(M, K, device=device).to(torch.float8_e4m3fn)
        w = torch.randn(N, K, device=device).to(torch.float8_e4m3fn)
        return (a, w, torch.rand(M, 1, device=device), torch.rand(1, N, device=device),
                torch.randn(N, device=device, dtype=BF16))

    def fp8_rowwise(a, w, sa, sb, b):
        return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=BF16, use_fast_accum=True)

    def needs_cuda_backend(make, sm90_only=False):
        def mk(M, K, N):
            if device.type != "cuda" or not cuda.available():
                raise common.Skip(f"the CUDA backend cannot run here: {cuda.unavailable_reason() or 'no GPU'}")
            if sm90_only and torch.cuda.get_device_capability(device) != (9, 0):
                raise common.Skip("this CUDA kernel is built for sm_90a (Hopper) only")
            return make(M, K, N)
        return mk

    out = [
        ("dtq int8_gemm", _dtq("int8_gemm", dtq_backend), mk_int8),
        ("dtq int8_gemm [cuda]", _dtq("int8_gemm", "cuda"), needs_cuda_backend(mk_int8)),
        ("dtq int8_gemm_static", _dtq("int8_gemm_static", dtq_backend), mk_static),
        ("dtq int8_gemm_static [cuda]", _dtq("int8_gemm_static", "cuda"), needs_cuda_backend(mk_static)),
        ("dtq int8_gemm_two_region", _dtq("int8_gemm_two_region", dtq_backend), mk_two),
        ("dtq int8_gemm, packed int4 weights (W4A8)", _dtq("int8_gemm", dtq_backend), mk_w4),
        ("dtq int8_gemm, packed int4 weights (W4A8) [cuda]", _dtq("int8_gemm", "cuda"),
         needs_cuda_backend(mk_w4, sm90_only=True)),
        ("dtq quantize_per_token + int8_gemm", quant_gemm, mk_quant),
        ("dtq int8_gemm, per-group g128 int4 weights (W4A8-g128)", _dtq("int8_gemm", dtq_backend), mk_w4_g128),
        ("dtq w4a16_gemm, per-channel int4 (W4A16)", _dtq("w4a16_gemm", dtq_backend), mk_w4a16),
        ("dtq w4a16_gemm, per-channel int4 (W4A16) [cuda]", _dtq("w4a16_gemm", "cuda"),
         needs_cuda_backend(mk_w4a16, sm90_only=True)),
        ("dtq w4a16_gemm, g128 int4 (W4A16-g128)", _dtq("w4a16_gemm", dtq_backend),
         lambda M, K, N: mk_w4a16(M, K, N, 128)),
        ("dtq w4a16_gemm, g128 int4 (W4A16-g128) [cuda]", _dtq("w4a16_gemm", "cuda"),
         needs_cuda_backend(lambda M, K, N: mk_w4a16(M, K, N, 128), sm90_only=True)),
        ("dtq fp8_gemm (E4M3, row-wise scales)", _dtq("fp8_gemm", dtq_backend), mk_dtq_fp8),
        ("dtq fp8_gemm (E4M3, row-wise scales) [cuda]", _dtq("fp8_gemm", "cuda"), needs_cuda_backend(mk_dtq_fp8)),
        ("dtq quantize_act_fp8 + fp8_gemm", fp8_linear, mk_fp8_linear),
        ("dtq w4a4_gemm fp4_e2m1 g32 (W4A4 FP4)", _dtq("w4a4_gemm", dtq_backend), mk_w4a4("fp4_e2m1", 32)),
        ("dtq w4a4_gemm int4 g128 (W4A4 INT4)", _dtq("w4a4_gemm", dtq_backend), mk_w4a4("int4", 128)),
        (f"dtq w4a4_gemm fp4_e2m1 g32, {'table' if gemm_w4a4.PRMT_DECODE_DEFAULT else 'prmt'} decode",
         w4a4_other_decode, mk_w4a4("fp4_e2m1", 32)),
        ("dtq quantize_act_4bit(rotate) + w4a4_gemm fp4_e2m1 g32", w4a4_linear, mk_w4a4_linear),
        ("torch F.linear bf16", F.linear, mk_bf16),
        ("torch._int_mm (int32 out)", int_mm, mk_int8),
        ("torch._int_mm + eager scaling", int_mm_scaled, mk_int8),
        ("torch._scaled_mm fp8 rowwise", fp8_rowwise, mk_fp8),
    ]
    torchao_linear = _torchao_provider(device)
    if torchao_linear is not None:
        out.append(torchao_linear)
    if dry:
        out.append(("dtq int8_gemm (reference backend)", _dtq("int8_gemm", "reference"), mk_int8))
    return out


_TORCHAO_SKIP: list[str] = []


def _torchao_provider(device):
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip, printed below
        _TORCHAO_SKIP.append(f"torchao skipped: import failed ({type(e).__name__}: {e})")
        print(_TORCHAO_SKIP[-1])
        return None
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Config
        config = Config()
    except ImportError:
        from torchao.quantization import int8_dynamic_activation_int8_weight
        config = int8_dynamic_activation_int8_weight()

    def mk(M, K, N):
        lin = torch.nn.Linear(K, N, bias=True, device=device, dtype=BF16)
        quantize_(lin, config)
        return lin, torch.randn(M, K, device=device, dtype=BF16)

    return ("torchao int8 dynamic act + int8 weight", lambda lin, x: lin(x), mk)


def check_correct(device, M, K, N) -> None:
    """The dtq kernels give the reference's answer on this shape before they are timed."""
    g = torch.Generator(device="cpu").manual_seed(M + K + N)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g).to(device)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).to(device)
    a_s, w_s = torch.rand(M, device=device) * 0.01, torch.rand(N, device=device) * 1e-3
    coef, gi = torch.rand(2, 2, device=device) * 0.01, torch.tensor([1], dtype=torch.int32, device=device)
    w4 = formats.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=g)).to(device)
    a4 = torch.randint(0, 256, (M, K // 2), dtype=torch.uint8, generator=g).to(device)
    w44 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g).to(device)
    s4a, s4w = torch.rand(M, K // 32, device=device), torch.rand(N, K // 32, device=device) * 1e-2
    for op, args in (("int8_gemm", (a, a_s, w, w_s, None, torch.float32)),
                     ("int8_gemm_two_region", (a, coef, gi, w, w_s, None, torch.float32)),
                     ("int8_gemm", (a, a_s, w4, w_s, None, torch.float32)),
                     ("w4a4_gemm", (a4, s4a, w44, s4w, None, 32, "fp4_e2m1", "int4", torch.float32)),
                     ("w4a4_gemm prmt", (a4, s4a, w44, s4w, None, 32, "fp4_e2m1", "int4", torch.float32))):
        if op == "w4a4_gemm prmt":
            if device.type != "cuda":
                continue
            runs = {"triton prmt": lambda: gemm_w4a4.launch(*args, prmt=True)}
            ref = reference.w4a4_gemm(*args)
        else:
            ref = getattr(reference, op)(*args)
            runs = {"triton": lambda: _dtq(op, "triton")(*args)}
            if device.type == "cuda" and cuda.available() and op == "int8_gemm" and (
                    args[2].dtype == torch.int8 or torch.cuda.get_device_capability(device) == (9, 0)):
                runs["cuda"] = lambda: _dtq(op, "cuda")(*args)  # packed int4 (W4A8): sm_90a only
        # fp32 epilogue differs only by FMA contraction: a few fp32 roundings (tests/test_gemm_int8.py);
        # w4a4_gemm may contract once per block of 32, K/32 + 2 roundings of terms that partly cancel
        # (tests/test_w4a4.py), so it gets 10x the room
        room = 1e-4 if op.startswith("w4a4_gemm") else 1e-5
        for backend, run in runs.items():
            out = run()
            if not torch.allclose(out, ref, rtol=room, atol=room * float(ref.abs().max())):
                raise AssertionError(f"dtq {op} ({backend}) disagrees with the reference on {M}x{K}x{N}: "
                                     f"max |Δ| {float((out - ref).abs().max())}")
    # the new formats, each vs its reference: per-group W4A8 (exact integer groups, FMA contraction per
    # group), W4A16 (fp32 sums in another order: ≤ 2(K+4)·2^-24 of the magnitude) and FP8 (Hopper's FP8
    # MMA adds within a K-tile at ≈14 bits: 2^-13 of the magnitude); tests/test_gemm_lowbit.py
    x = torch.randn(M, K, generator=g).to(device, BF16)
    ws_g = torch.rand(N, K // 128, device=device) * 1e-3
    c4 = formats.unpack_int4(w4).abs()  # int8 codes (group_scaled_matmul multiplies integers)
    checks = [("int8_gemm", (a, a_s, w4, ws_g, None, torch.float32),
               reference.group_scaled_matmul(a.abs(), c4, ws_g) * a_s[:, None], 2 * (K + 4) * 2.0 ** -24),
              ("w4a16_gemm", (x, w4, ws_g, None, torch.float32),  # per group: x times the bf16-rounded weights
               x.float().abs() @ reference.dequantize_w4_groups(formats.unpack_int4(w4), ws_g, BF16).float().abs().T,
               2 * (K + 4) * 2.0 ** -24),
              ("w4a16_gemm", (x, w4, w_s, None, torch.float32),
               (x.float().abs() @ c4.float().T) * w_s, 2 * (K + 4) * 2.0 ** -24)]
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9):
        a8, w8 = formats.quantize_fp8_e4m3(a.float()), formats.quantize_fp8_e4m3(w.float())
        mag = (a8.float().abs() @ w8.float().abs().T) * a_s[:, None] * w_s
        checks.append(("fp8_gemm", (a8, a_s, w8, w_s, None, torch.float32), mag, 2.0 ** -13))
    for op, args, mag, rel_bound in checks:
        ref = getattr(reference, op)(*args)
        cuda_kernel = op == "fp8_gemm" or (op == "w4a16_gemm" and device.type == "cuda"
                                           and torch.cuda.get_device_capability(device) == (9, 0))
        backends = ["triton"] + (["cuda"] if cuda_kernel and device.type == "cuda" and cuda.available() else [])
        for backend in backends:
            out = _dtq(op, backend)(*args)
            excess = float(((out - ref).abs() - rel_bound * mag).max())
            if excess > 0:
                raise AssertionError(f"dtq {op} ({backend}) disagrees with the reference on {M}x{K}x{N}: "
                                     f"max |Δ| {float((out - ref).abs().max())}, {excess} over the bound")


WEIGHT_FORMATS = {  # bytes per weight element, and per output channel of scales, as QuantLinear stores them
    "bf16": lambda k, n: 2 * k * n,
    "int8 per channel (W8A8)": lambda k, n: k * n + 4 * n,
    "fp8_e4m3 per channel (FP8 W8A8)": lambda k, n: k * n + 4 * n,
    "int4 per channel, packed (W4A8 / W4A16)": lambda k, n: k * n // 2 + 4 * n,
    "int4 g128, packed (W4A8-g128 / W4A16-g128)": lambda k, n: k * n // 2 + 4 * n * (k // 128),
    "int4 g64, packed": lambda k, n: k * n // 2 + 4 * n * (k // 64),
    "fp4 / int4 g32, packed (W4A4 g32, MXFP4-sized blocks)": lambda k, n: k * n // 2 + 4 * n * (k // 32),
    "fp4 g16, packed (W4A4 g16, NVFP4-sized blocks, fp32 scales)": lambda k, n: k * n // 2 + 4 * n * (k // 16),
}


def weight_bytes_rows(shapes) -> list[dict[str, Any]]:
    """Weight bytes per format for every distinct (K, N) of the run (codes + fp32 scales)."""
    rows = []
    for model, k, n in dict.fromkeys((model, k, n) for model, _, k, n in shapes):
        bf16 = WEIGHT_FORMATS["bf16"](k, n)
        for fmt, size in WEIGHT_FORMATS.items():
            rows.append({"model": model, "K": k, "N": n, "format": fmt, "bytes": size(k, n),
                         "vs_bf16": size(k, n) / bf16})
    return rows


def measure(name, fn, make, M, K, N, device, rep) -> dict[str, Any]:
    row: dict[str, Any] = {"provider": name}
    try:
        runner = common.Rotating(fn, lambda: make(M, K, N), device=device)
        runner()
        ms = common.time_ms(runner, device=device, rep_ms=rep)
    except common.Skip as e:
        return {**row, "ms": None, "TOPS": None, "note": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - a failing peer is reported in the table, not hidden
        return {**row, "ms": None, "TOPS": None, "note": f"failed: {type(e).__name__}: {str(e)[:160]}"}
    return {**row, "ms": ms, "TOPS": common.tops(2.0 * M * N * K, ms), "note": ""}


def _sweep_kinds(device):
    """(name, kind, group, make(M, K, N) -> launch args, launch kwargs) for every kernel the sweep times."""
    gi = torch.tensor([0], dtype=torch.int32, device=device)
    bias = lambda N: torch.randn(N, device=device, dtype=BF16)  # noqa: E731

    def int8(M, K, N):
        return (_codes(M, K, device=device), _codes(N, K, device=device), torch.rand(N, device=device), bias(N),
                BF16), dict(a_scale=torch.rand(M, device=device), ascale=gemm_int8.PER_ROW)

    def two_region(M, K, N):
        args, _ = int8(M, K, N)
        return args, dict(a_scale=torch.rand(1, 2, device=device), ascale=gemm_int8.TABLE, group_idx=gi,
                          two_region=True)

    def w4_g128(M, K, N):
        w4 = formats.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8, device=device))
        return (_codes(M, K, device=device), w4, torch.rand(N, K // 128, device=device), bias(N), BF16), \
            dict(a_scale=torch.rand(M, device=device), ascale=gemm_int8.PER_ROW)

    def w4a16_g128(M, K, N):
        (_, w4, w_s, b, dt), _ = w4_g128(M, K, N)
        return (torch.randn(M, K, device=device, dtype=BF16), w4, w_s, b, dt), \
            dict(a_scale=None, ascale=gemm_int8.NO_ASCALE)

    def fp8(M, K, N):
        return (formats.quantize_fp8_e4m3(torch.randn(M, K, device=device)),
                formats.quantize_fp8_e4m3(torch.randn(N, K, device=device)), torch.rand(N, device=device), bias(N),
                BF16), dict(a_scale=torch.rand(M, device=device), ascale=gemm_int8.PER_ROW)

    kinds = [("int8_gemm", gemm_int8.INT8, None, int8), ("two_region", gemm_int8.TWO_REGION_KIND, None, two_region),
             ("int8_gemm W4A8-g128", gemm_int8.W4, 128, w4_g128), ("w4a16_gemm g128", gemm_int8.W4A16, 128, w4a16_g128)]
    if torch.cuda.get_device_capability(device) >= (8, 9):
        kinds.append(("fp8_gemm", gemm_int8.FP8, None, fp8))
    return kinds


def sweep(device, shapes, rep) -> list[dict[str, Any]]:
    """Every candidate config of every kernel kind per shape (W4A16 / W4A8 at M <= 16 also the 16-row tile
    with split-K 1/2/4/8)."""
    major = torch.cuda.get_device_capability(device)[0]
    rows = []
    for model, M, K, N in shapes:
        for name, kind, group, make_launch in _sweep_kinds(device):
            picked = gemm_int8.choose_config(device, M, N, False, kind=kind, K=K, group=group)
            configs = list(gemm_int8.config_candidates(kind, major, group))
            if kind in (gemm_int8.W4A16, gemm_int8.W4) and M <= 16:  # the 16-row tile, with split-K
                small = configs[-1] if kind == gemm_int8.W4A16 else gemm_int8.W4_SMALL_M_CONFIGS[group]
                configs += [small._replace(split_k=s) for s in (1, 2, 4, 8) if small._replace(split_k=s) not in configs]
            for cfg in configs:
                def fn(args, kwargs, cfg=cfg):
                    return gemm_int8.launch(*args, **kwargs, config=cfg)

                r = measure(name, fn, lambda M, K, N, mk=make_launch: mk(M, K, N), M, K, N, device, rep)
                rows.append({"model": model, "M": M, "K": K, "N": N, "config": "x".join(map(str, cfg)),
                             "heuristic_pick": picked == cfg, **r})
                print(f"sweep {model} {M}x{K}x{N} {name} {rows[-1]['config']}: {common.fmt(r['ms'])} ms", flush=True)
        rows += _sweep_w4a4(device, major, model, M, K, N, rep)
    return rows


def _sweep_w4a4(device, major, model, M, K, N, rep) -> list[dict[str, Any]]:
    """Every W4A4 candidate tile (group 16 has its own table) at groups 16, 32 and 128, E2M1 operands, with
    either decode (the default arithmetic one and the byte-permute one)."""
    rows = []
    for group, prmt in ((g, p) for g in (16, 32, 128) for p in (False, True)):
        table = gemm_w4a4.GROUP16_CONFIGS if group == 16 else gemm_w4a4.CONFIGS
        for cfg in table[90 if major == 9 else 80]:
            def fn(a, a_s, w, w_s, b, g, fa, fw, dt, cfg=cfg, prmt=prmt):
                return gemm_w4a4.launch(a, a_s, w, w_s, b, g, fa, fw, dt, config=cfg, prmt=prmt)

            def make(M, K, N, group=group):
                return (torch.randint(0, 256, (M, K // 2), dtype=torch.uint8, device=device),
                        torch.rand(M, K // group, device=device),
                        torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device),
                        torch.rand(N, K // group, device=device), torch.randn(N, device=device, dtype=BF16), group,
                        "fp4_e2m1", "fp4_e2m1", BF16)
            chosen = gemm_w4a4.choose_config(device, M, N, group) == cfg._replace(block_k=gemm_w4a4.block_k(group))
            r = measure(f"w4a4_gemm g{group}{' prmt' if prmt else ''}", fn, make, M, K, N, device, rep)
            rows.append({"model": model, "M": M, "K": K, "N": N, "config": "x".join(map(str, cfg)),
                         "heuristic_pick": chosen, **r})
            print(f"sweep {model} {M}x{K}x{N} {r['provider']} {rows[-1]['config']}: {common.fmt(r['ms'])} ms",
                  flush=True)
    return rows


def main() -> int:
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gemm: no CUDA GPU (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    shapes = DRY_SHAPES if ARGS.dry_run else FULL_SHAPES if ARGS.full else SHAPES
    header = common.env_header(device, note="bench_gemm: bf16 outputs, bias included unless noted")
    rows = []
    contenders = providers(device, ARGS.dry_run)
    with common.TimeLimit() as limit:
        for model, M, K, N in shapes:
            check_correct(device, M, K, N)
            shape_rows = []
            for name, fn, make in contenders:
                r = {"model": model, "M": M, "K": K, "N": N, **measure(name, fn, make, M, K, N, device, ARGS.rep)}
                shape_rows.append(r)
                print(f"{model} {M}x{K}x{N} {name}: {common.fmt(r['ms'])} ms {common.fmt(r['TOPS'])} TOPS {r['note']}",
                      flush=True)
            base = next(r["ms"] for r in shape_rows if r["provider"] == "torch F.linear bf16")
            scaled = next(r["ms"] for r in shape_rows if r["provider"] == "torch._scaled_mm fp8 rowwise")
            for r in shape_rows:
                r["speedup_vs_bf16"] = base / r["ms"] if base and r["ms"] else None
                r["speedup_vs_scaled_mm"] = scaled / r["ms"] if scaled and r["ms"] else None
            rows += shape_rows
    out = common.results_dir(ARGS.out)
    cols = ["model", "M", "K", "N", "provider", "ms", "TOPS", "speedup_vs_bf16", "speedup_vs_scaled_mm", "note"]
    paths = common.write_results("bench_gemm", header, rows, out, cols, notes=limit.notes + _TORCHAO_SKIP)
    paths += common.write_results("bench_gemm_weight_bytes", header, weight_bytes_rows(shapes), out,
                                  ["model", "K", "N", "format", "bytes", "vs_bf16"])
    if ARGS.sweep and device.type == "cuda":
        srows = sweep(device, shapes, ARGS.rep)
        paths += common.write_results("bench_gemm_sweep", header, srows, out,
                                      ["model", "M", "K", "N", "provider", "config", "heuristic_pick", "ms", "TOPS",
                                       "note"])
    print("wrote", *map(str, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
