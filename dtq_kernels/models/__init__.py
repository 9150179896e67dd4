"""Adapters for diffusers transformers, and the trained reference DiT shipped with the package."""
from .adapters import ADAPTERS, ModelAdapter, get_adapter

__all__ = ["ADAPTERS", "ModelAdapter", "get_adapter"]
