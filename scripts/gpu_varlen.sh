#!/usr/bin/env bash
# Serving layouts of the CuPy layer on a GPU machine (issue 16), in one go:
#   bash scripts/gpu_varlen.sh [full|quick]
#   1. the varlen tests on the cupy backend (tests/test_varlen.py, cupy cases and the GPU-only ones);
#   2. compute-sanitizer memcheck on scripts/sanitize_varlen.py (merge, packed pooling, us_fa3_fwd_varlen);
#   3. scripts/bench_varlen.py (correctness first, then timings; "quick": dense packed batch only).
# Writes $OUT/varlen/summary.txt and $OUT/varlen/bench_varlen.json; exit status non-zero if any step failed.
set -u
MODE=${1:-full}
DIR=${OUT:-gpu_varlen_logs}/varlen
mkdir -p "$DIR"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
status=0
SUM="$DIR/summary.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } > "$SUM" 2>&1
step() {  # step NAME COMMAND...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$(date +%s)
  if "$@" > "/tmp/varlen_$name.log" 2>&1; then r=0; else r=$?; status=1; fi
  tail -n 25 "/tmp/varlen_$name.log" | tee -a "$SUM"
  echo "=== $name: exit $r in $(( $(date +%s) - t0 )) s" | tee -a "$SUM"
}
step tests env UNISPARSE_TEST_BACKENDS=cupy $PY -m pytest -q -p no:cacheprovider -x -rs tests/test_varlen.py
step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_varlen.py
if [ "$MODE" = quick ]; then
  step bench $PY scripts/bench_varlen.py --quick --out "$DIR"
else
  step bench $PY scripts/bench_varlen.py --out "$DIR"
fi
exit $status
