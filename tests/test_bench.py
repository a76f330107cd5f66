"""CPU tests of the benchmark's bookkeeping (``unisparse_ref.bench``): FLOP counting, masks, plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unisparse_ref import bench
from unisparse_ref.geometry import visible_blocks


@pytest.mark.parametrize("nq,nk,causal", [(300, 389, True), (1, 129, True), (257, 257, False), (128, 256, True)])
def test_allowed_pairs_matrix_is_exact(nq, nk, causal):
    S = 128
    P = bench.allowed_pairs_matrix(nq, nk, S, causal)
    t = np.arange(nq)[:, None]
    s = np.arange(nk)[None, :]
    allowed = (s <= t + (nk - nq)) if causal else np.ones((nq, nk), bool)
    nqb, nkb = -(-nq // S), -(-nk // S)
    brute = np.array([[allowed[i * S:(i + 1) * S, j * S:(j + 1) * S].sum() for j in range(nkb)] for i in range(nqb)])
    np.testing.assert_array_equal(P, brute)
    assert bench.allowed_pairs(np.ones((1, 2, nqb, nkb), bool), nq, nk, S, causal) == 2 * allowed.sum()


def test_visible_blocks_agree_with_geometry():
    for nq, nk, causal in [(300, 389, True), (1000, 1000, True), (5, 700, False)]:
        np.testing.assert_array_equal(bench.visible_blocks(nq, nk, 128, causal),
                                      visible_blocks(nq, nk, 128, causal))


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_random_block_mask_density_and_forced_blocks(density):
    mask = bench.random_block_mask(1, 8, 16384, 16384, 128, density, seed=1)
    vis = bench.visible_blocks(16384, 16384, 128, True)
    assert not (mask & ~vis).any(), "only visible blocks are selected"
    assert mask[..., 0].all(), "the sink block is always kept"
    assert mask[..., np.arange(vis.shape[0]), np.arange(vis.shape[0])].all(), "the diagonal is always kept"
    real = mask.sum() / (vis.sum() * 8)
    assert abs(real - density) < 0.02


def test_replot_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"N": n, "D": 128, "mode": m, "contender": c, "density": 1.0, "ms": ms, "tflops": 1.0,
         "ratio_vs_ours": r, "note": ""}
        for n in (8192, 32768)
        for m, c, ms, r in [("dense", "ours-v7", 1.0, 1.0), ("dense", "sdpa-flash", 1.1, 1.1),
                            ("pipeline", "ours-pipeline", 0.5, None)]
    ]
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"meta": {"gpu": "test", "date": "2026-01-01"}, "rows": rows}))
    assert bench.main(["--replot", str(src), "--out-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0
