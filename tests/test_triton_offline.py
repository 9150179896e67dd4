"""Every Triton kernel compiles for sm_80/89/90 without a GPU, and its PTX holds what it should.

The interpreter accepts programs a real compile rejects (e.g. int8 dots with K-tiles < 32), so this
is the check that the kernels the interpreter tests would actually build on the GPUs we target.
"""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def aot_report():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "dtq_kernels.ops.triton.aot", "--arch", "80", "89", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_every_arch(aot_report):
    from dtq_kernels.ops.triton import KERNEL_MODULES
    names = {spec["name"] for m in KERNEL_MODULES for spec in m.AOT_SPECS}
    assert names and names == set(aot_report)
    archs = {spec["name"]: {str(a) for a in spec.get("archs", (80, 89, 90))} for m in KERNEL_MODULES
             for spec in m.AOT_SPECS}
    for name, per_arch in aot_report.items():
        assert set(per_arch) == archs[name], name  # FP8 specs exist for sm_89/90 only
        for arch, r in per_arch.items():
            assert r["missing"] == [], f"{name} sm_{arch}: PTX lacks {r['missing']}"
            assert r["regs"] is not None and r["regs"] <= 255, f"{name} sm_{arch}: {r}"


def test_no_kernel_spills_registers(aot_report):
    spills = {f"{n} sm_{a}": r["spill_bytes"] for n, pa in aot_report.items() for a, r in pa.items()
              if r["spill_bytes"]}
    assert not spills, f"register spills (local memory traffic) in: {spills}"
