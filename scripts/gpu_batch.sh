#!/usr/bin/env bash
# Several GPU scripts in one device call, each with its own time limit and its own log folder:
#   bash scripts/gpu_batch.sh BATCH_FILE
# BATCH_FILE has one job a line: "NAME | COMMAND | SECONDS" (blank lines and # comments skipped).
# Each job runs from the repo root with OUT=<work>/NAME; its output goes to <work>/NAME/log.txt
# (the last 40 lines are also printed). Every job runs; the exit status is non-zero if any failed.
# After every job everything so far is packed into $OUT/batch.tgz (the device tool returns at most 8 files)
# beside $OUT/summary.txt.
# The lead uses it to run the helpers' scripts (scripts/gpu_*.sh) in one lease.
set -u
BATCH=$1
DEST=${OUT:-gpu_batch_logs}
LOG=$(mktemp -d /tmp/gpu_batch.XXXX)
mkdir -p "$DEST"
status=0
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } > "$LOG/summary.txt"
while IFS='|' read -r name cmd secs; do
  name=$(echo "$name" | xargs); secs=$(echo "$secs" | xargs)
  [ -z "$name" ] && continue
  case "$name" in \#*) continue;; esac
  mkdir -p "$LOG/$name"
  echo "=== $name ($secs s): $cmd"
  t0=$(date +%s)
  if OUT="$LOG/$name" timeout --kill-after=10 "$secs" bash -c "$cmd" > "$LOG/$name/log.txt" 2>&1 < /dev/null; then r=0; else r=$?; status=1; fi
  tail -n 40 "$LOG/$name/log.txt"
  echo "=== $name: exit $r in $(( $(date +%s) - t0 )) s"
  echo "$name exit=$r seconds=$(( $(date +%s) - t0 ))" >> "$LOG/summary.txt"
  # packed after every job, so that a call stopped at its time limit still returns what finished
  cp "$LOG/summary.txt" "$DEST/summary.txt"; tar czf "$DEST/batch.tgz" -C "$LOG" .
done < "$BATCH"
cat "$LOG/summary.txt"
cp "$LOG/summary.txt" "$DEST/summary.txt"
tar czf "$DEST/batch.tgz" -C "$LOG" .
exit $status
