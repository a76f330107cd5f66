"""GPU tests of the CuPy RawKernel layer: every stage against the NumPy reference.

* ``compress``: float32 pooling within SPEC 7's float32 rule;
* ``block_scores``: within the backend's declared ``score_eps`` of the float64 reference,
  including tile edge cases (RB > TR, KB > TC, one composite per block, ragged lengths);
* ``select_blocks``: on identical scores, the reference's mask (borderline rows excused),
  ties, P = 1, non-causal with Nq > Nk; the index form equals ``BlockMask.to_indices``;
* end to end: masks eps-valid under the reference scores, attention per SPEC 7;
* zero-copy DLPack / ``__cuda_array_interface__`` in and out (PyTorch, when installed);
* repeated runs bit-identical; clear errors for bad input;
* ``slow``: Nq = Nk = 131072, Hq = 32, Hkv = 8, D = 128, bf16, causal, whole pipeline,
  compared with the reference on sampled query blocks.

Skipped without CuPy or a usable GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import unisparse_ref as us
from tests.conftest import assert_attention_matches_reference, cupy_backend_or_reason, random_qkv
from unisparse_ref import BFLOAT16, BlockMask, UniSparseConfig, geometry
from unisparse_ref import reference as ref
from unisparse_ref.evaluation import workloads
from unisparse_ref.tolerance import attention_tolerance, check_attention, compare_selection, eps_valid_rows

cp = pytest.importorskip("cupy", reason="CuPy is not installed")

from unisparse_ref import cupy_backend as cb  # noqa: E402
from unisparse_ref.cupy_backend import _device, selection  # noqa: E402
from unisparse_ref.cupy_backend import scores as scores_stage  # noqa: E402

BACKEND, _WHY = cupy_backend_or_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(BACKEND is None, reason=f"cupy backend unavailable: {_WHY}")]

DTYPES = [np.float16, BFLOAT16, np.float32]


def _np(x) -> np.ndarray:
    return us.to_numpy(x)


def _raw(x):
    """The CuPy array behind a backend output (a BFloat16Array's uint16 bits)."""
    return x.data if isinstance(x, cb.BFloat16Array) else x


def _f32_close(got, want) -> None:
    """SPEC 7's float32 rule: ``max|got - want| <= 1e-5 * max|want|``."""
    g, w = np.asarray(_np(got), dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert g.shape == w.shape
    tol, _ = attention_tolerance(w, None, np.float32)
    err = float(np.max(np.abs(g - w))) if w.size else 0.0
    assert err <= tol, f"max error {err:.3e} > {tol:.3e}"


# ---------------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "B,Hq,Hkv,Nq,Nk,D,c_q,c_k,c_h",
    [(1, 4, 4, 128, 128, 64, 16, 16, 1), (2, 8, 2, 77, 300, 32, 16, 8, 2), (1, 6, 2, 33, 33, 128, 4, 32, 3)],
)
def test_compress_matches_reference(dtype, B, Hq, Hkv, Nq, Nk, D, c_q, c_k, c_h) -> None:
    rng = np.random.default_rng(0)
    q, k, _ = random_qkv(rng, B, Hq, Hkv, Nq, Nk, D, dtype)
    cfg = UniSparseConfig(block_size=32 if max(c_q, c_k) <= 32 else 64, c_q=c_q, c_k=c_k, c_h=c_h)
    q_c, k_c = BACKEND.compress(q, k, cfg)
    rq, rk = ref.compress(q, k, cfg)
    assert q_c.dtype == cp.float32 and k_c.dtype == cp.float32
    _f32_close(q_c, rq)
    _f32_close(k_c, rk)


# ---------------------------------------------------------------------------- stage 2
SCORE_CASES = [
    # B, Hm-shape via (Hq, Hkv, c_h), Nq, Nk, D, S, c_q, c_k, causal
    (1, 4, 4, 1, 512, 512, 64, 128, 16, 16, True),     # defaults, RB = KB = 8
    (2, 8, 2, 2, 300, 1000, 32, 64, 16, 8, True),      # Nq < Nk, ragged, GQA with c_h
    (1, 2, 1, 1, 260, 260, 64, 128, 1, 1, True),       # RB = KB = 128 > TR, TC
    (1, 2, 2, 1, 200, 333, 16, 16, 16, 16, False),     # RB = KB = 1, non-causal
    (1, 3, 1, 1, 129, 700, 40, 32, 2, 32, True),       # RB = 16, KB = 1, D not a multiple of 32
    (1, 2, 1, 1, 1000, 300, 32, 64, 8, 4, False),      # non-causal, Nq > Nk
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=[f"case{i}" for i in range(len(SCORE_CASES))])
def test_block_scores_match_reference(case) -> None:
    B, Hq, Hkv, c_h, Nq, Nk, D, S, c_q, c_k, causal = case
    rng = np.random.default_rng(1)
    q, k, _ = random_qkv(rng, B, Hq, Hkv, Nq, Nk, D, np.float32, scale=1.5)
    cfg = UniSparseConfig(block_size=S, c_q=c_q, c_k=c_k, c_h=c_h, causal=causal)
    rq, rk = ref.compress(q, k, cfg)
    want = ref.block_scores(rq, rk, cfg, Nq, Nk)
    got = BACKEND.block_scores(rq, rk, cfg, Nq, Nk)
    assert got.dtype == cp.float32 and tuple(got.shape) == want.shape
    err = float(np.max(np.abs(_np(got) - want)))
    assert err <= BACKEND.score_eps, f"max |scores - ref| = {err:.3e} > score_eps {BACKEND.score_eps:.1e}"
    rows = _np(got).astype(np.float64).sum(-1)
    assert np.allclose(rows, 1.0, atol=1e-5), f"rows must sum to 1, got {rows.min()}..{rows.max()}"
    # Blocks no composite query of the row sees are exactly zero.
    vis = geometry.visible_blocks(Nq, Nk, S, causal)
    assert np.all(_np(got)[..., ~vis] == 0.0)


@pytest.mark.parametrize("case", SCORE_CASES[:3], ids=[f"case{i}" for i in range(3)])
def test_block_scores_repeats_and_chunks_are_bit_identical(case, monkeypatch) -> None:
    """The one-pass kernel (global scratch): the same bits on every run and in chunks of one head."""
    B, Hq, Hkv, c_h, Nq, Nk, D, S, c_q, c_k, causal = case
    rng = np.random.default_rng(3)
    q, k, _ = random_qkv(rng, B, Hq, Hkv, Nq, Nk, D, np.float32, scale=1.5)
    cfg = UniSparseConfig(block_size=S, c_q=c_q, c_k=c_k, c_h=c_h, causal=causal)
    rq, rk = ref.compress(q, k, cfg)
    runs = [_np(BACKEND.block_scores(rq, rk, cfg, Nq, Nk)) for _ in range(2)]
    monkeypatch.setattr(scores_stage, "SCRATCH_BYTES", 1)  # one mask head per launch
    runs.append(_np(BACKEND.block_scores(rq, rk, cfg, Nq, Nk)))
    for r in runs[1:]:
        assert r.tobytes() == runs[0].tobytes()


# ---------------------------------------------------------------------------- stage 3
SELECT_CASES = [
    # Nq, Nk, S, P, n_sink, n_local, causal
    (1024, 1024, 64, 0.9, 1, 1, True),
    (500, 2000, 32, 0.5, 2, 3, True),
    (300, 300, 16, 1.0, 1, 1, True),
    (700, 200, 32, 0.7, 1, 2, False),
    (2000, 2000, 16, 0.95, 0, 0, True),
]


@pytest.mark.parametrize("score_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", SELECT_CASES, ids=[f"case{i}" for i in range(len(SELECT_CASES))])
def test_select_blocks_same_scores(case, score_dtype) -> None:
    Nq, Nk, S, P, ns, nl, causal = case
    cfg = UniSparseConfig(block_size=S, c_q=S // 4 or 1, c_k=S // 4 or 1, threshold=P, n_sink_blocks=ns,
                          n_local_blocks=nl, causal=causal)
    rng = np.random.default_rng(2)
    nqb, nkb = geometry.num_blocks(Nq, S), geometry.num_blocks(Nk, S)
    vis = geometry.visible_blocks(Nq, Nk, S, causal)
    raw = rng.exponential(size=(2, 3, nqb, nkb)) ** 3
    raw[0, 0] = np.round(raw[0, 0], 1) + 0.1  # many exact ties: lower j first
    raw = np.where(vis, raw, 0.0)
    scores = (raw / raw.sum(-1, keepdims=True)).astype(score_dtype)
    want = ref.select_blocks(scores, cfg, Nq, Nk)
    got = BACKEND.select_blocks(cp.asarray(scores), cfg, Nq, Nk)
    assert isinstance(got.mask, cp.ndarray) and got.mask.dtype == cp.bool_
    res = compare_selection(got, want, ref.selection_margin(scores, cfg, Nq, Nk))
    assert res.ok, res.message()
    # The selector adds in float64 in the reference's order: bit-identical masks.
    assert np.array_equal(_np(got.mask), want.mask)
    bm, counts, idx = BACKEND.select_blocks_indices(scores, cfg, Nq, Nk)
    wc, wi = want.to_indices()
    assert np.array_equal(_np(bm.mask), want.mask)
    assert np.array_equal(_np(counts), wc) and np.array_equal(_np(idx), wi)


def test_mask_to_indices_matches_blockmask() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((2, 3, 9, 600)) < 0.3
    counts, idx = selection.launch_mask_to_indices(cp.asarray(mask))
    bm = BlockMask(mask, 16, 1, 9 * 16, 600 * 16, causal=False)
    wc, wi = bm.to_indices()
    assert np.array_equal(_np(counts), wc) and np.array_equal(_np(idx), wi)


# ---------------------------------------------------------------------------- stage 4 and pipeline
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_and_dense_attention(dtype, causal) -> None:
    rng = np.random.default_rng(4)
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 200, 330, 64
    q, k, v = random_qkv(rng, B, Hq, Hkv, Nq, Nk, D, dtype)
    cfg = UniSparseConfig(block_size=64, c_h=2, causal=causal)
    nqb, nkb = geometry.num_blocks(Nq, 64), geometry.num_blocks(Nk, 64)
    mask = rng.random((B, 2, nqb, nkb)) < 0.5
    mask[0, 0, 1] = False  # a query block with no key block: out 0, lse -inf
    bm = BlockMask(mask, 64, 2, Nq, Nk, causal)
    out, lse = BACKEND.block_sparse_attention(q, k, v, bm, cfg)
    assert us.to_numpy(out).dtype == np.dtype(dtype)
    assert_attention_matches_reference(out, lse, q, k, v, bm, cfg)
    out_d, lse_d = BACKEND.dense_attention(q, k, v, causal=causal)
    full = BlockMask.full(B, Hq, Nq, Nk, block_size=64, causal=causal)
    assert_attention_matches_reference(out_d, lse_d, q, k, v, full, UniSparseConfig(block_size=64, causal=causal))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_pipeline_masks_are_eps_valid(dtype) -> None:
    w = workloads.structured_workload(2048, batch=2, q_heads=8, kv_heads=2, head_dim=64, n_queries=1500, seed=5)
    q, k, v = (x.astype(dtype) for x in (w.q, w.k, w.v))
    cfg = UniSparseConfig(block_size=64, c_q=8, c_k=16, c_h=2, threshold=0.9)
    res = us.unisparse_attention(q, k, v, cfg, backend=BACKEND, return_details=True)
    rq, rk = ref.compress(q, k, cfg)
    ref_scores = ref.block_scores(rq, rk, cfg, q.shape[2], k.shape[2])
    ok = eps_valid_rows(res.block_mask, ref_scores, cfg, q.shape[2], k.shape[2], BACKEND.score_eps)
    assert ok.all(), f"{int((~ok).sum())} rows not eps-valid, first {np.argwhere(~ok)[:5].tolist()}"
    assert res.block_mask.density < 1.0
    assert_attention_matches_reference(res.out, res.lse, q, k, v, res.block_mask.numpy(), cfg)


def test_fused_pipeline_equals_the_four_stages() -> None:
    """CupyBackend.unisparse_attention (one input check, the selection's index form) = the stage calls."""
    rng = np.random.default_rng(12)
    q, k, v = random_qkv(rng, 2, 8, 2, 1500, 1700, 128, BFLOAT16)
    cfg = UniSparseConfig(block_size=64, c_q=8, c_k=16, c_h=2, threshold=0.85)
    out, lse, bm, sc, qc, kc = BACKEND.unisparse_attention(q, k, v, cfg)
    qc2, kc2 = BACKEND.compress(q, k, cfg)
    sc2 = BACKEND.block_scores(qc2, kc2, cfg, 1500, 1700)
    bm2 = BACKEND.select_blocks(sc2, cfg, 1500, 1700)
    out2, lse2 = BACKEND.block_sparse_attention(q, k, v, bm2, cfg)
    for a, b in ((qc, qc2), (kc, kc2), (sc, sc2), (bm.mask, bm2.mask), (out, out2), (lse, lse2)):
        assert np.array_equal(us.to_numpy(a), us.to_numpy(b))
    bad = us.to_numpy(v).copy()
    bad[1, 0, 5, 3] = np.nan
    with pytest.raises(ValueError, match="v holds non-finite"):
        BACKEND.unisparse_attention(q, k, bad, cfg)


def test_repeat_runs_are_bit_identical() -> None:
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, 1, 8, 2, 1000, 1000, 64, BFLOAT16)
    cfg = UniSparseConfig(block_size=64, c_q=8, c_k=8, threshold=0.8)
    runs = [us.unisparse_attention(q, k, v, cfg, backend=BACKEND, return_details=True) for _ in range(3)]
    for r in runs[1:]:
        for name in ("q_c", "k_c", "scores", "out", "lse"):
            a, b = _np(getattr(runs[0], name)), _np(getattr(r, name))
            assert a.tobytes() == b.tobytes(), f"{name} differs between runs"
        assert np.array_equal(_np(r.block_mask.mask), _np(runs[0].block_mask.mask))


# ---------------------------------------------------------------------------- interop
class _CAIOnly:
    """An object exposing only ``__cuda_array_interface__`` (like a Numba device array)."""

    def __init__(self, a) -> None:
        self._a = a
        self.__cuda_array_interface__ = a.__cuda_array_interface__


def test_cuda_array_interface_is_zero_copy() -> None:
    x = cp.random.standard_normal((1, 2, 64, 32), dtype=cp.float32)
    arr, dt = _device.device_input("q", _CAIOnly(x))
    assert dt == np.float32 and arr.data.ptr == x.data.ptr


def test_torch_dlpack_in_and_out_is_zero_copy() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    for tdt, ndt in ((torch.float16, np.float16), (torch.bfloat16, BFLOAT16), (torch.float32, np.float32)):
        q = torch.randn(1, 4, 256, 64, device="cuda", dtype=tdt)
        k = torch.randn(1, 2, 256, 64, device="cuda", dtype=tdt)
        v = torch.randn(1, 2, 256, 64, device="cuda", dtype=tdt)
        arr, dt = _device.device_input("q", q)
        assert dt == ndt and arr.data.ptr == q.data_ptr(), "q must be viewed, not copied"
        cfg = UniSparseConfig(block_size=64)
        res = us.unisparse_attention(q, k, v, cfg, backend=BACKEND, return_details=True)
        try:
            t_out = torch.from_dlpack(_raw(res.out))
        except Exception:  # a CuPy that cannot export bf16 through DLPack: the uint16 bits
            t_out = torch.from_dlpack(_raw(res.out).view(cp.uint16)).view(torch.bfloat16)
        assert t_out.data_ptr() == _raw(res.out).data.ptr, "out must be handed to torch without a copy"
        qn, kn, vn = (us.to_numpy(x) for x in (q, k, v))
        assert us.to_numpy(res.out).dtype == np.dtype(ndt)
        assert_attention_matches_reference(res.out, res.lse, qn, kn, vn, res.block_mask.numpy(), cfg)
    # A non-contiguous tensor is made contiguous (a copy) with the same result.
    q = torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.float16).transpose(1, 2)
    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.float16)
    a, _ = BACKEND.compress(q, k, UniSparseConfig(block_size=64))
    b, _ = BACKEND.compress(q.contiguous(), k, UniSparseConfig(block_size=64))
    assert _np(a).tobytes() == _np(b).tobytes()


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors() -> None:
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 1, 2, 1, 64, 64, 32, np.float32)
    cfg = UniSparseConfig(block_size=32)
    with pytest.raises(TypeError, match="q has dtype float64"):
        BACKEND.compress(q.astype(np.float64), k.astype(np.float64), cfg)
    with pytest.raises(TypeError, match="as_bfloat16"):
        BACKEND.compress(cp.zeros((1, 2, 64, 32), dtype=cp.uint16), k, cfg)
    with pytest.raises(TypeError, match="k has dtype"):
        BACKEND.compress(q, k.astype(np.float16), cfg)
    bad = q.copy()
    bad[0, 1, 5, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        BACKEND.compress(bad, k, cfg)
    with pytest.raises(ValueError, match="non-finite"):
        BACKEND.dense_attention(bad, k, v)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        BACKEND.compress(np.zeros((1, 2, 80, 32), np.float32), k, cfg)
    with pytest.raises(ValueError, match="scores must"):
        BACKEND.select_blocks(-np.ones((1, 2, 2, 2)), cfg, 64, 64)
    with pytest.raises(TypeError, match="must be a CuPy or NumPy array"):
        BACKEND.compress([[1.0]], k, cfg)


def test_bfloat16_output_is_readable() -> None:
    rng = np.random.default_rng(8)
    q, k, v = random_qkv(rng, 1, 2, 1, 64, 64, 32, BFLOAT16)
    out, lse = BACKEND.dense_attention(q, k, v)
    assert us.to_numpy(out).dtype == BFLOAT16
    bits = cp.asarray(q.view(np.uint16))
    assert us.to_numpy(cb.as_bfloat16(bits)).tobytes() == q.tobytes()


# ---------------------------------------------------------------------------- scale
@pytest.mark.slow
def test_131072_tokens_bf16_causal_sampled_against_reference() -> None:
    """Nq = Nk = 131072, Hq = 32, Hkv = 8, D = 128, bf16, causal, defaults of SPEC 2."""
    N, Hq, Hkv, D = 131072, 32, 8, 128
    G = Hq // Hkv
    cfg = UniSparseConfig()  # S = 128, c_q = c_k = 16, P = 0.9, causal
    S = cfg.block_size
    rs = cp.random.RandomState(11)

    def bf16(shape, scale=1.0):
        x = (rs.standard_normal(shape, dtype=cp.float32) * scale).astype(cp.float32)
        bits = (x.view(cp.uint32) + cp.uint32(0x7FFF) + ((x.view(cp.uint32) >> 16) & 1)) >> 16  # RNE
        return cb.as_bfloat16(bits.astype(cp.uint16))

    q, k, v = bf16((1, Hq, N, D), 1.0), bf16((1, Hkv, N, D), 1.0), bf16((1, Hkv, N, D))
    res = us.unisparse_attention(q, k, v, cfg, backend=BACKEND, return_details=True)
    cp.cuda.Device().synchronize()
    out, lse = res.out, res.lse
    assert _device.count_nonfinite(_raw(out).view(cp.uint16), BFLOAT16) == 0
    assert tuple(lse.shape) == (1, Hq, N) and not bool(cp.isnan(lse).any())
    mask = res.block_mask.mask
    nqb = N // S
    qn, kn, vn = (x.get() if hasattr(x, "get") else us.to_numpy(x) for x in (q, k, v))
    q_c, k_c = _np(res.q_c), _np(res.k_c)
    RB = S // cfg.c_q
    out_h = _np(out)
    for kv in (0, Hkv - 1):
        heads = slice(kv * G, (kv + 1) * G)
        for i in (0, nqb // 2, nqb - 1):
            nk_i = (i + 1) * S  # queries of block i are the last S of a sequence of nk_i keys
            sub = UniSparseConfig(block_size=S, c_q=cfg.c_q, c_k=cfg.c_k)
            rq = ref.compress(qn[:, heads, i * S:(i + 1) * S], kn[:, kv:kv + 1, :nk_i], sub)
            # The backend's composites for the sample equal the reference's (float32 rule).
            _f32_close(q_c[:, heads, i * RB:(i + 1) * RB], rq[0])
            _f32_close(k_c[:, kv:kv + 1, :nk_i // cfg.c_k], rq[1])
            ref_scores = ref.block_scores(rq[0], rq[1], sub, S, nk_i)  # [1, G, 1, i+1]
            m = _np(mask[:, heads, i:i + 1, :i + 1])
            ok = eps_valid_rows(m, ref_scores, sub, S, nk_i, BACKEND.score_eps)
            assert ok.all(), f"block {i}, kv head {kv}: mask not eps-valid"
            bm = BlockMask(m, S, 1, S, nk_i, True)
            args = (qn[:, heads, i * S:(i + 1) * S], kn[:, kv:kv + 1, :nk_i], vn[:, kv:kv + 1, :nk_i], bm, sub)
            ref64, _ = ref.block_sparse_attention(*args)
            lp, _ = ref.block_sparse_attention(*args, precision=BFLOAT16)
            got = out_h[:, heads, i * S:(i + 1) * S]
            chk = check_attention(got, ref64, lp, BFLOAT16)
            assert chk.ok, f"block {i}, kv head {kv}: {chk.message()}"
