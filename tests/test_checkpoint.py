"""save_quantized / load_quantized: bit-identical round trips, and clear errors that leave the model untouched."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

import dtq_kernels as dtq  # noqa: E402
from dtq_kernels.checkpoint import CheckpointError  # noqa: E402
from dtq_kernels.nn import QuantLinear  # noqa: E402
from helpers_models import dit_inputs, run_dit, tiny_dit, tiny_pixart, uniform_plan  # noqa: E402

S = dtq.LinearQuantSpec


def _untouched(model) -> bool:
    return not any(isinstance(m, QuantLinear) for m in model.modules()) and not hasattr(model, "dtq_plan")


@pytest.mark.parametrize("spec,tables,groups", [
    (S(), None, 1),
    (S(weight="int4", group_size=32, act="int8"), None, 1),
    (S(weight="int6", act="int6", act_mode="static", time_groups=10), [0.04] * 10, 10),
    (S(weight="fp4_e2m1", group_size=32, act="fp4_e2m1"), None, 1),
    (S(weight="int8", act="int8", weight_symmetric=False, rotate=True), None, 1),
])
def test_round_trip_is_bit_identical(tmp_path, spec, tables, groups):
    m = tiny_dit()
    dtq.quantize(m, uniform_plan(m, spec, tables, groups))
    ref = run_dit(m, **dit_inputs(t=420))
    dtq.save_quantized(m, tmp_path / "ckpt")
    fresh = tiny_dit(seed=123)  # different FP weights: everything quantized must come from the file
    dtq.load_quantized(fresh, tmp_path / "ckpt")
    assert torch.equal(run_dit(fresh, **dit_inputs(t=420)), ref)


def test_calibrated_plan_round_trips_with_its_tensors(tmp_path):
    m = tiny_dit()

    def drive(model):
        with torch.no_grad():
            for t in (900, 500, 100):
                model(**dit_inputs(t=t))
    dtq.quantize(m, dtq.calibrate(m, "viditq-w4a8", run_fn=drive, progress=False))
    ref = run_dit(m, **dit_inputs(t=300))
    dtq.save_quantized(m, tmp_path)
    fresh = tiny_dit()
    dtq.load_quantized(fresh, tmp_path)
    assert torch.equal(run_dit(fresh, **dit_inputs(t=300)), ref)
    assert fresh.dtq_plan.recipe == "viditq-w4a8"


@pytest.fixture
def saved(tmp_path):
    m = tiny_dit()
    dtq.quantize(m, "viditq-w8a8")
    return dtq.save_quantized(m, tmp_path / "ckpt")


def test_truncated_weights_raise_and_leave_model_untouched(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fresh = tiny_dit()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        dtq.load_quantized(fresh, saved)
    assert _untouched(fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_corrupt_plan_and_wrong_version_raise(saved):
    (saved / "plan.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        dtq.load_quantized(tiny_dit(), saved)
    (saved / "plan.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format version"):
        dtq.load_quantized(tiny_dit(), saved)


def test_wrong_architecture_raises_and_leaves_model_untouched(saved):
    for other in (tiny_dit(layers=3), tiny_pixart()):
        with pytest.raises(CheckpointError, match="config differs|holds a"):
            dtq.load_quantized(other, saved)
        assert _untouched(other)


def test_missing_directory_and_unquantized_save_raise(tmp_path):
    with pytest.raises(CheckpointError, match="not a dtq checkpoint"):
        dtq.load_quantized(tiny_dit(), tmp_path / "nothing")
    with pytest.raises(ValueError, match="not quantized"):
        dtq.save_quantized(tiny_dit(), tmp_path / "x")
