"""Every kernel of scores version 4 (and the sink-token pooling) once, on small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 3 python scripts/sanitize_scores.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_scores.py

Runs ``us_split_rows``, ``us_scores_mma<NW, VAR, P>`` for every built (P, NW), one and two
K stages, SPEC and research-variant configs, and ``us_pool_keys_sinks``; each result is checked
against the reference (exit 1 on a mismatch), so the sanitizer sees real work.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    import cupy as cp

    from unisparse_ref import UniSparseConfig
    from unisparse_ref import reference as ref
    from unisparse_ref.cupy_backend import CupyBackend, make_backend
    from unisparse_ref.cupy_backend import scores as sc

    be = make_backend()
    rng = np.random.default_rng(0)
    failures = []
    cases = [  # B, Hq, Hkv, Nq, Nk, D, S, c_q, c_k, causal, extra
        (1, 4, 2, 300, 400, 64, 64, 4, 8, True, {}),
        (1, 2, 1, 200, 150, 40, 32, 2, 1, False, {}),
        (1, 2, 2, 260, 260, 128, 128, 16, 16, True, {"sink_tokens": 3, "diagonal_correction": True}),
    ]
    for B, Hq, Hkv, Nq, Nk, D, S, c_q, c_k, causal, extra in cases:
        q = rng.standard_normal((B, Hq, Nq, D)).astype(np.float32)
        k = rng.standard_normal((B, Hkv, Nk, D)).astype(np.float32)
        cfg = UniSparseConfig(block_size=S, c_q=c_q, c_k=c_k, causal=causal, **extra)
        q_c, k_c = be.compress(q, k, cfg)
        want = ref.block_scores(cp.asnumpy(q_c), cp.asnumpy(k_c), cfg, Nq, Nk)
        for parts, ws in sc.MMA_WARPS.items():
            for warps in ws:
                for stages in (1, 2):
                    got = cp.asnumpy(sc.launch_scores(q_c, k_c, cfg, Nq, Nk, version=4, parts=parts, warps=warps,
                                                      stages=stages))
                    err = float(np.abs(got - want).max())
                    bound = CupyBackend.score_eps
                    if err > bound:
                        failures.append(f"{(Nq, Nk, D, extra)} P={parts} NW={warps} stages={stages}: {err:.2e}")
        rk = ref.compress(q, k, cfg)[1]
        if float(np.abs(cp.asnumpy(k_c) - rk).max()) > 1e-5:
            failures.append(f"compress k_c {(Nk, extra)}")
    cp.cuda.Device().synchronize()
    print("\n".join(failures) or "sanitize_scores: every run matches the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
