#!/usr/bin/env bash
# Attention kernels on a GPU machine, in one invocation:
#   bash scripts/bench_gpu.sh check   # GPU tests of every kernel version (v1, v6, v7, v9) + a quick timing of the tensor-core ones
#   bash scripts/bench_gpu.sh full    # the benchmark of docs/performance.md (CSV, JSON, plot)
#   bash scripts/bench_gpu.sh ncu     # Nsight Compute profile of the default kernel (sparse 10%, 32K, D=128)
# Logs and results go to $OUT (or ./bench_out). UNISPARSE_ATTN_VERSIONS=6,7 narrows the tests.
set -u
MODE=${1:-check}
OUTD=${OUT:-bench_out}
mkdir -p "$OUTD"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader; \
  echo "commit ${UNISPARSE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } | tee "$OUTD/env.txt"
case "$MODE" in
  check)
    $PY -m pytest -q -p no:cacheprovider -n 8 tests/test_cupy_attention.py 2>&1 | tail -n 40 | tee "$OUTD/test.log"
    $PY -m unisparse_ref bench --sizes 32768 --head-dims 128 --versions all --contenders ours,sdpa-flash,sdpa-cudnn \
      --densities 0.1 --no-ceilings --repeats 5 --input-sets 2 --out-dir "$OUTD/quick" 2>&1 | tee "$OUTD/quick.log"
    ;;
  full)
    # Every contender is checked against the reference before it is timed (bench exits 1 on a mismatch).
    [ -n "${SKIP_TESTS:-}" ] || $PY -m pytest -q -p no:cacheprovider -n 8 tests/test_cupy_attention.py 2>&1 | tail -n 5 | tee "$OUTD/test.log"
    $PY -m unisparse_ref bench --sizes 8192,32768,131072 --head-dims 128,64,256 --d64-sizes 32768 \
      --versions ${VERSIONS:-default} --pipeline-sizes 8192,32768,131072 --pipeline-head-dims 128 \
      --pipeline-dtype ${PIPELINE_DTYPE:-bfloat16} \
      --contenders ours,sdpa-flash,sdpa-cudnn,flex,pipeline --repeats 5 --warmup 1 --input-sets 2 --budget-s 1.0 \
      --out-dir "$OUTD" 2>&1 | tee "$OUTD/bench.log"
    ;;
  ncu)
    ncu --clock-control none --set full -k regex:"${NCU_KERNEL:-us_(attn|fa3)_fwd}" -c 1 -o "$OUTD/attn" \
      $PY -m unisparse_ref bench --sizes 32768 --head-dims 128 --contenders ours --densities 0.1 --versions ${VERSIONS:-default} \
      --no-ceilings --warmup 0 --repeats 1 --input-sets 1 --out-dir "$OUTD/ncu_bench" > "$OUTD/ncu_run.log" 2>&1
    ncu --import "$OUTD/attn.ncu-rep" --page details 2>&1 | tee "$OUTD/ncu.txt" | head -n 150
    ;;
esac
