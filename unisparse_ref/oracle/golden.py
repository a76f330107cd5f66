"""Golden vectors: small, versioned cases with every intermediate of the reference pipeline.

Each version ``vN`` ships as ``unisparse_ref/data/golden_vN_<case>.npz`` plus
``golden_vN_manifest.json``; the case names are unique across versions. Each ``.npz`` holds

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

Versions:

* ``v1``: five cases (square causal MHA; ``Nq < Nk`` with ragged tails, GQA, ``c_h = 2``,
  ``c_q != c_k``, two sink blocks; non-causal ``Nq > Nk``; ``P = 1``; float16 with an explicit
  softmax scale and no local block).
* ``v2``: five more, for faults v1 cannot see: exact ties in the scores (the lower block
  index first) and a kept mass that reaches ``P`` exactly (the loop stops); ``c_q != c_k``
  with an offset ``Nk - Nq = S + 1`` where composite visibility decides a block's score,
  GQA with ``c_h = 2`` and two KV heads; a non-default softmax scale with ``c_q < c_k``; rows
  whose forced block alone reaches ``P``, with query rows that have no allowed key.

Integrity: the manifest of every version from v2 on records the SHA-256 of every golden file
of its own and of the earlier versions (v1's manifest predates hashes and stays
byte-identical), and this module pins the SHA-256 of every shipped manifest
(``_MANIFEST_SHA256``). ``python -m unisparse_ref.oracle.golden check`` verifies the hashes,
then regenerates every case in memory and compares (floats within ``1e-12`` relative, masks
and indices exactly).

A version is never rewritten: ``python -m unisparse_ref.oracle.golden regenerate`` writes the
newest defined version and refuses when its files exist already. New cases, or a change of
the reference that moves a stored value, make a new version: define its cases in
``_VERSIONS``, run ``regenerate --version vN``, pin its manifest's hash, and keep the older
versions (a version the reference no longer reproduces fails ``check``, which is the point).
``--out DIR`` writes elsewhere (for a comparison, or to read the files from another language).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

import numpy as np

from .. import reference as ref
from .._convert import dtype_name, to_numpy
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from ..tolerance import check_attention, compare_selection

__all__ = [
    "VERSION",
    "VERSIONS",
    "GoldenCase",
    "case_names",
    "generate_case",
    "load_cases",
    "regenerate",
    "compare",
    "check_hashes",
    "check",
    "check_stage",
    "main",
]

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
    version: str = "v1"

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


def _zero_composite_queries(rng: np.random.Generator, B: int, Hq: int, Hkv: int, nq: int, nk: int, D: int,
                            dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian inputs whose queries come in pairs ``(x, -x)``: with ``c_q = 2`` every composite
    query is exactly 0, every composite row exactly uniform, and (non-causal, ``Nk/c_k`` a power
    of two) every full key block scores exactly ``1/nKb``: exact ties, in any arithmetic."""
    q, k, v = _gauss(rng, B, Hq, Hkv, nq, nk, D, np.float64)
    q[..., 1::2, :] = -q[..., 0::2, :]
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


class _Def(NamedTuple):
    description: str
    maker: Callable[..., Any]
    shape: tuple[int, ...]  # (B, Hq, Hkv, Nq, Nk, D)
    dtype: Any
    config: dict[str, Any]
    seed: int


#: version -> case name -> definition. A shipped version is never edited (seeds included).
_VERSIONS: dict[str, dict[str, _Def]] = {
    "v1": {
        "basic_causal": _Def("square causal, MHA, lengths a multiple of S", _rope_inputs, (1, 2, 2, 64, 64, 16),
                             np.float32, dict(block_size=16, c_q=4, c_k=4, threshold=0.9), 7000),
        "ragged_gqa_ch2": _Def("Nq < Nk, ragged tails, GQA G=4 with head pooling c_h=2, c_q != c_k, 2 sink blocks",
                               _rope_inputs, (1, 4, 1, 45, 77, 8), np.float32,
                               dict(block_size=16, c_q=4, c_k=8, c_h=2, threshold=0.8, n_sink_blocks=2), 7001),
        "noncausal_nq_gt_nk": _Def("non-causal with Nq > Nk, batch 2", _gauss, (2, 2, 1, 40, 24, 8), np.float32,
                                   dict(block_size=16, c_q=8, c_k=4, threshold=0.7, causal=False), 7002),
        "keep_all_p1": _Def("P = 1 keeps every visible block: dense attention", _gauss, (1, 2, 2, 50, 50, 8),
                            np.float32, dict(block_size=16, c_q=4, c_k=4, threshold=1.0), 7003),
        "float16_sparse": _Def("float16 inputs, low P, no local block, an explicit softmax scale", _rope_inputs,
                               (1, 2, 1, 96, 96, 16), np.float16,
                               dict(block_size=16, c_q=4, c_k=4, threshold=0.5, n_local_blocks=0, softmax_scale=0.2),
                               7004),
    },
    "v2": {
        "exact_ties": _Def("non-causal, every composite query exactly 0: every block scores exactly 1/8 "
                           "(exact ties, lower j first), P = 0.7 not reached exactly",
                           _zero_composite_queries, (1, 2, 1, 64, 128, 8), np.float32,
                           dict(block_size=16, c_q=2, c_k=4, threshold=0.7, causal=False), 7100),
        "exact_threshold_hit": _Def("as exact_ties with P = 0.75: the kept mass reaches P exactly and the "
                                    "loop stops (m < P is false)", _zero_composite_queries, (1, 2, 1, 64, 128, 8),
                                    np.float32, dict(block_size=16, c_q=2, c_k=4, threshold=0.75, causal=False),
                                    7101),
        "cq8_ck4_offset17_gqa": _Def("c_q=8 > c_k=4, Nk - Nq = S + 1 (a query block's last composite query "
                                     "alone sees its diagonal block's first key group), GQA G=4 over 2 KV heads "
                                     "with c_h=2, no local block", _rope_inputs, (1, 8, 2, 64, 81, 8), np.float32,
                                     dict(block_size=16, c_q=8, c_k=4, c_h=2, threshold=0.8, n_local_blocks=0),
                                     7102),
        "scale_cq4_ck16": _Def("softmax_scale 0.5 (not 1/sqrt(D) = 0.25), c_q=4 < c_k=16, ragged key tail, "
                               "no sink, two local blocks", _gauss, (1, 2, 1, 70, 90, 16), np.float32,
                               dict(block_size=16, c_q=4, c_k=16, threshold=0.8, softmax_scale=0.5,
                                    n_sink_blocks=0, n_local_blocks=2), 7103),
        "forced_reaches_p_empty_rows": _Def("no sink, one local block, P = 0.3: the forced block alone reaches P "
                                            "in most rows, so the first rows of those query blocks have no "
                                            "allowed key (out 0, lse -inf)", _rope_inputs, (1, 2, 1, 60, 100, 16),
                                            np.float32,
                                            dict(block_size=16, c_q=4, c_k=4, threshold=0.3, n_sink_blocks=0,
                                                 n_local_blocks=1), 7104),
    },
}

#: Every defined version, oldest first; the newest is the default of ``regenerate``.
VERSIONS = list(_VERSIONS)
VERSION = VERSIONS[-1]

#: SHA-256 of each shipped version's manifest: the anchor of the hash chain (the manifests hold
#: the hashes of the case files). A new version adds its line after ``regenerate``.
_MANIFEST_SHA256 = {
    "v1": "2f1d45bd287ee9e65216476c1e557f837a909063b41d0f2b8b2626e9f6771244",
    "v2": "db966ecce32c8f81dc5d90f4949e48ab88dfa1f3798b38e3216c22cec61e7471",
}


def _find(name: str) -> tuple[str, _Def]:
    for version, cases in _VERSIONS.items():
        if name in cases:
            return version, cases[name]
    known = ", ".join(n for cases in _VERSIONS.values() for n in cases)
    raise ValueError(f"unknown golden case {name!r}; known: {known}")


def _check_version(version: str) -> None:
    if version not in _VERSIONS:
        raise ValueError(f"golden version {version!r} is not defined (defined: {', '.join(VERSIONS)}); "
                         "define its cases in unisparse_ref.oracle.golden._VERSIONS first")


def case_names(version: str | None = None) -> list[str]:
    """Names of the golden cases of ``version`` (default: every version, oldest first)."""
    if version is not None:
        _check_version(version)
    return [n for v, cases in _VERSIONS.items() if version in (None, v) for n in cases]


def generate_case(name: str) -> GoldenCase:
    """Compute one case from scratch with the reference (deterministic)."""
    version, d = _find(name)
    B, Hq, Hkv, nq, nk, D = d.shape
    q, k, v = d.maker(np.random.default_rng(d.seed), B, Hq, Hkv, nq, nk, D, d.dtype)
    cfg = UniSparseConfig(**d.config)
    q_c, k_c = ref.compress(q, k, cfg)
    scores = ref.block_scores(q_c, k_c, cfg, nq, nk)
    bm = ref.select_blocks(scores, cfg, nq, nk)
    margin = ref.selection_margin(scores, cfg, nq, nk)
    counts, idx = bm.to_indices()
    out, lse = ref.block_sparse_attention(q, k, v, bm, cfg)
    dense, _ = ref.dense_attention(q, k, v, cfg.causal, cfg.softmax_scale)
    arrays = {"q": q, "k": k, "v": v, "q_c": q_c, "k_c": k_c, "scores": scores, "margin": margin,
              "mask": bm.mask, "kv_counts": counts, "kv_indices": idx, "out": out, "lse": lse, "dense_out": dense}
    return GoldenCase(name, d.description, cfg, nq, nk, arrays, version)


def _data_dir() -> str:
    return str(resources.files("unisparse_ref.data"))


def _case_file(version: str, name: str) -> str:
    return f"golden_{version}_{name}.npz"


def _manifest_file(version: str) -> str:
    return f"golden_{version}_manifest.json"


def _files(version: str) -> list[str]:
    return [_case_file(version, n) for n in _VERSIONS[version]] + [_manifest_file(version)]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write(case: GoldenCase, directory: str) -> str:
    path = os.path.join(directory, _case_file(case.version, case.name))
    cfg_json = json.dumps(dataclasses.asdict(case.config), sort_keys=True)
    np.savez_compressed(path, config=np.array(cfg_json), nq=np.int64(case.nq), nk=np.int64(case.nk),
                        description=np.array(case.description), **case.arrays)
    return path


def regenerate(directory: str | None = None, version: str | None = None) -> list[str]:
    """Write the cases and the manifest of ``version`` (default: the newest) into ``directory``
    (default: the package data folder).

    From v2 on the manifest records the SHA-256 of every file written and of every golden file
    of an earlier version found in ``directory``.

    Raises
    ------
    FileExistsError
        When a file of ``version`` exists already in ``directory``: a version is never
        overwritten (define a new version, or write to another directory).
    ValueError
        When ``version`` is not defined in ``_VERSIONS``.
    """
    version = VERSION if version is None else version
    _check_version(version)
    directory = _data_dir() if directory is None else directory
    os.makedirs(directory, exist_ok=True)
    existing = [f for f in _files(version) if os.path.exists(os.path.join(directory, f))]
    if existing:
        raise FileExistsError(
            f"golden {version} exists already in {directory} ({', '.join(existing)}); a golden version is never "
            f"overwritten. New cases, or a reference change that moves a stored value, make a new version: "
            f"define it in unisparse_ref.oracle.golden._VERSIONS and run 'regenerate --version <new>' (or "
            f"write elsewhere with --out DIR)")
    paths = [_write(generate_case(n), directory) for n in _VERSIONS[version]]
    manifest: dict[str, Any] = {
        "version": version,
        "generator": f"python -m unisparse_ref.oracle.golden regenerate --version {version}",
        "tolerance": f"floats within {_TOL} relative (to max|x|), masks and indices exact",
        "numpy": np.__version__,
        "cases": {n: {"description": d.description, "shape_B_Hq_Hkv_Nq_Nk_D": list(d.shape),
                      "dtype": str(np.dtype(d.dtype)), "config": d.config, "seed": d.seed}
                  for n, d in _VERSIONS[version].items()},
    }
    if version != "v1":  # v1's manifest predates the hashes (and the shipped one stays byte-identical)
        earlier = VERSIONS[: VERSIONS.index(version)]
        covered = [f for v in earlier for f in _files(v)] + [os.path.basename(p) for p in paths]
        manifest["sha256"] = {f: _sha256(os.path.join(directory, f)) for f in covered
                              if os.path.exists(os.path.join(directory, f))}
    mpath = os.path.join(directory, _manifest_file(version))
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return paths + [mpath]


def _read(path: str, name: str, version: str) -> GoldenCase:
    with np.load(path, allow_pickle=False) as z:
        cfg = UniSparseConfig(**json.loads(str(z["config"])))
        arrays = {key: z[key] for key in z.files if key not in ("config", "nq", "nk", "description")}
        return GoldenCase(name, str(z["description"]), cfg, int(z["nq"]), int(z["nk"]), arrays, version)


def load_cases(directory: str | None = None, version: str | None = None) -> list[GoldenCase]:
    """Load the golden cases of ``version`` (default: every version, oldest first) from
    ``directory`` (default: the ones shipped with the package).

    Raises
    ------
    FileNotFoundError
        When a case file is missing.
    """
    directory = _data_dir() if directory is None else directory
    cases = []
    for v in VERSIONS if version is None else [version]:
        _check_version(v)
        for n in _VERSIONS[v]:
            path = os.path.join(directory, _case_file(v, n))
            if not os.path.exists(path):
                raise FileNotFoundError(f"golden case {n!r} ({v}) not found at {path}; write it with "
                                        f"'python -m unisparse_ref.oracle.golden regenerate --version {v} --out DIR'")
            cases.append(_read(path, n, v))
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


def check_hashes(directory: str | None = None, pinned: bool | None = None) -> list[str]:
    """Integrity of the golden files in ``directory`` (default: the shipped ones).

    Every hash a manifest records must match its file, and every case file must be covered by
    some manifest's hash. With ``pinned`` (default: when ``directory`` is the package data
    folder) every manifest must also match its pinned hash in ``_MANIFEST_SHA256``.
    Returns the problems found (empty: intact).
    """
    shipped = directory is None
    directory = _data_dir() if directory is None else directory
    pinned = shipped if pinned is None else pinned
    problems: list[str] = []
    covered: set[str] = set()
    for v in VERSIONS:
        mpath = os.path.join(directory, _manifest_file(v))
        if not os.path.exists(mpath):
            problems.append(f"{_manifest_file(v)} is missing")
            continue
        if pinned:
            want = _MANIFEST_SHA256.get(v, "")
            got = _sha256(mpath)
            if got != want:
                problems.append(f"{_manifest_file(v)}: SHA-256 {got} differs from the pinned "
                                f"{want or '(none: pin it in golden._MANIFEST_SHA256)'}")
        with open(mpath) as f:
            recorded = json.load(f).get("sha256", {})
        for fname, h in sorted(recorded.items()):
            path = os.path.join(directory, fname)
            if not os.path.exists(path):
                problems.append(f"{fname} (hashed in {_manifest_file(v)}) is missing")
            elif _sha256(path) != h:
                problems.append(f"{fname}: SHA-256 {_sha256(path)} differs from {h} recorded in "
                                f"{_manifest_file(v)} (a golden file was edited or regenerated in place)")
            covered.add(fname)
    for v in VERSIONS:
        for fname in _files(v)[:-1]:
            if os.path.exists(os.path.join(directory, fname)) and fname not in covered:
                problems.append(f"{fname}: no manifest records its SHA-256")
    return problems


def check(directory: str | None = None) -> list[str]:
    """Everything ``python -m unisparse_ref.oracle.golden check`` verifies: the hashes
    (:func:`check_hashes`) and that the reference reproduces every case of every version."""
    problems = check_hashes(directory)
    for case in load_cases(directory):
        problems += compare(generate_case(case.name), case)
    return problems


# ============================================================================ implementations
#: Relative tolerance (to ``max|ref|``) of composite tokens, by the dtype they come back in.
_POOL_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def check_stage(case: GoldenCase, stage: str, fn: Callable[..., Any], *, score_eps: float = 0.0) -> list[str]:
    """Run one stage of an implementation on a case's *stored* inputs and compare its result
    with the *stored* outputs (no live reference involved in what is compared).

    ``stage`` and the signature of ``fn``:

    * ``"compress"``: ``fn(q, k, config) -> (q_c, k_c)``, within ``1e-12`` (float64),
      ``1e-5`` (float32), ``2e-3`` (float16) or ``1.6e-2`` (bfloat16) of ``max|ref|``;
    * ``"scores"``: ``fn(q_c, k_c, config, nq, nk) -> scores``, within ``score_eps + 1e-12``;
    * ``"selection"``: ``fn(scores, config, nq, nk) -> BlockMask`` (or bool array), equal to
      ``mask`` except in borderline rows (stored ``margin`` at most ``1e-6``) whose sums
      cannot round (:func:`unisparse_ref.oracle.testing.exact_rows` are never excused);
    * ``"attention"``: ``fn(q, k, v, block_mask, config) -> (out, lse)`` on the stored mask;
      ``out`` against the stored ``out`` under SPEC section 7 (the float16/bfloat16 bound's
      width comes from the reference's low-precision mode), ``lse`` (float32 or float64)
      against the stored ``lse``.

    Returns the problems found (empty: the implementation reproduces the case).
    """
    from . import testing

    cfg, name = case.config, case.name
    if stage == "compress":
        res = fn(case.q, case.k, cfg)
        problems = []
        for key, got_any in zip(("q_c", "k_c"), res, strict=True):
            got, want = to_numpy(got_any), case[key]
            if tuple(got.shape) != want.shape:
                problems.append(f"{name}.{key}: shape {tuple(got.shape)}, stored {want.shape}")
                continue
            tol = _POOL_RTOL.get(dtype_name(got.dtype), _POOL_RTOL["bfloat16"]) * float(np.abs(want).max())
            err = float(np.abs(got.astype(np.float64) - want).max())
            if not err <= tol:
                problems.append(f"{name}.{key}: max difference {err:.3e} > {tol:.3e}")
        return problems
    if stage == "scores":
        got = np.asarray(to_numpy(fn(case["q_c"], case["k_c"], cfg, case.nq, case.nk)), dtype=np.float64)
        want = case["scores"]
        if got.shape != want.shape:
            return [f"{name}.scores: shape {got.shape}, stored {want.shape}"]
        err = float(np.abs(got - want).max())
        return [] if err <= score_eps + 1e-12 else [f"{name}.scores: max difference {err:.3e} > {score_eps + 1e-12:.3e}"]
    if stage == "selection":
        res = fn(case["scores"], cfg, case.nq, case.nk)
        got = to_numpy(res.mask if isinstance(res, BlockMask) else res)
        if got.shape != case["mask"].shape:
            return [f"{name}.mask: shape {got.shape}, stored {case['mask'].shape}"]
        margin = np.where(testing.exact_rows(case["scores"], cfg.threshold), np.inf, case["margin"])
        chk = compare_selection(got.astype(bool), case["mask"], margin)
        return [] if chk.ok else [f"{name}.mask: {chk.message()}"]
    if stage == "attention":
        bm = BlockMask(case["mask"], cfg.block_size, cfg.c_h, case.nq, case.nk, cfg.causal)
        res = fn(case.q, case.k, case.v, bm, cfg)
        out, lse = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
        o = to_numpy(out)
        if o.shape != case["out"].shape:
            return [f"{name}.out: shape {o.shape}, stored {case['out'].shape}"]
        dt = testing._kernel_dtype(case.q.dtype, o.dtype)
        out_lp = lse_lp = None
        if testing._lowprec(dt):
            out_lp, lse_lp = ref.block_sparse_attention(case.q, case.k, case.v, bm, cfg, precision=dt)
        problems = []
        chk = check_attention(o, case["out"], out_lp, dt)
        if not chk.ok:
            problems.append(f"{name}.out: {chk.message()}")
        if lse is not None:
            try:
                testing._assert_lse_close(lse, case["lse"].astype(np.float64), lse_lp, testing.LSE_DTYPES)
            except AssertionError as e:
                problems.append(f"{name}.lse: {e}")
        return problems
    raise ValueError(f"stage must be compress, scores, selection or attention, got {stage!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m unisparse_ref.oracle.golden {regenerate,check,list}``."""
    p = argparse.ArgumentParser(prog="python -m unisparse_ref.oracle.golden", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("regenerate", help="write one version's golden files (default: the newest, into the package "
                                          "data folder); refuses to overwrite an existing version")
    r.add_argument("--out", default=None, help="directory (default: the package data folder)")
    r.add_argument("--version", default=None, choices=VERSIONS, help=f"version to write (default {VERSION})")
    c = sub.add_parser("check", help="verify the hashes, regenerate every case in memory and compare with the "
                                     "shipped (or --dir) files")
    c.add_argument("--dir", default=None)
    sub.add_parser("list", help="list the cases of every version")
    args = p.parse_args(argv)
    if args.cmd == "regenerate":
        try:
            paths = regenerate(args.out, args.version)
        except FileExistsError as e:
            print(f"refused: {e}", file=sys.stderr)
            return 1
        for path in paths:
            print(f"wrote {path} ({os.path.getsize(path)} bytes)")
        if args.out is None:
            print(f"pin the manifest in unisparse_ref.oracle.golden._MANIFEST_SHA256: "
                  f"{args.version or VERSION!r}: {_sha256(paths[-1])!r}")
        return 0
    if args.cmd == "list":
        for v, cases in _VERSIONS.items():
            for n, d in cases.items():
                print(f"{v} {n}: {d.description}")
        return 0
    problems = check(args.dir)
    for line in problems:
        print(line)
    print("golden vectors intact and reproduced" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
