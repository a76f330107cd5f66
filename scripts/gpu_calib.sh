#!/usr/bin/env bash
# Issue 15's research variants on a GPU machine (from the repository root of a clean tree):
#   bash scripts/gpu_calib.sh tests   # the variant tests of the numba and cupy layers (no simulator)
#                                     # plus the SPEC scoring/selection tests of the changed numba kernels
#   bash scripts/gpu_calib.sh time    # the estimator's cost per variant (scripts/gpu_calib.py: cupy,
#                                     # bf16, Hq=32, Hkv=8, D=128, 8K and 32K; checked before timing)
# Writes two files to $OUT/calib/: log.txt and (tests) summary.txt or (time) calib_timing.json;
# prints a short summary; exits non-zero if any step failed.
set -u
MODE=${1:-tests}
DIR=${OUT:-gpu_calib_logs}/calib
mkdir -p "$DIR"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
status=0
LOG="$DIR/log.txt"
SUMMARY=""
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)} mode $MODE"; } > "$LOG"
step() {  # step NAME COMMAND...
  local name=$1; shift
  local t0=$(date +%s) r
  echo "=== $name: $*" >> "$LOG"
  if "$@" >> "$LOG" 2>&1; then r=0; else r=$?; status=1; fi
  SUMMARY+="$name: exit $r in $(( $(date +%s) - t0 )) s; $(grep -E ' (passed|failed|error|skipped)' "$LOG" | tail -n 1)"$'\n'
}
case "$MODE" in
  tests)
    export UNISPARSE_TEST_BACKENDS=numba,cupy
    step variants_numba $PY -m pytest -q -p no:cacheprovider -rs --durations=3 tests/test_variants.py -k numba
    step variants_cupy $PY -m pytest -q -p no:cacheprovider -rs --durations=3 tests/test_variants.py -k cupy
    step spec_numba $PY -m pytest -q -p no:cacheprovider -rs tests/test_properties.py tests/test_golden.py \
      tests/test_calibration.py -k "numba or calibrat or shared_check"
    if grep -qE "backend '(numba|cupy)' unavailable" "$LOG"; then  # on a GPU machine both must run
      status=1; SUMMARY+="FAIL: a GPU backend was unavailable (its tests skipped)"$'\n'
    fi
    printf "%s" "$SUMMARY" > "$DIR/summary.txt"
    grep -E "^(FAILED|ERROR)|Error:|SKIPPED" "$LOG" | head -n 20
    ;;
  time)
    step timing $PY scripts/gpu_calib.py --out "$DIR"
    grep -E "^N=|Error|Traceback" "$LOG" | tail -n 20
    ;;
  *) echo "usage: bash scripts/gpu_calib.sh tests|time"; exit 2 ;;
esac
head -n 3 "$LOG"
printf "%s" "$SUMMARY"
exit $status
