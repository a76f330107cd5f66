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
from .baselines import SELECTORS, xattention
from .evaluate import DenseEvaluator, density_at_error
from .workloads import MODEL_WORKLOADS, WORKLOADS

__all__ = ["VARIANTS", "THRESHOLDS", "BASELINES", "variant_masks", "measure", "load_qkv", "capture_qkv",
           "cross_entropy_increase", "markdown_tables", "main"]

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
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)

#: The other selectors :func:`measure` can add (``baselines=``), each swept over its own values
#: in :data:`~unisparse_ref.evaluation.baselines.SELECTORS`; ``oracle`` is the mass oracle (SPEC's
#: top-P on the true dense block mass).
BASELINES = ("flexprefill", "minference", "sparge", "oracle")


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
            with_xattention: bool = True, baselines: tuple[str, ...] = ()) -> dict[str, Any]:
    """One layer (``q [1, Hq, N, D]``): per selector its sweep and its density at each target error.

    ``variants`` (names -> research options) and XAttention are swept over :data:`THRESHOLDS`;
    every name of ``baselines`` (from :data:`BASELINES`) over its own values in
    :data:`~unisparse_ref.evaluation.baselines.SELECTORS`. Returns, per selector, the swept
    ``values``, ``density``, ``rel_error`` and ``recall`` lists, ``matched`` (target error ->
    density on the Pareto front, ``None`` when no point reaches it) and, for the threshold
    sweeps, ``at_0.9`` and ``at_0.95`` (``remaining`` at 0.95 is :meth:`UniSparseConfig.calibrated`).
    """
    ev = DenseEvaluator(q, k, v, config)
    out: dict[str, Any] = {}
    names = list(variants) + (["xattention"] if with_xattention else []) + list(baselines)
    masks: list[BlockMask] = []
    values: dict[str, tuple[float, ...]] = {}
    mass = ev.block_mass() if "oracle" in baselines else None
    for name in names:
        if name in variants:
            values[name] = THRESHOLDS
            masks += variant_masks(q, k, config, variants[name])
        elif name == "xattention":
            values[name] = THRESHOLDS
            masks += [xattention(q, k, v, config, threshold=float(p)) for p in THRESHOLDS]
        elif name in BASELINES:
            sel = SELECTORS[name]
            values[name] = tuple(float(x) for x in sel.values)
            extra: dict[str, Any] = {"block_mass": mass} if name == "oracle" else {}
            masks += [sel.fn(q, k, v, config, **{sel.param: x}, **extra) for x in sel.values]
        else:
            raise ValueError(f"unknown selector {name!r}; variants {list(variants)}, baselines {list(BASELINES)}")
    res = ev.evaluate(masks)
    start = 0
    for name in names:
        sl = slice(start, start + len(values[name]))
        start = sl.stop
        dens = [float(m.density) for m in masks[sl]]
        err = [float(e) for e in res["rel_error"][sl]]
        rec = [float(r) for r in res["recall"][sl]]
        pts = list(zip(dens, err, strict=True))
        out[name] = {"values": list(values[name]), "density": dens, "rel_error": err, "recall": rec,
                     "matched": {str(t): density_at_error(pts, t) for t in targets}}
        for p in (0.9, 0.95):
            if values[name] is THRESHOLDS:
                at = THRESHOLDS.index(p)
                out[name][f"at_{p}"] = {"density": dens[at], "rel_error": err[at], "recall": rec[at]}
    return out


def load_qkv(path: str, layers: list[int] | None = None) -> tuple[list[int], list[tuple[np.ndarray, ...]], str]:
    """Captured ``q, k, v`` of real layers from an ``.npz`` (``scripts/model_gpu.py capture`` or
    :func:`capture_qkv`): arrays ``q<L>``, ``k<L>``, ``v<L>`` ``[1, H, N, D]`` and ``layers``.

    Returns the layers, their ``(q, k, v)`` as float32 and a description.
    """
    z = np.load(path)
    have = [int(x) for x in z["layers"]]
    layers = have if layers is None else layers
    missing = [i for i in layers if i not in have]
    if missing:
        raise ValueError(f"{path} holds layers {have}, not {missing}")
    arrays = [tuple(np.asarray(z[f"{x}{i}"], dtype=np.float32) for x in "qkv") for i in layers]
    n = arrays[0][0].shape[2]
    return layers, arrays, f"captured q, k, v of SmolLM2-135M layers {layers}, {n} tokens ({path})"


def capture_qkv(path: str, n: int, layers: list[int], text_file: str | None = None) -> None:
    """One dense NumPy prefill of the first ``n`` tokens: save ``q, k, v`` of ``layers`` (float16,
    as ``scripts/model_gpu.py capture`` does), the token ids and the token log-probs to ``path``."""
    from ..models import SmolLM2
    from .workloads import prose_text

    model = SmolLM2.from_package()
    if text_file is None:
        text = prose_text()
    else:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    ids = model.encode(text)[:n]
    if len(ids) < n:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than n={n}")
    res = model.score(ids, capture_layers=layers)
    arrays: dict[str, np.ndarray] = {"ids": np.asarray(ids), "token_logprobs": res.token_logprobs,
                                     "layers": np.array(layers)}
    for i, (q, k, v) in res.captured.items():
        arrays[f"q{i}"], arrays[f"k{i}"], arrays[f"v{i}"] = (x.astype(np.float16) for x in (q, k, v))
    np.savez(path, **arrays)


def cross_entropy_increase(configs: dict[str, UniSparseConfig], n: int = 2048, text_file: str | None = None,
                           dense_from: str | None = None) -> dict[str, Any]:
    """End to end: the real model's cross-entropy (nats per token) with each config's attention
    in every layer (NumPy reference), against the dense prefill's, on the first ``n`` tokens.

    ``dense_from``: an ``.npz`` of :func:`capture_qkv` whose ``ids`` (the first ``n`` of them) and
    ``token_logprobs`` replace the text and the dense prefill (one 8K prefill saved per text).
    """
    from ..models import SmolLM2
    from .workloads import prose_text

    model = SmolLM2.from_package()
    if dense_from is not None:
        z = np.load(dense_from)
        if z["ids"].size < n:
            raise ValueError(f"{dense_from} holds {z['ids'].size} tokens, fewer than n={n}")
        ids = np.asarray(z["ids"][:n], dtype=np.int64)
        dense = float(-np.mean(z["token_logprobs"][: n - 1]))
    else:
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
                     "mean_density": float(np.mean(dens)), "layer_density": [float(d) for d in dens]}
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_tables(data: dict[str, Any], targets: tuple[str, ...] = ("0.2", "0.1", "0.05")) -> str:
    """The *Calibration* page's tables from a ``--json`` file of :func:`main` (layers as columns).

    Two tables: density at matched error (``d@0.2 / d@0.1 / d@0.05``) per selector, and
    ``density / error / recall`` at ``P = 0.9`` and ``P = 0.95`` per threshold-swept selector.
    """
    res = data["results"]
    layers = list(res)
    names = list(res[layers[0]])
    head = "| selector | " + " | ".join(f"{L}: " + " / ".join(f"d@{t}" for t in targets) for L in layers) + " |"
    lines = [head, "| --- |" + " --- |" * len(layers)]
    for n in names:
        cells = [" / ".join(_f(res[L][n]["matched"][t]) for t in targets) for L in layers]
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    for p in ("0.9", "0.95"):
        key = f"at_{p}"
        swept = [n for n in names if key in res[layers[0]][n]]
        lines += ["", f"| selector at P = {p} | " + " | ".join(f"{L}: density / error / recall" for L in layers) + " |",
                  "| --- |" + " --- |" * len(layers)]
        for n in swept:
            cells = [" / ".join(f"{res[L][n][key][m]:.3f}" for m in ("density", "rel_error", "recall")) for L in layers]
            lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _variant_config(spec: str) -> UniSparseConfig:
    """``"remaining@0.95"`` -> the variant's config at that ``P`` (default 0.9); ``"calibrated"`` ->
    :meth:`UniSparseConfig.calibrated`."""
    if spec == "calibrated":
        return UniSparseConfig.calibrated()
    name, _, thr = spec.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: calibrated, {', '.join(VARIANTS)}")
    return UniSparseConfig(**VARIANTS[name], threshold=float(thr or 0.9))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unisparse_ref.evaluation.calibration", description=__doc__)
    p.add_argument("--workload", default="real_llm", help="a workload name (real_llm or a synthetic one)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--layers", default=None,
                   help="comma-separated layers (real_llm: default 3,6,20; --qkv: default all of the file's)")
    p.add_argument("--text-file", default=None, help="real_llm: a text file (default: the shipped prose)")
    p.add_argument("--qkv", default=None, metavar="NPZ",
                   help="instead of running the model: captured q, k, v (scripts/model_gpu.py capture, or "
                        "--capture); --layers picks among its layers (default: all of them)")
    p.add_argument("--capture", default=None, metavar="NPZ",
                   help="only capture: one dense prefill of --n tokens of the text, q, k, v of --layers "
                        "(float16) into NPZ, then exit")
    p.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (default: all)")
    p.add_argument("--baselines", default="", help=f"comma-separated, from {', '.join(BASELINES)}")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, metavar="JSON",
                   help="only print the page's tables of a --json file, then exit")
    p.add_argument("--dense-from", default=None, metavar="NPZ",
                   help="--cross-entropy: take the token ids and the dense log-probs from NPZ (--capture or "
                        "scripts/model_gpu.py capture) instead of a dense prefill")
    p.add_argument("--cross-entropy", default=None, metavar="VARIANTS",
                   help="instead: the real model's cross-entropy increase at P = 0.9 for these "
                        "comma-separated variants (names of VARIANTS; NAME@P for another P; calibrated)")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.markdown:
        with open(args.markdown) as fh:
            print(markdown_tables(json.load(fh)), end="")
        return 0
    chosen = None if args.layers is None else [int(x) for x in args.layers.split(",") if x]
    layer_list = [3, 6, 20] if chosen is None else chosen
    if args.capture:
        capture_qkv(args.capture, args.n, layer_list, args.text_file)
        print(f"captured layers {layer_list} of {args.n} tokens into {args.capture} ({time.time() - t0:.0f} s)")
        return 0
    if args.cross_entropy:
        cfgs = {v: _variant_config(v) for v in args.cross_entropy.split(",") if v}
        ce = cross_entropy_increase(cfgs, args.n, args.text_file, dense_from=args.dense_from)
        print(f"dense cross-entropy {ce['dense']:.4f} nats/token ({args.n} tokens)")
        for v in cfgs:
            print(f"{v:15s} CE {ce[v]['cross_entropy']:.4f}  increase {ce[v]['increase']:+.4f}  "
                  f"mean density {ce[v]['mean_density']:.3f}  ({time.time() - t0:.0f} s)")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(ce, fh, indent=1)
        return 0
    variants = VARIANTS if args.variants is None else {v: VARIANTS[v] for v in args.variants.split(",") if v}
    baselines = tuple(b for b in args.baselines.split(",") if b)
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        p.error(f"unknown baselines {bad}; known: {', '.join(BASELINES)}")
    if args.qkv:
        layers, arrays, description = load_qkv(args.qkv, chosen)
        labels = [f"layer {i}" for i in layers]
        causal = True
    else:
        if args.workload in MODEL_WORKLOADS:
            w = MODEL_WORKLOADS[args.workload](args.n, layers=layer_list, text_file=args.text_file)
            labels = [f"layer {i}" for i in layer_list]
        else:
            w = WORKLOADS[args.workload](args.n)
            labels = [f"batch {b}" for b in range(w.q.shape[0])]
        arrays = [(w.q[b:b + 1], w.k[b:b + 1], w.v[b:b + 1]) for b in range(len(labels))]
        causal, description = w.causal, w.description
    cfg = UniSparseConfig(causal=causal)
    results = {}
    for (q, k, v), label in zip(arrays, labels, strict=True):
        results[label] = measure(q, k, v, cfg, variants=variants, baselines=baselines)
        r = results[label]
        print(f"== {args.qkv or args.workload} {label} ({time.time() - t0:.0f} s)", flush=True)
        print("selector        d@0.2   d@0.1   d@0.05  | P=0.9: density  error  recall | P=0.95: density  error  recall")
        for name, x in r.items():
            m = x["matched"]
            f = [("  -   " if m[t] is None else f"{m[t]:.3f} ") for t in ("0.2", "0.1", "0.05")]
            line = f"{name:15s} {f[0]}  {f[1]}  {f[2]}"
            for key in ("at_0.9", "at_0.95"):
                if key in x:
                    a = x[key]
                    line += f" | {a['density']:.3f}  {a['rel_error']:.3f}  {a['recall']:.3f}"
            print(line, flush=True)
        if args.json:  # after every layer: a long run leaves what it has measured
            with open(args.json, "w") as fh:
                json.dump({"workload": args.qkv or args.workload, "n": int(arrays[0][0].shape[2]),
                           "text_file": args.text_file, "description": description, "results": results}, fh,
                          indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
