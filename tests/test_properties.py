"""Property tests over random shapes and configurations, for every backend.

Shapes cover lengths of 1 and non-multiples of S and c, Nq < Nk, GQA group sizes 1/2/4/8,
c_h up to G, head dims 16 to 256, causal and not. Each backend's own stages are checked for
the invariants of SPEC sections 4 to 6 and against the reference (SPEC section 7).

The numpy backend *is* the reference, so where a test compares a backend with the reference,
the numpy backend is compared instead with an independent implementation: the loops written
from docs/spec.md in ``tests/test_mutations.py`` (:class:`~tests.test_mutations.Spec`).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import unisparse_ref as us
from tests.conftest import SIM, assert_attention_matches_reference, random_qkv
from tests.test_mutations import Spec
from unisparse_ref import BlockMask, UniSparseConfig, geometry
from unisparse_ref import reference as ref
from unisparse_ref.reference.tiled import tiled_block_sparse_attention
from unisparse_ref.tolerance import compare_selection, eps_valid_rows

MAX_N = 72 if SIM else 300
HEAD_DIMS = [16, 32] if SIM else [16, 32, 64, 128, 256]


@st.composite
def cases(draw, backend=None):
    """A random (config, shapes) pair valid under SPEC section 1 and 2."""
    S = draw(st.sampled_from([16, 32, 64]))
    c_q = draw(st.sampled_from([c for c in (1, 2, 4, 8, 16, 32, 64) if S % c == 0 and c <= S]))
    c_k = draw(st.sampled_from([c for c in (1, 2, 4, 8, 16, 32, 64) if S % c == 0 and c <= S]))
    G = draw(st.sampled_from([1, 2, 4, 8]))
    c_h = draw(st.sampled_from([c for c in (1, 2, 4, 8) if G % c == 0]))
    Hkv = draw(st.integers(1, 2)) if G <= 4 else 1
    B = draw(st.integers(1, 2))
    dims = HEAD_DIMS
    if backend is not None and getattr(backend, "supported_head_dims", None):
        dims = [d for d in dims if d in backend.supported_head_dims] or list(backend.supported_head_dims)[:1]
    D = draw(st.sampled_from(dims))
    causal = draw(st.booleans())
    Nk = draw(st.integers(1, MAX_N))
    Nq = draw(st.integers(1, Nk)) if causal else draw(st.integers(1, MAX_N))
    P = draw(st.sampled_from([0.3, 0.5, 0.7, 0.9, 0.95, 1.0]))
    cfg = UniSparseConfig(
        block_size=S, c_q=c_q, c_k=c_k, c_h=c_h, threshold=P,
        n_sink_blocks=draw(st.integers(0, 2)), n_local_blocks=draw(st.integers(0, 2)), causal=causal,
    )
    seed = draw(st.integers(0, 2**31 - 1))
    return cfg, (B, G * Hkv, Hkv, Nq, Nk, D), seed


def _is_reference(backend) -> bool:
    """The numpy backend is the reference: compare it with :class:`Spec`, not with itself."""
    return backend.name == "numpy"


def _inputs(shape, seed, dtype=np.float32):
    B, Hq, Hkv, Nq, Nk, D = shape
    return random_qkv(np.random.default_rng(seed), B, Hq, Hkv, Nq, Nk, D, dtype, scale=1.5)


# ------------------------------------------------------------------ reference-only properties
@given(cases())
def test_tiled_equals_naive(case):
    cfg, shape, seed = case
    q, k, v = _inputs(shape, seed, np.float64)
    r = us.unisparse_attention(q, k, v, cfg, return_details=True)
    out_t, lse_t = tiled_block_sparse_attention(q, k, v, r.block_mask, cfg)
    np.testing.assert_allclose(out_t, r.out, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse_t), np.isneginf(r.lse))
    np.testing.assert_allclose(lse_t, r.lse, rtol=1e-6)


@given(cases())
def test_density_non_decreasing_in_P(case):
    cfg, shape, seed = case
    q, k, _ = _inputs(shape, seed)
    B, Hq, Hkv, Nq, Nk, D = shape
    q_c, k_c = ref.compress(q, k, cfg)
    scores = ref.block_scores(q_c, k_c, cfg, Nq, Nk)
    prev = None
    for P in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0):
        m = ref.select_blocks(scores, _with(cfg, threshold=P), Nq, Nk).mask
        if prev is not None:
            assert (m >= prev).all(), f"a block kept at smaller P is dropped at P={P}"
        prev = m


def _with(cfg: UniSparseConfig, **kw) -> UniSparseConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ------------------------------------------------------------------ every backend
@given(data=st.data())
def test_scores_rows_sum_to_one_and_match_reference(backend, data):
    cfg, shape, seed = data.draw(cases(backend))
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, _ = _inputs(shape, seed)
    q_c, k_c = backend.compress(q, k, cfg)
    other = Spec if _is_reference(backend) else ref
    rq_c, rk_c = other.compress(q, k, cfg)
    np.testing.assert_allclose(us.to_numpy(q_c), rq_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(us.to_numpy(k_c), rk_c, rtol=1e-5, atol=1e-6)
    scores = np.asarray(us.to_numpy(backend.block_scores(q_c, k_c, cfg, Nq, Nk)), dtype=np.float64)
    rscores = other.block_scores(rq_c, rk_c, cfg, Nq, Nk)
    eps = max(backend.score_eps, 1e-12)
    assert scores.shape == rscores.shape == (B, Hq // cfg.c_h, geometry.num_blocks(Nq, cfg.block_size),
                                             geometry.num_blocks(Nk, cfg.block_size))
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=eps * scores.shape[-1] + 1e-12)
    assert np.abs(scores - rscores).max() <= eps, f"scores differ by {np.abs(scores - rscores).max():.3e} > eps {eps}"
    # Nothing above the causal diagonal carries mass.
    vis = geometry.visible_blocks(Nq, Nk, cfg.block_size, cfg.causal)
    assert (scores[..., ~vis] == 0).all()


@given(data=st.data())
def test_selection_on_identical_scores(backend, data):
    cfg, shape, seed = data.draw(cases(backend))
    B, Hq, Hkv, Nq, Nk, D = shape
    rng = np.random.default_rng(seed)
    # Random scores shaped like real ones: visible blocks, rows summing to 1.
    nqb, nkb = geometry.num_blocks(Nq, cfg.block_size), geometry.num_blocks(Nk, cfg.block_size)
    vis = geometry.visible_blocks(Nq, Nk, cfg.block_size, cfg.causal)
    raw = rng.exponential(size=(B, Hq // cfg.c_h, nqb, nkb)) ** 3 * vis
    scores = raw / raw.sum(axis=-1, keepdims=True)
    bm = backend.select_blocks(scores, cfg, Nq, Nk)
    mask = us.to_numpy(bm.mask)
    rmask = (Spec if _is_reference(backend) else ref).select_blocks(scores, cfg, Nq, Nk).mask
    res = compare_selection(mask, rmask, ref.selection_margin(scores, cfg, Nq, Nk))
    assert res.ok, res.message()
    forced = geometry.forced_blocks(Nq, Nk, cfg.block_size, cfg.n_sink_blocks, cfg.n_local_blocks, cfg.causal)
    assert mask[..., forced].all(), "a forced block was dropped"
    assert not mask[..., ~vis].any(), "a block above the causal diagonal was selected"
    assert bm.heads_per_mask == cfg.c_h and (bm.nq, bm.nk, bm.causal) == (Nq, Nk, cfg.causal)


@given(data=st.data())
def test_pipeline_matches_reference(backend, data):
    cfg, shape, seed = data.draw(cases(backend))
    dtypes = [d for d in (np.float16, us.BFLOAT16, np.float32) if np.dtype(d) in backend.supported_dtypes]
    dtype = data.draw(st.sampled_from(dtypes))
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = _inputs(shape, seed, dtype)
    r = us.unisparse_attention(q, k, v, cfg, backend=backend, return_details=True)
    other = Spec if _is_reference(backend) else ref
    rscores = other.block_scores(*other.compress(q, k, cfg), cfg, Nq, Nk)
    valid = eps_valid_rows(r.block_mask.mask, rscores, cfg, Nq, Nk, max(backend.score_eps, 1e-12))
    assert valid.all(), f"rows not eps-valid: {np.argwhere(~valid)[:5].tolist()}"
    if _is_reference(backend):
        out, lse = Spec.block_sparse_attention(q, k, v, r.block_mask, cfg)
        _assert_float64_close(r.out, r.lse, out, lse)
    else:
        assert_attention_matches_reference(r.out, r.lse, q, k, v, r.block_mask.numpy(), cfg)


def _assert_float64_close(out, lse, want_out, want_lse) -> None:
    """The reference (float64) against the independent loops: equal up to float64 rounding."""
    want_out = np.asarray(want_out, dtype=np.float64)
    scale = max(float(np.abs(want_out).max(initial=0.0)), 1e-300)
    assert np.abs(np.asarray(us.to_numpy(out), dtype=np.float64) - want_out).max(initial=0.0) <= 1e-12 * scale
    lse, want_lse = us.to_numpy(lse), np.asarray(want_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=1e-6, atol=1e-6)


@given(data=st.data())
def test_P_one_equals_dense_attention(backend, data):
    cfg, shape, seed = data.draw(cases(backend))
    cfg = _with(cfg, threshold=1.0)
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = _inputs(shape, seed)
    r = us.unisparse_attention(q, k, v, cfg, backend=backend, return_details=True)
    full = BlockMask.full(B, Hq // cfg.c_h, Nq, Nk, block_size=cfg.block_size, heads_per_mask=cfg.c_h,
                          causal=cfg.causal)
    np.testing.assert_array_equal(us.to_numpy(r.block_mask.mask), full.mask)
    bout, blse = backend.dense_attention(q, k, v, causal=cfg.causal)
    if _is_reference(backend):  # the independent loops with every visible block, not the reference
        dense, dense_lse = Spec.block_sparse_attention(q, k, v, full, cfg)
        _assert_float64_close(r.out, r.lse, dense, dense_lse)
        _assert_float64_close(bout, blse, dense, dense_lse)
        return
    dense, _ = ref.dense_attention(q, k, v, cfg.causal)
    out = np.asarray(us.to_numpy(r.out), dtype=np.float64)
    assert np.abs(out - dense).max() <= 1e-5 * np.abs(dense).max()
    assert_attention_matches_reference(bout, blse, q, k, v, full, cfg)


@given(data=st.data())
def test_batched_call_equals_per_batch_and_head_calls(backend, data):
    cfg, shape, seed = data.draw(cases(backend))
    B, Hq, Hkv, Nq, Nk, D = shape
    G = Hq // Hkv
    q, k, v = _inputs(shape, seed)
    full = us.unisparse_attention(q, k, v, cfg, backend=backend, return_details=True)
    exact = backend.name != "numpy"  # the GPU kernels do the same work per row: bit-identical
    for b in range(B):
        for g in range(Hq // cfg.c_h):  # one composite head: c_h query heads and their KV head
            hs = slice(g * cfg.c_h, (g + 1) * cfg.c_h)
            kv = (g * cfg.c_h) // G
            part = us.unisparse_attention(
                q[b : b + 1, hs], k[b : b + 1, kv : kv + 1], v[b : b + 1, kv : kv + 1], cfg,
                backend=backend, return_details=True,
            )
            np.testing.assert_array_equal(us.to_numpy(part.block_mask.mask)[0, 0], us.to_numpy(full.block_mask.mask)[b, g])
            a = np.asarray(us.to_numpy(part.out)[0], dtype=np.float64)
            e = np.asarray(us.to_numpy(full.out)[b, hs], dtype=np.float64)
            if exact:
                np.testing.assert_array_equal(a, e)
            else:
                np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("P", [0.5, 0.9])
def test_reference_selection_matches_the_loops_and_margin_reported(P):
    rng = np.random.default_rng(5)
    q, k, _ = random_qkv(rng, 1, 2, 1, 200, 200, 32)
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=4, threshold=P)
    s = ref.block_scores(*ref.compress(q, k, cfg), cfg, 200, 200)
    a = ref.select_blocks(s, cfg, 200, 200).mask
    margin = ref.selection_margin(s, cfg, 200, 200)
    # The vectorised reference against the plain while-loop of SPEC 5 (tests/test_mutations.py).
    chk = compare_selection(a, Spec.select_blocks(s, cfg, 200, 200).mask, margin)
    assert chk.ok and not chk.borderline_rows, chk.message()
    assert margin.shape == s.shape[:3] and (margin >= 0).all()
    # Moving P onto a row's decisive mass makes that row borderline.
    kept_all = np.where(a, s, 0).sum(axis=-1)
    i = tuple(int(x) for x in np.argwhere(kept_all < 1 - 1e-3)[0])  # a row that dropped blocks
    kept = kept_all[i]
    m2 = ref.selection_margin(s, _with(cfg, threshold=float(min(kept, 1.0))), 200, 200)
    assert m2[i] <= 1e-6
