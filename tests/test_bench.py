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


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_random_block_mask_density_and_forced_blocks(density):
    mask = bench.random_block_mask(1, 8, 16384, 16384, 128, density, seed=1)
    vis = visible_blocks(16384, 16384, 128, True)
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


def test_replot_refuses_a_missing_or_foreign_file(tmp_path, capsys):
    assert bench.main(["--replot", str(tmp_path / "missing.json"), "--out-dir", str(tmp_path)]) == 2
    assert "cannot replot" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert bench.main(["--replot", str(tmp_path / "x.json"), "--out-dir", str(tmp_path)]) == 2


def _gate_inputs(causal: bool):
    from unisparse_ref import BFLOAT16

    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 4, 300, 32)).astype(BFLOAT16)
    k = rng.standard_normal((1, 2, 300, 32)).astype(BFLOAT16)
    v = rng.standard_normal((1, 2, 300, 32)).astype(BFLOAT16)
    mask = bench.random_block_mask(1, 4, 300, 300, 64, 0.5, causal, seed=3)
    return q, k, v, mask


@pytest.mark.parametrize("causal", [True, False])
def test_gate_passes_a_correct_kernel_and_refuses_wrong_ones(causal):
    """The correctness gate on its own: an independent correct result (the tiled online-softmax
    walk, rounded to bf16 like a kernel's output) passes; planted faults are refused."""
    from unisparse_ref import BFLOAT16, BlockMask, UniSparseConfig
    from unisparse_ref.reference.tiled import tiled_block_sparse_attention

    q, k, v, mask = _gate_inputs(causal)
    bm = BlockMask(mask, 64, 1, 300, 300, causal)
    out, _ = tiled_block_sparse_attention(q, k, v, bm, UniSparseConfig(block_size=64, causal=causal))
    good = out.astype(BFLOAT16)
    assert bench.reference_check(good, q, k, v, mask, S=64, causal=causal).ok
    scaled = (out * 1.01).astype(BFLOAT16)  # a 1% error
    assert not bench.reference_check(scaled, q, k, v, mask, S=64, causal=causal).ok
    no_sink = mask.copy()
    no_sink[..., 0] = False  # the kernel's output judged against another mask
    assert not bench.reference_check(good, q, k, v, no_sink, S=64, causal=causal).ok
    last_rows_wrong = good.copy()
    last_rows_wrong[:, 1, -1] = 0  # one row of the last query block, head 1
    assert not bench.reference_check(last_rows_wrong, q, k, v, mask, S=64, causal=causal).ok
