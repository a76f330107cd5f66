"""Exercise the serving-layout kernels of the CuPy layer once, on small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python3 scripts/sanitize_varlen.py
    compute-sanitizer --tool racecheck python3 scripts/sanitize_varlen.py

CuPy's memory pool is off, so every array is its own cudaMalloc and an access past the end of
the packed arrays (the last sequence's tile, a page) is caught at the array's edge. Covers
``us_merge_states<half|bf16|float>``, ``us_pool_varlen<half|bf16|float>``, the packed selection
(one launch of ``us_select_topp<float|double>`` with its row table: ragged lengths, an empty
sequence, causal and not, a row wider than the register fast path) and, on Hopper,
``us_fa3_fwd_varlen`` (D = 64, 128, 256; contiguous packed and paged through the block
table; ragged lengths, an empty sequence, a last tile past the end of the packed arrays) and
``CupyPagedKVCache`` (appends, chunked prefill through ``unisparse_attention_paged``) and the
whole packed pipeline queued (``unisparse_attention_varlen``, its NaN refusal after the kernels).
Exits non-zero if a result disagrees with the NumPy reference (SPEC 7).
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

import unisparse_ref as us
from unisparse_ref import BlockMask, PagedKVCache, UniSparseConfig
from unisparse_ref import reference as ref
from unisparse_ref.cupy_backend import attention
from unisparse_ref.reference import varlen as rv
from unisparse_ref.tolerance import check_attention, check_lse
from unisparse_ref.varlen import native_stage


def main() -> int:
    cp.cuda.set_allocator(None)  # plain cudaMalloc per array: memcheck sees every edge
    be = us.get_backend("cupy")
    rng = np.random.default_rng(0)
    failures: list[str] = []

    # merge, every element type
    for dt in (np.float32, np.float16, us.BFLOAT16):
        oa, ob = (rng.standard_normal((3, 5, 24)).astype(dt) for _ in range(2))
        la, lb = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2))
        la[0, 0] = lb[0, 0] = -np.inf
        la[1, 1] = -np.inf
        out, lse = us.merge_attention_states(oa, la, ob, lb, backend=be)
        want, wl = ref.merge_attention_states(oa, la, ob, lb)
        chk = check_attention(us.to_numpy(out).astype(np.float64), want, want.astype(dt), np.dtype(dt))
        if not chk.ok or not np.array_equal(np.isneginf(us.to_numpy(lse)), np.isneginf(wl)):
            failures.append(f"merge {np.dtype(dt)}: {chk.message()}")

    # packed pooling, every element type
    cfg = UniSparseConfig(block_size=128, c_q=16, c_k=8, c_h=2)
    nq, nk = [1, 200, 0, 333], [3, 400, 5, 333]
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (nq, nk))
    for dt in (np.float32, np.float16, us.BFLOAT16):
        q = rng.standard_normal((cu_q[-1], 4, 64)).astype(dt)
        k = rng.standard_normal((cu_k[-1], 2, 64)).astype(dt)
        q_c, k_c = native_stage(be, "compress_varlen")(q, k, cu_q, cu_k, cfg)
        rq, rk = rv.compress_varlen(q, k, cu_q, cu_k, cfg)
        if np.abs(us.to_numpy(q_c) - rq).max() > 1e-5 or np.abs(us.to_numpy(k_c) - rk).max() > 1e-5:
            failures.append(f"compress_varlen {np.dtype(dt)}")

    # packed selection: one launch over the packed scores, against the reference's packed selection
    from unisparse_ref.cupy_backend import varlen as cv

    for nq, nk, S, causal in (([1, 19, 0, 33, 16, 5], [3, 40, 5, 33, 70, 5], 16, True),
                              ([21, 3, 40], [13, 40, 7], 16, False), ([5, 40], [140000, 77], 16, True)):
        cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (nq, nk))
        cu_qb = np.concatenate([[0], np.cumsum([-(-a // S) for a in nq])])
        W = max(-(-b // S) for b in nk)
        for dt in (np.float32, np.float64) if W <= 8192 else (np.float32,):  # float64 keys: nKb <= 8192
            s = np.zeros((2, int(cu_qb[-1]), W), dt)
            for i, (a, b) in enumerate(zip(nq, nk, strict=True)):
                s[:, cu_qb[i]:cu_qb[i + 1], :-(-b // S)] = rng.exponential(size=(2, -(-a // S), -(-b // S))) ** 3
            for mode in ("total", "remaining"):
                cfg = UniSparseConfig(block_size=S, c_q=4, c_k=4, causal=causal, threshold=0.7, threshold_mode=mode)
                counts, idx = cv.select_blocks_varlen(be, cp.asarray(s), cu_q, cu_k, cfg)
                wc, wi = rv.select_blocks_varlen(s, cu_q, cu_k, cfg)
                if not (np.array_equal(counts.get(), wc) and np.array_equal(idx.get(), wi)):
                    failures.append(f"select_blocks_varlen {np.dtype(dt)} {mode} nk={nk}")

    if attention._has_sm90():
        for D, S, page in ((64, 128, 128), (128, 256, 256), (256, 128, 64)):
            cfg = UniSparseConfig(block_size=S, c_q=16, c_k=16)
            nq, nk = [1, 200, 0, 333, 129], [3, 400, 5, 333, 700]
            cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (nq, nk))
            q = rng.standard_normal((cu_q[-1], 4, D)).astype(np.float16)
            k = rng.standard_normal((cu_k[-1], 2, D)).astype(np.float16)
            v = rng.standard_normal((cu_k[-1], 2, D)).astype(np.float16)
            masks = []
            for a, b in zip(nq, nk, strict=True):
                if a == 0:
                    masks.append(None)
                    continue
                m = rng.random((1, 4, -(-a // S), -(-b // S))) < 0.7
                masks.append(BlockMask(m, S, 1, a, b, True))
            counts, idx = rv.pack_block_masks(masks, cu_q, cu_k, S, 4)
            out, lse = native_stage(be, "block_sparse_attention_varlen")(q, k, v, cu_q, cu_k, counts, idx, cfg)
            want, wl = rv.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, counts, idx, cfg)
            lp = rv.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, counts, idx, cfg, precision=np.float16)
            chk = check_attention(us.to_numpy(out), want, lp[0], np.dtype(np.float16))
            lchk = check_lse(us.to_numpy(lse), wl, lp[1])
            if not (chk.ok and lchk.ok):
                failures.append(f"varlen D={D}: {chk.message()} {lchk.message()}")
            n_pages = sum(-(-b // page) for b in nk) + 2
            cache = PagedKVCache(n_pages, page, 2, D, batch=len(nq), c_k=16, dtype=np.float16,
                                 page_order=rng.permutation(n_pages))
            cache.append_varlen(k, v, cu_k)
            po, pl = native_stage(be, "block_sparse_attention_paged")(q, cache.k_pages, cache.v_pages, cu_q,
                                                                      cache.block_table, cache.seqused_k, counts,
                                                                      idx, cfg)
            if not (np.array_equal(us.to_numpy(po), us.to_numpy(out))
                    and np.array_equal(us.to_numpy(pl), us.to_numpy(lse))):
                failures.append(f"paged D={D} page={page}: differs from the contiguous packed result")
        # The whole packed pipeline, queued (one read-back at the end): the chain of the packed stages
        # bit for bit, the attention against the reference on its own masks; NaN in q raises after
        # every kernel ran on it (no fault).
        cfg = UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=0.9)
        nq, nk = [1, 200, 0, 333, 129], [3, 400, 5, 333, 700]
        cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (nq, nk))
        q = rng.standard_normal((cu_q[-1], 4, 128)).astype(us.BFLOAT16)
        k = rng.standard_normal((cu_k[-1], 2, 128)).astype(us.BFLOAT16)
        v = rng.standard_normal((cu_k[-1], 2, 128)).astype(us.BFLOAT16)
        res = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, backend=be, return_details=True)
        qc, kc = native_stage(be, "compress_varlen")(q, k, cu_q, cu_k, cfg)
        sc = native_stage(be, "block_scores_varlen")(qc, kc, cu_q, cu_k, cfg)
        c2, i2 = native_stage(be, "select_blocks_varlen")(sc, cu_q, cu_k, cfg, check_finite=False)
        o2, _ = native_stage(be, "block_sparse_attention_varlen")(q, k, v, cu_q, cu_k, c2, i2, cfg)
        if not (np.array_equal(us.to_numpy(res.out).view(np.uint16), us.to_numpy(o2).view(np.uint16))
                and np.array_equal(res.kv_indices, us.to_numpy(i2)) and bool(cp.array_equal(res.scores, sc))):
            failures.append("queued packed pipeline: differs from the chain of the packed stages")
        want, wl = rv.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, res.kv_counts, res.kv_indices, cfg)
        lp = rv.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, res.kv_counts, res.kv_indices, cfg,
                                              precision=us.BFLOAT16)
        chk = check_attention(us.to_numpy(res.out).astype(np.float64), want, lp[0], np.dtype(us.BFLOAT16))
        if not chk.ok:
            failures.append(f"queued packed pipeline: {chk.message()}")
        bad = q.copy()
        bad[50, 1, 7] = np.nan
        try:
            us.unisparse_attention_varlen(bad, k, v, cu_q, cu_k, cfg, backend=be)
            failures.append("queued packed pipeline: NaN in q not refused")
        except ValueError as e:
            if "q holds" not in str(e):
                failures.append(f"queued packed pipeline: NaN in q refused as {e}")

        # The device cache: appends of odd sizes (partial groups recomputed), then chunked prefill.
        from unisparse_ref.cupy_backend.varlen import CupyPagedKVCache

        cfg = UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=0.8)
        L = 600
        q = rng.standard_normal((L, 4, 64)).astype(us.BFLOAT16)
        k = rng.standard_normal((L, 2, 64)).astype(us.BFLOAT16)
        v = rng.standard_normal((L, 2, 64)).astype(us.BFLOAT16)
        cache = CupyPagedKVCache.for_config(cfg, 8, 128, 2, 64, dtype=us.BFLOAT16, page_order=rng.permutation(8))
        start = 0
        for n in (256, 7, 121, 216):
            cache.append(k[start:start + n], v[start:start + n])
            start += n
        res = us.unisparse_attention_paged(q[-216:], cache, [0, 216], cfg, backend=be, return_details=True)
        if not np.array_equal(us.to_numpy(cache.keys(0)).view(np.uint16), k.view(np.uint16)):
            failures.append("CupyPagedKVCache keys")
        if not np.isfinite(us.to_numpy(res.out).astype(np.float32)).all():
            failures.append("unisparse_attention_paged on CupyPagedKVCache: non-finite output")
    else:
        print("no Hopper GPU: us_fa3_fwd_varlen not exercised")
    cp.cuda.Device().synchronize()
    for f in failures:
        print("FAIL", f)
    print("sanitize_varlen:", "OK" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
