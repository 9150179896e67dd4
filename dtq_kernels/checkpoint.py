"""Save and load quantized models: a directory with

    model.safetensors         every parameter and buffer of the quantized model (packed codes, scales, FP parts)
    plan.json                 {"format_version", "kind", "model_class", "config", "plan": QuantPlan JSON,
                               "fused_linears": {fused layer: {member layer: out_features}} (nn/fused.py),
                               "files": {name: {"bytes", "sha256"}}, "checksum"}
    plan_tensors.safetensors  the plan's vectors (smoothing factors, calibrated weights)

A plan-only directory (`save_plan`, `dtq calibrate`) has the same layout without model.safetensors;
plan.json's "kind" ("model" or "plan") says which, and the two never share a directory.

Guarantees:
* Atomic: `new_checkpoint_dir` builds the directory next to the target and renames it into place,
  so an interrupted save leaves the previous checkpoint (or nothing) and never a mix of two saves.
  Every save goes through it: `write_checkpoint_dir` (save_quantized, save_plan) and the save_pretrained
  of a dtq-quantized diffusers model (diffusers_quantizer.py).
* Refusing: an existing checkpoint is replaced only with overwrite=True; a directory holding other
  files, a plain file, a checkpoint of another kind, or a place the user cannot write is refused.
* Integrity: plan.json records the size and SHA-256 of every other file and a checksum of its own
  content; `load_quantized` / `read_plan` verify them all before touching the model and name the file
  that fails (verify="size" checks sizes only: for checkpoints too large to hash at every load).
* Permissions: files and directories are created with mode 0o666 / 0o777 minus the umask, like any
  other file the user writes.
* Floating-point tensors outside the quantized layers (layers kept in FP, norms, embeddings) are stored
  in `fp_dtype`: by default the narrowest of fp16 / bf16 that holds each tensor exactly (a model loaded
  from an fp16 checkpoint is stored in fp16, bit for bit), else its own dtype.

`load_quantized(model_class_or_fresh_fp_model, path)` checks everything (integrity, format version, model
class, config, every tensor's name, shape and dtype) before it changes the model, so a wrong architecture or a
corrupt / truncated file raises a clear error and leaves the model untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from .meta import empty_model, has_meta_tensors
from .nn.fused import apply_fast_path, split_fused_state
from .plan import QuantPlan
from .quantize import build_empty, check_plan_fits, install

CHECKPOINT_FORMAT_VERSION = 2
MODEL_FILE, PLAN_FILE, PLAN_TENSORS_FILE = "model.safetensors", "plan.json", "plan_tensors.safetensors"
KIND_MODEL, KIND_PLAN, KIND_DIFFUSERS, KIND_PIPELINE = "model", "plan", "diffusers", "diffusers-pipeline"
DIFFUSERS_CONFIG = "config.json"  # the manifest of a diffusers save: KIND_DIFFUSERS when quant_method is "dtq"
PIPELINE_INDEX = "model_index.json"  # a pipeline save's: KIND_PIPELINE when one component is a dtq save
VERIFY_MODES = ("sha256", "size")
FP_STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WRITE_CHUNK_BYTES = 1 << 22  # files are written in chunks of this many bytes
_TMP_TAG, _OLD_TAG = ".dtq-tmp-", ".dtq-old-"

FileContent = Union[bytes, Mapping[str, torch.Tensor], dict]


class CheckpointError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ writer

def _serialize(name: str, content) -> bytes:
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    if name.endswith(".safetensors"):
        tensors = {k: v.detach().cpu().contiguous() for k, v in content.items()}
        return save_safetensors_bytes(tensors, metadata={"format": "dtq_kernels"})
    raise TypeError(f"checkpoint file {name}: content must be bytes or a dict of tensors (.safetensors), "
                    f"got {type(content).__name__}")


def _write_file(path: Path, data: bytes) -> None:
    """Create `path` (mode 0o666 minus the umask) and write `data` in chunks (new_checkpoint_dir fsyncs it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:WRITE_CHUNK_BYTES])
            view = view[n:]
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, deepest first, `root` last: all of it is on disk
    before the rename that publishes it (whoever wrote the files, e.g. diffusers, need not have)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _canonical(manifest: dict) -> bytes:
    """The manifest's bytes; json.loads keeps key order, so a loaded manifest dumps back to the same bytes."""
    return json.dumps(manifest, indent=1).encode()


def _siblings(target: Path, tag: str) -> list[Path]:
    pattern = re.compile(re.escape(f".{target.name}{tag}") + r"(\d+)-[0-9a-f]+$")
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if pattern.match(p.name)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(p: Path) -> int:
    return int(p.name.rsplit("-", 2)[-2])


def recover(target: str | Path, *, clean: bool = False) -> None:
    """Finish what an interrupted save (`new_checkpoint_dir`) left next to `target`: if the target is missing
    but its previous version was already moved aside, move it back (the interrupted save never
    completed). With clean=True (a new save is starting) also delete leftover build directories of
    dead processes and previous versions that a completed save did not get to delete."""
    target = Path(target)
    olds = _siblings(target, _OLD_TAG)
    if not target.exists() and olds:
        os.rename(max(olds, key=lambda p: p.stat().st_mtime), target)
        olds = _siblings(target, _OLD_TAG)
    if clean:
        for p in olds + [p for p in _siblings(target, _TMP_TAG) if not _pid_alive(_pid_of(p))]:
            shutil.rmtree(p, ignore_errors=True)


def _existing_kind(path: Path, manifest: str) -> str | None:
    """The kind of an existing checkpoint: the "kind" its manifest records, KIND_DIFFUSERS for a diffusers
    config.json whose quantization_config has quant_method "dtq", KIND_PIPELINE for a pipeline's
    model_index.json with such a component, the kind a version-1 plan.json implies; None when unreadable
    or neither."""
    try:
        meta = json.loads((path / manifest).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if manifest == PIPELINE_INDEX:
        components = [name for name in meta if not name.startswith("_") and (path / name).is_dir()]
        dtq = any(_existing_kind(path / name, DIFFUSERS_CONFIG) == KIND_DIFFUSERS for name in components)
        return KIND_PIPELINE if dtq else None
    if manifest == DIFFUSERS_CONFIG:
        quant = meta.get("quantization_config")
        return KIND_DIFFUSERS if isinstance(quant, dict) and quant.get("quant_method") == "dtq" else None
    if "kind" not in meta and meta.get("format_version") == 1 and "plan" in meta:
        # written by an older dtq_kernels (no "kind" yet): still ours, so overwrite=True may replace it
        return KIND_MODEL if (path / MODEL_FILE).is_file() else KIND_PLAN
    return meta.get("kind")


def _check_writable(target: Path) -> None:
    """Raise CheckpointError unless the directory that will hold `target` (or its nearest existing
    ancestor) can be written: the new checkpoint is built next to `target` and renamed into place."""
    parent = Path(os.path.abspath(target)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"{target}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"no permission to write in {parent}: a checkpoint at {target} is built in a "
                              "temporary directory next to it and renamed into place")


def check_target(target: str | Path, *, kind: str = KIND_MODEL, overwrite: bool = False,
                 manifest: str = PLAN_FILE) -> bool:
    """Raise CheckpointError for a `target` that new_checkpoint_dir would refuse (see there);
    True when an existing checkpoint would be replaced. Changes nothing: commands call it before long work."""
    target = Path(target)
    if not target.exists():
        if target.is_symlink():
            raise CheckpointError(f"{target} is a dangling symbolic link: refusing to write a checkpoint there")
        _check_writable(target)
        return False
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory: refusing to write a checkpoint over it")
    _check_writable(target)
    entries = list(target.iterdir())
    if not entries:
        return True
    if not (target / manifest).is_file():
        raise CheckpointError(f"{target} is a directory holding other files ({', '.join(sorted(e.name for e in entries)[:4])}"
                              f"{', ...' if len(entries) > 4 else ''}) and no {manifest}: refusing to write a "
                              "checkpoint into it; choose a new or empty directory")
    existing = _existing_kind(target, manifest)
    if existing != kind:
        what = {KIND_MODEL: "a quantized-model checkpoint", KIND_PLAN: "a plan-only directory",
                KIND_DIFFUSERS: "a dtq-quantized diffusers model",
                KIND_PIPELINE: "a diffusers pipeline with a dtq-quantized component"}
        if existing is None:
            raise CheckpointError(f"{target} holds a {manifest} that dtq did not write: refusing to write "
                                  f"{what.get(kind, kind)} into it; choose a new or empty directory")
        raise CheckpointError(f"{target} holds {what.get(existing, f'a checkpoint of kind {existing!r}')}; refusing to write {what.get(kind, kind)} over "
                              "it (they never share a directory)")
    if not overwrite:
        raise CheckpointError(f"{target} already holds a checkpoint: pass overwrite=True (dtq --force) to replace it")
    return True


@contextmanager
def new_checkpoint_dir(target: str | Path, *, kind: str, overwrite: bool = False,
                       manifest: str = PLAN_FILE) -> Iterator[Path]:
    """Yield a fresh empty directory to write a checkpoint into; when the block ends normally, it becomes
    `target` atomically. The one save procedure of every checkpoint (write_checkpoint_dir, diffusers'
    save_pretrained of a dtq-quantized model).

    Before yielding: `recover` finishes what an interrupted save left, then `check_target` refuses
    (CheckpointError) a file, a directory holding other files, a checkpoint of another `kind`, an existing
    checkpoint without overwrite=True, or a place the user cannot write. The directory yielded is a
    sibling `.<name>.dtq-tmp-<pid>-<id>` (mode 0o777 minus the umask). When the block raises, it is
    deleted and `target` is left as it was. Otherwise every file and directory in it is fsynced and it is
    renamed to `target` (one atomic rename); when replacing an existing checkpoint, the old one is first
    renamed to `.<name>.dtq-old-<pid>-<id>`, the new one renamed in, and only then the old one deleted. An
    interruption at any point therefore leaves `target` either the complete old checkpoint, the complete
    new one, or (between the two renames) missing with the old one aside, which `recover` (run by every
    load and save) moves back. One writer per target at a time: two processes saving to the same
    directory at once are not coordinated.
    """
    target = Path(target)
    recover(target, clean=True)
    replacing = check_target(target, kind=kind, overwrite=overwrite, manifest=manifest)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp = target.parent / f".{target.name}{_TMP_TAG}{token}"
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replacing:
        old = target.parent / f".{target.name}{_OLD_TAG}{token}"
        os.rename(target, old)
        os.rename(tmp, target)
        _fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
        _fsync_path(target.parent)


def write_checkpoint_dir(files: Mapping[str, FileContent], target: str | Path, *, overwrite: bool = False,
                         manifest: str = PLAN_FILE, kind: str = KIND_MODEL) -> Path:
    """Write a checkpoint directory atomically, with an integrity manifest; returns its path.

    files: relative file name -> content: bytes (written as is), a dict of tensors (for a name ending
    in .safetensors: written as safetensors), and under `manifest` a JSON-serializable dict, to which
    this function adds "kind" and "files" ({name: {"bytes", "sha256"}} of every other file) and then
    "checksum" (SHA-256 of the manifest's canonical JSON without it); `verify_checkpoint_dir` checks all.

    The files are written through `new_checkpoint_dir` (the manifest last), which says what is refused
    and how the directory replaces `target` atomically: a `target` that is a file; a non-empty directory
    without `manifest` (someone else's files); a checkpoint whose manifest records another `kind` (a
    plan-only save never replaces a full checkpoint, nor the reverse); an existing checkpoint unless
    overwrite=True. Files get mode 0o666 and directories 0o777, minus the process umask.
    """
    target = Path(target)
    if manifest not in files or not isinstance(files[manifest], dict):
        raise ValueError(f"files must hold the manifest {manifest!r} as a dict")
    bad = [name for name in files if Path(name).name != name or name.startswith(".")]
    if bad:
        raise ValueError(f"checkpoint file names must be plain names, got {bad[0]!r}")
    with new_checkpoint_dir(target, kind=kind, overwrite=overwrite, manifest=manifest) as tmp:
        records = {}
        for name, content in files.items():
            if name == manifest:
                continue
            data = _serialize(name, content)
            _write_file(tmp / name, data)
            records[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta = {**files[manifest], "kind": kind, "files": records}
        meta.pop("checksum", None)
        meta["checksum"] = hashlib.sha256(_canonical(meta)).hexdigest()
        _write_file(tmp / manifest, _canonical(meta))
    return target


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint_dir(path: str | Path, *, manifest: str = PLAN_FILE, verify: str = "sha256") -> dict:
    """Read `manifest` of a directory written by write_checkpoint_dir and check its own checksum and the
    size (and with verify="sha256", the SHA-256) of every file it lists; returns the manifest dict.
    Raises CheckpointError naming the file that fails."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    path = Path(path)
    recover(path)
    mfile = path / manifest
    if not mfile.is_file():
        raise CheckpointError(f"{path} is not a dtq checkpoint (no {manifest})")
    try:
        meta = json.loads(mfile.read_bytes().decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mfile} is corrupt: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{mfile} is corrupt: not a JSON object")
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{mfile}: unsupported checkpoint format version {meta.get('format_version')!r} "
                              f"(this dtq_kernels reads {CHECKPOINT_FORMAT_VERSION}; re-save older checkpoints)")
    body = {k: v for k, v in meta.items() if k != "checksum"}
    ok = hashlib.sha256(_canonical(body)).hexdigest() == meta.get("checksum")
    files = meta.get("files")
    if not ok or not isinstance(files, dict):
        raise CheckpointError(f"{mfile} is corrupt: its content does not match its checksum")
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"missing checkpoint file {f}")
        size = f.stat().st_size
        if size != rec.get("bytes"):
            raise CheckpointError(f"{f} is corrupt or truncated: {size} bytes, the manifest records {rec.get('bytes')}")
        if verify == "sha256" and _sha256_file(f) != rec.get("sha256"):
            raise CheckpointError(f"{f} is corrupt: its SHA-256 does not match the one recorded in {manifest}")
    return meta


# ------------------------------------------------------------------------------------------ dtq layout

def model_config(model: torch.nn.Module) -> dict:
    """The model's (diffusers) config as plain JSON data, private "_" keys left out: what a checkpoint
    records so that it is only ever loaded into the architecture it was saved from."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}, default=str))


def _plan_files(plan: QuantPlan, model: torch.nn.Module) -> dict:
    meta = {"format_version": CHECKPOINT_FORMAT_VERSION, "model_class": type(model).__name__,
            "config": model_config(model), "plan": json.loads(plan.to_json()),
            "fused_linears": dict(getattr(model, "dtq_fused", {}))}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in plan.tensors.items()}
    return {PLAN_TENSORS_FILE: tensors, PLAN_FILE: meta}


def _quantized_prefixes(model: torch.nn.Module) -> list[str]:
    from .nn.linear import QuantLinear, StepGroupQuantLinear
    return [n + "." for n, m in model.named_modules() if isinstance(m, (QuantLinear, StepGroupQuantLinear))]


def _storage_dtype(t: torch.Tensor, fp_dtype) -> torch.dtype:
    """The dtype a floating tensor outside the quantized layers is stored in (see save_quantized)."""
    if fp_dtype is not None:
        return fp_dtype
    for narrow in (torch.float16, torch.bfloat16):
        if t.dtype.itemsize > narrow.itemsize and torch.equal(t.to(narrow).to(t.dtype), t):
            return narrow
    return t.dtype


def _resolve_fp_dtype(fp_dtype) -> torch.dtype | None:
    if fp_dtype is None or fp_dtype == "auto":
        return None
    if isinstance(fp_dtype, str):
        if fp_dtype not in FP_STORAGE_DTYPES:
            raise ValueError(f"fp_dtype must be 'auto' or one of {sorted(FP_STORAGE_DTYPES)}, got {fp_dtype!r}")
        return FP_STORAGE_DTYPES[fp_dtype]
    if fp_dtype not in FP_STORAGE_DTYPES.values():
        raise ValueError(f"fp_dtype must be torch.float32, float16 or bfloat16, got {fp_dtype!r}")
    return fp_dtype


def save_quantized(model: torch.nn.Module, path: str | Path, *, overwrite: bool = False, fp_dtype=None) -> Path:
    """Write a quantized model (one that went through dtq.quantize) to the directory `path`, atomically
    (see write_checkpoint_dir: an existing checkpoint is replaced only with overwrite=True).

    fp_dtype: storage dtype of the floating-point tensors outside the quantized layers (layers kept in
    FP, norms, embeddings): None / "auto" (default) stores each in the narrowest of fp16 / bf16 that
    holds it exactly, else in its own dtype, so the round trip stays bit-identical; "fp16", "bf16"
    or "fp32" (or the torch dtype) forces one, rounding if needed (loading casts back to the model's
    dtype). Codes, scales and tables of the quantized layers always keep their own dtypes."""
    plan = getattr(model, "dtq_plan", None)
    if not isinstance(plan, QuantPlan):
        raise ValueError("this model was not quantized with dtq.quantize (no plan attached): nothing to save")
    fp = _resolve_fp_dtype(fp_dtype)
    quantized = _quantized_prefixes(model)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point() and not any(k.startswith(p) for p in quantized):
            dt = _storage_dtype(v, fp)
            narrowed = v.to(dt)
            if dt != v.dtype and bool(torch.isfinite(v).all()) and not bool(torch.isfinite(narrowed).all()):
                raise ValueError(f"tensor {k} overflows {dt} (values up to {float(v.abs().max()):.3g}): "
                                 "store it with a wider fp_dtype")
            v = narrowed
        # clone: safetensors refuses tensors that share storage, and views of larger buffers
        state[k] = v.contiguous().clone()
    return write_checkpoint_dir({MODEL_FILE: state, **_plan_files(plan, model)}, path, overwrite=overwrite,
                                kind=KIND_MODEL)


def save_plan(plan: QuantPlan, path: str | Path, model: torch.nn.Module, *, overwrite: bool = False) -> Path:
    """Write `plan` (plan.json + plan_tensors.safetensors) for `model`'s class and config into the
    directory `path`, atomically: the plan half of a checkpoint, which `read_plan` reads back (`dtq
    calibrate`). Never written into a full checkpoint's directory (nor the reverse)."""
    return write_checkpoint_dir(_plan_files(plan, model), path, overwrite=overwrite, kind=KIND_PLAN)


def read_plan(path: str | Path, *, verify: str = "sha256") -> tuple[dict, QuantPlan]:
    """(checkpoint metadata, QuantPlan) of a saved checkpoint or plan directory, after verifying the
    integrity of every file (`verify`: "sha256", or "size" for sizes only); no model needed."""
    path = Path(path)
    meta = verify_checkpoint_dir(path, verify=verify)
    if meta.get("kind") not in (KIND_MODEL, KIND_PLAN):
        raise CheckpointError(f"{path / PLAN_FILE}: unknown checkpoint kind {meta.get('kind')!r}")
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
                   device: str | torch.device | None = None, fuse: bool = True, *,
                   verify: str = "sha256") -> torch.nn.Module:
    """Load a quantized checkpoint: every tensor bit-identical to the saved model's, and so are its
    outputs (on CPU, tensors assigned from the file keep the file's 8-byte alignment, and BLAS may then
    round a floating-point layer's sum differently by an ulp; a copy with its own allocation does not).
    Every file's size and SHA-256 is checked first; verify="size" skips the hashing (faster for very
    large checkpoints, but then flipped bits go unnoticed).

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
    meta, plan = read_plan(path, verify=verify)
    if meta.get("kind") != KIND_MODEL:
        raise CheckpointError(f"{path} holds a plan without weights (saved by `dtq calibrate`): apply it "
                              "with dtq.quantize / `dtq quantize --plan`")
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
    for k, (shape, dtype, quantized) in expected.items():
        stored = state[k].dtype
        dtype_ok = stored == dtype or (not quantized and dtype.is_floating_point
                                       and stored in FP_STORAGE_DTYPES.values())
        if tuple(state[k].shape) != shape or not dtype_ok:
            raise CheckpointError(f"checkpoint tensor {k} is {tuple(state[k].shape)} {stored}, "
                                  f"the model expects {shape} {dtype}")
    install(model, plan, build_empty, fuse=False)
    # a skeleton (built from the class) takes the file's tensors as they are, no copies: a floating tensor
    # stored narrower keeps the stored dtype, which the default fp_dtype picks only where it holds the values
    # exactly (a model already in fp16/bf16); a given instance copies, casting back to its own dtype
    assign = bool(has_meta_tensors(model))
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


def _expected_state(model, plan: QuantPlan, linears: dict) -> dict[str, tuple[tuple, torch.dtype, bool]]:
    """name -> (shape, dtype, in a quantized layer) of the quantized model's state dict, computed
    without changing `model`."""
    expected = {k: (tuple(v.shape), v.dtype, False) for k, v in model.state_dict().items()
                if not any(k.startswith(name + ".") for name in linears)}
    for name, lin in linears.items():
        skeleton = build_empty(torch.nn.Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                device="meta"), name, plan.layers[name], plan)
        for k, v in skeleton.state_dict().items():
            expected[f"{name}.{k}"] = (tuple(v.shape), v.dtype, True)
    return expected
