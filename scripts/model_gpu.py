"""SmolLM2's real attention on the GPU: dense against UniSparse (cupy backend) and SDPA.

Three steps; the first on the CPU (where the model is installed), the others on the GPU machine::

    # 1. CPU: capture q, k, v (float16) of a few layers of an 8192-token prefill, plus the
    #    dense token log-probs of the CPU forward, into .model_gpu/qkv.npz (about 32 MB).
    python scripts/model_gpu.py capture --n 8192 --layers 3 20
    #    (optional, for step 3) split the GGUF into two parts under 64 MiB, and fetch the gguf
    #    and tokenizers wheels (see the device notes) into .whl/
    python scripts/model_gpu.py split
    echo /.model_gpu/ >> .git/info/exclude

    # 2. GPU (carry .model_gpu): time dense, UniSparse at several P, and SDPA when torch exists
    python scripts/model_gpu.py time --out $OUT

    # 3. GPU, optional (two calls on a warm machine: carry .model_gpu/part0 in the first and
    #    .model_gpu/part1 in the second, which keeps the first): the whole prefill on CuPy arrays,
    #    dense and UniSparse, the attention's share, and the token log-probs against the CPU's.
    python scripts/model_gpu.py forward --out $OUT

Every result is written as JSON (and printed). Timings: CUDA events around each call, after
warm-up runs (the first call compiles the kernels), the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / ".model_gpu"
THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def _prose() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from model_eval import prose_text

    return prose_text()


def cmd_capture(args: argparse.Namespace) -> None:
    from unisparse_ref.models import SmolLM2

    model = SmolLM2.from_package()
    ids = model.encode(_prose())[: args.n]
    t0 = time.perf_counter()
    res = model.score(ids, capture_layers=args.layers)
    log(f"CPU dense forward of {len(ids)} tokens: {time.perf_counter() - t0:.1f} s "
        f"(attention {res.attention_seconds:.1f} s), CE {res.cross_entropy:.4f}")
    arrays = {"ids": ids, "token_logprobs": res.token_logprobs, "layers": np.array(args.layers)}
    for i, (q, k, v) in res.captured.items():
        arrays[f"q{i}"], arrays[f"k{i}"], arrays[f"v{i}"] = (x.astype(np.float16) for x in (q, k, v))
    DIR.mkdir(exist_ok=True)
    np.savez(DIR / "qkv.npz", **arrays)
    log(f"wrote {DIR / 'qkv.npz'} ({(DIR / 'qkv.npz').stat().st_size / 2**20:.1f} MiB)")


def cmd_split(args: argparse.Namespace) -> None:
    from unisparse_ref.models import find_smollm2_gguf

    data = find_smollm2_gguf().read_bytes()
    DIR.mkdir(exist_ok=True)
    half = len(data) // 2
    for j, part in enumerate((data[:half], data[half:])):
        d = DIR / f"part{j}"
        d.mkdir(exist_ok=True)
        (d / "model.gguf.part").write_bytes(part)
    log(f"wrote {DIR}/part0 and part1 ({half / 2**20:.1f} MiB each); carry one per call")


def _timer(cp: object, fn: object, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def cmd_time(args: argparse.Namespace) -> None:
    import cupy as cp

    import unisparse_ref as us

    be = us.get_backend("cupy")
    data = np.load(DIR / "qkv.npz")
    out: dict = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "layers": []}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    from unisparse_ref import geometry
    from unisparse_ref.bench import reference_check

    refused: list[str] = []

    def checked(name: str, out_arr, mask, rec: dict) -> bool:
        """Correctness first: sampled rows against the float64 reference (SPEC 7), else no timing."""
        chk = reference_check(out_arr, q, k, v, mask, S=128, causal=True)
        rec[f"{name}_check"] = chk.message()
        if not chk.ok:
            refused.append(f"layer {i} {name}: {chk.message()}")
        return chk.ok

    for i in data["layers"].tolist():
        q, k, v = (cp.asarray(data[f"{x}{i}"]) for x in "qkv")
        B, Hq, N = (int(x) for x in q.shape[:3])
        rec: dict = {"layer": i, "shape_q": list(q.shape), "shape_k": list(k.shape), "dtype": str(q.dtype)}
        vis = geometry.visible_blocks(N, N, 128, True)
        dense_mask = np.broadcast_to(vis, (B, Hq, *vis.shape))
        d_out, _ = be.dense_attention(q, k, v, True, None)
        if checked("dense", d_out, dense_mask, rec):
            rec["dense_ms"] = _timer(cp, lambda q=q, k=k, v=v: be.dense_attention(q, k, v, True, None), args.repeats)
        dn = float(cp.linalg.norm(d_out.astype(cp.float32)))
        rec["unisparse"] = []
        for p in THRESHOLDS:
            cfg = us.UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=p)
            r = us.unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
            if not checked(f"unisparse_P{p}", r.out, r.block_mask.mask, rec):
                continue
            err = float(cp.linalg.norm(r.out.astype(cp.float32) - d_out.astype(cp.float32))) / dn
            ms = _timer(cp, lambda q=q, k=k, v=v, cfg=cfg: us.unisparse_attention(q, k, v, cfg, backend=be),
                        args.repeats)
            rec["unisparse"].append({"P": p, "ms": ms, "density": float(r.block_mask.density), "rel_error": err,
                                     "speedup_vs_dense": rec["dense_ms"] / ms if "dense_ms" in rec else None})
        if torch is not None and torch.cuda.is_available():
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            G = tq.shape[1] // tk.shape[1]
            tk, tv = tk.repeat_interleave(G, 1), tv.repeat_interleave(G, 1)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, bk in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    def run(tq=tq, tk=tk, tv=tv, bk=bk):
                        with sdpa_kernel(bk):
                            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

                    if checked(name, run(), dense_mask, rec):
                        rec[f"{name}_ms"] = _timer(cp, run, args.repeats)
                except RuntimeError as e:  # a backend that does not take this shape
                    rec[f"{name}_error"] = str(e).splitlines()[0][:200]
        out["layers"].append(rec)
        log(json.dumps(rec))
    out["refused"] = refused
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "model_gpu_time.json").write_text(json.dumps(out, indent=1))
    if refused:
        log("refused (wrong results, not timed):", *refused)
        sys.exit(1)


def cmd_forward(args: argparse.Namespace) -> None:
    import cupy as cp

    import unisparse_ref as us
    from unisparse_ref.models import SmolLM2

    gguf_path = DIR / "model.gguf"
    if not gguf_path.exists():
        parts = [DIR / f"part{j}" / "model.gguf.part" for j in (0, 1)]
        gguf_path.write_bytes(b"".join(p.read_bytes() for p in parts))
    model = SmolLM2.from_package(gguf_path)
    data = np.load(DIR / "qkv.npz")
    ids = data["ids"]
    out: dict = {"n_tokens": int(len(ids)), "runs": []}
    for name, att in [("dense", None)] + [(f"unisparse P={p}", us.UniSparseConfig(threshold=p))
                                           for p in THRESHOLDS]:
        model.score(ids[:512], attention=att, backend="cupy")  # warm-up: kernels compiled, weights on device
        cp.cuda.get_current_stream().synchronize()
        r = model.score(ids, attention=att, backend="cupy")
        rec = {"attention": name, "seconds": r.seconds, "attention_seconds": r.attention_seconds,
               "ce": r.cross_entropy, "mean_density": r.mean_density}
        if att is None:
            rec["max_logprob_diff_vs_cpu"] = float(np.abs(r.token_logprobs - data["token_logprobs"]).max())
        out["runs"].append(rec)
        log(json.dumps(rec))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "model_gpu_forward.json").write_text(json.dumps(out, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("capture")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 20])
    sub.add_parser("split")
    for name in ("time", "forward"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(DIR / "results"))
        p.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    {"capture": cmd_capture, "split": cmd_split, "time": cmd_time, "forward": cmd_forward}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
