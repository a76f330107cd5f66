#!/usr/bin/env bash
# Version 4 of the CuPy block scores on a GPU: correctness first, then the times.
#   bash scripts/gpu_scores.sh     (from the repository root; PYTHONPATH set to the tree)
# 1. the shared-suite CuPy scores tests and tests/test_cupy_scores.py (GPU and host emulation);
# 2. scripts/gpu_scores.py: v3 vs v4 at 8K / 32K / 128K (CUDA events, medians), each checked
#    against the float64 reference first, with the tensor-core bound. Results: $OUT/scores/.
set -u
export PYTHONUNBUFFERED=1
OUTD=${OUT:-.}/scores
mkdir -p "$OUTD"
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s)
python3 -m pytest -q -x -p no:cacheprovider tests/test_cupy_scores.py -m gpu 2>&1 | tail -n 25 || status=1
python3 -m pytest -q -p no:cacheprovider tests/test_cupy_layer.py -k "block_scores or pipeline_masks or fused or repeat" 2>&1 | tail -n 8 || status=1
python3 -m pytest -q -p no:cacheprovider tests/test_oracle.py -k "cupy and (scores or pipeline)" 2>&1 | tail -n 5 || status=1
echo "tests: $(( $(date +%s) - t0 )) s"
python3 scripts/gpu_scores.py --out "${OUT:-.}" 2>&1 | tee "$OUTD/timing.log" | tail -n 40
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
