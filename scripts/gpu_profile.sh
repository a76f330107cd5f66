#!/usr/bin/env bash
# Nsight Compute on the estimator's kernels at one size (scripts/profile_estimator.py), clocks untouched.
#   bash scripts/gpu_profile.sh [N]      -> $OUT/profile/ncu_<N>.txt
set -u
N=${1:-131072}
OUTD=${OUT:-.}/profile
mkdir -p "$OUTD"
ncu --clock-control none --target-processes all \
  -k 'regex:us_scores_mma|us_select_topp|us_split_rows|us_center_keys|us_pool' \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section Occupancy --section LaunchStats \
  --launch-skip 7 --launch-count 7 python3 scripts/profile_estimator.py "$N" > "$OUTD/ncu_$N.txt" 2>&1
rc=$?
grep -E "^  us_|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Stall|Issue Slots Busy|Executed Ipc A" "$OUTD/ncu_$N.txt" | head -n 120
exit $rc
