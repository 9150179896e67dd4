"""Timestep -> time-group plumbing for statically quantized models (docs/architecture.md, "Timestep groups").

`attach_timestep_tracker(model, time_groups, num_train_timesteps)` registers a `TimestepTracker`
submodule and a forward pre-hook on the transformer. On every forward the hook reads the timestep
argument and writes g = min(floor(t·G/T), G−1) into the tracker's int32 [1] device buffer with tensor
ops only: no host sync, safe under CUDA-graph capture. Static kernels read scale_table[g] on the device.

A batch must share one time group (diffusers samplers call the transformer with one timestep per
step). Checking that needs the values, so it is done when the timestep is a Python number or a CPU
tensor (free), and on the device only with `strict=True` (one sync per forward); a torch.compile'd
forward skips the check (it would break the graph).
"""
from __future__ import annotations

import torch


def group_of(t: torch.Tensor, time_groups: int, num_train_timesteps: int) -> torch.Tensor:
    """Group index (int64, same shape as t) of diffusion timesteps t (any real dtype) on the 0..T scale:
    g = min(floor(t·G/T), G−1); with G = 10 and T = 1000 the groups are [0,100), [100,200), ..., [900,1000]."""
    if time_groups < 1:
        raise ValueError(f"time_groups must be >= 1, got {time_groups}")
    g = torch.floor(t.double() * time_groups / num_train_timesteps).long()
    return g.clamp(0, time_groups - 1)


class MissingTimestepError(RuntimeError):
    pass


class TimestepTracker(torch.nn.Module):
    def __init__(self, time_groups: int, num_train_timesteps: int = 1000, strict: bool = False, adapter=None):
        super().__init__()
        self.time_groups, self.num_train_timesteps, self.strict = int(time_groups), int(num_train_timesteps), strict
        self.adapter = adapter  # a ModelAdapter: where the timestep argument is (for pre_hook)
        # runtime state, not part of checkpoints; moves with .to(device)
        self.register_buffer("group_idx", torch.zeros(1, dtype=torch.int32), persistent=False)
        self.seen_timestep = False
        self._host_group: int | None = None

    def extra_repr(self) -> str:
        return f"time_groups={self.time_groups}, num_train_timesteps={self.num_train_timesteps}"

    def update(self, t) -> None:
        """Set the group from a timestep (number or tensor of one value per sample, on the 0..T scale)."""
        device = self.group_idx.device
        # Under torch.compile only the tensor ops run (the group check and the host copy would break the
        # graph): a compiled forward trusts the batch to share one time group, and host_group() syncs.
        on_host = (not torch.is_tensor(t) or t.device.type == "cpu") and not torch.compiler.is_compiling()
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if tt.numel() == 0:
            raise MissingTimestepError("empty timestep tensor")
        groups = group_of(tt, self.time_groups, self.num_train_timesteps)
        if on_host or (self.strict and not torch.compiler.is_compiling()):
            if bool((groups != groups[0]).any()):
                raise ValueError("this batch mixes timesteps from different time groups "
                                 f"({sorted(set(groups.tolist()))}); statically quantized layers use one scale "
                                 "per group: call the model once per group")
        self.group_idx.copy_(groups[:1].to(device=device, dtype=torch.int32), non_blocking=True)
        self._host_group = int(groups[0]) if on_host else None
        self.seen_timestep = True

    def pre_hook(self, module, args, kwargs) -> None:
        """The transformer's forward pre-hook. A bound method rather than a closure, so that
        copy.deepcopy(model) gives the copy a hook that updates the copy's own tracker."""
        t = self.adapter.timestep(args, kwargs)
        if t is None:
            raise MissingTimestepError(f"{type(module).__name__} is statically quantized (scales per time group): "
                                       "call it with its timestep argument")
        self.update(self.adapter.train_timestep(t if torch.is_tensor(t) else torch.as_tensor(t)))

    def host_group(self) -> int:
        """The current group as a Python int (layers that change precision per step group need it);
        costs one device sync when the timestep came as a device tensor."""
        if not self.seen_timestep:
            raise MissingTimestepError("no timestep seen yet: call the model with its timestep argument")
        if self._host_group is None:
            self._host_group = int(self.group_idx.item())
        return self._host_group


def attach_timestep_tracker(model: torch.nn.Module, time_groups: int, num_train_timesteps: int = 1000,
                            adapter=None, strict: bool = False) -> TimestepTracker:
    """Attach (or replace) the tracker of `model` and its pre-hook; returns the tracker."""
    if adapter is None:
        from ..models.adapters import get_adapter
        adapter = get_adapter(model)
    old = getattr(model, "dtq_timestep", None)
    if isinstance(old, TimestepTracker):
        old._hook.remove()
    device = next(model.parameters()).device
    if device.type == "meta":  # a skeleton being loaded: the group index is runtime state, never loaded
        device = torch.device("cpu")
    tracker = TimestepTracker(time_groups, num_train_timesteps, strict, adapter).to(device)
    model.dtq_timestep = tracker
    tracker._hook = model.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)
    return tracker
