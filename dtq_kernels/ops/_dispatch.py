"""Backend registry and selection for the `dtq` ops (docs/architecture.md, "Dispatch").

Each op has a reference kernel (pure torch, CPU and CUDA) and optionally fast kernels ("triton",
"cuda"). Selection, in order:
1. a forced backend: `use_backend(name)` (a context manager, for tests and benchmarks) or the
   `DTQ_BACKEND=reference|triton|cuda` environment variable;
2. CPU tensors: the reference backend (Triton runs on CPU tensors only when forced and
   TRITON_INTERPRET=1 is set, which is how the test-suite exercises Triton kernels without a GPU);
3. CUDA tensors: the default recorded in CUDA_DEFAULTS for the op and the GPU's arch, else the first
   fast backend registered. Falling back to the reference on a GPU is logged as a warning.
Every choice is logged once per (op, backend, device) and the last one per op is kept in
`last_backend` so tests and benchmarks can assert which kernel actually ran.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

import torch

log = logging.getLogger("dtq_kernels.ops")

BACKENDS = ("reference", "triton", "cuda")

# op -> backend -> kernel function (same signature as the op)
_KERNELS: dict[str, dict[str, Callable]] = {}

# Default fast backend per op and CUDA arch ("sm80", "sm89", "sm90"; "any" when no arch entry).
# Choices come from benchmarks/results; an entry without a measurement says so in its comment.
CUDA_DEFAULTS: dict[str, dict[str, str]] = {
    # Not measured yet on a GPU: Triton is the default because it compiles for every arch we target.
    "quantize_per_token": {"any": "triton"},
    # Not measured yet on a GPU: the fused Triton kernel is the only fast kernel for these ops
    # (benchmarks/bench_quantize.py measures them against the device copy bandwidth).
    "quantize_act": {"any": "triton"},
    "layernorm_modulate_quantize": {"any": "triton"},
    "gelu_quantize": {"any": "triton"},
    "quantize_two_region": {"any": "triton"},
    # Not measured yet on a GPU: int8_gemm and int8_gemm_static also have CUTLASS kernels ("cuda": sm_80,
    # sm_89, sm_90a; with packed int4 weights: sm_90a), but no committed measurement shows them faster, so Triton stays the default
    # (benchmarks/bench_gemm.py times both beside cuBLAS bf16, torch._int_mm and FP8 _scaled_mm);
    # DTQ_BACKEND=cuda selects them.
    "int8_gemm": {"any": "triton"},
    "int8_gemm_static": {"any": "triton"},
    # The Triton GEMM family's other ops have no CUDA kernel.
    "int8_gemm_wzp": {"any": "triton"},
    "int8_gemm_two_region": {"any": "triton"},
    # Not measured yet on a GPU: the Triton kernels (gemm_int8.py) are the only fast ones, except fp8_gemm,
    # which also has CUTLASS kernels ("cuda": sm_89, sm_90a), and w4a16_gemm, per channel and per group
    # (CUTLASS mixed-input kernels, sm_90a only); DTQ_BACKEND=cuda selects them, not yet shown faster. fp8_gemm and
    # quantize_act_fp8 feed FP8 tensor cores: the kernel refuses sm_80 with a BackendError.
    "w4a16_gemm": {"any": "triton"},
    "fp8_gemm": {"any": "triton"},
    "quantize_act_fp8": {"any": "triton"},
    # Not measured yet on a GPU: the Triton quantized attention is the only fast kernel
    # (benchmarks/bench_attention.py compares it with SDPA flash/cuDNN bf16 and SageAttention).
    "quant_attention": {"any": "triton"},
    "quant_attention_static": {"any": "triton"},
    # Not measured yet on a GPU: the Triton W4A4 GEMM (4-bit codes decoded to int8 in registers, int8 MMA)
    # and its fused 4-bit activation quantizer are the only fast kernels (benchmarks/bench_gemm.py).
    "w4a4_gemm": {"any": "triton"},
    "quantize_act_4bit": {"any": "triton"},
}

last_backend: dict[str, str] = {}
_forced: list[str] = []
_logged: set[tuple[str, str, str]] = set()


class BackendError(RuntimeError):
    """A backend was requested that cannot serve this call."""


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _KERNELS.setdefault(op, {})[backend] = fn
        return fn
    return deco


def kernels_for(op: str) -> dict[str, Callable]:
    return dict(_KERNELS.get(op, {}))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend for the ops called inside the block (overrides DTQ_BACKEND)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> str | None:
    if _forced:
        return _forced[-1]
    env = os.environ.get("DTQ_BACKEND", "").strip().lower()
    if env and env not in BACKENDS:
        raise BackendError(f"DTQ_BACKEND={env!r} is not one of {BACKENDS}")
    return env or None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def _choose(op: str, device: torch.device) -> str:
    kernels = _KERNELS.get(op, {})
    forced = forced_backend()
    if device.type == "cpu":
        if forced in (None, "reference"):
            return "reference"
        if forced == "triton":
            if not triton_interpreting():
                raise BackendError(f"dtq.{op}: the triton backend runs on CPU tensors only with "
                                   "TRITON_INTERPRET=1 set before triton is imported")
            if "triton" not in kernels:
                raise BackendError(f"dtq.{op} has no triton kernel")
            return "triton"
        raise BackendError(f"dtq.{op}: the {forced} backend needs CUDA tensors, got CPU tensors")
    if device.type != "cuda":
        raise BackendError(f"dtq.{op}: unsupported device type {device.type!r}")
    if forced is not None:
        if forced not in kernels:
            raise BackendError(f"dtq.{op} has no {forced} kernel (available: {sorted(kernels)})")
        return forced
    defaults = CUDA_DEFAULTS.get(op, {})
    choice = defaults.get(cuda_arch(device), defaults.get("any"))
    if choice in kernels and _usable(choice):
        return choice
    for name in ("triton", "cuda"):
        if name in kernels and _usable(name):
            return name
    log.warning("dtq.%s: no fast kernel for %s; running the (slow) reference kernel", op, cuda_arch(device))
    return "reference"


def _usable(backend: str) -> bool:
    if backend == "cuda":
        from . import cuda
        return cuda.available()
    return True


def dispatch(op: str, device: torch.device) -> Callable:
    """The kernel that serves `op` for tensors on `device`, after logging the choice."""
    backend = _choose(op, device)
    last_backend[op] = backend
    key = (op, backend, str(device))
    if key not in _logged:
        _logged.add(key)
        log.info("dtq.%s: backend=%s on %s", op, backend, device)
    return _KERNELS[op][backend]
