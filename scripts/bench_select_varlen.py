"""The packed selection of the CuPy layer (one launch of ``us_select_topp`` with its row table)
against the per-sequence loop it replaced (issue 16), on the serving batch of
``docs/gpu_results/varlen.md``: 16 prompts, 131072 tokens, S = 128, Hm = 32, float32 scores.

    python3 scripts/bench_select_varlen.py

"loop": what ``select_blocks_varlen`` did before, reproduced here: for every sequence a copy of
its rows of the packed scores, ``CupyBackend.select_blocks_indices`` on it, the result written
into the packed arrays. Both are checked equal bit for bit (and, on sampled rows, equal to the
reference's selection) before anything is timed; a difference exits 1. CUDA events, 2 warm-ups,
medians. Writes ``$OUT/selvar/bench_select_varlen.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import json
import os
import sys

import cupy as cp
import numpy as np

import unisparse_ref as us
from unisparse_ref import UniSparseConfig
from unisparse_ref._arrays import packed_offsets
from unisparse_ref.bench import time_calls
from unisparse_ref.cupy_backend import varlen as cv
from unisparse_ref.geometry import num_blocks, visible_blocks
from unisparse_ref.reference import selection as rsel

LENGTHS = [32691, 16384, 12288, 12338, 8192, 8192, 8191, 6144, 6144, 4096, 4096, 4101, 3072, 2071, 2048, 1024]


def loop(be, s, cu, cfg):
    """The per-sequence path (before the packed launch): copies, one launch per sequence."""
    S = cfg.block_size
    cu_qb = packed_offsets(cu, S)
    Hm, total_qb, W = s.shape
    counts = cp.zeros((Hm, total_qb), dtype=cp.int32)
    indices = cp.full((Hm, total_qb, W), -1, dtype=cp.int32)
    for i in range(cu.size - 1):
        n = int(cu[i + 1] - cu[i])
        nkb = num_blocks(n, S)
        s_i = cp.ascontiguousarray(s[None, :, cu_qb[i]:cu_qb[i + 1], :nkb])
        _, c_i, idx_i = be.select_blocks_indices(s_i, cfg, n, n, check_finite=False)
        counts[:, cu_qb[i]:cu_qb[i + 1]] = c_i[0]
        indices[:, cu_qb[i]:cu_qb[i + 1], :nkb] = idx_i[0]
    return counts, indices


def main() -> int:
    be = us.get_backend("cupy")
    rng = np.random.default_rng(0)
    S, Hm = 128, 32
    cfg = UniSparseConfig(block_size=S, c_q=16, c_k=16, threshold=0.9)
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    cu_qb = packed_offsets(cu, S)
    W = num_blocks(max(LENGTHS), S)
    s = np.zeros((Hm, int(cu_qb[-1]), W), np.float32)
    for i, n in enumerate(LENGTHS):
        nb = num_blocks(n, S)
        raw = rng.exponential(size=(Hm, nb, nb)).astype(np.float32) * visible_blocks(n, n, S, True)
        s[:, cu_qb[i]:cu_qb[i + 1], :nb] = raw / raw.sum(-1, keepdims=True)
    sd = cp.asarray(s)
    packed = cv.select_blocks_varlen(be, sd, cu, cu, cfg, check_finite=False)
    old = loop(be, sd, cu, cfg)
    ok = all(np.array_equal(a.get(), b.get()) for a, b in zip(packed, old, strict=True))
    # the reference on sampled rows: 4 mask heads of the first, longest sequence
    want = rsel.select_blocks(s[None, :4, : cu_qb[1], :W], cfg, LENGTHS[0], LENGTHS[0])
    wc, _ = want.to_indices()
    ok = ok and np.array_equal(packed[0].get()[:4, : cu_qb[1]], wc[0])
    if not ok:
        print("bench_select_varlen: the packed selection differs from the per-sequence loop or the reference: "
              "not timed")
        return 1
    t_packed = time_calls([lambda: cv.select_blocks_varlen(be, sd, cu, cu, cfg, check_finite=False)], warmup=2,
                          repeats=20)
    t_loop = time_calls([lambda: loop(be, sd, cu, cfg)], warmup=2, repeats=20)
    res = {"case": f"{len(LENGTHS)} prompts, {int(cu[-1])} tokens, S={S}, Hm={Hm}, W={W}, rows={Hm * int(cu_qb[-1])}",
           "packed_ms": t_packed["ms"], "loop_ms": t_loop["ms"], "loop_over_packed": t_loop["ms"] / t_packed["ms"],
           "bit_identical": True}
    print(json.dumps(res))
    if os.environ.get("OUT"):
        d = os.path.join(os.environ["OUT"], "selvar")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "bench_select_varlen.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
