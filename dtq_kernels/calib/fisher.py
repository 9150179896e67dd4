"""TQ-DiT's Hessian-guided objective with a diagonal Fisher per output channel (docs/methods.md).

TQ-DiT scores a layer's quantization by mean((g ⊙ (O − Ô))²), g = ∂L/∂O. With the rest of the network
in floating point the gradient of a loss against the FP output itself is zero, so L here is the
Gauss-Newton form of the model-output error: for a random probe v ~ N(0, I) over the transformer's
output, g = ∂(v·out)/∂O and E_v[g²] is the diagonal of JᵀJ (Hutchinson), J = ∂out/∂O — how strongly an
error in each output channel of the layer reaches the model's prediction. We average g² over tokens,
samples and probes, per time group, on the transformer inputs captured in each group (one forward
each), giving f [N] per (layer, group) for search.search_linear's `out_weights`.
"""
from __future__ import annotations

from functools import partial

import torch

from .mixed_precision import _sample


def output_fisher(model: torch.nn.Module, layers: dict[str, torch.nn.Linear], inputs: dict[int, tuple[tuple, dict]],
                  probes: int = 2, seed: int = 0) -> dict[str, dict[int, torch.Tensor]]:
    """{layer: {time group: f [N]}} from the captured inputs of each group."""
    if not inputs:
        raise ValueError("the Fisher objective needs transformer inputs captured during calibration")
    acc: dict[str, dict[int, torch.Tensor]] = {n: {} for n in layers}
    state = {"g": None}

    def on_grad(name, grad):
        f = grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).mean(0).cpu()
        d = acc[name]
        d[state["g"]] = d[state["g"]] + f if state["g"] in d else f

    def on_out(name, module, args, out):
        if out.requires_grad:
            out.register_hook(partial(on_grad, name))

    def leaf_input(module, args, kwargs):  # gradients need a graph: make the latent input a leaf
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach().float().requires_grad_()}
        else:
            args = (args[0].detach().float().requires_grad_(),) + tuple(args[1:])
        return args, kwargs

    handles = [m.register_forward_hook(partial(on_out, n)) for n, m in layers.items()]
    handles.append(model.register_forward_pre_hook(leaf_input, with_kwargs=True))
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for g, (args, kwargs) in sorted(inputs.items()):
                state["g"] = g
                for _ in range(probes):
                    out = _sample(model(*args, **kwargs))
                    v = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
                    (out * v).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return {n: {g: f / probes for g, f in d.items()} for n, d in acc.items()}
