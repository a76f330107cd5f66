"""Time the CuPy block scores, version 3 (float32 FMA) against version 4 (tensor cores), on a GPU.

    python scripts/gpu_scores.py [--sizes 8192,32768,131072] [--shape Hq,Hkv,D] [--out DIR]

Workload (docs/performance.md): bf16, B = 1, Hq = 32, Hkv = 8, D = 128, c_q = c_k = 16,
S = 128, causal, random data through the backend's compress. Correctness first: at every size
version 4 is compared with the float64 reference (every head at 8K and 32K, head 0 and the last
at 128K) and with version 3; a kernel outside ``CupyBackend.score_eps`` is not timed (exit 1).
Times are CUDA-event medians after warm-up; version 4 with two parts (the default) and three,
each configuration (warps, stages). The tensor-core bound: the six (three parts) or three (two
parts) fp16 products of every logit the kernel computes (whole 64-column tiles up to each
128-row item's last visible column, D padded to 32) at the H200's dense fp16 peak, 989.4
TFLOP/s; the memory bound of the split and of compress: their bytes at 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PEAK_F16 = 989.4e12  # H100/H200 SXM dense fp16 tensor throughput, FLOP/s
HBM = 4.8e12  # H200 HBM3e bytes/s


def median_ms(fn, reps: int, cp) -> float:
    """Median ms of ``fn()`` over ``reps`` calls after 2 warm-ups: the package's CUDA-event timer."""
    from unisparse_ref.bench import time_calls

    return time_calls([fn], warmup=2, repeats=reps, budget_s=1e6)["ms"]


def mma_flops(R: int, C: int, D: int, heads: int, cfg, nq: int, nk: int, RG: int = 128, TC: int = 64) -> float:
    """FLOPs of one fp16 product pass over every logit version 4 computes (whole walked tiles)."""
    from unisparse_ref import geometry

    Dp = 32 * geometry.cdiv(D, 32)
    total = 0
    for r0 in range(0, R, RG):
        rows = min(RG, R - r0)
        last = min(r0 + RG, R) - 1
        if cfg.causal:
            lastc = min(C - 1, (min((last + 1) * cfg.c_q, nq) - 1 + nk - nq) // cfg.c_k)
        else:
            lastc = C - 1
        total += RG * (lastc // TC + 1) * TC if rows else 0
    return 2.0 * total * Dp * heads


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8192,32768,131072")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shape", default="32,8,128", help="Hq,Hkv,D (default 32,8,128; the small model: 9,3,64)")
    args = ap.parse_args()

    import cupy as cp

    from unisparse_ref import BFLOAT16, UniSparseConfig
    from unisparse_ref import reference as ref
    from unisparse_ref.cupy_backend import CupyBackend, make_backend, pooling
    from unisparse_ref.cupy_backend import scores as sc

    be = make_backend()
    eps = CupyBackend.score_eps
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"device {name}, {dev.attributes['MultiProcessorCount']} SMs, score_eps {eps:g}", flush=True)
    Hq, Hkv, D = (int(x) for x in args.shape.split(","))
    B = 1
    cfg = UniSparseConfig()  # S = 128, c_q = c_k = 16, causal
    results = {"device": name, "commit": os.environ.get("UNISPARSE_COMMIT", "unknown"), "sizes": {}}
    ok = True
    cp.random.seed(0)

    def bf16_bits(x):  # float32 -> bfloat16 bits (round to nearest even), on the device
        u = x.view(cp.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16)
    def one(N: int) -> tuple[dict, bool]:
        ok = True
        t0 = time.time()
        q = bf16_bits(cp.random.standard_normal((B, Hq, N, D), dtype=cp.float32))
        k = bf16_bits(cp.random.standard_normal((B, Hkv, N, D), dtype=cp.float32))
        from unisparse_ref.cupy_backend import as_bfloat16

        q_c, k_c = be.compress(as_bfloat16(q), as_bfloat16(k), cfg)
        R, C = int(q_c.shape[2]), int(k_c.shape[2])
        res: dict = {"R": R, "C": C}
        outs = {"v3": sc.launch_scores(q_c, k_c, cfg, N, N, version=3),
                "v4p3": sc.launch_scores(q_c, k_c, cfg, N, N, version=4, parts=3),
                "v4p2": sc.launch_scores(q_c, k_c, cfg, N, N, version=4, parts=2)}
        got = {k_: cp.asnumpy(v) for k_, v in outs.items()}
        heads = list(range(Hq)) if N <= 8192 else (list(range(0, Hq, 4)) if N <= 32768 else [0, Hq - 1])
        qh, kh = cp.asnumpy(q_c[:, heads]), cp.asnumpy(k_c)
        # composite head g reads KV head g // G: pass the matching KV heads, one mask head at a time
        errs = {k_: 0.0 for k_ in got}
        for i, g in enumerate(heads):
            kv = g // (Hq // Hkv)
            want = ref.block_scores(qh[:, i:i + 1], kh[:, kv:kv + 1], cfg, N, N)
            for k_, v in got.items():
                errs[k_] = max(errs[k_], float(np.abs(v[:, g:g + 1] - want).max()))
        res["err"] = errs
        res["heads_checked"] = len(heads)
        print(f"N={N}: max|scores - ref64| " + ", ".join(f"{k_} {v:.2e}" for k_, v in errs.items())
              + f" ({len(heads)} heads, {time.time() - t0:.1f} s)", flush=True)
        bounds = {"v3": eps, "v4p3": eps, "v4p2": eps}
        bad = [k_ for k_ in errs if errs[k_] > bounds[k_]]
        if bad:
            print(f"FAIL: {bad} outside their bounds {bounds}; not timed", flush=True)
            return res, False
        reps = args.reps if N > 8192 else 3 * args.reps
        res["v3_ms"] = median_ms(lambda: sc.launch_scores(q_c, k_c, cfg, N, N, version=3), reps, cp)
        configs = {}
        for parts, ws in sc.MMA_WARPS.items():
            for warps in ws:
                for stages in (1, 2):
                    try:
                        sc.mma_launch_config(B, Hq, R, C, D, cfg, warps=warps, stages=stages, parts=parts)
                    except ValueError:
                        continue
                    configs[f"p{parts}w{warps}s{stages}"] = median_ms(
                        lambda w=warps, s=stages, p=parts: sc.launch_scores(q_c, k_c, cfg, N, N, version=4, warps=w,
                                                                            stages=s, parts=p), reps, cp)
        res["v4_ms"] = configs
        res["v4_default_ms"] = median_ms(lambda: sc.launch_scores(q_c, k_c, cfg, N, N), reps, cp)
        res["center_ms"] = median_ms(lambda: sc.center_keys(k_c), reps, cp)
        res["split_ms"] = {p: median_ms(lambda p=p: (sc._split(q_c, D, 32 * -(-D // 32), p), sc._split(k_c, D, 32 * -(-D // 32), p)), reps, cp)
                           for p in (2, 3)}
        bf16 = np.dtype(BFLOAT16)
        res["pool_ms"] = median_ms(lambda: (pooling.launch_pool(q, bf16, cfg.c_q, cfg.c_h),
                                            pooling.launch_pool(k, bf16, cfg.c_k, 1)), reps, cp)
        flops = mma_flops(R, C, D, B * Hq, cfg, N, N)  # per fp16 product pass
        res["tc_bound_ms"] = {p: n_prod * flops / PEAK_F16 * 1e3 for p, n_prod in ((3, 6), (2, 3))}
        split_bytes = {p: (q_c.nbytes + k_c.nbytes) * (1 + p / 2) + (R * B * Hq + C * B * Hkv) * 4 for p in (2, 3)}
        res["split_bound_ms"] = {p: v / HBM * 1e3 for p, v in split_bytes.items()}
        res["pool_bound_ms"] = (q.nbytes + k.nbytes + q_c.nbytes + k_c.nbytes) / HBM * 1e3
        best = {p: min(v for k_, v in configs.items() if k_.startswith(f"p{p}")) for p in (3, 2)}
        print(f"N={N}: v3 {res['v3_ms']:.3f} ms | v4 default {res['v4_default_ms']:.3f} ms | "
              + ", ".join(f"{k_} {v:.3f}" for k_, v in configs.items()), flush=True)
        for p in (3, 2):
            print(f"N={N}: v4 {p} parts best {best[p]:.3f} ms, tensor-core bound {res['tc_bound_ms'][p]:.3f} ms "
                  f"({res['tc_bound_ms'][p] / best[p] * 100:.0f} % of peak); split {res['split_ms'][p]:.3f} ms "
                  f"(memory bound {res['split_bound_ms'][p]:.3f})", flush=True)
        print(f"N={N}: pooling (us_pool_seq, q and k) {res['pool_ms']:.3f} ms (memory bound "
              f"{res['pool_bound_ms']:.3f}); key centring (us_center_keys) {res['center_ms']:.3f} ms", flush=True)
        # the research variants' cost (issue 15): diagonal correction, and 4 sink tokens
        if N <= 32768:
            for name_, extra in (("diag", {"diagonal_correction": True}), ("sinks4_diag", {"sink_tokens": 4,
                                                                                       "diagonal_correction": True})):
                vc = UniSparseConfig(**extra)
                try:
                    qv, kv = be.compress(as_bfloat16(q), as_bfloat16(k), vc)
                    res[f"{name_}_ms"] = median_ms(lambda qv=qv, kv=kv, vc=vc: be.block_scores(qv, kv, vc, N, N),
                                                   reps, cp)
                    if N == 8192:
                        wv = ref.block_scores(cp.asnumpy(qv[:, :2]), cp.asnumpy(kv[:, :1]), vc, N, N)
                        gv = cp.asnumpy(be.block_scores(qv[:, :2], kv[:, :1], vc, N, N))
                        res[f"{name_}_err"] = float(np.abs(gv - wv).max())
                        ok &= res[f"{name_}_err"] <= eps
                except NotImplementedError as e:
                    print(f"N={N}: variant {name_} not available: {e}", flush=True)
                    continue
                print(f"N={N}: variant {name_}: {res[f'{name_}_ms']:.3f} ms"
                      + (f", max|err| {res[f'{name_}_err']:.2e}" if f"{name_}_err" in res else ""), flush=True)
        return res, ok

    for N in (int(s) for s in args.sizes.split(",")):
        res, good = one(N)
        results["sizes"][N] = res
        ok &= good
        cp.get_default_memory_pool().free_all_blocks()
    os.makedirs(os.path.join(args.out, "scores"), exist_ok=True)
    with open(os.path.join(args.out, "scores", "scores_timing.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
