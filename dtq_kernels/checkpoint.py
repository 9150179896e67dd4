"""Save and load quantized models: a directory with

    model.safetensors         every parameter and buffer of the quantized model (packed codes, scales, FP parts)
    plan.json                 {"format_version", "model_class", "config", "plan": QuantPlan JSON,
                               "fused_linears": {fused layer: {member layer: out_features}} (nn/fused.py)}
    plan_tensors.safetensors  the plan's vectors (smoothing factors, calibrated weights)

`load_quantized(model_class_or_fresh_fp_model, path)` checks everything (format version, model class,
config, every tensor's name, shape and dtype, file integrity) before it changes the model, so a wrong
architecture or a corrupt / truncated file raises a clear error and leaves the model untouched.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .meta import empty_model, has_meta_tensors
from .nn.fused import apply_fast_path, split_fused_state
from .plan import QuantPlan
from .quantize import build_empty, check_plan_fits, install

CHECKPOINT_FORMAT_VERSION = 1
MODEL_FILE, PLAN_FILE, PLAN_TENSORS_FILE = "model.safetensors", "plan.json", "plan_tensors.safetensors"


class CheckpointError(ValueError):
    pass


def model_config(model: torch.nn.Module) -> dict:
    """The model's (diffusers) config as plain JSON data, private "_" keys left out: what a checkpoint
    records so that it is only ever loaded into the architecture it was saved from."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}, default=str))


def save_quantized(model: torch.nn.Module, path: str | Path) -> Path:
    """Write a quantized model (one that went through dtq.quantize) to the directory `path`."""
    plan = getattr(model, "dtq_plan", None)
    if not isinstance(plan, QuantPlan):
        raise ValueError("this model was not quantized with dtq.quantize (no plan attached): nothing to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage, and views of larger buffers
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / MODEL_FILE), metadata={"format": "dtq_kernels"})
    return save_plan(plan, path, model)


def save_plan(plan: QuantPlan, path: str | Path, model: torch.nn.Module) -> Path:
    """Write `plan` (plan.json + plan_tensors.safetensors) for `model`'s class and config into the
    directory `path`: the plan half of a checkpoint, which `read_plan` reads back (`dtq calibrate`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in plan.tensors.items()},
              str(path / PLAN_TENSORS_FILE))
    meta = {"format_version": CHECKPOINT_FORMAT_VERSION, "model_class": type(model).__name__,
            "config": model_config(model), "plan": json.loads(plan.to_json()),
            "fused_linears": dict(getattr(model, "dtq_fused", {}))}
    (path / PLAN_FILE).write_text(json.dumps(meta, indent=1))
    return path


def read_plan(path: str | Path) -> tuple[dict, QuantPlan]:
    """(checkpoint metadata, QuantPlan) of a saved checkpoint, validated; no model needed."""
    path = Path(path)
    if not (path / PLAN_FILE).is_file():
        raise CheckpointError(f"{path} is not a dtq checkpoint (no {PLAN_FILE})")
    try:
        meta = json.loads((path / PLAN_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / PLAN_FILE} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path / PLAN_FILE}: unsupported checkpoint format version "
                              f"{meta.get('format_version') if isinstance(meta, dict) else None!r} "
                              f"(this dtq_kernels reads {CHECKPOINT_FORMAT_VERSION})")
    tensors = _load_tensors(path / PLAN_TENSORS_FILE)
    try:
        plan = QuantPlan.from_json(json.dumps(meta["plan"]), tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / PLAN_FILE}: invalid quantization plan: {e}") from None
    return meta, plan


def _load_tensors(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"missing checkpoint file {file}")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None


def check_model_matches(meta: dict, model: torch.nn.Module) -> None:
    """Raise CheckpointError unless the checkpoint metadata `meta` (read_plan) was saved from a model of
    `model`'s class and config."""
    if meta.get("model_class") != type(model).__name__:
        raise CheckpointError(f"checkpoint holds a {meta.get('model_class')}, the model is a {type(model).__name__}")
    saved, mine = meta.get("config", {}), model_config(model)
    if saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise CheckpointError(f"checkpoint config differs from the model's in {diff[:8]}")


def load_quantized(model: torch.nn.Module | type, path: str | Path,
                   device: str | torch.device | None = None, fuse: bool = True) -> torch.nn.Module:
    """Load a quantized checkpoint: every tensor bit-identical to the saved model's, and so are its
    outputs (on CPU, tensors assigned from the file keep the file's 8-byte alignment, and BLAS may then
    round a floating-point layer's sum differently by an ulp; a copy with its own allocation does not).

    model: the model's class (a diffusers model class): the model is built from the saved config with
      its parameters on the meta device, the quantized layers are installed there, and every tensor is
      assigned straight from the file, so no floating-point weight of a quantized layer is ever built
      (peak memory about the checkpoint's size). Or a fresh floating-point instance of the same
      architecture and config, quantized in place (its parameters may also be on the meta device).
    device: where the tensors are loaded (e.g. "cuda": file to GPU tensor by tensor, without staging
      the whole checkpoint on the host); default CPU, or where a given model's tensors already are.
    fuse: fused layers (q/k/v, nn/fused.py) are always read back into their members first, so a
      checkpoint saved fused or unfused loads either way; the per-layer QuantLinears are installed and
      filled, and only then, on real tensors, fuse=True applies the fast path (dtq.quantize's default);
      fuse=False keeps the per-layer path.
    """
    path = Path(path)
    meta, plan = read_plan(path)
    if isinstance(model, type):
        if meta.get("model_class") != model.__name__:
            raise CheckpointError(f"checkpoint holds a {meta.get('model_class')}, not a {model.__name__}")
        model = empty_model(model, meta.get("config", {}))
    check_model_matches(meta, model)
    state = _load_tensors(path / MODEL_FILE, device or "cpu")
    linears = check_plan_fits(model, plan)
    fused = meta.get("fused_linears") or {}
    try:
        widths = {m: int(w) for group in fused.values() for m, w in group.items()}
    except (AttributeError, TypeError, ValueError):
        widths = {None: 0}  # not {fused: {member: width}}: reported below
    if any(m not in linears or linears[m].out_features != w for m, w in widths.items()):
        raise CheckpointError(f"{path / PLAN_FILE}: fused_linears does not match the plan's layers")
    state = split_fused_state(state, fused)
    expected = _expected_state(model, plan, linears)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    skeleton = {k for k, v in model.state_dict().items() if v.is_meta}  # kept-FP tensors take the file's dtype
    for k, (shape, dtype) in expected.items():
        same_dtype = state[k].dtype == dtype or (k in skeleton and state[k].is_floating_point() and dtype.is_floating_point)
        if tuple(state[k].shape) != shape or not same_dtype:
            raise CheckpointError(f"checkpoint tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, "
                                  f"the model expects {shape} {dtype}")
    install(model, plan, build_empty, fuse=False)
    assign = bool(has_meta_tensors(model))  # a skeleton: take the file's tensors as they are, no copies
    model.load_state_dict(state, strict=True, assign=assign)
    del state  # the model holds what it needs; fusing below must not keep the unfused members alive too
    if device is not None:
        model.to(device)
    unfilled = has_meta_tensors(model)
    if unfilled:
        raise CheckpointError(f"{len(unfilled)} tensors of the model are in no checkpoint file, e.g. {unfilled[:3]}")
    if fuse:
        apply_fast_path(model)
    return model


def _expected_state(model, plan: QuantPlan, linears: dict) -> dict[str, tuple[tuple, torch.dtype]]:
    """name -> (shape, dtype) of the quantized model's state dict, computed without changing `model`."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()
                if not any(k.startswith(name + ".") for name in linears)}
    for name, lin in linears.items():
        skeleton = build_empty(torch.nn.Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                device="meta"), name, plan.layers[name], plan)
        for k, v in skeleton.state_dict().items():
            expected[f"{name}.{k}"] = (tuple(v.shape), v.dtype)
    return expected
