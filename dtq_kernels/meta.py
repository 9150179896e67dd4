"""Build a model's skeleton without its floating-point weights (for loading quantized checkpoints).

`empty_model(cls, config)` constructs a diffusers model with every parameter on the meta device: no
memory is allocated or initialized for weights that the checkpoint's packed tensors replace anyway.
Buffers are built as usual (small, and some are computed rather than stored, such as positional
embeddings). This is what accelerate's `init_empty_weights()` does, without the dependency.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, every parameter registered on a module moves to the meta device at once, so
    its initialization (reset_parameters) touches no memory."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(cls: type, config: dict) -> torch.nn.Module:
    """`cls.from_config(config)` (a diffusers model class) with its parameters on the meta device."""
    if not hasattr(cls, "from_config"):
        raise TypeError(f"{cls.__name__} has no from_config: pass a model instance to load into instead")
    with parameters_on_meta():
        return cls.from_config(config)


def has_meta_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device (never filled)."""
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
