"""``layout="bnhd"`` (FlashAttention's ``[B, N, H, D]``) and array-like inputs, every backend."""

from __future__ import annotations

import numpy as np
import pytest

import unisparse_ref as us
from tests.conftest import random_qkv


def test_bnhd_equals_bhnd(backend):
    if np.dtype(np.float32) not in backend.supported_dtypes:
        pytest.skip(f"{backend.name} does not take float32")
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, 1, 4, 2, 96, 160, 32)
    cfg = us.UniSparseConfig(block_size=32, c_q=8, c_k=16, threshold=0.8)
    want = us.to_numpy(us.unisparse_attention(q, k, v, cfg, backend=backend))
    t = [np.ascontiguousarray(x.swapaxes(1, 2)) for x in (q, k, v)]  # what a FlashAttention user holds
    res = us.unisparse_attention(*t, cfg, backend=backend, layout="bnhd", return_details=True)
    got = us.to_numpy(res.out)
    assert got.shape == (1, 96, 4, 32)
    # The same kernels on the same numbers: only the memory order of the inputs differs.
    np.testing.assert_array_equal(got.swapaxes(1, 2), want)
    assert us.to_numpy(res.lse).shape == (1, 4, 96)


def test_unknown_layout_is_refused():
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 1, 2, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="layout must be one of"):
        us.unisparse_attention(q, k, v, layout="nhd")


def test_nested_lists_are_arrays_and_other_objects_a_type_error():
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 2, 1, 40, 40, 8)
    cfg = us.UniSparseConfig(block_size=16, c_q=4, c_k=4)
    want = us.unisparse_attention(q, k, v, cfg)
    got = us.unisparse_attention(q.tolist(), k.tolist(), v.tolist(), cfg)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="q must be an array"):
        us.unisparse_attention("q", k, v, cfg)
    with pytest.raises(TypeError, match="nested list of numbers"):
        us.unisparse_attention([["a"]], k, v, cfg)
