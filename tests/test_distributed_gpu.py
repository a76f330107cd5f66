"""GPU tests of context-parallel UniSparse with per-rank CuPy compute (``backend="cupy"``).

Every run is checked by :func:`unisparse_ref.distributed.verify.compare_stage_run` against the
one-device CuPy run (``unisparse_attention(..., backend=<cupy>)``) and the float64 reference:
masks equal or, where they differ, eps-valid under the reference scores; ``out`` and ``lse``
within SPEC 7; counted bytes equal to the formula with float32 composite keys and the input
dtype's K/V. Simulated 2, 3 and 4 ranks share the one GPU (threads, in turn); the NCCL
communicator runs with one rank. Ragged lengths, GQA with ``c_h = 2``, ``Nq < Nk`` with
``Nk - Nq`` not a multiple of ``S``; bf16 and fp16 at ``D = 128, S = 128`` (the Hopper rung),
float32 at ``D = 64, S = 64`` (the scalar rung).

Skipped without CuPy or a usable GPU; the NCCL test also without NCCL.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import unisparse_ref as us
from tests.conftest import cupy_backend_or_reason
from unisparse_ref import BFLOAT16, BackendUnavailable, UniSparseConfig
from unisparse_ref.distributed import (
    NcclComm,
    assemble,
    context_parallel_attention,
    make_plan,
    nccl_unique_id,
    shard_inputs,
    simulate_context_parallel,
)
from unisparse_ref.distributed.verify import compare_stage_run

cp = pytest.importorskip("cupy", reason="CuPy is not installed")

from unisparse_ref import cupy_backend as cb  # noqa: E402

BACKEND, _WHY = cupy_backend_or_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(BACKEND is None, reason=f"cupy backend unavailable: {_WHY}")]

# (B, Hq, Hkv, nq, nk, D, S, c_q, c_k, c_h, dtype)
CASES = {
    "bf16-ragged": (1, 8, 2, 2000, 2000, 128, 128, 16, 16, 1, BFLOAT16),
    "fp16-gqa-ch2-nq<nk": (2, 8, 2, 1500, 2333, 128, 128, 16, 16, 2, np.float16),
    "fp32-S64-prefix": (1, 4, 1, 1111, 1500, 64, 64, 16, 8, 1, np.float32),
}


def sparse_qkv(B, Hq, Hkv, nq, nk, D, S, dtype, seed=0, hot=0.1):
    """Gaussian q, k, v whose selection is sparse: a share ``hot`` of the key blocks carry a
    direction ``u`` (per KV head, norm sqrt(D)) that every query of that head also carries."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((1, Hkv, 1, D))
    u *= np.sqrt(D) / np.linalg.norm(u, axis=-1, keepdims=True)
    q = rng.standard_normal((B, Hq, nq, D)) + np.repeat(u, Hq // Hkv, axis=1)
    k = rng.standard_normal((B, Hkv, nk, D))
    v = rng.standard_normal((B, Hkv, nk, D))
    nkb = -(-nk // S)
    hot_blocks = rng.choice(nkb, max(1, int(hot * nkb)), replace=False)
    for j in hot_blocks:
        k[:, :, j * S : (j + 1) * S] += 0.7 * u
    return tuple(x.astype(dtype) for x in (q, k, v))


@functools.cache
def _problem(case):
    B, Hq, Hkv, nq, nk, D, S, cq, ck, ch, dt = CASES[case]
    q, k, v = sparse_qkv(B, Hq, Hkv, nq, nk, D, S, dt, seed=len(case))
    cfg = UniSparseConfig(block_size=S, c_q=cq, c_k=ck, c_h=ch, threshold=0.9)
    one = us.unisparse_attention(q, k, v, cfg, backend=BACKEND, return_details=True)
    return q, k, v, cfg, one, {}  # the last: compare_stage_run's cache of reference runs


def _device(x):
    """A host array on the GPU as the CuPy layer carries it (bf16 through as_bfloat16)."""
    if np.dtype(x.dtype) == BFLOAT16:
        return cb.as_bfloat16(cp.asarray(x.view(np.uint16)))
    return cp.asarray(x)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_simulated_ranks_on_one_gpu_equal_one_device(case, world_size):
    q, k, v, cfg, one, cache = _problem(case)
    res = simulate_context_parallel(*(_device(x) for x in (q, k, v)), cfg, world_size, backend="cupy")
    assert isinstance(res.lse, cp.ndarray) and isinstance(res.block_mask.mask, cp.ndarray)
    rep = compare_stage_run(res, one, q, k, v, cfg, BACKEND.score_eps, cache)
    assert not rep.failures, rep.summary()
    assert one.block_mask.density < 0.9  # the selection did drop blocks


@pytest.mark.parametrize("case", ["bf16-ragged", "fp16-gqa-ch2-nq<nk"])
def test_simulated_merge_on_one_gpu(case):
    """combine="merge": owned and fetched blocks attended apart, merged by lse on the device."""
    q, k, v, cfg, one, cache = _problem(case)
    res = simulate_context_parallel(q, k, v, cfg, 3, backend="cupy", combine="merge")  # host inputs, uploaded per rank
    rep = compare_stage_run(res, one, q, k, v, cfg, BACKEND.score_eps, cache)
    assert not rep.failures, rep.summary()


@pytest.mark.parametrize("case", list(CASES))
def test_one_rank_nccl_equals_one_device(case):
    try:
        comm = NcclComm(0, 1, nccl_unique_id())
    except BackendUnavailable as e:
        pytest.skip(f"NCCL unavailable: {e}")
    q, k, v, cfg, one, cache = _problem(case)
    try:
        plan = make_plan(q.shape[2], k.shape[2], cfg.block_size, cfg.causal, 1)
        shard = shard_inputs(*(_device(x) for x in (q, k, v)), plan)[0]
        res = assemble([context_parallel_attention(shard, plan, cfg, comm, backend="cupy")], plan, cfg)
    finally:
        comm.destroy()
    rep = compare_stage_run(res, one, q, k, v, cfg, BACKEND.score_eps, cache)
    assert not rep.failures, rep.summary()
    # one rank: the same stage calls on the same inputs as the one-device run
    assert rep.rows_differ == 0 and rep.out_bitwise_equal and rep.lse_bitwise_equal, rep.summary()


def test_per_rank_timings_and_device_shards():
    q, k, v, cfg, *_ = _problem("bf16-ragged")
    timings: list[dict[str, float]] = []
    res = simulate_context_parallel(*(_device(x) for x in (q, k, v)), cfg, 2, backend="cupy", timings=timings)
    assert len(timings) == 2 and all(t["attend"] > 0 and t["score_select"] > 0 for t in timings)
    assert np.dtype(res.out.dtype) == BFLOAT16 or isinstance(res.out, cb.BFloat16Array)
