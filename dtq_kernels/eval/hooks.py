"""Forward-hook plumbing shared by the SQNR probe and the activation statistics.

A sampling run is recorded once as the list of transformer calls it made (inputs only); replaying
those calls through any model (FP or quantized) gives layer activations for exactly the same
inputs at every timestep, which is what "per-layer SQNR across timesteps" compares.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Call:
    args: tuple
    kwargs: dict

    @property
    def timestep(self) -> float:
        t = self.kwargs.get("timestep", self.args[1] if len(self.args) > 1 else None)
        if t is None:
            raise ValueError("recorded transformer call has no timestep argument")
        return float(torch.as_tensor(t).flatten()[0])


def _detach(v):
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


@contextlib.contextmanager
def record_calls(model: nn.Module):
    """Context manager yielding a list that fills with one Call per forward of `model`."""
    calls: list[Call] = []

    def pre_hook(_mod, args, kwargs):
        calls.append(Call(tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}))

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@torch.inference_mode()
def replay(model: nn.Module, call: Call):
    dev = next(model.parameters()).device
    move = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return model(*(move(a) for a in call.args), **{k: move(v) for k, v in call.kwargs.items()})


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's nn.Linear layers: the layers quantization replaces."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@contextlib.contextmanager
def capture(model: nn.Module, names: list[str], fn):
    """Forward hooks on the named modules calling fn(name, inputs_tuple, output); names the model
    lacks are skipped (a quantized model keeps the FP names of the layers it replaced)."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: fn(n, i, o)) for n in names if n in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
