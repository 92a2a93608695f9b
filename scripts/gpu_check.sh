#!/usr/bin/env bash
# `make gpu-check`: every GPU measurement and GPU test in one command of at most about 9 minutes
# (bench/gpu_check.py says what runs, in which order, and how the time budget is kept).
# Results and the tests' log go to $OUT (default bench/results), named for the device; the build and
# compile logs and the tuner's cache to $OUT/gpu_check_<device>_work/ (git ignores it). Knobs: PY,
# OUT, GPU_CHECK_BUDGET (seconds for the steps, default 500), XDIST (pytest workers for the kernel
# tests), GPU_CHECK_WARM=0 (no background compile of the tuning candidates).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "[gpu-check $(date +%H:%M:%S)] $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
exec "$PY" bench/gpu_check.py --out "$OUT" --budget "${GPU_CHECK_BUDGET:-500}"
