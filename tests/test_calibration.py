"""The research variants of the estimator (reference only) and UniSparseConfig.calibrated()."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from unisparse_ref import reference as ref
from unisparse_ref._arrays import check_spec_variants
from unisparse_ref.config import UniSparseConfig
from unisparse_ref.oracle import golden
from unisparse_ref.reference.scores import variant_log_weights


def _rand(seed: int = 0, n: int = 300, hq: int = 4, hkv: int = 2, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, hq, n, d)), rng.standard_normal((1, hkv, n, d))


# ------------------------------------------------------------------ the default is unchanged
def test_default_fields_are_spec() -> None:
    cfg = UniSparseConfig()
    assert (cfg.threshold_mode, cfg.sink_tokens, cfg.diagonal_correction) == ("total", 0, False)
    assert cfg.spec_variants() == []


def test_default_equals_golden_outputs() -> None:
    assert golden.check() == []


def test_explicit_spec_options_are_bit_identical() -> None:
    q, k = _rand()
    base = UniSparseConfig(block_size=64)
    same = UniSparseConfig(block_size=64, threshold_mode="total", sink_tokens=0, diagonal_correction=False)
    qc, kc = ref.compress(q, k, base)
    s1, s2 = ref.block_scores(qc, kc, base, 300, 300), ref.block_scores(qc, kc, same, 300, 300)
    assert np.array_equal(s1, s2)
    assert np.array_equal(ref.select_blocks(s1, base, 300, 300).mask, ref.select_blocks(s2, same, 300, 300).mask)


# ------------------------------------------------------------------ threshold_mode
def _one_row(scores: list[float]) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64)[None, None, None, :]


def test_remaining_mass_threshold_hand_made() -> None:
    # One query block on the diagonal block 4 (nq = 64, nk = 5 * 64): forced sink 0 and local 4
    # carry 0.25 + 0.25 = 0.5; candidates 0.25, 0.125, 0.125 (exact in binary).
    row = _one_row([0.25, 0.25, 0.125, 0.125, 0.25])
    total = UniSparseConfig(block_size=64, threshold=0.75)
    rem = dataclasses.replace(total, threshold_mode="remaining")
    # total: m = 0.5 -> take 0.25 (block 1) -> 0.75, stop.
    assert ref.select_blocks(row, total, 64, 320).mask[0, 0, 0].tolist() == [True, True, False, False, True]
    # remaining: target 0.75 * 0.5 = 0.375 of the candidates: 0.25 then 0.125 (block 2, lower j first).
    assert ref.select_blocks(row, rem, 64, 320).mask[0, 0, 0].tolist() == [True, True, True, False, True]


def test_remaining_mass_all_forced_takes_nothing_more() -> None:
    row = _one_row([0.5, 0.0, 0.0, 0.0, 0.5])
    rem = UniSparseConfig(block_size=64, threshold=0.9, threshold_mode="remaining")
    assert ref.select_blocks(row, rem, 64, 320).mask[0, 0, 0].tolist() == [True, False, False, False, True]
    full = dataclasses.replace(rem, threshold=1.0)
    assert ref.select_blocks(row, full, 64, 320).mask.all()


# ------------------------------------------------------------------ sink_tokens
def test_sink_tokens_keys_layout() -> None:
    q, k = _rand()
    cfg = UniSparseConfig(block_size=64, sink_tokens=3)
    _, kc = ref.compress(q, k, cfg)
    C = -(-300 // 16)
    assert kc.shape == (1, 2, 3 + C, 32)
    assert np.array_equal(kc[:, :, :3], k[:, :, :3])
    assert np.allclose(kc[:, :, 3], k[:, :, 3:16].mean(axis=2))
    assert np.allclose(kc[:, :, 4], k[:, :, 16:32].mean(axis=2))


def test_sink_tokens_weights_by_key_count() -> None:
    # Identical keys everywhere: each column's share is its key count over the visible keys.
    nq = nk = 64
    cfg = UniSparseConfig(block_size=16, c_q=16, c_k=16, sink_tokens=2, causal=False)
    kb, log_w = variant_log_weights(cfg, nq, nk)
    assert kb.tolist() == [0, 0, 0, 1, 2, 3]
    assert np.allclose(np.exp(log_w[0]), [1, 1, 14, 16, 16, 16])
    q = np.ones((1, 1, nq, 4))
    k = np.ones((1, 1, nk, 4))
    qc, kc = ref.compress(q, k, cfg)
    s = ref.block_scores(qc, kc, cfg, nq, nk)
    assert np.allclose(s, 0.25)  # the true block mass of uniform attention


def test_sink_tokens_sees_the_sink() -> None:
    # A key 0 that every query attends strongly, hidden by pooling in SPEC, is seen un-pooled.
    rng = np.random.default_rng(1)
    n, d = 256, 16
    q = rng.standard_normal((1, 1, n, d)) * 0.1
    q[..., 0] += 3.0
    k = rng.standard_normal((1, 1, n, d)) * 0.1
    k[:, :, 0, 0] = 12.0  # logit ~9: key 0 carries ~97 % of every row's mass
    spec = UniSparseConfig(block_size=64)
    sink = dataclasses.replace(spec, sink_tokens=1)
    s_spec = ref.block_scores(*ref.compress(q, k, spec), spec, n, n)
    s_sink = ref.block_scores(*ref.compress(q, k, sink), sink, n, n)
    assert s_spec[0, 0, -1, 0] < 0.5 < 0.9 < s_sink[0, 0, -1, 0]
    assert np.allclose(s_sink.sum(-1), 1.0)


def test_sink_tokens_wrong_key_shape() -> None:
    q, k = _rand()
    cfg = UniSparseConfig(block_size=64, sink_tokens=2)
    qc, kc = ref.compress(q, k, UniSparseConfig(block_size=64))  # SPEC keys, no sinks in front
    with pytest.raises(ValueError, match="composite keys"):
        ref.block_scores(qc, kc, cfg, 300, 300)


# ------------------------------------------------------------------ diagonal_correction
def test_diagonal_correction_shares() -> None:
    # c_q = c_k = 4, nq = nk = 8: group r = c on the diagonal sees 10 of 16 token pairs.
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=4, diagonal_correction=True)
    _, log_w = variant_log_weights(cfg, 8, 8)
    w = np.exp(log_w)
    assert np.allclose(w, [[10 / 16, 0.0], [1.0, 10 / 16]])


def test_diagonal_correction_changes_only_diagonal_rows_weights() -> None:
    q, k = _rand(2)
    cfg = UniSparseConfig(block_size=64, diagonal_correction=True)
    s = ref.block_scores(*ref.compress(q, k, cfg), cfg, 300, 300)
    s0 = ref.block_scores(*ref.compress(q, k, UniSparseConfig(block_size=64)), UniSparseConfig(block_size=64), 300, 300)
    assert np.allclose(s.sum(-1), 1.0)
    diag = np.arange(1, s.shape[2])  # row 0 sees only its diagonal block (mass 1 either way)
    assert np.all(s[..., diag, diag] < s0[..., diag, diag])  # the diagonal block loses weight
    assert np.allclose(s[..., 0, 0], 1.0)


def test_variants_non_causal_without_sinks_are_spec() -> None:
    q, k = _rand(3)
    base = UniSparseConfig(block_size=64, causal=False)
    diag = dataclasses.replace(base, diagonal_correction=True)
    s0 = ref.block_scores(*ref.compress(q, k, base), base, 300, 300)
    s1 = ref.block_scores(*ref.compress(q, k, diag), diag, 300, 300)
    assert np.allclose(s0, s1, rtol=0, atol=1e-12)


def test_variants_run_through_the_pipeline() -> None:
    import unisparse_ref as us

    q, k = _rand(4)
    cfg = UniSparseConfig(block_size=64, sink_tokens=4, diagonal_correction=True, threshold_mode="remaining")
    out = us.unisparse_attention(q, k, k, cfg, backend="numpy")
    assert np.all(np.isfinite(np.asarray(out)))


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kw", "exc", "field"),
    [
        ({"threshold_mode": "rest"}, ValueError, "threshold_mode"),
        ({"threshold_mode": 1}, TypeError, "threshold_mode"),
        ({"sink_tokens": -1}, ValueError, "sink_tokens"),
        ({"sink_tokens": 16}, ValueError, "sink_tokens"),
        ({"sink_tokens": 2.0}, TypeError, "sink_tokens"),
        ({"sink_tokens": True}, TypeError, "sink_tokens"),
        ({"diagonal_correction": 1}, TypeError, "diagonal_correction"),
    ],
)
def test_validation(kw: dict, exc: type, field: str) -> None:
    with pytest.raises(exc, match=field):
        UniSparseConfig(**kw)


# ------------------------------------------------------------------ a layer without a variant refuses it
@pytest.mark.parametrize(
    ("kw", "name"),
    [({"threshold_mode": "remaining"}, "threshold_mode"), ({"sink_tokens": 2}, "sink_tokens"),
     ({"diagonal_correction": True}, "diagonal_correction")],
)
def test_shared_check_refuses(kw: dict, name: str) -> None:
    check_spec_variants(None, "x")
    check_spec_variants(UniSparseConfig(), "x")
    with pytest.raises(NotImplementedError, match=name):
        check_spec_variants(UniSparseConfig(**kw), "cupy backend block_scores")
    check_spec_variants(UniSparseConfig(**kw), "x", supported=(name,))  # a layer that implements it
    others = tuple(n for n in ("threshold_mode", "sink_tokens", "diagonal_correction") if n != name)
    with pytest.raises(NotImplementedError, match=name):
        check_spec_variants(UniSparseConfig(**kw), "x", supported=others)


def test_numba_layer_runs_the_variants() -> None:
    import inspect

    from unisparse_ref import numba_backend

    # The Numba layer implements all three (tests/test_variants.py checks them against the
    # reference in every layer); it no longer refuses them.
    for m in ("compress", "block_scores", "select_blocks"):
        assert "check_spec_variants" not in inspect.getsource(getattr(numba_backend.NumbaBackend, m)), m


# ------------------------------------------------------------------ calibrated()
def test_calibrated() -> None:
    cal = UniSparseConfig.calibrated()
    assert isinstance(cal, UniSparseConfig)
    assert cal == UniSparseConfig(**{**dataclasses.asdict(UniSparseConfig()), **_expected_calibrated()})
    assert UniSparseConfig.calibrated(threshold=0.8).threshold == 0.8
    assert UniSparseConfig.calibrated(block_size=64).block_size == 64
    with pytest.raises(ValueError, match="threshold_mode"):
        UniSparseConfig.calibrated(threshold_mode="nope")


def _expected_calibrated() -> dict:
    from unisparse_ref.config import _CALIBRATED

    return dict(_CALIBRATED)


# ------------------------------------------------------------------ the measurement script
def test_measure_with_baselines_and_tables(tmp_path) -> None:
    import json

    from unisparse_ref.evaluation import calibration as cal

    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, h, 256, 16)).astype(np.float32) for h in (4, 2, 2))
    cfg = UniSparseConfig(block_size=32, c_q=8, c_k=8)
    res = cal.measure(q, k, v, cfg, variants={"spec": {}, "remaining": {"threshold_mode": "remaining"}},
                      baselines=("oracle", "minference"))
    assert list(res) == ["spec", "remaining", "xattention", "oracle", "minference"]
    for name, r in res.items():
        assert len(r["density"]) == len(r["rel_error"]) == len(r["recall"]) == len(r["values"])
        assert set(r["matched"]) == {"0.2", "0.1", "0.05"}
        assert ("at_0.95" in r) == (name in ("spec", "remaining", "xattention"))
    # the largest swept P keeps more than the smallest: no more error
    assert res["spec"]["rel_error"][-1] <= res["spec"]["rel_error"][0]
    # load_qkv reads what capture writes; the tables render every layer
    np.savez(tmp_path / "qkv.npz", layers=np.array([7]), q7=q.astype(np.float16), k7=k.astype(np.float16),
             v7=v.astype(np.float16))
    layers, arrays, _ = cal.load_qkv(str(tmp_path / "qkv.npz"))
    assert layers == [7] and arrays[0][0].dtype == np.float32 and arrays[0][0].shape == q.shape
    with pytest.raises(ValueError, match="layers"):
        cal.load_qkv(str(tmp_path / "qkv.npz"), [3])
    out = tmp_path / "r.json"
    assert cal.main(["--qkv", str(tmp_path / "qkv.npz"), "--variants", "spec", "--json", str(out)]) == 0
    table = cal.markdown_tables(json.loads(out.read_text()))
    assert "layer 7: d@0.2" in table and "| `spec` |" in table and "| `xattention` |" in table
