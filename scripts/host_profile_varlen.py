"""Where the host's time goes while it queues the packed pipeline (cProfile; a diagnostic).

    python3 scripts/host_profile_varlen.py

The workload of ``scripts/bench_varlen.py`` section 3; 20 calls of the CuPy layer's queued
packed pipeline with ``check_finite=False`` (nothing read back: the host's queueing only, with a
device synchronisation between calls outside the profile), then the same for the one-sequence
pipeline; the functions with the most own and cumulative time.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path


def main() -> int:
    import cupy as cp

    from unisparse_ref.cupy_backend import varlen as cv

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_varlen import pipeline_workload

    w = pipeline_workload()
    be, q, k, v, cu, q1, k1, v1, cfg = (w[n] for n in ("be", "q", "k", "v", "cu", "q1", "k1", "v1", "cfg"))
    for label, fn in (("packed", lambda: cv.unisparse_attention_varlen(be, q, k, v, cu, cu, cfg, check_finite=False)),
                      ("one sequence", lambda: be.unisparse_attention(q1, k1, v1, cfg, check_finite=False))):
        for _ in range(3):
            fn()
        cp.cuda.Device().synchronize()
        prof = cProfile.Profile()
        for _ in range(20):
            prof.enable()
            fn()
            prof.disable()
            cp.cuda.Device().synchronize()
        print(f"===== {label}: 20 calls")
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(35)
    return 0


if __name__ == "__main__":
    sys.exit(main())
