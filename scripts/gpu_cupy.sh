#!/usr/bin/env bash
# The CuPy RawKernel layer on a GPU machine, in one go:
#   bash scripts/gpu_cupy.sh [quick|full]
#   1. environment (GPU, driver, CuPy);
#   2. the cupy GPU suite (tests/test_cupy_layer.py; "full" adds the 131072-token slow test);
#   3. compute-sanitizer memcheck, racecheck and synccheck on scripts/sanitize_cupy.py (every kernel).
# Logs go to $OUT (or ./gpu_cupy_logs). Every step runs; the exit status is non-zero if any failed.
set -u
MODE=${1:-full}
LOG=${OUT:-gpu_cupy_logs}
mkdir -p "$LOG"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$(date +%s)
  if "$@" > "$LOG/$name.log" 2>&1; then r=0; else r=$?; status=1; fi
  tail -n 30 "$LOG/$name.log"
  echo "=== $name: exit $r in $(( $(date +%s) - t0 )) s" | tee -a "$LOG/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; \
  $PY -c "import cupy; print('cupy', cupy.__version__)"; } > "$LOG/summary.txt" 2>&1
SEL="not slow"
[ "$MODE" = full ] && SEL=""
step tests $PY -m pytest -q -p no:cacheprovider -rs tests/test_cupy_layer.py ${SEL:+-m "$SEL"}
step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_cupy.py
step racecheck compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 $PY scripts/sanitize_cupy.py
step synccheck compute-sanitizer --tool synccheck --error-exitcode 3 $PY scripts/sanitize_cupy.py
cat "$LOG/summary.txt"
exit $status
