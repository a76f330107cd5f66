"""Exercise every kernel of the CuPy layer once, on small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python3 scripts/sanitize_cupy.py
    compute-sanitizer --tool racecheck python3 scripts/sanitize_cupy.py

CuPy's memory pool is switched off so that every array is its own cudaMalloc and an
out-of-bounds access is caught at the array's edge rather than inside a pooled chunk.
Covers: us_pool_seq<half|bf16|float>; us_scores_onepass (also in chunks of one head) with
RB < TR, RB > TR, KB > TC, RB = KB = 1 (opt-in dynamic shared memory) and ragged lengths;
us_select_topp<float|double> with and without the index form; us_mask_to_indices; every rung
of the attention ladder (v1, v6, and v7, v9 on Hopper) directly, and the default one through the
backend.
Exits non-zero if any result disagrees with the NumPy reference.
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

import unisparse_ref as us
from unisparse_ref import BFLOAT16, BlockMask, UniSparseConfig
from unisparse_ref import cupy_backend as cb
from unisparse_ref import reference as ref
from unisparse_ref.cupy_backend import attention, scores, selection


def main() -> int:
    cp.cuda.set_allocator(None)  # plain cudaMalloc per array: memcheck sees every edge
    be = cb.make_backend()
    rng = np.random.default_rng(0)
    failures = []
    cases = [
        # dtype, B, Hq, Hkv, Nq, Nk, D, S, c_q, c_k, c_h, causal
        (np.float16, 1, 4, 2, 100, 130, 64, 32, 8, 4, 2, True),
        (BFLOAT16, 1, 2, 1, 70, 90, 32, 64, 1, 1, 1, True),       # RB = KB = 64 (= TR, TC), ragged
        (np.float32, 1, 2, 1, 150, 150, 32, 128, 1, 2, 1, True),  # RB = 128 > TR, KB = 64; attention v1
        (np.float16, 1, 2, 2, 40, 50, 64, 16, 16, 16, 1, False),  # RB = KB = 1: opt-in shared memory
        (BFLOAT16, 1, 2, 1, 256, 300, 64, 128, 16, 16, 1, True),  # default tensor-core attention
    ]
    if True:
        for dt, B, Hq, Hkv, Nq, Nk, D, S, c_q, c_k, c_h, causal in cases:
            q = rng.standard_normal((B, Hq, Nq, D)).astype(dt)
            k = rng.standard_normal((B, Hkv, Nk, D)).astype(dt)
            v = rng.standard_normal((B, Hkv, Nk, D)).astype(dt)
            cfg = UniSparseConfig(block_size=S, c_q=c_q, c_k=c_k, c_h=c_h, causal=causal, threshold=0.7)
            q_c, k_c = be.compress(q, k, cfg)
            sc = be.block_scores(q_c, k_c, cfg, Nq, Nk)
            saved, scores.SCRATCH_BYTES = scores.SCRATCH_BYTES, 1  # one mask head per launch
            try:
                sc1 = be.block_scores(q_c, k_c, cfg, Nq, Nk)
            finally:
                scores.SCRATCH_BYTES = saved
            if not np.array_equal(us.to_numpy(sc1), us.to_numpy(sc)):
                failures.append(f"scores in chunks of one head differ from one launch, S={S}")
            bm, counts, idx = be.select_blocks_indices(sc, cfg, Nq, Nk)
            bm64 = be.select_blocks(cp.asarray(sc, dtype=cp.float64), cfg, Nq, Nk)
            rq, rk = ref.compress(q, k, cfg)
            err = float(np.abs(us.to_numpy(sc) - ref.block_scores(rq, rk, cfg, Nq, Nk)).max())
            if err > be.score_eps:
                failures.append(f"scores {np.dtype(dt)} S={S}: {err:.2e}")
            if not np.array_equal(us.to_numpy(bm.mask), us.to_numpy(bm64.mask)):
                failures.append("float32 and float64 selections differ")
            if S % 16 == 0 and D in (32, 64, 128):
                out, lse = be.block_sparse_attention(q, k, v, bm, cfg)
                if not np.isfinite(us.to_numpy(out).astype(np.float64)).all():
                    failures.append("non-finite attention output")
    full = BlockMask.full(1, 1, 64, 64, block_size=16)
    selection.launch_mask_to_indices(cp.asarray(full.mask))
    # Every rung of the attention ladder directly (the backend runs only the default one).
    hopper = str(cp.cuda.Device().compute_capability) == "90"
    for number, ver in attention.KERNEL_VERSIONS.items():
        if ver.wgmma and not hopper:
            continue
        for dt, D in [(np.float16, 64), (BFLOAT16, 64)] + [(BFLOAT16, d) for d in (128, 256) if d in ver.head_dims]:
            q = rng.standard_normal((1, 4, 300, D)).astype(dt)
            k = rng.standard_normal((1, 2, 333, D)).astype(dt)
            v = rng.standard_normal((1, 2, 333, D)).astype(dt)
            bm = BlockMask(rng.random((1, 4, 3, 3)) < 0.6, 128, 1, 300, 333, True)
            counts, idx = (cp.asarray(a) for a in bm.to_indices())
            dev = [cp.asarray(x.view(np.uint16) if dt == BFLOAT16 else x) for x in (q, k, v)]
            out, lse = attention.attention_forward(*dev, counts, idx, nq=300, nk=333, block_size=128,
                                                   heads_per_mask=1, causal=True, softmax_scale=None,
                                                   version=number, validate=True)
            got = cp.asnumpy(out).view(BFLOAT16) if dt == BFLOAT16 else cp.asnumpy(out)
            want, _ = ref.block_sparse_attention(q, k, v, bm, UniSparseConfig(block_size=128))
            if not np.isfinite(got.astype(np.float64)).all() or np.abs(got.astype(np.float64) - want).max() > 0.05:
                failures.append(f"attention v{number} {np.dtype(dt)} D={D} disagrees with the reference")
    cp.cuda.Device().synchronize()
    for f in failures:
        print("FAIL", f)
    print("sanitize_cupy: every kernel ran;", "FAILED" if failures else "all results agree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
