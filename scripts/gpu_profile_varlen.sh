#!/usr/bin/env bash
# Nsight Compute: every kernel's duration in the packed pipeline and in the one-sequence pipeline of
# the same work (scripts/profile_varlen.py), clocks untouched; a table per side, in launch order.
#   bash scripts/gpu_profile_varlen.sh      -> $OUT/profile/ncu_varlen.csv, printed summary
set -u
OUTD=${OUT:-.}/profile
mkdir -p "$OUTD"
ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
  python3 scripts/profile_varlen.py > "$OUTD/ncu_varlen.csv" 2> "$OUTD/ncu_varlen.err"
rc=$?
python3 - "$OUTD/ncu_varlen.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, body = rows[0], rows[1:]
name, val, unit = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
side, tot = "packed", {"packed": 0.0, "one sequence": 0.0}
for r in body:
    if "us_profile_marker" in r[name]:
        side = "one sequence"
        continue
    us_ = float(r[val].replace(",", "")) * scale[r[unit]]
    tot[side] += us_
    print(f"{side:13s} {us_:10.1f} us  {r[name][:110]}")
print({k: round(v / 1000.0, 3) for k, v in tot.items()}, "ms of kernel time")
PY
exit $rc
