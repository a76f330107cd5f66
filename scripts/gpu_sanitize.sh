#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck) on the sanitize scripts: every kernel of the CuPy layer.
#   bash scripts/gpu_sanitize.sh [SCRIPT ...]     (default: sanitize_cupy sanitize_scores sanitize_varlen)
#   TOOLS="racecheck synccheck" bash scripts/gpu_sanitize.sh ...   (default: memcheck racecheck synccheck)
# Each run's log goes to $OUT/sanitize/<script>_<tool>.log (its first 60 lines of errors, the summary);
# one line per run is printed. Exit status non-zero if any run reports an error or a script fails.
set -u
export PYTHONUNBUFFERED=1
OUTD=${OUT:-.}/sanitize
mkdir -p "$OUTD"
scripts=${*:-sanitize_cupy sanitize_scores sanitize_varlen}
status=0
for s in $scripts; do
  for tool in ${TOOLS:-memcheck racecheck synccheck}; do
    t0=$(date +%s)
    log=/tmp/us_${s}_${tool}.log
    compute-sanitizer --tool $tool --error-exitcode 3 --print-limit 20 --show-backtrace device \
      python3 scripts/$s.py > "$log" 2>&1
    rc=$?
    [ $rc = 0 ] || status=1
    { grep -vE "^=========     (Host Frame|Device Frame)" "$log" | head -n 60; echo ...; tail -n 5 "$log"; } > "$OUTD/${s}_${tool}.log"
    echo "$s $tool: exit $rc in $(( $(date +%s) - t0 )) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|every run|match' "$log" | tail -n 2 | tr '\n' ' ')"
  done
done
exit $status
