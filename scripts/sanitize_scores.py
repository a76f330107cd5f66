"""Every kernel of scores version 4 (and the sink-token pooling) once, on small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 3 python scripts/sanitize_scores.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_scores.py

Runs ``us_split_rows``, ``us_scores_mma<NW, VAR, P>`` for every built (P, NW), one and two
K stages, SPEC and research-variant configs, and ``us_pool_keys_sinks``; each result is checked
against the reference (exit 1 on a mismatch), so the sanitizer sees real work. Then the packed
mode (``block_scores_varlen``: ``us_center_keys`` with offsets, ``us_split_rows`` on the packed
rows, one ``us_scores_mma`` launch over a work list) on a ragged batch (lengths 1 and odd, an
empty sequence, Nq < Nk, GQA with c_h = 2, the last sequence ending at the arrays' end) with
CuPy's memory pool off (every array its own allocation, so a read past the packed arrays is
caught at their edge), checked bit for bit against the per-sequence batch calls.
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
    failures += _packed(cp, be, sc)
    cp.cuda.Device().synchronize()
    print("\n".join(failures) or "sanitize_scores: every run matches the reference")
    return 1 if failures else 0


def _packed(cp, be, sc) -> list[str]:
    """The packed mode on a ragged batch, every array its own cudaMalloc; bit for bit the per-sequence calls."""
    from unisparse_ref import UniSparseConfig
    from unisparse_ref._arrays import packed_offsets
    from unisparse_ref.reference import varlen as rv
    from unisparse_ref.varlen import native_stage

    cp.cuda.set_allocator(None)
    failures = []
    rng = np.random.default_rng(1)
    nq, nk = [1, 37, 0, 300, 23], [1, 61, 9, 450, 90]
    cfg = UniSparseConfig(block_size=32, c_q=4, c_k=4, c_h=2)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (nq, nk))
    q = rng.standard_normal((int(cu_q[-1]), 8, 40)).astype(np.float32)
    k = rng.standard_normal((int(cu_k[-1]), 2, 40)).astype(np.float32)
    q_c, k_c = native_stage(be, "compress_varlen")(q, k, cu_q, cu_k, cfg)
    got = cp.asnumpy(native_stage(be, "block_scores_varlen")(q_c, k_c, cu_q, cu_k, cfg))
    cu_r, cu_c, cu_qb = packed_offsets(cu_q, 4), packed_offsets(cu_k, 4), packed_offsets(cu_q, 32)
    for i in range(len(nq)):
        if nq[i]:
            one = cp.asnumpy(be.block_scores(cp.ascontiguousarray(q_c[cu_r[i]:cu_r[i + 1]].transpose(1, 0, 2)[None]),
                                             cp.ascontiguousarray(k_c[cu_c[i]:cu_c[i + 1]].transpose(1, 0, 2)[None]),
                                             cfg, nq[i], nk[i]))[0]
            if got[:, cu_qb[i]:cu_qb[i + 1], : one.shape[-1]].tobytes() != one.tobytes():
                failures.append(f"packed scores: sequence {i} differs from its batch call")
    err = float(np.abs(got - rv.block_scores_varlen(cp.asnumpy(q_c), cp.asnumpy(k_c), cu_q, cu_k, cfg)).max())
    if err > be.score_eps:
        failures.append(f"packed scores: {err:.2e} from the reference")
    return failures


if __name__ == "__main__":
    sys.exit(main())
