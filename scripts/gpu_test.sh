#!/usr/bin/env bash
# The GPU checks of every layer, in one go, on a machine with an NVIDIA GPU.
#   bash scripts/gpu_test.sh [quick|full]     (make gpu-test)
# Logs go to $OUT (or ./gpu_logs). Exit status is non-zero if any step fails; every step runs.
#   1. environment report;
#   2. the shared suite for every backend (numpy, numba, cupy) at GPU sizes (HYPOTHESIS_PROFILE=gpu);
#   3. the numba pipeline at Nq = Nk = 32768 against the reference on sampled query blocks;
#   4. the cupy layer's GPU script (its suite, sanitizers, the 131072-token case) when present.
# Each step has a time limit (NUMBA_LIMIT, CUPY_LIMIT, SUITE_LIMIT seconds) so one slow step
# cannot starve the others inside a lease. In "full" mode steps 3 and 4 run in the background
# while the suite runs (they share the GPU, which has room for all three), and the suite runs
# on SUITE_WORKERS pytest-xdist workers (default 8) when pytest-xdist is installed: the first
# NVRTC compiles on a fresh machine then happen in parallel. Timings printed by steps 3 and 4
# are therefore taken under load; use scripts/bench_gpu.sh for timings.
set -u
MODE=${1:-full}
LOG=${OUT:-gpu_logs}
mkdir -p "$LOG"
PY=${PY:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$(date +%s)
  if timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1; then r=0; else r=$?; status=1; fi
  tail -n 25 "$LOG/$name.log"
  echo "=== $name: exit $r in $(( $(date +%s) - t0 )) s"
  echo "$name exit=$r seconds=$(( $(date +%s) - t0 ))" >> "$LOG/summary.txt"
  return $r  # a background step reports through its exit status (its status=1 stays in its subshell)
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } > "$LOG/summary.txt"
step info 60 $PY -m unisparse_ref info
pids=()
if [ "$MODE" = full ]; then
  if [ -f scripts/gpu_numba.py ]; then
    step numba_32k ${NUMBA_LIMIT:-300} $PY scripts/gpu_numba.py > "$LOG/numba_32k.step" 2>&1 & pids+=($!)
  fi
  if [ -f scripts/gpu_cupy.sh ]; then  # its own logs in $LOG/cupy
    step cupy ${CUPY_LIMIT:-400} env OUT="$LOG/cupy" bash scripts/gpu_cupy.sh full > "$LOG/cupy.step" 2>&1 & pids+=($!)
  fi
fi
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "${SUITE_WORKERS:-8}"); fi
# The shared suite for every backend (test_cupy_layer.py runs in the cupy step); -v so that
# the log names every test as it finishes, even when the time limit stops the step.
step suite ${SUITE_LIMIT:-900} env HYPOTHESIS_PROFILE=gpu $PY -m pytest -v --tb=short -p no:cacheprovider -rfEs \
  "${XDIST[@]}" -m "not slow" --ignore=tests/test_cupy_layer.py tests
for p in "${pids[@]}"; do wait "$p" || status=1; done
for f in "$LOG"/*.step; do [ -f "$f" ] && cat "$f"; done
cat "$LOG/summary.txt"
exit $status
