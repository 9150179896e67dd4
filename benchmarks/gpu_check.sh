#!/usr/bin/env bash
# The one command for a GPU machine (docs/gpu.md): build _C, run the GPU tests and the CUDA memcheck, run the
# benchmarks, and write a results folder (markdown + JSON, GPU name, versions, date), all within a time budget.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT when set, else benchmarks/results/
#
# Environment:
#   GPU_CHECK_BUDGET_S   seconds for the whole script (default 570: one 10-minute call of the device tool,
#                        with time left to pack and send the results). Every stage gets at most its cap and
#                        never more than is left; a stage with no time left is skipped and says so.
#   GPU_CHECK_QUALITY    N > 0: also sample the quality table on the GPU (benchmarks/quality.py --defer-fid,
#                        N shards side by side, beside the build and the tests, which do not time anything);
#                        the benchmarks start once the shards are done. The Inception weights do not fit on
#                        the machine, so the FIDs and the report are made afterwards on a CPU (docs/gpu.md).
#   GPU_CHECK_E2E_ARGS   arguments of bench_e2e.py (default: the cut below that fits the budget).
#
# The GPU machine has torch, triton, pybind11, cmake, ninja and nvcc but no network and no diffusers:
# carry wheels in .whl/ (see the device README) and they are installed to /tmp/site first. The CUDA build
# needs the CUTLASS headers: carry the nvidia-cutlass wheel pinned in requirements-dev.txt there too
# (pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl), or set DTQ_CUTLASS_INCLUDE_DIR. The quality
# run needs the Fashion-MNIST test files: carry them in .gpu_data/fashion-mnist/.
#
# With $OUT set (the device tool), everything is packed into $OUT/gpu_check.tgz.part_* (the tool brings back
# at most 8 files of 16 MB; `cat gpu_check.tgz.part_* | tar xz` unpacks) and the main log is copied beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
T0=$(date +%s)
DEADLINE=$((T0 + ${GPU_CHECK_BUDGET_S:-570}))
QUALITY_SHARDS=${GPU_CHECK_QUALITY:-0}
stamp=$(date -u +%Y-%m-%d)
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo no-gpu)
if [ -n "${OUT:-}" ]; then WORK=/tmp/gpu_check; else WORK=benchmarks/results; fi
RESULTS=$WORK/${stamp}_${gpu}
QUALITY_DIR=$WORK/quality_gpu
mkdir -p "$RESULTS"
log() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$RESULTS/gpu_check.log"; }
# cap SECONDS [RESERVE]: SECONDS, or less so that RESERVE seconds stay before the deadline; 0 when < 10 s would
# be left, and then the stage is skipped (never `timeout 0`, which means no limit at all)
cap() { local c=$1 r=$(( DEADLINE - $(date +%s) - ${2:-0} )); (( r < c )) && c=$r; (( c < 10 )) && c=0; echo $c; }

pack() {  # the device tool brings back at most 8 files of 16 MB: the archive goes in 15 MB parts
  [ -n "${OUT:-}" ] || return 0
  tar czf - -C "$WORK" . | split -b 15000000 - "$OUT/gpu_check.tgz.part_" && cp "$RESULTS/gpu_check.log" "$OUT/"
  ls -la "$OUT"
}
trap pack EXIT

if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu_data/fashion-mnist ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && cp -r .gpu_data/fashion-mnist /usr/share/datasets/
fi

log "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nproc; nvcc --version | tail -1; } 2>&1 | tee -a "$RESULTS/gpu_check.log"

quality_pids=()
status_quality=0
q_cap=$(cap 390 170)
if (( QUALITY_SHARDS > 0 && q_cap > 0 )); then
  # the shards only sample (the Triton kernels; _C is not needed): nothing they do is timed against anything
  log "quality sampling: $QUALITY_SHARDS shards, at most $q_cap s"
  mkdir -p "$QUALITY_DIR"
  for ((i = 0; i < QUALITY_SHARDS; i++)); do
    timeout -k 10 "$q_cap" $PY benchmarks/quality.py --n-samples 1000 --fid-ref-n 10000 --defer-fid \
      --out-dir "$QUALITY_DIR" --shard "$i/$QUALITY_SHARDS" > "$QUALITY_DIR/shard$i.log" 2>&1 &
    quality_pids+=($!)
  done
fi

log "build (pip install -e .)"
start=$(date +%s)
# most cores: the CUTLASS kernel families compile in parallel (setup.py defaults to 2 jobs for CI)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
t=$(cap 300 200)
if (( t > 0 )); then
  timeout -k 10 "$t" $PY -m pip install -q --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1
  status_build=$?
else
  echo "skipped: out of time" > "$RESULTS/build.log"; status_build=1
fi
tail -5 "$RESULTS/build.log" | tee -a "$RESULTS/gpu_check.log"
log "build rc $status_build in $(( $(date +%s) - start )) s; _C: $($PY -c 'from dtq_kernels import _C; print(_C.built_archs())' 2>&1 | tail -1)"

log "GPU tests"
t=$(cap 200 150)
if (( t > 0 )); then
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
  timeout -k 10 "$t" $PY -m pytest -m gpu -q -p no:cacheprovider -o addopts="" $xdist tests 2>&1 \
    | tee "$RESULTS/gpu_tests.log" | tail -30
  status_tests=${PIPESTATUS[0]}
else
  log "GPU tests skipped: out of time"; status_tests=1
fi

log "compute-sanitizer memcheck of the CUDA (_C) kernels"
t=$(cap 60 130)
if command -v compute-sanitizer >/dev/null && (( t > 0 )); then
  timeout -k 10 "$t" compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/memcheck_cuda.py 2>&1 \
    | tee "$RESULTS/memcheck_cuda.log" | tail -20
  status_memcheck=${PIPESTATUS[0]}
else
  log "memcheck skipped (compute-sanitizer missing or out of time)"; status_memcheck=1
fi

if (( ${#quality_pids[@]} > 0 )); then
  log "waiting for the quality shards"
  for pid in "${quality_pids[@]}"; do wait "$pid" || status_quality=1; done
  # each shard's closing line ("shard I/N done (...)"), or its error
  for f in "$QUALITY_DIR"/shard*.log; do log "$(basename "$f"): $(grep -E "done \(|Error" "$f" | tail -1)"; done
  log "quality shards rc $status_quality"
fi

# Benchmarks, most important first; each gets its cap or what is left, and writes what it measured if cut.
status_bench=0
# bench_e2e's default cut: eager rows only (each torch.compile of a 28-block model costs tens of seconds)
E2E_ARGS=${GPU_CHECK_E2E_ARGS:-'--models dit-xl2-256,pixart-sigma-1024 --batches 2 --only "fast path, eager" --no-breakdown'}
for spec in "bench_gemm:150:" "bench_overhead:60:" "bench_e2e:120:$E2E_ARGS" "bench_quantize:60:" "bench_attention:80:"; do
  IFS=: read -r name limit args <<< "$spec"
  t=$(cap "$limit" 15)
  if (( t == 0 )); then log "benchmark $name skipped: out of time"; status_bench=1; continue; fi
  log "benchmark $name (at most $t s)"
  eval "timeout -k 10 $t $PY benchmarks/$name.py --out \"$RESULTS\" $args" 2>&1 | tee "$RESULTS/$name.log" | tail -25
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { log "$name rc $rc"; status_bench=1; }
done

log "results in $RESULTS (build rc $status_build, tests rc $status_tests, memcheck rc $status_memcheck, quality rc $status_quality, benchmarks rc $status_bench)"
[ "$status_build" -eq 0 ] && [ "$status_tests" -eq 0 ] && [ "$status_memcheck" -eq 0 ] && [ "$status_quality" -eq 0 ] \
  && [ "$status_bench" -eq 0 ]
