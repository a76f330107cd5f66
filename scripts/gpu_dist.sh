#!/usr/bin/env bash
# GPU batch of issue 17 (context-parallel UniSparse, per-rank CuPy compute), about 90 s on one H200.
#   1. tests/test_distributed_gpu.py: simulated 2/3/4 ranks on the one GPU and the one-rank NCCL
#      path against the one-device CuPy run (SPEC 7, masks, bytes = formula);
#   2. scripts/distributed_gpu.py time: per-rank GPU compute and bytes of W = 1, 2, 4, 8 simulated
#      ranks at 128K, 512K and (as far as the time budget reaches) 1M tokens (bf16, Hq=32, Hkv=8,
#      D=128, causal), each run checked first.
# Writes $OUT/dist/summary.txt and $OUT/dist/timing.json; exits non-zero when anything failed.
# Run from the repository root of a clean tree, PYTHONPATH set to it.
#
#   bash scripts/gpu_dist.sh --time-only   (about 25 s, no tests: batch F, where the shared suite
#       runs the GPU tests) times 512K tokens on 8 simulated ranks and on one, each run checked first.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0
OUTD="${OUT:-/tmp/gpu_dist_out}/dist"
mkdir -p "$OUTD"
SUM="$OUTD/summary.txt"
rc=0
start=$(date +%s)
if [ "${1:-}" = "--time-only" ]; then
  echo "gpu_dist.sh --time-only on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1), $(date -u +%FT%TZ)" | tee "$SUM"
  timeout 27 python scripts/distributed_gpu.py time --sizes 524288 --world-sizes 1,8 --reps 1 \
    --json "$OUTD/timing.json" --budget-s 17 2>&1 | tail -n 20 | tee -a "$SUM" || rc=1
  echo "== gpu_dist.sh --time-only: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$SUM"
  exit $rc
fi
{
  echo "gpu_dist.sh at $([ -d .git ] && git rev-parse --short HEAD || echo 'a clean tree (commit: the batch record)') on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1), $(date -u +%FT%TZ)"
  echo "== tests/test_distributed_gpu.py"
} | tee "$SUM"
timeout 45 python -m pytest -q -p no:cacheprovider -rs --tb=line tests/test_distributed_gpu.py 2>&1 | tail -n 30 | tee -a "$SUM" || rc=1
echo "== scripts/distributed_gpu.py time (tests took $(( $(date +%s) - start )) s)" | tee -a "$SUM"
left=$(( 88 - ($(date +%s) - start) ))
if [ "$left" -lt 30 ]; then left=30; fi
timeout "$left" python scripts/distributed_gpu.py time --sizes 131072,524288,1048576 --world-sizes 1,2,4,8 \
  --json "$OUTD/timing.json" --budget-s $(( left - 10 )) 2>&1 | tail -n 40 | tee -a "$SUM" || rc=1
echo "== gpu_dist.sh: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$SUM"
exit $rc
