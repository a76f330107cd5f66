"""The whole packed pipeline and the one-sequence pipeline of the same causal work, once each, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 scripts/profile_varlen.py          (scripts/gpu_profile_varlen.sh runs it)

The workload of ``scripts/bench_varlen.py`` section 3 (bf16, 16 prompts of 1K-32K, 131072 tokens,
Hq = 32, Hkv = 8, D = 128, S = 128, default config, random data) and its one sequence of the
same causal work (L = 44571). One warm-up call of each pipeline (NVRTC builds), then, between
``cudaProfilerStart`` and ``cudaProfilerStop``, one call of the packed pipeline, a marker kernel,
one call of the one-sequence pipeline: every kernel's duration, in launch order, on each side of
the marker. Checks nothing: the suite and the bench do.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    import cupy as cp

    import unisparse_ref as us

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_varlen import pipeline_workload

    w = pipeline_workload()
    be, q, k, v, cu, q1, k1, v1, cfg = (w[n] for n in ("be", "q", "k", "v", "cu", "q1", "k1", "v1", "cfg"))
    marker = cp.ElementwiseKernel("float32 x", "float32 y", "y = x", "us_profile_marker")
    m = cp.zeros(1, cp.float32)
    for _ in range(2):  # warm-up: builds, caches, pools
        us.unisparse_attention_varlen(q, k, v, cu, cu, cfg, backend=be)
        be.unisparse_attention(q1, k1, v1, cfg)
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.start()
    us.unisparse_attention_varlen(q, k, v, cu, cu, cfg, backend=be)
    marker(m, m)
    be.unisparse_attention(q1, k1, v1, cfg)
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.stop()
    print(f"packed batch of {cu.size - 1} sequences ({int(cu[-1])} tokens) | one sequence of L = {w['L']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
