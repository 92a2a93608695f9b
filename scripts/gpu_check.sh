#!/usr/bin/env bash
# `make gpu-check`: everything a GPU machine checks, in one command sized for a short lease.
#   1. builds the package + fused-Adam extension (CPU + CUDA) in the background,
#   2. meanwhile runs the `cuda` tests that do not need the extension (kernels: attention, CE, T5),
#   3. then the extension-dependent `cuda` tests (optimizer, trainer, HF integration),
#   4. then the benchmarks in priority order under a total time budget (bench/gpu_check.py).
# Logs and result tables go to $OUT (default bench/results); with TAR=path.tgz the results folder is
# packed after every benchmark. Knobs: PY, GPU_TEST_TIMEOUT, BENCH_BUDGET, BENCH_TIMEOUTS, XDIST.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results}
GPU_TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-150}
BENCH_BUDGET=${BENCH_BUDGET:-300}
BENCH_TIMEOUTS=${BENCH_TIMEOUTS:-}
XDIST=${XDIST:-8}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-12}
mkdir -p "$OUT"
log() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

log "building the extension (background)"
( $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; echo "build rc=$?" >> "$OUT/build.log" ) &
build_pid=$!

failed=()   # test stages that failed: the benchmarks still run, but the exit status says so
par=()
$PY -c "import xdist" 2>/dev/null && [ "$XDIST" -gt 1 ] && par=(-n "$XDIST")
ext_tests=(tests/optim tests/train tests/integrations)
ignore=(); for t in "${ext_tests[@]}"; do ignore+=(--ignore="$t"); done
log "cuda tests (kernels) ${par[*]}"
timeout "$GPU_TEST_TIMEOUT" $PY -m pytest tests -m cuda -q -rfE -p no:cacheprovider "${par[@]}" "${ignore[@]}" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -n 25 || failed+=("cuda tests (kernels)")
wait "$build_pid"; tail -n 3 "$OUT/build.log"
log "cuda tests (extension, trainer, integrations)"
timeout "$GPU_TEST_TIMEOUT" $PY -m pytest "${ext_tests[@]}" -m cuda -q -rfE -p no:cacheprovider 2>&1 \
  | tee -a "$OUT/gpu_tests.log" | tail -n 25 || failed+=("cuda tests (extension, trainer, integrations)")
$PY -c "import fastformer as ff; print('fused adam extension (cuda):', ff.optim.extension_available('cuda'))" || true

log "benchmarks (budget ${BENCH_BUDGET}s)"
$PY bench/gpu_check.py --out "$OUT" --budget "$BENCH_BUDGET" --timeouts "$BENCH_TIMEOUTS" ${TAR:+--tar "$TAR"}
if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED: ${failed[*]} (see $OUT/gpu_tests.log)"
  exit 1
fi
log "done"
