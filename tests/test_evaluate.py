"""The evaluation: its one-pass sparse outputs equal the reference, the Pareto helpers, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from unisparse_ref import BlockMask, UniSparseConfig, baselines, geometry
from unisparse_ref import reference as ref
from unisparse_ref.evaluate import (
    DenseEvaluator,
    Record,
    density_at_error,
    main,
    matched_table,
    needle_hit_rate,
    pareto_front,
)
from unisparse_ref.tolerance import attention_tolerance
from unisparse_ref.workloads import WORKLOADS


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
               "--selectors", "unisparse,sink_local", "--kernels", "numpy"])
    assert rc == 0
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    gap = float(meta["attention_outputs"].split("= ")[1].rstrip(")"))
    assert gap <= 1e-12  # the reference kernels and the one-pass evaluator agree
