"""Bad input raises ValueError / TypeError naming the argument; nothing is broadcast or truncated."""

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref import BlockMask, UniSparseConfig
from unisparse_ref import reference as ref


def _qkv(B=1, Hq=2, Hkv=1, Nq=20, Nk=20, D=16, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((B, Hq, Nq, D)).astype(dtype),
            rng.standard_normal((B, Hkv, Nk, D)).astype(dtype),
            rng.standard_normal((B, Hkv, Nk, D)).astype(dtype))


CFG = UniSparseConfig(block_size=16, c_q=4, c_k=4)


def _pipeline(backend, q, k, v, cfg=CFG):
    return us.unisparse_attention(q, k, v, cfg, backend=backend)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v: (q[0], k, v), "q must have rank 4"),
        (lambda q, k, v: (q, k[0], v), "k must have rank 4"),
        (lambda q, k, v: (q, k, v[..., :8]), "v must have the shape of k"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), "head dim"),
        (lambda q, k, v: (np.concatenate([q, q]), k, v), "batch"),
        (lambda q, k, v: (q[:, :1], np.concatenate([k, k], 1), np.concatenate([v, v], 1)), "multiple of k/v heads"),
        (lambda q, k, v: (q, k[:, :, :10], v[:, :, :10]), "Nq <= Nk"),
        (lambda q, k, v: (q[:, :, :0], k, v), "at least one query"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "Nq <= Nk|at least one key"),
    ],
)
def test_shape_errors_name_the_argument(backend, change, match):
    q, k, v = change(*_qkv())
    with pytest.raises(ValueError, match=match):
        _pipeline(backend, q, k, v)
    with pytest.raises(ValueError, match=match):
        backend.dense_attention(q, k, v, causal=True)


def test_empty_key_sequence_non_causal(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="at least one key"):
        backend.dense_attention(q, k[:, :, :0], v[:, :, :0], causal=False)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_, np.float128 if hasattr(np, "float128") else np.int8])
def test_unsupported_dtypes_raise_type_error(backend, dtype):
    q, k, v = (x.astype(dtype) for x in _qkv())
    with pytest.raises(TypeError, match="dtype"):
        _pipeline(backend, q, k, v)


def test_mixed_dtypes_raise_type_error(backend):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="dtype"):
        backend.dense_attention(q.astype(np.float16), k, v)


def test_backend_refuses_dtypes_it_does_not_declare(backend):
    for dt in us.SUPPORTED_DTYPES:
        if dt not in backend.supported_dtypes:
            q, k, v = _qkv(dtype=dt)
            with pytest.raises(TypeError, match=str(dt)):
                backend.dense_attention(q, k, v)


def test_c_h_must_divide_group_size(backend):
    q, k, v = _qkv(Hq=2, Hkv=2)  # G = 1
    with pytest.raises(ValueError, match="c_h"):
        _pipeline(backend, q, k, v, UniSparseConfig(block_size=16, c_q=4, c_k=4, c_h=2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_reference_rejects_non_finite_values(which, bad):
    qkv = list(_qkv())
    qkv[which][0, 0, 3, 5] = bad
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"{name} holds a non-finite value at index \(0, 0, 3, 5\)"):
        ref.dense_attention(*qkv)


def test_block_mask_must_match_inputs(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="nq=.*nk="):
        backend.block_sparse_attention(q, k, v, BlockMask.full(1, 2, 20, 40, block_size=16), CFG)
    with pytest.raises(ValueError, match="block_size"):
        backend.block_sparse_attention(q, k, v, BlockMask.full(1, 2, 20, 20, block_size=32), CFG)
    with pytest.raises(ValueError, match="mask heads"):
        backend.block_sparse_attention(q, k, v, BlockMask.full(1, 3, 20, 20, block_size=16), CFG)
    with pytest.raises(ValueError, match="batch"):
        backend.block_sparse_attention(q, k, v, BlockMask.full(2, 2, 20, 20, block_size=16), CFG)
    with pytest.raises(ValueError, match="causal"):
        backend.block_sparse_attention(q, k, v, BlockMask.full(1, 2, 20, 20, block_size=16, causal=False), CFG)


def test_scores_and_composites_are_checked(backend):
    q, k, v = _qkv()
    q_c, k_c = ref.compress(q, k, CFG)
    with pytest.raises(ValueError, match="composite queries"):
        backend.block_scores(q_c[:, :, :2], k_c, CFG, 20, 20)
    s = ref.block_scores(q_c, k_c, CFG, 20, 20)
    with pytest.raises(ValueError, match="scores must have shape"):
        backend.select_blocks(s[..., :1], CFG, 20, 20)


def test_config_type_checked():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="UniSparseConfig"):
        us.unisparse_attention(q, k, v, {"threshold": 0.5})


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        us.get_backend("torch")


def test_blockmask_validation():
    with pytest.raises(ValueError, match="rank 4"):
        BlockMask(np.ones((2, 2), bool), 16, 1, 20, 20)
    with pytest.raises(TypeError, match="bool"):
        BlockMask(np.ones((1, 1, 2, 2), np.int8), 16, 1, 20, 20)
    with pytest.raises(ValueError, match=r"expected \(nQb, nKb\) = \(2, 2\)"):
        BlockMask(np.ones((1, 1, 2, 3), bool), 16, 1, 20, 20)
    with pytest.raises(ValueError, match="nq <= nk"):
        BlockMask(np.ones((1, 1, 2, 1), bool), 16, 1, 20, 10)
