"""Thin wrappers over dtq_kernels._C: raw device pointers plus the current stream.

Importing this module never fails: without the built extension, or without a usable GPU,
`available()` is False and `unavailable_reason()` says why; the kernels then raise that reason.
The op layer (gemm_ops.py, quantize_ops.py) validates what every backend needs; these wrappers then
check what the raw-pointer interface and the CUTLASS kernels need on top of it (dtype, contiguity,
16-byte alignment, K and N multiples of 16, one CUDA device) before any pointer reaches C++.
`validate_scaled_gemm` and `validate_w4a16_gemm` run without a GPU, so those errors are tested on CPU.
"""
from __future__ import annotations

import functools
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

from ._checks import check
from ._dispatch import BackendError, register_kernel

try:
    from .. import _C
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built (no nvcc or DTQ_SKIP_CUDA=1 at install time), or built for another Python
    _C = None
    _PKG = Path(__file__).resolve().parent.parent
    if not any(True for suffix in EXTENSION_SUFFIXES for _ in _PKG.glob("_C*" + suffix)):
        _IMPORT_ERROR = (f"dtq_kernels._C is not built (no _C extension in {_PKG}); to build it, install with "
                         "nvcc available: pip install --no-build-isolation --no-deps -e .")
    else:
        _IMPORT_ERROR = f"dtq_kernels._C failed to import: {e}"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    status = _C.cuda_status()
    return None if status == "ok" else f"CUDA is not usable here: {status}"


def available() -> bool:
    return unavailable_reason() is None


def _require(x: torch.Tensor, what: str) -> None:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"dtq cuda backend: {reason}")
    if x.device.type != "cuda":
        raise ValueError(f"dtq cuda backend: {what} must be a CUDA tensor, got {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"dtq cuda backend: {what} must be contiguous")


@register_kernel("quantize_per_token", "cuda")
def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    _require(x, "x")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"dtq cuda backend: x dtype {x.dtype} not supported")
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _C.quantize_per_token(x.data_ptr(), q.data_ptr(), scale.data_ptr(), M, K, _DTYPE_CODES[x.dtype], bits,
                              torch.cuda.current_stream(x.device).cuda_stream)
    return q, scale


# ------------------------------------------------------------------------- CUTLASS scaled GEMMs

GEMM_ALIGN_BYTES = 16  # TMA (sm_90a) and cp.async (sm_80/89) move 16-byte chunks of every row
GEMM_DIM_MULTIPLE = 16  # K: 16 int8 codes per 16-byte chunk; N: 16-byte output rows for TMA stores, any dtype
W4_K_MULTIPLE = 32  # K with packed int4 weights: 32 codes per 16-byte chunk of a weight row (TMA loads)
W4A16_GROUP_MULTIPLE = 64  # per-group W4A16: the scaled mainloop's K tile (128 bytes of 16-bit activations)


def validate_scaled_gemm(op: str, a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, group_idx: torch.Tensor | None = None,
                         codes: torch.dtype = torch.int8, packed_ok: bool = False) -> torch.Tensor | None:
    """What the CUTLASS kernels need beyond the op's own checks (gemm_ops.py); `codes` is the operand dtype
    (int8 or float8_e4m3fn); with packed_ok, w may also be packed int4 codes uint8 [N, K/2] (W4A8, K a multiple
    of 32). Returns bias as contiguous fp32 (the kernels read fp32; the reference adds bias.float() too), or
    None. Raises TypeError/ValueError naming the argument. Runs on any device: the device check comes last, so
    it is testable on CPU."""
    packed = packed_ok and w.dtype == torch.uint8
    check(a.dtype == codes, op, f"cuda backend: a must be {codes}, got {a.dtype}", TypeError)
    check(w.dtype == codes or packed, op, f"cuda backend: w must be {codes} [N, K]" + (
        "; packed int4 weights (uint8 [N, K/2]) have no CUDA kernel in this op, use the triton backend"
        if w.dtype == torch.uint8 else f", got {w.dtype}"), TypeError)
    check(w_scale.dim() == 1 and a_scale.dim() == 1, op, "cuda backend: a_scale and w_scale must be 1-D "
          f"(got {tuple(a_scale.shape)} and {tuple(w_scale.shape)}): per-group weight scales have no CUDA "
          "kernel, use the triton backend")
    w_k = 2 * w.shape[1] if packed else w.shape[1]
    check(a.dim() == 2 and w.dim() == 2 and a.shape[1] == w_k, op, f"cuda backend: a [M, K] and w "
          f"{'[N, K/2] (packed int4)' if packed else '[N, K]'} must share K, got {tuple(a.shape)} and {tuple(w.shape)}")
    M, K = a.shape
    N = w.shape[0]
    k_multiple = W4_K_MULTIPLE if packed else GEMM_DIM_MULTIPLE
    check(K > 0 and K % k_multiple == 0, op, f"cuda backend: K={K} must be a positive multiple of {k_multiple} "
          f"(rows of 16-byte chunks{' of packed int4 codes' if packed else ''})")
    check(N % GEMM_DIM_MULTIPLE == 0 and N > 0, op,
          f"cuda backend: N={N} must be a positive multiple of {GEMM_DIM_MULTIPLE}")
    check(M < 2 ** 31, op, f"cuda backend: M={M} must be below 2^31")
    check(a_scale.dtype == torch.float32 and w_scale.dtype == torch.float32, op,
          "cuda backend: a_scale and w_scale must be float32", TypeError)
    check(w_scale.shape[0] == N and (bias is None or tuple(bias.shape) == (N,)), op,
          f"cuda backend: w_scale and bias must have N={N} entries")
    if group_idx is None:
        check(a_scale.shape[0] in (M, 1), op, f"cuda backend: a_scale must have M={M} entries or 1, "
              f"got {a_scale.shape[0]}")
    else:
        check(group_idx.dtype == torch.int32 and group_idx.numel() == 1, op,
              "cuda backend: group_idx must be one int32", TypeError)
        check(a_scale.shape[0] >= 1, op, "cuda backend: the scale table is empty")
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    _check_memory(op, {"a": a, "a_scale": a_scale, "w": w, "w_scale": w_scale, "bias": bias, "group_idx": group_idx},
                  aligned=("a", "w", "w_scale", "bias"))
    return bias


def _check_memory(op: str, named: dict[str, torch.Tensor | None], aligned: tuple[str, ...]) -> None:
    """Every given tensor contiguous, those in `aligned` on a 16-byte boundary, all on one CUDA device
    (checked last, so the other errors are testable on CPU)."""
    for name, t in named.items():
        if t is not None:
            check(t.is_contiguous(), op, f"cuda backend: {name} must be contiguous")
    for name in aligned:
        t = named[name]
        if t is not None:
            check(t.data_ptr() % GEMM_ALIGN_BYTES == 0, op, f"cuda backend: {name} must start on a "
                  f"{GEMM_ALIGN_BYTES}-byte boundary (got address {t.data_ptr():#x}; .clone() realigns it)")
    for name, t in named.items():
        if t is not None:
            check(t.device.type == "cuda", op, f"cuda backend: {name} must be a CUDA tensor, got {t.device}")
    check(len({t.device for t in named.values() if t is not None}) == 1, op,
          "cuda backend: all tensors must be on one CUDA device")


_KIND_CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "w4a8": torch.int8}  # kind -> activation codes


def _scaled_gemm(kind: str, op: str, a, a_scale, a_scale_per_token: bool, group_idx, groups: int, w, w_scale, bias,
                 out_dtype: torch.dtype) -> torch.Tensor:
    bias = validate_scaled_gemm(op, a, a_scale, w, w_scale, bias, group_idx, _KIND_CODES[kind],
                                packed_ok=kind == "w4a8")
    check(out_dtype in _DTYPE_CODES, op, f"cuda backend: out_dtype {out_dtype} is not one of "
          f"{list(_DTYPE_CODES)}", TypeError)
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"dtq cuda backend: {reason}")
    M, N = a.shape[0], w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    with torch.cuda.device(a.device):
        _C.scaled_gemm(kind, a.data_ptr(), a_scale.data_ptr(), a_scale_per_token,
                       0 if group_idx is None else group_idx.data_ptr(), groups, w.data_ptr(), w_scale.data_ptr(),
                       0 if bias is None else bias.data_ptr(), out.data_ptr(), M, N, a.shape[1],
                       _DTYPE_CODES[out_dtype], torch.cuda.current_stream(a.device).cuda_stream)
    return out


def _require_hopper_for_packed_int4(a: torch.Tensor, op: str) -> None:
    """The packed-int4 (mixed-input) kernels exist for sm_90a only; CPU tensors fall through to the device check."""
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) != (9, 0):
        cap = torch.cuda.get_device_capability(a.device)
        raise BackendError(f"dtq.{op}: the cuda kernel for packed int4 weights is built for sm_90a (Hopper) only, "
                           f"got sm_{cap[0]}{cap[1]}; use the triton backend")


@register_kernel("int8_gemm", "cuda")
def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """CUTLASS W8A8: sm_90a TMA + wgmma (3.x), sm_80/sm_89 IMMA (2.x); scales and bias fused in the epilogue.
    Packed int4 weights (W4A8, per-channel scales): sm_90a only, CUTLASS's mixed-input GEMM (int4 converted
    exactly to int8 in registers, the same int32 accumulation and epilogue); other GPUs get a BackendError."""
    per_token = a_scale.shape[0] == a.shape[0] and a.shape[0] != 1
    if w.dtype == torch.uint8:
        _require_hopper_for_packed_int4(a, "int8_gemm")
        return _scaled_gemm("w4a8", "int8_gemm", a, a_scale, per_token, None, 1, w, w_scale, bias, out_dtype)
    return _scaled_gemm("int8", "int8_gemm", a, a_scale, per_token, None, 1, w, w_scale, bias, out_dtype)


@register_kernel("int8_gemm_static", "cuda")
def int8_gemm_static(a: torch.Tensor, scale_table: torch.Tensor, group_idx: torch.Tensor, w: torch.Tensor,
                     w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """int8_gemm with the per-tensor scale scale_table[group_idx[0]], which the epilogue reads on the device
    (index clamped to the table): no host sync, so it can be captured in a CUDA graph and replayed. Packed int4
    weights (W4A8): sm_90a only, as in int8_gemm."""
    if w.dtype == torch.uint8:
        _require_hopper_for_packed_int4(a, "int8_gemm_static")
        return _scaled_gemm("w4a8", "int8_gemm_static", a, scale_table, False, group_idx, scale_table.shape[0], w,
                            w_scale, bias, out_dtype)
    return _scaled_gemm("int8", "int8_gemm_static", a, scale_table, False, group_idx, scale_table.shape[0], w,
                        w_scale, bias, out_dtype)


@register_kernel("fp8_gemm", "cuda")
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """CUTLASS FP8 E4M3 W8A8 (fp32 accumulation): sm_90a TMA + wgmma (3.x), sm_89 mma.sync (2.x); the same
    fused epilogue as int8_gemm. Older GPUs get a BackendError (FP8 tensor cores start at sm_89)."""
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (8, 9):
        cap = torch.cuda.get_device_capability(a.device)
        raise BackendError(f"dtq.fp8_gemm: the cuda kernel needs FP8 tensor cores (sm_89/sm_90), "
                           f"got sm_{cap[0]}{cap[1]}")
    per_token = a_scale.shape[0] == a.shape[0] and a.shape[0] != 1
    return _scaled_gemm("fp8", "fp8_gemm", a, a_scale, per_token, None, 1, w, w_scale, bias, out_dtype)


# ------------------------------------------------------------ CUTLASS mixed-input W4A16 (sm_90a)

def validate_w4a16_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """What the CUTLASS W4A16 kernel needs beyond w4a16_gemm's own checks (gemm_ops.py): fp16/bf16 x [M, K],
    packed int4 w uint8 [N, K/2], fp32 w_scale per channel [N] or per group [N, K/G] with G a multiple of 64,
    K a multiple of 32, N of 16, 16-byte-aligned contiguous operands on one CUDA device. Returns the scales
    as the kernel reads them (per group: MN-major [K/G, N], the collective's layout; a copy unless w_scale
    is already the transpose of such a tensor), the group size (0 per channel) and the bias as contiguous
    fp32 or None. Raises TypeError/ValueError naming the argument; the device check comes last, so it is
    testable on CPU."""
    op = "w4a16_gemm"
    check(x.dtype in (torch.float16, torch.bfloat16), op,
          f"cuda backend: x must be torch.float16 or torch.bfloat16, got {x.dtype}", TypeError)
    check(w.dtype == torch.uint8, op, f"cuda backend: w must be packed int4 codes, uint8 [N, K/2], got {w.dtype}",
          TypeError)
    check(x.dim() == 2 and w.dim() == 2 and x.shape[1] == 2 * w.shape[1], op,
          f"cuda backend: x [M, K] and w [N, K/2] must share K, got {tuple(x.shape)} and {tuple(w.shape)}")
    check(out_dtype in _DTYPE_CODES, op, f"cuda backend: out_dtype {out_dtype} is not one of "
          f"{list(_DTYPE_CODES)}", TypeError)
    M, K = x.shape
    N = w.shape[0]
    check(K > 0 and K % W4_K_MULTIPLE == 0, op,
          f"cuda backend: K={K} must be a positive multiple of {W4_K_MULTIPLE} (16-byte rows of packed codes)")
    check(N % GEMM_DIM_MULTIPLE == 0 and N > 0, op,
          f"cuda backend: N={N} must be a positive multiple of {GEMM_DIM_MULTIPLE}")
    check(M < 2 ** 31, op, f"cuda backend: M={M} must be below 2^31")
    check(w_scale.dtype == torch.float32, op, "cuda backend: w_scale must be float32", TypeError)
    check(w_scale.dim() in (1, 2) and w_scale.shape[0] == N and (bias is None or tuple(bias.shape) == (N,)), op,
          f"cuda backend: w_scale [N] or [N, K/G] and bias [N] must have N={N} rows, got {tuple(w_scale.shape)}")
    group = 0
    if w_scale.dim() == 2:
        groups = w_scale.shape[1]
        group = K // groups if groups and K % groups == 0 else 0
        check(group > 0 and group % W4A16_GROUP_MULTIPLE == 0, op,
              f"cuda backend: per-group scales need a group size that is a multiple of {W4A16_GROUP_MULTIPLE} "
              f"(the kernel's K tile), got w_scale {tuple(w_scale.shape)} for K={K}")
        w_scale = w_scale.t().contiguous()  # [K/G, N]
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    _check_memory(op, {"x": x, "w": w, "w_scale": w_scale, "bias": bias}, aligned=("x", "w", "w_scale", "bias"))
    return w_scale, group, bias


@register_kernel("w4a16_gemm", "cuda")
def w4a16_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """CUTLASS mixed-input W4A16 on sm_90a (TMA + wgmma, fp32 accumulation). Per channel: int4 converted exactly to
    x's 16-bit type in registers, scale and bias fused in the epilogue. Per group: each code times its group's
    scale in fp32, rounded once to x's type in registers (the collective's scaled mode), bias in the epilogue.
    Other GPUs get a BackendError."""
    w_scale, group, bias = validate_w4a16_gemm(x, w, w_scale, bias, out_dtype)
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"dtq cuda backend: {reason}")
    cap = torch.cuda.get_device_capability(x.device)
    if cap != (9, 0):
        raise BackendError(f"dtq.w4a16_gemm: the cuda kernel is built for sm_90a (Hopper) only, got "
                           f"sm_{cap[0]}{cap[1]}; use the triton backend")
    M, N = x.shape[0], w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    with torch.cuda.device(x.device):
        _C.w4a16_gemm(x.data_ptr(), w.data_ptr(), w_scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
                      out.data_ptr(), M, N, x.shape[1], group, _DTYPE_CODES[x.dtype], _DTYPE_CODES[out_dtype],
                      torch.cuda.current_stream(x.device).cuda_stream)
    return out
