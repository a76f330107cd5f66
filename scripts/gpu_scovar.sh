#!/usr/bin/env bash
# Packed scoring (issue 16, us_scores_mma's packed mode) in a shared GPU batch:
#   bash scripts/gpu_scovar.sh
#   memcheck: compute-sanitizer memcheck on scripts/sanitize_scores.py (every version-4 instantiation in
#             the batch mode, then block_scores_varlen's packed launch on a ragged batch with CuPy's pool
#             off, checked bit for bit against the per-sequence batch calls; about 40 s)
#   bench:    scripts/bench_varlen.py --pipeline --final (the whole packed pipeline against one sequence
#             of the same work and the loop over the sequences, and its stages: packed against
#             per-sequence scoring, bits checked first; about 15 s)
# Writes $OUT/scovar/summary.txt and bench_varlen.json; the exit status is non-zero if a step failed.
set -u
DIR=${OUT:-gpu_scovar_logs}/scovar
mkdir -p "$DIR"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
status=0
SUM="$DIR/summary.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } > "$SUM" 2>&1
step() {  # step NAME SECONDS COMMAND...: its output's tail on stdout and in the summary
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "/tmp/scovar_$name.log" 2>&1
  local r=$?
  [ "$r" = 0 ] || status=1
  grep -v "Host Frame" "/tmp/scovar_$name.log" | tail -n 20 | cut -c1-400 | tee -a "$SUM"
  echo "=== $name: exit $r in $(( $(date +%s) - t0 )) s" | tee -a "$SUM"
}
step memcheck 100 compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_scores.py
step bench 60 $PY scripts/bench_varlen.py --pipeline --final --out "$DIR"
exit $status
