"""SmolLM2's real attention on the GPU: the whole prefill through the cupy backend, and the
captured attention, dense against UniSparse (cupy backend) and SDPA.

The model is installed on the CPU machine; the GPU machine gets what it needs as carried files
(64 MiB per call with the tree, no internet there)::

    # CPU: the dense NumPy forward of the 8192-token prose text; q, k, v (float16) of a few
    # layers and the CPU's token log-probs into .model_gpu/qkv.npz (about 32 MB)
    python scripts/model_gpu.py capture --n 8192 --layers 3 20
    # CPU: the GGUF (98 MB) in --parts parts under .model_gpu/part<j>/ (31 MiB each for 3), the
    # last with a manifest (size, SHA-256), ids.npz (the tokens and the CPU's log-probs, from
    # qkv.npz) and the wheels the GPU machine lacks (gguf, tokenizers, pyyaml: see --wheels)
    python scripts/model_gpu.py split --parts 3
    echo /.model_gpu/ >> .git/info/exclude

    # GPU, captured attention only (carry .model_gpu/qkv.npz): time dense, UniSparse at each P
    # and SDPA (when PyTorch is there), each checked against the float64 reference first
    python scripts/model_gpu.py time --out $OUT

    # GPU, the whole prefill: three back-to-back calls on one warm machine, carrying
    # .model_gpu/part0, then part1, then part2; each copies its part outside the tree (the
    # machine does not keep an earlier call's carried paths), the last joins them and runs
    # `forward` (see scripts/gpu_model.sh)
    bash scripts/gpu_model.sh check part0 / check part1 / forward

``forward`` joins the parts (refusing a missing or corrupt part), runs the 8192-token prefill
on CuPy arrays (cuBLAS matmuls, our kernels for every attention call): dense in float32 (the
scalar kernel) and with ``attention_dtype=float16`` (the tensor-core kernels), UniSparse at each
P in float16; per run the median wall time of ``--repeats`` prefills, the attention's share,
the cross-entropy, the top-1 agreement with dense, and for dense the largest token log-prob
difference to the CPU's NumPy forward. Then it times the attention of the layers it captured
itself (as ``time`` does, without carrying q, k, v).

Every result is written as JSON (and printed). Timings of single attention calls: CUDA events
after warm-up runs (the first call compiles the kernels), the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
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


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _passkey_prompts(path: Path, n: int, depths: list[float]) -> None:
    """The passkey prompts of ``model_eval.py passkey`` (same builder, keys from one seeded draw
    per depth), tokenized here so that the GPU machine needs no text: ``passkey.npz``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from model_eval import passkey_prompt

    from unisparse_ref.models import SmolLM2

    model = SmolLM2.from_package()
    rng = np.random.default_rng(1)
    arrays: dict = {"depths": np.array(depths), "keys": np.zeros(len(depths), dtype=np.int64)}
    for j, depth in enumerate(depths):
        key = int(rng.integers(10000, 99999))
        arrays["keys"][j] = key
        arrays[f"ids{j}"] = passkey_prompt(model, n, depth, key)
    np.savez(path, **arrays)
    log(f"wrote {path}: {len(depths)} prompts of about {n} tokens")


def cmd_split(args: argparse.Namespace) -> None:
    from unisparse_ref.models import find_smollm2_gguf

    src = find_smollm2_gguf()
    data = src.read_bytes()
    d = Path(args.dir)
    n = args.parts
    size = -(-len(data) // n)
    for j in range(n):
        pd = d / f"part{j}"
        pd.mkdir(parents=True, exist_ok=True)
        for old in pd.glob("model.gguf.part*"):
            old.unlink()
        (pd / "model.gguf.part").write_bytes(data[j * size : (j + 1) * size])
    last = d / f"part{n - 1}"
    (last / "model.gguf.json").write_text(json.dumps(
        {"file": src.name, "size": len(data), "sha256": _sha256(data), "parts": n,
         "part_sha256": [_sha256(data[j * size : (j + 1) * size]) for j in range(n)]}, indent=1))
    qkv = d / "qkv.npz"
    if not qkv.exists():
        raise SystemExit(f"{qkv} is missing: run `python scripts/model_gpu.py capture` first (the tokens and "
                         "the CPU's log-probs come from it)")
    z = np.load(qkv)
    np.savez(last / "ids.npz", ids=z["ids"], token_logprobs=z["token_logprobs"])
    _passkey_prompts(last / "passkey.npz", args.passkey_n, args.passkey_depths)
    wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else []
    if wheels:
        (last / "wheels").mkdir(exist_ok=True)
        for w in wheels:
            (last / "wheels" / w.name).write_bytes(w.read_bytes())
    else:
        log(f"no wheels in {args.wheels!r}: the GPU machine needs gguf, tokenizers and pyyaml for Python 3.12; "
            "pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 "
            "--platform manylinux_2_17_x86_64 -d .model_gpu/wheels gguf tokenizers pyyaml")
    for j in range(n):
        mib = sum(f.stat().st_size for f in (d / f"part{j}").rglob("*") if f.is_file()) / 2**20
        log(f"{d / f'part{j}'}: {mib:.1f} MiB")
        if mib > args.max_mib:
            raise SystemExit(f"part{j} holds {mib:.1f} MiB, more than --max-mib {args.max_mib}: use more --parts")
    log(f"carry one part per call, part{n - 1} (with the manifest, ids.npz and the wheels) in the last")


def _timer(cp: object, fn: object, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()``: the package's CUDA-event timer (``unisparse_ref.bench.time_calls``)."""
    from unisparse_ref.bench import time_calls

    return time_calls([fn], warmup=warmup, repeats=repeats, budget_s=1e6)["ms"]


def cmd_time(args: argparse.Namespace) -> None:
    data = np.load(Path(args.dir) / "qkv.npz")
    layers = {i: tuple(data[f"{x}{i}"] for x in "qkv") for i in data["layers"].tolist()}
    refused = _time_layers(layers, Path(args.out), args.repeats)
    if refused:
        sys.exit(1)


def _time_layers(layers: dict, out_dir: Path, repeats: int) -> list[str]:
    """Time the attention of ``layers`` (``{i: (q, k, v)}``, float16 NumPy): our dense, the
    UniSparse pipeline at each P, SDPA; every contender checked against the float64 reference
    first (a wrong one is refused, not timed). Writes ``model_gpu_time.json``; returns the refusals.
    """
    import cupy as cp

    import unisparse_ref as us

    be = us.get_backend("cupy")
    out: dict = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cp.__version__,
                 "layers": []}
    try:
        import torch
        import torch.nn.functional as F

        out["torch"] = torch.__version__
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

    for i, arrays in layers.items():
        q, k, v = (cp.asarray(x) for x in arrays)
        B, Hq, N = (int(x) for x in q.shape[:3])
        rec: dict = {"layer": i, "shape_q": list(q.shape), "shape_k": list(k.shape), "dtype": str(q.dtype)}
        vis = geometry.visible_blocks(N, N, 128, True)
        dense_mask = np.broadcast_to(vis, (B, Hq, *vis.shape))
        d_out, _ = be.dense_attention(q, k, v, True, None)
        if checked("dense", d_out, dense_mask, rec):
            rec["dense_ms"] = _timer(cp, lambda q=q, k=k, v=v: be.dense_attention(q, k, v, True, None), repeats)
        dn = float(cp.linalg.norm(d_out.astype(cp.float32)))
        rec["unisparse"] = []
        for p in THRESHOLDS:
            cfg = us.UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=p)
            r = us.unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
            if not checked(f"unisparse_P{p}", r.out, r.block_mask.mask, rec):
                continue
            err = float(cp.linalg.norm(r.out.astype(cp.float32) - d_out.astype(cp.float32))) / dn
            ms = _timer(cp, lambda q=q, k=k, v=v, cfg=cfg: us.unisparse_attention(q, k, v, cfg, backend=be),
                        repeats)
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
                        rec[f"{name}_ms"] = _timer(cp, run, repeats)
                except RuntimeError as e:  # a backend that does not take this shape
                    rec[f"{name}_error"] = str(e).splitlines()[0][:200]
        out["layers"].append(rec)
        log(json.dumps(rec))
    out["refused"] = refused
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_gpu_time.json").write_text(json.dumps(out, indent=1))
    if refused:
        log("refused (wrong results, not timed):", *refused)
    return refused


def _find_parts(dirs: list[Path]) -> tuple[Path, dict]:
    """The first of ``dirs`` holding a manifest; the parts checked against it."""
    for d in dirs:
        man = sorted(d.glob("part*/model.gguf.json"))
        if man:
            return d, json.loads(man[0].read_text())
    raise SystemExit("no .model_gpu/part<j>/model.gguf.json in " + ", ".join(map(str, dirs))
                     + ": carry the part written by `model_gpu.py split` that holds the manifest")


def _join_gguf(d: Path, man: dict) -> Path:
    """``d/model.gguf`` from the parts, each checked (count, SHA-256) before it is used."""
    path = d / "model.gguf"
    if path.exists() and path.stat().st_size == man["size"] and _sha256(path.read_bytes()) == man["sha256"]:
        return path
    missing, bad, chunks = [], [], []
    for j in range(man["parts"]):
        f = d / f"part{j}" / "model.gguf.part"
        if not f.exists():
            missing.append(str(f))
            continue
        b = f.read_bytes()
        if _sha256(b) != man["part_sha256"][j]:
            bad.append(str(f))
        chunks.append(b)
    if missing or bad:
        raise SystemExit(f"cannot join the GGUF: missing {missing or 'none'}, corrupt {bad or 'none'} "
                         "(each part is carried by its own call on the same warm machine)")
    data = b"".join(chunks)
    if _sha256(data) != man["sha256"]:
        raise SystemExit("the joined GGUF's SHA-256 differs from the manifest's")
    path.write_bytes(data)
    return path


def cmd_forward(args: argparse.Namespace) -> None:
    """The whole prefill on CuPy arrays, then passkey retrieval and the captured layers' attention.

    The steps run in order of priority under a time budget (``--budget-s`` from the start): a
    step that would start after it is skipped and listed in ``skipped``; the JSON is rewritten
    after every step, so a run stopped from outside keeps what it finished.
    """
    import cupy as cp

    import unisparse_ref as us
    from unisparse_ref.models import SmolLM2

    t_start = time.perf_counter()
    d, man = _find_parts([Path(args.dir), ROOT / ".model_gpu", Path.cwd() / ".model_gpu",
                          ROOT.parent / ".model_gpu"])
    gguf_path = _join_gguf(d, man)
    model = SmolLM2.from_package(gguf_path)
    log(f"model from {gguf_path} ({man['size'] / 2**20:.1f} MiB, SHA-256 checked) in {time.perf_counter() - t_start:.1f} s")
    z = np.load(sorted(d.glob("part*/ids.npz"))[0])
    n = len(z["ids"]) if args.n is None else args.n
    ids, cpu_lp = z["ids"][:n], z["token_logprobs"][: n - 1]
    cpu_ce = float(-cpu_lp.mean())
    props = cp.cuda.runtime.getDeviceProperties(0)
    out: dict = {"device": props["name"].decode(), "cupy": cp.__version__, "numpy": np.__version__,
                 "n_tokens": int(len(ids)), "cpu_dense_ce": cpu_ce, "repeats": args.repeats,
                 "config": {"block_size": 128, "c_q": 16, "c_k": 16}, "budget_s": args.budget_s,
                 "runs": [], "passkey": [], "failed": [], "skipped": []}
    o = Path(args.out)
    o.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out["elapsed_s"] = time.perf_counter() - t_start
        (o / "model_gpu_forward.json").write_text(json.dumps(out, indent=1))

    def cfg(p: float) -> us.UniSparseConfig:
        return us.UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=p)

    dense_ref: dict = {}
    captured: dict = {}

    def run(name: str, att: object, dt: str | None) -> None:
        tw = time.perf_counter()
        model.score(ids[: min(1024, n)], attention=att, backend="cupy", attention_dtype=dt)  # compiles the kernels
        cp.cuda.get_current_stream().synchronize()
        warm = time.perf_counter() - tw
        res = []
        for rep in range(args.repeats):
            cap = args.time_layers if (att is None and dt is None and rep == 0) else ()
            res.append(model.score(ids, attention=att, backend="cupy", attention_dtype=dt, capture_layers=cap))
            if cap:
                captured.update(res[-1].captured)
        r = res[0]
        secs = sorted(x.seconds for x in res)
        att_secs = sorted(x.attention_seconds for x in res)
        rec = {"attention": name, "attention_dtype": dt or "float32", "seconds": secs[len(secs) // 2],
               "seconds_all": [x.seconds for x in res], "attention_seconds": att_secs[len(att_secs) // 2],
               "warmup_seconds_1024_tokens": warm, "ce": r.cross_entropy, "mean_density": r.mean_density,
               "layer_density": r.layer_density,
               "repeat_max_logprob_diff": max(float(np.abs(x.token_logprobs - r.token_logprobs).max()) for x in res)}
        rec["attention_share"] = rec["attention_seconds"] / rec["seconds"]
        rec["max_logprob_diff_vs_cpu_dense"] = float(np.abs(r.token_logprobs - cpu_lp).max())
        rec["ce_minus_cpu_dense"] = r.cross_entropy - cpu_ce
        if att is None:
            dense_ref[rec["attention_dtype"]] = r
        ref = dense_ref.get(rec["attention_dtype"])
        if ref is not None:
            rec["ce_increase_vs_gpu_dense"] = r.cross_entropy - ref.cross_entropy
            rec["top1_agreement_vs_gpu_dense"] = float((r.top1 == ref.top1).mean())
        out["runs"].append(rec)
        log(json.dumps({k: v for k, v in rec.items() if k not in ("layer_density", "seconds_all")}))

    pk_files = sorted(d.glob("part*/passkey.npz"))
    pk = np.load(pk_files[0]) if pk_files else None

    def passkey(j: int, name: str, att: object) -> None:
        # the prefill with ``att`` (float32), 8 greedy tokens decoded densely on the KV cache, as
        # `model_eval.py passkey` does on the CPU
        depth, key, pids = float(pk["depths"][j]), int(pk["keys"][j]), pk[f"ids{j}"]
        tp = time.perf_counter()
        ans = model.decode(model.generate(pids, 8, attention=att, backend="cupy"))
        rec = {"n_tokens": int(len(pids)), "depth": depth, "key": key, "attention": name, "answer": ans,
               "ok": str(key) in ans.replace(" ", ""), "seconds": time.perf_counter() - tp}
        out["passkey"].append(rec)
        log(f"passkey n={len(pids)} depth={depth} {name}: {ans!r} {'OK' if rec['ok'] else 'miss'} "
            f"({rec['seconds']:.1f} s)")

    refused: list[str] = []

    def time_layers() -> None:
        # the attention of the captured layers alone (the `time` step, on this run's own q, k, v)
        refused.extend(_time_layers({i: tuple(x.astype(np.float16) for x in qkv) for i, qkv in captured.items()},
                                    o, args.repeats_layers))

    # in order of priority
    steps: list[tuple[str, Callable[[], None], float]] = [  # (label, step, seconds it must have left)
        ("dense (float32 attention)", lambda: run("dense", None, None), 0),
        ("dense (float16 attention)", lambda: run("dense", None, "float16"), 0),
        ("unisparse P=0.9 (float16 attention)", lambda: run("unisparse P=0.9", cfg(0.9), "float16"), 0),
        ("unisparse P=0.95 (float16 attention)", lambda: run("unisparse P=0.95", cfg(0.95), "float16"), 0),
    ]
    n_pk = 0 if pk is None else len(pk["depths"])
    steps += [(f"passkey {j} {name}", lambda j=j, name=name, att=att: passkey(j, name, att), 0)
              for j in range(n_pk) for name, att in (("dense", None), ("unisparse P=0.9", cfg(0.9)))]
    steps += [("captured layers' attention", time_layers, 25)]
    steps += [(f"unisparse P={p} (float16 attention)", lambda p=p: run(f"unisparse P={p}", cfg(p), "float16"), 0)
              for p in (0.8, 0.99)]
    steps += [(f"passkey {j} unisparse P=0.8", lambda j=j: passkey(j, "unisparse P=0.8", cfg(0.8)), 0)
              for j in range(n_pk)]
    for label, step, need in steps:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left <= need:
            out["skipped"].append(label)
            log(f"skipped (budget): {label}")
            continue
        if label == "captured layers' attention" and not captured:
            continue
        try:
            step()
        except Exception as e:  # noqa: BLE001 - recorded and reported, the other steps go on
            out["failed"].append(f"{label}: {type(e).__name__}: {e}")
            log("FAILED", out["failed"][-1])
        save()
    out["refused"] = refused
    save()
    log("wrote", o / "model_gpu_forward.json", f"after {out['elapsed_s']:.0f} s")
    if out["failed"] or refused or "float32" not in dense_ref:
        sys.exit(1)


def cmd_ingest(args: argparse.Namespace) -> None:
    """Copy a GPU run's JSON files into docs/_static/models/, with the run's date and commit."""
    dst = ROOT / "docs" / "_static" / "models"
    found = False
    for name in ("model_gpu_forward.json", "model_gpu_time.json"):
        f = Path(args.src) / name
        if not f.exists():
            log(f"{f}: not there")
            continue
        data = json.loads(f.read_text())
        data["meta"] = {"date": args.date or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(f.stat().st_mtime)),
                        "commit": args.commit, "source": args.note}
        (dst / name).write_text(json.dumps(data, indent=1))
        log("wrote", dst / name)
        found = True
    if not found:
        raise SystemExit(f"no GPU results in {args.src}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("capture")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 20])
    p = sub.add_parser("split")
    p.add_argument("--dir", default=str(DIR))
    p.add_argument("--parts", type=int, default=3)
    p.add_argument("--max-mib", type=float, default=45.0, help="refuse a part above this size")
    p.add_argument("--wheels", default=str(DIR / "wheels"), help="folder of wheels for the GPU machine")
    p.add_argument("--passkey-n", type=int, default=8192, help="tokens of the passkey prompts")
    p.add_argument("--passkey-depths", type=float, nargs="*", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    p = sub.add_parser("time")
    p.add_argument("--dir", default=str(DIR))
    p.add_argument("--out", default=str(DIR / "results"))
    p.add_argument("--repeats", type=int, default=10)
    p = sub.add_parser("forward")
    p.add_argument("--dir", default=str(DIR), help="where the parts are (also looked for next to the tree)")
    p.add_argument("--out", default=str(DIR / "results"))
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per run (median)")
    p.add_argument("--n", type=int, default=None, help="the first N tokens only (default: all, 8192)")
    p.add_argument("--time-layers", type=int, nargs="*", default=[3, 20],
                   help="layers whose captured attention is then timed alone (none: skip)")
    p.add_argument("--repeats-layers", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="start no step after this many seconds (the JSON keeps what finished)")
    p = sub.add_parser("ingest", help="copy a GPU run's JSON files into docs/_static/models/")
    p.add_argument("src", help="the folder holding model_gpu_forward.json / model_gpu_time.json")
    p.add_argument("--commit", required=True, help="the commit the GPU ran")
    p.add_argument("--date", default=None, help="the run's date (default: the files' modification time)")
    p.add_argument("--note", default="", help="how it ran (machine, call)")
    args = ap.parse_args(argv)
    {"capture": cmd_capture, "split": cmd_split, "time": cmd_time, "forward": cmd_forward,
     "ingest": cmd_ingest}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
