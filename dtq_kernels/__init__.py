"""dtq_kernels: real low-bit inference for Diffusion Transformers (docs/architecture.md).

    import dtq_kernels as dtq
    plan = dtq.calibrate(pipe, "tqdit-w8a8", num_samples=32, num_inference_steps=25)
    dtq.quantize(pipe.transformer, plan)
    dtq.save_quantized(pipe.transformer, "out/")
"""
from . import ops  # noqa: F401  (registers torch.ops.dtq.*)
from .calib import calibrate, recipes
from .checkpoint import load_quantized, save_quantized
from .nn.linear import QuantLinear
from .nn.spec import LinearQuantSpec
from .plan import LayerPlan, QuantPlan
from .quantize import quantize

__version__ = "0.1.0"
__all__ = ["calibrate", "quantize", "save_quantized", "load_quantized", "QuantLinear", "LinearQuantSpec",
           "recipes", "QuantPlan", "LayerPlan", "ops"]
