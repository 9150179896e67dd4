"""Every benchmark script runs end to end in its --dry-run mode (CPU, Triton interpreter, tiny shapes):
the GPU session that runs them for real must not be the first to find a broken script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("name", ["gemm", "quantize", "attention", "e2e", "overhead"])
def test_benchmark_dry_run_writes_results(name, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"bench_{name}.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / f"bench_{name}.json").read_text())
    assert result["rows"], "no result rows"
    assert (tmp_path / f"bench_{name}.md").read_text().strip()


def test_quality_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--tiny", "--no-fid", "--recipes",
                           "rtn-w8a8", "--cls-ref-n", "100", "--sqnr-samples", "1", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rtn-w8a8" in (tmp_path / "quality.md").read_text()


def test_a_benchmark_stopped_by_its_time_limit_writes_the_rows_it_measured(tmp_path):
    """gpu_check.sh stops a benchmark that outruns its share of the device time with SIGTERM (timeout): the
    rows measured so far must reach the results, marked as cut, instead of dying with the process."""
    script = tmp_path / "cut.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import common
rows = []
with common.TimeLimit() as limit:
    for i in range(5):
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        rows.append(i)
print(rows, limit.hit, limit.notes[0][:23])
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored after the block
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0, 1] True **Cut short by the time"
