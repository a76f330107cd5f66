"""Golden vectors v1: shipped, loadable, reproducible, self-consistent, and matched by every backend."""

from __future__ import annotations

import numpy as np
import pytest

import unisparse_ref as us
from unisparse_ref import reference as ref
from unisparse_ref.oracle import golden
from unisparse_ref.tolerance import compare_selection

from .conftest import SIM, assert_attention_matches_reference

CASES = golden.load_cases()

#: Composite tokens are means of float inputs: SPEC section 7's float32 rule, 1e-5 relative.
_POOL_RTOL = 1e-5


def test_cases_are_shipped_and_small():
    import os
    from importlib import resources

    assert [c.name for c in CASES] == golden.case_names()
    d = str(resources.files("unisparse_ref.data"))
    files = [f for f in os.listdir(d) if f.startswith("golden_v1_")]
    assert len(files) == len(CASES) + 1  # + manifest
    assert sum(os.path.getsize(os.path.join(d, f)) for f in files) < 1_000_000


def test_regenerating_reproduces_the_shipped_files(tmp_path):
    golden.regenerate(str(tmp_path))
    fresh = {c.name: c for c in golden.load_cases(str(tmp_path))}
    for case in CASES:
        assert golden.compare(fresh[case.name], case) == []


def test_compare_detects_a_change():
    case = CASES[0]
    other = golden.GoldenCase(case.name, case.description, case.config, case.nq, case.nk, dict(case.arrays))
    other.arrays["out"] = case["out"] + 1e-9
    other.arrays["mask"] = ~case["mask"]
    problems = golden.compare(other, case)
    assert any("out" in p for p in problems) and any("mask" in p for p in problems)


def test_check_command(capsys):
    assert golden.main(["check"]) == 0
    assert "reproduce" in capsys.readouterr().out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_is_self_consistent(case):
    cfg = case.config
    mask = ref.select_blocks(case["scores"], cfg, case.nq, case.nk)
    assert np.array_equal(mask.mask, case["mask"])
    counts, idx = mask.to_indices()
    assert np.array_equal(counts, case["kv_counts"]) and np.array_equal(idx, case["kv_indices"])
    np.testing.assert_allclose(case["scores"].sum(-1), 1.0, atol=1e-12)
    assert case["lse"].dtype == np.float32
    if cfg.threshold >= 1.0:
        np.testing.assert_allclose(case["out"], case["dense_out"], atol=1e-12)


@pytest.mark.parametrize("case", CASES[:2] if SIM else CASES, ids=lambda c: c.name)
def test_backend_matches_golden(backend, case):
    cfg = case.config
    q, k, v = case.q, case.k, case.v
    if q.dtype not in [np.dtype(d) for d in backend.supported_dtypes]:
        pytest.skip(f"{backend.name} does not take {q.dtype}")
    q_c, k_c = backend.compress(q, k, cfg)
    for got, want in ((q_c, case["q_c"]), (k_c, case["k_c"])):
        np.testing.assert_allclose(us.to_numpy(got), want, rtol=0, atol=_POOL_RTOL * np.abs(want).max())
    # Scores within the backend's declared score tolerance eps (SPEC section 7; 0 for the reference).
    scores = us.to_numpy(backend.block_scores(q_c, k_c, cfg, case.nq, case.nk))
    np.testing.assert_allclose(scores, case["scores"], rtol=0, atol=backend.score_eps + 1e-12)
    # Selection on the golden scores: identical outside borderline rows.
    bm = backend.select_blocks(case["scores"], cfg, case.nq, case.nk)
    chk = compare_selection(us.to_numpy(bm.mask), case["mask"], case["margin"])
    assert chk.ok, chk.message()
    # Attention with the golden mask.
    gm = us.BlockMask(case["mask"], cfg.block_size, cfg.c_h, case.nq, case.nk, cfg.causal)
    out, lse = backend.block_sparse_attention(q, k, v, gm, cfg)
    assert_attention_matches_reference(out, lse, q, k, v, gm, cfg)
