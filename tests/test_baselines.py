"""Baseline selectors and workloads: shapes, forced blocks, and the exact identities between them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from unisparse_ref import UniSparseConfig, geometry
from unisparse_ref import reference as ref
from unisparse_ref.evaluation import baselines
from unisparse_ref.evaluation.workloads import WORKLOADS, demo_workload, structured_workload
from unisparse_ref.tolerance import compare_selection

CFG = UniSparseConfig(block_size=16, c_q=4, c_k=4, threshold=0.9)
N = 160


@pytest.fixture(scope="module")
def wl():
    return WORKLOADS["rope_sinks"](N, q_heads=4, kv_heads=2, head_dim=16, seed=3)


@pytest.mark.parametrize("name", list(baselines.SELECTORS))
@pytest.mark.parametrize("causal", [True, False])
def test_selector_shapes_and_visibility(wl, name, causal):
    sel = baselines.SELECTORS[name]
    cfg = dataclasses.replace(CFG, causal=causal)
    q = wl.q[:, :, -100:] if causal else wl.q  # Nq < Nk when causal
    for val in sel.quick_values:
        bm = sel.fn(q, wl.k, wl.v, cfg, **{sel.param: val})
        nqb, nkb = geometry.num_blocks(q.shape[2], 16), geometry.num_blocks(N, 16)
        assert bm.mask.dtype == np.bool_ and bm.shape[2:] == (nqb, nkb)
        assert bm.shape[1] * bm.heads_per_mask == 4
        vis = geometry.visible_blocks(q.shape[2], N, 16, causal)
        assert not (bm.mask & ~vis).any(), "selected a block that no query of the row can see"
        assert bm.mask.any(axis=-1).all(), f"{name} left a query block with nothing"
        assert 0 < bm.density <= 1


@pytest.mark.parametrize("name", ["unisparse", "xattention", "oracle", "sink_local"])
def test_forced_sink_and_diagonal(wl, name):
    sel = baselines.SELECTORS[name]
    bm = sel.fn(wl.q, wl.k, wl.v, CFG, **{sel.param: sel.quick_values[0]})
    forced = geometry.forced_blocks(N, N, 16, 1, 1, True)
    assert (bm.mask | ~forced).all()


def test_dense_block_mass_rows_sum_to_one(wl):
    mass = baselines.dense_block_mass(wl.q, wl.k, CFG)
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-12)
    assert (mass[..., ~geometry.visible_blocks(N, N, 16, True)] == 0).all()


def test_oracle_keeps_mass_p_and_full_at_p1(wl):
    mass = baselines.dense_block_mass(wl.q, wl.k, CFG)
    bm = baselines.oracle(wl.q, wl.k, wl.v, CFG, threshold=0.8, block_mass=mass)
    assert (np.where(bm.mask, mass, 0).sum(-1) >= 0.8 - 1e-12).all()
    full = baselines.oracle(wl.q, wl.k, wl.v, CFG, threshold=1.0, block_mass=mass)
    assert full.density == 1.0


def test_xattention_stride_one_is_the_oracle(wl):
    # A 1 x 1 antidiagonal is the token logit itself: the block scores are the true block mass.
    mass = baselines.dense_block_mass(wl.q, wl.k, CFG)
    x = baselines.xattention(wl.q, wl.k, wl.v, CFG, threshold=0.85, stride=1)
    o = baselines.oracle(wl.q, wl.k, wl.v, CFG, threshold=0.85, block_mass=mass)
    margin = ref.selection_margin(mass, dataclasses.replace(CFG, threshold=0.85, c_h=1), N, N)
    chk = compare_selection(x.mask, o.mask, margin)
    assert chk.ok, chk.message()


def test_sparge_is_unisparse_with_block_pooling_and_no_forced_blocks(wl):
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16, threshold=0.8, n_sink_blocks=0, n_local_blocks=0)
    s = baselines.sparge(wl.q, wl.k, wl.v, cfg, cdf_threshold=0.8, attention_sink=False)
    q_c, k_c = ref.compress(wl.q, wl.k, cfg)
    scores = ref.block_scores(q_c, k_c, cfg, N, N)
    u = ref.select_blocks(scores, cfg, N, N)
    chk = compare_selection(s.mask, u.mask, ref.selection_margin(scores, cfg, N, N))
    assert chk.ok, chk.message()


def test_minference_full_budget_and_sink_local_pattern(wl):
    bm = baselines.minference(wl.q, wl.k, wl.v, CFG, budget=1.0)
    assert bm.density == 1.0
    sl = baselines.sink_local(wl.q, wl.k, wl.v, CFG, n_local=3)
    assert np.array_equal(sl.mask[0, 0], geometry.forced_blocks(N, N, 16, 1, 3, True))


def test_flexprefill_monotone_in_gamma(wl):
    d = [baselines.flexprefill(wl.q, wl.k, wl.v, CFG, gamma=g).density for g in (0.5, 0.9, 0.999)]
    assert d[0] <= d[1] <= d[2]


def test_sparge_similarity_gate_keeps_whole_rows(wl):
    bm = baselines.sparge(wl.q, wl.k, wl.v, CFG, cdf_threshold=0.5, sim_threshold=2.0)  # every block fails
    assert bm.density == 1.0


def test_xattention_rejects_bad_stride(wl):
    with pytest.raises(ValueError, match="stride"):
        baselines.xattention(wl.q, wl.k, wl.v, CFG, stride=3)


# ----------------------------------------------------------------------------- workloads
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_seeded_and_shaped(name):
    a = WORKLOADS[name](512, q_heads=4, kv_heads=2, head_dim=16, seed=1)
    b = WORKLOADS[name](512, q_heads=4, kv_heads=2, head_dim=16, seed=1)
    c = WORKLOADS[name](512, q_heads=4, kv_heads=2, head_dim=16, seed=2)
    assert np.array_equal(a.q, b.q) and np.array_equal(a.k, b.k) and not np.array_equal(a.q, c.q)
    assert a.q.dtype == np.float32 and a.q.shape[1] == 4 and a.k.shape[1] == 2 and a.q.shape[3] == 16
    assert np.isfinite(a.q).all() and a.description.startswith(name)
    for bb, h, p, s in a.needles:
        assert 0 <= s < p < a.k.shape[2] and 0 <= h < 4 and bb == 0


def test_needles_dominate_dense_attention():
    w = WORKLOADS["needle"](1024, q_heads=4, kv_heads=2, head_dim=32, seed=0, n_needles=4)
    D = 32
    for b, h, p, s in w.needles:
        t = p - (w.k.shape[2] - w.q.shape[2])
        logits = (w.q[b, h, t].astype(np.float64) @ w.k[b, h // 2].T.astype(np.float64)) / np.sqrt(D)
        logits[p + 1 :] = -np.inf
        a = np.exp(logits - logits.max())
        assert (a / a.sum())[s] > 0.5  # the planted key takes most of the row


def test_vertical_slash_and_video_truth():
    w = WORKLOADS["vertical_slash"](1024, q_heads=2, kv_heads=1, head_dim=32)
    assert w.truth["vertical"][0] == 0 and 0 in w.truth["slash"]
    v = WORKLOADS["video_grid"](1000, q_heads=2, kv_heads=1, head_dim=32, frames=4, width=10)
    assert not v.causal and v.q.shape[2] == 4 * 25 * 10 == 1000


def test_existing_generators_unchanged():
    d = demo_workload(256)
    assert d.q.shape == (1, 8, 256, 64) and d.k.shape == (1, 2, 256, 64) and len(d.needles) == 4
    s = structured_workload(128, q_heads=2, kv_heads=1, head_dim=8, n_needles=1, seed=0)
    assert s.causal and s.q.shape == (1, 2, 128, 8)
