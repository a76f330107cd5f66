"""How the packed pipeline's time depends on what runs around it (a diagnostic of bench_varlen's ratio).

    python3 scripts/timing_varlen.py [ROUNDS]

The workload of ``scripts/bench_varlen.py`` section 3 (checked there) and its one sequence of the
same causal work. Every call is timed between two CUDA events; for each arrangement the medians
and quartiles of both, their ratio, and how many device allocations (``cudaMalloc`` through
CuPy's memory pool) the calls made:

* ``separate``: ROUNDS packed calls, then ROUNDS one-sequence calls;
* ``interleaved``: packed, one, packed, one, ...;
* ``interleaved, one first``: one, packed, one, packed, ...;
* ``separate again``: as the first (drift over the run);
* ``separate, gc disabled``: as the first with Python's garbage collector off.

Before them: the host's time to queue each pipeline against its GPU time, the packed attention
kernel's own spread, and the GPU's idle time between the kernels of one call (CUDA events
around every launch, which add some host time of their own).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    import cupy as cp
    import numpy as np
    from cupy.cuda import memory_hook

    import unisparse_ref as us

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_varlen import D, S, pipeline_workload

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    w = pipeline_workload()
    be, q, k, v, cu, q1, k1, v1, cfg = (w[n] for n in ("be", "q", "k", "v", "cu", "q1", "k1", "v1", "cfg"))

    def packed():
        us.unisparse_attention_varlen(q, k, v, cu, cu, cfg, backend=be)

    def one():
        be.unisparse_attention(q1, k1, v1, cfg)

    class Count(memory_hook.MemoryHook):
        name = "count"

        def __init__(self):
            self.device = 0

        def alloc_preprocess(self, **kw):  # a cudaMalloc (the pool had no free block)
            self.device += 1

    for _ in range(3):
        packed(), one()
    cp.cuda.Device().synchronize()

    def run(order):
        ev = {"packed": [], "one": []}
        hook = Count()
        with hook:
            for f in order:
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record()
                (packed if f == "packed" else one)()
                b.record()
                ev[f].append((a, b))
            cp.cuda.Device().synchronize()
        t = {n: np.array([cp.cuda.get_elapsed_time(a, b) for a, b in e]) for n, e in ev.items()}
        return t, hook.device

    arrangements = {
        "separate": ["packed"] * rounds + ["one"] * rounds,
        "interleaved": ["packed", "one"] * rounds,
        "interleaved, one first": ["one", "packed"] * rounds,
        "separate again": ["packed"] * rounds + ["one"] * rounds,
    }
    import gc
    import time

    from unisparse_ref.cupy_backend import varlen as cv

    def host_and_gpu(fn, label):  # host time to queue (no read-back), and the GPU time of the same calls
        host, ev = [], []
        for _ in range(rounds):
            cp.cuda.Device().synchronize()
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            t0 = time.perf_counter()
            fn()
            host.append(1e3 * (time.perf_counter() - t0))
            b.record()
            ev.append((a, b))
        cp.cuda.Device().synchronize()
        g = np.array([cp.cuda.get_elapsed_time(a, b) for a, b in ev])
        h = np.array(host)
        print(f"{label:44s} host queues in {np.median(h):6.2f} ms (q3 {np.percentile(h, 75):6.2f}, max {h.max():6.2f}); "
              f"GPU {np.median(g):6.2f} ms (q1 {np.percentile(g, 25):6.2f}, q3 {np.percentile(g, 75):6.2f})")

    host_and_gpu(lambda: cv.unisparse_attention_varlen(be, q, k, v, cu, cu, cfg, check_finite=False),
                 "packed, check_finite=False")
    host_and_gpu(lambda: be.unisparse_attention(q1, k1, v1, cfg, check_finite=False), "one sequence, check_finite=False")
    res = us.unisparse_attention_varlen(q, k, v, cu, cu, cfg, backend=be, return_details=True)
    from unisparse_ref.cupy_backend import _device, _hopper

    qd, kd, vd = (_device.device_input(n, x)[0] for n, x in (("q", q), ("k", k), ("v", v)))
    counts, idx = cp.asarray(res.kv_counts), cp.asarray(res.kv_indices)
    (tiles,) = _device.upload_int32(_hopper.varlen_tiles(cu, np.diff(cu), cu[:-1], S, True))
    scale = cfg.scale_for(D)
    host_and_gpu(lambda: cv._attend_v9(qd, kd, vd, counts, idx, cu, np.diff(cu), cu[:-1], cfg, scale, tiles=tiles),
                 "packed attention kernel alone")
    from unisparse_ref.cupy_backend import _loader

    def idle(fn, label):  # CUDA events around every launch: the GPU's idle time between the kernels of a call
        marks = []
        real_launch, real_param = _loader.launch, _hopper._launch_param

        def wrap(real, name_of):
            def run(*a, **kw):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record()
                real(*a, **kw)
                e1.record()
                marks.append((name_of(a), e0, e1))
            return run

        _loader.launch = wrap(real_launch, lambda a: str(getattr(a[0], "name", a[0]))[:28])
        _hopper._launch_param = wrap(real_param, lambda a: "us_fa3_fwd" + ("_varlen" if "varlen" in str(a[0]) else ""))
        try:
            per_call = []
            for _ in range(10):
                cp.cuda.Device().synchronize()
                marks.clear()
                fn()
                cp.cuda.Device().synchronize()
                gaps = [(marks[i + 1][0], cp.cuda.get_elapsed_time(marks[i][2], marks[i + 1][1]))
                        for i in range(len(marks) - 1)]
                per_call.append(gaps)
        finally:
            _loader.launch, _hopper._launch_param = real_launch, real_param
        tot = np.array([sum(g for _, g in gaps) for gaps in per_call])
        worst = sorted(per_call[len(per_call) // 2], key=lambda x: -x[1])[:4]
        print(f"{label:44s} GPU idle between its kernels: median {np.median(tot):5.2f} ms (max {tot.max():5.2f}); "
              "largest gaps before " + ", ".join(f"{n} {g:.3f}" for n, g in worst))

    idle(lambda: cv.unisparse_attention_varlen(be, q, k, v, cu, cu, cfg, check_finite=False), "packed, check_finite=False")
    idle(lambda: be.unisparse_attention(q1, k1, v1, cfg, check_finite=False), "one sequence, check_finite=False")
    gc.disable()
    arrangements["separate, gc disabled"] = ["packed"] * rounds + ["one"] * rounds
    for name, order in arrangements.items():
        t, mallocs = run(order)
        p, o = t["packed"], t["one"]
        print(f"{name:24s} packed median {np.median(p):6.2f} ms (q1 {np.percentile(p, 25):6.2f}, q3 "
              f"{np.percentile(p, 75):6.2f}, min {p.min():6.2f}); one median {np.median(o):6.2f} ms (q1 "
              f"{np.percentile(o, 25):6.2f}, q3 {np.percentile(o, 75):6.2f}, min {o.min():6.2f}); ratio "
              f"{np.median(p) / np.median(o):.3f} (of minima {p.min() / o.min():.3f}); cudaMalloc calls {mallocs}")
    gc.enable()
    return 0


if __name__ == "__main__":
    sys.exit(main())
