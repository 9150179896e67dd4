"""Drop-in quantized modules."""
from .spec import LinearQuantSpec

__all__ = ["LinearQuantSpec"]
