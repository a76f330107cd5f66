"""BlockMask: the index form, density, construction."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from unisparse_ref import BlockMask, geometry


@st.composite
def masks(draw):
    S = draw(st.sampled_from([16, 32]))
    nk = draw(st.integers(1, 200))
    nq = draw(st.integers(1, nk))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    shape = (B, H, geometry.num_blocks(nq, S), geometry.num_blocks(nk, S))
    seed = draw(st.integers(0, 2**31 - 1))
    m = np.random.default_rng(seed).random(shape) < draw(st.floats(0, 1))
    return BlockMask(m, S, 1, nq, nk, draw(st.booleans()))


@given(masks())
def test_indices_round_trip(bm):
    counts, idx = bm.to_indices()
    assert counts.dtype == np.int32 and idx.dtype == np.int32
    assert counts.shape == bm.mask.shape[:3] and idx.shape == bm.mask.shape
    np.testing.assert_array_equal(counts, bm.mask.sum(-1))
    for row in np.ndindex(*counts.shape):
        c = counts[row]
        sel = idx[row][:c]
        assert (np.diff(sel) > 0).all(), "indices ascending"
        np.testing.assert_array_equal(sel, np.flatnonzero(bm.mask[row]))
        assert (idx[row][c:] == -1).all(), "padding is -1"
    back = BlockMask.from_indices(counts, idx, block_size=bm.block_size, nq=bm.nq, nk=bm.nk, causal=bm.causal)
    np.testing.assert_array_equal(back.mask, bm.mask)


def test_from_indices_rejects_out_of_range():
    import pytest

    counts = np.array([[[1]]], np.int32)
    with pytest.raises(ValueError, match="outside"):
        BlockMask.from_indices(counts, np.array([[[[5]]]], np.int32), block_size=16, nq=16, nk=16)
    with pytest.raises(ValueError, match="kv_counts must lie"):
        BlockMask.from_indices(np.array([[[2]]], np.int32), np.array([[[[0]]]], np.int32), block_size=16, nq=16, nk=16)


def test_density_counts_visible_blocks_only():
    # 3x3 causal blocks: 6 visible. Select everything (9): density 1. Select the diagonal: 3/6.
    full = BlockMask(np.ones((1, 1, 3, 3), bool), 16, 1, 48, 48, True)
    assert full.density == 1.0
    diag = BlockMask(np.eye(3, dtype=bool)[None, None], 16, 1, 48, 48, True)
    assert diag.density == 0.5
    assert BlockMask.full(2, 2, 48, 48, block_size=16).density == 1.0
    assert BlockMask(np.eye(3, dtype=bool)[None, None], 16, 1, 48, 48, False).density == 3 / 9


def test_token_mask_round_trip():
    from unisparse_ref import masks

    rng = np.random.default_rng(4)
    bm = BlockMask(rng.random((1, 2, 3, 4)) < 0.5, 16, 2, 40, 60, True)
    back = masks.from_token_mask(masks.to_token_mask(bm, apply_causal=False), block_size=16, heads_per_mask=2)
    np.testing.assert_array_equal(back.mask, bm.mask)
