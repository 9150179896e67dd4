"""Triton kernels. Importing this package registers them with the op dispatcher."""
from . import gemm_int8, quantize  # noqa: F401

# Every kernel module lists AOT_SPECS for the offline-compile check (aot.py).
KERNEL_MODULES = (quantize, gemm_int8,)

# quantized attention (append-only: other kernel families are added the same way)
from . import attention  # noqa: E402
KERNEL_MODULES += (attention,)

# W4A4 (FP4 / INT4 codes decoded to int8 in registers)
from . import gemm_w4a4, quantize_4bit  # noqa: E402
KERNEL_MODULES += (gemm_w4a4, quantize_4bit)
