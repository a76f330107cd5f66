"""Golden vectors: small, versioned cases with every intermediate of the reference pipeline.

Version 1 (``golden_v1``) ships as ``unisparse_ref/data/golden_v1_<case>.npz`` plus
``golden_v1_manifest.json``. Each ``.npz`` holds

==============  ===========================================================  =========
key             meaning                                                      dtype
==============  ===========================================================  =========
``q, k, v``     inputs ``[B,Hq,Nq,D]``, ``[B,Hkv,Nk,D]``                     input's
``config``      the :class:`UniSparseConfig` as JSON (a 0-d string array)     str
``nq, nk``      lengths                                                      int64
``q_c, k_c``    composite tokens (SPEC 3)                                    float64
``scores``      block scores ``[B,Hm,nQb,nKb]`` (SPEC 4)                     float64
``margin``      selection margin ``[B,Hm,nQb]`` (``inf``: cannot flip)       float64
``mask``        selected blocks ``[B,Hm,nQb,nKb]`` (SPEC 5)                  bool
``kv_counts``   ``[B,Hm,nQb]``, ``kv_indices`` ``[B,Hm,nQb,nKb]``            int32
``out, lse``    block-sparse attention (SPEC 6)                              f64, f32
``dense_out``   dense attention, for reference                               float64
==============  ===========================================================  =========

Use them to test an implementation in another language without Python at test time, or to
detect a change of the reference. Regenerate with ``python -m unisparse_ref.golden
regenerate`` (into the package's data folder, or ``--out DIR``) and compare with
``python -m unisparse_ref.golden check``: regenerating must reproduce the shipped values
within ``1e-12`` (relative, floats) and exactly (masks and indices). A change of the
reference that moves them is a new version (``golden_v2``), never an edit of v1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from .. import reference as ref
from ..config import UniSparseConfig

__all__ = ["VERSION", "GoldenCase", "case_names", "generate_case", "load_cases", "regenerate", "compare", "main"]

VERSION = "v1"
_PREFIX = f"golden_{VERSION}_"
_TOL = 1e-12


@dataclass
class GoldenCase:
    """One golden case: name, description, config, inputs and every expected array."""

    name: str
    description: str
    config: UniSparseConfig
    nq: int
    nk: int
    arrays: dict[str, np.ndarray]

    @property
    def q(self) -> np.ndarray:
        return self.arrays["q"]

    @property
    def k(self) -> np.ndarray:
        return self.arrays["k"]

    @property
    def v(self) -> np.ndarray:
        return self.arrays["v"]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


def _rope_inputs(rng: np.random.Generator, B: int, Hq: int, Hkv: int, nq: int, nk: int, D: int,
                 dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ..evaluation.workloads import rope

    u = 3.0 * rng.standard_normal((B, Hkv, 1, D))
    q = rope(rng.standard_normal((B, Hq, nq, D)) + np.repeat(u, Hq // Hkv, axis=1), np.arange(nq) + max(0, nk - nq))
    k = rope(rng.standard_normal((B, Hkv, nk, D)) + u, np.arange(nk))
    v = rng.standard_normal((B, Hkv, nk, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _gauss(rng: np.random.Generator, B: int, Hq: int, Hkv: int, nq: int, nk: int, D: int,
           dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = 1.5 * rng.standard_normal((B, Hq, nq, D))
    k = 1.5 * rng.standard_normal((B, Hkv, nk, D))
    v = rng.standard_normal((B, Hkv, nk, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


#: name -> (description, input maker, shape (B, Hq, Hkv, Nq, Nk, D), dtype, config kwargs)
_CASES: dict[str, tuple[str, Callable[..., Any], tuple[int, ...], Any, dict[str, Any]]] = {
    "basic_causal": ("square causal, MHA, lengths a multiple of S", _rope_inputs, (1, 2, 2, 64, 64, 16),
                     np.float32, dict(block_size=16, c_q=4, c_k=4, threshold=0.9)),
    "ragged_gqa_ch2": ("Nq < Nk, ragged tails, GQA G=4 with head pooling c_h=2, c_q != c_k, 2 sink blocks",
                       _rope_inputs, (1, 4, 1, 45, 77, 8), np.float32,
                       dict(block_size=16, c_q=4, c_k=8, c_h=2, threshold=0.8, n_sink_blocks=2)),
    "noncausal_nq_gt_nk": ("non-causal with Nq > Nk, batch 2", _gauss, (2, 2, 1, 40, 24, 8), np.float32,
                           dict(block_size=16, c_q=8, c_k=4, threshold=0.7, causal=False)),
    "keep_all_p1": ("P = 1 keeps every visible block: dense attention", _gauss, (1, 2, 2, 50, 50, 8),
                    np.float32, dict(block_size=16, c_q=4, c_k=4, threshold=1.0)),
    "float16_sparse": ("float16 inputs, low P, no local block, an explicit softmax scale", _rope_inputs,
                       (1, 2, 1, 96, 96, 16), np.float16,
                       dict(block_size=16, c_q=4, c_k=4, threshold=0.5, n_local_blocks=0, softmax_scale=0.2)),
}


def case_names() -> list[str]:
    """Names of the golden cases of this version."""
    return list(_CASES)


def generate_case(name: str) -> GoldenCase:
    """Compute one case from scratch with the reference (deterministic)."""
    if name not in _CASES:
        raise ValueError(f"unknown golden case {name!r}; known: {', '.join(_CASES)}")
    desc, maker, shape, dtype, cfg_kw = _CASES[name]
    seed = 7000 + list(_CASES).index(name)
    B, Hq, Hkv, nq, nk, D = shape
    q, k, v = maker(np.random.default_rng(seed), B, Hq, Hkv, nq, nk, D, dtype)
    cfg = UniSparseConfig(**cfg_kw)
    q_c, k_c = ref.compress(q, k, cfg)
    scores = ref.block_scores(q_c, k_c, cfg, nq, nk)
    bm = ref.select_blocks(scores, cfg, nq, nk)
    margin = ref.selection_margin(scores, cfg, nq, nk)
    counts, idx = bm.to_indices()
    out, lse = ref.block_sparse_attention(q, k, v, bm, cfg)
    dense, _ = ref.dense_attention(q, k, v, cfg.causal, cfg.softmax_scale)
    arrays = {"q": q, "k": k, "v": v, "q_c": q_c, "k_c": k_c, "scores": scores, "margin": margin,
              "mask": bm.mask, "kv_counts": counts, "kv_indices": idx, "out": out, "lse": lse, "dense_out": dense}
    return GoldenCase(name, desc, cfg, nq, nk, arrays)


def _data_dir() -> str:
    return str(resources.files("unisparse_ref.data"))


def _write(case: GoldenCase, directory: str) -> str:
    path = os.path.join(directory, f"{_PREFIX}{case.name}.npz")
    cfg_json = json.dumps(dataclasses.asdict(case.config), sort_keys=True)
    np.savez_compressed(path, config=np.array(cfg_json), nq=np.int64(case.nq), nk=np.int64(case.nk),
                        description=np.array(case.description), **case.arrays)
    return path


def regenerate(directory: str | None = None) -> list[str]:
    """Write every case (and the manifest) into ``directory`` (default: the package data)."""
    directory = _data_dir() if directory is None else directory
    os.makedirs(directory, exist_ok=True)
    paths = [_write(generate_case(n), directory) for n in _CASES]
    manifest = {
        "version": VERSION,
        "generator": "python -m unisparse_ref.golden regenerate",
        "tolerance": f"floats within {_TOL} relative (to max|x|), masks and indices exact",
        "numpy": np.__version__,
        "cases": {n: {"description": _CASES[n][0], "shape_B_Hq_Hkv_Nq_Nk_D": list(_CASES[n][2]),
                      "dtype": str(np.dtype(_CASES[n][3])), "config": _CASES[n][4]} for n in _CASES},
    }
    mpath = os.path.join(directory, f"{_PREFIX}manifest.json")
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return paths + [mpath]


def _read(path: str, name: str) -> GoldenCase:
    with np.load(path, allow_pickle=False) as z:
        cfg = UniSparseConfig(**json.loads(str(z["config"])))
        arrays = {key: z[key] for key in z.files if key not in ("config", "nq", "nk", "description")}
        return GoldenCase(name, str(z["description"]), cfg, int(z["nq"]), int(z["nk"]), arrays)


def load_cases(directory: str | None = None) -> list[GoldenCase]:
    """Load the golden cases of this version (default: the ones shipped with the package).

    Raises
    ------
    FileNotFoundError
        When a case file is missing (run ``python -m unisparse_ref.golden regenerate``).
    """
    directory = _data_dir() if directory is None else directory
    cases = []
    for n in _CASES:
        path = os.path.join(directory, f"{_PREFIX}{n}.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"golden case {n!r} not found at {path}; run "
                                    "'python -m unisparse_ref.golden regenerate'")
        cases.append(_read(path, n))
    return cases


def compare(a: GoldenCase, b: GoldenCase, tol: float = _TOL) -> list[str]:
    """Differences between two versions of a case (empty when they agree)."""
    problems = []
    if a.config != b.config or (a.nq, a.nk) != (b.nq, b.nk):
        problems.append(f"{a.name}: config or lengths differ")
    for key in sorted(set(a.arrays) | set(b.arrays)):
        if key not in a.arrays or key not in b.arrays:
            problems.append(f"{a.name}: array {key!r} missing on one side")
            continue
        x, y = a.arrays[key], b.arrays[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{a.name}.{key}: shape/dtype {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            continue
        if x.dtype.kind in "biu":
            if not np.array_equal(x, y):
                problems.append(f"{a.name}.{key}: {int((x != y).sum())} entries differ")
            continue
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        same_inf = np.array_equal(np.isinf(xf), np.isinf(yf)) and np.array_equal(xf[np.isinf(xf)], yf[np.isinf(yf)])
        fin = np.isfinite(xf) & np.isfinite(yf)
        scale = max(1.0, float(np.abs(xf[fin]).max(initial=0.0)))
        err = float(np.abs(xf[fin] - yf[fin]).max(initial=0.0))
        if not same_inf or err > tol * scale:
            problems.append(f"{a.name}.{key}: max difference {err:.3e} > {tol:g} * {scale:.3g}"
                            + ("" if same_inf else " (infinities differ)"))
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m unisparse_ref.golden {regenerate,check,list}``."""
    p = argparse.ArgumentParser(prog="python -m unisparse_ref.golden", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("regenerate", help="write the golden files (default: into the package data folder)")
    r.add_argument("--out", default=None)
    c = sub.add_parser("check", help="regenerate in memory and compare with the shipped (or --dir) files")
    c.add_argument("--dir", default=None)
    sub.add_parser("list", help="list the cases")
    args = p.parse_args(argv)
    if args.cmd == "regenerate":
        for path in regenerate(args.out):
            print(f"wrote {path} ({os.path.getsize(path)} bytes)")
        return 0
    if args.cmd == "list":
        for n in _CASES:
            print(f"{n}: {_CASES[n][0]}")
        return 0
    problems = []
    for case in load_cases(args.dir):
        problems += compare(generate_case(case.name), case)
    for line in problems:
        print(line)
    print("golden vectors reproduce" if not problems else f"{len(problems)} difference(s)")
    return 0 if not problems else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
