"""The estimator's kernels at one size, once each, for Nsight Compute (the causes on docs/performance.md).

    ncu --clock-control none --target-processes all -k regex:"us_scores_mma|us_select_topp|us_split_rows|us_center_keys" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats -c 4 \
        python3 scripts/profile_estimator.py [N]

``--clock-control none``: the profiler leaves the GPU's clocks as they are (the project never
changes them). Workload of docs/performance.md: bf16, B = 1, Hq = 32, Hkv = 8, D = 128, default
config, random data (default N = 131072). One warm-up call of each stage (NVRTC builds, the
profiler's own first-launch costs), then one profiled call of each: pooling, scores (centring,
split, version 4), selection. Checks nothing: the suite and the benches do.
"""

from __future__ import annotations

import sys


def main() -> int:
    import cupy as cp

    from unisparse_ref import UniSparseConfig
    from unisparse_ref.cupy_backend import make_backend
    from unisparse_ref.cupy_backend import scores as sc
    from unisparse_ref.cupy_backend import selection as sel

    N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    be = make_backend()
    cfg = UniSparseConfig()
    rng = cp.random.default_rng(0)
    q = rng.standard_normal((1, 32, N, 128), dtype=cp.float32).astype(cp.float16)
    k = rng.standard_normal((1, 8, N, 128), dtype=cp.float32).astype(cp.float16)
    for _ in range(2):  # the second round is the one profiled with -c (first launches: builds, caches)
        q_c, k_c = be.compress(q, k, cfg)
        s = sc.launch_scores(q_c, k_c, cfg, N, N)
        sel.launch_select(s, cfg, N, N, True)
        cp.cuda.Device().synchronize()
    print(f"profile_estimator: N={N} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
