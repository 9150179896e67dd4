"""Triton kernels. Importing this package registers them with the op dispatcher."""
from . import gemm_int8, quantize  # noqa: F401

# Every kernel module lists AOT_SPECS for the offline-compile check (aot.py).
KERNEL_MODULES = (quantize, gemm_int8,)
