#!/usr/bin/env bash
# Issue 13 (pipeline helper) on the GPU, from the repo root of a clean tree:
#   bash scripts/gpu_pipeline.sh [quick|full]
#   1. tests/test_cupy_pipeline.py (selection v2 against the reference for nKb 1..2048+, remaining
#      mode, graph capture == eager, no-sync path == the checked one) and the selection tests of
#      tests/test_cupy_layer.py;
#   2. scripts/bench_estimator.py (quick: 8K/32K/128K; full: 8K..1M and c_h=4 at 1M) -> $OUT/pipeline/.
# Exit status non-zero if a step failed.
set -u -o pipefail
MODE=${1:-quick}
OUTD=${OUT:-.}/pipeline
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1
status=0
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
echo "=== tests"
python3 -m pytest -q -p no:cacheprovider -x -rs tests/test_cupy_pipeline.py \
  "tests/test_cupy_layer.py::test_select_blocks_same_scores" "tests/test_cupy_layer.py::test_fused_pipeline_equals_the_four_stages" \
  "tests/test_cupy_layer.py::test_mask_to_indices_matches_blockmask" 2>&1 | tail -n 25 || status=1
echo "=== bench ($MODE)"
if [ "$MODE" = full ]; then ARGS=""; else ARGS="--quick --repeats 5"; fi
python3 scripts/bench_estimator.py $ARGS --out "$OUTD" 2>&1 | tail -n 60 || status=1
exit $status
