#!/usr/bin/env bash
# The one command for a GPU machine (docs/gpu.md): build _C, run the GPU tests, run every benchmark,
# and write a results folder (markdown + JSON, GPU name, versions, date). Fits in 10 minutes.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT when set, else benchmarks/results/
#
# The GPU machine has torch, triton, pybind11, cmake, ninja and nvcc but no network and no diffusers:
# carry wheels in .whl/ (see the device README) and they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
stamp=$(date -u +%Y-%m-%d)
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo no-gpu)
RESULTS=${OUT:-benchmarks/results}/${stamp}_${gpu}
mkdir -p "$RESULTS"
log() { echo "== $*" | tee -a "$RESULTS/gpu_check.log"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

log "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1; } 2>&1 | tee -a "$RESULTS/gpu_check.log"

log "build (pip install -e .)"
start=$(date +%s)
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee -a "$RESULTS/gpu_check.log"
log "build took $(( $(date +%s) - start )) s"

log "GPU tests"
timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests 2>&1 | tee "$RESULTS/gpu_tests.log" | tail -30
status_tests=${PIPESTATUS[0]}

status_bench=0
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  log "benchmark $name"
  timeout 150 $PY "$bench" --out "$RESULTS" 2>&1 | tee "$RESULTS/$name.log" | tail -40
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { log "$name failed (rc $rc)"; status_bench=1; }
done

log "results in $RESULTS (tests rc $status_tests, benchmarks rc $status_bench)"
ls -la "$RESULTS"
[ "$status_tests" -eq 0 ] && [ "$status_bench" -eq 0 ]
