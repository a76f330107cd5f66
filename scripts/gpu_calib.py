"""The estimator's GPU cost of each research variant against the SPEC default (issue 15).

The estimator is stages 1-3 of the CuPy layer (``compress`` -> ``block_scores`` ->
``select_blocks``) on random bf16 inputs, ``B = 1``, ``Hq = 32``, ``Hkv = 8``, ``D = 128``, at
8192 and 32768 tokens, causal, block size 128, ``c_q = c_k = 16``. Run from the repository
root on a GPU machine::

    python scripts/gpu_calib.py [--out DIR] [--lengths 8192,32768] [--repeats 10]

Correctness first, for every variant and length, before anything is timed: the scores against
the float64 reference (on the first ``Hkv_check`` KV heads' group of heads, to keep the CPU
reference short at 32K) within the backend's ``score_eps``, and the selection on the backend's
own scores equal to the reference selection on the same scores except borderline rows (SPEC
section 7). A variant that fails is reported and not timed; one that the layer refuses
(``NotImplementedError``) is reported as refused. Timing: CUDA events around the three calls,
two warm-up runs, the median of ``--repeats``; ratios to the SPEC default of the same run.
Writes ``calib_timing.json`` to ``--out``; exits 1 if any variant failed its check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unisparse_ref import reference as ref  # noqa: E402
from unisparse_ref.config import UniSparseConfig  # noqa: E402
from unisparse_ref.tolerance import compare_selection  # noqa: E402

#: name -> research options (``None``: ``UniSparseConfig.calibrated()``).
VARIANTS: dict[str, dict | None] = {
    "spec": {},
    "remaining": {"threshold_mode": "remaining"},
    "sink4": {"sink_tokens": 4},
    "diag": {"diagonal_correction": True},
    "sink4+diag": {"sink_tokens": 4, "diagonal_correction": True},
    "all": {"sink_tokens": 4, "diagonal_correction": True, "threshold_mode": "remaining"},
    "calibrated": None,
}


def config_of(name: str) -> UniSparseConfig:
    opts = VARIANTS[name]
    return UniSparseConfig.calibrated() if opts is None else UniSparseConfig(**opts)


def bf16_bits(cp, H: int, N: int, D: int, seed: int):
    """Random bf16 bit patterns ``[1, H, N, D]`` (uint16, on the device) and their values as float32 on the host."""
    x = cp.random.RandomState(seed).standard_normal((1, H, N, D), dtype=cp.float32)
    u = x.view(cp.uint32)
    bits = ((u + cp.uint32(0x7FFF) + ((u >> 16) & cp.uint32(1))) >> 16).astype(cp.uint16)  # round to nearest even
    host = (cp.asnumpy(bits).astype(np.uint32) << 16).view(np.float32)  # the bf16 values, exactly
    return bits, host


def check(be, cp, cfg: UniSparseConfig, q_bits, k_bits, qh: np.ndarray, kh: np.ndarray, N: int, kv_check: int
          ) -> str:
    """'' when the variant is right on the first ``kv_check`` KV heads' group, else the problem."""
    from unisparse_ref.cupy_backend import as_bfloat16

    G = qh.shape[1] // kh.shape[1]
    qs = as_bfloat16(cp.ascontiguousarray(q_bits[:, : kv_check * G]))
    ks = as_bfloat16(cp.ascontiguousarray(k_bits[:, :kv_check]))
    scores = be.block_scores(*be.compress(qs, ks, cfg), cfg, N, N)
    s = np.asarray(cp.asnumpy(scores), dtype=np.float64)
    rscores = ref.block_scores(*ref.compress(qh[:, : kv_check * G], kh[:, :kv_check], cfg), cfg, N, N)
    err = float(np.abs(s - rscores).max())
    if err > be.score_eps:
        return f"scores differ from the reference by {err:.3e} > score_eps {be.score_eps:.0e}"
    mask = cp.asnumpy(be.select_blocks(scores, cfg, N, N).mask)
    res = compare_selection(mask, ref.select_blocks(s, cfg, N, N).mask, ref.selection_margin(s, cfg, N, N))
    return "" if res.ok else "selection: " + res.message()


def time_estimator(be, cp, cfg: UniSparseConfig, q, k, N: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of compress + block_scores + select_blocks, and the mask's density."""
    def run():
        qc, kc = be.compress(q, k, cfg)
        return be.select_blocks(be.block_scores(qc, kc, cfg, N, N), cfg, N, N)

    from unisparse_ref.bench import time_calls

    ms = time_calls([run], warmup=2, repeats=repeats, budget_s=1e6)["ms"]  # the package's CUDA-event timer
    return ms, float(run().numpy().density)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--kv-check", type=int, default=1, help="KV heads (with their query heads) checked")
    p.add_argument("--heads", default="32,8", help="Hq,Hkv")
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    import cupy as cp

    from unisparse_ref.backends import get_backend
    from unisparse_ref.cupy_backend import as_bfloat16

    be = get_backend("cupy")
    Hq, Hkv = (int(x) for x in args.heads.split(","))
    D = args.head_dim
    rows, failed = [], False
    for N in (int(x) for x in args.lengths.split(",")):
        (q_bits, qh), (k_bits, kh) = bf16_bits(cp, Hq, N, D, N), bf16_bits(cp, Hkv, N, D, N + 1)
        q, k = as_bfloat16(q_bits), as_bfloat16(k_bits)
        base = None
        for name in VARIANTS:
            cfg = config_of(name)
            t0 = time.time()
            try:
                problem = check(be, cp, cfg, q_bits, k_bits, qh, kh, N, args.kv_check)
            except NotImplementedError as e:
                rows.append({"N": N, "variant": name, "status": "refused", "detail": str(e)})
                print(f"N={N:6d} {name:12s} refused: {e}", flush=True)
                continue
            if problem:
                failed = True
                rows.append({"N": N, "variant": name, "status": "FAIL", "detail": problem})
                print(f"N={N:6d} {name:12s} FAIL: {problem}", flush=True)
                continue
            ms, density = time_estimator(be, cp, cfg, q, k, N, args.repeats)
            if name == "spec":
                base = ms
            ratio = ms / base if base else float("nan")
            rows.append({"N": N, "variant": name, "status": "ok", "ms": ms, "ratio_to_spec": ratio,
                         "density": density})
            print(f"N={N:6d} {name:12s} ok  {ms:8.3f} ms  x{ratio:5.2f} of spec  density {density:.3f}  "
                  f"(check+time {time.time() - t0:.0f} s)", flush=True)
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"]
    meta = {"gpu": dev.decode() if isinstance(dev, bytes) else str(dev), "Hq": Hq, "Hkv": Hkv, "D": D,
            "dtype": "bfloat16", "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "calib_timing.json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
