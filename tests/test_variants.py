"""The research variants of the estimator in every layer (issue 15), one test body per backend.

Each variant of :class:`~unisparse_ref.UniSparseConfig` (``threshold_mode="remaining"``,
``sink_tokens``, ``diagonal_correction``), their combinations and
:meth:`~unisparse_ref.UniSparseConfig.calibrated` against the NumPy reference:

* scores (from the backend's own composite tokens, and from the reference's) within the
  backend's ``score_eps``;
* selection on identical scores equal to the reference's except borderline rows
  (:func:`unisparse_ref.tolerance.compare_selection`, margins from the reference);
* the whole pipeline: masks eps-valid under the reference's scores (SPEC section 7, with ``P``
  applied to the remaining mass in ``"remaining"`` mode) and attention within SPEC section 7.

The reference's packed (varlen) and paged paths: ``threshold_mode`` and
``diagonal_correction`` work there (each sequence is its own problem): varlen equals the
per-sequence calls and paged equals varlen, bit for bit; ``sink_tokens`` is refused on both
with ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref import geometry
from unisparse_ref import reference as ref
from unisparse_ref.config import UniSparseConfig
from unisparse_ref.tolerance import compare_selection, eps_valid_rows

from .conftest import SIM, assert_attention_matches_reference, random_qkv

#: name -> research options (``None``: :meth:`UniSparseConfig.calibrated`).
VARIANTS: dict[str, dict | None] = {
    "remaining": {"threshold_mode": "remaining"},
    "sink3": {"sink_tokens": 3},
    "diag": {"diagonal_correction": True},
    "sink3+diag": {"sink_tokens": 3, "diagonal_correction": True},
    "diag+remaining": {"diagonal_correction": True, "threshold_mode": "remaining"},
    "all": {"sink_tokens": 3, "diagonal_correction": True, "threshold_mode": "remaining"},
    "calibrated": None,
}

#: (B, Hq, Hkv, Nq, Nk, D) and the geometry fields: a bottom-right causal offset with ragged
#: tails, GQA with head pooling, a short key tail (sinks inside a short first group is
#: ``test_variant_scores_tiny``), and a non-causal case.
GEOMETRIES = {
    "causal": ((1, 4, 2, 72, 136, 16), {"block_size": 32, "c_q": 8, "c_k": 8, "c_h": 2}),
    "noncausal": ((2, 2, 1, 56, 80, 16), {"block_size": 16, "c_q": 4, "c_k": 8, "causal": False}),
}
if not SIM:  # larger where the kernels run on a GPU or in NumPy
    GEOMETRIES["causal_large"] = ((2, 8, 2, 700, 1100, 64),
                                  {"block_size": 64, "c_q": 16, "c_k": 16, "c_h": 2, "threshold": 0.8})


def variant_config(name: str, geometry_fields: dict, **extra: object) -> UniSparseConfig:
    """The config of variant ``name`` on a geometry (``calibrated()`` keeps its own ``P`` unless given)."""
    options = VARIANTS[name]
    if options is None:
        fields = {k: v for k, v in geometry_fields.items() if k != "threshold"}
        return UniSparseConfig.calibrated(**{**fields, **extra})
    return UniSparseConfig(**{**geometry_fields, **extra, **options})


def eps_valid(mask, scores, config: UniSparseConfig, nq: int, nk: int, eps: float) -> np.ndarray:
    """SPEC section 7's eps-valid rows, ``[B, Hm, nQb]``; in ``"remaining"`` mode against the row's target.

    :func:`unisparse_ref.tolerance.eps_valid_rows` states the rule for SPEC's total-mass
    threshold; in ``"remaining"`` mode the same four conditions hold with the kept mass
    replaced by the kept candidates' mass and ``P`` by ``target = P * (T - m_F)``.
    """
    if config.threshold_mode == "total" or config.threshold >= 1.0:
        return eps_valid_rows(mask, scores, config, nq, nk, eps)
    m = np.asarray(us.to_numpy(getattr(mask, "mask", mask)), dtype=bool)
    s = np.asarray(us.to_numpy(scores), dtype=np.float64)
    S = config.block_size
    vis = np.broadcast_to(geometry.visible_blocks(nq, nk, S, config.causal), s.shape)
    forced = np.broadcast_to(
        geometry.forced_blocks(nq, nk, S, config.n_sink_blocks, config.n_local_blocks, config.causal), s.shape)
    target = config.threshold * (np.where(vis, s, 0.0).sum(-1) - np.where(forced, s, 0.0).sum(-1))
    kept = m & vis
    cand = kept & ~forced
    mass = np.where(cand, s, 0.0).sum(-1)
    lowest = np.where(cand, s, np.inf).min(-1)
    highest_out = np.where(vis & ~kept, s, -np.inf).max(-1)
    forced_ok = (~forced | kept).all(-1)
    mass_ok = mass >= target - eps
    minimal_ok = np.where(np.isfinite(lowest), mass - lowest < target + eps, True)
    order_ok = np.where(np.isfinite(lowest), highest_out <= lowest + eps, True)
    return forced_ok & mass_ok & minimal_ok & order_ok


def _eps(backend) -> float:
    return max(backend.score_eps, 1e-12)


# ------------------------------------------------------------------ stages 1-2: scores
@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_scores_match_reference(backend, name: str, geom: str) -> None:
    (B, Hq, Hkv, Nq, Nk, D), fields = GEOMETRIES[geom]
    cfg = variant_config(name, fields)
    q, k, _ = random_qkv(np.random.default_rng(7), B, Hq, Hkv, Nq, Nk, D)
    rq_c, rk_c = ref.compress(q, k, cfg)
    rscores = ref.block_scores(rq_c, rk_c, cfg, Nq, Nk)
    # the backend's own stages 1 and 2
    q_c, k_c = backend.compress(q, k, cfg)
    assert tuple(k_c.shape) == rk_c.shape and tuple(q_c.shape) == rq_c.shape
    scores = np.asarray(us.to_numpy(backend.block_scores(q_c, k_c, cfg, Nq, Nk)), dtype=np.float64)
    err = float(np.abs(scores - rscores).max())
    assert err <= _eps(backend), f"{name}: scores differ from the reference by {err:.3e} > score_eps"
    # stage 2 alone, on the reference's composite tokens
    scores2 = np.asarray(us.to_numpy(backend.block_scores(rq_c, rk_c, cfg, Nq, Nk)), dtype=np.float64)
    err2 = float(np.abs(scores2 - rscores).max())
    assert err2 <= _eps(backend), f"{name}: scores on the reference's composites differ by {err2:.3e}"
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=0, atol=_eps(backend) * scores.shape[-1])
    vis = geometry.visible_blocks(Nq, Nk, cfg.block_size, cfg.causal)
    assert (scores[..., ~vis] == 0).all()


@pytest.mark.parametrize(("nq", "nk"), [(5, 5), (3, 9), (40, 40)])
def test_variant_scores_tiny(backend, nq: int, nk: int) -> None:
    # Fewer keys than c_k (composite 0 is short; with t = 3 and nk = 5 it holds keys 3, 4 only)
    # and fewer than t + 1 keys visible to the first query group.
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8, sink_tokens=3, diagonal_correction=True,
                          threshold_mode="remaining")
    q, k, _ = random_qkv(np.random.default_rng(nq * 31 + nk), 1, 2, 1, nq, nk, 8)
    rscores = ref.block_scores(*ref.compress(q, k, cfg), cfg, nq, nk)
    scores = np.asarray(us.to_numpy(backend.block_scores(*backend.compress(q, k, cfg), cfg, nq, nk)))
    assert float(np.abs(scores - rscores).max()) <= _eps(backend)


def test_sink_keys_must_be_in_front(backend) -> None:
    cfg = UniSparseConfig(block_size=32, c_k=8, sink_tokens=2)
    q, k, _ = random_qkv(np.random.default_rng(0), 1, 2, 1, 64, 64, 8)
    q_c, k_c = ref.compress(q, k, UniSparseConfig(block_size=32, c_k=8))  # SPEC keys: no sinks in front
    # a shape error, or the refusal of a layer without sink_tokens (never a silent result)
    with pytest.raises((ValueError, NotImplementedError), match="composite keys|sink_tokens"):
        backend.block_scores(q_c, k_c, cfg, 64, 64)


# ------------------------------------------------------------------ stage 3: selection
@pytest.mark.parametrize("P", [0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("name", ["remaining", "diag+remaining", "calibrated"])
@pytest.mark.parametrize("geom", list(GEOMETRIES))
def test_variant_selection_on_identical_scores(backend, name: str, geom: str, P: float) -> None:
    (B, Hq, Hkv, Nq, Nk, D), fields = GEOMETRIES[geom]
    cfg = variant_config(name, fields, threshold=P)
    S = cfg.block_size
    nqb, nkb = geometry.num_blocks(Nq, S), geometry.num_blocks(Nk, S)
    vis = geometry.visible_blocks(Nq, Nk, S, cfg.causal)
    rng = np.random.default_rng(int(P * 100))
    raw = rng.exponential(size=(B, Hq // cfg.c_h, nqb, nkb)) ** 3 * vis
    scores = raw / raw.sum(axis=-1, keepdims=True)
    bm = backend.select_blocks(scores, cfg, Nq, Nk)
    rmask = ref.select_blocks(scores, cfg, Nq, Nk).mask
    res = compare_selection(us.to_numpy(bm.mask), rmask, ref.selection_margin(scores, cfg, Nq, Nk))
    assert res.ok, res.message()
    assert eps_valid(bm, scores, cfg, Nq, Nk, _eps(backend)).all()


def test_remaining_selection_hand_made(backend) -> None:
    # The reference's hand-made row (tests/test_calibration.py): forced 0.5, target 0.375.
    row = np.asarray([0.25, 0.25, 0.125, 0.125, 0.25])[None, None, None, :]
    rem = UniSparseConfig(block_size=64, threshold=0.75, threshold_mode="remaining")
    assert us.to_numpy(backend.select_blocks(row, rem, 64, 320).mask)[0, 0, 0].tolist() == [True, True, True, False,
                                                                                          True]
    forced_only = np.asarray([0.5, 0.0, 0.0, 0.0, 0.5])[None, None, None, :]
    assert us.to_numpy(backend.select_blocks(forced_only, rem, 64, 320).mask)[0, 0, 0].tolist() == [
        True, False, False, False, True]


# ------------------------------------------------------------------ the pipeline
_PIPELINE = ["remaining", "sink3+diag", "all", "calibrated"] if SIM else list(VARIANTS)


@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("name", _PIPELINE)
def test_variant_pipeline(backend, name: str, geom: str) -> None:
    (B, Hq, Hkv, Nq, Nk, D), fields = GEOMETRIES[geom]
    cfg = variant_config(name, fields)
    dtype = np.float16 if np.dtype(np.float16) in backend.supported_dtypes else np.float32
    q, k, v = random_qkv(np.random.default_rng(11), B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
    r = us.unisparse_attention(q, k, v, cfg, backend=backend, return_details=True)
    rscores = ref.block_scores(*ref.compress(q, k, cfg), cfg, Nq, Nk)
    valid = eps_valid(r.block_mask, rscores, cfg, Nq, Nk, _eps(backend))
    assert valid.all(), f"{name}: rows not eps-valid: {np.argwhere(~valid)[:5].tolist()}"
    assert_attention_matches_reference(r.out, r.lse, q, k, v, r.block_mask.numpy(), cfg)


# ------------------------------------------------------------------ reference: varlen and paged
def _packed(seed: int = 3):
    rng = np.random.default_rng(seed)
    lq, lk = [40, 0, 70], [90, 20, 70]
    q = rng.standard_normal((sum(lq), 4, 16)).astype(np.float32)
    k = rng.standard_normal((sum(lk), 2, 16)).astype(np.float32)
    v = rng.standard_normal((sum(lk), 2, 16)).astype(np.float32)
    return q, k, v, np.cumsum([0, *lq]), np.cumsum([0, *lk])


@pytest.mark.parametrize("name", ["remaining", "diag", "diag+remaining"])
def test_reference_varlen_with_variants_equals_per_sequence(name: str) -> None:
    q, k, v, cu_q, cu_k = _packed()
    cfg = variant_config(name, {"block_size": 16, "c_q": 4, "c_k": 8, "threshold": 0.8})
    res = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, backend="numpy", return_details=True)
    out = np.asarray(us.to_numpy(res.out))
    for i in range(cu_q.size - 1):
        if cu_q[i + 1] == cu_q[i]:
            continue
        qi = np.swapaxes(q[cu_q[i]:cu_q[i + 1]], 0, 1)[None]
        ki = np.swapaxes(k[cu_k[i]:cu_k[i + 1]], 0, 1)[None]
        vi = np.swapaxes(v[cu_k[i]:cu_k[i + 1]], 0, 1)[None]
        want = np.asarray(us.unisparse_attention(qi, ki, vi, cfg, backend="numpy"))
        np.testing.assert_array_equal(np.swapaxes(want[0], 0, 1), out[cu_q[i]:cu_q[i + 1]])


def _cache(cfg: UniSparseConfig, k: np.ndarray, v: np.ndarray, cu_k: np.ndarray) -> us.PagedKVCache:
    page_size = 16
    num_pages = sum(-(-int(n) // page_size) for n in np.diff(cu_k)) + 2
    cache = us.PagedKVCache.for_config(cfg, num_pages, page_size, k.shape[1], k.shape[2], batch=cu_k.size - 1,
                                       page_order=np.random.default_rng(5).permutation(num_pages))
    cache.append_varlen(k, v, cu_k)
    return cache


@pytest.mark.parametrize("name", ["remaining", "diag", "diag+remaining"])
def test_reference_paged_with_variants_equals_varlen(name: str) -> None:
    q, k, v, cu_q, cu_k = _packed()
    cfg = variant_config(name, {"block_size": 16, "c_q": 4, "c_k": 8, "threshold": 0.8})
    contiguous = us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, backend="numpy", return_details=True)
    paged = us.unisparse_attention_paged(q, _cache(cfg, k, v, cu_k), cu_q, cfg, backend="numpy",
                                         return_details=True)
    for field in ("out", "lse", "kv_counts", "kv_indices", "scores"):
        np.testing.assert_array_equal(getattr(paged, field), getattr(contiguous, field), err_msg=field)


def test_reference_varlen_and_paged_refuse_sink_tokens() -> None:
    q, k, v, cu_q, cu_k = _packed()
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8, sink_tokens=2)
    with pytest.raises(NotImplementedError, match="sink_tokens"):
        us.unisparse_attention_varlen(q, k, v, cu_q, cu_k, cfg, backend="numpy")
    with pytest.raises(NotImplementedError, match="sink_tokens"):
        us.unisparse_attention_paged(q, _cache(cfg, k, v, cu_k), cu_q, cfg, backend="numpy")


def test_cupy_packed_stages_refuse_sink_tokens_before_any_device_work() -> None:
    """The CuPy layer's packed stages refuse ``sink_tokens`` with the reference's message (no GPU needed)."""
    from unisparse_ref.cupy_backend import varlen as cupy_varlen

    q, k, _, cu_q, cu_k = _packed()
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=8, sink_tokens=2)
    with pytest.raises(NotImplementedError, match="compress_varlen: the research option sink_tokens=2"):
        cupy_varlen.compress_varlen(None, q, k, cu_q, cu_k, cfg)
    with pytest.raises(NotImplementedError, match="block_scores_varlen: the research option sink_tokens=2"):
        cupy_varlen.block_scores_varlen(None, q, k, cu_q, cu_k, cfg)


def test_calibrated_is_a_variant_config() -> None:
    cal = UniSparseConfig.calibrated()
    assert cal.spec_variants(), "calibrated() sets research options; the layers must run them"
    assert dataclasses.replace(cal, threshold_mode="total").threshold == cal.threshold
