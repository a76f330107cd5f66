"""The agreement rules of SPEC section 7: the one place they are written.

The shared test suite, :mod:`unisparse_ref.oracle.testing` (and so ``unisparse-ref verify``)
and the benchmark's correctness gate all decide pass or fail with the functions here.

* Attention outputs: a kernel of dtype ``float16``/``bfloat16`` passes when
  ``max|out - ref64| <= 2 * max|out_lp - ref64| + 1e-5``, with ``out_lp`` the reference run in
  its low-precision mode (:func:`unisparse_ref.reference.attention.block_sparse_attention` with
  ``precision=dtype``). A ``float32`` kernel passes at ``1e-5`` relative to ``max|ref64|``.
* Log-sum-exp (the reference extends SPEC 7 to ``lse``): float32, ``-inf`` exactly on the
  rows with no allowed key, never NaN, and elsewhere within
  ``1e-5 * max(1, max|lse_ref|) + 2 * max|lse_lp - lse_ref|`` (the second term for
  float16/bfloat16 kernels only).
* Selection on identical scores: masks must be equal except in *borderline* rows, where the
  decision is within ``1e-6`` of ``P`` (reported, not hidden).
* Selection on a backend's own, lower-precision scores: every row must be *eps-valid* under
  the reference scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import geometry
from ._convert import dtype_name, to_numpy
from .config import UniSparseConfig

__all__ = [
    "BORDERLINE",
    "AttentionCheck",
    "LseCheck",
    "attention_tolerance",
    "check_attention",
    "check_lse",
    "SelectionCheck",
    "compare_selection",
    "eps_valid_rows",
]

#: Distance of a selection decision from ``P`` under which a row is borderline.
BORDERLINE = 1e-6


@dataclass
class AttentionCheck:
    """The outcome of :func:`check_attention`: all the numbers, and ``ok``."""

    ok: bool
    dtype: str
    max_error: float
    tolerance: float
    lowprec_error: float
    worst_index: tuple[int, ...]
    worst_value: float
    worst_reference: float

    def message(self) -> str:
        """One human-readable line for assertion messages."""
        return (
            f"{'PASS' if self.ok else 'FAIL'} ({self.dtype}): max|out - ref64| = {self.max_error:.3e} "
            f"{'<=' if self.ok else '>'} tolerance {self.tolerance:.3e} "
            f"(low-precision reference error {self.lowprec_error:.3e}); worst at {self.worst_index}: "
            f"out = {self.worst_value:.6g}, ref64 = {self.worst_reference:.6g}"
        )


def attention_tolerance(ref64: np.ndarray, out_lp: np.ndarray | None, dtype: Any) -> tuple[float, float]:
    """The bound of SPEC section 7 for a kernel of ``dtype``: ``(tolerance, lowprec_error)``.

    ``float16``/``bfloat16``: ``2 * max|out_lp - ref64| + 1e-5``. ``float32``:
    ``1e-5 * max|ref64|`` (``out_lp`` unused). ``float64``: ``1e-12 * max|ref64|``.
    """
    dt = np.dtype(dtype)
    ref64 = np.asarray(ref64, dtype=np.float64)
    scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
    if dt == np.float64:
        return 1e-12 * max(scale, 1.0), 0.0
    if dt == np.float32:
        return 1e-5 * max(scale, 1e-30), 0.0
    if out_lp is None:
        raise ValueError(f"a low-precision reference output is needed for dtype {dt}")
    lp_err = float(np.max(np.abs(np.asarray(out_lp, dtype=np.float64) - ref64))) if ref64.size else 0.0
    return 2.0 * lp_err + 1e-5, lp_err


def check_attention(out: Any, ref64: Any, out_lp: Any | None, dtype: Any) -> AttentionCheck:
    """Compare a kernel's ``out`` with the float64 reference under SPEC section 7.

    Parameters
    ----------
    out : array ``[B, Hq, Nq, D]``
        The output under test (any array type).
    ref64 : array
        The float64 reference output.
    out_lp : array or None
        The low-precision-mode reference output for ``dtype`` (not needed for float32/64).
    dtype : dtype
        The kernel's dtype.
    """
    o = to_numpy(out).astype(np.float64)
    r = np.asarray(to_numpy(ref64), dtype=np.float64)
    if o.shape != r.shape:
        raise ValueError(f"out has shape {o.shape} but the reference has {r.shape}")
    tol, lp_err = attention_tolerance(r, None if out_lp is None else to_numpy(out_lp), dtype)
    if not np.isfinite(o).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(o))[0])
        return AttentionCheck(False, dtype_name(dtype), float("inf"), tol, lp_err, idx, float(o[idx]), float(r[idx]))
    diff = np.abs(o - r)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else ()
    err = float(diff[idx]) if diff.size else 0.0
    return AttentionCheck(err <= tol, dtype_name(dtype), err, tol, lp_err, idx,
                          float(o[idx]) if diff.size else 0.0, float(r[idx]) if diff.size else 0.0)


@dataclass
class LseCheck:
    """The outcome of :func:`check_lse`: ``ok`` and, when not, why."""

    ok: bool
    max_error: float
    tolerance: float
    problem: str = ""

    def message(self) -> str:
        """One human-readable line for assertion messages."""
        if self.ok:
            return f"PASS: lse max error {self.max_error:.3e} <= tolerance {self.tolerance:.3e}"
        return f"FAIL: lse {self.problem}"


def lse_tolerance(ref_lse: np.ndarray, lse_lp: np.ndarray | None) -> float:
    """The bound on ``|lse - lse_ref|`` over rows with an allowed key (see the module docstring)."""
    fin = np.isfinite(ref_lse)
    tol = 1e-5 * max(1.0, float(np.abs(ref_lse[fin]).max(initial=0.0)))
    if lse_lp is not None:
        lp = np.asarray(lse_lp, dtype=np.float64)
        tol += 2 * float(np.abs(lp[fin] - ref_lse[fin]).max(initial=0.0))
    return tol


def check_lse(lse: Any, ref_lse: Any, lse_lp: Any | None = None) -> LseCheck:
    """Compare a kernel's log-sum-exp with the reference's under the rule of this module.

    Parameters
    ----------
    lse : array ``[B, Hq, Nq]``
        The log-sum-exp under test (any array type); must be float32.
    ref_lse : array ``[B, Hq, Nq]``
        The float64 reference's (``-inf`` on rows with no allowed key).
    lse_lp : array, optional
        The low-precision-mode reference's, for float16/bfloat16 kernels.
    """
    l_ = to_numpy(lse)
    r = np.asarray(to_numpy(ref_lse), dtype=np.float64)
    lp = None if lse_lp is None else np.asarray(to_numpy(lse_lp), dtype=np.float64)
    tol = lse_tolerance(r, lp)
    if l_.shape != r.shape:
        return LseCheck(False, float("inf"), tol, f"has shape {tuple(l_.shape)}, expected {r.shape} ([B, Hq, Nq])")
    if l_.dtype != np.float32:
        return LseCheck(False, float("inf"), tol, f"must be float32, got {l_.dtype}")
    if np.isnan(l_).any():
        idx = tuple(int(x) for x in np.argwhere(np.isnan(l_))[0])
        return LseCheck(False, float("inf"), tol, f"holds NaN at {idx}")
    empty, got_empty = np.isneginf(r), np.isneginf(l_)
    if not np.array_equal(got_empty, empty):
        idx = tuple(int(x) for x in np.argwhere(got_empty != empty)[0])
        return LseCheck(False, float("inf"), tol,
                        f"must be -inf exactly on rows with no allowed key: at {idx} lse = {l_[idx]}, "
                        f"reference {r[idx]}")
    fin = ~empty
    diff = np.where(fin, np.abs(l_.astype(np.float64) - np.where(fin, r, 0.0)), 0.0)
    err = float(diff.max()) if diff.size else 0.0
    if err > tol:
        idx = tuple(int(x) for x in np.unravel_index(int(np.argmax(diff)), diff.shape))
        return LseCheck(False, err, tol, f"max error {err:.3e} > tolerance {tol:.3e} at {idx}: "
                                         f"lse = {float(l_[idx]):.6g}, reference {float(r[idx]):.6g}")
    return LseCheck(True, err, tol)


@dataclass
class SelectionCheck:
    """The outcome of :func:`compare_selection`."""

    ok: bool
    differing_rows: list[tuple[int, int, int]] = field(default_factory=list)
    borderline_rows: list[tuple[int, int, int]] = field(default_factory=list)

    def message(self) -> str:
        return (
            f"{'PASS' if self.ok else 'FAIL'}: {len(self.differing_rows)} rows differ outside the borderline "
            f"(first: {self.differing_rows[:5]}); {len(self.borderline_rows)} borderline rows "
            f"(first: {self.borderline_rows[:5]})"
        )


def compare_selection(mask: Any, ref_mask: Any, margin: np.ndarray) -> SelectionCheck:
    """Compare two masks from the *same* scores, excusing borderline rows.

    Parameters
    ----------
    mask, ref_mask : bool ``[B, Hm, nQb, nKb]`` (arrays or ``BlockMask``)
    margin : float ``[B, Hm, nQb]``
        :func:`unisparse_ref.reference.selection.selection_margin` of the scores.
    """
    a = to_numpy(getattr(mask, "mask", mask)).astype(bool)
    b = to_numpy(getattr(ref_mask, "mask", ref_mask)).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask has shape {a.shape} but the reference mask has {b.shape}")
    differs = (a != b).any(axis=-1)
    border = np.asarray(margin) <= BORDERLINE
    bad = [tuple(int(x) for x in r) for r in np.argwhere(differs & ~border)]
    bl = [tuple(int(x) for x in r) for r in np.argwhere(border)]
    return SelectionCheck(not bad, bad, bl)


def eps_valid_rows(
    mask: Any, scores: Any, config: UniSparseConfig, nq: int, nk: int, eps: float
) -> np.ndarray:
    """Which rows of ``mask`` are eps-valid under the reference ``scores`` (SPEC section 7).

    A row is eps-valid when every forced block is kept; the kept mass is at least
    ``P - eps``; dropping its lowest-scored non-forced kept block would leave less than
    ``P + eps``; and no visible block left out scores more than ``eps`` above the
    lowest-scored non-forced block kept. (With ``P = 1`` every visible block must be kept.)

    Returns
    -------
    numpy.ndarray of bool, shape ``[B, Hm, nQb]``
    """
    m = to_numpy(getattr(mask, "mask", mask)).astype(bool)
    s = np.asarray(to_numpy(scores), dtype=np.float64)
    S, P = config.block_size, float(config.threshold)
    vis = np.broadcast_to(geometry.visible_blocks(nq, nk, S, config.causal), s.shape)
    forced = np.broadcast_to(
        geometry.forced_blocks(nq, nk, S, config.n_sink_blocks, config.n_local_blocks, config.causal), s.shape
    )
    kept = m & vis
    if P >= 1.0:
        return (kept == vis).all(axis=-1)
    forced_ok = (~forced | kept).all(axis=-1)
    mass = np.where(kept, s, 0.0).sum(axis=-1)
    nonforced_kept = kept & ~forced
    lowest = np.where(nonforced_kept, s, np.inf).min(axis=-1)  # inf when none
    mass_ok = mass >= P - eps
    minimal_ok = np.where(np.isfinite(lowest), mass - lowest < P + eps, True)
    left_out = vis & ~kept
    highest_out = np.where(left_out, s, -np.inf).max(axis=-1)
    order_ok = np.where(np.isfinite(lowest), highest_out <= lowest + eps, True)
    # Rows whose mass was reached by the forced blocks alone keep no other block.
    return forced_ok & mass_ok & minimal_ok & order_ok
