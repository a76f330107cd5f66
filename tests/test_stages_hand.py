"""Every stage of the pipeline on small cases computed by hand, for every backend.

Nothing here compares a backend with the reference (the numpy backend *is* the reference):
the expected values are computed by hand or, for whole attention outputs, by a plain masked
softmax written out in this file.
"""

import math

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref import BlockMask, UniSparseConfig, geometry


def _np(x):
    return np.asarray(us.to_numpy(x), dtype=np.float64)


def _masked_softmax_attention(q, k, v, allowed):
    """One head, written out: ``allowed`` ``[Nq, Nk]``; rows with no allowed key give 0, -inf."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    out = np.zeros((q.shape[0], v.shape[1]))
    lse = np.full(q.shape[0], -np.inf)
    for t in range(q.shape[0]):
        keys = np.flatnonzero(allowed[t])
        if keys.size:
            logits = (q[t] @ k[keys].T) / math.sqrt(q.shape[1])
            w = np.exp(logits - logits.max())
            out[t] = w @ v[keys] / w.sum()
            lse[t] = logits.max() + math.log(w.sum())
    return out, lse


def test_pool_sequence_last_group_averages_existing_tokens(backend):
    # Nq = 5 tokens, c_q = 2 (S = 16 so c divides S): groups {0,1}, {2,3}, {4}.
    q = np.arange(5, dtype=np.float32).reshape(1, 1, 5, 1) * np.ones((1, 1, 1, 16), np.float32)
    k = np.arange(7, dtype=np.float32).reshape(1, 1, 7, 1) * np.ones((1, 1, 1, 16), np.float32)
    cfg = UniSparseConfig(block_size=16, c_q=2, c_k=4)
    q_c, k_c = backend.compress(q, k, cfg)
    np.testing.assert_allclose(_np(q_c)[0, 0, :, 0], [0.5, 2.5, 4.0], rtol=1e-6)
    np.testing.assert_allclose(_np(k_c)[0, 0, :, 0], [1.5, 5.0], rtol=1e-6)  # {0..3}, {4,5,6}


def test_pool_heads_averages_consecutive_query_heads(backend):
    # Hq = 4, Hkv = 1 (G = 4), c_h = 2: composite heads {0,1} and {2,3}.
    q = np.zeros((1, 4, 16, 16), np.float32)
    for h in range(4):
        q[0, h] = h + 1
    k = np.ones((1, 1, 16, 16), np.float32)
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16, c_h=2)
    q_c, _ = backend.compress(q, k, cfg)
    assert _np(q_c).shape == (1, 2, 1, 16)
    np.testing.assert_allclose(_np(q_c)[0, :, 0, 0], [1.5, 3.5], rtol=1e-6)


def test_block_scores_by_hand(backend):
    # S = c_q = c_k = 16: one composite token per block. Nq = Nk = 32: 2 blocks.
    # Composite q = [0, 1] and k = [0, 2] along one axis (D = 16, scale 1/4, dot = 16 * qk).
    D, S = 16, 16
    q = np.zeros((1, 1, 32, D), np.float32)
    k = np.zeros((1, 1, 32, D), np.float32)
    q[0, 0, 16:, :] = 1.0
    k[0, 0, 16:, :] = 2.0
    cfg = UniSparseConfig(block_size=S, c_q=S, c_k=S)
    q_c, k_c = backend.compress(q, k, cfg)
    scores = _np(backend.block_scores(q_c, k_c, cfg, 32, 32))
    # Row 0 sees only key block 0 (causal): score 1. Row 1: logits [0, 0.25 * 16 * 2] = [0, 8].
    e = math.exp(8.0)
    want = np.array([[1.0, 0.0], [1 / (1 + e), e / (1 + e)]])
    np.testing.assert_allclose(scores[0, 0], want, atol=max(backend.score_eps, 1e-12))


def test_block_scores_average_over_composite_rows(backend):
    # S = 32, c_q = c_k = 16: block 0 holds composite rows 0, 1; R_0 = 2. Non-causal, q = 0:
    # every composite row is uniform over C = 4 keys, so each block (2 keys) scores 2/4.
    q = np.zeros((1, 1, 64, 16), np.float32)
    k = np.random.default_rng(0).standard_normal((1, 1, 64, 16)).astype(np.float32)
    cfg = UniSparseConfig(block_size=32, c_q=16, c_k=16, causal=False)
    q_c, k_c = backend.compress(q, k, cfg)
    scores = _np(backend.block_scores(q_c, k_c, cfg, 64, 64))
    np.testing.assert_allclose(scores, 0.5, atol=max(backend.score_eps, 1e-12))


def test_selection_by_hand(backend):
    # One row, 6 visible key blocks (Nq = 16 queries at the end of Nk = 96 keys, S = 16).
    # Scores are dyadic so every sum is exact. Forced: sink {0} and diagonal {5}: m = 0.125.
    # Candidates by score: 2 (0.375), 3 (0.25), then 1 and 4 tie at 0.125 -> 1 first.
    scores = np.array([0.0625, 0.125, 0.375, 0.25, 0.125, 0.0625]).reshape(1, 1, 1, 6)
    # P = 0.8: take 2 (m = 0.5), 3 (m = 0.75), 1 (m = 0.875, carries m past P: kept, stop).
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16, threshold=0.8)
    mask = backend.select_blocks(scores, cfg, 16, 96)
    assert isinstance(mask, BlockMask)
    np.testing.assert_array_equal(us.to_numpy(mask.mask)[0, 0, 0], [1, 1, 1, 1, 0, 1])
    # P = 0.75 is reached exactly after block 3 (m = 0.75 is not < P): stop there.
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16, threshold=0.75)
    mask = backend.select_blocks(scores, cfg, 16, 96)
    np.testing.assert_array_equal(us.to_numpy(mask.mask)[0, 0, 0], [1, 0, 1, 1, 0, 1])
    # P = 1 keeps everything visible.
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16, threshold=1.0)
    mask = backend.select_blocks(scores, cfg, 16, 96)
    assert us.to_numpy(mask.mask).all()


def test_selection_forced_blocks_and_causality_by_hand(backend):
    # Nq = Nk = 64, S = 16: 4x4 blocks, lower triangle visible. All score mass on block 0,
    # n_sink = 1, n_local = 2: forced {0} U {d-1, d}. P small: forced blocks only.
    nqb = 4
    scores = np.zeros((1, 1, nqb, nqb))
    scores[..., 0] = 1.0
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16, threshold=0.5, n_local_blocks=2)
    m = us.to_numpy(backend.select_blocks(scores, cfg, 64, 64).mask)[0, 0]
    want = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(m, want)


def test_attention_by_hand(backend):
    # D = 16, one query row attending to 2 keys with logits [0, ln 3]: weights [1/4, 3/4].
    D = 16
    q = np.zeros((1, 1, 1, D), np.float32)
    q[..., 0] = 4.0  # scale 1/4: logit = k[0]
    k = np.zeros((1, 1, 2, D), np.float32)
    k[0, 0, 1, 0] = math.log(3.0)
    v = np.zeros((1, 1, 2, D), np.float32)
    v[0, 0, 0, :] = 1.0
    v[0, 0, 1, :] = 5.0
    out, lse = backend.dense_attention(q, k, v, causal=True)
    np.testing.assert_allclose(_np(out)[0, 0, 0], 0.25 * 1 + 0.75 * 5, rtol=1e-6)
    np.testing.assert_allclose(_np(lse)[0, 0, 0], math.log(1 + 3), rtol=1e-6)


def test_empty_rows_give_zero_and_minus_inf(backend):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 40, 16)).astype(np.float32)
    v = rng.standard_normal((1, 1, 40, 16)).astype(np.float32)
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16)
    mask = BlockMask.full(1, 2, 40, 40, block_size=16).mask.copy()
    mask[0, 1, 1, :] = False  # head 1, query block 1: nothing selected
    mask[0, 0, 2, 2] = False  # head 0, last block: only blocks 0, 1 (still non-empty)
    bm = BlockMask(mask, 16, 1, 40, 40, True)
    out, lse = backend.block_sparse_attention(q, k, v, bm, cfg)
    out, lse = us.to_numpy(out), us.to_numpy(lse)
    assert not np.isnan(out.astype(np.float64)).any()
    assert (out[0, 1, 16:32] == 0).all()
    assert np.isneginf(lse[0, 1, 16:32]).all()
    assert np.isfinite(lse[0, 0]).all() and np.isfinite(lse[0, 1, :16]).all()
    # Every row against the written-out masked softmax (causal, blocks of 16 tokens).
    tril = np.tril(np.ones((40, 40), dtype=bool))
    for h in range(2):
        blocks = np.repeat(np.repeat(mask[0, h], 16, axis=0), 16, axis=1)[:40, :40]
        want, want_lse = _masked_softmax_attention(q[0, h], k[0, 0], v[0, 0], blocks & tril)
        np.testing.assert_allclose(_np(out)[0, h], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        np.testing.assert_array_equal(np.isneginf(lse[0, h]), np.isneginf(want_lse))
        fin = np.isfinite(want_lse)
        np.testing.assert_allclose(_np(lse)[0, h][fin], want_lse[fin], rtol=1e-5, atol=1e-5)


def test_selected_block_above_diagonal_attends_nothing_extra(backend):
    # A mask that selects blocks above the diagonal must still respect the causal token mask.
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, 48, 16)).astype(np.float32) for _ in range(3))
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16)
    bm = BlockMask(np.ones((1, 1, 3, 3), bool), 16, 1, 48, 48, True)
    out, _ = backend.block_sparse_attention(q, k, v, bm, cfg)
    dense, _ = _masked_softmax_attention(q[0, 0], k[0, 0], v[0, 0], np.tril(np.ones((48, 48), dtype=bool)))
    np.testing.assert_allclose(_np(out)[0, 0], dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_geometry_bottom_right_alignment():
    # Nq = 3 queries at the end of Nk = 5 keys: p = [2, 3, 4].
    np.testing.assert_array_equal(geometry.query_positions(3, 5), [2, 3, 4])
    m = geometry.token_causal_mask(np.arange(3), 3, 5, True)
    np.testing.assert_array_equal(m.sum(axis=1), [3, 4, 5])
    # Blocks: Nq = 20, Nk = 50, S = 16: query blocks end at positions 45 and 49.
    np.testing.assert_array_equal(geometry.last_query_position_of_blocks(20, 50, 16), [45, 49])
    np.testing.assert_array_equal(geometry.diagonal_blocks(20, 50, 16), [2, 3])
    vis = geometry.visible_blocks(20, 50, 16, True)
    np.testing.assert_array_equal(vis, [[1, 1, 1, 0], [1, 1, 1, 1]])
    f = geometry.forced_blocks(20, 50, 16, 1, 1, True)
    np.testing.assert_array_equal(f, [[1, 0, 1, 0], [1, 0, 0, 1]])
    # Composite visibility: a key group is visible if its first token is.
    cv = geometry.composite_visibility(4, 4, 2, 2, True)
    np.testing.assert_array_equal(cv, [[1, 0], [1, 1]])


@pytest.mark.parametrize("n, c, S, want", [(5, 2, 16, [3]), (40, 16, 32, [2, 1]), (33, 16, 16, [1, 1, 1])])
def test_composite_counts(n, c, S, want):
    np.testing.assert_array_equal(geometry.composite_counts_per_block(n, c, S), want)
