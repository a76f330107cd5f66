#!/usr/bin/env bash
# The packed selection (issue 16: one launch of us_select_topp with its row table) on a GPU machine:
#   bash scripts/gpu_select_varlen.sh
#   1. its GPU tests and the CuPy selection tests (NVRTC builds us_select_topp<float|double> first):
#      tests/test_varlen.py and tests/test_cupy_layer.py -k select, not slow (about 60 s);
#   2. compute-sanitizer memcheck on scripts/sanitize_varlen.py (the packed selection among the
#      serving kernels; about 60 s);
#   3. scripts/bench_select_varlen.py: packed against the per-sequence loop, bit for bit first (about 20 s).
# Exit status: non-zero if a step failed. Output: $OUT/selvar/ (the bench's JSON).
set -u -o pipefail
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=gpu
PY=${PY:-python3}
status=0
echo "=== tests"; timeout 90 $PY -m pytest -q -x -m "not slow" tests/test_varlen.py tests/test_cupy_layer.py -k "select or mask_to_indices" \
  2>&1 | tail -n 25 || status=1
echo "=== memcheck"; timeout 95 compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_varlen.py \
  2>&1 | tail -n 15 || status=1
echo "=== bench"; timeout 35 $PY scripts/bench_select_varlen.py 2>&1 | tail -n 5 || status=1
echo "gpu_select_varlen: status $status"
exit $status
