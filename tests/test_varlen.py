"""Serving-shaped inputs (issue 16): packed ragged batches, paged KV caches, merging partial states.

One test body per property, over every backend (the ``backend`` fixture) where the property
is a backend's: the reference must equal the per-sequence calls *exactly*; other backends are
held to SPEC section 7 (:mod:`unisparse_ref.tolerance`: masks eps-valid under the reference
scores, outputs within the rule of their dtype against the reference run with their masks).
The paged cache's composite keys and chunked prefill are properties of the reference (the
cache is the reference's); the backends' part of them, attention against pages, is
``test_paged_attention_equals_contiguous``. Numba cases run in the CUDA simulator with tiny
sizes (``NUMBA_ENABLE_CUDASIM=1 UNISPARSE_TEST_BACKENDS=numba``).
"""

from __future__ import annotations

import numpy as np
import pytest

import unisparse_ref as us
from tests.conftest import SIM
from tests.test_cupy_scores import host_scores  # noqa: F401 - the g++ host emulation of scores.cu
from unisparse_ref import BlockMask, PagedKVCache, UniSparseConfig
from unisparse_ref import reference as ref
from unisparse_ref._arrays import packed_offsets
from unisparse_ref.geometry import cdiv, num_blocks
from unisparse_ref.reference import varlen as rv
from unisparse_ref.tolerance import (
    attention_tolerance,
    check_attention,
    check_lse,
    compare_selection,
    eps_valid_rows,
)
from unisparse_ref.varlen import native_stage

#: (lengths_q, lengths_k, Hq, Hkv, D, config): lengths 1, odd, non-multiples of S and c,
#: Nq < Nk, sequences without queries (with and without keys), GQA with head pooling,
#: non-causal with Nq > Nk, no forced blocks.
CASES = [
    ([1, 19, 0, 33, 0], [3, 40, 5, 33, 0], 2, 1, 16, UniSparseConfig(block_size=16, c_q=4, c_k=8, threshold=0.7)),
    ([21, 3], [13, 40], 2, 2, 16, UniSparseConfig(block_size=16, c_q=2, c_k=4, causal=False, threshold=0.6)),
]
if not SIM:
    CASES += [
        ([1, 37, 0, 50, 23], [1, 61, 0, 50, 90], 4, 2, 16, UniSparseConfig(block_size=16, c_q=4, c_k=8, threshold=0.8)),
        ([17, 0, 64], [45, 9, 64], 4, 2, 24, UniSparseConfig(block_size=16, c_q=16, c_k=2, c_h=2, threshold=0.5)),
        ([40, 3], [19, 77], 2, 1, 16, UniSparseConfig(block_size=32, c_q=8, c_k=8, causal=False, threshold=0.9)),
        ([70, 5], [100, 5], 2, 2, 32, UniSparseConfig(block_size=16, c_q=2, c_k=4, n_sink_blocks=0, n_local_blocks=0,
                                                      threshold=0.3)),
    ]
#: Shapes the CuPy layer runs in ONE launch of rung v9 on Hopper (S a multiple of 128, float16 /
#: bfloat16; D 64 and 128, and 80 zero-padded to 128): partial tiles, lengths 1 and odd, Nq < Nk,
#: sequences without queries, a tile of 128 rows spanning two sequences, non-causal Nq > Nk,
#: fewer packed queries than one tile.
V9_CASES = [
    ([1, 200, 0, 333, 129], [3, 400, 5, 333, 700], 4, 2, 64,
     UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=0.8)),
    ([130, 7, 64], [100, 300, 64], 4, 1, 128,
     UniSparseConfig(block_size=128, c_q=8, c_k=16, c_h=2, causal=False, threshold=0.7)),
    ([77, 0, 300], [77, 0, 555], 2, 2, 80, UniSparseConfig(block_size=256, c_q=16, c_k=8, threshold=0.9)),
    ([1, 3], [5, 130], 4, 2, 64, UniSparseConfig(block_size=128, c_q=16, c_k=16)),  # decode-like: 4 queries in all
]
if not SIM:
    CASES += V9_CASES
IDS = [f"nq{'-'.join(map(str, c[0]))}_nk{'-'.join(map(str, c[1]))}_S{c[5].block_size}" for c in CASES]


def offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def packed_qkv(case, dtype=np.float32, seed=0):
    """``q [total_q, Hq, D]``, ``k``, ``v [total_k, Hkv, D]`` and the offsets of ``case``."""
    nq, nk, Hq, Hkv, D, _ = case
    rng = np.random.default_rng(seed)
    cu_q, cu_k = offsets(nq), offsets(nk)
    q = (1.5 * rng.standard_normal((cu_q[-1], Hq, D))).astype(dtype)
    k = (1.5 * rng.standard_normal((cu_k[-1], Hkv, D))).astype(dtype)
    v = rng.standard_normal((cu_k[-1], Hkv, D)).astype(dtype)
    return q, k, v, cu_q, cu_k


def assert_varlen_attention_close(out, lse, q, k, v, cu_q, cu_k, kv_counts, kv_indices, cfg) -> None:
    """SPEC section 7 for a packed ``out [total_q, Hq, D]`` and ``lse [Hq, total_q]`` against the reference
    run with the same packed masks (and, for float16, its low-precision mode)."""
    dtype = np.dtype(q.dtype)
    ref64, ref_lse = rv.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, kv_counts, kv_indices, cfg)
    lp = None
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        lp = rv.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, kv_counts, kv_indices, cfg, precision=dtype)
    chk = check_attention(out, ref64, None if lp is None else lp[0], dtype)
    assert chk.ok, chk.message()
    lchk = check_lse(lse, ref_lse, None if lp is None else lp[1])
    assert lchk.ok, lchk.message()


# ============================================================================ varlen pipeline
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_varlen_equals_per_sequence_calls(backend, case):
    """Reference: bit for bit the per-sequence ``unisparse_attention`` calls, every detail.
    Other backends: masks eps-valid under the reference scores, out and lse within SPEC 7."""
    nq, nk, Hq, Hkv, D, cfg = case
    q, k, v, cu_q, cu_k = packed_qkv(case)
    res = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, backend=backend, return_details=True)
    out, lse = us.to_numpy(res.out), us.to_numpy(res.lse)
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0]) and lse.dtype == np.float32
    S = cfg.block_size
    cu_qb, cu_r, cu_c = res.cu_qblocks, packed_offsets(cu_q, cfg.c_q), packed_offsets(cu_k, cfg.c_k)
    np.testing.assert_array_equal(cu_qb, packed_offsets(cu_q, S))
    if backend.name != "numpy":
        expected = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, return_details=True)
        for i in range(len(nq)):
            bm = res.block_mask(i)
            if bm is None:
                continue
            scores_i = expected.scores[None, :, cu_qb[i] : cu_qb[i + 1], : num_blocks(nk[i], S)]
            assert eps_valid_rows(bm, scores_i, cfg, nq[i], nk[i], backend.score_eps).all(), f"sequence {i}"
        assert_varlen_attention_close(out, lse, q, k, v, cu_q, cu_k, res.kv_counts, res.kv_indices, cfg)
        return
    for i in range(len(nq)):
        if nq[i] == 0:  # no rows, no mask; its keys are still pooled
            assert res.block_mask(i) is None and cu_qb[i] == cu_qb[i + 1] and cu_r[i] == cu_r[i + 1]
            if nk[i]:
                np.testing.assert_array_equal(
                    res.k_c[cu_c[i] : cu_c[i + 1]], ref.pool_sequence(rv.sequence_view(k, cu_k, i), cfg.c_k)[0].swapaxes(0, 1)
                )
            continue
        q_i, k_i, v_i = (rv.sequence_view(x, c, i) for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        one = us.unisparse_attention(q_i, k_i, v_i, cfg, backend=backend, return_details=True)
        rows = slice(cu_q[i], cu_q[i + 1])
        np.testing.assert_array_equal(out[rows], one.out[0].swapaxes(0, 1))
        np.testing.assert_array_equal(lse[:, rows], one.lse[0])
        np.testing.assert_array_equal(res.block_mask(i).mask, one.block_mask.mask)
        nkb = num_blocks(nk[i], S)
        np.testing.assert_array_equal(res.scores[:, cu_qb[i] : cu_qb[i + 1], :nkb], one.scores[0])
        assert not res.scores[:, cu_qb[i] : cu_qb[i + 1], nkb:].any()
        np.testing.assert_array_equal(res.q_c[cu_r[i] : cu_r[i + 1]], one.q_c[0].swapaxes(0, 1))
        np.testing.assert_array_equal(res.k_c[cu_c[i] : cu_c[i + 1]], one.k_c[0].swapaxes(0, 1))
        counts = res.kv_counts[:, cu_qb[i] : cu_qb[i + 1]]
        idx = res.kv_indices[:, cu_qb[i] : cu_qb[i + 1]]
        assert (idx[:, :, nkb:] == -1).all() and (counts <= nkb).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_varlen_attention_stage_with_arbitrary_masks(backend, case, dtype):
    """The packed attention stage on random packed masks (empty rows included) within SPEC 7."""
    stage = native_stage(backend, "block_sparse_attention_varlen")
    if stage is None:
        pytest.skip(f"backend {backend.name!r} has no packed attention stage (runs one sequence at a time)")
    if np.dtype(dtype) not in backend.supported_dtypes:
        pytest.skip(f"backend {backend.name!r} does not take {np.dtype(dtype)}")
    nq, nk, Hq, Hkv, D, cfg = case
    q, k, v, cu_q, cu_k = packed_qkv(case, dtype, seed=1)
    S, Hm = cfg.block_size, Hq // cfg.c_h
    rng = np.random.default_rng(2)
    masks = []
    for i in range(len(nq)):
        if nq[i] == 0:
            masks.append(None)
            continue
        m = rng.random((1, Hm, num_blocks(nq[i], S), num_blocks(nk[i], S))) < 0.5
        m[0, 0, -1] = False  # an empty mask row: out 0, lse -inf
        masks.append(BlockMask(m, S, cfg.c_h, nq[i], nk[i], cfg.causal))
    counts, indices = rv.pack_block_masks(masks, cu_q, cu_k, S, Hm)
    out, lse = stage(q, k, v, cu_q, cu_k, counts, indices, cfg)
    out, lse = us.to_numpy(out), us.to_numpy(lse)
    if backend.name == "numpy":
        for i, bm in enumerate(masks):
            if bm is not None:
                views = (rv.sequence_view(x, c, i) for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
                o, l_ = ref.block_sparse_attention(*views, bm, cfg)
                np.testing.assert_array_equal(out[cu_q[i] : cu_q[i + 1]], o[0].swapaxes(0, 1))
                np.testing.assert_array_equal(lse[:, cu_q[i] : cu_q[i + 1]], l_[0])
    assert np.isneginf(lse).any(), "the empty mask rows give lse = -inf"
    assert out.dtype == (np.float64 if backend.name == "numpy" else np.dtype(dtype))
    assert_varlen_attention_close(out, lse, q, k, v, cu_q, cu_k, counts, indices, cfg)


# ============================================================================ edge cases
BAD_OFFSETS = [
    ("float", lambda cu: cu.astype(np.float32), TypeError, "must hold integers"),
    ("bool", lambda cu: cu.astype(bool), TypeError, "must hold integers"),
    ("rank 2", lambda cu: cu[None], ValueError, "rank 1"),
    ("no sequence", lambda cu: cu[:1], ValueError, "batch \\+ 1 >= 2"),
    ("not from 0", lambda cu: cu + 1, ValueError, "must start at 0"),
    ("decreasing", lambda cu: np.array([0, 30, 20, cu[-1]], np.int32), ValueError, "non-decreasing"),
    ("wrong end", lambda cu: np.concatenate([cu[:-1], [cu[-1] - 1]]), ValueError, "must end at the packed length"),
]


@pytest.mark.parametrize("name,change,error,match", BAD_OFFSETS, ids=[b[0] for b in BAD_OFFSETS])
def test_invalid_cu_seqlens_are_refused(backend, name, change, error, match):
    case = ([10, 30], [20, 30], 2, 1, 16, UniSparseConfig(block_size=16, c_q=4, c_k=8))
    q, k, v, cu_q, cu_k = packed_qkv(case)
    with pytest.raises(error, match=f"cu_seqlens_q.*{match}"):
        us.unisparse_attention_varlen(q, k, v, change(cu_q), cu_k, case[-1], backend=backend)
    with pytest.raises(error, match=f"cu_seqlens_k.*{match}"):
        us.unisparse_attention_varlen(q, k, v, cu_q, change(cu_k), case[-1], backend=backend)


def test_sequences_that_break_spec_section_1_are_named(backend):
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8)
    q, k, v, cu_q, cu_k = packed_qkv(([5, 9], [5, 7], 2, 1, 16, cfg))
    with pytest.raises(ValueError, match="sequence 1 has Nq=9, Nk=7"):
        us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, backend=backend)
    noncausal = UniSparseConfig(block_size=16, c_q=4, c_k=8, causal=False)
    q, k, v, cu_q, cu_k = packed_qkv(([5, 3], [12, 0], 2, 1, 16, noncausal))
    with pytest.raises(ValueError, match="sequence 1 has 3 queries but no key"):
        us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, noncausal, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens_q has 3 entries"):
        us.unisparse_attention_varlen(q, k, v, cu_q, [0, 12], noncausal, backend=backend)
    with pytest.raises(ValueError, match="rank 3"):
        us.unisparse_attention_varlen(q[None], k, v, cu_q, cu_k, noncausal, backend=backend)


def test_a_batch_of_empty_sequences_gives_empty_outputs():
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8)
    q, k, v, cu_q, cu_k = packed_qkv(([0, 0], [0, 7], 2, 1, 16, cfg))
    res = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, return_details=True)
    assert res.out.shape == (0, 2, 16) and res.lse.shape == (2, 0) and res.kv_counts.shape == (2, 0)
    assert res.k_c.shape == (1, 1, 16) and res.density == 0.0  # ceil(7 / c_k) composite keys


# ============================================================================ paged KV cache
PAGED = [(8, 8), (16, 4)] if SIM else [(8, 8), (16, 4), (32, 8), (64, 16)]  # (page_size, c_k)


@pytest.mark.parametrize("page_size,c_k", PAGED, ids=[f"page{p}-ck{c}" for p, c in PAGED])
def test_paged_attention_equals_contiguous(backend, page_size, c_k):
    """The attention stage against pages scattered over the pool equals the contiguous packed stage
    (exactly in the reference and the Numba kernel: one computation, only the address of a key
    differs), and the paged pipeline equals the packed one (exactly in the reference)."""
    nq, nk, Hq, Hkv, D, cfg = CASES[0] if SIM else CASES[2]
    cfg = UniSparseConfig(block_size=cfg.block_size, c_q=cfg.c_q, c_k=c_k, threshold=cfg.threshold)
    q, k, v, cu_q, cu_k = packed_qkv((nq, nk, Hq, Hkv, D, cfg))
    num_pages = sum(cdiv(n, page_size) for n in nk) + 3
    cache = PagedKVCache.for_config(cfg, num_pages, page_size, Hkv, D, batch=len(nq),
                                    page_order=np.random.default_rng(3).permutation(num_pages))
    cache.append_varlen(k, v, cu_k)
    np.testing.assert_array_equal(cache.cu_seqlens_k, cu_k)
    contiguous = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, return_details=True)
    counts, indices = contiguous.kv_counts, contiguous.kv_indices
    paged_stage = native_stage(backend, "block_sparse_attention_paged")
    if paged_stage is not None:
        out, lse = paged_stage(q, cache.k_pages, cache.v_pages, cu_q, cache.block_table, cache.seqused_k, counts,
                               indices, cfg)
        out, lse = us.to_numpy(out), us.to_numpy(lse)
        if backend.name in ("numpy", "numba", "cupy"):
            o, l_ = native_stage(backend, "block_sparse_attention_varlen")(q, k, v, cu_q, cu_k, counts, indices, cfg)
            np.testing.assert_array_equal(out, us.to_numpy(o))
            np.testing.assert_array_equal(lse, us.to_numpy(l_))
        assert_varlen_attention_close(out, lse, q, k, v, cu_q, cu_k, counts, indices, cfg)
    paged = us.unisparse_attention_paged(q, cache, cu_q, cfg, backend=backend, return_details=True)
    np.testing.assert_array_equal(paged.k_c, contiguous.k_c)  # the cache's composite keys: bit for bit
    if backend.name == "numpy":
        for name in ("out", "lse", "kv_counts", "kv_indices", "scores", "q_c"):
            np.testing.assert_array_equal(getattr(paged, name), getattr(contiguous, name), err_msg=name)
    else:
        for i in range(len(nq)):
            bm = paged.block_mask(i)
            if bm is not None:
                cu_qb = paged.cu_qblocks
                s_i = contiguous.scores[None, :, cu_qb[i] : cu_qb[i + 1], : num_blocks(nk[i], cfg.block_size)]
                assert eps_valid_rows(bm, s_i, cfg, nq[i], nk[i], backend.score_eps).all()
        assert_varlen_attention_close(us.to_numpy(paged.out), us.to_numpy(paged.lse), q, k, v, cu_q, cu_k,
                                      paged.kv_counts, paged.kv_indices, cfg)


@pytest.mark.parametrize("page_size,c_k", [(8, 8), (16, 4), (32, 8)])
def test_cache_composite_keys_equal_one_shot_pooling(page_size, c_k):
    """After any sequence of appends (lengths 1, odd, partial groups filled later, two sequences
    interleaved) the cached composite keys are those of pooling the whole sequence, bit for bit."""
    rng = np.random.default_rng(4)
    Hkv, D = 2, 8
    cache = PagedKVCache(64, page_size, Hkv, D, batch=2, c_k=c_k, dtype=np.float16, page_order=rng.permutation(64))
    keys = [np.zeros((0, Hkv, D), np.float16) for _ in range(2)]
    for n, seq in [(1, 0), (3, 1), (c_k - 1, 0), (1, 0), (2 * page_size + 5, 1), (7, 0), (page_size, 0), (1, 1)]:
        k_new = rng.standard_normal((n, Hkv, D)).astype(np.float16)
        cache.append(k_new, -k_new, seq)
        keys[seq] = np.concatenate([keys[seq], k_new])
        for b in range(2):
            L = keys[b].shape[0]
            assert cache.seqused_k[b] == L
            np.testing.assert_array_equal(cache.keys(b), keys[b])
            np.testing.assert_array_equal(cache.values(b), -keys[b])
            if L:
                whole = ref.pool_sequence(keys[b].swapaxes(0, 1)[None], c_k)[0].swapaxes(0, 1)
                np.testing.assert_array_equal(cache.composite_keys(b), whole)
    assert cache.free_pages == 64 - sum(cdiv(len(x), page_size) for x in keys)


def test_cache_refusals():
    with pytest.raises(ValueError, match="c_k=16 must divide page_size=8"):
        PagedKVCache(4, 8, 1, 16, c_k=16)
    cache = PagedKVCache(2, 8, 1, 4, c_k=4, max_pages=2)
    with pytest.raises(TypeError, match="dtype float16 but the cache holds float32"):
        cache.append(np.zeros((3, 1, 4), np.float16), np.zeros((3, 1, 4), np.float16))
    with pytest.raises(ValueError, match="would need 3 pages"):
        cache.append(np.zeros((17, 1, 4), np.float32), np.zeros((17, 1, 4), np.float32))
    assert cache.seqused_k[0] == 0 and cache.free_pages == 2  # nothing written
    with pytest.raises(ValueError, match="shape \\[n, Hkv=1, D=4\\]"):
        cache.append(np.zeros((3, 2, 4), np.float32), np.zeros((3, 2, 4), np.float32))
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8)
    with pytest.raises(ValueError, match="c_k=4 but config.c_k=8"):
        us.unisparse_attention_paged(np.zeros((1, 1, 4), np.float32), cache, [0, 1], cfg)
    cache.append(np.ones((5, 1, 4), np.float32), np.ones((5, 1, 4), np.float32))
    with pytest.raises(ValueError, match="sequence 0 has Nq=6, Nk=5"):
        us.unisparse_attention_paged(np.zeros((6, 1, 4), np.float32), cache, [0, 6], UniSparseConfig(
            block_size=16, c_q=4, c_k=4))
    with pytest.raises(ValueError, match="block_table\\[0, 1\\] = 7 is read"):
        ref.block_sparse_attention_paged(np.zeros((5, 1, 4), np.float32), cache.k_pages, cache.v_pages, [0, 5],
                                         [[0, 7]], [9], np.zeros((1, 1), np.int32), np.zeros((1, 1, 1), np.int32))


@pytest.mark.parametrize("kwargs,message", [
    ({"num_pages": 0}, "num_pages must be a positive int"),
    ({"page_size": 12}, "c_k=8 must divide page_size=12"),
    ({"max_pages": 0}, "max_pages must be >= 1"),
    ({"page_order": [0, 0, 1, 2]}, "page_order must be a permutation"),
])
def test_both_caches_share_the_page_table_rules(monkeypatch, kwargs, message):
    """The reference's PagedKVCache and the CuPy layer's CupyPagedKVCache extend one PageTable:
    the same refusals, each naming its class, and the same bookkeeping (the CuPy cache built on
    the NumPy stand-in for CuPy of tests/test_cupy_compile.py: no GPU, no kernel launched)."""
    import sys

    from tests.test_cupy_compile import _fake_cupy
    from unisparse_ref.cupy_backend.varlen import CupyPagedKVCache

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy({})[0])
    args = {"num_pages": 4, "page_size": 16, "max_pages": None, "page_order": None} | kwargs
    for cls in (PagedKVCache, CupyPagedKVCache):
        with pytest.raises(ValueError, match=f"^{cls.__name__}: {message}"):
            cls(args["num_pages"], args["page_size"], 2, 8, c_k=8, max_pages=args["max_pages"],
                page_order=args["page_order"])
    caches = [cls.for_config(UniSparseConfig(block_size=16, c_q=4, c_k=8), 4, 16, 2, 8, batch=2,
                             page_order=[2, 0, 1, 3], dtype=np.float16) for cls in (PagedKVCache, CupyPagedKVCache)]
    for cache in caches:
        with pytest.raises(ValueError, match="seq must be an int in \\[0, 2\\)"):
            cache.append(np.zeros((3, 2, 8), np.float16), np.zeros((3, 2, 8), np.float16), seq=2)
        with pytest.raises(ValueError, match="sequence 1 would need 5 pages, its block-table row holds 4"):
            cache.append(np.zeros((80, 2, 8), np.float16), np.zeros((80, 2, 8), np.float16), seq=1)
        assert cache.free_pages == 4 and not cache.seqused_k.any()  # nothing written
        L, L_new, first, needed = cache._pages_for(1, 40)
        assert (L, L_new, first, needed) == (0, 40, 0, 3)
        assert cache._assign_pages(1, first, needed).tolist() == [2, 0, 1, -1] and cache.free_pages == 1
        cache.clear()
        assert cache.free_pages == 4 and (cache.block_table == -1).all()
        assert cache.c_k == 8 and cache.batch == 2 and cache.cu_seqlens_k.tolist() == [0, 0, 0]


@pytest.mark.parametrize("chunks", [(32, 16, 48, 54), (150,), (16,) * 9 + (6,)], ids=["mixed", "one", "sixteens"])
def test_chunked_prefill_on_the_paged_cache_equals_one_shot(chunks):
    """Chunks whose boundaries are multiples of S, each appended then attended against the cache:

    * the cache's composite keys are the one-shot ones bit for bit, and so are the chunk's
      composite queries (its groups of c_q start where the one-shot groups do);
    * the chunk's block scores equal the one-shot rows of its query blocks up to float64
      rounding (the softmax sums run over a different number of invisible zeros), within the
      float64 rule of SPEC 7;
    * its mask rows are the one-shot rows, except SPEC 7's borderline rows;
    * its out and lse rows agree with the one-shot call within the float64 rule of SPEC 7.
    """
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8, threshold=0.7)
    S, L, Hq, Hkv, D = cfg.block_size, sum(chunks), 4, 2, 16
    rng = np.random.default_rng(5)
    q = (1.5 * rng.standard_normal((L, Hq, D))).astype(np.float32)
    k = (1.5 * rng.standard_normal((L, Hkv, D))).astype(np.float32)
    v = rng.standard_normal((L, Hkv, D)).astype(np.float32)
    one = us.unisparse_attention(q.swapaxes(0, 1)[None], k.swapaxes(0, 1)[None], v.swapaxes(0, 1)[None], cfg,
                                 return_details=True)
    margin = ref.selection_margin(one.scores, cfg, L, L)
    cache = PagedKVCache.for_config(cfg, 32, 16, Hkv, D, page_order=rng.permutation(32))
    start = 0
    for n in chunks:
        end = start + n
        assert start % S == 0
        cache.append(k[start:end], v[start:end])
        np.testing.assert_array_equal(cache.composite_keys(0), one.k_c[0, :, : cdiv(end, cfg.c_k)].swapaxes(0, 1))
        res = us.unisparse_attention_paged(q[start:end], cache, [0, n], cfg, return_details=True)
        np.testing.assert_array_equal(res.q_c, one.q_c[0, :, start // cfg.c_q : cdiv(end, cfg.c_q)].swapaxes(0, 1))
        blocks, nkb = slice(start // S, cdiv(end, S)), num_blocks(end, S)
        one_scores = one.scores[0, :, blocks]
        assert not one_scores[..., nkb:].any()  # the one-shot rows see nothing past the chunk
        tol, _ = attention_tolerance(one_scores, None, np.float64)
        assert np.abs(res.scores[..., :nkb] - one_scores[..., :nkb]).max() <= tol
        sel = compare_selection(res.block_mask(0).mask, one.block_mask.mask[:, :, blocks, :nkb], margin[:, :, blocks])
        assert sel.ok, sel.message()
        chk = check_attention(res.out, one.out[0, :, start:end].swapaxes(0, 1), None, np.float64)
        assert chk.ok, chk.message()
        lchk = check_lse(res.lse, one.lse[0, :, start:end])
        assert lchk.ok, lchk.message()
        start = end


# ============================================================================ merging
def _split_mask_case():
    """A reference mask with rows whose selected blocks are all even, all odd, or none."""
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8, threshold=0.6)
    B, Hq, Hkv, Nq, Nk, D = (1, 2, 1, 40, 70, 16) if SIM else (2, 4, 2, 100, 150, 32)
    rng = np.random.default_rng(6)
    q = (1.5 * rng.standard_normal((B, Hq, Nq, D))).astype(np.float32)
    k = (1.5 * rng.standard_normal((B, Hkv, Nk, D))).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Nk, D)).astype(np.float32)
    mask = us.unisparse_attention(q, k, v, cfg, return_details=True).block_mask.mask.copy()
    mask[0, 0, 0] = False
    mask[0, 0, 0, 0] = True  # only block 0 (even)
    mask[0, 0, 1] = False
    mask[0, 0, 1, 1] = True  # only block 1 (odd)
    mask[0, 0, 2] = False  # nothing
    even = np.arange(mask.shape[-1]) % 2 == 0
    whole, a, b = (BlockMask(m, cfg.block_size, cfg.c_h, Nq, Nk, cfg.causal) for m in (mask, mask & even, mask & ~even))
    return q, k, v, cfg, whole, a, b


def _check_merge(backend, out_a, lse_a, out_b, lse_b, whole, lse_whole, dtype):
    """SPEC 7 for the merged result (float32 rule: the halves' lse are float32; float16 against the
    reference merge of the halves rounded to float16), and the empty-row cases exactly."""
    oa, ob = out_a.astype(dtype), out_b.astype(dtype)
    out, lse = us.merge_attention_states(oa, lse_a, ob, lse_b, backend=backend)
    out, lse = us.to_numpy(out), us.to_numpy(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any() and lse.dtype == np.float32
    lp = None
    if np.dtype(dtype) == np.float16:
        lp = ref.merge_attention_states(oa, lse_a, ob, lse_b)[0].astype(np.float16)
    chk = check_attention(out, whole, lp, np.float32 if lp is None else dtype)
    assert chk.ok, chk.message()
    lchk = check_lse(lse, lse_whole)
    assert lchk.ok, lchk.message()
    a_only = np.isneginf(lse_b) & np.isfinite(lse_a)
    b_only = np.isneginf(lse_a) & np.isfinite(lse_b)
    neither = np.isneginf(lse_a) & np.isneginf(lse_b)
    assert a_only.any() and b_only.any() and neither.any()
    np.testing.assert_array_equal(out[a_only], oa[a_only])  # exactly the non-empty side
    np.testing.assert_array_equal(lse[a_only], lse_a[a_only])
    np.testing.assert_array_equal(out[b_only], ob[b_only])
    np.testing.assert_array_equal(lse[b_only], lse_b[b_only])
    assert (out[neither] == 0).all() and np.isneginf(lse[neither]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", ["bhnd", "packed"])
def test_merge_of_two_halves_equals_the_whole(backend, layout, dtype):
    """Selected key blocks split by parity: merging the two block-sparse results is the whole one."""
    if np.dtype(dtype) not in backend.supported_dtypes:
        pytest.skip(f"backend {backend.name!r} does not take {np.dtype(dtype)}")
    q, k, v, cfg, whole, a, b = _split_mask_case()
    (ow, lw), (oa, la), (ob, lb) = (ref.block_sparse_attention(q, k, v, m, cfg) for m in (whole, a, b))
    if layout == "packed":  # out [total_q, Hq, D], lse [Hq, total_q] passed as lse.T
        ow, oa, ob = (o[0].swapaxes(0, 1) for o in (ow, oa, ob))
        lw, la, lb = (x[0].T for x in (lw, la, lb))
    _check_merge(backend, oa, la, ob, lb, ow, lw, dtype)


def test_merge_cascade_prefix_and_suffix(backend):
    """Cascade attention: the prefix attended without a mask, the suffix causally, merged: causal
    attention over the whole (queries are the last Nq positions, so the prefix is visible to all)."""
    B, Hq, Hkv, Nq, Nk, D, m = (1, 2, 1, 20, 50, 16, 24) if SIM else (2, 4, 2, 60, 200, 32, 96)
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)))
    whole, lw = ref.dense_attention(q, k, v, causal=True)
    pre, lp = ref.dense_attention(q, k[:, :, :m], v[:, :, :m], causal=False)
    suf, ls = ref.dense_attention(q, k[:, :, m:], v[:, :, m:], causal=True)
    out, lse = us.merge_attention_states(pre.astype(np.float32), lp, suf.astype(np.float32), ls, backend=backend)
    chk = check_attention(out, whole, None, np.float32)
    assert chk.ok, chk.message()
    lchk = check_lse(us.to_numpy(lse), lw)
    assert lchk.ok, lchk.message()


def test_merge_refusals(backend):
    o = np.zeros((3, 2, 4), np.float32)
    lse = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        us.merge_attention_states(o, lse, o[:2], lse[:2], backend=backend)
    with pytest.raises(ValueError, match="pass lse.T"):
        us.merge_attention_states(o, lse.T, o, lse.T, backend=backend)
    for bad in (np.nan, np.inf):
        lse_bad = lse.copy()
        lse_bad[1, 1] = bad
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            us.merge_attention_states(o, lse_bad, o, lse, backend=backend)


# ============================================================================ the Numba layer
def test_numba_work_list_is_longest_first_across_sequences():
    pytest.importorskip("numba")
    from unisparse_ref.numba_backend.varlen import work_list

    cu_q, nk = offsets([1, 40, 0, 17]), np.array([3, 100, 9, 17])
    work = work_list(cu_q, nk, 16, causal=True)
    tiles = {(b, t) for b, n in enumerate(np.diff(cu_q)) for t in range(cdiv(int(n), 16))}
    assert sorted(map(tuple, work.tolist())) == sorted(tiles)  # every tile once; none for sequence 2
    span = [min((t + 1) * 16, int(cu_q[b + 1] - cu_q[b])) - 1 + int(nk[b] - (cu_q[b + 1] - cu_q[b])) + 1
            for b, t in work.tolist()]
    assert span == sorted(span, reverse=True)
    assert work.tolist()[0] == [1, 2]  # the last tile of the longest sequence starts first


# ============================================================================ the CuPy layer
def _cupy_reason() -> str | None:
    """Why the CuPy backend cannot run here (``None``: it can)."""
    status = us.backend_status().get("cupy", "backend 'cupy' is not registered")
    return None if status is None else f"backend 'cupy' unavailable: {status}"


def _skip_without_cupy() -> None:
    """Skip the calling GPU test, with the reason, where the CuPy backend cannot run."""
    why = _cupy_reason()
    if why is not None:
        pytest.skip(why)


def _cupy_hopper_reason() -> str | None:
    """Why the CuPy v9 varlen tests cannot run here (``None``: they can)."""
    why = _cupy_reason()
    if why is not None:
        return why
    from unisparse_ref.cupy_backend import attention

    if not attention._has_sm90():
        return "rung v9 (us_fa3_fwd_varlen) needs a Hopper GPU (sm_90a)"
    return None


@pytest.mark.parametrize("order", ["grouped", "longest", "sequence"])
def test_cupy_varlen_work_list_is_longest_first_across_sequences(order):
    """The tile list of us_fa3_fwd_varlen (host side, no GPU): every 128-row query tile of every
    sequence once, none for a sequence without queries, with the offsets and lengths the kernel
    reads; "longest": exactly longest first across the batch; "grouped" (the default): longest
    first by span buckets, each sequence's tiles of a bucket together, last tile first;
    "sequence": one sequence after the other, longest first."""
    from unisparse_ref.cupy_backend._hopper import FA3_BR, GROUP_KEYS, varlen_tiles

    nq, nk = np.array([1, 4000, 0, 129, 2500]), np.array([3, 5000, 9, 129, 2600])
    cu_q, cu_k = offsets(nq), offsets(nk)
    tiles = varlen_tiles(cu_q, nk, cu_k[:-1], 128, causal=True, order=order)
    assert tiles.dtype == np.int32 and tiles.shape == (sum(cdiv(int(n), FA3_BR) for n in nq), 8)
    assert sorted(tiles[:, [6, 5]].tolist()) == sorted(
        [b, t * FA3_BR] for b in range(len(nq)) for t in range(cdiv(int(nq[b]), FA3_BR)))
    b = tiles[:, 6]
    np.testing.assert_array_equal(tiles[:, 0], cu_q[b])  # q_off
    np.testing.assert_array_equal(tiles[:, 1], nq[b])
    np.testing.assert_array_equal(tiles[:, 2], cu_k[b])  # k_off
    np.testing.assert_array_equal(tiles[:, 3], nk[b])
    np.testing.assert_array_equal(tiles[:, 4], packed_offsets(cu_q, 128)[b])
    span = np.minimum(tiles[:, 5] + FA3_BR, tiles[:, 1]) - 1 + tiles[:, 3] - tiles[:, 1] + 1
    assert tiles[0].tolist()[5:7] == [3968, 1]  # the last tile of the longest sequence starts first
    runs = [int(x) for i, x in enumerate(b) if i == 0 or b[i - 1] != x]  # the sequence of each run
    if order == "longest":
        assert (np.diff(span) <= 0).all()
    elif order == "grouped":
        bucket = span // GROUP_KEYS
        assert (np.diff(bucket) <= 0).all()
        for k_ in np.unique(bucket):
            sel = bucket == k_
            assert (np.diff(tiles[sel, 5][b[sel] == b[sel][0]]) < 0).all()  # last tile first
            seq_runs = [x for i, x in enumerate(b[sel]) if i == 0 or b[sel][i - 1] != x]
            assert len(seq_runs) == len(set(seq_runs))  # each sequence's tiles of a bucket together
    else:
        assert len(runs) == len(set(runs)) == 4 and runs[0] == 1


def _random_packed_masks(case, seed):
    """Random per-sequence masks (an empty row in each) and their packed index form."""
    nq, nk, Hq, _, _, cfg = case
    S, Hm = cfg.block_size, Hq // cfg.c_h
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(len(nq)):
        if nq[i] == 0:
            masks.append(None)
            continue
        m = rng.random((1, Hm, num_blocks(nq[i], S), num_blocks(nk[i], S))) < 0.6
        m[0, 0, -1] = False  # an empty mask row: out 0, lse -inf
        masks.append(BlockMask(m, S, cfg.c_h, nq[i], nk[i], cfg.causal))
    return masks, rv.pack_block_masks(masks, offsets(nq), offsets(nk), S, Hm)


V9_IDS = [f"nq{'-'.join(map(str, c[0]))}_D{c[4]}_S{c[5].block_size}" for c in V9_CASES]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", V9_CASES, ids=V9_IDS)
def test_cupy_v9_varlen_is_the_batch_kernel_on_each_sequence(case, dtype):
    """One launch of ``us_fa3_fwd_varlen`` over the packed batch gives, bit for bit, the batch
    kernel ``us_fa3_fwd`` run on each sequence alone (a 128-row tile that runs past its
    sequence reads the next sequence's rows but never stores them; keys past N_k,b are
    masked), within SPEC 7 of the reference; the packed pooling kernel gives each sequence's
    composite tokens bit for bit."""
    why = _cupy_hopper_reason()
    if why:
        pytest.skip(why)
    from unisparse_ref.cupy_backend import varlen as cv

    be = us.get_backend("cupy")
    nq, nk, Hq, Hkv, D, cfg = case
    dt = us.BFLOAT16 if dtype == "bfloat16" else np.float16
    q, k, v, cu_q, cu_k = packed_qkv(case, dt, seed=7)
    assert cv.uses_v9(np.dtype(dt), D, cfg.block_size)
    masks, (counts, indices) = _random_packed_masks(case, seed=8)
    out, lse = native_stage(be, "block_sparse_attention_varlen")(q, k, v, cu_q, cu_k, counts, indices, cfg)
    out, lse = us.to_numpy(out), us.to_numpy(lse)
    assert out.dtype == np.dtype(dt) and lse.shape == (Hq, q.shape[0])
    for i, bm in enumerate(masks):
        if bm is None:
            continue
        views = [rv.sequence_view(x, c, i) for x, c in ((q, cu_q), (k, cu_k), (v, cu_k))]
        o, l_ = be.block_sparse_attention(*views, bm, cfg)
        rows = slice(cu_q[i], cu_q[i + 1])
        np.testing.assert_array_equal(out[rows].view(np.uint16), us.to_numpy(o)[0].swapaxes(0, 1).view(np.uint16))
        np.testing.assert_array_equal(lse[:, rows], us.to_numpy(l_)[0])
    assert np.isneginf(lse).any()
    if dtype == "float16":  # the reference's low-precision mode is float16's
        assert_varlen_attention_close(out, lse, q, k, v, cu_q, cu_k, counts, indices, cfg)
    q_c, k_c = native_stage(be, "compress_varlen")(q, k, cu_q, cu_k, cfg)
    q_c, k_c = us.to_numpy(q_c), us.to_numpy(k_c)
    cu_r, cu_c = packed_offsets(cu_q, cfg.c_q), packed_offsets(cu_k, cfg.c_k)
    for i in range(len(nq)):
        if nq[i]:
            one_q, one_k = be.compress(rv.sequence_view(q, cu_q, i), rv.sequence_view(k, cu_k, i), cfg)
            np.testing.assert_array_equal(q_c[cu_r[i] : cu_r[i + 1]], us.to_numpy(one_q)[0].swapaxes(0, 1))
            np.testing.assert_array_equal(k_c[cu_c[i] : cu_c[i + 1]], us.to_numpy(one_k)[0].swapaxes(0, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [128, 256, 64])
def test_cupy_v9_paged_reads_the_block_table(page_size):
    """Pages scattered over the pool, read by ``us_fa3_fwd_varlen`` through the block table
    (page sizes that are multiples of the key tile, 128) give the contiguous packed result bit
    for bit; a smaller page (64) takes the device gather and gives the same bits too."""
    why = _cupy_hopper_reason()
    if why:
        pytest.skip(why)
    be = us.get_backend("cupy")
    case = V9_CASES[0]
    nq, nk, Hq, Hkv, D, cfg = case
    q, k, v, cu_q, cu_k = packed_qkv(case, np.float16, seed=9)
    _, (counts, indices) = _random_packed_masks(case, seed=10)
    num_pages = sum(cdiv(n, page_size) for n in nk) + 3
    cache = PagedKVCache.for_config(cfg, num_pages, page_size, Hkv, D, batch=len(nq), dtype=np.float16,
                                    page_order=np.random.default_rng(11).permutation(num_pages))
    cache.append_varlen(k, v, cu_k)
    out, lse = native_stage(be, "block_sparse_attention_paged")(q, cache.k_pages, cache.v_pages, cu_q,
                                                                cache.block_table, cache.seqused_k, counts,
                                                                indices, cfg)
    o, l_ = native_stage(be, "block_sparse_attention_varlen")(q, k, v, cu_q, cu_k, counts, indices, cfg)
    np.testing.assert_array_equal(us.to_numpy(out), us.to_numpy(o))
    np.testing.assert_array_equal(us.to_numpy(lse), us.to_numpy(l_))
    assert_varlen_attention_close(us.to_numpy(out), us.to_numpy(lse), q, k, v, cu_q, cu_k, counts, indices, cfg)


@pytest.mark.gpu
def test_cupy_merge_bfloat16_and_empty_rows():
    """The merge kernel in bfloat16 (the shared merge tests cover float16 and float32): the
    empty-row cases exactly, the rest within the bfloat16 rule against the reference merge."""
    _skip_without_cupy()
    q, k, v, cfg, whole, a, b = _split_mask_case()
    (ow, lw), (oa, la), (ob, lb) = (ref.block_sparse_attention(q, k, v, m, cfg) for m in (whole, a, b))
    oa16, ob16 = oa.astype(us.BFLOAT16), ob.astype(us.BFLOAT16)
    out, lse = us.merge_attention_states(oa16, la, ob16, lb, backend="cupy")
    out, lse = us.to_numpy(out), us.to_numpy(lse)
    assert out.dtype == us.BFLOAT16 and lse.dtype == np.float32
    lp = ref.merge_attention_states(oa16, la, ob16, lb)[0].astype(us.BFLOAT16)
    chk = check_attention(out, ow, lp, us.BFLOAT16)
    assert chk.ok, chk.message()
    a_only = np.isneginf(lb) & np.isfinite(la)
    neither = np.isneginf(la) & np.isneginf(lb)
    np.testing.assert_array_equal(out[a_only].view(np.uint16), oa16[a_only].view(np.uint16))
    assert (out[neither].astype(np.float32) == 0).all() and np.isneginf(lse[neither]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cupy_paged_cache_on_the_device(dtype):
    """CupyPagedKVCache: after appends of lengths 1, odd, partial groups filled later and two
    sequences interleaved, its keys, values and composite keys are those of the whole sequences
    (composite keys bit for bit the batch pooling kernel's); chunked prefill through
    unisparse_attention_paged on it agrees with the reference within SPEC 7 (masks eps-valid
    under the reference scores, out and lse against the reference run with its masks)."""
    why = _cupy_hopper_reason()
    if why:
        pytest.skip(why)
    from unisparse_ref.cupy_backend import pooling
    from unisparse_ref.cupy_backend._device import device_input
    from unisparse_ref.cupy_backend.varlen import CupyPagedKVCache

    be = us.get_backend("cupy")
    dt = us.BFLOAT16 if dtype == "bfloat16" else np.float16
    rng = np.random.default_rng(12)
    Hq, Hkv, D, ps = 4, 2, 64, 128
    cfg = UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=0.8)
    cache = CupyPagedKVCache.for_config(cfg, 24, ps, Hkv, D, batch=2, dtype=dt, page_order=rng.permutation(24))
    keys = [np.zeros((0, Hkv, D), dt) for _ in range(2)]
    vals = [np.zeros((0, Hkv, D), dt) for _ in range(2)]
    for n, seq in [(1, 0), (3, 1), (15, 0), (1, 0), (2 * ps + 5, 1), (7, 0), (ps, 0), (1, 1)]:
        k_new = (1.5 * rng.standard_normal((n, Hkv, D))).astype(dt)
        v_new = rng.standard_normal((n, Hkv, D)).astype(dt)
        cache.append(k_new, v_new, seq)
        keys[seq], vals[seq] = np.concatenate([keys[seq], k_new]), np.concatenate([vals[seq], v_new])
    for b in range(2):
        np.testing.assert_array_equal(us.to_numpy(cache.keys(b)), keys[b])
        np.testing.assert_array_equal(us.to_numpy(cache.values(b)), vals[b])
        kd, kdt = device_input("k", keys[b].swapaxes(0, 1)[None])
        whole = pooling.launch_pool(kd, kdt, cfg.c_k, 1)  # the batch kernel us_pool_seq on the whole sequence
        np.testing.assert_array_equal(us.to_numpy(cache.composite_keys(b)), us.to_numpy(whole)[0].swapaxes(0, 1))
    # Chunked prefill of one prompt, chunk boundaries at multiples of S, on a fresh cache.
    L, chunks = 700, (256, 128, 316)
    q = (1.5 * rng.standard_normal((L, Hq, D))).astype(dt)
    k = (1.5 * rng.standard_normal((L, Hkv, D))).astype(dt)
    v = rng.standard_normal((L, Hkv, D)).astype(dt)
    cache = CupyPagedKVCache.for_config(cfg, 12, ps, Hkv, D, dtype=dt, page_order=rng.permutation(12))
    start = 0
    for n in chunks:
        end = start + n
        cache.append(k[start:end], v[start:end])
        res = us.unisparse_attention_paged(q[start:end], cache, [0, n], cfg, backend=be, return_details=True)
        f32 = [x.astype(np.float32) for x in (q[start:end], k[:end], v[:end])]  # the same values, exactly
        expected = us.unisparse_attention_paged(f32[0], _host_cache(cfg, f32[1], f32[2], ps), [0, n], cfg,
                                                return_details=True)
        bm = res.block_mask(0)
        assert eps_valid_rows(bm, expected.scores[None, :, :, : num_blocks(end, cfg.block_size)], cfg, n, end,
                              be.score_eps).all()
        if dtype == "float16":
            assert_varlen_attention_close(us.to_numpy(res.out), us.to_numpy(res.lse), q[start:end], k[:end], v[:end],
                                          np.array([0, n]), np.array([0, end]), res.kv_counts, res.kv_indices, cfg)
        start = end


#: Packed scoring (one launch of us_scores_mma's packed mode): the shared CASES (lengths 1 and odd,
#: empty sequences, Nq < Nk, GQA with c_h = 2, non-causal Nq > Nk; V9_CASES among them off the simulator),
#: and a batch with several row and column tiles per sequence; the last shape (S / c_q = 256 rows) takes
#: the per-sequence path (version 3).
SCORE_CASES = CASES + [
    ([1, 1000, 0, 4097, 333, 2500], [1, 1500, 7, 4097, 900, 2500], 8, 2, 128,
     UniSparseConfig(block_size=128, c_q=16, c_k=16, c_h=2)),
    ([600, 5], [700, 5], 4, 2, 64, UniSparseConfig(block_size=512, c_q=1, c_k=8)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, us.BFLOAT16, np.float32], ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("D", [16, 20, 128])
def test_cupy_packed_pooling_is_the_batch_pooling_of_each_sequence(dtype, D):
    """compress_varlen of the CuPy layer (us_pool_varlen: 16-byte loads where D allows, D = 20 one
    output per thread for 16-bit inputs): each sequence's composite tokens bit for bit the batch
    compress (us_pool_seq) of that sequence, for queries (with c_h = 2) and keys."""
    _skip_without_cupy()
    import cupy as cp

    be = us.get_backend("cupy")
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8, c_h=2)
    case = ([1, 37, 0, 50, 23], [1, 61, 0, 50, 90], 4, 2, D, cfg)
    nq = case[0]
    q, k, _, cu_q, cu_k = packed_qkv(case, dtype, seed=6)
    q_c, k_c = (cp.asnumpy(x) for x in native_stage(be, "compress_varlen")(q, k, cu_q, cu_k, cfg))
    cu_r, cu_c = packed_offsets(cu_q, cfg.c_q), packed_offsets(cu_k, cfg.c_k)
    for i in range(len(nq)):
        if nq[i] == 0:
            continue
        qi = np.ascontiguousarray(q[cu_q[i]:cu_q[i + 1]].transpose(1, 0, 2)[None])
        ki = np.ascontiguousarray(k[cu_k[i]:cu_k[i + 1]].transpose(1, 0, 2)[None])
        oq, ok = (cp.asnumpy(x)[0].transpose(1, 0, 2) for x in be.compress(qi, ki, cfg))
        np.testing.assert_array_equal(q_c[cu_r[i]:cu_r[i + 1]], oq, err_msg=f"queries of sequence {i}")
        np.testing.assert_array_equal(k_c[cu_c[i]:cu_c[i + 1]], ok, err_msg=f"keys of sequence {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", SCORE_CASES, ids=[f"case{i}" for i in range(len(SCORE_CASES))])
def test_cupy_packed_scores_are_the_batch_scores_of_each_sequence(case):
    """block_scores_varlen of the CuPy layer (ONE launch of us_scores_mma in its packed mode where scores
    version 4 takes the shape): each sequence's rows bit for bit the batch call be.block_scores on that
    sequence's composite tokens, zeros past nKb_i, within score_eps of the float64 reference."""
    _skip_without_cupy()
    import cupy as cp

    from unisparse_ref.cupy_backend import scores as sc

    be = us.get_backend("cupy")
    nq, nk, Hq, Hkv, D, cfg = case
    q, k, _, cu_q, cu_k = packed_qkv(case, np.float32, seed=5)
    q_c, k_c = native_stage(be, "compress_varlen")(q, k, cu_q, cu_k, cfg)
    got = cp.asnumpy(native_stage(be, "block_scores_varlen")(q_c, k_c, cu_q, cu_k, cfg))
    print(f"\npacked scoring in one launch: {sc.packed_applicable(cfg, D)}")
    assert sc.packed_applicable(cfg, D) == sc.mma_applicable(cfg, D) == (cfg.block_size // cfg.c_q <= 256)
    cu_r, cu_c, cu_qb = packed_offsets(cu_q, cfg.c_q), packed_offsets(cu_k, cfg.c_k), packed_offsets(cu_q, cfg.block_size)
    for i in range(len(nq)):
        if nq[i] == 0:
            continue
        one = be.block_scores(cp.ascontiguousarray(q_c[cu_r[i]:cu_r[i + 1]].transpose(1, 0, 2)[None]),
                              cp.ascontiguousarray(k_c[cu_c[i]:cu_c[i + 1]].transpose(1, 0, 2)[None]), cfg, nq[i], nk[i])
        one = cp.asnumpy(one)[0]
        rows = got[:, cu_qb[i]:cu_qb[i + 1]]
        np.testing.assert_array_equal(rows[:, :, : one.shape[-1]], one, err_msg=f"sequence {i}")
        assert not rows[:, :, one.shape[-1]:].any()
    want = rv.block_scores_varlen(cp.asnumpy(q_c), cp.asnumpy(k_c), cu_q, cu_k, cfg)
    err = float(np.abs(got - want).max())
    assert err <= be.score_eps, f"max |packed scores - ref| = {err:.2e} > score_eps {be.score_eps:g}"


def _host_cache(cfg, k, v, page_size):
    cache = PagedKVCache.for_config(cfg, cdiv(k.shape[0], page_size), page_size, k.shape[1], k.shape[2], dtype=k.dtype)
    cache.append(k, v)
    return cache


@pytest.mark.parametrize("paged", [False, True])
def test_cupy_v9_varlen_launch_glue(monkeypatch, paged):
    """_hopper.fa3_forward_varlen on the host (a NumPy stand-in for CuPy, no GPU): the varlen
    instantiation, the packed tensor maps, every scalar argument in the kernel's order, the
    task count (tiles x heads), the persistent grid, the block table. The launch is recorded."""
    import sys

    from tests.test_cupy_attention_cpu import _numpy_cupy
    from unisparse_ref.cupy_backend import _hopper

    fake, nd = _numpy_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    launches = []
    monkeypatch.setattr(_hopper, "_launch_param", lambda kernel, cfg, tmaps, rest: launches.append((kernel, cfg, tmaps, rest)))
    monkeypatch.setattr(_hopper, "_get_kernel", lambda name: name)
    monkeypatch.setattr(_hopper, "encode_packed_tensor_map", lambda arr, dtype, rows: (dtype, tuple(arr.shape), rows))
    Hq, Hkv, D, S = 8, 2, 64, 128
    nq, nk = np.array([1, 300, 0, 129]), np.array([3, 500, 9, 129])
    cu_q, cu_k = offsets(nq), offsets(nk)
    q = np.zeros((cu_q[-1], Hq, D), np.float16).view(nd)
    k = np.zeros((cu_k[-1] if not paged else 7 * 128, Hkv, D), np.float16).view(nd)
    tiles = _hopper.varlen_tiles(cu_q, nk, cu_k[:-1], S, True).view(nd)
    total_qb = int(packed_offsets(cu_q, S)[-1])
    counts = np.zeros((Hq, total_qb), np.int32).view(nd)
    idx = np.zeros((Hq, total_qb, 4), np.int32).view(nd)
    table = np.arange(8, dtype=np.int32).reshape(4, 2).view(nd) if paged else None
    out, lse = _hopper.fa3_forward_varlen(q, k, k, counts, idx, tiles, total_qb=total_qb, block_size=S,
                                          heads_per_mask=1, causal=True, softmax_scale=0.125, block_table=table,
                                          page_size=128 if paged else 0)
    assert out.shape == q.shape and lse.shape == (Hq, cu_q[-1])
    (kernel, cfg, tmaps, rest), = launches
    assert kernel == "us_fa3_fwd_varlen<__half, 64, 128, 3>"
    assert tmaps == [("float16", q.shape, 128), ("float16", k.shape, 128), ("float16", k.shape, 128)]
    assert rest[2] is tiles and rest[3] is out and rest[4] is lse
    # Hq, Hkv, Hm, total_q, total_qb, idx_stride, S, c_h, causal
    assert [int(x) for x in rest[5:14]] == [Hq, Hkv, Hq, int(cu_q[-1]), total_qb, 4, S, 1, 1]
    assert float(rest[14]) == pytest.approx(0.125 * np.log2(np.e), rel=1e-6)
    n_tiles = 1 + 3 + 0 + 2
    assert int(rest[15]) == n_tiles * Hq and cfg["grid"] == (n_tiles * Hq, 1, 1)  # fewer tasks than SMs
    assert rest[16].shape == (1 + n_tiles * Hq,) and int(rest[17]) == 1  # sched, dynamic
    assert rest[18] is table and int(rest[19]) == (2 if paged else 0) and int(rest[20]) == (128 if paged else 0)


_VARLEN_WRAPPERS = r'''
extern "C" void emu_merge_f(const float* oa, const float* la, const float* ob, const float* lb, float* o, float* l,
                            long long rows, int D, unsigned grid, unsigned block) {
  emu_launch(dim3_{grid, 1, 1}, dim3_{block, 1, 1}, [&] { us_merge_states<float>(oa, la, ob, lb, o, l, rows, D); }); }
#define US_POOL_WRAP(NAME, T) \
extern "C" void NAME(const T* x, const int* cu, const int* cu_out, float* out, int batch, int H, int D, int c, int ch, \
                     unsigned grid, unsigned block) { \
  emu_launch(dim3_{grid, 1, 1}, dim3_{block, 1, 1}, [&] { us_pool_varlen<T>(x, cu, cu_out, out, batch, H, D, c, ch); }); }
US_POOL_WRAP(emu_poolv_f, float)
US_POOL_WRAP(emu_poolv_h, __half)
US_POOL_WRAP(emu_poolv_bf, __nv_bfloat16)
#define US_POOL_EMK(NAME, T) \
extern "C" void NAME(unsigned gx, unsigned gy, unsigned bx, unsigned by, const T* x, const int* cu, const int* cu_out, \
                     float* out, int batch, int H, int D, int c, int ch) { \
  emu_launch(dim3_{gx, gy, 1}, dim3_{bx, by, 1}, [&] { us_pool_varlen<T>(x, cu, cu_out, out, batch, H, D, c, ch); }); }
US_POOL_EMK(emk_poolv_f, float)
US_POOL_EMK(emk_poolv_h, __half)
US_POOL_EMK(emk_poolv_bf, __nv_bfloat16)
'''


@pytest.fixture(scope="module")
def varlen_host_kernels(tmp_path_factory):
    """raw_kernels/varlen.cu built with g++ under the host emulation of tests/test_cupy_compile.py."""
    import ctypes
    import re
    import shutil
    import subprocess

    from tests.test_cupy_compile import _PRELUDE
    from unisparse_ref.cupy_backend import _loader

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the host emulation of the kernels is skipped")
    src = _loader.read_source("varlen.cu")
    src = re.sub(r"#include <cuda_(fp16|bf16)\.h>", "", src).replace("#pragma once", "")
    d = tmp_path_factory.mktemp("varlen_emu")
    (d / "varlen.cpp").write_text(_PRELUDE + src + _VARLEN_WRAPPERS)
    r = subprocess.run([gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", str(d / "varlen.cpp"), "-o",
                        str(d / "libvarlen.so")], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
        pytest.skip("g++ lacks C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(d / "libvarlen.so"))


def _c(a):
    import ctypes

    return a.ctypes.data_as(ctypes.c_void_p)


def test_host_emulated_varlen_pooling(varlen_host_kernels):
    """us_pool_varlen (no GPU: g++ and the host emulation): every sequence's composite tokens,
    groups never crossing a sequence (lengths 1, odd, empty, a partial last group), against
    the reference, with a grid-stride loop over more outputs than threads."""
    import ctypes

    rng = np.random.default_rng(13)
    nq = np.array([1, 37, 0, 50, 23])
    cu = offsets(nq)
    for dt, fn in ((np.float32, "emu_poolv_f"), (np.float16, "emu_poolv_h"), (us.BFLOAT16, "emu_poolv_bf")):
        for c, ch in ((16, 2), (4, 1)):
            x = rng.standard_normal((cu[-1], 4, 8)).astype(dt)
            cu_out = packed_offsets(cu, c)
            out = np.zeros((cu_out[-1], 4 // ch, 8), np.float32)
            xin = np.ascontiguousarray(x if dt == np.float32 else x.view(np.uint16))
            assert xin.ctypes.data % 16 == 0  # the 16-byte loads (D = 8 is a multiple of 16 / itemsize)
            getattr(varlen_host_kernels, fn)(_c(xin), _c(cu), _c(cu_out), _c(out), *(ctypes.c_int(v) for v in (
                len(nq), 4, 8, c, ch)), ctypes.c_uint(2), ctypes.c_uint(32))
            want = rv.compress_queries_varlen(x, cu, UniSparseConfig(block_size=16, c_q=c, c_k=c, c_h=ch), num_kv_heads=1)
            tol, _ = attention_tolerance(want, None, np.float32)
            assert np.abs(out - want).max() <= tol, (np.dtype(dt), c, ch)
            # x one element past a 16-byte boundary: one output per thread instead of 16-byte loads,
            # the same sums in the same order, so the same bits
            buf = np.zeros(xin.size + 16, xin.dtype)
            k = next(j for j in range(1, 16) if (buf.ctypes.data + j * xin.itemsize) % 16)
            xmis = buf[k:k + xin.size].reshape(xin.shape)
            xmis[...] = xin
            out1 = np.zeros_like(out)
            getattr(varlen_host_kernels, fn)(_c(xmis), _c(cu), _c(cu_out), _c(out1), *(ctypes.c_int(v) for v in (
                len(nq), 4, 8, c, ch)), ctypes.c_uint(2), ctypes.c_uint(32))
            assert out1.tobytes() == out.tobytes(), (np.dtype(dt), c, ch)


def test_host_emulated_merge(varlen_host_kernels):
    """us_merge_states in float32 (no GPU): the reference merge within SPEC 7's float32 rule,
    rows empty on one side exactly the other side, rows empty on both 0 and -inf, no NaN."""
    import ctypes

    rng = np.random.default_rng(14)
    oa, ob = (rng.standard_normal((6, 5, 24)).astype(np.float32) for _ in range(2))
    la, lb = (3 * rng.standard_normal((6, 5)).astype(np.float32) for _ in range(2))
    la[0, :2] = lb[0, 1:3] = -np.inf  # a-empty, both empty, b-empty rows
    ob[0, 1:3] = 0
    oa[0, :2] = 0
    out, lse = np.zeros_like(oa), np.zeros_like(la)
    varlen_host_kernels.emu_merge_f(_c(oa), _c(la), _c(ob), _c(lb), _c(out), _c(lse), ctypes.c_longlong(30),
                                    ctypes.c_int(24), ctypes.c_uint(3), ctypes.c_uint(32))
    want, wl = ref.merge_attention_states(oa, la, ob, lb)
    chk = check_attention(out, want, None, np.float32)
    assert chk.ok, chk.message()
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    fin = np.isfinite(wl)
    np.testing.assert_allclose(lse[fin], wl[fin], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 0], ob[0, 0])  # a empty: b exactly
    np.testing.assert_array_equal(lse[0, 0], lb[0, 0])
    assert (out[0, 1] == 0).all() and np.isneginf(lse[0, 1])  # both empty
    np.testing.assert_array_equal(out[0, 2], oa[0, 2])  # b empty: a exactly


# ============================================================================ packed selection (one launch)
#: (lengths_q, lengths_k, S, causal): lengths 1 and odd, non-multiples of S, Nq < Nk, sequences
#: without queries (with and without keys), sequences of a single query block (1 and S queries),
#: a sequence as wide as the packed width, non-causal with Nq > Nk.
SELECT_CASES = [
    ([1, 19, 0, 33, 16, 5, 0], [3, 40, 5, 33, 70, 5, 0], 16, True),
    ([21, 3, 40], [13, 40, 7], 16, False),
]


def _packed_scores(lengths_q, lengths_k, S, causal, Hm, dtype, seed, pad=0.0, extra_width=0):
    """Packed scores ``[Hm, total_qb, W]`` (``W = max(1, max nKb) + extra_width``): nonnegative,
    each row summing to 1 over its visible blocks, many exact ties; ``pad`` past each ``nKb``."""
    from unisparse_ref import geometry

    rng = np.random.default_rng(seed)
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    cu_qb = packed_offsets(cu_q, S)
    W = max(1, max(num_blocks(n, S) for n in lengths_k)) + extra_width
    s = np.full((Hm, int(cu_qb[-1]), W), pad)
    for b, (nq, nk) in enumerate(zip(lengths_q, lengths_k, strict=True)):
        if nq == 0:
            continue
        nqb, nkb = num_blocks(nq, S), num_blocks(nk, S)
        raw = rng.exponential(size=(Hm, nqb, nkb)) ** 3
        raw[0] = np.round(raw[0], 1) + 0.1  # exact ties in mask head 0
        raw = np.where(geometry.visible_blocks(nq, nk, S, causal), raw, 0.0)
        s[:, cu_qb[b] : cu_qb[b + 1], :nkb] = raw / np.maximum(raw.sum(-1, keepdims=True), 1e-300)
    return np.ascontiguousarray(s.astype(dtype)), cu_q, cu_k


def _select_configs(S, causal):
    return [UniSparseConfig(block_size=S, c_q=S // 4, c_k=S // 4, causal=causal, threshold=0.7),
            UniSparseConfig(block_size=S, c_q=S // 4, c_k=S // 4, causal=causal, threshold=0.5, n_sink_blocks=0,
                            n_local_blocks=2, threshold_mode="remaining"),
            UniSparseConfig(block_size=S, c_q=S // 4, c_k=S // 4, causal=causal, threshold=1.0)]


@pytest.fixture(scope="module")
def selection_host_lib(tmp_path_factory):
    """raw_kernels/selection.cu alone, built with g++ under the host emulation of
    tests/test_cupy_compile.py (its wrappers; 32 threads per block, as there)."""
    import ctypes
    import shutil
    import subprocess

    from tests.test_cupy_compile import _host_source
    from unisparse_ref.cupy_backend import selection

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the host emulation of the kernels is skipped")
    d = tmp_path_factory.mktemp("selection_emu")
    (d / "selection.cpp").write_text(_host_source("selection.cu"))
    flags = sorted({o for o in selection.OPTIONS if o.startswith("-D")} - {f"-DUS_SEL_THREADS={selection.THREADS}"})
    r = subprocess.run([gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-DUS_SEL_THREADS=32", *flags,
                        str(d / "selection.cpp"), "-o", str(d / "libselection.so")], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and "barrier" in r.stderr and "No such file" in r.stderr:
        pytest.skip("g++ lacks C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(d / "libselection.so"))


def _emu_select(lib, s, cfg, geom, nqb, nkb, nq, nk):
    """One emulated launch of us_select_topp<T> (T from s.dtype) with the backend's launch
    configuration; returns (counts, indices) shaped like s without / with its last axis."""
    import ctypes

    from unisparse_ref.cupy_backend import selection

    rows = s.size // nkb
    lc = selection.launch_config(rows, nkb, s.dtype.itemsize)
    assert lc["block"][0] == 32  # small widths: one warp (the emulator's US_SEL_THREADS)
    cnt = np.full(s.shape[:-1], -7, np.int32)
    idx = np.full(s.shape, -7, np.int32)
    fn = lib.emk_select_d if s.dtype == np.float64 else lib.emk_select_f
    fn(*(ctypes.c_uint(v) for v in (lc["grid"][0], 1, lc["block"][0], 1)), _c(s), None, _c(cnt), _c(idx),
       None if geom is None else _c(geom), *(ctypes.c_int(int(v)) for v in (nqb, nkb, nq, nk, cfg.block_size,
                                                                             cfg.n_sink_blocks, cfg.n_local_blocks,
                                                                             cfg.causal)),
       ctypes.c_double(cfg.threshold), ctypes.c_int({"total": 0, "remaining": 1}[cfg.threshold_mode]))
    return cnt, idx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SELECT_CASES, ids=["causal", "noncausal"])
def test_host_emulated_packed_selection(selection_host_lib, case, dtype):
    """us_select_topp over packed scores with the row table (no GPU: g++ and the host emulation):
    one launch gives, bit for bit, the batch launch on each sequence's scores alone (padded with
    -1 to the packed width) and the reference's packed selection; the padding past each nKb
    (NaN here) is never read; both threshold modes and P = 1."""
    from unisparse_ref.cupy_backend import selection

    nq, nk, S, causal = case
    Hm = 2
    s, cu_q, cu_k = _packed_scores(nq, nk, S, causal, Hm, dtype, seed=21, pad=np.nan)
    cu_qb = packed_offsets(cu_q, S)
    table = selection.packed_row_table(cu_q, cu_k, S)
    assert table.shape == (cu_qb[-1], 4) and table.dtype == np.int32
    W = s.shape[2]
    for cfg in _select_configs(S, causal):
        cnt, idx = _emu_select(selection_host_lib, s, cfg, table, cu_qb[-1], W, 0, 0)
        want_c, want_i = rv.select_blocks_varlen(np.nan_to_num(s, nan=0.0), cu_q, cu_k, cfg)
        np.testing.assert_array_equal(cnt, want_c)
        np.testing.assert_array_equal(idx, want_i)
        for b in range(len(nq)):
            if nq[b] == 0:
                continue
            rows, nkb = slice(cu_qb[b], cu_qb[b + 1]), num_blocks(nk[b], S)
            one = np.ascontiguousarray(s[:, rows, :nkb])
            c1, i1 = _emu_select(selection_host_lib, one, cfg, None, one.shape[1], nkb, nq[b], nk[b])
            np.testing.assert_array_equal(cnt[:, rows], c1)
            np.testing.assert_array_equal(idx[:, rows, :nkb], i1)
            assert (idx[:, rows, nkb:] == -1).all()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_host_emulated_packed_selection_random_batches(selection_host_lib, seed):
    """The same property on random ragged batches (lengths 0 to 5 S, random S, modes, forced
    blocks, causality), float32 and float64, and a packed width wider than every sequence."""
    from unisparse_ref.cupy_backend import selection

    rng = np.random.default_rng(100 + seed)
    S = int(rng.choice([16, 32]))
    causal = bool(rng.integers(2))
    n = int(rng.integers(1, 7))
    nk = rng.integers(1, 5 * S + 1, n)
    nq = np.where(rng.random(n) < 0.2, 0, rng.integers(1, 5 * S + 1, n))
    nq = np.minimum(nq, nk) if causal else nq
    for dtype in (np.float32, np.float64):
        s, cu_q, cu_k = _packed_scores(list(nq), list(nk), S, causal, 3, dtype, seed=seed, pad=1.0, extra_width=2)
        cfg = UniSparseConfig(block_size=S, c_q=S // 4, c_k=S // 4, causal=causal, threshold=float(rng.uniform(0.2, 1)),
                              n_sink_blocks=int(rng.integers(3)), n_local_blocks=int(rng.integers(3)),
                              threshold_mode=str(rng.choice(["total", "remaining"])))
        cu_qb = packed_offsets(cu_q, S)
        table = selection.packed_row_table(cu_q, cu_k, S)
        cnt, idx = _emu_select(selection_host_lib, s, cfg, table, cu_qb[-1], s.shape[2], 0, 0)
        want_c, want_i = rv.select_blocks_varlen(s, cu_q, cu_k, cfg)
        np.testing.assert_array_equal(cnt, want_c)
        np.testing.assert_array_equal(idx[:, :, : want_i.shape[2]], want_i)
        assert (idx[:, :, want_i.shape[2] :] == -1).all()


def test_cupy_select_blocks_varlen_glue_on_host_emulation(selection_host_lib, monkeypatch):
    """cupy_backend.varlen.select_blocks_varlen on a NumPy stand-in for CuPy whose kernel is the
    host-emulated us_select_topp (no GPU): ONE launch for the batch, with the row table and
    the backend's launch configuration, giving the reference's packed selection; float64 scores
    take the double instantiation; a bad score inside a sequence is refused, one only in the
    padding is ignored; scores narrower than a sequence's nKb and sequences with queries but no
    key are refused; a batch of sequences without queries gives empty outputs."""
    import sys

    from tests.test_cupy_compile import _fake_cupy
    from unisparse_ref import cupy_backend as cb
    from unisparse_ref.cupy_backend import _device, _loader, selection
    from unisparse_ref.cupy_backend import varlen as cv

    fake, Kernel = _fake_cupy({"selection.cu": selection_host_lib})
    fake.full = lambda *a, **k: np.full(*a, **k).view(fake.ndarray)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_device, "_NONFINITE", {})
    monkeypatch.setattr(selection, "THREADS", 32)  # the emulator is built with -DUS_SEL_THREADS=32
    monkeypatch.setattr(_loader, "_SHARED_OPTIN", {})
    launches = []

    def get_function(spec):
        k = Kernel(spec)
        launches.append(spec.name_expression)
        return k

    monkeypatch.setattr(_loader, "get_function", get_function)
    be = cb.CupyBackend("host emulation")
    nq, nk, S, causal = SELECT_CASES[0]
    cfg = _select_configs(S, causal)[0]
    for dtype, name in ((np.float32, "us_select_topp<float>"), (np.float64, "us_select_topp<double>")):
        s, cu_q, cu_k = _packed_scores(nq, nk, S, causal, 2, dtype, seed=22)
        launches.clear()
        counts, indices = cv.select_blocks_varlen(be, s, cu_q, cu_k, cfg)
        assert launches == [name]  # one launch for the whole batch
        assert isinstance(counts, fake.ndarray) and counts.dtype == np.int32 and indices.dtype == np.int32
        want_c, want_i = rv.select_blocks_varlen(s, cu_q, cu_k, cfg)
        np.testing.assert_array_equal(counts.get(), want_c)
        np.testing.assert_array_equal(indices.get(), want_i)
    cu_qb = packed_offsets(cu_q, S)
    pad = s.copy()
    pad[0, cu_qb[1], num_blocks(nk[1], S) :] = np.nan  # padding past nKb: not read, not checked
    c2, i2 = cv.select_blocks_varlen(be, fake.asarray(pad), cu_q, cu_k, cfg)
    np.testing.assert_array_equal(i2.get(), want_i)
    bad = s.copy()
    bad[1, cu_qb[3], 0] = -1.0
    with pytest.raises(ValueError, match="finite and non-negative"):
        cv.select_blocks_varlen(be, bad, cu_q, cu_k, cfg)
    cv.select_blocks_varlen(be, bad, cu_q, cu_k, cfg, check_finite=False)  # no check asked for
    with pytest.raises(ValueError, match="W >= 5"):
        cv.select_blocks_varlen(be, s[:, :, :4], cu_q, cu_k, cfg)
    with pytest.raises(ValueError, match="no key"):
        cv.select_blocks_varlen(be, s, cu_q, np.array([0, 3, 43, 48, 81, 151, 151, 151]), cfg)
    c0, i0 = cv.select_blocks_varlen(be, np.zeros((2, 0, 3)), [0, 0, 0], [0, 4, 4], cfg)
    assert c0.shape == (2, 0) and i0.shape == (2, 0, 3)
    c0, i0 = cv.select_blocks_varlen(be, np.zeros((2, 0, 0)), [0, 0], [0, 0], cfg)
    assert c0.shape == (2, 0) and i0.shape == (2, 0, 1)


def test_upload_int32_refuses_what_int32_cannot_hold():
    """The host tables' upload checks its inputs before touching a device (no GPU needed)."""
    from unisparse_ref.cupy_backend._device import upload_int32

    with pytest.raises(ValueError, match="does not fit int32"):
        upload_int32(np.array([0, 2**31]))
    with pytest.raises(ValueError, match="does not fit int32"):
        upload_int32(np.array([0.5]))


@pytest.mark.gpu
def test_cupy_upload_int32_on_the_device():
    """upload_int32 on the GPU: every table back with its shape and values (empty ones too), from
    one device buffer, each on a 64-byte boundary; the staging buffers of finished copies are
    released by the next call."""
    _skip_without_cupy()
    import cupy as cp

    from unisparse_ref.cupy_backend import _device

    rng = np.random.default_rng(5)
    tables = [rng.integers(-(2**31), 2**31 - 1, size=(7, 4)), np.zeros(0, np.int64), np.arange(5, dtype=np.int16),
              np.array([[3]], np.uint8)]
    got = _device.upload_int32(*tables)
    for t, g in zip(tables, got, strict=True):
        assert g.dtype == cp.int32 and g.shape == t.shape
        assert g.data.ptr % 64 == 0  # every table aligned (the kernels read rows with vector loads)
        np.testing.assert_array_equal(g.get(), t)
    cp.cuda.get_current_stream().synchronize()
    _device.upload_int32(np.arange(3))
    assert len(_device._STAGING) == 1  # the first copy had completed: its buffer is gone


def test_cupy_queued_varlen_pipeline_on_host_emulation(varlen_host_kernels, selection_host_lib, host_scores,  # noqa: F811
                                                       monkeypatch):
    """The CuPy layer's whole packed pipeline (cupy_backend.varlen.unisparse_attention_varlen, queued)
    on a NumPy stand-in for CuPy whose kernels are the host-emulated pooling, scoring and selection,
    with the reference standing in for the attention (no GPU): the same bits as the chain of the
    layer's packed stages (composite tokens, scores, kv_counts / kv_indices, out, lse); the host
    reads nothing back before the last launch, and then once (the non-finite counts), where the
    chain reads back after the pooling; NaN or infinity in q, k or v raises naming it after every
    launch; ``check_finite=False`` reads nothing back; the public entry point takes this path."""
    import sys

    from tests.test_cupy_compile import _KERNEL_TABLE, _fake_cupy, _reference_attention_forward
    from unisparse_ref import cupy_backend as cb
    from unisparse_ref.cupy_backend import _device, _loader, attention, selection
    from unisparse_ref.cupy_backend import scores as sc
    from unisparse_ref.cupy_backend import varlen as cv

    for ctype, short in (("float", "f"), ("__half", "h"), ("__nv_bfloat16", "bf")):
        monkeypatch.setitem(_KERNEL_TABLE, ("varlen.cu", f"us_pool_varlen<{ctype}>"), f"emk_poolv_{short}")
    fake, Kernel = _fake_cupy({"varlen.cu": varlen_host_kernels, "selection.cu": selection_host_lib, **host_scores})
    fake.full = lambda *a, **k: np.full(*a, **k).view(fake.ndarray)
    fake.zeros_like = lambda a, **k: np.zeros_like(np.asarray(a), **k).view(fake.ndarray)
    fake.cuda.Device.compute_capability = "80"  # not Hopper: the attention runs per sequence (the stand-in)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_device, "_NONFINITE", {})
    monkeypatch.setattr(_loader, "_SHARED_OPTIN", {})
    monkeypatch.setattr(selection, "THREADS", 32)  # the emulator is built with -DUS_SEL_THREADS=32
    monkeypatch.setattr(sc, "_SMS", {0: 3})
    events: list[str] = []

    class Logged(Kernel):
        def __call__(self, grid, block, args, shared_mem=0):
            events.append(self.name)
            return super().__call__(grid, block, args, shared_mem)

    monkeypatch.setattr(_loader, "get_function", Logged)
    ref_forward = _reference_attention_forward()
    inside = []

    def attention_forward(q, k, v, *a, **kw):  # the stand-in reads its inputs back itself: not the pipeline's
        events.append("attention")
        inside.append(1)
        try:  # a kernel does not refuse NaN (the reference would): computed here with it replaced
            return ref_forward(*(fake.asarray(np.nan_to_num(x)) for x in (q, k, v)), *a, **kw)
        finally:
            inside.pop()

    monkeypatch.setattr(attention, "attention_forward", attention_forward)
    get = fake.ndarray.get

    def logged_get(self):
        if not inside:
            events.append("get")
        return get(self)

    monkeypatch.setattr(fake.ndarray, "get", logged_get)
    be = cb.CupyBackend("host emulation")
    # lengths 1 and odd, an empty sequence, Nq < Nk, GQA with c_h = 2 (the packed scoring's test case)
    nq, nk, Hq, Hkv, D = [1, 37, 0, 200, 23], [1, 61, 9, 300, 90], 4, 1, 32
    cfg = UniSparseConfig(block_size=32, c_q=4, c_k=4, c_h=2, threshold=0.8)
    cu_q, cu_k = offsets(nq), offsets(nk)
    rng = np.random.default_rng(31)
    q = rng.standard_normal((int(cu_q[-1]), Hq, D)).astype(np.float16)
    k, v = (rng.standard_normal((int(cu_k[-1]), Hkv, D)).astype(np.float16) for _ in range(2))

    events.clear()
    got = cv.unisparse_attention_varlen(be, q, k, v, cu_q, cu_k, cfg)
    assert events.count("get") == 1 and events[-1] == "get", events  # one read-back, after every launch
    assert events.count("us_pool_varlen<__half>") == 2 and "attention" in events
    events.clear()
    q_c, k_c = cv.compress_varlen(be, q, k, cu_q, cu_k, cfg)
    assert events[-1] == "get"  # the chain: the pooling's check reads back before the scoring is queued
    s = cv.block_scores_varlen(be, q_c, k_c, cu_q, cu_k, cfg)
    c, i = cv.select_blocks_varlen(be, s, cu_q, cu_k, cfg, check_finite=False)
    o, lse = cv.block_sparse_attention_varlen(be, q, k, v, cu_q, cu_k, c, i, cfg, check_finite=False)
    for name, a, b in (("out", got[0], o), ("lse", got[1], lse), ("kv_counts", got[2], c), ("kv_indices", got[3], i),
                       ("scores", got[4], s), ("q_c", got[5], q_c), ("k_c", got[6], k_c)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
    res = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, backend=be, return_details=True)
    assert np.asarray(res.out).tobytes() == np.asarray(o).tobytes()
    np.testing.assert_array_equal(res.kv_indices, np.asarray(i))

    for name, arr, at in (("q", q, (40, 1, 3)), ("k", k, (70, 0, 0)), ("v", v, (2, 0, 31))):
        bad = arr.copy()
        bad[at] = np.nan if name != "k" else np.inf
        args = {"q": q, "k": k, "v": v, name: bad}
        events.clear()
        with pytest.raises(ValueError, match=f"^{name} holds non-finite"):
            cv.unisparse_attention_varlen(be, args["q"], args["k"], args["v"], cu_q, cu_k, cfg)
        assert events.index("get") == len(events) - 1 and "attention" in events, name
    events.clear()
    cv.unisparse_attention_varlen(be, q, k, v, cu_q, cu_k, cfg, check_finite=False)
    assert "get" not in events


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_packed_selection_is_the_batch_kernel_on_each_sequence(dtype):
    """On the GPU: select_blocks_varlen (one launch over the packed scores) equals, bit for bit,
    CupyBackend.select_blocks_indices on each sequence's scores alone and the reference's
    packed selection; widths from 1 block to more than the register fast path holds
    (nKb > EMAX * THREADS: the sort), both threshold modes and P = 1."""
    from tests.conftest import cupy_backend_or_reason
    from unisparse_ref.cupy_backend import varlen as cv

    be, why = cupy_backend_or_reason()
    if be is None:
        pytest.skip(f"backend 'cupy' unavailable: {why}")
    import cupy as cp

    cases = [*SELECT_CASES, ([1, 300, 0, 2000, 129, 64], [3, 4000, 9, 2000, 30000, 64], 128, True)]
    if dtype == np.float32:  # nKb up to 8750 > EMAX * THREADS (float64's 16-byte keys: nKb <= 8192)
        cases.append(([40, 3, 130], [140000, 77, 9000], 16, True))
    for nq, nk, S, causal in cases:
        s, cu_q, cu_k = _packed_scores(nq, nk, S, causal, 3, dtype, seed=23)
        sd = cp.asarray(s)
        cu_qb = packed_offsets(cu_q, S)
        for cfg in _select_configs(S, causal):
            counts, indices = cv.select_blocks_varlen(be, sd, cu_q, cu_k, cfg)
            counts, indices = counts.get(), indices.get()
            assert indices.shape == s.shape
            for b in range(len(nq)):
                if nq[b] == 0:
                    continue
                rows, nkb = slice(cu_qb[b], cu_qb[b + 1]), num_blocks(nk[b], S)
                _, c1, i1 = be.select_blocks_indices(cp.ascontiguousarray(sd[None, :, rows, :nkb]), cfg, nq[b], nk[b])
                np.testing.assert_array_equal(counts[:, rows], c1.get()[0])
                np.testing.assert_array_equal(indices[:, rows, :nkb], i1.get()[0])
                assert (indices[:, rows, nkb:] == -1).all()
            want_c, want_i = rv.select_blocks_varlen(s, cu_q, cu_k, cfg)
            np.testing.assert_array_equal(counts, want_c)
            np.testing.assert_array_equal(indices, want_i)
