"""dtq as a diffusers quantization backend: `DtqConfig` + `DtqQuantizer`, quant_method "dtq".

    from diffusers import DiTTransformer2DModel
    from dtq_kernels import DtqConfig
    model = DiTTransformer2DModel.from_pretrained(fp_dir, quantization_config=DtqConfig("viditq-w8a8"))
    model.save_pretrained(q_dir)                         # safetensors + config.json with the dtq config
    model = DiTTransformer2DModel.from_pretrained(q_dir)  # quantized again, bit-identical

Two ways in:
* an FP checkpoint with a DtqConfig: the weights load as usual, then `dtq.quantize` applies the plan:
  a data-free recipe (today `viditq-w8a8`) is computed on the spot; a recipe that calibrates on data is
  refused before anything is loaded, with the command that makes its plan (`dtq calibrate`), and a plan
  made beforehand (`DtqConfig(plan=plan_or_plan_dir)`) is applied as is;
* a checkpoint saved from a dtq-quantized model (its config.json holds `quantization_config` with
  quant_method "dtq" and the plan's layer specs): the model skeleton is built on the meta device, the
  QuantLinears are installed there, and the packed codes, scales and kept-FP tensors are assigned
  straight from the file. The floating-point weights of quantized layers are never built.

The fast path (nn/fused.py: q/k/v fused into one `to_qkv` layer, DiT / PixArt blocks rewritten) is
applied after the tensors are in place, never on the meta skeleton: both ways in end with it unless
`DtqConfig(fuse=False)`. The checkpoint itself is always per-layer: save_pretrained splits every fused
layer back into its members (`split_fused_state`, the same split dtq.load_quantized reads fused
checkpoints with), so the file names the same tensors as the model's unfused state dict and loads
with fuse on or off; loading and fusing again gives back the saved model's tensors bit for bit.
Scales, zero points and static tables are stored and kept in fp32 whatever torch_dtype says.

Saving is atomic and refusing, like dtq.save_quantized: every dtq-quantized model (from from_pretrained
or mark_quantized) gets an instance-level `save_pretrained` (`AtomicSavePretrained`) that runs diffusers'
own save_pretrained into a fresh sibling directory and renames it into place (checkpoint.new_checkpoint_dir),
so an interrupted save leaves the previous save loadable and unchanged. It refuses a file, a non-empty
directory that is not a previous dtq save, and a previous dtq save unless `overwrite=True`.

Registration: diffusers has no public API for third-party backends; `register()` adds the two entries
to `diffusers.quantizers.auto`'s mappings and fails loudly if they are gone. `dtq_kernels.diffusers_hook`
runs it as soon as diffusers loads that module (see there).
"""
from __future__ import annotations

import copy
import enum
import inspect
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from .nn.fused import apply_fast_path, split_fused_state
from .nn.linear import QuantLinear
from .plan import QuantPlan
from .quantize import build_empty, install, quantize

CONFIG_FORMAT_VERSION = 1
MAPPINGS = ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING")


class DtqQuantMethod(str, enum.Enum):
    """diffusers reads `quant_method.value`: a string enum, as its own QuantizationMethod."""

    DTQ = "dtq"


def _recipe(name: str):
    """The calibration recipe `name` (its table lives with the calibration tools; loaded on request)."""
    from .calib.recipes import get_recipe
    return get_recipe(name)


def runtime_plan(plan: QuantPlan) -> QuantPlan:
    """What loading a quantized checkpoint needs of a plan: layer specs, static tables, attention
    settings. Calibration-only data (per-channel weight clips, smoothing vectors and calibrated weights,
    statistics in meta) is already baked into the saved tensors, so it stays out of config.json."""
    layers = {n: replace(lp, weight_clip=None) for n, lp in plan.layers.items()}
    return replace(plan, layers=layers, tensors={}, meta={})


class DtqConfig(QuantizationConfigMixin):
    """Quantization config of the "dtq" diffusers backend.

    recipe: a name from dtq.recipes() (the data-free ones run inside from_pretrained).
    plan: a QuantPlan (dtq.calibrate), the directory `dtq calibrate` wrote, or the plan's JSON dict (how
      a saved checkpoint's config.json carries it). Give exactly one of recipe and plan.
    quantize_attention: install the quantized attention processor where the plan has settings for it.
    fuse: apply the fast path of nn/fused.py after loading (dtq.quantize's default); False keeps every
      layer separate (the per-layer path).
    """

    def __init__(self, recipe: str | None = None, plan: QuantPlan | str | Path | dict | None = None,
                 quantize_attention: bool = True, fuse: bool = True, format_version: int = CONFIG_FORMAT_VERSION,
                 quant_method: str = DtqQuantMethod.DTQ.value, **unknown: Any):
        if unknown:
            raise ValueError(f"DtqConfig: unknown fields {sorted(unknown)} (a config written by a newer "
                             "dtq_kernels?)")
        if quant_method != DtqQuantMethod.DTQ.value:
            raise ValueError(f"DtqConfig: quant_method must be 'dtq', got {quant_method!r}")
        if format_version != CONFIG_FORMAT_VERSION:
            raise ValueError(f"DtqConfig: format_version {format_version!r} is not supported (this dtq_kernels "
                             f"reads {CONFIG_FORMAT_VERSION}); upgrade dtq_kernels to load this checkpoint")
        if (recipe is None) == (plan is None):
            raise ValueError("DtqConfig: give exactly one of recipe (a name from dtq.recipes()) and plan")
        if recipe is not None and not isinstance(recipe, str):
            raise TypeError(f"DtqConfig: recipe must be a recipe name, got {type(recipe).__name__}")
        self.quant_method = DtqQuantMethod.DTQ
        self.format_version = format_version
        self.recipe = recipe
        self.quantize_attention = bool(quantize_attention)
        self.fuse = bool(fuse)
        self._plan = None if plan is None else self._read_plan(plan)
        if self._plan is not None:
            self.recipe = self._plan.recipe

    @staticmethod
    def _read_plan(plan) -> QuantPlan:
        if isinstance(plan, QuantPlan):
            return plan
        if isinstance(plan, dict):
            try:
                return QuantPlan.from_json(json.dumps(plan))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"DtqConfig: invalid quantization plan: {e}") from None
        if isinstance(plan, (str, Path)):
            from .checkpoint import read_plan
            return read_plan(plan)[1]
        raise TypeError(f"DtqConfig: plan must be a QuantPlan, a plan directory or a plan dict, got "
                        f"{type(plan).__name__}")

    @property
    def plan(self) -> QuantPlan | None:
        return self._plan

    def set_plan(self, plan: QuantPlan) -> None:
        """Record the plan a model was quantized with (what save_pretrained writes)."""
        self._plan, self.recipe = plan, plan.recipe

    def needs_data(self) -> bool:
        return self._plan is None and _recipe(self.recipe).needs_stats

    def to_dict(self) -> dict[str, Any]:
        plan = None if self._plan is None else json.loads(runtime_plan(self._plan).to_json())
        if plan is not None:
            plan.pop("tensor_names", None)
        return {"quant_method": DtqQuantMethod.DTQ.value, "format_version": self.format_version,
                "recipe": self.recipe if plan is None else None, "plan": plan,
                "quantize_attention": self.quantize_attention, "fuse": self.fuse}

    def __iter__(self):
        yield from self.to_dict().items()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new._plan = copy.deepcopy(self._plan, memo)
        return new


def _quant_module(model: torch.nn.Module, param_name: str) -> tuple[torch.nn.Module | None, str]:
    module_name, _, tensor_name = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None, tensor_name
    return (module, tensor_name) if isinstance(module, QuantLinear) else (None, tensor_name)


class DtqQuantizer(DiffusersQuantizer):
    """diffusers' hooks around from_pretrained: validate, build the quantized skeleton (pre-quantized),
    assign the packed tensors exactly as stored, quantize after loading (FP checkpoint)."""

    requires_calibration = False
    required_packages = None
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DtqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.fused_linears: dict[str, dict[str, int]] = {}  # the model's fusions (nn/fused.py), split on save

    def attach(self, model: torch.nn.Module) -> None:
        """Record the fusions of `model`, whose state dicts get_state_dict_and_metadata will receive."""
        self.fused_linears = dict(getattr(model, "dtq_fused", None) or {})

    def validate_environment(self, *args, **kwargs):
        cfg = self.quantization_config
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            raise ValueError("dtq: device_map must put the whole model on one device (no offloading or splitting "
                             f"a quantized model), got {sorted({str(d) for d in device_map.values()})}")
        if self.pre_quantized:
            if cfg.plan is None:
                raise ValueError("dtq: this checkpoint's quantization_config names recipe "
                                 f"{cfg.recipe!r} but carries no plan: it was not saved from a dtq-quantized "
                                 "model")
        elif cfg.needs_data():
            raise ValueError(
                f"dtq: recipe {cfg.recipe!r} calibrates on data, which from_pretrained does not have. Make its plan "
                f"first: `dtq calibrate --recipe {cfg.recipe} --model <diffusers pipeline dir> --prompt TEXT (or "
                f"--class-labels 1,2,...) --out PLAN_DIR` (or "
                f"plan = dtq.calibrate(pipe, {cfg.recipe!r})), then pass DtqConfig(plan=PLAN_DIR or plan). "
                "Data-free recipes (e.g. 'viditq-w8a8') run directly.")

    # ------------------------------------------------------------------ pre-quantized checkpoints

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        if self.pre_quantized:  # per layer: the skeleton's tensors are meta; fusion follows the loading
            install(model, self.quantization_config.plan, build_empty, fuse=False,
                    attention=self.quantization_config.quantize_attention)
        return model

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        return self.pre_quantized and _quant_module(model, param_name)[0] is not None

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise ValueError(f"dtq: checkpoint tensor {param_name} is {tuple(loaded_param.shape)}, the quantized "
                             f"layer expects {tuple(current_param.shape)}")
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict, unexpected_keys,
                               **kwargs):
        """Assign the tensor as stored: diffusers has already cast floating tensors to torch_dtype by now,
        but scales and tables must stay fp32, so the file's own tensor (state_dict) is used."""
        module, name = _quant_module(model, param_name)
        value = state_dict[param_name]
        current = module._buffers.get(name)
        if current is None:
            raise ValueError(f"dtq: checkpoint holds {param_name}, which this quantized layer does not have")
        if tuple(value.shape) != tuple(current.shape) or value.dtype != current.dtype:
            raise ValueError(f"dtq: checkpoint tensor {param_name} is {tuple(value.shape)} {value.dtype}, the "
                             f"quantized layer expects {tuple(current.shape)} {current.dtype}")
        module._buffers[name] = value.to(target_device)

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized:
            unfilled = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
                        for b, t in m._buffers.items() if t is not None and t.is_meta]
            if unfilled:
                raise ValueError(f"dtq: the checkpoint lacks {len(unfilled)} tensors of its quantized layers, e.g. "
                                 f"{unfilled[:3]}: truncated or not saved from this model")
            model.to(_device_of(model))  # the timestep tracker and attention tables follow the weights
            if cfg.fuse:
                apply_fast_path(model)
        else:
            plan = cfg.plan if cfg.plan is not None else cfg.recipe
            model.eval()  # what from_pretrained returns anyway; a data-free recipe's plan is built in inference mode
            quantize(model, plan, fuse=cfg.fuse, attention=cfg.quantize_attention)
            cfg.set_plan(model.dtq_plan)
        self.attach(model)
        make_save_atomic(model)
        return model

    def get_state_dict_and_metadata(self, state_dict, safe_serialization: bool = False):
        """What save_pretrained writes: the per-layer state dict (fused layers split into their members)."""
        return split_fused_state(state_dict, self.fused_linears), {}

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


class AtomicSavePretrained:
    """`save_pretrained` of a dtq-quantized diffusers model, or of a pipeline holding one
    (dtq.quantize_pipeline): the class's save_pretrained, written into a fresh sibling directory that
    replaces `save_directory` in one rename (new_checkpoint_dir).

    Takes the class's arguments plus `overwrite` (default False): a previous dtq save at
    `save_directory` (a model whose config.json's quantization_config has quant_method "dtq", or a
    pipeline's model_index.json with such a component) is replaced only with overwrite=True; a file,
    or a non-empty directory that is not a dtq save, is always refused (CheckpointError, a ValueError).
    A pipeline's save builds every component inside its temporary directory, so an interrupted
    pipeline save also leaves the previous one untouched. The signature it reports is the class
    method's plus `overwrite`, so a pipeline's save_pretrained still passes safe_serialization, variant
    and max_shard_size to its components.
    is_main_process=False writes nothing: the main process writes the whole checkpoint (the class method
    would have every process write the weights, and each would then swap in its own directory).
    push_to_hub=True is forwarded with the hub arguments; the upload happens from the temporary
    directory, before the rename, with repo_id defaulting to the name of `save_directory` as in diffusers.

    An instance attribute holding its owner: deepcopy and pickling bind it to the copy; a shallow
    copy.copy would share it with the original (call mark_quantized on such a copy).
    """

    def __init__(self, owner):
        from .checkpoint import DIFFUSERS_CONFIG, KIND_DIFFUSERS, KIND_PIPELINE, PIPELINE_INDEX
        self.model = owner
        pipeline = hasattr(owner, "components") and not isinstance(owner, torch.nn.Module)
        self.kind, self.manifest = (KIND_PIPELINE, PIPELINE_INDEX) if pipeline else (KIND_DIFFUSERS, DIFFUSERS_CONFIG)

    @property
    def __signature__(self) -> inspect.Signature:
        method = inspect.signature(type(self.model).save_pretrained)
        params = [p for p in method.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]
        params.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False))
        params += [p for p in method.parameters.values() if p.kind == p.VAR_KEYWORD]
        return method.replace(parameters=params)

    def __call__(self, save_directory: str | os.PathLike, *args, overwrite: bool = False, **kwargs) -> None:
        from .checkpoint import new_checkpoint_dir
        call = self.__signature__.bind(save_directory, *args, **kwargs)  # a TypeError names a wrong argument
        if not call.arguments.get("is_main_process", True):
            return
        target = Path(save_directory)
        if call.arguments.get("push_to_hub"):
            call.arguments.setdefault("kwargs", {}).setdefault("repo_id", target.name)
        with new_checkpoint_dir(target, kind=self.kind, overwrite=overwrite, manifest=self.manifest) as tmp:
            call.arguments["save_directory"] = str(tmp)
            type(self.model).save_pretrained(self.model, *call.args, **call.kwargs)
            if not (tmp / self.manifest).is_file():
                raise RuntimeError(f"save_pretrained wrote no {self.manifest}: nothing was saved to {target}")


def make_save_atomic(owner) -> None:
    """Give a dtq-quantized diffusers model, or a pipeline holding one, the atomic, refusing
    save_pretrained (AtomicSavePretrained)."""
    bound = owner.__dict__.get("save_pretrained")
    if not (isinstance(bound, AtomicSavePretrained) and bound.model is owner):
        owner.save_pretrained = AtomicSavePretrained(owner)


def mark_quantized(model: torch.nn.Module, quantize_attention: bool = True, fuse: bool = True) -> DtqConfig:
    """Make a model quantized with dtq.quantize / dtq.load_quantized look as if it came from
    from_pretrained with a DtqConfig, so that diffusers' save_pretrained writes a checkpoint that
    from_pretrained loads back quantized. Returns the config it attached."""
    plan = getattr(model, "dtq_plan", None)
    if not isinstance(plan, QuantPlan):
        raise ValueError("mark_quantized: the model was not quantized with dtq (no plan attached)")
    if not hasattr(model, "register_to_config"):
        raise TypeError(f"mark_quantized needs a diffusers model, got {type(model).__name__}")
    cfg = DtqConfig(plan=plan, quantize_attention=quantize_attention, fuse=fuse)
    model.register_to_config(quantization_config=cfg)
    model.hf_quantizer = DtqQuantizer(cfg, pre_quantized=True)
    model.hf_quantizer.attach(model)
    model.is_quantized = True
    model.quantization_method = DtqQuantMethod.DTQ
    make_save_atomic(model)
    return cfg


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def register() -> None:
    """Add quant_method "dtq" to diffusers' quantizer and config mappings (idempotent)."""
    missing = [name for name in MAPPINGS if not isinstance(getattr(_auto, name, None), dict)]
    if missing:
        raise RuntimeError(f"this diffusers release has no {missing} in diffusers.quantizers.auto: dtq cannot "
                           "register its quantization backend (the mappings moved); DtqConfig will not work with "
                           "from_pretrained until dtq_kernels supports this diffusers version")
    _auto.AUTO_QUANTIZER_MAPPING[DtqQuantMethod.DTQ.value] = DtqQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[DtqQuantMethod.DTQ.value] = DtqConfig


register()
