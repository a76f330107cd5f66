"""The reference's memory chunking (query blocks, then KV heads) never changes the result."""

import numpy as np
import pytest

import unisparse_ref as us
from tests.conftest import random_qkv
from unisparse_ref import UniSparseConfig
from unisparse_ref import reference as ref


@pytest.mark.parametrize("chunk", [1, 4096, 1 << 14])
@pytest.mark.parametrize("causal", [True, False])
def test_chunking_is_invisible(monkeypatch, chunk, causal):
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 2, 4, 2, 70, 100 if causal else 50, 16)
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8, threshold=0.7, causal=causal)
    r = us.unisparse_attention(q, k, v, cfg, return_details=True)
    dense = ref.dense_attention(q, k, v, causal)
    low = ref.block_sparse_attention(q, k, v, r.block_mask, cfg, precision=np.float16)
    sub = ref.block_sparse_attention(q, k, v, r.block_mask, cfg, query_blocks=[4, 0])
    # Both chunked stages: the scoring (rows of composite queries) and the attention.
    monkeypatch.setattr(ref.scores, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(ref.attention, "_CHUNK_ELEMENTS", chunk)
    r2 = us.unisparse_attention(q, k, v, cfg, return_details=True)
    np.testing.assert_array_equal(r2.block_mask.mask, r.block_mask.mask)
    np.testing.assert_allclose(r2.scores, r.scores, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(r2.out, r.out, rtol=1e-12, atol=1e-14)
    for a, b in zip(ref.dense_attention(q, k, v, causal), dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    low2 = ref.block_sparse_attention(q, k, v, r.block_mask, cfg, precision=np.float16)
    # float32 sums over differently trimmed key ranges may round the last fp16 bit differently.
    eps16 = float(np.finfo(np.float16).eps)
    np.testing.assert_allclose(low2[0].astype(np.float64), low[0].astype(np.float64), rtol=2 * eps16,
                               atol=eps16 * float(np.abs(low[0]).max()))
    # query_blocks picks rows [64, 70) then [0, 16), in that order.
    np.testing.assert_allclose(sub[0][:, :, :6], r.out[:, :, 64:70], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sub[0][:, :, 6:], r.out[:, :, :16], rtol=1e-12, atol=1e-14)
