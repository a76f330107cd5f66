"""The evaluation: its one-pass sparse outputs equal the reference, the Pareto helpers, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from unisparse_ref import BlockMask, UniSparseConfig, geometry
from unisparse_ref import reference as ref
from unisparse_ref.evaluation import baselines
from unisparse_ref.evaluation.evaluate import (
    DenseEvaluator,
    Record,
    density_at_error,
    main,
    matched_table,
    needle_hit_rate,
    pareto_front,
)
from unisparse_ref.evaluation.workloads import WORKLOADS
from unisparse_ref.tolerance import attention_tolerance


@pytest.mark.parametrize("causal, nq, nk", [(True, 70, 150), (False, 90, 60), (True, 64, 64)])
def test_evaluator_outputs_equal_reference(causal, nq, nk):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, nq, 16))
    k, v = rng.standard_normal((2, 2, nk, 16)), rng.standard_normal((2, 2, nk, 16))
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=4, c_h=2, causal=causal)
    shape = (2, 2, geometry.num_blocks(nq, 16), geometry.num_blocks(nk, 16))
    ms = [BlockMask(rng.random(shape) < p, 16, 2, nq, nk, causal) for p in (0.3, 0.7, 1.0)]
    empty = ms[0].mask.copy()
    empty[:, :, 0] = False  # rows with nothing selected: output 0
    ms.append(BlockMask(empty, 16, 2, nq, nk, causal))
    ev = DenseEvaluator(q, k, v, cfg)
    res = ev.evaluate(ms, return_outputs=True)
    dense, _ = ref.dense_attention(q, k, v, causal)
    tol, _ = attention_tolerance(dense, None, np.float64)
    assert np.abs(res["dense"] - dense).max() <= tol
    for bm, out, err in zip(ms, res["outputs"], res["rel_error"], strict=True):
        want, _ = ref.block_sparse_attention(q, k, v, bm, cfg)
        assert np.abs(out - want).max() <= tol
        assert math.isclose(err, np.linalg.norm(want - dense) / np.linalg.norm(dense), rel_tol=1e-9)
    np.testing.assert_allclose(ev.block_mass(), baselines.dense_block_mass(q, k, cfg), atol=1e-12)
    full = BlockMask.full(2, 2, nq, nk, block_size=16, heads_per_mask=2, causal=causal)
    r = ev.evaluate([full])
    assert r["rel_error"][0] <= 1e-12 and abs(r["recall"][0] - 1) <= 1e-12


def _naive_metrics(q, k, v, cfg, bm):
    """One mask, directly: the reference's block-sparse output against dense, and the dense mass kept."""
    dense, _ = ref.dense_attention(q, k, v, cfg.causal)
    out, _ = ref.block_sparse_attention(q, k, v, bm, cfg)
    B, Hq, nq, D = q.shape
    nk, S = k.shape[2], cfg.block_size
    kk = np.repeat(k, Hq // k.shape[1], axis=1)
    logits = cfg.scale_for(D) * (q @ np.swapaxes(kk, -1, -2))
    logits = np.where(geometry.token_causal_mask(np.arange(nq), nq, nk, cfg.causal), logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    sel = np.repeat(np.asarray(bm.mask), bm.heads_per_mask, axis=1)  # [B, Hq, nQb, nKb]
    tok = np.repeat(np.repeat(sel, S, axis=2), S, axis=3)[:, :, :nq, :nk]
    recall = float((p * tok).sum() / (B * Hq * nq))
    rel = np.linalg.norm(out - dense) / np.linalg.norm(dense)
    rows = np.linalg.norm(out - dense, axis=-1) / np.maximum(np.linalg.norm(dense, axis=-1), 1e-30)
    return rel, float(rows.mean()), recall


@pytest.mark.parametrize("causal, nq, nk", [(True, 70, 150), (False, 90, 60)])
def test_evaluator_batched_masks_equal_per_mask(causal, nq, nk):
    """Masks are combined ``mask_chunk`` at a time; every chunking equals the mask-by-mask reference."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, nq, 16))
    k, v = rng.standard_normal((2, 2, nk, 16)), rng.standard_normal((2, 2, nk, 16))
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=4, c_h=2, causal=causal)
    nqb, nkb = geometry.num_blocks(nq, 16), geometry.num_blocks(nk, 16)
    ms = [BlockMask(rng.random((2, 4 // h, nqb, nkb)) < p, 16, h, nq, nk, causal)
          for h, p in ((1, 0.2), (2, 0.5), (4, 0.8), (1, 1.0))]  # mixed heads_per_mask
    ms.append(BlockMask(np.zeros((2, 2, nqb, nkb), dtype=bool), 16, 2, nq, nk, causal))  # nothing selected
    ev = DenseEvaluator(q, k, v, cfg)
    results = [ev.evaluate(ms, return_outputs=True, mask_chunk=c) for c in (1, 2, 32)]
    for key in ("rel_error", "row_error", "recall"):
        for r in results[1:]:
            np.testing.assert_allclose(r[key], results[0][key], rtol=1e-12, atol=1e-15)
    for r in results[1:]:
        for a, b in zip(r["outputs"], results[0]["outputs"], strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    res = results[-1]
    for a, bm in enumerate(ms):
        rel, row, rec = _naive_metrics(q, k, v, cfg, bm)
        assert math.isclose(res["rel_error"][a], rel, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(res["row_error"][a], row, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(res["recall"][a], rec, rel_tol=1e-9, abs_tol=1e-12)
    assert not res["outputs"][-1].any() and res["rel_error"][-1] == 1.0 and res["recall"][-1] == 0.0
    assert res["rel_error"][3] == 0.0 and res["row_error"][3] == 0.0  # the full mask: exactly the dense rows
    assert abs(res["recall"][3] - 1) <= 1e-12
    with pytest.raises(ValueError, match="mask_chunk"):
        ev.evaluate(ms, mask_chunk=0)
    other = BlockMask.full(2, 4, nq + 16, nk, block_size=16, causal=causal)
    with pytest.raises(ValueError, match="does not match"):
        ev.evaluate([ms[0], other])


def test_pareto_and_interpolation():
    pts = [(0.2, 0.3), (0.4, 0.1), (0.5, 0.2), (0.8, 0.01), (1.0, 0.0)]
    assert pareto_front(pts) == [(0.2, 0.3), (0.4, 0.1), (0.8, 0.01), (1.0, 0.0)]
    assert density_at_error(pts, 0.5) == 0.2
    assert density_at_error(pts, 0.1) == 0.4
    assert math.isclose(density_at_error(pts, 0.2), 0.3)  # halfway from 0.3 to 0.1
    assert density_at_error([(0.5, 0.2)], 0.1) is None
    recs = [Record("w", s, "p", 0.0, d, 1.0, e, e, float("nan"), 0.0) for s in ("unisparse", "x") for d, e in pts]
    tab = matched_table(recs, (0.1,))
    assert tab["w"][0.1] == {"unisparse": 0.4, "x": 0.4}


def test_needle_hit_rate():
    w = WORKLOADS["needle"](512, q_heads=2, kv_heads=1, head_dim=16, n_needles=3)
    cfg = UniSparseConfig(block_size=32, c_q=4, c_k=4)
    full = BlockMask.full(1, 2, 512, 512, block_size=32)
    assert needle_hit_rate(full, w) == 1.0
    local = baselines.sink_local(w.q, w.k, w.v, cfg, n_local=1)
    assert needle_hit_rate(local, w) < 1.0
    assert math.isnan(needle_hit_rate(full, WORKLOADS["gaussian"](512, q_heads=2, kv_heads=1, head_dim=16)))


def test_evaluate_quick_cli(tmp_path, capsys):
    md = tmp_path / "page.md"
    rc = main(["--quick", "--out", str(tmp_path), "--no-progress", "--markdown", str(md),
               "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    names = {r["selector"] for r in doc["records"]}
    assert names == set(baselines.SELECTORS)
    assert {r["workload"] for r in doc["records"]} == set(WORKLOADS)
    for r in doc["records"]:
        assert 0 < r["density"] <= 1 and 0 <= r["recall"] <= 1 + 1e-9 and r["rel_error"] >= 0
    assert (tmp_path / "results.csv").read_text().startswith("workload,selector")
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    page = md.read_text()
    assert "Density at matched error" in page and "unisparse-ref evaluate --quick" in page
    assert "| workload | target error |" in capsys.readouterr().out
    # Re-render from the JSON, with notes, without running again.
    notes = tmp_path / "notes.md"
    notes.write_text("UniSparse wins here and loses there.")
    md2 = tmp_path / "page2.md"
    assert main(["--from-json", str(tmp_path / "results.json"), "--markdown", str(md2), "--notes", str(notes)]) == 0
    page2 = md2.read_text()
    assert "## Findings" in page2 and "loses there" in page2 and "Density at matched error" in page2


def test_evaluate_rejects_unknown_names(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--workloads", "nope", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err


def test_evaluate_with_backend_kernels(tmp_path):
    rc = main(["--quick", "--out", str(tmp_path), "--no-progress", "--workloads", "rope_sinks",
               "--selectors", "unisparse,sink_local", "--kernels", "numpy", "--backend", "numpy"])
    assert rc == 0
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    gap = float(meta["attention_outputs"].split("= ")[1].rstrip(")"))
    assert gap <= 1e-12  # the reference kernels and the one-pass evaluator agree


def test_commit_from_environment(monkeypatch):
    """A copied tree (the GPU machine's) may carry stale git metadata: UNISPARSE_COMMIT wins."""
    from unisparse_ref.evaluation.evaluate import _git_commit, _machine

    monkeypatch.setenv("UNISPARSE_COMMIT", "abc1234")
    assert _git_commit() == "abc1234"
    assert "cores" in _machine()
