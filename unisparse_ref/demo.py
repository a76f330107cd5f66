"""``unisparse-ref demo``: UniSparse on a synthetic 8K long-context workload, every backend.

The workload (:func:`unisparse_ref.evaluation.workloads.demo_workload`) is seeded and embedded: attention
sinks, RoPE-like local decay and planted needles, so that it looks like real long-context
attention rather than Gaussian noise. For every available backend the demo prints the block
density, the share of the dense attention's work skipped, the output error against dense
attention (float64 reference) and the time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from . import geometry
from . import reference as ref
from ._arrays import BFLOAT16, to_numpy
from ._progress import Progress
from .backends import available_backends, get_backend
from .config import UniSparseConfig
from .evaluation.workloads import demo_workload


def _sync(backend: Any) -> None:
    """Wait for the device, so host timers measure the work."""
    if backend.name == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif backend.name == "numba":
        from numba import cuda

        cuda.synchronize()


def _reference_pipeline(w, cfg: UniSparseConfig, bar: Progress) -> tuple[np.ndarray, Any]:
    """The reference pipeline, stage by stage, attention in chunks so the bar moves."""
    nq, nk = w.q.shape[2], w.k.shape[2]
    q_c, k_c = ref.compress(w.q, w.k, cfg)
    scores = ref.block_scores(q_c, k_c, cfg, nq, nk)
    bm = ref.select_blocks(scores, cfg, nq, nk)
    bar.update(1)
    nqb = geometry.num_blocks(nq, cfg.block_size)
    outs = []
    for chunk in np.array_split(np.arange(nqb), 8):
        outs.append(ref.block_sparse_attention(w.q, w.k, w.v, bm, cfg, query_blocks=chunk)[0])
        bar.update(1)
    return np.concatenate(outs, axis=2), bm


def work_skipped(block_mask: Any) -> float:
    """Share of the dense (causal) attention's query-key pairs the mask skips."""
    m = to_numpy(block_mask.mask)
    pairs = geometry.block_pair_counts(block_mask.nq, block_mask.nk, block_mask.block_size, block_mask.causal)
    heads = block_mask.heads_per_mask  # every mask head serves heads_per_mask query heads alike
    done = (m * pairs).sum() * heads
    total = pairs.sum() * m.shape[0] * m.shape[1] * heads
    return float(1.0 - done / total)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="unisparse-ref demo",
        description="UniSparse on a synthetic long-context workload (8K tokens by default), run by every "
                    "available backend and checked against the float64 reference.",
    )
    p.add_argument("--n", type=int, default=8192, help="sequence length (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random workload (default 0)")
    p.add_argument("--threshold", type=float, default=0.9, help="P (default 0.9)")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    args = p.parse_args(argv)

    cfg = UniSparseConfig(threshold=args.threshold)
    names = args.backends.split(",") if args.backends else available_backends()
    w = demo_workload(args.n, seed=args.seed)
    B, Hq, N, D = w.q.shape
    print(f"workload: {w.description}")
    print(f"config:   {cfg}")

    t0 = time.perf_counter()
    nqb = geometry.num_blocks(N, 128)
    with Progress(8, "dense reference (float64)") as bar:
        dense_parts = []
        for chunk in np.array_split(np.arange(nqb), 8):
            dense_parts.append(ref.dense_attention(w.q, w.k, w.v, True, query_blocks=chunk)[0])
            bar.update(1)
    dense = np.concatenate(dense_parts, axis=2)
    t_dense = time.perf_counter() - t0
    norm = np.linalg.norm(dense)

    rows = []
    for name in names:
        be = get_backend(name)
        dtype = np.float32
        if name != "numpy":  # the GPU layers run in half precision, as deployed
            dtype = next((d for d in (BFLOAT16, np.dtype(np.float16)) if d in be.supported_dtypes), np.float32)
        q, k, v = (x.astype(dtype) for x in (w.q, w.k, w.v))
        if name == "numpy":
            with Progress(9, f"UniSparse [{name}]") as bar:
                t0 = time.perf_counter()
                out, bm = _reference_pipeline(w, cfg, bar)
                elapsed = time.perf_counter() - t0
        else:
            from .api import unisparse_attention

            unisparse_attention(q, k, v, cfg, backend=be)  # warm-up: compilation and caches
            _sync(be)
            t0 = time.perf_counter()
            res = unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
            _sync(be)
            elapsed = time.perf_counter() - t0
            out, bm = to_numpy(res.out), res.block_mask
        out = np.asarray(out, dtype=np.float64)
        err = float(np.linalg.norm(out - dense) / norm)
        mask_np = to_numpy(bm.mask)
        offset = bm.nk - bm.nq  # absolute position t -> query row t - offset
        hits = sum(bool(mask_np[b, h // cfg.c_h, (t - offset) // 128, s // 128]) for b, h, t, s in w.needles)
        rows.append((name, np.dtype(dtype).name, bm.density, work_skipped(bm), err, hits, elapsed))

    print()
    print(f"{'backend':<8} {'dtype':<9} {'density':>8} {'skipped':>8} {'rel. error':>11} {'needles':>8} {'time':>9}")
    for name, dt, dens, skip, err, hits, el in rows:
        print(f"{name:<8} {dt:<9} {dens:8.3f} {100 * skip:7.1f}% {err:11.2e} {hits:>4}/{len(w.needles):<3} {el:8.3f}s")
    print(f"{'dense':<8} {'float64':<9} {1.0:8.3f} {0.0:7.1f}% {0.0:11.2e} {'':>8} {t_dense:8.3f}s")
    print("\nrel. error = ||out - dense|| / ||dense|| against float64 dense attention; "
          "skipped = share of the causal query-key pairs not computed.")
    return 0
