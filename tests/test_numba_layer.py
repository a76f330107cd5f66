"""What is specific to the Numba CUDA layer (the shared suite covers the common contract).

Per-stage comparisons with the reference at small sizes, dtype and head-dim refusals, tile
choice, device-array outputs; on a real GPU only: zero-copy input through
``__cuda_array_interface__`` and bit-identical repeat runs (no races). Under the simulator
(``NUMBA_ENABLE_CUDASIM=1``) sizes shrink (:data:`tests.conftest.SIM`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import unisparse_ref as us
from tests.conftest import SIM, assert_attention_matches_reference, random_qkv
from unisparse_ref import BlockMask, UniSparseConfig
from unisparse_ref import reference as ref
from unisparse_ref.tolerance import compare_selection

#: (B, Hq, Hkv, Nq, Nk, D, config) cases: ragged lengths, Nq < Nk, GQA, c_h > 1, odd head dims.
CASES = [
    (1, 2, 1, 37, 37, 16, UniSparseConfig(block_size=16, c_q=4, c_k=8, threshold=0.8)),
    (2, 4, 2, 21, 45, 17, UniSparseConfig(block_size=16, c_q=16, c_k=2, c_h=2, threshold=0.5)),
    (1, 4, 1, 30, 30, 24, UniSparseConfig(block_size=32, c_q=8, c_k=8, c_h=4, n_sink_blocks=0,
                                          n_local_blocks=0, threshold=0.3)),
    (1, 2, 2, 40, 19, 16, UniSparseConfig(block_size=16, c_q=2, c_k=4, causal=False, threshold=0.7)),
    # S = 128 > Br = 64 > Bc = 32: several query and key tiles per block, Nq < Nk.
    (1, 2, 1, 150, 300, 32, UniSparseConfig(threshold=0.7)),
]
if not SIM:
    CASES += [
        (2, 8, 2, 300, 517, 128, UniSparseConfig()),
        (1, 8, 2, 700, 700, 64, UniSparseConfig(block_size=64, c_q=8, c_k=16, c_h=2, threshold=0.95)),
        (1, 4, 4, 129, 257, 256, UniSparseConfig(block_size=32, n_local_blocks=2, threshold=0.9)),
        (1, 2, 1, 333, 200, 80, UniSparseConfig(causal=False, threshold=0.6)),
    ]
IDS = [f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Nq{c[3]}-Nk{c[4]}-D{c[5]}-S{c[6].block_size}" for c in CASES]


def _gpu_present() -> bool:
    if SIM:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not _gpu_present(), reason="needs a real CUDA GPU (not the simulator)")


@pytest.fixture(scope="module")
def nb():
    """The numba backend, skipped with the reason where it cannot run."""
    why = us.backend_status().get("numba")
    if why is not None:
        pytest.skip(f"backend 'numba' unavailable: {why}")
    return us.get_backend("numba")


def _inputs(case, dtype=np.float32, seed=0):
    B, Hq, Hkv, Nq, Nk, D, _ = case
    return random_qkv(np.random.default_rng(seed), B, Hq, Hkv, Nq, Nk, D, dtype, scale=1.5)


# ------------------------------------------------------------------ per stage
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compress_matches_reference(nb, case):
    cfg = case[-1]
    q, k, _ = _inputs(case, np.float16)
    q_c, k_c = nb.compress(q, k, cfg)
    rq, rk = ref.compress(q, k, cfg)
    assert hasattr(q_c, "copy_to_host"), "compress returns numba device arrays"
    np.testing.assert_allclose(us.to_numpy(q_c), rq, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(us.to_numpy(k_c), rk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_block_scores_match_reference_within_score_eps(nb, case):
    B, Hq, Hkv, Nq, Nk, D, cfg = case
    q, k, _ = _inputs(case)
    rq, rk = ref.compress(q, k, cfg)
    expected = ref.block_scores(rq, rk, cfg, Nq, Nk)
    for q_c, k_c in ((rq, rk), nb.compress(q, k, cfg)):  # the reference's tokens, and its own
        got = us.to_numpy(nb.block_scores(q_c, k_c, cfg, Nq, Nk))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= nb.score_eps
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_selection_on_identical_scores_is_the_reference_mask(nb, case):
    B, Hq, Hkv, Nq, Nk, D, cfg = case
    q, k, _ = _inputs(case)
    scores = ref.block_scores(*ref.compress(q, k, cfg), cfg, Nq, Nk)
    bm = nb.select_blocks(scores, cfg, Nq, Nk)
    assert isinstance(bm.mask, np.ndarray) and bm.mask.dtype == np.bool_
    rmask = ref.select_blocks(scores, cfg, Nq, Nk).mask
    # Same float64 sums in the same order: identical, borderline rows included.
    np.testing.assert_array_equal(bm.mask, rmask)
    assert compare_selection(bm, rmask, ref.selection_margin(scores, cfg, Nq, Nk)).ok


def test_selection_ties_go_to_the_lower_block_and_P_one_keeps_all(nb):
    nq = nk = 6 * 16
    cfg = UniSparseConfig(block_size=16, threshold=0.5, n_sink_blocks=0, n_local_blocks=0)
    s = np.zeros((1, 1, 6, 6))
    s[0, 0, 5] = [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]  # a four-way tie: blocks 0 and 1 win
    s[0, 0, 4] = [0.1, 0.3, 0.3, 0.2, 0.1, 0.0]
    for i in range(4):
        s[0, 0, i, : i + 1] = 1.0 / (i + 1)
    for P in (0.5, 1.0):
        c = UniSparseConfig(block_size=16, threshold=P, n_sink_blocks=0, n_local_blocks=0)
        got = nb.select_blocks(s, c, nq, nk).mask
        np.testing.assert_array_equal(got, ref.select_blocks(s, c, nq, nk).mask)
    got = nb.select_blocks(s, cfg, nq, nk).mask[0, 0]
    assert got[5].tolist() == [True, True, False, False, False, False]
    assert got[4].tolist() == [False, True, True, False, False, False]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_block_sparse_attention_matches_reference(nb, case, dtype):
    B, Hq, Hkv, Nq, Nk, D, cfg = case
    q, k, v = _inputs(case, dtype, seed=1)
    scores = ref.block_scores(*ref.compress(q, k, cfg), cfg, Nq, Nk)
    bm = ref.select_blocks(scores, cfg, Nq, Nk)
    out, lse = nb.block_sparse_attention(q, k, v, bm, cfg)
    assert hasattr(out, "copy_to_host") and hasattr(lse, "copy_to_host"), "numba device arrays"
    assert us.to_numpy(out).dtype == np.dtype(dtype) and us.to_numpy(lse).dtype == np.float32
    assert_attention_matches_reference(out, lse, q, k, v, bm, cfg)


def test_empty_rows_and_blocks_above_the_diagonal(nb):
    # Query block 0 selects nothing; query block 1 selects only a block above its diagonal
    # (the causal token mask still applies); query block 2 selects block 0 only.
    nq = nk = 40
    S = 16
    mask = np.zeros((1, 1, 3, 3), dtype=bool)
    mask[0, 0, 1, 2] = True
    mask[0, 0, 2, 0] = True
    bm = BlockMask(mask, S, 1, nq, nk, True)
    cfg = UniSparseConfig(block_size=S)
    q, k, v = random_qkv(np.random.default_rng(3), 1, 1, 1, nq, nk, 16)
    out, lse = nb.block_sparse_attention(q, k, v, bm, cfg)
    out, lse = us.to_numpy(out), us.to_numpy(lse)
    assert np.isneginf(lse[0, 0, : 2 * S]).all() and (out[0, 0, : 2 * S] == 0).all()
    assert not np.isnan(out).any()
    assert_attention_matches_reference(out, lse, q, k, v, bm, cfg)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_attention_and_softmax_scale(nb, causal):
    Nq, Nk = (33, 50) if causal else (50, 33)
    q, k, v = random_qkv(np.random.default_rng(4), 1, 4, 2, Nq, Nk, 32, np.float16)
    out, lse = nb.dense_attention(q, k, v, causal=causal, softmax_scale=0.3)
    cfg = UniSparseConfig(causal=causal, softmax_scale=0.3)
    full = BlockMask.full(1, 4, Nq, Nk, block_size=cfg.block_size, causal=causal)
    assert_attention_matches_reference(out, lse, q, k, v, full, cfg)


def test_accepts_numba_device_arrays(nb):
    from numba import cuda

    case = CASES[0]
    cfg = case[-1]
    q, k, v = _inputs(case, np.float16, seed=5)
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    r = us.unisparse_attention(dq, dk, dv, cfg, backend=nb, return_details=True)
    assert_attention_matches_reference(r.out, r.lse, q, k, v, r.block_mask, cfg)


# ------------------------------------------------------------------ refusals and choices
@pytest.mark.parametrize("dtype", [us.BFLOAT16, np.float64])
def test_unsupported_dtype_raises_type_error_naming_it(nb, dtype):
    q, k, v = random_qkv(np.random.default_rng(0), 1, 2, 1, 8, 8, 16, dtype)
    cfg = UniSparseConfig(block_size=16)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=name):
        nb.compress(q, k, cfg)
    with pytest.raises(TypeError, match=name):
        nb.dense_attention(q, k, v)
    with pytest.raises(TypeError, match=name):
        nb.block_sparse_attention(q, k, v, BlockMask.full(1, 2, 8, 8, block_size=16), cfg)
    assert np.dtype(dtype) not in nb.supported_dtypes


def test_head_dim_over_256_raises_value_error(nb):
    q, k, v = random_qkv(np.random.default_rng(0), 1, 1, 1, 2, 2, 272, np.float16)
    with pytest.raises(ValueError, match="head dims up to 256"):
        nb.dense_attention(q, k, v)


def test_tiles_fit_shared_memory_and_divide_the_block_size():
    pytest.importorskip("numba")
    from unisparse_ref.numba_backend import attention as ka

    for D in range(1, ka.MAX_HEAD_DIM + 1):
        for dtype in (np.float16, np.float32):
            for S in (16, 32, 64, 128, 256):
                br, bc, tpr = ka.choose_tiles(D, np.dtype(dtype), S)
                assert S % br == 0 and S % bc == 0 and bc % tpr == 0
                assert ka.shared_bytes(br, bc, D, tpr, np.dtype(dtype).itemsize) <= ka.SHARED_BUDGET
                assert br * tpr <= ka.MAX_THREADS and bc // tpr <= ka.MAX_COLUMNS_PER_THREAD
                assert -(-D // tpr) <= ka.MAX_DIMS_PER_THREAD
    # The done-criterion shape (D = 128, float16, S = 128): 64 x 32 tiles, 256 threads.
    assert ka.choose_tiles(128, np.dtype(np.float16), 128) == (64, 32, 4)


def test_tiles_walked_follows_the_kernels_loops():
    pytest.importorskip("numba")
    from unisparse_ref.numba_backend import attention as ka

    # Non-causal and dense: every tile. Causal, Nq = Nk, tiles = blocks: the lower triangle.
    full = BlockMask.full(1, 2, 40, 70, block_size=16, causal=False)
    assert ka.tiles_walked(full, 1, 16, 8).all()
    causal = BlockMask.full(1, 1, 64, 64, block_size=16)
    np.testing.assert_array_equal(ka.tiles_walked(causal, 0, 16, 16), np.tril(np.ones((4, 4), dtype=bool)))
    # Br = 16 < S = 32, Bc = 8: the first query tile of a diagonal block stops after its own keys.
    walked = ka.tiles_walked(BlockMask.full(1, 1, 64, 64, block_size=32), 0, 16, 8)
    assert walked[0].tolist() == [True, True] + [False] * 6
    # A mask selecting nothing walks nothing.
    empty = BlockMask(np.zeros((1, 1, 4, 4), dtype=bool), 16, 1, 64, 64, True)
    assert not ka.tiles_walked(empty, 0, 16, 16).any()


def test_package_imports_without_importing_numba():
    """The stage modules import numba; the package imports them only when the backend is built."""
    code = "import sys, unisparse_ref.numba_backend\nprint('numba' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stdout + r.stderr


def test_make_backend_without_gpu_or_simulator_says_why():
    if _gpu_present():
        pytest.skip("a GPU is present: the backend is available")
    pytest.importorskip("numba")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = (
        "import unisparse_ref as us\n"
        "from unisparse_ref.numba_backend import make_backend\n"
        "try:\n    make_backend()\nexcept us.BackendUnavailable as e:\n    print('UNAVAILABLE', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "UNAVAILABLE" in r.stdout and "NUMBA_ENABLE_CUDASIM" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ GPU only
class _CudaArrayLike:
    """A foreign object that only exposes ``__cuda_array_interface__`` (like CuPy or PyTorch)."""

    def __init__(self, dev) -> None:
        self._dev = dev  # keeps the memory alive
        self.__cuda_array_interface__ = dev.__cuda_array_interface__
        self.shape = dev.shape
        self.dtype = dev.dtype


@pytest.mark.gpu
@needs_gpu
def test_zero_copy_input_through_cuda_array_interface(nb):
    from numba import cuda

    case = CASES[4]
    cfg = case[-1]
    q, k, v = _inputs(case, np.float16, seed=6)
    wrapped = [_CudaArrayLike(cuda.to_device(x)) for x in (q, k, v)]
    for w in wrapped:
        dev = nb._device("x", w)
        ptr = dev.__cuda_array_interface__["data"][0]
        assert ptr == w.__cuda_array_interface__["data"][0], "the input was copied"
    r = us.unisparse_attention(*wrapped, cfg, backend=nb, return_details=True)
    assert_attention_matches_reference(r.out, r.lse, q, k, v, r.block_mask, cfg)
    r2 = us.unisparse_attention(q, k, v, cfg, backend=nb, return_details=True)
    assert np.array_equal(us.to_numpy(r.out), us.to_numpy(r2.out))


@pytest.mark.gpu
@needs_gpu
def test_repeat_runs_are_bit_identical(nb):
    from numba import cuda

    B, Hq, Hkv, N, D = 1, 8, 2, 2048, 128
    q, k, v = (cuda.to_device(x) for x in random_qkv(np.random.default_rng(7), B, Hq, Hkv, N, N, D, np.float16))
    cfg = UniSparseConfig(threshold=0.9)
    runs = [us.unisparse_attention(q, k, v, cfg, backend=nb, return_details=True) for _ in range(3)]
    for r in runs[1:]:
        assert np.array_equal(us.to_numpy(r.scores), us.to_numpy(runs[0].scores))
        assert np.array_equal(r.block_mask.mask, runs[0].block_mask.mask)
        assert np.array_equal(us.to_numpy(r.out).view(np.uint16), us.to_numpy(runs[0].out).view(np.uint16))
        assert np.array_equal(us.to_numpy(r.lse).view(np.uint32), us.to_numpy(runs[0].lse).view(np.uint32))
    dense = [us.to_numpy(nb.dense_attention(q, k, v)[0]).view(np.uint16) for _ in range(2)]
    assert np.array_equal(dense[0], dense[1])
