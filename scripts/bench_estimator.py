#!/usr/bin/env python3
"""Issue 13 on the GPU: the estimator's scaling and the pipeline's fixed cost (CuPy layer).

For N = 8K ... 1M tokens (random bf16, B=1, Hq=32, Hkv=8, D=128, the default config: S=128,
c_q=c_k=16, c_h=1, P=0.9, causal), each estimator stage (pooling, scores, selection) and the
sparse attention are timed alone, plus the issue's c_h=4 case at 1M:

* correctness first, refusing to time a wrong stage: pooled tokens on sampled rows against the
  float64 mean, scores of sampled query blocks against the reference (within ``score_eps``),
  the selection on sampled rows against the reference on the GPU's own scores (bit-identical
  masks), the index form against the mask; at N <= 128K the pipeline's output on sampled rows
  against the float64 reference (SPEC 7);
* CUDA events, one warm-up, medians; at N <= 128K every timed call is replayed from a CUDA
  graph (the kernels' time without Python between them), above it called eagerly;
* per stage: the time, its share of the pipeline, its memory-bandwidth bound (bytes it must
  move / 4.8 TB/s) and for the scores the FMA and tensor-core bounds (FLOPs / 67 and 494 TF/s,
  H200 spec-sheet peaks), and the growth exponent per doubling of N (log2 of the time ratio);
* random data keeps ~90 % of the blocks at P = 0.9, so above 128K the attention is timed on a
  random 10 % block mask (forced blocks included): "pipeline @10 %" = estimator + that
  attention (the issue's 1M case). At N <= 128K the real pipeline is timed too.

Then the small-model shape (B=1, 8K, Hq=9, Hkv=3, D=64, bf16, P=0.9, causal; the structured
workload) and the pipeline at 8K/32K/128K (Hq=32, Hkv=8, D=128, structured workload) against
PyTorch SDPA (FlashAttention and cuDNN backends, dense), when PyTorch is importable: eager
(``check_finite`` on and off) and as a CUDA graph (``graph=True``); every contender checked on
sampled rows first.

Usage: ``python scripts/bench_estimator.py [--quick] [--out DIR]``; writes ``DIR/estimator.json``
(default ``$OUT/pipeline``) and prints a summary. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any

import numpy as np

#: H200 SXM spec-sheet peaks (dense): HBM3e bandwidth, bf16 / TF32 tensor cores, FP32 FMA.
PEAK = {"hbm_Bps": 4.8e12, "bf16_flops": 989e12, "tf32_flops": 494e12, "fp32_flops": 67e12}
GRAPH_MAX_N = 131072


def log(*a: Any) -> None:
    print(*a, flush=True)


# ----------------------------------------------------------------------------- timing
def time_call(fn: Any, *, repeats: int, graph: bool) -> dict[str, Any]:
    """Median ms of ``fn()`` with CUDA events: replayed from a captured graph, or called eagerly."""
    import cupy as cp

    fn()  # warm-up (compilation, caches)
    cp.cuda.Device().synchronize()
    times: list[float] = []
    if graph:
        pool = cp.cuda.MemoryPool()
        s = cp.cuda.Stream(non_blocking=True)
        with cp.cuda.using_allocator(pool.malloc), s:
            fn()
            s.synchronize()
            s.begin_capture()
            try:
                keep = fn()
            finally:
                g = s.end_capture()
            g.launch(s)
            for _ in range(repeats):
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record(s)
                g.launch(s)
                b.record(s)
                b.synchronize()
                times.append(cp.cuda.get_elapsed_time(a, b))
        del keep, g
        pool.free_all_blocks()
    else:
        for _ in range(repeats):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
    return {"ms": statistics.median(times), "min_ms": min(times), "n": len(times), "graph": graph}


# ----------------------------------------------------------------------------- data
def random_bf16(shape: tuple[int, ...], seed: int) -> Any:
    """Gaussian bf16 on the device (round to nearest even of float32), as a bf16 device array."""
    import cupy as cp

    from unisparse_ref.cupy_backend import as_bfloat16

    rs = cp.random.RandomState(seed)
    out = cp.empty(shape, dtype=cp.uint16)
    flat = out.reshape(-1)
    step = 1 << 28
    for s0 in range(0, flat.size, step):
        x = rs.standard_normal(min(step, flat.size - s0), dtype=cp.float32).view(cp.uint32)
        flat[s0:s0 + x.size] = ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(cp.uint16)
    return as_bfloat16(out)


def bits(x: Any) -> Any:
    from unisparse_ref.cupy_backend import BFloat16Array

    return x.data if isinstance(x, BFloat16Array) else x.view(np.uint16) if x.dtype != np.uint16 else x


def host_bf16(x: Any) -> np.ndarray:
    from unisparse_ref import BFLOAT16

    return bits(x).get().view(BFLOAT16)


def structured(N: int, Hq: int, Hkv: int, D: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """``unisparse_ref.evaluation.workloads.structured_workload``'s formula on the GPU (B=1, bf16).

    The same construction (a shared per-KV-head direction under RoPE for the local decay, a sink
    direction carried by every query and the first 4 keys, 4 needles), drawn with CuPy's
    generator so that 128K tokens take a second instead of minutes of NumPy: the same
    distribution, not the same numbers as the NumPy function.
    """
    import cupy as cp

    rs = cp.random.RandomState(seed)
    G, n_sinks, locality, sink_strength, needle_strength = Hq // Hkv, 4, 3.0, 5.0, 4.0
    theta = 10000.0 ** (-cp.arange(0, D, 2, dtype=cp.float64) / D)
    ang = cp.arange(N, dtype=cp.float64)[:, None] * theta[None, :]
    cos, sin = cp.cos(ang).astype(cp.float32), cp.sin(ang).astype(cp.float32)

    def rope(x: Any) -> Any:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = cp.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out

    def unit(norm: float) -> Any:
        u = rs.standard_normal((1, Hkv, 1, D), dtype=cp.float32)
        return u * (norm * D**0.25 / cp.linalg.norm(u, axis=-1, keepdims=True))

    u = unit(locality)
    k = rope(u + 0.5 * rs.standard_normal((1, Hkv, N, D), dtype=cp.float32))
    q = rope(cp.repeat(u, G, axis=1) + 0.5 * rs.standard_normal((1, Hq, N, D), dtype=cp.float32))
    w = unit(1.0)
    q += sink_strength * cp.repeat(w, G, axis=1) / 2
    k[:, :, :n_sinks] += sink_strength * w
    rng = np.random.default_rng(seed)
    for _ in range(4):  # needles: a short run of queries strongly retrieves one far key
        h = int(rng.integers(Hq))
        t = int(rng.integers(max(1, N // 2), N))
        s_ = int(rng.integers(n_sinks, max(n_sinks + 1, t - 256)))
        z = rs.standard_normal(D, dtype=cp.float32)
        z *= needle_strength * D**0.25 / cp.linalg.norm(z)
        q[0, h, max(0, t - 8):t + 1] += z
        k[0, h // G, s_] += z
    v = rs.standard_normal((1, Hkv, N, D), dtype=cp.float32)
    return tuple(to_bf16(x) for x in (q, k, v))


def to_bf16(x: Any) -> Any:
    """A float32 CuPy array rounded to bf16 (nearest even), as a bf16 device array."""
    import cupy as cp

    from unisparse_ref.cupy_backend import as_bfloat16

    u = cp.ascontiguousarray(x).view(cp.uint32)
    return as_bfloat16(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16))


# ----------------------------------------------------------------------------- checks
def check_rows(be: Any, q: Any, k: Any, cfg: Any, N: int, q_c: Any, sc: Any, bm: Any, counts: Any,
               rng: np.random.Generator) -> list[str]:
    """Sampled rows of pooling, scores and selection against the reference; returns failures."""
    import cupy as cp

    from unisparse_ref import reference as ref
    from unisparse_ref.tolerance import attention_tolerance

    fails = []
    S = cfg.block_size
    nqb = -(-N // S)
    G = int(q.shape[1]) // int(k.shape[1])
    # pooling: 4 composite rows of head 0 against the float64 mean
    for r in rng.integers(0, N // cfg.c_q, 4):
        want = host_bf16(bits(q)[0, :cfg.c_h, r * cfg.c_q:(r + 1) * cfg.c_q]).astype(np.float64).mean(axis=(0, 1))
        got = q_c[0, 0, int(r)].get().astype(np.float64)
        tol, _ = attention_tolerance(want, None, np.float32)
        if np.abs(got - want).max() > tol:
            fails.append(f"pooling row {r}: max err {np.abs(got - want).max():.3e} > {tol:.3e}")
    # scores and selection: query block i of the mask heads of KV head 0 is the last block of the
    # sub-problem nq' = S, nk' = (i+1) S (same positions, same visibility, same forced blocks)
    Hm0 = max(1, G // cfg.c_h)
    # the longest rows need every key on the host: above 256K tokens the sample stays in the first quarter
    hi = nqb if N <= 262144 else max(2, nqb // 4)
    for i in sorted({0, 1, hi // 2, hi - 1, int(rng.integers(0, hi))}):
        nk2 = (i + 1) * S
        qh = host_bf16(bits(q)[:, :G, i * S:(i + 1) * S])
        kh = host_bf16(bits(k)[:, :1, :nk2])
        rq, rk = ref.compress(qh, kh, cfg)
        want = ref.block_scores(rq, rk, cfg, S, nk2)[:, :, 0, :]            # [1, Hm0, i+1]
        got = sc[:, :Hm0, i, :].get().astype(np.float64)                   # [1, Hm0, nKb]
        err = np.abs(got[..., :i + 1] - want).max()
        if err > be.score_eps or np.abs(got[..., i + 1:]).max(initial=0.0) != 0.0:
            fails.append(f"scores block {i}: max err {err:.3e} > score_eps {be.score_eps}")
        wmask = ref.select_blocks(got[..., :i + 1][:, :, None, :], cfg, S, nk2).mask[:, :, 0, :]
        gmask = bm.mask[:, :Hm0, i, :].get()
        if not (np.array_equal(gmask[..., :i + 1], wmask) and not gmask[..., i + 1:].any()):
            fails.append(f"selection row {i}: mask differs from the reference on the same scores")
        if not np.array_equal(counts[:, :Hm0, i].get(), gmask.sum(-1)):
            fails.append(f"selection row {i}: kv_counts differ from the mask")
    cp.cuda.Device().synchronize()
    return fails


def density_mask(Hm: int, N: int, S: int, cfg: Any, frac: float, seed: int) -> Any:
    """A random causal block mask with ``frac`` of the visible blocks plus the forced ones (CuPy)."""
    import cupy as cp

    nb = -(-N // S)
    rs = cp.random.RandomState(seed)
    i = cp.arange(nb)[:, None]
    j = cp.arange(nb)[None, :]
    vis = j <= i
    forced = vis & ((j < cfg.n_sink_blocks) | ((j <= i) & (j > i - cfg.n_local_blocks)))
    m = cp.empty((1, Hm, nb, nb), dtype=cp.bool_)
    for g in range(Hm):
        m[0, g] = ((rs.random_sample((nb, nb), dtype=cp.float32) < frac) & vis) | forced
    return m


def pairs_of(mask: Any, N: int, S: int, c_h: int) -> float:
    """Query-key pairs a causal block mask allows over all query heads (on the device)."""
    import cupy as cp

    from unisparse_ref import geometry

    P = cp.asarray(geometry.block_pair_counts(N, N, S, True).astype(np.float32))
    per_block = mask.sum(axis=(0, 1), dtype=cp.float32)
    return float((per_block * P).sum()) * c_h


# ----------------------------------------------------------------------------- one length
def run_size(be: Any, N: int, *, c_h: int, repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    import cupy as cp

    from unisparse_ref import UniSparseConfig
    from unisparse_ref.blockmask import BlockMask
    from unisparse_ref.cupy_backend import attention, selection

    B, Hq, Hkv, D = 1, 32, 8, 128
    cfg = UniSparseConfig(c_h=c_h)
    S = cfg.block_size
    Hm = Hq // c_h
    rec: dict[str, Any] = {"N": N, "c_h": c_h, "config": repr(cfg)}
    t0 = time.time()
    q = random_bf16((B, Hq, N, D), 1)
    k = random_bf16((B, Hkv, N, D), 2)
    v = random_bf16((B, Hkv, N, D), 3)
    qd, kd, vd = bits(q), bits(k), bits(v)
    graph = N <= GRAPH_MAX_N
    reps = repeats if N <= 262144 else max(1, repeats // 3) if N <= 524288 else 1

    q_c, k_c = be.compress(q, k, cfg, check_finite=False)
    sc = be.block_scores(q_c, k_c, cfg, N, N)
    bm, counts, idx = be.select_blocks_indices(sc, cfg, N, N, check_finite=False)
    fails = check_rows(be, q, k, cfg, N, q_c, sc, bm, counts, rng)
    rec["density"] = float(bm.density) if N <= GRAPH_MAX_N else float(
        counts.sum(dtype=cp.float64)) / (Hm * (-(-N // S)) * ((-(-N // S)) + 1) / 2)
    if fails:
        rec["refused"] = fails
        log(f"  N={N} c_h={c_h}: REFUSED: {fails}")
        return rec
    scale = cfg.scale_for(D)
    t = {}
    t["pooling"] = time_call(lambda: be.compress(q, k, cfg, check_finite=False), repeats=reps, graph=graph)
    t["scores"] = time_call(lambda: be.block_scores(q_c, k_c, cfg, N, N), repeats=reps, graph=graph)
    t["selection"] = time_call(lambda: be.select_blocks_indices(sc, cfg, N, N, check_finite=False),
                               repeats=reps, graph=graph)
    m10 = density_mask(Hm, N, S, cfg, 0.10, seed=N)
    bm10 = BlockMask(m10, S, c_h, N, N, True)
    c10, i10 = selection.launch_mask_to_indices(m10)
    t["attention@10%"] = time_call(lambda: attention.attend(qd, kd, vd, c10, i10, bm10, scale), repeats=reps,
                                   graph=graph)
    rec["density_10"] = float(c10.sum(dtype=cp.float64)) / (Hm * (-(-N // S)) * ((-(-N // S)) + 1) / 2)
    pairs10 = pairs_of(m10, N, S, c_h)
    est = t["pooling"]["ms"] + t["scores"]["ms"] + t["selection"]["ms"]
    rec["estimator_ms"] = est
    rec["pipeline@10%_ms"] = est + t["attention@10%"]["ms"]
    if N <= GRAPH_MAX_N:
        t["attention"] = time_call(lambda: attention.attend(qd, kd, vd, counts, idx, bm, scale), repeats=reps,
                                   graph=graph)
        t["pipeline"] = time_call(lambda: be.unisparse_attention(q, k, v, cfg, check_finite=False),
                                  repeats=reps, graph=True)
        from unisparse_ref.bench import reference_check

        out = be.unisparse_attention(q, k, v, cfg, check_finite=False)[0]
        chk = reference_check(out, qd, kd, vd, bm.mask.get(), S=S, causal=True, heads_per_mask=c_h)
        rec["pipeline_check"] = chk.message() if hasattr(chk, "message") else str(chk)
        if not chk.ok:
            rec["refused"] = [f"pipeline output: {rec['pipeline_check']}"]
    # bounds
    nqb = -(-N // S)
    R, C = -(-N // cfg.c_q), -(-N // cfg.c_k)
    vis_blocks = nqb * (nqb + 1) / 2
    b = {}
    b["pooling"] = {"bytes": 2 * (Hq + Hkv) * N * D + 4 * (Hm * R + Hkv * C) * D}
    flops_sc = 2.0 * Hm * R * C * D * 0.5
    bytes_sc = 4.0 * Hm * nqb * nqb + 4 * (Hm * R + Hkv * C) * D
    try:
        from unisparse_ref.cupy_backend import scores as scores_stage

        lc = scores_stage.launch_config(B, Hm, R, cfg, C)
        bytes_sc += 2.0 * lc["scratch_per_head"] * B * Hm * 0.5  # scratch written and read, causal half
    except Exception:  # noqa: BLE001 - the scores stage may change its launch description
        pass
    b["scores"] = {"bytes": bytes_sc, "flops": flops_sc}
    b["selection"] = {"bytes": 4.0 * Hm * vis_blocks + 5.0 * Hm * nqb * nqb + 4.0 * Hm * nqb}
    b["attention@10%"] = {"flops": 4.0 * D * pairs10}
    for name, bb in b.items():
        lo = []
        if "bytes" in bb:
            bb["mem_bound_ms"] = bb["bytes"] / PEAK["hbm_Bps"] * 1e3
            lo.append(bb["mem_bound_ms"])
        if name == "scores":
            bb["fp32_fma_bound_ms"] = bb["flops"] / PEAK["fp32_flops"] * 1e3
            bb["tf32_tc_bound_ms"] = bb["flops"] / PEAK["tf32_flops"] * 1e3
            lo.append(bb["tf32_tc_bound_ms"])
        if name == "attention@10%":
            bb["bf16_tc_bound_ms"] = bb["flops"] / PEAK["bf16_flops"] * 1e3
            lo.append(bb["bf16_tc_bound_ms"])
        bb["bound_ms"] = max(lo)
        bb["x_bound"] = t[name]["ms"] / bb["bound_ms"]
    rec["times"] = t
    rec["bounds"] = b
    rec["share@10%"] = {s: t[s]["ms"] / rec["pipeline@10%_ms"] for s in ("pooling", "scores", "selection")}
    rec["wall_s"] = time.time() - t0
    log(f"  N={N:>8} c_h={c_h} dens={rec['density']:.3f} " + " ".join(
        f"{s}={t[s]['ms']:.3f}ms(x{b[s]['x_bound']:.1f})" for s in ("pooling", "scores", "selection", "attention@10%"))
        + f" est={est:.3f} share@10%={est / rec['pipeline@10%_ms']:.1%}"
        + (f" pipeline={t['pipeline']['ms']:.3f}" if "pipeline" in t else "") + f" [{rec['wall_s']:.0f}s]")
    return rec  # the arrays go with this frame; main() frees the pool's blocks


def growth(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-doubling growth (log2 of the time ratio per doubling of N) and the fitted exponent."""
    out: dict[str, Any] = {}
    recs = sorted((r for r in records if "times" in r and r["c_h"] == 1), key=lambda r: r["N"])
    for stage in ("pooling", "scores", "selection", "estimator", "attention@10%"):
        pts = [(r["N"], r["estimator_ms"] if stage == "estimator" else r["times"][stage]["ms"]) for r in recs]
        steps = []
        for (n0, t0), (n1, t1) in zip(pts, pts[1:], strict=False):
            d = math.log2(n1 / n0)
            steps.append({"from": n0, "to": n1, "x_per_doubling": (t1 / t0) ** (1 / d),
                          "exponent": math.log2(t1 / t0) / d})
        big = [(n, t) for n, t in pts if n >= 131072]
        fit = None
        if len(big) >= 2:
            xs, ys = np.log2([n for n, _ in big]), np.log2([t for _, t in big])
            fit = float(np.polyfit(xs, ys, 1)[0])
        out[stage] = {"steps": steps, "fitted_exponent_from_128K": fit}
    return out


# ----------------------------------------------------------------------------- vs SDPA
def torch_or_none() -> Any:
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - PyTorch is optional
        return None


def vs_sdpa(be: Any, N: int, Hq: int, Hkv: int, D: int, repeats: int) -> dict[str, Any]:
    """The pipeline (eager, eager without the check, graph) against SDPA dense, structured workload."""
    import cupy as cp

    from unisparse_ref import UniSparseConfig
    from unisparse_ref.bench import _Torch, reference_check

    cfg = UniSparseConfig()
    S = cfg.block_size
    q, k, v = structured(N, Hq, Hkv, D)
    qd, kd, vd = bits(q), bits(k), bits(v)
    rec: dict[str, Any] = {"N": N, "Hq": Hq, "Hkv": Hkv, "D": D, "workload": "structured (GPU port)",
                           "config": repr(cfg)}
    res = be.unisparse_attention(q, k, v, cfg)
    out, bm = res[0], res[2]
    rec["density"] = float(bm.density)
    chk = reference_check(out, qd, kd, vd, bm.mask.get(), S=S, causal=True, heads_per_mask=cfg.c_h)
    rec["check"] = chk.message()
    if not chk.ok:
        rec["refused"] = chk.message()
        return rec
    g = be.unisparse_attention(q, k, v, cfg, graph=True)
    same = all(np.array_equal(bits(a).get(), bits(b_).get()) for a, b_ in ((out, g[0]), (res[1], g[1]), (res[3], g[3])))
    rec["graph_equals_eager"] = bool(same and np.array_equal(bm.mask.get(), g[2].mask.get()))
    be.clear_plans()
    t = {}
    t["pipeline_eager"] = time_call(lambda: be.unisparse_attention(q, k, v, cfg), repeats=repeats, graph=False)
    t["pipeline_eager_nocheck"] = time_call(lambda: be.unisparse_attention(q, k, v, cfg, check_finite=False),
                                            repeats=repeats, graph=False)
    t["pipeline_graph"] = time_call(lambda: be.unisparse_attention(q, k, v, cfg, graph=True), repeats=repeats,
                                    graph=False)
    t["pipeline_graph_nocheck"] = time_call(
        lambda: be.unisparse_attention(q, k, v, cfg, graph=True, check_finite=False), repeats=repeats, graph=False)
    be.clear_plans()
    plan = be.plan(q, k, v, cfg, check_finite=False)  # the bare replay: inputs already in its buffers
    t["plan_replay_nocheck"] = time_call(lambda p=plan: p(p.q, p.k, p.v), repeats=repeats, graph=False)
    plan = None  # its buffers go back
    # the stages alone, replayed from graphs
    q_c, k_c = be.compress(q, k, cfg)
    sc = be.block_scores(q_c, k_c, cfg, N, N)
    bm2, c2, i2 = be.select_blocks_indices(sc, cfg, N, N)
    from unisparse_ref.cupy_backend import attention

    t["pooling"] = time_call(lambda: be.compress(q, k, cfg, check_finite=False), repeats=repeats, graph=True)
    t["scores"] = time_call(lambda: be.block_scores(q_c, k_c, cfg, N, N), repeats=repeats, graph=True)
    t["selection"] = time_call(lambda: be.select_blocks_indices(sc, cfg, N, N, check_finite=False),
                               repeats=repeats, graph=True)
    t["attention"] = time_call(lambda: attention.attend(qd, kd, vd, c2, i2, bm2, cfg.scale_for(D)),
                               repeats=repeats, graph=True)
    th = torch_or_none()
    if th is None:
        rec["sdpa"] = "PyTorch not importable: skipped"
    else:
        T = _Torch()
        tq, tk, tv = (th.from_dlpack(x.view(cp.int16)).view(th.bfloat16) for x in (qd, kd, vd))
        for name in ("cudnn", "flash"):
            try:
                f = T.sdpa(name)
                o = f(tq, tk, tv, True)
                th.cuda.synchronize()
                full = cp.ones((1, Hkv, -(-N // S), -(-N // S)), dtype=cp.bool_)
                c = reference_check(o, qd, kd, vd, full.get(), S=S, causal=True, heads_per_mask=Hq // Hkv)
                if not c.ok:
                    rec[f"sdpa_{name}"] = f"refused: {c.message()}"
                    continue
                t[f"sdpa_{name}"] = time_call(lambda f=f: f(tq, tk, tv, True), repeats=repeats, graph=False)
            except Exception as e:  # noqa: BLE001 - a backend PyTorch lacks here
                rec[f"sdpa_{name}"] = f"failed: {type(e).__name__}: {e}"[:200]
    rec["times"] = t
    for s in ("sdpa_cudnn", "sdpa_flash"):
        if s in t:
            for p in ("pipeline_eager", "pipeline_eager_nocheck", "pipeline_graph", "pipeline_graph_nocheck",
                      "plan_replay_nocheck"):
                rec[f"{s}/{p}"] = t[s]["ms"] / t[p]["ms"]
    log(f"  vs SDPA N={N} Hq={Hq} Hkv={Hkv} D={D} dens={rec['density']:.3f} graph==eager {rec['graph_equals_eager']}: "
        + " ".join(f"{n}={x['ms']:.3f}" for n, x in t.items()))
    return rec


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8K/32K/128K only, no 1M c_h=4, fewer SDPA sizes")
    p.add_argument("--sizes", default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "pipeline"))
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="start no new step after this many seconds (steps run in priority order)")
    a = p.parse_args(argv)
    import cupy as cp

    from unisparse_ref.cupy_backend import make_backend

    be = make_backend()
    sizes = [int(s) for s in (a.sizes or ("8192,32768,131072" if a.quick else
                                         "8192,32768,131072,262144,524288,1048576")).split(",")]
    os.makedirs(a.out, exist_ok=True)
    result: dict[str, Any] = {"device": be.device_name, "cupy": cp.__version__, "peaks": PEAK,
                              "commit": os.environ.get("UNISPARSE_COMMIT", ""), "date": time.strftime(
                                  "%Y-%m-%d %H:%M UTC", time.gmtime()), "sizes": []}
    rng = np.random.default_rng(0)
    bad = False
    t0 = time.time()
    path = os.path.join(a.out, "estimator.json")

    def dump() -> None:  # after every step: a run cut short still leaves what it measured
        result["wall_s"] = time.time() - t0
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    # Steps in priority order (the targets first); a step is skipped once the budget is spent.
    steps: list[tuple[str, Any]] = [("sdpa", (8192, 9, 3, 64)), ("sdpa", (8192, 32, 8, 128))]
    steps += [("size", (N, 1)) for N in sizes if N <= 131072]
    steps += [("size", (N, 1)) for N in sizes if N == 1048576]
    steps += [("size", (N, 1)) for N in sizes if 131072 < N < 1048576]
    if not a.quick and 1048576 in sizes:
        steps.append(("size", (1048576, 4)))
    steps.append(("sdpa", (32768, 32, 8, 128)))
    if not a.quick:
        steps.append(("sdpa", (131072, 32, 8, 128)))
    result["vs_sdpa"] = []
    result["skipped"] = []
    for kind, arg in steps:
        if time.time() - t0 > a.budget_s:
            result["skipped"].append(f"{kind} {arg}: budget of {a.budget_s:.0f} s spent")
            log(f"  skipped {kind} {arg}: budget spent")
            continue
        if kind == "sdpa":
            N, Hq, Hkv, D = arg
            try:
                r = vs_sdpa(be, N, Hq, Hkv, D, repeats=a.repeats)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r = {"N": N, "Hq": Hq, "error": f"{type(e).__name__}: {e}"[:300]}
            bad |= "refused" in r or "error" in r or r.get("graph_equals_eager") is False
            result["vs_sdpa"].append(r)
        else:
            N, c_h = arg
            try:
                r = run_size(be, N, c_h=c_h, repeats=a.repeats if N < 1048576 else 1, rng=rng)
            except Exception as e:  # noqa: BLE001 - record and go on
                traceback.print_exc()
                r = {"N": N, "c_h": c_h, "error": f"{type(e).__name__}: {e}"[:300]}
            bad |= "refused" in r or "error" in r
            result["sizes"].append(r)
            result["growth"] = growth(result["sizes"])
        cp.get_default_memory_pool().free_all_blocks()
        dump()
    result.setdefault("growth", growth(result["sizes"]))
    for st, gdat in result["growth"].items():
        log(f"  growth {st}: " + " ".join(f"{s['from'] // 1024}K->{s['to'] // 1024}K x{s['x_per_doubling']:.2f}"
                                          for s in gdat["steps"])
            + (f"; fitted exponent (>=128K) {gdat['fitted_exponent_from_128K']:.2f}"
               if gdat["fitted_exponent_from_128K"] is not None else ""))
    dump()
    log(f"== wrote {path} in {result['wall_s']:.0f}s; {'FAILED checks' if bad else 'all checks passed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
