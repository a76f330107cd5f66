#!/usr/bin/env bash
# The GPU checks of every layer, in one go, on a machine with an NVIDIA GPU.
#   bash scripts/gpu_test.sh [quick|full]     (make gpu-test)
# Logs go to $OUT (or ./gpu_logs). Exit status is non-zero if any step fails; every step runs.
#   1. environment report;
#   2. the shared suite for every backend (numpy, numba, cupy) at GPU sizes (HYPOTHESIS_PROFILE=gpu);
#   3. the numba pipeline at Nq = Nk = 32768 against the reference on sampled query blocks;
#   4. the cupy layer's GPU script (sanitizers, big case) when present.
set -u
MODE=${1:-full}
LOG=${OUT:-gpu_logs}
mkdir -p "$LOG"
PY=${PY:-python3}
status=0
step() {  # step NAME COMMAND...: run, tee the log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$(date +%s)
  if "$@" > "$LOG/$name.log" 2>&1; then r=0; else r=$?; status=1; fi
  tail -n 25 "$LOG/$name.log"
  echo "=== $name: exit $r in $(( $(date +%s) - t0 )) s"
  echo "$name exit=$r seconds=$(( $(date +%s) - t0 ))" >> "$LOG/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } > "$LOG/summary.txt"
step info $PY -m unisparse_ref info
step suite env HYPOTHESIS_PROFILE=gpu $PY -m pytest -q -p no:cacheprovider -m "not slow" tests
if [ "$MODE" = full ]; then
  [ -f scripts/gpu_numba.py ] && step numba_32k $PY scripts/gpu_numba.py
  [ -f scripts/gpu_cupy.sh ] && step cupy bash scripts/gpu_cupy.sh
fi
cat "$LOG/summary.txt"
exit $status
