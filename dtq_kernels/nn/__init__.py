"""Drop-in quantized modules and the timestep-group plumbing they read."""
from .linear import QuantLinear, StepGroupQuantLinear
from .spec import LinearQuantSpec
from .timestep import MissingTimestepError, TimestepTracker, attach_timestep_tracker

__all__ = ["LinearQuantSpec", "QuantLinear", "StepGroupQuantLinear", "MissingTimestepError", "TimestepTracker",
           "attach_timestep_tracker"]
