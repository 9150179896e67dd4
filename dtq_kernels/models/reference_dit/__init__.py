"""The trained reference DiT (Fashion-MNIST, class-conditional) shipped with dtq_kernels."""
from .data import CLASSES, load_fashion_mnist
from .model import (DEFAULT_GUIDANCE, NULL_CLASS, NUM_CLASSES, build_reference_dit, load_reference_dit, reference_config,
                    reference_scheduler, sample)

__all__ = ["CLASSES", "DEFAULT_GUIDANCE", "NULL_CLASS", "NUM_CLASSES", "build_reference_dit", "load_fashion_mnist",
           "load_reference_dit", "reference_config", "reference_scheduler", "sample"]
