"""Measurements behind :meth:`unisparse_ref.UniSparseConfig.calibrated` (the *Calibration* page).

For every research variant of the estimator (``threshold_mode``, ``sink_tokens``,
``diagonal_correction``; NumPy reference) and for XAttention, per layer of a workload (the
batch axis of ``real_llm`` holds the layers): the (density, relative error, recall) curve over
a sweep of ``P``, the density at matched relative error (``density_at_error``) and the point at
``P = 0.9``. Run it as ``python -m unisparse_ref.evaluation.calibration --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np

from .. import reference as ref
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from .baselines import xattention
from .evaluate import DenseEvaluator, density_at_error
from .workloads import MODEL_WORKLOADS, WORKLOADS

__all__ = ["VARIANTS", "THRESHOLDS", "variant_masks", "measure", "cross_entropy_increase", "main"]

#: name -> the research options of the variant (the rest of the config is the base's).
VARIANTS: dict[str, dict[str, Any]] = {
    "spec": {},
    "remaining": {"threshold_mode": "remaining"},
    "sink4": {"sink_tokens": 4},
    "diag": {"diagonal_correction": True},
    "diag+remaining": {"diagonal_correction": True, "threshold_mode": "remaining"},
    "sink4+diag": {"sink_tokens": 4, "diagonal_correction": True},
    "all": {"sink_tokens": 4, "diagonal_correction": True, "threshold_mode": "remaining"},
}

#: The swept thresholds ``P`` (the same for XAttention's threshold).
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


def variant_masks(q: Any, k: Any, config: UniSparseConfig, options: dict[str, Any],
                  thresholds: tuple[float, ...] = THRESHOLDS) -> list[BlockMask]:
    """UniSparse masks of one variant for every threshold (scores computed once)."""
    cfg = dataclasses.replace(config, **options)
    nq, nk = int(q.shape[2]), int(k.shape[2])
    q_c, k_c = ref.compress(q, k, cfg)
    scores = ref.block_scores(q_c, k_c, cfg, nq, nk)
    return [ref.select_blocks(scores, dataclasses.replace(cfg, threshold=float(p)), nq, nk) for p in thresholds]


def measure(q: np.ndarray, k: np.ndarray, v: np.ndarray, config: UniSparseConfig,
            variants: dict[str, dict[str, Any]] = VARIANTS, targets: tuple[float, ...] = (0.2, 0.1, 0.05),
            with_xattention: bool = True) -> dict[str, Any]:
    """One layer (``q [1, Hq, N, D]``): per selector its sweep and its density at each target error."""
    ev = DenseEvaluator(q, k, v, config)
    out: dict[str, Any] = {}
    names = list(variants) + (["xattention"] if with_xattention else [])
    masks: list[BlockMask] = []
    for name in names:
        if name == "xattention":
            masks += [xattention(q, k, v, config, threshold=float(p)) for p in THRESHOLDS]
        else:
            masks += variant_masks(q, k, config, variants[name])
    res = ev.evaluate(masks)
    n = len(THRESHOLDS)
    for i, name in enumerate(names):
        sl = slice(i * n, (i + 1) * n)
        dens = [float(m.density) for m in masks[sl]]
        err = [float(e) for e in res["rel_error"][sl]]
        rec = [float(r) for r in res["recall"][sl]]
        pts = list(zip(dens, err, strict=True))
        at = THRESHOLDS.index(0.9)
        out[name] = {
            "density": dens, "rel_error": err, "recall": rec,
            "matched": {str(t): density_at_error(pts, t) for t in targets},
            "at_0.9": {"density": dens[at], "rel_error": err[at], "recall": rec[at]},
        }
    return out


def cross_entropy_increase(configs: dict[str, UniSparseConfig], n: int = 2048, text_file: str | None = None
                           ) -> dict[str, Any]:
    """End to end: the real model's cross-entropy (nats per token) with each config's attention
    in every layer (NumPy reference), against the dense prefill's, on the first ``n`` tokens."""
    from ..models import SmolLM2
    from .workloads import prose_text

    model = SmolLM2.from_package()
    if text_file is None:
        text = prose_text()
    else:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    ids = model.encode(text)[:n]
    dense = model.score(ids).cross_entropy
    out: dict[str, Any] = {"dense": dense}
    for name, cfg in configs.items():
        r = model.score(ids, attention=cfg)
        dens = [d for d in r.layer_density if d is not None]
        out[name] = {"cross_entropy": r.cross_entropy, "increase": r.cross_entropy - dense,
                     "mean_density": float(np.mean(dens))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unisparse_ref.evaluation.calibration", description=__doc__)
    p.add_argument("--workload", default="real_llm", help="a workload name (real_llm or a synthetic one)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--layers", default="3,6,20", help="real_llm: comma-separated layers")
    p.add_argument("--text-file", default=None, help="real_llm: a text file (default: the shipped prose)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cross-entropy", default=None, metavar="VARIANTS",
                   help="instead: the real model's cross-entropy increase at P = 0.9 for these "
                        "comma-separated variants (names of VARIANTS; NAME@P for another P)")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.cross_entropy:
        cfgs = {}
        for v in (x for x in args.cross_entropy.split(",") if x):
            name, _, thr = v.partition("@")  # "remaining@0.95": another threshold than 0.9
            cfgs[v] = UniSparseConfig(**VARIANTS[name], threshold=float(thr or 0.9))
        ce = cross_entropy_increase(cfgs, args.n, args.text_file)
        print(f"dense cross-entropy {ce['dense']:.4f} nats/token ({args.n} tokens)")
        for v in cfgs:
            print(f"{v:15s} CE {ce[v]['cross_entropy']:.4f}  increase {ce[v]['increase']:+.4f}  "
                  f"mean density {ce[v]['mean_density']:.3f}  ({time.time() - t0:.0f} s)")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(ce, fh, indent=1)
        return 0
    if args.workload in MODEL_WORKLOADS:
        layers = [int(x) for x in args.layers.split(",") if x]
        w = MODEL_WORKLOADS[args.workload](args.n, layers=layers, text_file=args.text_file)
        labels = [f"layer {i}" for i in layers]
    else:
        w = WORKLOADS[args.workload](args.n)
        labels = [f"batch {b}" for b in range(w.q.shape[0])]
    cfg = UniSparseConfig(causal=w.causal)
    results = {}
    for b, label in enumerate(labels):
        results[label] = measure(w.q[b:b + 1], w.k[b:b + 1], w.v[b:b + 1], cfg)
        r = results[label]
        print(f"== {args.workload} {label} ({time.time() - t0:.0f} s)")
        print("selector        d@0.2   d@0.1   d@0.05  | P=0.9: density  error  recall")
        for name, x in r.items():
            m = x["matched"]
            f = [("  -   " if m[t] is None else f"{m[t]:.3f} ") for t in ("0.2", "0.1", "0.05")]
            a = x["at_0.9"]
            print(f"{name:15s} {f[0]}  {f[1]}  {f[2]} | {a['density']:.3f}  {a['rel_error']:.3f}  {a['recall']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"workload": args.workload, "n": args.n, "text_file": args.text_file,
                       "description": w.description, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
