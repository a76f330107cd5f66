#!/usr/bin/env bash
# Serving layouts of the CuPy layer on a GPU machine (issue 16):
#   bash scripts/gpu_varlen.sh [all|M|F]
#   tests:    the varlen tests on the cupy backend (tests/test_varlen.py -k cupy: the shared bodies'
#             cupy cases and the GPU-only ones; about 90 s, most of it NVRTC compiles)
#   memcheck: compute-sanitizer memcheck on scripts/sanitize_varlen.py (merge, packed pooling,
#             us_fa3_fwd_varlen contiguous and paged, CupyPagedKVCache; about 45 s)
#   bench:    scripts/bench_varlen.py (correctness first, then timings; about 100 s)
#   M = tests + memcheck (at most 185 s); all = tests + memcheck + bench;
#   F = the bench only, short (--final: at most 80 s; the shared batch F runs the test suite itself);
#   S = packed scoring (us_scores_mma's packed mode): the cupy cases of tests/test_varlen.py and the GPU
#       tests of tests/test_cupy_scores.py (not slow, no host emulation, 8 workers), memcheck on
#       scripts/sanitize_scores.py (every version-4 kernel and the packed launch), and the whole packed
#       pipeline with its stages (bench_varlen.py --pipeline --final); at most 280 s.
# Writes $OUT/varlen/summary.txt (and bench_varlen.json); the exit status is non-zero if a step failed.
set -u
MODE=${1:-all}
DIR=${OUT:-gpu_varlen_logs}/varlen
mkdir -p "$DIR"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
status=0
SUM="$DIR/summary.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)} mode $MODE"; } > "$SUM" 2>&1
step() {  # step NAME SECONDS COMMAND...: its output live on stdout, its tail in the summary
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "/tmp/varlen_$name.log" | grep -v "^\[" | cut -c1-400
  local r=${PIPESTATUS[0]}
  [ "$r" = 0 ] || status=1
  tail -n 25 "/tmp/varlen_$name.log" >> "$SUM"
  echo "=== $name: exit $r in $(( $(date +%s) - t0 )) s" | tee -a "$SUM"
}
if [ "$MODE" = all ] || [ "$MODE" = M ]; then
  step tests 120 env UNISPARSE_TEST_BACKENDS=cupy $PY -m pytest -q -p no:cacheprovider -rs tests/test_varlen.py -k cupy
  step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_varlen.py
fi
if [ "$MODE" = all ]; then
  step bench 125 $PY scripts/bench_varlen.py --out "$DIR"
fi
if [ "$MODE" = S ]; then
  XD=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")  # 8 workers where pytest-xdist is installed
  step tests 130 env UNISPARSE_TEST_BACKENDS=cupy HYPOTHESIS_PROFILE=gpu $PY -m pytest -q -x -p no:cacheprovider $XD \
    -m "not slow" -k "not host_emulated" tests/test_varlen.py tests/test_cupy_scores.py
  step memcheck 65 compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_scores.py
  step bench 70 $PY scripts/bench_varlen.py --pipeline --final --out "$DIR"
fi
if [ "$MODE" = F ]; then
  step bench 76 $PY scripts/bench_varlen.py --final --out "$DIR"
fi
exit $status
