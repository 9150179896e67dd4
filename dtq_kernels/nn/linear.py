"""QuantLinear: a drop-in nn.Linear with packed low-bit weights and quantized activations.

Which kernel runs a layer is decided by ONE table, PATHS: each row maps (weight format, activation
format, weight granularity, activation mode) to a kernel path, the layout its weights are stored in
and the QuantLinear method that runs it. The first row that matches the spec wins, once per layer,
and is logged (logger `dtq_kernels.nn`, when the layer is built or moved to a device) and shown in repr
as `path=`:

| row                  | weights (symmetric unless said)  | activations           | granularity    | modes            |
|----------------------|----------------------------------|-----------------------|----------------|------------------|
| w4a4_gemm            | int4 / fp4_e2m1 / e1m2 / e3m0    | int4 / fp4_* per block| group 16..128  | dynamic          |
| int8_gemm            | int8 / int6 / int4 (packed)      | int8 / int6 / int4    | per channel    | dynamic, static  |
| int8_gemm_grouped    | int8 / int6 / int4 (packed)      | int8 / int6 / int4    | group 64 / 128 | dynamic, static  |
| int8_gemm_wzp        | int8 / int6 / int4, asymmetric   | int8 / int6 / int4    | per channel    | dynamic, static  |
| int8_gemm_two_region | int8 / int6 / int4               | int8 / int6 / int4    | per channel    | two_region       |
| w4a16_gemm           | int4 (packed)                    | none (fp16/bf16)      | channel, 64/128| -                |
| fp8_gemm             | fp8_e4m3 (sm_89/sm_90 on CUDA)   | fp8_e4m3              | per channel    | dynamic          |
| dequant-matmul       | anything else: SIMULATED         |                       |                |                  |

w4a4_gemm (W4A4, FP4 as HQ-DiT or INT4 at equal bits; weight and activation formats chosen separately)
comes first: a 4-bit-weight, 4-bit-activation spec with group_size quantizes its activations per block
of group_size (spec.act_block_size) with `ops.quantize_act_4bit` (smoothing and rotation fused), and
`ops.w4a4_gemm` decodes both operands to int8 in registers. Static int4 activations with per-group int4
weights still take int8_gemm_grouped.

The kernel rows are `torch.ops.dtq` ops: on CUDA tensors they run the fast kernels, on CPU tensors
their exact references. The last row, "dequant-matmul", is a simulation: activations are quantized
with the same format math, the whole weight is dequantized to float on every call and a float matmul
multiplies them (the numbers a kernel would give, up to accumulation order, at worse than float
speed). On CUDA tensors it is refused (SimulatedPathError) unless the user opts in with
LinearQuantSpec(..., allow_simulated=True) or the environment variable DTQ_ALLOW_SIMULATED=1; on CPU it
runs, logged as a warning. A row restricted to some GPUs (fp8_gemm: FP8 tensor cores) does not match
on others, so there the layer falls to the simulation row and is refused in the same way.

Weights are stored in the layout their row's kernel reads ("packed": 4-bit codes two per byte, fp8 as
float8, others int8 codes; "int8": int8 codes even for int4, for the asymmetric and two-region
kernels), so weight_bytes() is what the layer really holds.

Adding a path: append a KernelPath to PATHS before the "dequant-matmul" row, naming a forward method
of QuantLinear (taking the flattened [M, K] input, returning [M, N] in the input dtype).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import formats, ops
from ..ops import reference
from ..formats import get_format
from .spec import LinearQuantSpec

log = logging.getLogger("dtq_kernels.nn")
_logged: set[tuple[str, str]] = set()

INT_FORMATS = ("int8", "int6", "int4")
ALLOW_SIMULATED_ENV = "DTQ_ALLOW_SIMULATED"


class SimulatedPathError(RuntimeError):
    """A layer whose spec has no kernel was called on CUDA tensors without opting in to simulation."""


@dataclass(frozen=True)
class KernelPath:
    """One row of the QuantLinear path table. A field left None matches anything.

    groups: weight granularity, None in the tuple = one scale per output channel, ints = group sizes.
    weight_symmetric: True / False restricts the row to symmetric / asymmetric weights.
    layout: "packed" (4-bit codes two per byte, other formats in their own dtype) or "int8" (int8 codes).
    archs: CUDA compute capabilities (e.g. 89 for sm_89) the kernel exists on; None = every arch.
    """

    name: str
    forward: str
    weights: tuple[str, ...] | None = None
    acts: tuple[str | None, ...] | None = None
    groups: tuple[int | None, ...] | None = None
    modes: tuple[str, ...] | None = None
    weight_symmetric: bool | None = True
    layout: str = "packed"
    archs: tuple[int, ...] | None = None
    simulated: bool = False

    def matches(self, spec: LinearQuantSpec, arch: int | None = None) -> bool:
        """Whether this row serves `spec`; with `arch` (a CUDA capability), also whether it runs there."""
        return ((self.weights is None or spec.weight in self.weights)
                and (self.acts is None or spec.act in self.acts)
                and (self.groups is None or spec.group_size in self.groups)
                and (self.modes is None or spec.act_mode in self.modes)
                and (self.weight_symmetric is None or spec.weight_symmetric == self.weight_symmetric)
                and (arch is None or self.archs is None or arch in self.archs))


_GROUPS = tuple(ops.GEMM_GROUP_SIZES)
PATHS: list[KernelPath] = [
    # before int8_gemm_grouped: int4 x int4 with groups and dynamic activations is W4A4 (per-block activations)
    KernelPath("w4a4_gemm", "_forward_w4a4", formats.FOUR_BIT_FORMATS, formats.FOUR_BIT_FORMATS,
               tuple(ops.w4a4_ops.W4A4_GROUP_SIZES), ("dynamic",)),
    KernelPath("int8_gemm", "_forward_int_codes", INT_FORMATS, INT_FORMATS, (None,), ("dynamic", "static")),
    KernelPath("int8_gemm_grouped", "_forward_int_codes", INT_FORMATS, INT_FORMATS, _GROUPS, ("dynamic", "static")),
    KernelPath("int8_gemm_wzp", "_forward_int_codes", INT_FORMATS, INT_FORMATS, (None,), ("dynamic", "static"),
               weight_symmetric=False, layout="int8"),
    KernelPath("int8_gemm_two_region", "_forward_int_codes", INT_FORMATS, INT_FORMATS, (None,), ("two_region",),
               layout="int8"),
    KernelPath("w4a16_gemm", "_forward_w4a16", ("int4",), (None,), (None, *_GROUPS)),
    KernelPath("fp8_gemm", "_forward_fp8", ("fp8_e4m3",), ("fp8_e4m3",), (None,), ("dynamic",), archs=(89, 90)),
    # the simulation: matches every spec, so it must stay last
    KernelPath("dequant-matmul", "_forward_simulated", weight_symmetric=None, simulated=True),
]


# the paths whose activations are integer codes: a producer may quantize for them (forward_quantized)
CODE_INPUT_PATHS = ("int8_gemm", "int8_gemm_grouped", "int8_gemm_wzp", "int8_gemm_two_region")


def select_path(spec: LinearQuantSpec, arch: int | None = None) -> KernelPath:
    """The first row of PATHS that serves `spec` (on a CUDA GPU of capability `arch`, if given)."""
    return next(p for p in PATHS if p.matches(spec, arch))


def simulation_allowed(spec: LinearQuantSpec) -> bool:
    return spec.allow_simulated or os.environ.get(ALLOW_SIMULATED_ENV, "").strip() == "1"


def _log_path_once(spec: LinearQuantSpec, path: KernelPath) -> None:
    key = (spec.name + spec.act_mode, path.name)
    if not torch.compiler.is_compiling() and key not in _logged:  # (logging would break a compiled graph)
        _logged.add(key)
        if path.simulated:
            log.warning("QuantLinear %s (%s): %s path (SIMULATED: no kernel for this spec; weights dequantized "
                        "to float on every call)", spec.name, spec.act_mode, path.name)
        else:
            log.info("QuantLinear %s (%s): kernel path %s", spec.name, spec.act_mode, path.name)


class QuantLinear(torch.nn.Module):
    """Buffers: `qweight` in the layout of the layer's kernel path (int8 [N, K]; uint8 [N, K/2], two
    4-bit codes per byte, for packed int4/fp4; float8 [N, K] for fp8), `wscale` f32 [N] or
    [N, K/group_size], `wzero` int32 (asymmetric), `bias`, `smooth` f32 [K] (input divisor, already
    folded into the weights), `act_table` f32 [G] (static) or [G, 2] (two-region). With spec.rotate the
    weights are stored rotated (W·diag(smooth)·H). `kernel_path` is the PATHS row chosen for the spec,
    `path` its name."""

    def __init__(self, in_features: int, out_features: int, spec: LinearQuantSpec, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        f = get_format(spec.weight)
        if spec.group_size is not None and in_features % spec.group_size:
            raise ValueError(f"group_size {spec.group_size} does not divide in_features {in_features}")
        if spec.rotate:
            from ..hadamard import supported
            if not supported(in_features):
                raise ValueError(f"no Hadamard rotation for in_features={in_features}")
        if spec.act_mode == "two_region" and (spec.rotate or spec.smooth):
            raise ValueError("two-region activations take no smoothing or rotation")
        self.kernel_path = select_path(spec)
        self.path = self.kernel_path.name
        if f.bits == 4 and in_features % 2:
            raise ValueError("4-bit weights need an even in_features")
        packed = f.bits == 4 and self.kernel_path.layout == "packed"
        wdtype = torch.uint8 if packed else (torch.float8_e4m3fn if f.kind == "fp8" else torch.int8)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // (2 if packed else 1), dtype=wdtype))
        n_groups = in_features // spec.group_size if spec.group_size else None
        self.register_buffer("wscale", torch.zeros((out_features, n_groups) if n_groups else (out_features,)))
        self.register_buffer("wzero", None if spec.weight_symmetric else
                             torch.zeros((out_features, n_groups) if n_groups else (out_features,), dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features) if spec.smooth else None)
        table_shape = {"static": (spec.time_groups,), "two_region": (spec.time_groups, 2)}.get(spec.act_mode)
        self.register_buffer("act_table", torch.ones(table_shape) if spec.act is not None and table_shape else None)
        self._tracker = None  # a TimestepTracker, held without registering it as a submodule
        self._run_path = self.kernel_path  # the row for the device the weights are on (see _apply)
        _log_path_once(spec, self.kernel_path)
        self.lora = torch.nn.ModuleDict()  # LoRA side branches (nn/lora.py); not part of the checkpoint

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, spec: LinearQuantSpec, act_scales=None, *,
                    smooth: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                    weight_clip=None, weight_scale: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize `linear` (or a calibrated `weight` replacing its own) round-to-nearest with absmax
        scales, clipped by `weight_clip` (a ratio, or one per output channel), or with explicit
        `weight_scale` (a calibrated grid, e.g. GPTQ's). Static modes need
        act_scales: [time_groups] (static) or [time_groups, 2] (two-region (c_pos, c_neg))."""
        q = cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None)
        w = (linear.weight if weight is None else weight).detach().float().cpu()
        if w.shape != (linear.out_features, linear.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} does not match the layer "
                             f"({linear.out_features}, {linear.in_features})")
        if spec.smooth:
            if smooth is None:
                raise ValueError("spec.smooth is set but no smoothing vector was given")
            smooth = smooth.detach().float().cpu().reshape(-1)
            if smooth.shape != (linear.in_features,) or not bool((smooth > 0).all()):
                raise ValueError(f"smooth must be {linear.in_features} positive factors")
            q.smooth.copy_(smooth)
            w = w * smooth[None, :]
        elif smooth is not None:
            raise ValueError("a smoothing vector was given but spec.smooth is False")
        if spec.rotate:
            from ..hadamard import hadamard_matrix
            w = w @ hadamard_matrix(linear.in_features)
        qw = formats.quantize_weight(w, spec.weight, group_size=spec.group_size,
                                     clip_ratio=1.0 if weight_clip is None else torch.as_tensor(weight_clip).float(),
                                     symmetric=spec.weight_symmetric, scale=weight_scale)
        q.qweight.copy_(q._pack(qw.codes))
        q.wscale.copy_(qw.scale)
        if qw.zero_point is not None:
            q.wzero.copy_(qw.zero_point)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        if q.act_table is not None:
            if act_scales is None:
                raise ValueError(f"act_mode {spec.act_mode!r} needs act_scales of shape {tuple(q.act_table.shape)}")
            table = torch.as_tensor(act_scales, dtype=torch.float32).reshape(q.act_table.shape)
            formats.check_finite(table, "act_scales")
            if spec.act_mode == "static" and not bool((table > 0).all()):
                raise ValueError("static act_scales must be positive")
            q.act_table.copy_(table)
        elif act_scales is not None:
            raise ValueError(f"act_scales given but act_mode is {spec.act_mode!r} (no table)")
        return q.to(linear.weight.device)

    def _packed(self) -> bool:
        return get_format(self.spec.weight).bits == 4 and self.kernel_path.layout == "packed"

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, K] -> the stored layout of the kernel path."""
        if not self._packed():
            return codes
        return formats.pack_int4(codes) if get_format(self.spec.weight).is_int else formats.pack_nibbles(codes)

    def _codes(self) -> torch.Tensor:
        """The stored weights as codes [N, K] (unpacked)."""
        if not self._packed():
            return self.qweight
        is_int = get_format(self.spec.weight).is_int
        return formats.unpack_int4(self.qweight) if is_int else formats.unpack_nibbles(self.qweight)

    def bind_timestep_tracker(self, tracker) -> None:
        self._tracker = tracker

    def _apply(self, fn, recurse=True):
        # model.half() / .to(dtype) must not touch codes, scales or tables (the kernels need fp32
        # scales, and a fp16 round trip would change them): follow device moves, keep dtypes.
        def keep_dtype(t):
            r = fn(t)
            return r if r.dtype == t.dtype else t.to(r.device)
        out = super()._apply(keep_dtype, recurse)
        # resolve the path for the new device now, not in forward: no device query inside a compiled
        # graph, and a layer that cannot run on this GPU fails when it is moved there
        self._run_path = self._path_for(self.qweight.device)
        _log_path_once(self.spec, self._run_path)
        return out

    # ---------------------------------------------------------------- inspection

    def dequantized_weight(self) -> torch.Tensor:
        """The float weights the kernel multiplies by ([N, K], in the smoothed/rotated basis if any)."""
        qw = formats.QuantizedWeight(self._codes(), self.wscale, self.spec.weight, self.spec.group_size,
                                     self.wzero)
        return formats.dequantize_weight(qw)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight codes and scales (and zero points), in the kernel's layout."""
        return sum(b.numel() * b.element_size() for b in (self.qweight, self.wscale, self.wzero) if b is not None)

    def extra_repr(self) -> str:
        s = self.spec
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", s.name,
                 f"weight={s.weight}" + ("" if s.weight_symmetric else "(asym)"),
                 f"act={s.act}/{s.act_mode}" if s.act else "act=fp"]
        if s.time_groups > 1:
            parts.append(f"time_groups={s.time_groups}")
        if s.act_mode == "two_region":
            parts.append(f"two_region={s.two_region_mode}")
        parts += [p for p, on in (("smooth", s.smooth), ("rotate", s.rotate)) if on]
        parts.append(f"path={self.path}")
        return ", ".join(parts)

    # ---------------------------------------------------------------- forward

    def _group_idx(self) -> torch.Tensor:
        if self._tracker is not None:
            if not self._tracker.seen_timestep:
                raise RuntimeError("statically quantized layer called before any timestep: call the model "
                                   "with its timestep argument")
            return self._tracker.group_idx
        if self.spec.time_groups == 1:
            return torch.zeros(1, dtype=torch.int32, device=self.qweight.device)
        raise RuntimeError(f"this QuantLinear has {self.spec.time_groups} time groups but no timestep tracker: "
                           "quantize the model with dtq.quantize (which attaches one) or call "
                           "bind_timestep_tracker")

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Integer activation codes and their scale (None for two-region: the table is the scale)."""
        s = self.spec
        bits = get_format(s.act).bits
        if s.act_mode == "two_region":
            g = self._group_idx()
            return ops.quantize_two_region(x, self.act_table, g, bits, s.two_region_mode, False), None
        if s.act_mode == "static":
            return ops.quantize_act(x, bits, self.smooth, s.rotate, self.act_table, self._group_idx())
        return ops.quantize_act(x, bits, self.smooth, s.rotate, None, None)

    # -------- one method per kernel path (PATHS[i].forward): flattened input [M, K] -> [M, N] in x.dtype

    def _forward_int_codes(self, x: torch.Tensor) -> torch.Tensor:
        q, a_scale = self._quantize_input(x)
        return self.forward_quantized(q, a_scale, x.dtype)

    def takes_codes(self) -> bool:
        """Whether this layer (on its current device) runs an integer-activation path: forward_quantized works."""
        return self._run_path.name in CODE_INPUT_PATHS

    def forward_quantized(self, q: torch.Tensor, a_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The GEMM of an integer-activation path (CODE_INPUT_PATHS) on activation codes a producer already
        made with this layer's quantizer (q int8 [M, K], a_scale f32 [M]; ignored for two-region
        codes, whose scales are the table) -> [M, N]. nn/fused.py uses it to hand LayerNorm-modulate or
        GELU fused with the quantization straight to the GEMM."""
        name = self._run_path.name
        if name not in CODE_INPUT_PATHS:
            raise RuntimeError(f"forward_quantized needs an integer-activation path {CODE_INPUT_PATHS}; "
                               f"this layer runs {name}")
        if name == "int8_gemm_two_region":
            return ops.int8_gemm_two_region(q, self.act_table, self._group_idx(), self.qweight, self.wscale,
                                            self.bias, out_dtype)
        if name == "int8_gemm_wzp":
            return ops.int8_gemm_wzp(q, a_scale, self.qweight, self.wscale, self.wzero, self.bias, out_dtype)
        # 4-bit weights go to the GEMM still packed (uint8 [N, K/2]): the kernel unpacks in registers;
        # per-group scales [N, K/G] select the kernel's per-group rescale
        return ops.int8_gemm(q, a_scale, self.qweight, self.wscale, self.bias, out_dtype)

    def _forward_w4a16(self, x: torch.Tensor) -> torch.Tensor:
        # the activations are 16-bit by definition: fp32 inputs are rounded to bf16 (fp16 / bf16 pass as is)
        x16 = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)
        return ops.w4a16_gemm(x16, self.qweight, self.wscale, self.bias, x.dtype)

    def _forward_fp8(self, x: torch.Tensor) -> torch.Tensor:
        q, a_scale = ops.quantize_act_fp8(x, self.smooth, self.spec.rotate)
        return ops.fp8_gemm(q, a_scale, self.qweight, self.wscale, self.bias, x.dtype)

    def _forward_w4a4(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        a, a_scale = ops.quantize_act_4bit(x, s.act, s.group_size, self.smooth, s.rotate)
        return ops.w4a4_gemm(a, a_scale, self.qweight, self.wscale, self.bias, s.group_size, s.act, s.weight,
                             x.dtype)

    def _forward_simulated(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._dequantized_input(x), self.dequantized_weight().to(x.device),
                        None if self.bias is None else self.bias.float()).to(x.dtype)

    def _smoothed_rotated(self, x: torch.Tensor) -> torch.Tensor:
        """(x / smooth) @ H in fp32: the input basis the stored weights live in (FP activation paths;
        the integer paths get this fused into quantize_act)."""
        xs = x.float() / self.smooth if self.smooth is not None else x.float()
        if self.spec.rotate:
            from ..hadamard import rotate
            xs = rotate(xs, self.in_features)
        return xs

    def _dequantized_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.act is None:
            return x.float()
        f = get_format(s.act)
        if s.act_block_size:  # dynamic per token, one scale per block of group_size along K
            codes, scale = formats.quantize_blockwise(self._smoothed_rotated(x), f, s.act_block_size)
            return formats.dequantize_blockwise(codes, scale, f)
        if f.kind == "fp8":  # the math of ops.quantize_act_fp8, whose kernel needs FP8 hardware
            q, scale = reference.quantize_act_fp8(x, self.smooth, s.rotate)
            return q.float() * scale[:, None]
        q, a_scale = self._quantize_input(x)
        if s.act_mode == "two_region":
            c = self.act_table[self._group_idx().long()].reshape(2)
            return formats.dequantize_two_region(q, c[0], c[1])
        return q.float() * a_scale.reshape(-1, 1)

    def _path_for(self, device: torch.device) -> KernelPath:
        """The PATHS row that runs on `device`: the layer's own, unless its kernel does not exist on this
        GPU. On CUDA, a simulated row needs the user's opt-in."""
        path = self.kernel_path
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            path = select_path(self.spec, 10 * major + minor)
            if path.simulated and not simulation_allowed(self.spec):
                why = ("it has no kernel" if self.kernel_path.simulated else
                       f"the kernel of its path {self.kernel_path.name} runs on sm_{self.kernel_path.archs} only, "
                       f"this GPU is sm_{major}{minor}")
                raise SimulatedPathError(
                    f"QuantLinear {self.spec.name} ({self.spec.act_mode}): {why}, so on CUDA it would run the "
                    "simulated dequant-matmul path (float weights rebuilt on every call, slower than the float "
                    "model). Opt in with LinearQuantSpec(..., allow_simulated=True) or "
                    f"{ALLOW_SIMULATED_ENV}=1, or choose a spec with a kernel (nn/linear.py PATHS).")
            if path.layout != self.kernel_path.layout:
                raise RuntimeError(f"QuantLinear: path {path.name} reads layout {path.layout!r} but the weights are "
                                   f"stored for {self.kernel_path.name} ({self.kernel_path.layout!r})")
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects inputs with {self.in_features} features, got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"QuantLinear input must be float32/float16/bfloat16, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        # the path was resolved (and logged) when the layer was built or moved: nothing here queries the
        # device or logs, so torch.compile(fullgraph=True) traces straight through
        path = self._run_path if x2.device == self.qweight.device else self._path_for(x2.device)
        y = getattr(self, path.forward)(x2)
        for branch in self.lora.values():
            y = y + branch(x2)
        return y.reshape(*lead, self.out_features)

    # ---------------------------------------------------------------- LoRA

    def add_lora(self, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, name: str = "default") -> None:
        """Add scale·(x·Aᵀ)·Bᵀ (A [r, K], B [N, r]) as a floating-point side branch on the packed GEMM;
        the quantized weights are untouched (docs: nn/lora.py)."""
        from .lora import LoraBranch, check_lora
        check_lora(A, B, scale, self.in_features, self.out_features)
        if name in self.lora:
            raise ValueError(f"a LoRA adapter named {name!r} is already attached: remove_lora({name!r}) first")
        self.lora[name] = LoraBranch(A, B, scale).to(self.qweight.device)

    def remove_lora(self, name: str = "default") -> None:
        if name not in self.lora:
            raise KeyError(f"no LoRA adapter named {name!r} (attached: {list(self.lora)})")
        del self.lora[name]

    def fused_with_lora(self, name: str = "default") -> "QuantLinear":
        """A new QuantLinear whose weights are this layer's dequantized weights plus the adapter's
        update, quantized again (round-to-nearest, same spec, scales and smoothing). Costs a second
        rounding of every weight; the side branch (add_lora) is exact."""
        if name not in self.lora:
            raise KeyError(f"no LoRA adapter named {name!r} (attached: {list(self.lora)})")
        if self.spec.rotate or self.wzero is not None:
            raise ValueError("fusing a LoRA into rotated or asymmetric weights is not supported: keep it as a branch")
        w = self.dequantized_weight()  # in the smoothed basis: W·diag(smooth)
        smooth = self.smooth.float() if self.smooth is not None else torch.ones(self.in_features)
        w = w / smooth.to(w.device) + self.lora[name].delta_weight().to(w.device)
        base = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            base.weight.copy_(w)
            if self.bias is not None:
                base.bias.copy_(self.bias)
        fused = QuantLinear.from_linear(base, self.spec, self.act_table, smooth=self.smooth)
        fused._tracker = self._tracker
        for other, branch in self.lora.items():
            if other != name:
                fused.lora[other] = branch
        return fused.to(self.qweight.device)


class StepGroupQuantLinear(torch.nn.Module):
    """A layer whose weight precision changes with the time group (ViDiT-Q-MP: W8 in early steps, W4
    later). One QuantLinear per distinct spec; the group picks one. The choice needs the group on the
    host: free when the pipeline passes the timestep as a number or CPU tensor, else one sync."""

    def __init__(self, variants: list[QuantLinear], variant_of_group: list[int]):
        super().__init__()
        self.variants = torch.nn.ModuleList(variants)
        self.variant_of_group = list(variant_of_group)
        self._tracker = None
        self.in_features, self.out_features = variants[0].in_features, variants[0].out_features

    def bind_timestep_tracker(self, tracker) -> None:
        self._tracker = tracker
        for v in self.variants:
            v.bind_timestep_tracker(tracker)

    def weight_bytes(self) -> int:
        return sum(v.weight_bytes() for v in self.variants)

    def extra_repr(self) -> str:
        return f"variant_of_group={self.variant_of_group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tracker is None:
            raise RuntimeError("a step-group layer needs a timestep tracker: quantize the model with dtq.quantize")
        return self.variants[self.variant_of_group[self._tracker.host_group()]](x)
