"""dtq_kernels: low-bit inference for Diffusion Transformers (docs/architecture.md).

    import dtq_kernels as dtq
    plan = dtq.calibrate(pipe, "tqdit-w8a8", num_samples=32, num_inference_steps=25)
    dtq.quantize(pipe.transformer, plan)
    dtq.save_quantized(pipe.transformer, "out/")

Importing the package loads the runtime only (formats, ops, nn, plan, quantize, checkpoint);
`calibrate` and `recipes` load the calibration tools on first use.
"""
from . import ops  # noqa: F401  (registers torch.ops.dtq.*)
from .checkpoint import load_quantized, save_quantized
from .nn.linear import QuantLinear
from .nn.spec import LinearQuantSpec
from .plan import LayerPlan, QuantPlan
from .quantize import quantize

__version__ = "0.1.0"
__all__ = ["calibrate", "quantize", "save_quantized", "load_quantized", "QuantLinear", "LinearQuantSpec",
           "recipes", "QuantPlan", "LayerPlan", "ops"]

_CALIBRATION_TOOLS = ("calibrate", "recipes")


def __getattr__(name: str):
    # The calibration tools import the runtime, never the other way round: load them when asked for.
    if name in _CALIBRATION_TOOLS:
        from . import calib
        return getattr(calib, name)
    raise AttributeError(f"module 'dtq_kernels' has no attribute {name!r}")
