#!/usr/bin/env bash
# Issue 13 (pipeline helper) on the GPU, from the repo root of a clean tree:
#   bash scripts/gpu_pipeline.sh [quick|full|bench]
#   1. tests/test_cupy_pipeline.py (selection against the reference for nKb 1..2500 in both
#      threshold modes, graph capture == eager, no-sync path == the checked one), the selection
#      and pipeline tests of tests/test_cupy_layer.py, and the remaining-mode tests of
#      tests/test_variants.py on the cupy backend;
#   2. scripts/bench_estimator.py (quick: SDPA comparison at 8K/32K and the stages at 8K..128K;
#      full: adds 128K against SDPA, 256K..1M and c_h=4 at 1M) -> $OUT/pipeline/estimator.json;
#   bench: step 2 only, full sizes, steps in priority order within 95 s (killed at 115 s), for
#      batch runs where the shared suite runs the tests.
# At most about 150 s (quick) or 240 s (full) on an H200. Exit status non-zero if a step failed.
set -u -o pipefail
MODE=${1:-quick}
OUTD=${OUT:-.}/pipeline
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1
export UNISPARSE_COMMIT=${UNISPARSE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
status=0
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; echo "commit $UNISPARSE_COMMIT"
if [ "$MODE" = bench ]; then
  echo "=== bench (priority order, 95 s budget)"
  timeout 115 python3 scripts/bench_estimator.py --repeats 5 --budget-s 95 --out "$OUTD" 2>&1 | tail -n 60 || status=1
  exit $status
fi
echo "=== tests"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cupy_pipeline.py \
  "tests/test_cupy_layer.py::test_select_blocks_same_scores" "tests/test_cupy_layer.py::test_fused_pipeline_equals_the_four_stages" \
  "tests/test_cupy_layer.py::test_mask_to_indices_matches_blockmask" "tests/test_cupy_layer.py::test_repeat_runs_are_bit_identical" \
  2>&1 | tail -n 25 || status=1
UNISPARSE_TEST_BACKENDS=cupy python3 -m pytest -q -p no:cacheprovider -rs tests/test_variants.py \
  -k "(remaining or calibrated) and not diag" 2>&1 | tail -n 8 || status=1
echo "=== bench ($MODE)"
if [ "$MODE" = full ]; then ARGS=""; LIMIT=170; else ARGS="--quick --repeats 5"; LIMIT=100; fi
timeout "$LIMIT" python3 scripts/bench_estimator.py $ARGS --out "$OUTD" 2>&1 | tail -n 60 || status=1
exit $status
