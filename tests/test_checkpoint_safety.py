"""Checkpoints that cannot be lost or silently corrupted: refusing and atomic saves (a child process killed
at random points of a save, between files and mid-file), SHA-256 integrity (a bit flipped in each file),
permissions under two umasks, and the storage dtype of the layers kept in floating point."""
import json
import os
import random
import signal
import time
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

import dtq_kernels as dtq  # noqa: E402
from dtq_kernels import checkpoint  # noqa: E402
from dtq_kernels.checkpoint import CheckpointError  # noqa: E402
from dtq_kernels.nn import QuantLinear  # noqa: E402
from helpers_models import dit_inputs, run_dit, tiny_dit  # noqa: E402

FILES = (checkpoint.MODEL_FILE, checkpoint.PLAN_FILE, checkpoint.PLAN_TENSORS_FILE)


def _quantized(seed=0):
    m = tiny_dit(seed=seed)
    return dtq.quantize(m, "viditq-w8a8")


def _output(path) -> torch.Tensor:
    return run_dit(dtq.load_quantized(tiny_dit(seed=99), path), **dit_inputs(t=300))


def _untouched(model, before) -> bool:
    return (not any(isinstance(m, QuantLinear) for m in model.modules()) and not hasattr(model, "dtq_plan")
            and all(torch.equal(before[k], v) for k, v in model.state_dict().items()))


def _leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.dtq-"))


# ------------------------------------------------------------------------------------------ refusals

def test_refuses_to_overwrite_without_the_flag_and_replaces_with_it(tmp_path):
    ck = tmp_path / "ck"
    first, second = _quantized(0), _quantized(1)
    dtq.save_quantized(first, ck)
    before = {f: (ck / f).read_bytes() for f in FILES}
    with pytest.raises(CheckpointError, match="already holds a checkpoint.*overwrite=True"):
        dtq.save_quantized(second, ck)
    assert {f: (ck / f).read_bytes() for f in FILES} == before
    dtq.save_quantized(second, ck, overwrite=True)
    assert torch.equal(_output(ck), run_dit(second, **dit_inputs(t=300)))
    assert _leftovers(ck) == []


def test_a_checkpoint_from_the_older_format_counts_as_ours(tmp_path):
    """A version-1 checkpoint (plan.json without "kind") is still a dtq checkpoint: refused without the flag,
    replaced with it (a demo re-run over its own older output must not fail as "someone else's files")."""
    ck = tmp_path / "ck"
    dtq.save_quantized(_quantized(0), ck)
    meta = json.loads((ck / checkpoint.PLAN_FILE).read_text())
    old = {k: v for k, v in meta.items() if k not in ("kind", "files", "checksum")} | {"format_version": 1}
    (ck / checkpoint.PLAN_FILE).chmod(0o644)
    (ck / checkpoint.PLAN_FILE).write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        dtq.save_quantized(_quantized(1), ck)
    second = _quantized(1)
    dtq.save_quantized(second, ck, overwrite=True)
    assert torch.equal(_output(ck), run_dit(second, **dit_inputs(t=300)))
    (ck / checkpoint.MODEL_FILE).unlink()  # a version-1 plan-only directory: never replaced by a full save
    (ck / checkpoint.PLAN_FILE).write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="plan-only"):
        dtq.save_quantized(second, ck, overwrite=True)


def test_refuses_foreign_directories_files_and_mixing_plan_and_model(tmp_path):
    m = _quantized()
    users = tmp_path / "users_dir"
    users.mkdir()
    (users / "model.safetensors").write_bytes(b"the user's own weights")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="holding other files"):
            dtq.save_quantized(m, users, overwrite=overwrite)
    assert (users / "model.safetensors").read_bytes() == b"the user's own weights"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        dtq.save_quantized(m, a_file, overwrite=True)
    assert a_file.read_text() == "x"

    full, plan_dir = tmp_path / "full", tmp_path / "plan"
    dtq.save_quantized(m, full)
    checkpoint.save_plan(m.dtq_plan, plan_dir, m)
    with pytest.raises(CheckpointError, match="quantized-model checkpoint; refusing to write a plan-only"):
        checkpoint.save_plan(m.dtq_plan, full, m, overwrite=True)
    with pytest.raises(CheckpointError, match="plan-only directory; refusing to write a quantized-model"):
        dtq.save_quantized(m, plan_dir, overwrite=True)
    assert sorted(p.name for p in full.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in plan_dir.iterdir()) == [checkpoint.PLAN_FILE, checkpoint.PLAN_TENSORS_FILE]
    with pytest.raises(CheckpointError, match="plan without weights"):
        dtq.load_quantized(tiny_dit(), plan_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    dtq.save_quantized(m, empty)  # an empty directory is fine
    assert torch.equal(_output(empty), _output(full))


def test_an_interrupted_replace_is_recovered_and_leftovers_are_cleaned(tmp_path):
    m = _quantized()
    ck = tmp_path / "ck"
    dtq.save_quantized(m, ck)
    ref = _output(ck)
    # killed between "rename the old one aside" and "rename the new one in"; a dead build directory too
    os.rename(ck, tmp_path / ".ck.dtq-old-999999999-abc")
    (tmp_path / ".ck.dtq-tmp-999999999-def").mkdir()
    assert torch.equal(_output(ck), ref)  # load moved the old checkpoint back
    dtq.save_quantized(m, ck, overwrite=True)
    assert _leftovers(ck) == []


# ------------------------------------------------------------------------------------- fault injection

class _Die(Exception):
    pass


def _hooked_save(model, target, die_at: int | None, torn: bool, counter: list) -> None:
    """save_quantized with every write, fsync, rename and delete counted as one step; at step `die_at`
    the process ends on the spot (os._exit: no cleanup runs), a write first writing half its chunk
    when `torn`. die_at None only counts."""
    real = {"write": os.write, "fsync": os.fsync, "rename": os.rename, "rmtree": shutil.rmtree}

    def step(name, *args):
        counter[0] += 1
        if counter[0] == die_at:
            if name == "write" and torn:
                real["write"](args[0], bytes(args[1][: max(1, len(args[1]) // 2)]))
            os._exit(77)
        return real[name](*args)

    hooks = {"write": lambda fd, b: step("write", fd, b), "fsync": lambda fd: step("fsync", fd),
             "rename": lambda a, b: step("rename", a, b),
             "rmtree": lambda p, ignore_errors=False: step("rmtree", p, ignore_errors)}
    saved = (os.write, os.fsync, os.rename, checkpoint.shutil.rmtree, checkpoint.WRITE_CHUNK_BYTES)
    os.write, os.fsync, os.rename = hooks["write"], hooks["fsync"], hooks["rename"]
    checkpoint.shutil.rmtree = hooks["rmtree"]
    checkpoint.WRITE_CHUNK_BYTES = 16384  # many write calls per file: kills land mid-file
    try:
        dtq.save_quantized(model, target, overwrite=True)
    finally:
        os.write, os.fsync, os.rename, checkpoint.shutil.rmtree, checkpoint.WRITE_CHUNK_BYTES = saved


def _wait_or_kill(pid: int, seconds: float) -> int:
    """waitpid with a deadline: a child that hangs is killed (and the test fails on its status) rather than
    hanging the whole suite."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_a_save_killed_at_random_points_never_loses_the_old_checkpoint(tmp_path):
    old_model, new_model = _quantized(0), _quantized(1)
    ck = tmp_path / "ck"
    dtq.save_quantized(old_model, ck)
    old_out, new_out = _output(ck), run_dit(new_model, **dit_inputs(t=300))
    assert not torch.equal(old_out, new_out)
    counter = [0]
    shutil.copytree(ck, tmp_path / "count")
    _hooked_save(new_model, tmp_path / "count", None, False, counter)  # how many steps a replacing save takes
    steps = counter[0]
    assert steps >= 10

    rng = random.Random(14)
    points = sorted(set([1, steps - 2, steps - 1, steps] + rng.sample(range(1, steps + 1), min(26, steps))))
    outcomes = {"old": 0, "new": 0, "lost": 0}
    for k in points:
        checkpoint.recover(ck, clean=True)  # what the save would do first: keeps the step numbering
        pid = os.fork()
        if pid == 0:  # the child saves the new model over the old one and dies at step k
            try:
                # the parent's OpenMP pool does not survive fork(): a parallel op in the child would wait
                # forever for its workers, so the child computes on its own thread
                torch.set_num_threads(1)
                _hooked_save(new_model, ck, k, torn=k % 2 == 0, counter=[0])
            finally:
                os._exit(0)
        status = _wait_or_kill(pid, seconds=120)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 77), f"save child ended with status {status}"
        try:
            out = _output(ck)
        except CheckpointError:
            outcomes["lost"] += 1
            continue
        which = "old" if torch.equal(out, old_out) else "new" if torch.equal(out, new_out) else "lost"
        outcomes[which] += 1
        if which == "new":  # put the old one back for the next injection
            dtq.save_quantized(old_model, ck, overwrite=True)
    print(f"\nfault injection: {len(points)} kills over {steps} save steps -> {outcomes}")
    # killed before the final rename: the old checkpoint; after it (fsync, deleting the old one): the new
    assert outcomes["lost"] == 0 and outcomes["new"] >= 1 and outcomes["old"] >= len(points) - 3
    dtq.save_quantized(new_model, ck, overwrite=True)  # and a later save cleans whatever the kills left
    assert _leftovers(ck) == [] and torch.equal(_output(ck), new_out)


# ------------------------------------------------------------------------------------------ integrity

def test_a_flipped_bit_in_any_file_is_caught_before_the_model_changes(tmp_path):
    m = tiny_dit()
    dtq.quantize(m, dtq.calibrate(m, "viditq-w4a8", run_fn=lambda mm: mm(**dit_inputs(t=500)), progress=False))
    ck = dtq.save_quantized(m, tmp_path / "ck")
    assert checkpoint.read_plan(ck)[1].tensors, "the plan should carry tensors (smoothing factors)"
    rng = random.Random(0)
    flips = 0
    for name in FILES:
        f = ck / name
        good = f.read_bytes()
        positions = {0, len(good) - 1, len(good) // 2, *rng.sample(range(len(good)), 7)}
        for pos in positions:
            bad = bytearray(good)
            bad[pos] ^= 1 << rng.randrange(8)
            f.write_bytes(bytes(bad))
            fresh = tiny_dit()
            before = {k: v.clone() for k, v in fresh.state_dict().items()}
            with pytest.raises(CheckpointError) as e:
                dtq.load_quantized(fresh, ck)
            assert name in str(e.value), str(e.value)
            assert _untouched(fresh, before)
            flips += 1
        f.write_bytes(good)
    print(f"\nbit flips: {flips} tried, {flips} caught")
    assert torch.equal(_output(ck), run_dit(m, **dit_inputs(t=300)))


def test_size_only_verification_is_the_documented_opt_out(tmp_path):
    ck = dtq.save_quantized(_quantized(), tmp_path / "ck")
    f = ck / checkpoint.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: the header still parses
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: its SHA-256"):
        dtq.load_quantized(tiny_dit(), ck)
    dtq.load_quantized(tiny_dit(), ck, verify="size")  # sizes only: loads (what the opt-out trades away)
    f.write_bytes(bytes(data[:-1]))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        dtq.load_quantized(tiny_dit(), ck, verify="size")
    with pytest.raises(ValueError, match="verify must be one of"):
        dtq.load_quantized(tiny_dit(), ck, verify="none")


# ---------------------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o077, 0o600, 0o700), (0o022, 0o644, 0o755)])
def test_saved_files_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    m = _quantized()
    old = os.umask(umask)
    try:
        ck = dtq.save_quantized(m, tmp_path / "ck")
        dtq.save_quantized(m, ck, overwrite=True)  # a replacement gets the same modes
    finally:
        os.umask(old)
    assert ck.stat().st_mode & 0o777 == dir_mode
    assert {f.name: f.stat().st_mode & 0o777 for f in ck.iterdir()} == {f: file_mode for f in FILES}


# ------------------------------------------------------------------------------- kept-FP storage dtype

def test_fp_tensors_are_stored_narrow_when_exact_and_as_asked(tmp_path):
    m = tiny_dit()
    with torch.no_grad():  # weights that came from an fp16 checkpoint: fp16 holds them exactly
        for p in m.parameters():
            p.copy_(p.half().float())
    dtq.quantize(m, "viditq-w8a8")
    ref = run_dit(m, **dit_inputs(t=300))
    auto = dtq.save_quantized(m, tmp_path / "auto")
    wide = dtq.save_quantized(m, tmp_path / "wide", fp_dtype="fp32")
    header = checkpoint._load_tensors(auto / checkpoint.MODEL_FILE)
    assert header["transformer_blocks.0.norm1.linear.weight"].dtype == torch.float16  # kept in FP
    assert header["transformer_blocks.0.attn1.to_qkv.wscale"].dtype == torch.float32  # quantized layers keep
    assert header["transformer_blocks.0.ff.net.2.wscale"].dtype == torch.float32      # theirs, fused or not
    assert torch.equal(_output(auto), ref) and torch.equal(_output(wide), ref)  # bit-identical either way
    sizes = {p: (tmp_path / p / checkpoint.MODEL_FILE).stat().st_size for p in ("auto", "wide")}
    assert sizes["auto"] < 0.75 * sizes["wide"], sizes

    rnd = _quantized()  # random fp32 weights: auto keeps fp32, bf16 on request (rounded, close)
    dtq.save_quantized(rnd, tmp_path / "rnd")
    dtq.save_quantized(rnd, tmp_path / "rnd_bf16", fp_dtype=torch.bfloat16)
    assert checkpoint._load_tensors(tmp_path / "rnd" / checkpoint.MODEL_FILE)["proj_out_2.weight"].dtype == torch.float32
    a, b = _output(tmp_path / "rnd"), _output(tmp_path / "rnd_bf16")
    assert torch.equal(a, run_dit(rnd, **dit_inputs(t=300))) and not torch.equal(a, b)
    assert float((a - b).norm() / a.norm()) < 0.05
    with pytest.raises(ValueError, match="fp_dtype must be"):
        dtq.save_quantized(rnd, tmp_path / "x", fp_dtype="fp8")


def test_reference_w8a8_checkpoint_is_well_under_its_fp16_size(tmp_path):
    from dtq_kernels import cli
    from dtq_kernels.models.reference_dit import load_reference_dit
    m = load_reference_dit()
    fp16_bytes = sum(v.numel() * 2 for v in m.state_dict().values())
    dtq.quantize(m, "viditq-w8a8")
    ck = dtq.save_quantized(m, tmp_path / "ck")
    d = cli.describe(ck)["totals"]
    print(f"\nreference W8A8: model.safetensors {d['file_bytes']} bytes, FP16 model {d['fp16_model_bytes']} bytes "
          f"({d['file_bytes'] / d['fp16_model_bytes']:.3f}x)")
    assert d["fp16_model_bytes"] == fp16_bytes
    assert d["file_bytes"] < 0.75 * fp16_bytes  # 1.07x before (kept-FP layers stored in fp32)
    meta = json.loads((ck / checkpoint.PLAN_FILE).read_text())
    assert meta["files"][checkpoint.MODEL_FILE]["bytes"] == d["file_bytes"]
