"""Time and peak memory of the NumPy reference's whole pipeline (issue 2's budget).

Nq = Nk = 8192, B = 1, Hq = 8, Hkv = 2, D = 64, default config, on the demo workload.
Budget: under 20 s and under 4 GiB peak resident memory on the 2-core CI-class machine.
Run: ``python benchmarks/bench_reference.py`` (a fresh process, so the peak is the pipeline's).
"""

from __future__ import annotations

import platform
import resource
import sys
import time

import numpy as np

import unisparse_ref as us
from unisparse_ref.evaluation.workloads import structured_workload


def main() -> int:
    w = structured_workload(8192, batch=1, q_heads=8, kv_heads=2, head_dim=64, seed=0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = us.unisparse_attention(w.q, w.k, w.v, us.UniSparseConfig(), return_details=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    med = float(np.median(times))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, numpy {np.__version__}, "
          f"python {platform.python_version()}")
    print(f"reference pipeline 8192x8192, B=1, Hq=8, Hkv=2, D=64: median {med:.2f} s over 3 runs "
          f"({', '.join(f'{t:.2f}' for t in times)}), peak RSS {peak:.2f} GiB (inputs+interpreter {base:.2f} GiB), "
          f"density {r.block_mask.density:.3f}")
    ok = med < 20.0 and peak < 4.0
    print("within budget (< 20 s, < 4 GiB)" if ok else "OVER BUDGET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
