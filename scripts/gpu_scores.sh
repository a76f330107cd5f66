#!/usr/bin/env bash
# Version 4 of the CuPy block scores on a GPU: correctness first, then the times.
#   bash scripts/gpu_scores.sh     (from the repository root; PYTHONPATH set to the tree)
# 1. tests/test_cupy_scores.py -m gpu (every case prints its max |scores - ref64|; the largest
#    are listed) and the shared-suite CuPy scores / pipeline tests;
#    then compute-sanitizer memcheck and racecheck on scripts/sanitize_scores.py;
# 2. scripts/gpu_scores.py: v3 vs v4 at 8K / 32K / 128K (CUDA events, medians), each checked
#    against the float64 reference first, with the tensor-core bound.
# Writes $OUT/scores/{tests.log,timing.log,scores_timing.json}. Exit status non-zero on failure.
set -u
export PYTHONUNBUFFERED=1
OUTD=${OUT:-.}/scores
mkdir -p "$OUTD"
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
t0=$(date +%s)
python3 -m pytest -q -s -p no:cacheprovider tests/test_cupy_scores.py -m gpu > /tmp/us_scores_tests.log 2>&1 || status=1
grep -E "passed|failed|error" /tmp/us_scores_tests.log | tail -n 3
grep -E "^(FAILED|E )" /tmp/us_scores_tests.log | head -n 12
echo "largest max|scores - ref64| over the GPU cases, by kernel (v4 = two parts, the default):"
for tag in "GPU v4 " "GPU v4-3parts " "GPU v3 "; do
  grep -F "$tag" /tmp/us_scores_tests.log | grep "max |scores - ref64|" | sort -t= -k2 -g | tail -n 1 | sed "s/^/  /"
done
cp /tmp/us_scores_tests.log "$OUTD/tests.log"
python3 -m pytest -q -p no:cacheprovider tests/test_cupy_layer.py -k "block_scores or pipeline_masks or fused or repeat" > /tmp/us_scores_layer.log 2>&1 || status=1
tail -n 3 /tmp/us_scores_layer.log
python3 -m pytest -q -p no:cacheprovider tests/test_oracle.py -k "cupy" > /tmp/us_scores_oracle.log 2>&1 || status=1
tail -n 3 /tmp/us_scores_oracle.log
echo "tests: $(( $(date +%s) - t0 )) s"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 python3 scripts/sanitize_scores.py > /tmp/us_scores_$tool.log 2>&1
  rc=$?; [ $rc = 0 ] || status=1
  echo "$tool: exit $rc: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_scores" /tmp/us_scores_$tool.log | tr '\n' ' ')"
done
echo "sanitizers: $(( $(date +%s) - t0 )) s"
python3 scripts/gpu_scores.py --out "${OUT:-.}" > "$OUTD/timing.log" 2>&1 || status=1
tail -n 30 "$OUTD/timing.log"
echo "total: $(( $(date +%s) - t0 )) s, status $status"
exit $status
