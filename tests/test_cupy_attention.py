"""GPU tests of the CuPy block-sparse attention kernels (``raw_kernels/attention.cu``).

Every rung of the kernel ladder (v1, v6, v7, v9) against the float64 NumPy reference under SPEC section 7
(:func:`tests.conftest.assert_attention_matches_reference`): ragged lengths, ``Nq < Nk``,
GQA groups 1/2/4/8, ``c_h > 1``, empty mask rows, head dims 64/128, fp16/bf16/fp32, causal
and not; repeated runs are bit-identical. Skipped without CuPy and a CUDA GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import assert_attention_matches_reference, random_qkv
from unisparse_ref import BFLOAT16, BlockMask, UniSparseConfig
from unisparse_ref import reference as ref

cp = pytest.importorskip("cupy", reason="CuPy is not installed")


def _gpu_reason() -> str | None:
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # CUDA driver missing, no device, ...
        return f"no usable CUDA device: {e}"
    return None


_WHY = _gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]

from unisparse_ref.cupy_backend.attention import (  # noqa: E402
    KERNEL_VERSIONS,
    attention_forward,
    dense_indices,
)

#: ``UNISPARSE_ATTN_VERSIONS=6,7`` narrows the versions tested (default: all).
_ONLY = [int(x) for x in os.environ.get("UNISPARSE_ATTN_VERSIONS", "").split(",") if x.strip()]
VERSIONS = [v for v in sorted(KERNEL_VERSIONS) if not _ONLY or v in _ONLY]
TC_VERSIONS = [n for n in VERSIONS if KERNEL_VERSIONS[n].tensor_core]


def to_device(x: np.ndarray):
    """NumPy -> CuPy; bfloat16 travels as uint16 bits."""
    if x.dtype == BFLOAT16:
        return cp.asarray(x.view(np.uint16))
    return cp.asarray(x)


def from_device(x, dtype) -> np.ndarray:
    a = cp.asnumpy(x)
    return a.view(BFLOAT16) if np.dtype(dtype) == BFLOAT16 else a


def run(q, k, v, bm: BlockMask, version, softmax_scale=None):
    counts, idx = bm.numpy().to_indices()
    out, lse = attention_forward(
        to_device(q), to_device(k), to_device(v), cp.asarray(counts), cp.asarray(idx),
        nq=bm.nq, nk=bm.nk, block_size=bm.block_size, heads_per_mask=bm.heads_per_mask,
        causal=bm.causal, softmax_scale=softmax_scale, version=version, validate=True,
    )
    cp.cuda.Device().synchronize()
    return from_device(out, q.dtype), cp.asnumpy(lse)


def random_mask(rng, B, Hm, nq, nk, S, c_h, causal, density=0.5, empty_row=True) -> BlockMask:
    nqb, nkb = -(-nq // S), -(-nk // S)
    m = rng.random((B, Hm, nqb, nkb)) < density
    if empty_row:
        m[0, 0, 0, :] = False  # a row with no block: out 0, lse -inf
    return BlockMask(m, S, c_h, nq, nk, causal)


# (B, Hq, Hkv, c_h, Nq, Nk, causal)
SHAPES = [
    (1, 4, 1, 1, 203, 203, True),     # G=4, ragged
    (2, 4, 2, 2, 113, 300, True),     # batch 2, Nq < Nk, c_h=2
    (1, 8, 8, 1, 257, 257, False),    # G=1, non-causal
    (1, 8, 1, 8, 1, 129, True),       # a single query, G=8, c_h=8
    (1, 2, 1, 2, 1023, 1023, True),   # ragged last block at 1023
    (1, 4, 2, 1, 130, 517, False),    # non-causal, Nq < Nk
]


def _cases():
    for ver in VERSIONS:
        dts = KERNEL_VERSIONS[ver].dtypes()
        for dt in dts:
            for D in (64, 128, 256):
                if D in KERNEL_VERSIONS[ver].head_dims:
                    yield ver, dt, D


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}ch{}_{}x{}_{}".format(*s[:6], "c" if s[6] else "nc"))
@pytest.mark.parametrize("ver,dtype,D", list(_cases()))
def test_version_matches_reference(ver, dtype, D, shape):
    B, Hq, Hkv, c_h, Nq, Nk, causal = shape
    np_dtype = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(hash((ver, dtype, D, shape)) % 2**32)
    q, k, v = random_qkv(rng, B, Hq, Hkv, Nq, Nk, D, dtype=np_dtype)
    cfg = UniSparseConfig(block_size=128, c_h=c_h, causal=causal)
    bm = random_mask(rng, B, Hq // c_h, Nq, Nk, 128, c_h, causal)
    out, lse = run(q, k, v, bm, ver)
    assert out.dtype == np_dtype
    assert_attention_matches_reference(out, lse, q, k, v, bm, cfg)


@pytest.mark.parametrize("ver", VERSIONS)
@pytest.mark.parametrize("causal", [True, False])
def test_dense_mode_matches_dense_reference(ver, causal):
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 1, 4, 2, 300, 389, 64, dtype=np.float16)
    counts, idx = dense_indices(1, 4, 300, 389, 128, causal)
    out, lse = attention_forward(
        to_device(q), to_device(k), to_device(v), counts, idx, nq=300, nk=389, block_size=128,
        heads_per_mask=1, causal=causal, softmax_scale=None, version=ver,
    )
    bm = BlockMask.full(1, 4, 300, 389, block_size=128, causal=causal)
    cfg = UniSparseConfig(block_size=128, causal=causal)
    assert_attention_matches_reference(cp.asnumpy(out), cp.asnumpy(lse), q, k, v, bm, cfg)
    r64, _ = ref.dense_attention(q, k, v, causal)
    r_bs, _ = ref.block_sparse_attention(q, k, v, bm, cfg)
    np.testing.assert_allclose(r64, r_bs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ver", VERSIONS)
def test_all_empty_mask_gives_zero_and_neg_inf(ver):
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 2, 1, 200, 200, 64, dtype=np.float16)
    bm = BlockMask(np.zeros((1, 2, 2, 2), dtype=bool), 128, 1, 200, 200, True)
    out, lse = run(q, k, v, bm, ver)
    assert np.all(out == 0)
    assert np.all(np.isneginf(lse))


@pytest.mark.parametrize("ver", VERSIONS)
def test_repeat_runs_bit_identical(ver):
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, 1, 8, 2, 700, 900, 128, dtype=BFLOAT16)
    bm = random_mask(rng, 1, 8, 700, 900, 128, 1, True, density=0.6)
    o1, l1 = run(q, k, v, bm, ver)
    o2, l2 = run(q, k, v, bm, ver)
    assert np.array_equal(o1.view(np.uint16), o2.view(np.uint16))
    assert np.array_equal(l1.view(np.uint32), l2.view(np.uint32))


@pytest.mark.parametrize("ver", [v for v in VERSIONS if KERNEL_VERSIONS[v].sorted_work])
def test_sorted_work_list_gives_identical_results(ver):
    """CTAs are independent: ordering them by row length changes no bit of the output."""
    rng = np.random.default_rng(13)
    q, k, v = random_qkv(rng, 2, 4, 2, 600, 777, 64, dtype=np.float16)
    bm = random_mask(rng, 2, 4, 600, 777, 128, 1, True, density=0.4)
    counts, idx = (cp.asarray(a) for a in bm.to_indices())
    res = []
    for sort_work in (False, True):
        out, lse = attention_forward(
            to_device(q), to_device(k), to_device(v), counts, idx, nq=600, nk=777, block_size=128,
            heads_per_mask=1, causal=True, softmax_scale=None, version=ver, sort_work=sort_work,
        )
        res.append((cp.asnumpy(out), cp.asnumpy(lse)))
    assert np.array_equal(res[0][0].view(np.uint16), res[1][0].view(np.uint16))
    assert np.array_equal(res[0][1].view(np.uint32), res[1][1].view(np.uint32))


@pytest.mark.parametrize("ver", VERSIONS)
def test_scale_and_block_size_64(ver):
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 2, 2, 150, 190, 64, dtype=np.float16)
    bm = random_mask(rng, 1, 2, 150, 190, 64, 1, True, density=0.7)
    cfg = UniSparseConfig(block_size=64, causal=True, softmax_scale=0.3)
    need = max(KERNEL_VERSIONS[ver].rows_per_cta(64), KERNEL_VERSIONS[ver].tile_keys())
    if KERNEL_VERSIONS[ver].tensor_core and 64 % need:
        with pytest.raises(ValueError, match="block_size"):
            run(q, k, v, bm, ver, softmax_scale=0.3)
        return
    out, lse = run(q, k, v, bm, ver, softmax_scale=0.3)
    assert_attention_matches_reference(out, lse, q, k, v, bm, cfg)


def test_default_version_and_errors():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 1, 2, 1, 64, 64, 48, dtype=np.float16)
    bm = random_mask(rng, 1, 2, 64, 64, 128, 1, True, density=1.0, empty_row=False)
    with pytest.raises(ValueError, match="head dim"):
        run(q, k, v, bm, 6)
    with pytest.raises(ValueError, match="version"):
        run(q, k, v, bm, 99)
    q32, k32, v32 = random_qkv(rng, 1, 2, 1, 64, 64, 64, dtype=np.float32)
    with pytest.raises(TypeError, match="supports"):
        run(q32, k32, v32, bm, 6)
    out, lse = run(q32, k32, v32, bm, None)  # float32 default: v1
    cfg = UniSparseConfig(block_size=128, causal=True)
    assert_attention_matches_reference(out, lse, q32, k32, v32, bm, cfg)


def test_v9_schedules_give_identical_results():
    """Rung v9's grids (persistent with the dynamic task counter, the default; persistent with a
    static stride; 3 CTAs walking every task; one CTA per task) compute every task the same way:
    the same bits out. (Checked by the retired development harness in GPU runs 2-3 of
    docs/gpu_results/fa3.md; this is its place in the suite.)"""
    if 9 not in VERSIONS or str(cp.cuda.Device().compute_capability) != "90":
        pytest.skip("rung v9 needs a Hopper GPU")
    from unisparse_ref.cupy_backend import _hopper

    rng = np.random.default_rng(17)
    q, k, v = random_qkv(rng, 1, 8, 2, 700, 900, 128, dtype=BFLOAT16)
    bm = random_mask(rng, 1, 8, 700, 900, 128, 1, True, density=0.5)
    counts, idx = (cp.asarray(a) for a in bm.to_indices())
    res = []
    for opts in ({}, {"schedule": "static"}, {"max_ctas": 3}, {"persistent": False}):
        out, lse = _hopper.fa3_forward(to_device(q), to_device(k), to_device(v), counts, idx, nq=700, nk=900,
                                       block_size=128, heads_per_mask=1, causal=True, softmax_scale=None, **opts)
        res.append((cp.asnumpy(out).view(np.uint16), cp.asnumpy(lse).view(np.uint32)))
    for o, l_ in res[1:]:
        assert np.array_equal(o, res[0][0]) and np.array_equal(l_, res[0][1])
