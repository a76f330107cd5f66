#!/usr/bin/env python3
"""GPU check of the Numba layer: the whole pipeline at 32K against the reference (SPEC 7).

On a GPU (defaults): Nq = Nk = 32768, B = 1, Hq = 8, Hkv = 2, D = 128, float16 inputs from
``unisparse_ref.evaluation.workloads.structured_workload``, default configuration. It runs
``unisparse_attention(..., backend="numba", return_details=True)`` and checks:

1. every row of the block mask is eps-valid (``tolerance.eps_valid_rows``) under the
   reference's scores of the same float16 inputs, and the numba scores are within
   ``score_eps`` of them;
2. on a sample of query blocks (at least 8, every head), the attention output passes
   ``tolerance.check_attention`` against ``reference.block_sparse_attention`` run with the
   SAME mask (float64, and its float16 low-precision mode for the tolerance), and ``lse``
   agrees under the same rule.

It reports numba times (synchronised timers, one warm-up, median of ``--repeats``) per stage
and for the whole pipeline, next to the reference's measured time on the sampled work and
its extrapolation to the full input (labelled). Exit status 1 on any failed check.

    python scripts/gpu_numba.py                 # the done-criterion run (GPU)
    python scripts/gpu_numba.py --small         # tiny size; runs in the CUDA simulator without a GPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny size (N=96, Hq=4, Hkv=2, D=16, S=16); uses the simulator when no GPU is found")
    p.add_argument("--n", type=int, default=None, help="Nq = Nk (default 32768)")
    p.add_argument("--q-heads", type=int, default=None, help="Hq (default 8)")
    p.add_argument("--kv-heads", type=int, default=None, help="Hkv (default 2)")
    p.add_argument("--head-dim", type=int, default=None, help="D (default 128)")
    p.add_argument("--samples", type=int, default=8, help="query blocks checked against the reference (>= 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per stage (median reported)")
    p.add_argument("--threshold", type=float, default=0.9, help="P")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dense", action="store_true", help="skip timing numba dense attention")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.small and shutil.which("nvidia-smi") is None:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba is imported

    import numpy as np
    from numba import cuda

    import unisparse_ref as us
    from unisparse_ref import geometry
    from unisparse_ref import reference as ref
    from unisparse_ref.evaluation.workloads import structured_workload
    from unisparse_ref.tolerance import check_attention, check_lse, eps_valid_rows

    small = dict(n=96, q_heads=4, kv_heads=2, head_dim=16) if args.small else {}
    n = args.n or small.get("n", 32768)
    Hq = args.q_heads or small.get("q_heads", 8)
    Hkv = args.kv_heads or small.get("kv_heads", 2)
    D = args.head_dim or small.get("head_dim", 128)
    cfg = (us.UniSparseConfig(block_size=16, c_q=4, c_k=4, threshold=args.threshold) if args.small
           else us.UniSparseConfig(threshold=args.threshold))
    S = cfg.block_size
    dtype = np.dtype(np.float16)
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    be = us.get_backend("numba")
    device = "CUDA simulator" if sim else cuda.get_current_device().name
    device = device.decode() if isinstance(device, bytes) else device
    print(f"numba layer check: Nq = Nk = {n}, B = 1, Hq = {Hq}, Hkv = {Hkv}, D = {D}, {dtype}, {cfg}")
    print(f"device: {device}")

    # ---------------------------------------------------------------- inputs
    t = time.perf_counter()
    w = structured_workload(n, batch=1, q_heads=Hq, kv_heads=Hkv, head_dim=D, seed=args.seed)
    q, k, v = (x.astype(dtype) for x in (w.q, w.k, w.v))
    del w
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    print(f"inputs: structured workload cast to {dtype} ({time.perf_counter() - t:.1f} s)")

    def timed(fn, repeats: int):
        """(median seconds, last result) of ``fn`` after one warm-up, synchronised."""
        res = fn()
        cuda.synchronize()
        times = []
        for _ in range(repeats):
            cuda.synchronize()
            t0 = time.perf_counter()
            res = fn()
            cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), res

    # ---------------------------------------------------------------- numba, timed
    reps = args.repeats
    t_comp, (q_c, k_c) = timed(lambda: be.compress(dq, dk, cfg), reps)
    t_score, scores = timed(lambda: be.block_scores(q_c, k_c, cfg, n, n), reps)
    t_sel, bm = timed(lambda: be.select_blocks(scores, cfg, n, n), reps)
    t_attn, _ = timed(lambda: be.block_sparse_attention(dq, dk, dv, bm, cfg), reps)
    t_total, r = timed(
        lambda: us.unisparse_attention(dq, dk, dv, cfg, backend="numba", return_details=True), reps
    )
    t_dense = None
    if not args.no_dense:
        t_dense, _ = timed(lambda: be.dense_attention(dq, dk, dv, causal=cfg.causal), max(1, min(reps, 3)))

    # ---------------------------------------------------------------- reference checks
    failures: list[str] = []
    t = time.perf_counter()
    ref_scores = ref.block_scores(*ref.compress(q, k, cfg), cfg, n, n)
    t_ref_scores = time.perf_counter() - t
    nb_scores = us.to_numpy(r.scores)
    score_err = float(np.abs(nb_scores - ref_scores).max())
    if not score_err <= be.score_eps:
        failures.append(f"scores differ from the reference by {score_err:.3e} > score_eps {be.score_eps:.1e}")
    mask = r.block_mask.numpy()
    valid = eps_valid_rows(mask, ref_scores, cfg, n, n, be.score_eps)
    if not valid.all():
        failures.append(f"{int((~valid).sum())} mask rows not eps-valid, first {np.argwhere(~valid)[:5].tolist()}")

    nqb = geometry.num_blocks(n, S)
    n_samples = min(max(args.samples, 8), nqb)
    rng = np.random.default_rng(args.seed)
    middle = rng.choice(np.arange(1, nqb - 1), size=max(0, n_samples - 2), replace=False) if nqb > 2 else []
    sample = np.unique(np.concatenate([[0, nqb - 1], np.asarray(middle, dtype=np.int64)]))[:n_samples]
    rows = np.concatenate([np.arange(i * S, min((i + 1) * S, n)) for i in sample])

    t = time.perf_counter()
    ref64, ref_lse = ref.block_sparse_attention(q, k, v, mask, cfg, query_blocks=sample)
    t_ref_sample = time.perf_counter() - t
    out_lp, lse_lp = ref.block_sparse_attention(q, k, v, mask, cfg, precision=dtype, query_blocks=sample)
    out_s = us.to_numpy(r.out)[:, :, rows]
    lse_s = us.to_numpy(r.lse)[:, :, rows]
    att = check_attention(out_s, ref64, out_lp, dtype)
    if not att.ok:
        failures.append("attention: " + att.message())
    lse_res = check_lse(lse_s, ref_lse, lse_lp)  # the one rule of unisparse_ref.tolerance
    lse_ok, lse_err, lse_tol = lse_res.ok, lse_res.max_error, lse_res.tolerance
    if not lse_ok:
        failures.append(lse_res.message())

    # Extrapolation of the reference's attention time: proportional to the selected, visible
    # key blocks times the query rows they serve (the reference's work), sample -> all blocks.
    vis = geometry.visible_blocks(n, n, S, cfg.causal)
    work = ((mask.mask & vis).sum(axis=(0, 1, 3)) * np.diff(np.minimum(np.arange(nqb + 1) * S, n)))
    t_ref_full = t_ref_sample * float(work.sum()) / max(1.0, float(work[sample].sum()))

    # ---------------------------------------------------------------- report
    ms = lambda s: f"{1e3 * s:10.2f} ms"  # noqa: E731
    print()
    print(f"| stage | numba (median of {reps}) | NumPy reference (float64) |")
    print("| --- | --- | --- |")
    print(f"| compress | {ms(t_comp)} | |")
    print(f"| block scores | {ms(t_score)} | {t_ref_scores:.2f} s (compress + scores, measured, full input) |")
    print(f"| select (incl. host copy of the scores) | {ms(t_sel)} | |")
    print(f"| block-sparse attention, all {nqb} query blocks | {ms(t_attn)} | "
          f"{t_ref_full:.1f} s (EXTRAPOLATED from the sample by selected work) |")
    print(f"| block-sparse attention, sampled {len(sample)} blocks x {Hq} heads | | "
          f"{t_ref_sample:.2f} s (measured) |")
    print(f"| whole pipeline (unisparse_attention) | {ms(t_total)} | |")
    if t_dense is not None:
        print(f"| numba dense attention (every visible block) | {ms(t_dense)} | |")
    print()
    print(f"density {mask.density:.4f}; sampled query blocks {sample.tolist()}")
    print("| check | result |")
    print("| --- | --- |")
    print(f"| scores max abs diff vs reference | {score_err:.2e} (score_eps {be.score_eps:.0e}) |")
    print(f"| mask rows eps-valid | {int(valid.sum())} / {valid.size} |")
    print(f"| attention on sample | {att.message()} |")
    print(f"| lse on sample | max err {lse_err:.2e} <= {lse_tol:.2e}: {lse_ok} |")
    print()
    if failures:
        print("FAIL")
        for f in failures:
            print("  -", f)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
