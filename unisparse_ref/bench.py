"""``unisparse-ref bench``: time our GPU attention against other attention kernels.

One process, the same random inputs for every contender, CUDA events around each call,
warm-up, the median of repeats, several input sets rotated so that caches flatter nobody.

Contenders (each only when it can be imported and run here):

* ``ours-dense``: :func:`unisparse_ref.cupy_backend.attention.attention_forward` with every visible block;
* ``ours-sparse``: the same kernel given a block mask of ~10% / ~30% of the causal blocks;
* ``ours-pipeline``: the whole UniSparse pipeline with the CuPy backend (estimation = pooling,
  scores, selection; then the sparse kernel) on :func:`unisparse_ref.evaluation.workloads.structured_workload`;
* ``sdpa-flash`` / ``sdpa-cudnn``: PyTorch ``scaled_dot_product_attention`` pinned to the
  FlashAttention / cuDNN backend (dense);
* ``flex``: PyTorch FlexAttention (``torch.compile``'d) given the identical block mask through
  ``BlockMask.from_kv_blocks`` (diagonal blocks partial with the causal ``mask_mod``, the others full);
* ``numba``: the Numba prototype's block-sparse attention (small sizes only).

Correctness first: before a contender is timed at a size, its output on that size's first
input set is compared with the float64 NumPy reference (:mod:`unisparse_ref.reference`) on
sampled query blocks of the heads that share KV head 0, under the rule of SPEC section 7
(:func:`unisparse_ref.tolerance.check_attention`, with the reference's low-precision mode for
the dtype). A contender that fails is not timed: its row says ``refused: ...`` and the
command exits with status 1 after writing the results (as llm.c's ``dev/cuda`` does).

Reports milliseconds, effective TFLOP/s (``4 * D`` FLOPs per query-key pair the mask allows,
causal counted exactly) and each contender's time over ours (``> 1``: ours is faster). Writes
``bench.csv``, ``bench.json`` and ``bench.png`` into ``--out-dir``; also measures and prints
the two ceilings (device-to-device copy bandwidth; a bf16/fp16 matrix product through cuBLAS).

PyTorch is optional and never imported at module import time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import geometry

__all__ = ["main", "allowed_pairs", "random_block_mask", "reference_check", "time_calls"]


# ----------------------------------------------------------------------------- FLOP counting
def allowed_pairs_matrix(nq: int, nk: int, S: int, causal: bool) -> np.ndarray:
    """``P[i, j]``: query-key pairs of query block ``i`` and key block ``j`` the causal rule allows.

    float64 ``[nQb, nKb]``; exact (bottom-right alignment, ragged last blocks):
    :func:`unisparse_ref.geometry.block_pair_counts`.
    """
    return geometry.block_pair_counts(nq, nk, S, causal).astype(np.float64)


def allowed_pairs(mask: np.ndarray, nq: int, nk: int, S: int, causal: bool, heads_per_mask: int = 1) -> float:
    """Query-key pairs a boolean block mask ``[B, Hm, nQb, nKb]`` allows, over all query heads."""
    P = allowed_pairs_matrix(nq, nk, S, causal)
    return float((mask.astype(np.float64) * P).sum() * heads_per_mask)


def random_block_mask(
    B: int, Hm: int, nq: int, nk: int, S: int, density: float, causal: bool = True, seed: int = 0
) -> np.ndarray:
    """A block mask keeping ~``density`` of the visible blocks: sink + diagonal + random others."""
    rng = np.random.default_rng(seed)
    vis = geometry.visible_blocks(nq, nk, S, causal)
    nqb, nkb = vis.shape
    forced = geometry.forced_blocks(nq, nk, S, 1, 1, causal)  # sink block and diagonal block
    n_vis = vis.sum(axis=1, keepdims=True)
    n_forced = forced.sum(axis=1, keepdims=True)
    # Probability for the other visible blocks so that the expected density is `density`.
    p = np.clip((density * n_vis - n_forced) / np.maximum(n_vis - n_forced, 1), 0.0, 1.0)
    r = rng.random((B, Hm, nqb, nkb))
    return vis & (forced | (r < p))


# ----------------------------------------------------------------------------- timing
def time_calls(
    calls: Sequence[Callable[[], Any]], *, warmup: int, repeats: int, events: str = "cupy",
    budget_s: float = 3.0,
) -> dict[str, float]:
    """Median time (ms) of ``calls`` (one per input set, rotated), timed with CUDA events.

    ``warmup`` rounds over all input sets first; then ``repeats`` rounds (fewer if one call
    is so slow that the rounds would exceed ``budget_s``, at least 3 calls in total).
    """
    if events == "torch":
        import torch

        def mk() -> Any:
            return torch.cuda.Event(enable_timing=True)

        def sync() -> None:
            torch.cuda.synchronize()
    else:
        import cupy as cp

        def mk() -> Any:
            return cp.cuda.Event()

        def sync() -> None:
            cp.cuda.Device().synchronize()

    for _ in range(warmup):
        for c in calls:
            c()
    sync()
    # One probe call to size the repeats.
    e0, e1 = mk(), mk()
    e0.record()
    calls[0]()
    e1.record()
    e1.synchronize()
    probe = _elapsed(e0, e1, events)
    rounds = max(1, min(repeats, int(budget_s * 1000 / max(probe * len(calls), 1e-3))))
    if rounds * len(calls) < 3:
        rounds = -(-3 // len(calls))
    pairs = []
    for _ in range(rounds):
        for c in calls:
            a, b = mk(), mk()
            a.record()
            c()
            b.record()
            pairs.append((a, b))
    sync()
    times = [_elapsed(a, b, events) for a, b in pairs]
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": len(times)}


def _elapsed(a: Any, b: Any, events: str) -> float:
    if events == "torch":
        return float(a.elapsed_time(b))
    import cupy as cp

    return float(cp.cuda.get_elapsed_time(a, b))


# ----------------------------------------------------------------------------- inputs
def _bf16_bits(x: Any) -> Any:
    """float32 CuPy array -> uint16 bfloat16 bits (round to nearest even)."""
    import cupy as cp

    u = x.astype(cp.float32).view(cp.uint32)
    r = (u + cp.uint32(0x7FFF) + ((u >> 16) & cp.uint32(1))) >> 16
    return r.astype(cp.uint16)


def _make_inputs(B: int, Hq: int, Hkv: int, N: int, D: int, dtype: str, seed: int) -> tuple[Any, Any, Any]:
    import cupy as cp

    rs = cp.random.RandomState(seed)

    def one(h: int) -> Any:
        x = rs.standard_normal((B, h, N, D), dtype=cp.float32)
        return _bf16_bits(x) if dtype == "bfloat16" else x.astype(dtype)

    return one(Hq), one(Hkv), one(Hkv)


def _to_torch(x: Any, dtype: str) -> Any:
    import torch

    t = torch.from_dlpack(x)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings(dtype: str) -> dict[str, float]:
    """Device-to-device copy bandwidth (GB/s, read + write) and a cuBLAS matmul rate (TFLOP/s)."""
    import cupy as cp

    res: dict[str, float] = {}
    n = 1 << 30  # 1 GiB each way (several times the L2)
    src = cp.ones(n // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    t = time_calls([lambda: dst.__setitem__(Ellipsis, src)], warmup=2, repeats=10, budget_s=1.0)
    res["copy_GBps"] = 2 * n / (t["ms"] * 1e-3) / 1e9
    M = 8192
    a = cp.random.standard_normal((M, M), dtype=cp.float32).astype(cp.float16)
    b = cp.random.standard_normal((M, M), dtype=cp.float32).astype(cp.float16)
    t = time_calls([lambda: a @ b], warmup=2, repeats=10, budget_s=1.0)
    res["matmul_fp16_cublas_TFLOPs"] = 2 * M**3 / (t["ms"] * 1e-3) / 1e12
    try:
        import torch

        ta = torch.randn(M, M, device="cuda", dtype=torch.bfloat16)
        tb = torch.randn(M, M, device="cuda", dtype=torch.bfloat16)
        t = time_calls([lambda: ta @ tb], warmup=2, repeats=10, events="torch", budget_s=1.0)
        res["matmul_bf16_torch_cublas_TFLOPs"] = 2 * M**3 / (t["ms"] * 1e-3) / 1e12
    except Exception as e:  # torch missing or no CUDA build
        print(f"  (bf16 matmul via torch skipped: {e})")
    return res


# ----------------------------------------------------------------------------- contenders
class _Torch:
    """Lazily imported PyTorch pieces; ``why`` says why one is unavailable."""

    def __init__(self) -> None:
        self.torch: Any = None
        self.why: str | None = None
        try:
            import torch

            if not torch.cuda.is_available():
                self.why = "PyTorch sees no CUDA device"
            else:
                self.torch = torch
        except Exception as e:
            self.why = f"PyTorch unavailable: {e}"
        self._flex: Any = None

    def sdpa(self, backend_name: str) -> Callable[..., Any]:
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

        def run(q: Any, k: Any, v: Any, causal: bool) -> Any:
            with sdpa_kernel(be):
                if k.shape[1] != q.shape[1]:
                    try:
                        return sdpa(q, k, v, is_causal=causal, enable_gqa=True)
                    except (RuntimeError, TypeError):
                        g = q.shape[1] // k.shape[1]
                        k2 = k.repeat_interleave(g, dim=1)
                        v2 = v.repeat_interleave(g, dim=1)
                        return sdpa(q, k2, v2, is_causal=causal)
                return sdpa(q, k, v, is_causal=causal)

        del torch
        return run

    def flex(self) -> Callable[..., Any]:
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            self._flex = self.torch.compile(flex_attention)
        return self._flex

    def flex_block_mask(self, mask: np.ndarray, nq: int, nk: int, S: int, causal: bool) -> Any:
        """FlexAttention ``BlockMask`` of a boolean block mask: diagonal blocks partial, others full."""
        torch = self.torch
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        shift = nk - nq
        B, Hm, nqb, nkb = mask.shape
        i = np.arange(nqb)
        j = np.arange(nkb)
        # A block is "full" if every pair in it is allowed (strictly below the diagonal and not ragged).
        first_row_pos = i * S + shift
        full_ok = ((j[None, :] + 1) * S - 1 <= first_row_pos[:, None]) if causal else np.ones((nqb, nkb), bool)
        full_ok &= ((j + 1) * S <= nk)[None, :]
        full_ok &= (np.minimum((i + 1) * S, nq) - i * S == S)[:, None]
        full = mask & full_ok
        part = mask & ~full_ok

        def idx_form(m: np.ndarray) -> tuple[Any, Any]:
            cnt = m.sum(-1).astype(np.int32)
            keyed = np.where(m, j, nkb)
            ind = np.sort(keyed, axis=-1)
            ind = np.where(ind == nkb, 0, ind).astype(np.int32)
            return torch.from_numpy(cnt).cuda(), torch.from_numpy(ind).cuda()

        pc, pi = idx_form(part)
        fc, fi = idx_form(full)

        def causal_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (q_idx + shift >= kv_idx) & (kv_idx < nk)

        def plain_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return kv_idx < nk

        return FlexBlockMask.from_kv_blocks(
            pc, pi, fc, fi, BLOCK_SIZE=S, mask_mod=causal_mod if causal else plain_mod, seq_lengths=(nq, nk)
        )


# ----------------------------------------------------------------------------- correctness gate
def _sample_blocks(nqb: int, n: int = 3) -> list[int]:
    """Query blocks the gate checks: the first, the middle and the last (longest causal rows)."""
    return sorted({0, nqb // 2, nqb - 1})[:n]


def reference_check(out: Any, q: Any, k: Any, v: Any, mask: np.ndarray, *, S: int, causal: bool,
                    heads_per_mask: int = 1, softmax_scale: float | None = None) -> Any:
    """SPEC section 7 for a contender's ``out`` on sampled rows, against the float64 reference.

    Checks the query heads of KV head 0 (``h < G``) on the query blocks of
    :func:`_sample_blocks`, so the reference's work stays small at any length.

    Parameters
    ----------
    out : array ``[B, Hq, Nq, D]``
        CuPy (bf16 as ``uint16`` bits or a bf16 CuPy array), PyTorch or NumPy: the output
        under test.
    q, k, v : arrays ``[B, Hq, Nq, D]``, ``[B, Hkv, Nk, D]``
        The inputs it was computed from (CuPy; bf16 as ``uint16`` bits).
    mask : bool ``[B, Hm, nQb, nKb]``
        The block mask it was computed with (every visible block for dense attention).

    Returns
    -------
    unisparse_ref.tolerance.AttentionCheck
    """
    from . import reference as ref
    from ._convert import BFLOAT16, to_numpy
    from .blockmask import BlockMask
    from .config import UniSparseConfig
    from .tolerance import check_attention

    def host(x: Any, heads: int, rows: Any = None) -> np.ndarray:
        if type(x).__module__.split(".")[0] == "torch":
            x = x.detach()
            part = x[:, :heads] if rows is None else x[:, :heads][:, :, rows]
            return part.float().cpu().numpy()
        a = to_numpy(x[:, :heads])
        a = a.view(BFLOAT16) if np.dtype(a.dtype) == np.uint16 else a
        return a if rows is None else a[:, :, rows]

    B, Hq, Nq, D = (int(x) for x in q.shape)
    Hkv, Nk = int(k.shape[1]), int(k.shape[2])
    G = Hq // Hkv
    blocks = _sample_blocks(-(-Nq // S))
    rows = np.concatenate([np.arange(i * S, min((i + 1) * S, Nq)) for i in blocks])
    qh, kh, vh = host(q, G), host(k, 1), host(v, 1)
    m = np.asarray(to_numpy(mask))[:, : max(1, G // heads_per_mask)]
    bm = BlockMask(m, S, heads_per_mask, Nq, Nk, causal)
    cfg = UniSparseConfig(block_size=S, causal=causal, softmax_scale=softmax_scale)
    ref64, _ = ref.block_sparse_attention(qh, kh, vh, bm, cfg, query_blocks=blocks)
    lp, _ = ref.block_sparse_attention(qh, kh, vh, bm, cfg, precision=qh.dtype, query_blocks=blocks)
    got = host(out, G, rows)
    return check_attention(got.astype(np.float64), ref64, lp, qh.dtype)


# ----------------------------------------------------------------------------- main
def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="unisparse-ref bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="8192,16384,32768,65536,131072", help="sequence lengths N (Nq = Nk)")
    p.add_argument("--head-dims", default="128,64", help="head dims D")
    p.add_argument("--d64-sizes", default=None, help="sizes for the smaller head dims (default: --sizes)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--densities", default="0.1,0.3", help="sparse masks: fractions of the causal blocks")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--input-sets", type=int, default=2, help="input sets rotated between calls")
    p.add_argument("--budget-s", type=float, default=2.0, help="time budget per measurement (fewer repeats if slow)")
    p.add_argument("--versions", default="default", help="our kernel versions to time: 'default', 'all' or e.g. '6,7'")
    p.add_argument("--contenders", default="all",
                   help="comma list from ours,sdpa-flash,sdpa-cudnn,flex,pipeline,numba (or 'all')")
    p.add_argument("--pipeline-sizes", default=None, help="sizes for the whole pipeline (default: --sizes)")
    p.add_argument("--pipeline-head-dims", default=None, help="head dims for the pipeline (default: --head-dims)")
    p.add_argument("--pipeline-dtype", default=None, choices=["bfloat16", "float16"],
                   help="dtype of the pipeline run (default: --dtype)")
    p.add_argument("--numba-max", type=int, default=4096, help="largest N for the numba prototype")
    p.add_argument("--no-ceilings", action="store_true")
    p.add_argument("--out-dir", default="bench_out")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only redraw bench.png (into --out-dir) from a bench.json; no GPU needed")
    return p.parse_args(list(argv))


def _ints(s: str | None) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()] if s else []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.replot:
        try:
            data = json.loads(Path(args.replot).read_text())
            data["rows"], data["meta"]  # noqa: B018 - the keys a bench.json has
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"unisparse-ref bench: cannot replot {args.replot!r}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        _plot(Path(args.out_dir), data["rows"], data["meta"])
        print(f"wrote {Path(args.out_dir) / 'bench.png'}")
        return 0
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        print(f"unisparse-ref bench: needs CuPy and a CUDA GPU ({e})", file=sys.stderr)
        return 2
    from .cupy_backend import attention as att

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    want = {"ours", "sdpa-flash", "sdpa-cudnn", "flex", "pipeline", "numba"} if args.contenders == "all" \
        else set(args.contenders.split(","))
    if args.versions == "default":
        versions: list[int | None] = [None]
    elif args.versions == "all":
        versions = [v for v in sorted(att.KERNEL_VERSIONS) if att.KERNEL_VERSIONS[v].tensor_core]
    else:
        versions = _ints(args.versions)
    causal = not args.non_causal
    B, Hq, Hkv, S, dt = args.batch, args.q_heads, args.kv_heads, args.block_size, args.dtype
    densities = [float(x) for x in args.densities.split(",") if x.strip()]

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "gpu": gpu,
        "argv": list(sys.argv[1:] if argv is None else argv), "cupy": cp.__version__,
        "default_version": att.DEFAULT_VERSION,
    }
    th = _Torch() if want & {"sdpa-flash", "sdpa-cudnn", "flex"} else None
    if th is not None:
        meta["torch"] = getattr(th.torch, "__version__", None) if th.torch else th.why
    print(f"# unisparse-ref bench on {gpu} ({meta['date']}); B={B} Hq={Hq} Hkv={Hkv} S={S} {dt} causal={causal}")
    if not args.no_ceilings:
        ceil = measure_ceilings(dt)
        meta["ceilings"] = ceil
        print("# ceilings: " + ", ".join(f"{k} = {v:.1f}" for k, v in ceil.items()))

    rows: list[dict[str, Any]] = []

    def record(N: int, D: int, mode: str, contender: str, t: dict[str, float] | None, pairs: float,
               density: float, note: str = "") -> None:
        row = {"N": N, "D": D, "mode": mode, "contender": contender, "density": round(density, 4),
               "ms": None, "tflops": None, "note": note}
        if t is not None:
            row.update(ms=t["ms"], tflops=4 * D * pairs / (t["ms"] * 1e-3) / 1e12, n=t["n"])
        rows.append(row)
        with open(out_dir / "bench_rows.jsonl", "a") as f:  # partial results survive a killed run
            f.write(json.dumps(row) + "\n")
        ms = f"{row['ms']:.3f} ms" if row["ms"] is not None else "   -    "
        tf = f"{row['tflops']:.1f} TFLOP/s" if row["tflops"] is not None else note
        print(f"  N={N:>6} D={D:>3} {mode:<10} {contender:<16} {ms:>12}  {tf}", flush=True)

    wrong: list[str] = []  # contenders refused by the correctness gate

    def guarded(N: int, D: int, mode: str, contender: str, pairs: float, density: float,
                fn: Callable[[], dict[str, float]], check: Callable[[], Any] | None = None) -> None:
        """Check (when ``check`` is given) and only then time; a contender that cannot run this
        shape is reported, not fatal; one that runs and is wrong is refused and remembered."""
        try:
            note = ""
            if check is not None:
                res = check()
                if not res.ok:
                    wrong.append(f"N={N} D={D} {mode} {contender}: {res.message()}")
                    record(N, D, mode, contender, None, pairs, density, note=f"refused: wrong result ({res.message()})")
                    return
                note = f"checked: max err {res.max_error:.2e} <= {res.tolerance:.2e}"
            t = fn()
            record(N, D, mode, contender, t, pairs, density, note=note)
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            record(N, D, mode, contender, None, pairs, density, note=f"failed ({msg})")

    kw = {"warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget_s}
    head_dims = _ints(args.head_dims)
    for D in head_dims:
        sizes = _ints(args.sizes) if D == head_dims[0] or not args.d64_sizes else _ints(args.d64_sizes)
        for N in sizes:
            sets = [_make_inputs(B, Hq, Hkv, N, D, dt, seed=100 * N + D + s) for s in range(args.input_sets)]
            vis = geometry.visible_blocks(N, N, S, causal)
            dense_mask = np.broadcast_to(vis, (B, Hq, *vis.shape))

            def gate(call: Callable[[], Any], mask: np.ndarray, s0: Any = sets[0], N: int = N) -> Callable[[], Any]:
                """The correctness check of one contender: its output on input set 0 vs the reference."""
                return lambda: reference_check(call(), *s0, mask, S=S, causal=causal)

            dense_pairs = allowed_pairs(dense_mask, N, N, S, causal)
            # ---- dense
            if "ours" in want:
                counts, idx = att.dense_indices(B, Hq, N, N, S, causal)
                for ver in versions:
                    name = f"ours-v{ver or att.DEFAULT_VERSION}"
                    calls = [lambda s=s, ver=ver, counts=counts, idx=idx, N=N: att.attention_forward(
                        *s, counts, idx, nq=N, nk=N, block_size=S, heads_per_mask=1, causal=causal,
                        softmax_scale=None, version=ver)[0] for s in sets]
                    guarded(N, D, "dense", name, dense_pairs, 1.0, lambda calls=calls: time_calls(calls, **kw),
                            check=gate(calls[0], dense_mask))
            if th is not None and th.torch is not None:
                tsets = [tuple(_to_torch(x, dt) for x in s) for s in sets]
                for be in ("flash", "cudnn"):
                    if f"sdpa-{be}" in want:
                        f = th.sdpa(be)
                        calls = [lambda s=s, f=f: f(*s, causal) for s in tsets]
                        guarded(N, D, "dense", f"sdpa-{be}", dense_pairs, 1.0,
                                lambda calls=calls: time_calls(calls, events="torch", **kw),
                                check=gate(calls[0], dense_mask))
            # ---- sparse with a given mask
            for dens in densities:
                mask = random_block_mask(B, Hq, N, N, S, dens, causal, seed=N + D)
                pairs = allowed_pairs(mask, N, N, S, causal)
                real = float(mask.sum() / (vis.sum() * B * Hq))
                mode = f"sparse{int(round(dens * 100))}"
                if "ours" in want:
                    m_cp = cp.asarray(mask)
                    from .blockmask import BlockMask

                    counts, idx = BlockMask(m_cp, S, 1, N, N, causal).to_indices()
                    for ver in versions:
                        name = f"ours-v{ver or att.DEFAULT_VERSION}"
                        calls = [lambda s=s, ver=ver, counts=counts, idx=idx, N=N: att.attention_forward(
                            *s, counts, idx, nq=N, nk=N, block_size=S, heads_per_mask=1, causal=causal,
                            softmax_scale=None, version=ver)[0] for s in sets]
                        guarded(N, D, mode, name, pairs, real, lambda calls=calls: time_calls(calls, **kw),
                                check=gate(calls[0], mask))
                if "flex" in want and th is not None and th.torch is not None:
                    flex: dict[str, Any] = {}

                    def flex_calls(mask: np.ndarray = mask, N: int = N, sets: list = sets,
                                   flex: dict[str, Any] = flex) -> list[Callable[[], Any]]:
                        if "calls" not in flex:  # compiled once, for the check and the timing
                            fbm = th.flex_block_mask(mask, N, N, S, causal)
                            fx = th.flex()
                            tsets = [tuple(_to_torch(x, dt) for x in s) for s in sets]
                            flex["calls"] = [lambda s=s: fx(*s, block_mask=fbm, enable_gqa=Hq != Hkv) for s in tsets]
                        return flex["calls"]

                    guarded(N, D, mode, "flex", pairs, real,
                            lambda flex_calls=flex_calls: time_calls(flex_calls(), events="torch", **kw),
                            check=gate(lambda flex_calls=flex_calls: flex_calls()[0](), mask))
                if "numba" in want and N <= args.numba_max:
                    nb: dict[str, Any] = {}

                    def numba_calls(mask: np.ndarray = mask, N: int = N, sets: list = sets,
                                    nb: dict[str, Any] = nb) -> list[Callable[[], Any]]:
                        if "calls" not in nb:
                            nb["calls"] = _numba_calls(sets, mask, N, S, causal)
                        return nb["calls"]

                    guarded(N, D, mode, "numba", pairs, real,
                            lambda numba_calls=numba_calls: time_calls(numba_calls(), **kw),
                            check=gate(lambda numba_calls=numba_calls: numba_calls()[0]()[0], mask))
            cp.get_default_memory_pool().free_all_blocks()
        # ---- whole pipeline on the structured workload
        pdims = _ints(args.pipeline_head_dims) if args.pipeline_head_dims else head_dims
        if "pipeline" in want and D in pdims:
            psizes = _ints(args.pipeline_sizes) if args.pipeline_sizes else sizes
            for N in psizes:
                _bench_pipeline(N, D, B, Hq, Hkv, S, args.pipeline_dtype or dt, causal, kw, record, wrong)

    meta["refused"] = wrong
    _write(out_dir, rows, meta)
    _summary(rows)
    if wrong:
        print(f"\nunisparse-ref bench: {len(wrong)} contender(s) gave wrong results and were not timed:",
              file=sys.stderr)
        for w in wrong:
            print(f"  {w}", file=sys.stderr)
        return 1
    return 0


def _numba_calls(sets: Any, mask: np.ndarray, N: int, S: int, causal: bool) -> list[Callable[[], Any]]:
    """One call of the Numba prototype's block-sparse attention per input set."""
    from .backends import get_backend
    from .blockmask import BlockMask
    from .config import UniSparseConfig

    be = get_backend("numba")
    cfg = UniSparseConfig(block_size=S, causal=causal)
    bm = BlockMask(mask, S, 1, N, N, causal)
    return [lambda s=s: be.block_sparse_attention(*s, bm, cfg) for s in sets]


def _bench_pipeline(N: int, D: int, B: int, Hq: int, Hkv: int, S: int, dt: str, causal: bool,
                    kw: dict[str, Any], record: Callable[..., None], wrong: list[str]) -> None:
    """Estimation (compress, scores, select) + sparse attention with the CuPy backend.

    Checked before it is timed: the output of the whole pipeline against the reference run
    with the mask the pipeline selected (sampled rows, :func:`reference_check`)."""
    import cupy as cp

    from .api import unisparse_attention
    from .backends import get_backend
    from .config import UniSparseConfig
    from .evaluation.workloads import structured_workload

    try:
        be = get_backend("cupy")
    except Exception as e:
        record(N, D, "pipeline", "ours-pipeline", None, 0.0, 0.0, note=f"cupy backend unavailable ({e})")
        return
    wl = structured_workload(N, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, seed=N)
    from ._arrays import BFLOAT16

    def dev(x: np.ndarray) -> Any:
        if dt == "bfloat16":
            from .cupy_backend import as_bfloat16

            return as_bfloat16(cp.asarray(x.astype(BFLOAT16).view(np.uint16)))
        return cp.asarray(x.astype(dt))

    q, k, v = dev(wl.q), dev(wl.k), dev(wl.v)
    cfg = UniSparseConfig(block_size=S, causal=causal)
    state: dict[str, Any] = {}

    def estimate() -> Any:
        qc, kc = be.compress(q, k, cfg)
        sc = be.block_scores(qc, kc, cfg, N, N)
        state["bm"] = be.select_blocks(sc, cfg, N, N)
        return state["bm"]

    def attend() -> Any:
        return be.block_sparse_attention(q, k, v, state["bm"], cfg)

    def whole() -> Any:  # what a user calls: the backend's own pipeline (one input check)
        return unisparse_attention(q, k, v, cfg, backend=be)

    try:
        res = unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
        chk = reference_check(res.out, q, k, v, res.block_mask.mask, S=S, causal=causal,
                              heads_per_mask=res.block_mask.heads_per_mask)
        if not chk.ok:
            wrong.append(f"N={N} D={D} pipeline ours-pipeline: {chk.message()}")
            record(N, D, "pipeline", "ours-pipeline", None, 0.0, 0.0, note=f"refused: wrong result ({chk.message()})")
            return
        t_all = time_calls([whole], **kw)
        t_est = time_calls([estimate], **kw)
        t_att = time_calls([attend], **kw)
        bm = state["bm"]
        mask = cp.asnumpy(bm.mask) if not isinstance(bm.mask, np.ndarray) else bm.mask
        pairs = allowed_pairs(mask, N, N, S, causal, bm.heads_per_mask)
        dens = float(bm.density)
        err = _pipeline_error(be, q, k, v, bm, cfg)
        note = (f"{dt}; estimator {100 * t_est['ms'] / t_all['ms']:.1f}% of the pipeline; "
                f"||out - dense|| / ||dense|| = {err:.3e}")
        record(N, D, "pipeline", "ours-pipeline", t_all, pairs, dens, note=note)
        record(N, D, "pipeline", "ours-estimate", t_est, pairs, dens, note=dt)
        record(N, D, "pipeline", "ours-attend", t_att, pairs, dens, note=dt)
        for name, t, stage_note in _estimator_stages(be, q, k, cfg, N, kw):
            record(N, D, "pipeline", name, t, pairs, dens, note=f"{dt}; {stage_note}")
    except Exception as e:
        record(N, D, "pipeline", "ours-pipeline", None, 0.0, 0.0, note=f"failed ({type(e).__name__}: {e})"[:200])


def _as_float32(x: Any) -> Any:
    """A CuPy float32 copy of a CuPy fp16 / fp32 / bf16 array (bf16: bits shifted into float32)."""
    import cupy as cp

    from ._arrays import BFLOAT16
    from .cupy_backend import BFloat16Array

    if isinstance(x, BFloat16Array):
        bits = x.data
    elif np.dtype(x.dtype) == BFLOAT16:
        bits = x.view(cp.uint16)
    else:
        return x.astype(cp.float32)
    return (bits.astype(cp.uint32) << 16).view(cp.float32)


def _pipeline_error(be: Any, q: Any, k: Any, v: Any, bm: Any, cfg: Any) -> float:
    """``||out - dense|| / ||dense||`` (Frobenius) of the sparse output against our dense mode.

    Both come from the same kernel in the same precision, so the difference is the error the
    block selection causes: the number the demo reports for the reference (against float64).
    """
    import cupy as cp

    out = _as_float32(be.block_sparse_attention(q, k, v, bm, cfg)[0])
    dense = _as_float32(be.dense_attention(q, k, v, cfg.causal, cfg.softmax_scale)[0])
    num = float(cp.linalg.norm((out - dense).ravel()))
    return num / max(float(cp.linalg.norm(dense.ravel())), 1e-30)


def _estimator_stages(be: Any, q: Any, k: Any, cfg: Any, N: int, kw: dict[str, Any]
                      ) -> list[tuple[str, dict[str, float], str]]:
    """The estimator split by stage: pooling, scores (the one-pass kernel), selection."""
    qc, kc = be.compress(q, k, cfg)
    sc = be.block_scores(qc, kc, cfg, N, N)
    out = [("ours-est-compress", time_calls([lambda: be.compress(q, k, cfg)], **kw), "pooling (q and k)"),
           ("ours-est-scores", time_calls([lambda: be.block_scores(qc, kc, cfg, N, N)], **kw),
            "scores (one pass)")]
    out.append(("ours-est-select", time_calls([lambda: be.select_blocks(sc, cfg, N, N)], **kw),
                "selection (mask form)"))
    return out


def _stage_row(r: dict[str, Any]) -> bool:
    """Rows that split the pipeline into parts (not plotted as contenders)."""
    c = r["contender"]
    return c in ("ours-estimate", "ours-attend", "check") or c.startswith("ours-est-")


def _write(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    import csv

    # Ratio of each contender's time to ours (same N, D, mode): > 1 means ours is faster.
    ours = {}
    for r in rows:
        if r["contender"].startswith("ours-v") and r["ms"] is not None:
            key = (r["N"], r["D"], r["mode"])
            ours[key] = min(ours.get(key, math.inf), r["ms"])
    for r in rows:
        o = ours.get((r["N"], r["D"], r["mode"]))
        r["ratio_vs_ours"] = (r["ms"] / o) if (o and r["ms"]) else None
    fields = ["N", "D", "mode", "contender", "density", "ms", "tflops", "ratio_vs_ours", "n", "note"]
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        _plot(out_dir, rows, meta)
    except Exception as e:  # matplotlib missing: the numbers are what matter
        print(f"  (plot skipped: {e})")


def _plot(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Time vs N (log-log) and speedup of ours vs N, one row of panels per head dim.

    Colour = contender, line style = mode. The speedup panel shows each contender's time over
    ours in the same mode, and the whole pipeline against SDPA-FlashAttention dense.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"dense": "-", "sparse10": "--", "sparse30": ":", "pipeline": "-."}
    # Only the plotted contenders get colours (the estimator's stage rows would wrap tab10 around).
    contenders = sorted({r["contender"] for r in rows if r["ms"] is not None and not _stage_row(r)})
    cmap = plt.get_cmap("tab10")
    color = {c: cmap(i % 10) for i, c in enumerate(contenders)}
    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(len(dims), 2, figsize=(13, 4.6 * len(dims)), squeeze=False)
    for ax_row, D in zip(axes, dims, strict=True):
        series: dict[tuple[str, str], list[tuple[int, float, float | None]]] = {}
        for r in rows:
            if r["D"] != D or r["ms"] is None or _stage_row(r):
                continue
            series.setdefault((r["mode"], r["contender"]), []).append((r["N"], r["ms"], r.get("ratio_vs_ours")))
        for (mode, con), pts in sorted(series.items()):
            pts.sort()
            kw = {"color": color[con], "ls": styles.get(mode, "-"), "marker": "o", "label": f"{mode}: {con}"}
            ax_row[0].plot([p[0] for p in pts], [p[1] for p in pts], **kw)
            if not con.startswith("ours"):
                rs = [(p[0], p[2]) for p in pts if p[2]]
                if rs:
                    ax_row[1].plot([x for x, _ in rs], [y for _, y in rs], **kw)
        # The pipeline against dense SDPA-FlashAttention (the "4x" target of the docs).
        fa = {N: ms for (m, c), pts in series.items() if (m, c) == ("dense", "sdpa-flash") for N, ms, _ in pts}
        pipe = sorted(p for (m, c), pts in series.items() if c == "ours-pipeline" for p in pts)
        sp = [(N, fa[N] / ms) for N, ms, _ in pipe if N in fa]
        if sp:
            ax_row[1].plot([x for x, _ in sp], [y for _, y in sp], color="k", ls="-.", marker="s",
                           label="sdpa-flash dense / ours-pipeline")
        ax_row[0].set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms (median)",
                      title=f"time, D={D} ({meta.get('gpu', '')}, {meta.get('date', '')[:10]})")
        ax_row[1].axhline(1.0, color="k", lw=0.8)
        ax_row[1].set(xscale="log", xlabel="sequence length N", ylabel="contender time / ours",
                      title=f"speedup of ours (> 1: ours faster), D={D}")
        for ax in ax_row:
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=110)
    plt.close(fig)


def _summary(rows: list[dict[str, Any]]) -> None:
    print("\n# summary: ms (TFLOP/s) [contender time / ours]")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['N']:>6} D={r['D']:>3} {r['mode']:<10} {r['contender']:<16} {r['note']}")
            continue
        ratio = f"[{r['ratio_vs_ours']:.2f}x]" if r.get("ratio_vs_ours") else ""
        print(f"{r['N']:>6} D={r['D']:>3} {r['mode']:<10} {r['contender']:<16} {r['ms']:9.3f} "
              f"({r['tflops']:6.1f}) {ratio}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
