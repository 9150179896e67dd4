"""torch.library custom ops in the `dtq` namespace (torch.ops.dtq.*).

Each op has three places (docs/architecture.md): its schema + fake impl + dispatch in a family module here
(`quantize_ops`, `gemm_ops`, ...), its pure-torch reference in `reference.py`, and fast kernels in
`triton/` and `cuda.py` that register themselves with `_dispatch.register_kernel`.
"""
from . import gemm_ops, quantize_ops  # noqa: F401  (defines the ops)
from . import triton as _triton_kernels  # noqa: F401  (registers the Triton kernels)
from . import cuda as _cuda_kernels  # noqa: F401  (registers the _C kernels; importable without a GPU)
from ._dispatch import BACKENDS, CUDA_DEFAULTS, BackendError, kernels_for, last_backend, use_backend
from .gemm_ops import int8_gemm, int8_gemm_static, int8_gemm_two_region, int8_gemm_wzp
from .quantize_ops import quantize_per_token

__all__ = ["BACKENDS", "CUDA_DEFAULTS", "BackendError", "kernels_for", "last_backend", "use_backend",
           "int8_gemm", "int8_gemm_static", "int8_gemm_two_region", "int8_gemm_wzp", "quantize_per_token"]

# fused activation quantization (smoothing, Hadamard rotation, LayerNorm-modulate, GELU, two-region)
from .quantize_ops import gelu_quantize, layernorm_modulate_quantize, quantize_act, quantize_two_region  # noqa: E402

__all__ += ["gelu_quantize", "layernorm_modulate_quantize", "quantize_act", "quantize_two_region"]

# quantized attention (INT8 QKᵀ, 8-bit P·V; dynamic and static per-time-group modes)
from . import attention_ops  # noqa: E402,F401
from .attention_ops import quant_attention, quant_attention_static  # noqa: E402

__all__ += ["quant_attention", "quant_attention_static"]

# per-group W4A8 runs on int8_gemm; weight-only W4A16 and FP8 W8A8 have their own GEMMs
from .gemm_ops import GEMM_GROUP_SIZES, fp8_gemm, w4a16_gemm  # noqa: E402
from .quantize_ops import quantize_act_fp8  # noqa: E402

__all__ += ["GEMM_GROUP_SIZES", "fp8_gemm", "w4a16_gemm", "quantize_act_fp8"]

# W4A4: 4-bit (FP4 / INT4) weights and activations with block scales, and their activation quantizer
from . import w4a4_ops  # noqa: E402,F401
from .w4a4_ops import quantize_act_4bit, w4a4_gemm  # noqa: E402

__all__ += ["quantize_act_4bit", "w4a4_gemm"]
