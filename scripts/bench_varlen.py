"""Serving layouts on the GPU (issue 16): packed ragged batches and chunked prefill on a paged cache.

    python3 scripts/bench_varlen.py [--out DIR] [--quick]

CuPy layer, rung v9 (Hopper), bf16, Hq = 32, Hkv = 8, D = 128, S = 128. Every contender is
checked first on sampled rows against the float64 reference (SPEC 7,
:func:`unisparse_ref.bench.reference_check`); a wrong one is refused and the script exits 1.
Times are medians of CUDA-event timings (:func:`unisparse_ref.bench.time_calls`) over random
data, ratios within one run.

1. **Packed batch**: 16 prompts of mixed lengths (1K to 32K, some not multiples of 128;
   131072 tokens in all), causal, attention stage with every visible block (dense) and with
   a random 20 % block mask:

   * ``packed``: one launch of ``us_fa3_fwd_varlen`` over the packed layout;
   * ``one-seq``: the batch kernel ``us_fa3_fwd`` on ONE sequence of ``L`` tokens with the
     same number of causal (query, key) pairs, ``L (L + 1) = sum N_i (N_i + 1)`` (dense only);
   * ``loop``: the batch kernel once per sequence on per-sequence ``[1, H, N_i, D]`` arrays
     laid out beforehand (no copies, no checks: the best a loop can do);
   * ``loop+copy``: the per-sequence path on the packed arrays (slice, copy to
     ``[1, H, N_i, D]``, launch, copy back): what the CuPy layer did before it had the kernel.

   Targets: packed within 10 % of one-seq; packed >= 1.2x faster than looping.
2. **Chunked prefill**: one 131072-token prompt in 8192-token chunks on a paged KV cache
   (pages of 256 tokens scattered over the pool): per chunk, write its keys and values into
   the pages, pool its keys into the cached composite keys and its queries, score against
   the cached composite keys, select, and attend with ``us_fa3_fwd_varlen`` reading the
   block table. Against the one-shot pipeline (``CupyBackend.unisparse_attention`` on the
   whole prompt). Target: chunked within 1.3x. Scoring and selection run the batch kernels
   on each chunk (the chunk is one sequence); the launchers are called directly (no input
   checks on either side beyond the one-shot pipeline's own); and the same through the public
   API (``CupyPagedKVCache.append``, then ``unisparse_attention_paged(..., backend="cupy")``).
3. **The whole pipeline** on the packed batch (``unisparse_attention_varlen``: packed pooling,
   scoring in one launch of ``us_scores_mma``'s packed mode, selection, the packed attention,
   queued with one read-back at the end) against the batch pipeline
   ``CupyBackend.unisparse_attention`` looped over the sequences and on one sequence of the same
   causal work, and against the chain of the packed stages called one after the other (the
   entry point's path before the queued pipeline; its ``out`` checked bit for bit equal first);
   the packed pipeline is timed again last (the difference shows drift); then its stages one by
   one (the packed scoring against the per-sequence scoring it replaced, checked bit for bit
   equal first).

``--pipeline`` runs section 3 only (about 30 s).

``--final`` is the short run of a shared GPU batch (about 80 s): 1 warm-up, 5 repeats, two tile
orders, and ``--out``'s JSON rewritten after every section.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LENGTHS = [32768 - 77, 16384, 12288, 12288 + 50, 8192, 8192, 8192 - 1, 6144, 6144, 4096, 4096, 4096 + 5,
           3072, 2048 + 23, 2048, 1024]  # 131072 tokens in all (the odd ones sum to 0)
HQ, HKV, D, S = 32, 8, 128, 128


def same_work_length(nq: np.ndarray) -> int:
    """The length ``L`` of one causal sequence with the attention work of the batch ``nq``:
    ``L (L + 1) = sum_i n_i (n_i + 1)`` (rounded)."""
    n = np.asarray(nq, dtype=np.int64)
    work = float((n * (n + 1)).sum())
    return int(round((-1 + math.sqrt(1 + 4 * work)) / 2))


def pipeline_workload(seed: int = 0) -> dict[str, Any]:
    """Section 3's inputs for the diagnostic scripts (``timing_varlen.py``, ``host_profile_varlen.py``,
    ``profile_varlen.py``): the CuPy backend ``be``; the packed batch of :data:`LENGTHS` ``q [T, HQ, D]``,
    ``k``, ``v [T, HKV, D]`` (bf16, random) with offsets ``cu``; one sequence of the same causal work
    ``q1 [1, HQ, L, D]``, ``k1``, ``v1`` and its ``L``; the default config at ``S`` (``cfg``)."""
    import cupy as cp

    import unisparse_ref as us
    from unisparse_ref import UniSparseConfig
    from unisparse_ref.bench import _bf16_bits
    from unisparse_ref.cupy_backend import as_bfloat16

    nq = np.array(LENGTHS, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    T, L = int(cu[-1]), same_work_length(nq)
    rs = cp.random.RandomState(seed)

    def bf16(shape: tuple[int, ...]) -> Any:
        return as_bfloat16(_bf16_bits(rs.standard_normal(shape, dtype=cp.float32)))

    q, k, v = (bf16((T, h, D)) for h in (HQ, HKV, HKV))
    q1, k1, v1 = (bf16((1, h, L, D)) for h in (HQ, HKV, HKV))
    return {"be": us.get_backend("cupy"), "q": q, "k": k, "v": v, "cu": cu, "q1": q1, "k1": k1, "v1": v1, "L": L,
            "cfg": UniSparseConfig(block_size=S)}


def _dense_packed_mask(nq: np.ndarray, nk: np.ndarray, Hm: int, density: float | None, seed: int) -> tuple[Any, ...]:
    """Packed index form of every sequence's causal mask: all visible blocks, or a random
    ``density`` of them (sink and diagonal blocks kept), built on the host."""
    from unisparse_ref import geometry
    from unisparse_ref.bench import random_block_mask

    W = max(geometry.num_blocks(int(n), S) for n in nk)
    counts, indices, masks = [], [], []
    for i, (a, b) in enumerate(zip(nq.tolist(), nk.tolist(), strict=True)):
        if density is None:
            m = np.broadcast_to(geometry.visible_blocks(a, b, S, True), (1, Hm) + geometry.visible_blocks(a, b, S, True).shape)
        else:
            m = random_block_mask(1, Hm, a, b, S, density, True, seed=seed + i)
        m = np.ascontiguousarray(m)
        masks.append(m)
        c = m.sum(axis=-1).astype(np.int32)[0]
        idx = np.full(m.shape[1:3] + (W,), -1, np.int32)
        for h in range(Hm):
            for r in range(m.shape[2]):
                sel = np.flatnonzero(m[0, h, r])
                idx[h, r, : sel.size] = sel
        counts.append(c)
        indices.append(idx)
    return np.concatenate(counts, axis=1), np.concatenate(indices, axis=1), masks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for bench_varlen.json")
    p.add_argument("--quick", action="store_true", help="fewer repeats, packed batch only at density 1")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--pipeline", action="store_true", help="section 3 only: the whole packed pipeline and its stages")
    p.add_argument("--final", action="store_true",
                   help="the short run of a shared batch (at most about 80 s): 1 warm-up and 5 repeats, two tile "
                        "orders; sections in the order packed, chunked, pipeline; the JSON rewritten after each")
    args = p.parse_args(argv)

    import cupy as cp

    import unisparse_ref as us
    from unisparse_ref import UniSparseConfig, geometry
    from unisparse_ref._arrays import packed_offsets
    from unisparse_ref.bench import _bf16_bits, reference_check, time_calls
    from unisparse_ref.cupy_backend import BFloat16Array, _hopper, as_bfloat16
    from unisparse_ref.cupy_backend import varlen as cv
    from unisparse_ref.cupy_backend.attention import dense_indices

    be = us.get_backend("cupy")
    dev = cp.cuda.runtime.getDeviceProperties(0)
    gpu = dev["name"].decode() if isinstance(dev["name"], bytes) else str(dev["name"])
    kw = {"warmup": 1 if args.final else 2, "repeats": 3 if args.quick else 5 if args.final else args.repeats}
    results: dict[str, Any] = {"gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "lengths": LENGTHS, "Hq": HQ, "Hkv": HKV, "D": D, "S": S, "dtype": "bfloat16"}
    wrong: list[str] = []
    scale = 1.0 / math.sqrt(D)

    def save() -> None:  # after every section: a cap that kills the run keeps what was measured
        results["refused"] = wrong
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench_varlen.json").write_text(json.dumps(results, indent=1))

    def check(name: str, chk: Any) -> bool:
        if not chk.ok:
            wrong.append(f"{name}: {chk.message()}")
            print(f"REFUSED {name}: {chk.message()}")
        return chk.ok

    # ------------------------------------------------------------------ 1. packed batch
    nq = np.array(LENGTHS, dtype=np.int64)
    assert nq.sum() == 131072, nq.sum()
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    T = int(cu[-1])
    rs = cp.random.RandomState(0)
    q = _bf16_bits(rs.standard_normal((T, HQ, D), dtype=cp.float32))
    k = _bf16_bits(rs.standard_normal((T, HKV, D), dtype=cp.float32))
    v = _bf16_bits(rs.standard_normal((T, HKV, D), dtype=cp.float32))
    # Per-sequence copies laid out beforehand for the ideal loop.
    seq = [tuple(cp.ascontiguousarray(x[int(cu[i]):int(cu[i + 1])].transpose(1, 0, 2)[None]) for x in (q, k, v))
           for i in range(nq.size)]
    tiles_of = {o: cp.asarray(_hopper.varlen_tiles(cu, nq, cu[:-1], S, True, order=o)) for o in _hopper.VARLEN_ORDERS}
    if args.final:
        del tiles_of["sequence"]
    else:
        for g in (1024, 4096, 8192):  # other buckets of the grouped order (the default is 2048 keys)
            tiles_of[f"grouped{g}"] = cp.asarray(_hopper.varlen_tiles(cu, nq, cu[:-1], S, True, group_keys=g))
    total_qb = int(packed_offsets(cu, S)[-1])
    cfg = UniSparseConfig(block_size=S)
    out_p = cp.empty_like(q)
    lse_p = cp.empty((HQ, T), dtype=cp.float32)
    rows = []
    densities = [None] if args.quick else [None, 0.2]
    for density in [] if args.pipeline else densities:
        tag = "dense" if density is None else f"density {density}"
        counts_h, idx_h, masks = _dense_packed_mask(nq, nq, HQ, density, seed=1)
        counts, idx = cp.asarray(counts_h), cp.asarray(idx_h)
        cu_qb = packed_offsets(cu, S)

        def packed(counts=counts, idx=idx, order="grouped") -> Any:
            return _hopper.fa3_forward_varlen(q, k, v, counts, idx, tiles_of[order], total_qb=total_qb,
                                              block_size=S, heads_per_mask=1, causal=True, softmax_scale=scale,
                                              out=out_p, lse=lse_p)

        stage = us.varlen.native_stage(be, "block_sparse_attention_varlen")

        def packed_api(counts=counts, idx=idx, stage=stage) -> Any:  # the public stage: checks, tile list, launch
            return stage(as_bfloat16(q), as_bfloat16(k), as_bfloat16(v), cu, cu, counts, idx, cfg)

        bms = [us.BlockMask(cp.asarray(m), S, 1, int(n), int(n), True) for m, n in zip(masks, nq.tolist(), strict=True)]
        out_api = cp.empty_like(q)

        def loop_api(bms=bms, out_api=out_api) -> None:  # the backend's batch API once per sequence, on packed views
            for i in range(nq.size):
                sl = slice(int(cu[i]), int(cu[i + 1]))
                view = [as_bfloat16(x[sl].transpose(1, 0, 2)[None]) for x in (q, k, v)]
                o, _ = be.block_sparse_attention(*view, bms[i], cfg)
                bits = o.data if isinstance(o, BFloat16Array) else o.view(cp.uint16)
                out_api[sl] = bits[0].transpose(1, 0, 2)

        per_seq_masks = [(cp.ascontiguousarray(counts[None, :, cu_qb[i]:cu_qb[i + 1]]),
                          cp.ascontiguousarray(idx[None, :, cu_qb[i]:cu_qb[i + 1], :geometry.num_blocks(int(n), S)]))
                         for i, n in enumerate(nq.tolist())]
        outs_l = [cp.empty_like(s[0]) for s in seq]
        lses_l = [cp.empty((1, HQ, int(n)), dtype=cp.float32) for n in nq.tolist()]

        def loop(per_seq_masks=per_seq_masks, outs_l=outs_l, lses_l=lses_l) -> None:
            for i, n in enumerate(nq.tolist()):
                ci, ii = per_seq_masks[i]
                _hopper.fa3_forward(*seq[i], ci, ii, nq=n, nk=n, block_size=S, heads_per_mask=1, causal=True,
                                    softmax_scale=scale, out=outs_l[i], lse=lses_l[i])

        def loop_copy(counts=counts, idx=idx) -> Any:
            return cv._attend_per_sequence(q, k, v, counts, idx, cu, cu, cfg, scale)

        # Correctness first: the packed output on sampled rows of the longest, a middle and
        # the shortest sequence; the loop's outputs equal the packed ones bit for bit.
        packed()
        loop()
        ok = True
        for i in (0, 8, 15):
            sl = slice(int(cu[i]), int(cu[i + 1]))
            view = [x[sl].transpose(1, 0, 2)[None] for x in (q, k, v)]
            ok &= check(f"packed {tag} seq {i}", reference_check(out_p[sl].transpose(1, 0, 2)[None], *view, masks[i],
                                                                 S=S, causal=True))
        same = all(bool(cp.array_equal(out_p[int(cu[i]):int(cu[i + 1])], outs_l[i][0].transpose(1, 0, 2)))
                   for i in range(nq.size))
        if not same:
            wrong.append(f"packed {tag}: differs from the per-sequence batch kernel")
            ok = False
        if not ok:
            continue
        out_ref = out_p.copy()
        for o in tiles_of:  # every order, and the loop over the batch API, give the same bits
            packed(order=o)
            same &= bool(cp.array_equal(out_p, out_ref))
        loop_api()
        same &= bool(cp.array_equal(out_api, out_ref))
        if not same:
            wrong.append(f"packed {tag}: an order or the batch API loop gives other bits")
            continue
        t_order = {o: time_calls([lambda o=o: packed(order=o)], **kw)["ms"] for o in tiles_of}
        t_packed = {"ms": t_order["grouped"]}
        t_api = time_calls([packed_api], **kw)
        t_loop = time_calls([loop], **kw)
        t_copy = time_calls([loop_copy], **kw)
        t_lapi = time_calls([loop_api], **kw)
        row = {"case": f"packed batch, {tag}", "packed_ms": t_packed["ms"], "packed_ms_by_order": t_order,
               "packed_api_ms": t_api["ms"], "loop_ms": t_loop["ms"], "loop_copy_ms": t_copy["ms"],
               "loop_api_ms": t_lapi["ms"], "speedup_vs_loop": t_loop["ms"] / t_packed["ms"],
               "speedup_vs_loop_copy": t_copy["ms"] / t_packed["ms"],
               "speedup_vs_loop_api": t_lapi["ms"] / t_packed["ms"],
               "speedup_api_vs_loop_api": t_lapi["ms"] / t_api["ms"], "bit_identical_to_loop": same}
        if density is None:
            work = float((nq * (nq + 1)).sum())
            L = same_work_length(nq)
            q1, k1, v1 = (_bf16_bits(rs.standard_normal((1, h, L, D), dtype=cp.float32)) for h in (HQ, HKV, HKV))
            c1, i1 = dense_indices(1, HQ, L, L, S, True)
            o1 = cp.empty_like(q1)
            l1 = cp.empty((1, HQ, L), dtype=cp.float32)

            def one(q1=q1, k1=k1, v1=v1, c1=c1, i1=i1, o1=o1, l1=l1, L=L) -> Any:
                return _hopper.fa3_forward(q1, k1, v1, c1, i1, nq=L, nk=L, block_size=S, heads_per_mask=1,
                                           causal=True, softmax_scale=scale, out=o1, lse=l1)

            one()
            vis = np.broadcast_to(geometry.visible_blocks(L, L, S, True), (1, HQ) + geometry.visible_blocks(L, L, S, True).shape)
            if check(f"one-seq L={L}", reference_check(o1, q1, k1, v1, np.ascontiguousarray(vis), S=S, causal=True)):
                t_one = time_calls([one], **kw)
                row.update({"one_seq_L": L, "one_seq_ms": t_one["ms"], "packed_over_one_seq": t_packed["ms"] / t_one["ms"],
                            "tflops_packed": 4 * D * HQ * work / 2 / t_packed["ms"] / 1e9})
        rows.append(row)
        print(json.dumps(row))
        results["packed"] = rows
        save()

    # ------------------------------------------------------------------ 2. chunked prefill
    if not args.quick and not args.pipeline:
        try:
            results["chunked"] = _chunked(be, cp, us, as_bfloat16, _bf16_bits, reference_check, time_calls, cv,
                                          _hopper, kw, check, scale)
        except Exception as e:  # noqa: BLE001 - recorded, and the exit status says so
            wrong.append(f"chunked section failed: {type(e).__name__}: {e}"[:300])
            print("FAILED chunked section:", repr(e)[:300])
        save()
        cp.get_default_memory_pool().free_all_blocks()

    # ------------------------------------------------------------------ 3. the whole pipeline, packed
    if not args.quick:
        try:
            results["pipeline"] = _pipeline(be, cp, us, as_bfloat16, _bf16_bits, reference_check, time_calls, kw,
                                            check, q, k, v, seq, cu, nq, rs)
        except Exception as e:  # noqa: BLE001
            wrong.append(f"pipeline section failed: {type(e).__name__}: {e}"[:300])
            print("FAILED pipeline section:", repr(e)[:300])
        save()
    print(json.dumps({k: v for k, v in results.items() if k not in ("packed", "chunked", "pipeline")}))
    save()
    _summary(results)
    return 1 if wrong else 0


def _pipeline(be, cp, us, as_bfloat16, bf16_bits, reference_check, time_calls, kw, check, q, k, v, seq, cu, nq, rs):
    """The whole UniSparse pipeline on the packed batch (``unisparse_attention_varlen``: packed pooling,
    scoring in one launch, selection, packed attention in one launch) against the batch pipeline
    ``CupyBackend.unisparse_attention`` looped over the sequences (arrays laid out per sequence
    beforehand) and on one sequence of the same causal work; then the packed stages one by one, the
    scoring against the per-sequence scoring (``varlen._block_scores_per_sequence``, the path before
    the packed kernel), whose scores must be the packed ones bit for bit."""
    from unisparse_ref import UniSparseConfig
    from unisparse_ref.cupy_backend import BFloat16Array

    def bits(x: Any) -> Any:  # a bf16 result as its uint16 bits (what reference_check reads)
        return x.data if isinstance(x, BFloat16Array) else x.view(cp.uint16)

    cfg = UniSparseConfig(block_size=S)
    qb, kb, vb = (as_bfloat16(x) for x in (q, k, v))
    seq_b = [tuple(as_bfloat16(x) for x in s_) for s_ in seq]

    def packed() -> Any:
        return us.unisparse_attention_varlen(qb, kb, vb, cu, cu, cfg, backend=be)

    def loop() -> None:
        for s_ in seq_b:
            be.unisparse_attention(*s_, cfg)

    stage = {n: us.varlen.native_stage(be, n) for n in ("compress_varlen", "block_scores_varlen",
                                                         "select_blocks_varlen", "block_sparse_attention_varlen")}

    def staged() -> Any:  # the chain of the packed stages (the entry point's path before the queued pipeline)
        q_c, k_c = stage["compress_varlen"](qb, kb, cu, cu, cfg)
        s_ = stage["block_scores_varlen"](q_c, k_c, cu, cu, cfg)
        c_, i_ = stage["select_blocks_varlen"](s_, cu, cu, cfg, check_finite=False)
        return stage["block_sparse_attention_varlen"](qb, kb, vb, cu, cu, c_, i_, cfg, check_finite=False)[0]

    res = us.unisparse_attention_varlen(qb, kb, vb, cu, cu, cfg, backend=be, return_details=True)
    out = bits(res.out)
    ok = True
    if not bool(cp.array_equal(bits(staged()), out)):
        wrong_ = "the queued pipeline's out differs from the chain of the packed stages"
        print("REFUSED", wrong_)
        return {"refused": wrong_}
    for i in (0, 8, 15):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        view = [x[sl].transpose(1, 0, 2)[None] for x in (q, k, v)]
        ok &= check(f"packed pipeline seq {i}", reference_check(out[sl].transpose(1, 0, 2)[None], *view,
                                                                res.block_mask(i).mask, S=S, causal=True))
    L = same_work_length(nq)
    raw = [bf16_bits(rs.standard_normal((1, h, L, D), dtype=cp.float32)) for h in (HQ, HKV, HKV)]
    q1, k1, v1 = (as_bfloat16(x) for x in raw)
    one_res = be.unisparse_attention(q1, k1, v1, cfg)
    ok &= check(f"one-seq pipeline L={L}", reference_check(bits(one_res[0]), *raw, one_res[2].mask, S=S, causal=True))
    if not ok:
        return {"refused": True}
    t_packed = time_calls([packed], **kw)
    t_loop = time_calls([loop], **kw)
    t_one = time_calls([lambda: be.unisparse_attention(q1, k1, v1, cfg)], **kw)
    t_staged = time_calls([staged], **kw)
    t_packed2 = time_calls([packed], **kw)  # again after the others: drift shows as a difference
    row = {"case": "whole pipeline, packed batch (P = 0.9, random data)", "packed_ms": t_packed["ms"],
           "packed_again_ms": t_packed2["ms"], "staged_ms": t_staged["ms"],
           "staged_over_one_seq": t_staged["ms"] / t_one["ms"],
           "loop_ms": t_loop["ms"], "one_seq_ms": t_one["ms"], "one_seq_L": L,
           "speedup_vs_loop": t_loop["ms"] / t_packed["ms"], "packed_over_one_seq": t_packed["ms"] / t_one["ms"],
           "density": float(res.density), "one_seq_density": float(one_res[2].density)}
    row["stages"] = _stages(be, cp, us, time_calls, kw, qb, kb, vb, cu, cfg)
    try:
        row["kernels"] = _kernel_pairs(cp, time_calls, kw, qb, kb, vb, cu, cfg, q1, k1, v1)
    except Exception as e:  # a diagnostic: its failure is reported, the timed rows above stand
        row["kernels_error"] = f"{type(e).__name__}: {e}"[:300]
        print("kernel pairs failed:", row["kernels_error"])
    # the ratio again, the two calls interleaved one by one (packed, one, packed, one, ...: both under
    # the same clocks and temperature), each between two CUDA events, medians of each
    row.update(_interleaved(cp, packed, lambda: be.unisparse_attention(q1, k1, v1, cfg), 3 * kw["repeats"]))
    print(json.dumps(row))
    if "refused" in row["stages"]:  # recorded by the caller: the run exits 1
        raise RuntimeError(f"packed pipeline stages: {row['stages']['refused']}")
    return row


def _interleaved(cp, fa, fb, rounds: int) -> dict[str, float]:
    """``fa`` and ``fb`` called alternately ``rounds`` times each after one warm-up call each, every
    call timed by CUDA events around it (both end with their own read-back, as the public calls do):
    the medians and the ratio of the medians."""
    fa(), fb()
    cp.cuda.Device().synchronize()
    ev = []
    for _ in range(rounds):
        for f in (fa, fb):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            f()
            b.record()
            ev.append((a, b))
    cp.cuda.Device().synchronize()
    t = [cp.cuda.get_elapsed_time(a, b) for a, b in ev]
    ma, mb = float(np.median(t[0::2])), float(np.median(t[1::2]))
    return {"interleaved_packed_ms": ma, "interleaved_one_seq_ms": mb, "packed_over_one_seq_interleaved": ma / mb,
            "interleaved_rounds": rounds}


def _kernel_pairs(cp, time_calls, kw, qb, kb, vb, cu, cfg, q1, k1, v1):
    """Each stage's kernels alone (no checks, no host tables built inside the timing: what the
    queued pipelines launch), packed batch against the one sequence of the same causal work:
    median ms of each, and their ratio."""
    from unisparse_ref import BlockMask
    from unisparse_ref._arrays import packed_offsets
    from unisparse_ref.cupy_backend import _device, _hopper, attention, pooling, selection
    from unisparse_ref.cupy_backend import scores as sc
    from unisparse_ref.cupy_backend import varlen as cv

    (qd, dt), (kd, _), (vd, _) = (_device.device_input(n, x) for n, x in (("q", qb), ("k", kb), ("v", vb)))
    q1d, k1d, v1d = (_device.device_input(n, x)[0] for n, x in (("q", q1), ("k", k1), ("v", v1)))
    Hm, Dh, S = int(qd.shape[1]) // cfg.c_h, int(qd.shape[2]), cfg.block_size
    L = int(q1d.shape[2])
    offs = _device.upload_int32(cu, packed_offsets(cu, cfg.c_q), cu, packed_offsets(cu, cfg.c_k))
    lc = sc.device_packed_launch_config(cu, cu, Hm, Dh, cfg)
    row_table = selection.packed_row_table(cu, cu, S)
    nk = np.diff(cu)
    dev = _device.upload_int32(*sc.packed_host_tables(lc), row_table, _hopper.varlen_tiles(cu, nk, cu[:-1], S, True))
    qc = cv.launch_pool_varlen(qd, dt, cu, cfg.c_q, cfg.c_h, (offs[0], offs[1]))
    kc = cv.launch_pool_varlen(kd, dt, cu, cfg.c_k, 1, (offs[2], offs[3]))
    s_p = sc.launch_scores_packed(qc, kc, cu, cu, cfg, lc=lc, device_tables=tuple(dev[:3]))
    c_p, i_p = selection.launch_select_packed(s_p, row_table, cfg, device_table=dev[3])
    q1c = pooling.launch_pool(q1d, dt, cfg.c_q, cfg.c_h)
    k1c = pooling.launch_pool_keys(k1d, dt, cfg.c_k)
    s_1 = sc.launch_scores(q1c, k1c, cfg, L, L)
    m_1, c_1, i_1 = selection.launch_select(s_1, cfg, L, L, with_indices=True)
    bm = BlockMask(m_1, S, cfg.c_h, L, L, True)
    scale = cfg.scale_for(Dh)
    pairs = {
        "pool": (lambda: (cv.launch_pool_varlen(qd, dt, cu, cfg.c_q, cfg.c_h, (offs[0], offs[1])),
                          cv.launch_pool_varlen(kd, dt, cu, cfg.c_k, 1, (offs[2], offs[3]))),
                 lambda: (pooling.launch_pool(q1d, dt, cfg.c_q, cfg.c_h), pooling.launch_pool_keys(k1d, dt, cfg.c_k))),
        "scores": (lambda: sc.launch_scores_packed(qc, kc, cu, cu, cfg, lc=lc, device_tables=tuple(dev[:3])),
                   lambda: sc.launch_scores(q1c, k1c, cfg, L, L)),
        "select": (lambda: selection.launch_select_packed(s_p, row_table, cfg, device_table=dev[3]),
                   lambda: selection.launch_select(s_1, cfg, L, L, with_indices=True)),
        "attention": (lambda: cv._attend_v9(qd, kd, vd, c_p, i_p, cu, nk, cu[:-1], cfg, scale, tiles=dev[4]),
                      lambda: attention.attend(q1d, k1d, v1d, c_1, i_1, bm, scale)),
        "nonfinite_counts": (lambda: _device.nonfinite_counts(("q", qc, np.dtype(np.float32)),
                                                              ("k", kc, np.dtype(np.float32)), ("v", vd, dt)),
                             lambda: _device.nonfinite_counts(("q", q1c, np.dtype(np.float32)),
                                                              ("k", k1c, np.dtype(np.float32)), ("v", v1d, dt))),
    }
    out = {}
    for name, (fp, f1) in pairs.items():
        tp, t1 = time_calls([fp], **kw)["ms"], time_calls([f1], **kw)["ms"]
        out[name] = {"packed_ms": tp, "one_seq_ms": t1, "ratio": tp / t1}
    return out


def _stages(be, cp, us, time_calls, kw, qb, kb, vb, cu, cfg):
    """The packed pipeline's stages one by one (median ms each), and the packed scoring against the
    per-sequence scoring it replaced (refused unless their scores are the same bits)."""
    from unisparse_ref._arrays import packed_offsets
    from unisparse_ref.cupy_backend import scores as sc
    from unisparse_ref.cupy_backend import varlen as cv

    stage = {n: us.varlen.native_stage(be, n) for n in ("compress_varlen", "block_scores_varlen",
                                                         "select_blocks_varlen", "block_sparse_attention_varlen")}
    q_c, k_c = stage["compress_varlen"](qb, kb, cu, cu, cfg)
    scores = stage["block_scores_varlen"](q_c, k_c, cu, cu, cfg)
    cu_r, cu_c = packed_offsets(cu, cfg.c_q), packed_offsets(cu, cfg.c_k)

    def per_seq() -> Any:
        return cv._block_scores_per_sequence(be, q_c, k_c, cu, cu, cu_r, cu_c, cfg)

    if not bool(cp.array_equal(per_seq(), scores)):
        return {"refused": "the packed scores differ from the per-sequence scores"}
    counts, idx = stage["select_blocks_varlen"](scores, cu, cu, cfg, check_finite=False)
    out = {"packed_scoring_one_launch": sc.packed_applicable(cfg, int(q_c.shape[2])), "scores_bit_identical": True}
    for name, fn in (("compress", lambda: stage["compress_varlen"](qb, kb, cu, cu, cfg)),
                     ("scores_packed", lambda: stage["block_scores_varlen"](q_c, k_c, cu, cu, cfg)),
                     ("scores_per_sequence", per_seq),
                     ("select", lambda: stage["select_blocks_varlen"](scores, cu, cu, cfg, check_finite=False)),
                     ("attention", lambda: stage["block_sparse_attention_varlen"](qb, kb, vb, cu, cu, counts, idx, cfg))):
        out[f"{name}_ms"] = time_calls([fn], **kw)["ms"]
    out["scores_speedup"] = out["scores_per_sequence_ms"] / out["scores_packed_ms"]
    return out


def _chunked(be, cp, us, as_bfloat16, bf16_bits, reference_check, time_calls, cv, hopper, kw, check, scale):
    from unisparse_ref import UniSparseConfig, geometry

    L, C, PS = 131072, 8192, 256
    cfg = UniSparseConfig(block_size=S)
    rs = cp.random.RandomState(1)
    q = bf16_bits(rs.standard_normal((L, HQ, D), dtype=cp.float32))  # packed prompt [L, Hq, D]
    k = bf16_bits(rs.standard_normal((L, HKV, D), dtype=cp.float32))
    v = bf16_bits(rs.standard_normal((L, HKV, D), dtype=cp.float32))
    qb, kb, vb = (as_bfloat16(cp.ascontiguousarray(x.transpose(1, 0, 2)[None])) for x in (q, k, v))
    n_pages = L // PS + 8
    order = np.random.default_rng(2).permutation(n_pages)[: L // PS]  # pages scattered over the pool
    table = cp.asarray(order[None].astype(np.int32))
    k_pages = cp.zeros((n_pages, PS, HKV, D), dtype=cp.uint16)
    v_pages = cp.zeros_like(k_pages)
    kc_cache = cp.zeros((L // cfg.c_k, HKV, D), dtype=cp.float32)  # composite keys kept with the cache
    dt = np.dtype(us.BFLOAT16)
    Hm = HQ // cfg.c_h
    state: dict[str, Any] = {}

    def chunk(start: int) -> Any:
        end = start + C
        pages = table[0, start // PS:end // PS]
        k_pages[pages] = k[start:end].reshape(-1, PS, HKV, D)  # write the chunk into its pages
        v_pages[pages] = v[start:end].reshape(-1, PS, HKV, D)
        cu_c = np.array([0, C], np.int32)
        kc_cache[start // cfg.c_k:end // cfg.c_k] = cv.launch_pool_varlen(k[start:end], dt, cu_c, cfg.c_k, 1)
        q_c = cv.launch_pool_varlen(q[start:end], dt, cu_c, cfg.c_q, cfg.c_h)  # [C / c_q, Hm, D]
        sc = be.block_scores(q_c.transpose(1, 0, 2)[None], kc_cache[: end // cfg.c_k].transpose(1, 0, 2)[None],
                             cfg, C, end)
        bm, counts, idx = be.select_blocks_indices(sc, cfg, C, end)
        tiles = cp.asarray(hopper.varlen_tiles(np.array([0, C]), np.array([end]), np.array([0]), S, True))
        out, lse = hopper.fa3_forward_varlen(
            q[start:end], k_pages.reshape(-1, HKV, D), v_pages.reshape(-1, HKV, D), counts.reshape(Hm, -1),
            idx.reshape(Hm, idx.shape[2], idx.shape[3]), tiles, total_qb=C // S, block_size=S,
            heads_per_mask=cfg.c_h, causal=True, softmax_scale=scale, block_table=table, page_size=PS)
        state[start] = (out, bm)
        return out

    def chunked() -> None:
        for start in range(0, L, C):
            chunk(start)

    def one_shot() -> Any:
        return be.unisparse_attention(qb, kb, vb, cfg)

    # The same through the public API: CupyPagedKVCache.append, then unisparse_attention_paged.
    from unisparse_ref.cupy_backend.varlen import CupyPagedKVCache

    dcache = CupyPagedKVCache.for_config(cfg, n_pages, PS, HKV, D, dtype=us.BFLOAT16,
                                         page_order=np.random.default_rng(3).permutation(n_pages))

    def chunked_api(details: bool = False) -> Any:
        dcache.clear()
        res = None
        for start in range(0, L, C):
            dcache.append(as_bfloat16(k[start:start + C]), as_bfloat16(v[start:start + C]))
            res = us.unisparse_attention_paged(as_bfloat16(q[start:start + C]), dcache, [0, C], cfg, backend=be,
                                               return_details=details and start == L - C)
        return res

    chunked()
    one = be.unisparse_attention(qb, kb, vb, cfg)
    ok = check("one-shot pipeline", reference_check(one[0], qb, kb, vb, one[2].mask, S=S, causal=True))
    for start in (0, L // 2, L - C):
        out, bm = state[start]
        end = start + C
        view_q = q[start:end].transpose(1, 0, 2)[None]
        view_k, view_v = (x[:end].transpose(1, 0, 2)[None] for x in (k, v))
        ok &= check(f"chunk at {start}", reference_check(out.transpose(1, 0, 2)[None], view_q, view_k, view_v,
                                                          bm.mask, S=S, causal=True))
    last = chunked_api(details=True)
    from unisparse_ref.cupy_backend import BFloat16Array

    out_api = last.out.data if isinstance(last.out, BFloat16Array) else last.out.view(cp.uint16)
    ok &= check("chunked through the API, last chunk", reference_check(
        out_api.transpose(1, 0, 2)[None], q[L - C:].transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None],
        v.transpose(1, 0, 2)[None], last.block_mask(0).mask, S=S, causal=True))
    if not ok:
        return {"refused": True}
    t_chunk = time_calls([chunked], **kw)
    t_api = time_calls([chunked_api], **kw)
    t_one = time_calls([one_shot], **kw)
    dens_one = float(one[2].density)
    row = {"case": f"chunked prefill {L} in {C}-token chunks, pages of {PS}", "chunked_ms": t_chunk["ms"],
           "one_shot_ms": t_one["ms"], "chunked_over_one_shot": t_chunk["ms"] / t_one["ms"],
           "chunked_api_ms": t_api["ms"], "chunked_api_over_one_shot": t_api["ms"] / t_one["ms"],
           "one_shot_density": dens_one,
           "last_chunk_density": float(state[L - C][1].density)}
    print(json.dumps(row))
    _ = geometry
    return row


def _summary(results: dict[str, Any]) -> None:
    print("\n=== bench_varlen summary", results["gpu"], results["date"])
    for r in results.get("packed", []):
        orders = ", ".join(f"{o} {t:.3f}" for o, t in r["packed_ms_by_order"].items())
        line = (f"{r['case']}: packed {r['packed_ms']:.3f} ms (orders: {orders}; through the stage API "
                f"{r['packed_api_ms']:.3f}); loop {r['loop_ms']:.3f} ms ({r['speedup_vs_loop']:.2f}x); "
                f"loop+copy {r['loop_copy_ms']:.3f} ms ({r['speedup_vs_loop_copy']:.2f}x); loop over the batch API "
                f"{r['loop_api_ms']:.3f} ms ({r['speedup_vs_loop_api']:.2f}x, stage API {r['speedup_api_vs_loop_api']:.2f}x)")
        if "one_seq_ms" in r:
            line += (f"; one seq L={r['one_seq_L']} {r['one_seq_ms']:.3f} ms (packed/one = "
                     f"{r['packed_over_one_seq']:.3f}; target <= 1.10)")
        print(line)
    p = results.get("pipeline")
    if p and "packed_ms" in p:
        print(f"{p['case']}: packed {p['packed_ms']:.2f} ms (again {p['packed_again_ms']:.2f}); loop of the batch "
              f"pipeline {p['loop_ms']:.2f} ms ({p['speedup_vs_loop']:.2f}x); one sequence L={p['one_seq_L']} "
              f"{p['one_seq_ms']:.2f} ms (packed/one = {p['packed_over_one_seq']:.3f}; target <= 1.10); the chain "
              f"of packed stages {p['staged_ms']:.2f} ms ({p['staged_over_one_seq']:.3f}); densities "
              f"{p['density']:.3f} / {p['one_seq_density']:.3f}")
        st = p.get("stages", {})
        if "scores_packed_ms" in st:
            print(f"  stages: compress {st['compress_ms']:.2f} ms, scores {st['scores_packed_ms']:.2f} ms (one launch: "
                  f"{st['packed_scoring_one_launch']}; per sequence {st['scores_per_sequence_ms']:.2f} ms, "
                  f"{st['scores_speedup']:.2f}x; bits equal), select {st['select_ms']:.2f} ms, attention "
                  f"{st['attention_ms']:.2f} ms")
        elif st:
            print("  stages:", st)
        for name, kp in p.get("kernels", {}).items():
            print(f"  kernels {name}: packed {kp['packed_ms']:.3f} ms, one sequence {kp['one_seq_ms']:.3f} ms "
                  f"({kp['ratio']:.3f})")
        if "packed_over_one_seq_interleaved" in p:
            print(f"  interleaved call by call ({p['interleaved_rounds']} each): packed {p['interleaved_packed_ms']:.2f} "
                  f"ms, one sequence {p['interleaved_one_seq_ms']:.2f} ms: packed/one = "
                  f"{p['packed_over_one_seq_interleaved']:.3f} (target <= 1.10)")
    c = results.get("chunked")
    if c and "chunked_ms" in c:
        print(f"{c['case']}: {c['chunked_ms']:.2f} ms vs one-shot {c['one_shot_ms']:.2f} ms "
              f"= {c['chunked_over_one_shot']:.3f} (target <= 1.3); through the API (CupyPagedKVCache + "
              f"unisparse_attention_paged) {c['chunked_api_ms']:.2f} ms = {c['chunked_api_over_one_shot']:.3f}")
    if results.get("refused"):
        print("REFUSED:", results["refused"])


if __name__ == "__main__":
    sys.exit(main())
