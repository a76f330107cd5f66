#!/usr/bin/env python3
"""The GPU checks and timings of context-parallel UniSparse (issue 17): PASS or FAIL.

Two modes:

``python scripts/distributed_gpu.py [launcher options]``
    The NCCL check of the launcher (``python -m unisparse_ref.distributed nccl``): spawns
    ``--nprocs`` processes (default 1), one per GPU (rank ``r`` on GPU ``r % count``), each an
    :class:`unisparse_ref.distributed.NcclComm` rank; each round-trips the communicator, then
    runs its rank of a seeded problem (GQA Hq=8/Hkv=2, ragged Nq=1999 < Nk=2600, S=64); the
    parent compares the assembled rows with the one-device run. ``--backend reference``
    (default): the float64 reference on every rank; ``--backend cupy``: the per-rank CuPy
    compute, checked under SPEC 7 (``unisparse_ref.distributed.verify``). Exit 0 PASS, 1 FAIL,
    2 without CuPy/NCCL.

``python scripts/distributed_gpu.py time --sizes 131072,524288,1048576 --world-sizes 1,2,4,8``
    Per-rank GPU compute of ``backend="cupy"`` at the sizes of the scaling model (bf16, B=1,
    Hq=32, Hkv=8, D=128, S=128, c_q=c_k=16, P=0.9, causal; a sparse random workload: 10 % of
    the key blocks share a direction with the queries): the one-device pipeline, then ``W``
    simulated ranks on the one GPU (threads, in turn; every local step timed with the device
    synchronised, the collective calls apart) and the bytes every rank moves. Every run is
    checked first: masks against the one-device masks (differing rows: eps-valid under the
    reference scores of those rows), ``out``/``lse`` against the one-device run on the rows
    whose masks agree within twice the SPEC 7 tolerance measured on sampled query blocks
    against the float64 reference, and the counted bytes against the formula. ``--json``
    writes everything. Exit 1 when a check fails (no timing is reported as valid then).

Usage (on the GPU machine, from the repository root):

    python scripts/distributed_gpu.py                       # one GPU: the NCCL path with one rank
    python scripts/distributed_gpu.py --backend cupy        # the same, per-rank CuPy compute
    python scripts/distributed_gpu.py --nprocs 2 --backend cupy   # two GPUs
    python scripts/distributed_gpu.py time --json out.json  # the timings of the scaling model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from unisparse_ref.distributed.__main__ import main  # noqa: E402

HQ, HKV, D = 32, 8, 128


def _bf16(cp, x32):
    """float32 CuPy array -> bf16 bit patterns (round to nearest even)."""
    bits = x32.view(cp.uint32)
    return ((bits + cp.uint32(0x7FFF) + ((bits >> 16) & cp.uint32(1))) >> 16).astype(cp.uint16)


def sparse_workload(cp, cb, N, seed=0, hot=0.1, S=128):
    """bf16 q [1, 32, N, 128], k, v [1, 8, N, 128] on the GPU: a share ``hot`` of the key blocks
    carry a per-KV-head direction ``u`` (norm sqrt(D)) that the queries of that head carry too."""
    rs = cp.random.RandomState(seed)
    u = rs.standard_normal((1, HKV, 1, D), dtype=cp.float32)
    u *= np.float32(np.sqrt(D)) / cp.linalg.norm(u, axis=-1, keepdims=True)
    q = rs.standard_normal((1, HQ, N, D), dtype=cp.float32)
    q += cp.repeat(u, HQ // HKV, axis=1)
    qb = _bf16(cp, q)
    del q
    k = rs.standard_normal((1, HKV, N, D), dtype=cp.float32)
    nkb = N // S
    hot_blocks = np.random.default_rng(seed).choice(nkb, max(1, int(hot * nkb)), replace=False)
    k4 = k.reshape(1, HKV, nkb, S, D)
    k4[:, :, cp.asarray(np.sort(hot_blocks))] += np.float32(0.7) * u[:, :, :, None, :]
    kb = _bf16(cp, k)
    del k, k4
    vb = _bf16(cp, rs.standard_normal((1, HKV, N, D), dtype=cp.float32))
    return cb.as_bfloat16(qb), cb.as_bfloat16(kb), cb.as_bfloat16(vb)


def _raw(cp, x):
    return x.data if type(x).__name__ == "BFloat16Array" else x.view(cp.uint16)


def _sampled_tolerance(cp, us, q, k, v, mask_rows, cfg, blocks, out_dev, lse_dev):
    """SPEC 7 of ``out_dev``/``lse_dev`` on the sampled query blocks (KV head 0's query heads),
    against the float64 reference in the bottom-right form of each block; returns the
    tolerances and the checks."""
    from unisparse_ref import BFLOAT16, BlockMask, UniSparseConfig
    from unisparse_ref import reference as ref
    from unisparse_ref.tolerance import check_attention, check_lse

    S, G = cfg.block_size, HQ // HKV
    res = []
    for i in blocks:
        nk_i = (i + 1) * S
        sub = UniSparseConfig(block_size=S, c_q=cfg.c_q, c_k=cfg.c_k)
        qh = _raw(cp, q)[:, :G, i * S : (i + 1) * S].get().view(BFLOAT16)
        kh = _raw(cp, k)[:, :1, :nk_i].get().view(BFLOAT16)
        vh = _raw(cp, v)[:, :1, :nk_i].get().view(BFLOAT16)
        m = mask_rows[:, :G, i : i + 1, : i + 1].get()
        bm = BlockMask(m, S, 1, S, nk_i, True)
        r64, l64 = ref.block_sparse_attention(qh, kh, vh, bm, sub)
        lp, llp = ref.block_sparse_attention(qh, kh, vh, bm, sub, precision=BFLOAT16)
        got = _raw(cp, out_dev)[:, :G, i * S : (i + 1) * S].get().view(BFLOAT16)
        chk = check_attention(got, r64, lp, BFLOAT16)
        lchk = check_lse(lse_dev[:, :G, i * S : (i + 1) * S].get(), l64, llp)
        res.append((i, chk, lchk))
    return res


def _eps_valid_sample(cp, us, q, k, mask, cfg, rows, score_eps, limit=3):
    """Differing mask rows (b, g, i): eps-valid under the reference scores of that row?"""
    from unisparse_ref import BFLOAT16, UniSparseConfig
    from unisparse_ref import reference as ref
    from unisparse_ref.tolerance import eps_valid_rows

    S, G = cfg.block_size, HQ // HKV
    ok = True
    for b, g, i in rows[:limit]:
        nk_i = (i + 1) * S
        sub = UniSparseConfig(block_size=S, c_q=cfg.c_q, c_k=cfg.c_k)
        kv = g // G  # c_h = 1
        qh = _raw(cp, q)[b : b + 1, g : g + 1, i * S : (i + 1) * S].get().view(BFLOAT16)
        kh = _raw(cp, k)[b : b + 1, kv : kv + 1, :nk_i].get().view(BFLOAT16)
        qc, kc = ref.compress(qh, kh, sub)
        sc = ref.block_scores(qc, kc, sub, S, nk_i)
        m = mask[b : b + 1, g : g + 1, i : i + 1, : i + 1].get()
        ok &= bool(eps_valid_rows(m, sc, sub, S, nk_i, score_eps).all())
    return ok


def _dump(path, record, current, failures, t_start) -> None:
    if not path:
        return
    out = dict(record, sizes=record["sizes"] + ([current] if current is not None else []),
               failures=list(failures), total_s=time.perf_counter() - t_start)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


def time_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="distributed_gpu.py time")
    ap.add_argument("--sizes", default="131072,524288")
    ap.add_argument("--world-sizes", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=2, help="one-device repetitions (median) at the smallest size")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=75.0, help="skip the remaining runs past this wall time")
    args = ap.parse_args(argv)

    import cupy as cp

    import unisparse_ref as us
    from unisparse_ref import UniSparseConfig
    from unisparse_ref import cupy_backend as cb
    from unisparse_ref.distributed import TAGS, expected_bytes, simulate_context_parallel
    from unisparse_ref.distributed.stages import ArrayOps

    t_start = time.perf_counter()
    be = cb.make_backend()
    cfg = UniSparseConfig()  # S = 128, c_q = c_k = 16, P = 0.9, causal
    S = cfg.block_size
    ops = ArrayOps(be)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    record = {"gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
              "cupy": cp.__version__, "config": "bf16 B=1 Hq=32 Hkv=8 D=128 S=128 c_q=c_k=16 P=0.9 causal",
              "workload": "gaussian, 10% of key blocks share a direction with the queries", "sizes": []}
    failures: list[str] = []
    # warm-up: every kernel of both paths compiled and loaded before anything is timed
    wq, wk, wv = sparse_workload(cp, cb, 8192, seed=99)
    us.unisparse_attention(wq, wk, wv, cfg, backend=be, return_details=True)
    simulate_context_parallel(wq, wk, wv, cfg, 2, backend="cupy")
    dev.synchronize()
    del wq, wk, wv
    print(f"warm-up done after {time.perf_counter() - t_start:.1f} s")
    sizes = [int(x) for x in args.sizes.split(",")]
    for n_i, N in enumerate(sizes):
        if time.perf_counter() - t_start > args.budget_s:
            print(f"N={N}: skipped (budget of {args.budget_s} s spent)")
            break
        q, k, v = sparse_workload(cp, cb, N, seed=n_i)
        nqb = N // S
        # one device: the fused pipeline (warm-up first)
        one = us.unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
        dev.synchronize()
        reps = args.reps if n_i == 0 else 1
        ts = []
        for _ in range(reps):
            del one
            t0 = time.perf_counter()
            one = us.unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
            dev.synchronize()
            ts.append(time.perf_counter() - t0)
        t_one = float(np.median(ts))
        m1 = one.block_mask.mask
        vis = int(us.geometry.visible_blocks(N, N, S, True).sum()) * HQ
        density = float(m1.sum()) / vis
        # SPEC 7 tolerance on sampled blocks of the one-device run (the tolerance for the comparisons)
        blocks = (1, nqb // 4) if N <= 131072 else (32768 // S - 1,)  # 32K keys at most: a few s of host time
        samp = _sampled_tolerance(cp, us, q, k, v, m1, cfg, blocks, one.out, one.lse)
        tol = max(c.tolerance for _, c, _ in samp)
        ltol = max(lc.tolerance for _, _, lc in samp)
        for i, c, lc in samp:
            if not (c.ok and lc.ok):
                failures.append(f"N={N}: the one-device run fails SPEC 7 at block {i}: {c.message()} {lc.message()}")
        entry = {"tokens": N, "one_device_s": t_one, "one_device_reps": ts, "density": density,
                 "sampled_blocks": list(blocks), "spec7_out_tol": tol, "spec7_lse_tol": ltol, "runs": []}
        print(f"N={N}: one device {t_one * 1e3:.1f} ms (median of {reps}), density {density:.3f}; "
              f"SPEC 7 on blocks {blocks}: out tol {tol:.3g}, lse tol {ltol:.3g}")
        o1 = _raw(cp, one.out)
        wsizes = [int(x) for x in args.world_sizes.split(",")]
        if n_i == len(sizes) - 1:  # the largest size: the most ranks first, in case the budget ends it
            wsizes = sorted(wsizes, reverse=True)
        for W in wsizes:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"  W={W}: skipped (budget of {args.budget_s} s spent)")
                continue
            timings: list[dict[str, float]] = []
            t0 = time.perf_counter()
            res = simulate_context_parallel(q, k, v, cfg, W, backend="cupy", timings=timings)
            dev.synchronize()
            wall = time.perf_counter() - t0
            m = res.block_mask.mask
            differ = (m != m1).any(axis=-1)  # [1, Hm, nQb]
            rows = [tuple(int(x) for x in r) for r in cp.argwhere(differ).get()]
            same = ~cp.repeat(differ, S, axis=2)  # [1, Hq, N] (c_h = 1)
            o = _raw(cp, res.out)
            err, bitwise = 0.0, True
            for h in range(HQ):  # a head at a time: float32 copies of 0.5 GiB at 512K
                a, b = ops.to_float(o[:, h], us.BFLOAT16), ops.to_float(o1[:, h], us.BFLOAT16)
                d = cp.where(same[:, h, :, None], cp.abs(a - b), 0)
                err = max(err, float(d.max()))
                bitwise &= bool(((o[:, h] == o1[:, h]) | ~same[:, h, :, None]).all())
            fin = same & cp.isfinite(one.lse)
            lerr = float(cp.where(fin, cp.abs(res.lse - one.lse), 0).max())
            lse_bitwise = bool(((res.lse == one.lse) | ~same).all())
            eps_ok = _eps_valid_sample(cp, us, q, k, m, cfg, rows, be.score_eps) if rows else True
            exp = expected_bytes(res.plan, m, kv_heads=HKV, head_dim=D, kv_itemsize=2, c_k=cfg.c_k,
                                 heads_per_mask=cfg.c_h, composite_itemsize=4)
            bytes_ok = all({t: res.stats[r][w].get(t, 0) for t in TAGS} == exp[r][w]
                           for r in range(W) for w in ("sent", "recv"))
            ok = err <= 2 * tol and lerr <= 2 * ltol and eps_ok and bytes_ok
            if not ok:
                failures.append(f"N={N} W={W}: out diff {err:.3g} (<= {2 * tol:.3g}?), lse diff {lerr:.3g} "
                                f"(<= {2 * ltol:.3g}?), differing rows eps-valid {eps_ok}, bytes = formula {bytes_ok}")
            compute = [sum(t.values()) for t in timings]
            recv = [{t: int(res.stats[r]["recv"].get(t, 0)) for t in TAGS} for r in range(W)]
            qtok, ktok = res.plan.tokens()
            run = {"world_size": W, "wall_s": wall, "check": "PASS" if ok else "FAIL", "mask_rows_differ": len(rows),
                   "differing_rows_eps_valid": eps_ok, "eps_valid_rows_checked": min(len(rows), 3), "out_max_diff_vs_one_device": err, "out_bitwise_equal": bitwise,
                   "lse_max_diff_vs_one_device": lerr, "lse_bitwise_equal": lse_bitwise, "bytes_equal_formula": bytes_ok,
                   "rank_compute_s": compute, "rank_steps_s": timings, "rank_recv_bytes": recv,
                   "rank_query_rows": qtok.tolist(), "rank_keys": ktok.tolist()}
            entry["runs"].append(run)
            kv_max = max(r_["kv_blocks"] for r_ in recv)
            all_kv = 2 * (W - 1) / W * N * HKV * D * 2
            print(f"  W={W}: {'PASS' if ok else 'FAIL'} (mask rows differing {len(rows)}, out diff {err:.3g}, bitwise "
                  f"{bitwise}/{lse_bitwise}, bytes=formula {bytes_ok}); per-rank compute ms "
                  f"max {max(compute) * 1e3:.1f} mean {np.mean(compute) * 1e3:.1f} (one device {t_one * 1e3:.1f}: "
                  f"x{t_one / max(compute):.2f}); recv max {max(sum(r_.values()) for r_ in recv) / 1e6:.1f} MB, "
                  f"kv {kv_max / 1e6:.1f} MB of all-gather-KV {all_kv / 1e6:.1f} MB; sim wall {wall:.2f} s")
            steps = {s_: max(t[s_] for t in timings) * 1e3 for s_ in timings[0]}
            print("       slowest rank per step, ms: " + ", ".join(f"{s_} {v_:.1f}" for s_, v_ in steps.items()))
            del res, m, differ, same, o
            cp.get_default_memory_pool().free_all_blocks()
            _dump(args.json, record, entry, failures, t_start)  # after every run: a timeout keeps what ran
        record["sizes"].append(entry)
        del q, k, v, one, o1, m1
        cp.get_default_memory_pool().free_all_blocks()
    _dump(args.json, record, None, failures, t_start)
    print("FAIL:\n  " + "\n  ".join(failures) if failures else "PASS: every timed run checked first")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["time"]:
        sys.exit(time_main(sys.argv[2:]))
    sys.exit(main(["nccl", *sys.argv[1:]]))
