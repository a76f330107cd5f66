"""The launcher: ``python -m unisparse_ref.distributed {simulate,nccl,model}``.

* ``simulate --world-sizes 2,3,4,8``: simulated ranks (threads) on the CPU; each run is
  compared with the one-device reference (masks, out, lse) and its counted bytes with the
  formula (:func:`~unisparse_ref.distributed.expected_bytes`); a table of bytes per rank.
* ``nccl --nprocs N``: ``N`` processes, one per GPU, spawned here, on :class:`NcclComm`; the
  parent compares the assembled result with the one-device reference and prints ``PASS`` or
  ``FAIL`` (exit status 1). ``--backend cupy`` (with ``--dtype``): every rank computes on its
  GPU through the CuPy layer, compared with the one-device CuPy run under SPEC 7
  (:func:`~unisparse_ref.distributed.verify.compare_stage_run`). ``nccl --mpi`` instead runs this process as one rank of an
  ``mpirun -n N python -m unisparse_ref.distributed nccl --mpi`` job (needs ``mpi4py``).
* ``model``: the scaling table of the docs page.

Exit status: 0 when every check passed, 1 when one failed, 2 when NCCL/CuPy is unavailable.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any

import numpy as np

from ..config import UniSparseConfig
from ..errors import BackendUnavailable
from .comm import CommStats, NcclComm, nccl_unique_id
from .context_parallel import (
    TAGS,
    DistributedResult,
    assemble,
    context_parallel_attention,
    expected_bytes,
    shard_inputs,
    simulate_context_parallel,
)
from .sharding import make_plan

#: Tolerances of the checks (float64 reference against float64 reference).
OUT_ATOL = 1e-12


def _problem(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, UniSparseConfig]:
    """The seeded inputs and configuration the arguments describe (the same in every process)."""
    nk = args.nk or args.n
    cfg = UniSparseConfig(block_size=args.block_size, c_q=args.c_q, c_k=args.c_k, c_h=args.c_h,
                          threshold=args.threshold, causal=not args.non_causal)
    if args.workload == "structured":
        from ..evaluation.workloads import structured_workload

        w = structured_workload(nk, n_queries=args.n, batch=args.batch, q_heads=args.q_heads,
                                kv_heads=args.kv_heads, head_dim=args.head_dim, seed=args.seed)
        return (*(np.asarray(x).astype(_dtype(args)) for x in (w.q, w.k, w.v)), cfg)
    rng = np.random.default_rng(args.seed)
    dt = _dtype(args)
    q = rng.standard_normal((args.batch, args.q_heads, args.n, args.head_dim)).astype(dt)
    k = rng.standard_normal((args.batch, args.kv_heads, nk, args.head_dim)).astype(dt)
    v = rng.standard_normal((args.batch, args.kv_heads, nk, args.head_dim)).astype(dt)
    return q, k, v, cfg


def _dtype(args: argparse.Namespace) -> np.dtype:
    from .._convert import BFLOAT16

    return BFLOAT16 if getattr(args, "dtype", "float32") == "bfloat16" else np.dtype(getattr(args, "dtype", "float32"))


def compare(res: DistributedResult, q: np.ndarray, k: np.ndarray, v: np.ndarray,
            cfg: UniSparseConfig) -> tuple[list[str], list[dict[str, dict[str, int]]], Any]:
    """Check a distributed result against the one-device reference and the byte formula.

    Returns
    -------
    failures : list of str
        Empty when every check passed.
    expected : list of dict
        The formula's bytes per rank.
    ref : UniSparseResult
        The one-device reference run.
    """
    from ..api import unisparse_attention

    ref = unisparse_attention(q, k, v, cfg, backend="numpy", return_details=True)
    fails = []
    if not np.array_equal(res.block_mask.mask, ref.block_mask.mask):
        fails.append(f"block masks differ in {int((res.block_mask.mask != ref.block_mask.mask).sum())} entries")
    err = float(np.abs(res.out - ref.out).max())
    if not err <= OUT_ATOL:
        fails.append(f"max |out - ref| = {err:.3g} > {OUT_ATOL}")
    lse_ref64 = np.asarray(ref.lse, dtype=np.float64)
    ulp = np.spacing(np.abs(ref.lse).astype(np.float32)).astype(np.float64)
    fin = np.isfinite(lse_ref64)
    if not (np.array_equal(np.isfinite(res.lse), fin)
            and (np.abs(res.lse.astype(np.float64) - lse_ref64)[fin] <= ulp[fin]).all()):
        fails.append("lse differs by more than one float32 ulp")
    itemsize = np.dtype(k.dtype).itemsize
    exp = expected_bytes(res.plan, ref.block_mask.mask, kv_heads=k.shape[1], head_dim=k.shape[3],
                         kv_itemsize=itemsize, c_k=cfg.c_k, heads_per_mask=cfg.c_h)
    for r, (got, want) in enumerate(zip(res.stats, exp, strict=True)):
        for way in ("sent", "recv"):
            g = {t: got[way].get(t, 0) for t in TAGS}
            if g != want[way]:
                fails.append(f"rank {r} {way} bytes {g} != formula {want[way]}")
    return fails, exp, ref


def _print_bytes(res: DistributedResult, exp: list[dict[str, dict[str, int]]]) -> None:
    W = res.plan.world_size
    loads = res.plan.loads()
    qtok, ktok = res.plan.tokens()
    print(f"  {'rank':>4} {'q rows':>7} {'keys':>6} {'work/mean':>9} " + " ".join(f"{t:>15}" for t in TAGS)
          + f" {'total recv':>11} {'formula':>11}")
    for r in range(W):
        recv = res.stats[r]["recv"]
        print(f"  {r:>4} {qtok[r]:>7} {ktok[r]:>6} {loads[r] / loads.mean():>9.3f} "
              + " ".join(f"{recv.get(t, 0):>15,}" for t in TAGS)
              + f" {sum(recv.values()):>11,} {sum(exp[r]['recv'].values()):>11,}")


def _cmd_simulate(args: argparse.Namespace) -> int:
    q, k, v, cfg = _problem(args)
    ok = True
    for W in (int(x) for x in args.world_sizes.split(",")):
        t0 = time.perf_counter()
        res = simulate_context_parallel(q, k, v, cfg, W, strategy=args.strategy, combine=args.combine)
        dt = time.perf_counter() - t0
        fails, exp, ref = compare(res, q, k, v, cfg)
        dense_kv = 2 * k.shape[0] * k.shape[1] * k.shape[2] * k.shape[3] * k.dtype.itemsize
        print(f"W={W} ({dt:.2f} s): density {ref.block_mask.density:.3f}; "
              f"{'PASS' if not fails else 'FAIL: ' + '; '.join(fails)}; K+V of the whole sequence {dense_kv:,} bytes")
        _print_bytes(res, exp)
        ok &= not fails
    return 0 if ok else 1


# -- NCCL -------------------------------------------------------------------------------------


def _self_test(comm: NcclComm) -> None:
    """Round trips of the communicator itself (ragged shapes, bfloat16, CuPy arrays)."""
    from .._convert import BFLOAT16

    r, W = comm.rank, comm.world_size
    mine = np.arange(r + 3, dtype=np.float64).reshape(1, -1) + 100 * r
    got = comm.all_gather(mine, tag="selftest")
    for s in range(W):
        if not np.array_equal(got[s], np.arange(s + 3, dtype=np.float64).reshape(1, -1) + 100 * s):
            raise AssertionError(f"all_gather: rank {s}'s array came back wrong")
    b16 = np.linspace(-1, 1, 5 + r).astype(BFLOAT16)
    if not all(np.array_equal(g, np.linspace(-1, 1, 5 + s).astype(BFLOAT16))
               for s, g in enumerate(comm.all_gather(b16, tag="selftest"))):
        raise AssertionError("all_gather of bfloat16 came back wrong")
    xs = [np.full((d + 1, 2), 10 * r + d, dtype=np.int32) for d in range(W)]
    back = comm.all_to_all(xs, tag="selftest")
    for s in range(W):
        if not np.array_equal(back[s], np.full((r + 1, 2), 10 * s + r, dtype=np.int32)):
            raise AssertionError(f"all_to_all: the array from rank {s} came back wrong")
    import cupy

    dev = comm.all_gather(cupy.arange(4, dtype=cupy.float32) + r, tag="selftest")
    if not all(isinstance(g, cupy.ndarray) and bool((g == cupy.arange(4, dtype=cupy.float32) + s).all())
               for s, g in enumerate(dev)):
        raise AssertionError("all_gather of CuPy arrays came back wrong")
    comm.barrier()


def _nccl_rank(rank: int, world: int, uid: Any, args: argparse.Namespace, comm: NcclComm | None = None) -> Any:
    q, k, v, cfg = _problem(args)
    plan = make_plan(q.shape[2], k.shape[2], cfg.block_size, cfg.causal, world, args.strategy)
    shard = shard_inputs(q, k, v, plan)[rank]
    comm = comm or NcclComm(rank, world, uid)
    _self_test(comm)
    comm.stats = CommStats()  # count the algorithm's bytes only
    out = context_parallel_attention(shard, plan, cfg, comm, combine=args.combine, backend=args.backend)
    comm.barrier()
    if args.backend != "reference":  # device arrays back to the host for the parent
        from .._convert import to_numpy

        for name in ("out", "lse", "mask", "scores", "q_c", "k_c"):
            setattr(out, name, to_numpy(getattr(out, name)))
    return out


def _worker(rank: int, world: int, uid: Any, args: argparse.Namespace, queue: Any) -> None:
    try:
        queue.put((rank, "ok", _nccl_rank(rank, world, uid, args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))


def _finish(results: list[Any], args: argparse.Namespace) -> int:
    q, k, v, cfg = _problem(args)
    plan = make_plan(q.shape[2], k.shape[2], cfg.block_size, cfg.causal, len(results), args.strategy)
    res = assemble(results, plan, cfg)
    if args.backend != "reference":
        from ..api import unisparse_attention
        from ..backends import get_backend
        from .verify import compare_stage_run

        be = get_backend(args.backend)
        one = unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
        rep = compare_stage_run(res, one, q, k, v, cfg, be.score_eps)
        print(f"NCCL, {len(results)} rank(s), backend {args.backend}: {rep.summary()}")
        _print_bytes(res, rep.expected)
        return 0 if not rep.failures else 1
    fails, exp, ref = compare(res, q, k, v, cfg)
    print(f"NCCL, {len(results)} rank(s): density {ref.block_mask.density:.3f}, "
          f"max |out - ref| {np.abs(res.out - ref.out).max():.3g}")
    _print_bytes(res, exp)
    if fails:
        print("FAIL: " + "; ".join(fails))
        return 1
    print("PASS: the NCCL run equals the one-device reference (masks identical, out within "
          f"{OUT_ATOL}, lse within 1 float32 ulp) and moved the formula's bytes")
    return 0


def _cmd_nccl(args: argparse.Namespace) -> int:
    if args.mpi:
        try:
            from mpi4py import MPI
        except ImportError as e:
            print(f"FAIL: --mpi needs mpi4py ({e})")
            return 2
        world = MPI.COMM_WORLD
        try:
            comm = NcclComm.from_mpi()
            mine: Any = ("ok", _nccl_rank(world.Get_rank(), world.Get_size(), None, args, comm))
        except BaseException:  # noqa: BLE001 - gathered to rank 0
            mine = ("error", traceback.format_exc())
        got = world.gather(mine, root=0)
        code = 0
        if world.Get_rank() == 0:
            errs = [f"rank {r}:\n{m[1]}" for r, m in enumerate(got) if m[0] != "ok"]
            if errs:
                print("FAIL:\n" + "\n".join(errs))
                code = 1
            else:
                code = _finish([m[1] for m in got], args)
        return int(world.bcast(code, root=0))

    import multiprocessing as mp

    try:
        uid = nccl_unique_id()
    except BackendUnavailable as e:
        print(f"FAIL: {e}")
        return 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.nprocs, uid, args, queue)) for r in range(args.nprocs)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + args.timeout
    while len(got) + len(errors) < args.nprocs and time.monotonic() < deadline:
        try:
            rank, status, payload = queue.get(timeout=1.0)
        except Exception:  # queue.Empty: poll again unless a process died silently
            if any(p.exitcode not in (None, 0) for p in procs):
                errors.append("a rank process died: exit codes " + str([p.exitcode for p in procs]))
                break
            continue
        if status == "ok":
            got[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    if errors or len(got) < args.nprocs:
        print("FAIL:\n" + ("\n".join(errors) if errors else f"timed out after {args.timeout} s"))
        return 1
    return _finish([got[r] for r in range(args.nprocs)], args)


def _cmd_model(args: argparse.Namespace) -> int:
    import json

    from .model import MEASURED_H200, measured_from_record, measured_table, scaling_table

    for d in (float(x) for x in args.densities.split(",")):
        print(f"density {d}:")
        print(scaling_table(density=d))
    measured = measured_from_record(json.loads(open(args.timing).read())) if args.timing else MEASURED_H200
    if measured:
        print(f"from measured per-rank GPU compute at {measured['tokens']} tokens (density {measured['density']:.3f}):")
        print(measured_table(measured=measured))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unisparse_ref.distributed", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def problem(sp: argparse.ArgumentParser, n: int, nk: int | None) -> None:
        sp.add_argument("--n", type=int, default=n, help="Nq")
        sp.add_argument("--nk", type=int, default=nk, help="Nk (default Nq)")
        sp.add_argument("--batch", type=int, default=1)
        sp.add_argument("--q-heads", type=int, default=8)
        sp.add_argument("--kv-heads", type=int, default=2)
        sp.add_argument("--head-dim", type=int, default=32)
        sp.add_argument("--block-size", type=int, default=64)
        sp.add_argument("--c-q", type=int, default=16)
        sp.add_argument("--c-k", type=int, default=16)
        sp.add_argument("--c-h", type=int, default=1)
        sp.add_argument("--threshold", type=float, default=0.9)
        sp.add_argument("--non-causal", action="store_true")
        sp.add_argument("--workload", choices=["structured", "gaussian"], default="structured")
        sp.add_argument("--strategy", choices=["zigzag", "contiguous"], default="zigzag")
        sp.add_argument("--combine", choices=["gather", "merge"], default="gather")
        sp.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("simulate", help="simulated ranks on the CPU")
    problem(s, 4096, None)
    s.add_argument("--world-sizes", default="2,4,8")
    s.set_defaults(fn=_cmd_simulate)

    n = sub.add_parser("nccl", help="NCCL ranks, one process per GPU (PASS/FAIL)")
    problem(n, 1999, 2600)
    n.add_argument("--nprocs", type=int, default=1, help="processes (GPUs) to spawn")
    n.add_argument("--backend", choices=["reference", "cupy"], default="reference",
                   help="per-rank compute: the float64 reference on the host, or the CuPy layer on the rank's GPU")
    n.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    n.add_argument("--mpi", action="store_true", help="run as one rank under mpirun (mpi4py)")
    n.add_argument("--timeout", type=float, default=300.0)
    n.set_defaults(fn=_cmd_nccl)

    m = sub.add_parser("model", help="the scaling model for 1M and 4M tokens on 1-8 H200s")
    m.add_argument("--densities", default="0.1,0.5")
    m.add_argument("--timing", default=None, help="a 'scripts/distributed_gpu.py time --json' record to scale from")
    m.set_defaults(fn=_cmd_model)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the launcher; returns the exit status."""
    args = _parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
