"""Mask interop: token masks, FlexAttention indices, MIT Block-Sparse-Attention, PyTorch BlockMask."""

from __future__ import annotations

import numpy as np
import pytest

from unisparse_ref import BlockMask, geometry, masks
from unisparse_ref import reference as ref


def _random_mask(seed=0, B=2, Hm=3, nq=45, nk=77, S=16, c_h=2, causal=True):
    rng = np.random.default_rng(seed)
    shape = (B, Hm, geometry.num_blocks(nq, S), geometry.num_blocks(nk, S))
    return BlockMask(rng.random(shape) < 0.5, S, c_h, nq, nk, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_token_mask_round_trip(causal):
    bm = _random_mask(causal=causal, nq=45 if causal else 90)
    tok = masks.to_token_mask(bm, apply_causal=False)
    assert tok.shape == (2, 3, bm.nq, bm.nk)
    back = masks.from_token_mask(tok, block_size=16, heads_per_mask=2, causal=causal)
    assert np.array_equal(back.mask, bm.mask)
    # With the causal rule applied, blocks above the diagonal disappear (they attend nothing).
    tok_c = masks.to_token_mask(bm)
    back_c = masks.from_token_mask(tok_c, block_size=16, heads_per_mask=2, causal=causal)
    assert np.array_equal(back_c.mask, bm.mask & bm.visible())


def test_token_mask_matches_reference_expansion():
    bm = _random_mask(seed=1)
    tok = masks.to_token_mask(bm, per_query_head=True)
    assert np.array_equal(tok, ref.expand_block_mask(bm, 6, np.arange(bm.nq)))


def test_flex_indices_round_trip():
    bm = _random_mask(seed=2)
    counts, idx = masks.to_flex_indices(bm)
    assert counts.dtype == np.int32 and idx.dtype == np.int32
    back = masks.from_flex_indices(counts, idx, block_size=16, nq=bm.nq, nk=bm.nk, heads_per_mask=2)
    assert np.array_equal(back.mask, bm.mask)


def test_mit_bsa_round_trip_per_query_head():
    bm = _random_mask(seed=3)
    d = masks.to_mit_bsa(bm)
    assert d["base_blockmask"].shape == (2, 6) + bm.shape[2:]
    assert d["head_mask_type"].tolist() == [1] * 6 and d["compatible"] is False
    back = masks.from_mit_bsa(d["base_blockmask"], d["head_mask_type"], nq=bm.nq, nk=bm.nk, block_size=16)
    assert back.heads_per_mask == 1
    assert np.array_equal(back.mask, masks.expand_heads(bm))


def test_mit_bsa_dense_and_streaming_heads():
    nq = nk = 100
    S = 16
    nqb = geometry.num_blocks(nq, S)
    base = np.zeros((1, 1, nqb, nqb), dtype=bool)
    base[0, 0, :, 0] = True
    hmt = np.array([0, 1, -1], dtype=np.int32)
    bm = masks.from_mit_bsa(base, hmt, nq=nq, nk=nk, block_size=S, streaming_info=np.array([0, 0, 0, 0, 1, 2]))
    vis = geometry.visible_blocks(nq, nk, S, True)
    assert np.array_equal(bm.mask[0, 0], vis)
    assert np.array_equal(bm.mask[0, 1], base[0, 0])
    assert np.array_equal(bm.mask[0, 2], geometry.forced_blocks(nq, nk, S, 1, 2, True))
    with pytest.raises(ValueError, match="streaming_info"):
        masks.from_mit_bsa(base, hmt, nq=nq, nk=nk, block_size=S)
    with pytest.raises(ValueError, match="base_blockmask"):
        masks.from_mit_bsa(base[..., :-1], hmt, nq=nq, nk=nk, block_size=S)


def test_mit_bsa_row_indices_descending():
    bm = _random_mask(seed=4)
    counts, idx = masks.mit_bsa_row_indices(bm)
    full = masks.expand_heads(bm)
    assert np.array_equal(counts, full.sum(-1))
    for b, h, i in np.ndindex(*counts.shape):
        row = idx[b, h, i, : counts[b, h, i]]
        assert list(row) == sorted(np.nonzero(full[b, h, i])[0].tolist(), reverse=True)
        assert (idx[b, h, i, counts[b, h, i]:] == -1).all()


def test_bad_inputs():
    with pytest.raises(TypeError):
        masks.to_token_mask(np.zeros((1, 1, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match="rank 4"):
        masks.from_token_mask(np.zeros((4, 4), dtype=bool), block_size=16)
    with pytest.raises(TypeError, match="bool"):
        masks.from_token_mask(np.zeros((1, 1, 4, 4)), block_size=16)
    with pytest.raises(ValueError, match="num_q_heads"):
        masks.expand_heads(_random_mask(), num_q_heads=5)


def test_to_flex_block_mask_with_torch():
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    bm = _random_mask(seed=5, nq=64, nk=96, S=16, causal=True)
    fbm = masks.to_flex_block_mask(bm)
    assert isinstance(fbm, flex.BlockMask)
    counts, idx = bm.numpy().to_indices()
    full_counts = np.repeat(counts, 2, axis=1)
    assert np.array_equal(fbm.kv_num_blocks.cpu().numpy(), full_counts)
    del torch
