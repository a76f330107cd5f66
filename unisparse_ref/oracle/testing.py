"""The correctness oracle for other implementations of UniSparse (SPEC section 7).

Two levels:

* :func:`assert_attention_close` checks *one* output against the float64 reference with the
  tolerance rule of SPEC section 7 and raises ``AssertionError`` with a message that names the
  worst element, its index and both errors (yours and the low-precision reference's).
* :func:`check_compress`, :func:`check_scores`, :func:`check_selection`,
  :func:`check_block_sparse_attention` (one per stage of SPEC sections 3 to 6) and
  :func:`check_pipeline` (end to end) run a *battery* of small cases (ragged lengths,
  ``Nq < Nk``, ``c_q != c_k``, GQA with head pooling, several head dims, causal and not, a
  non-default ``softmax_scale``, zero and several sink and local blocks, exact ties, rows
  whose forced mass alone reaches ``P``, empty mask rows, extreme but finite values) against
  your function and return an :class:`OracleReport` (one :class:`CaseResult` per case).
  Borderline selection rows are listed, never hidden.

The batteries are built so that the faults an implementer plausibly makes change a checked
value in at least one case; ``tests/test_mutations.py`` plants each of them in an outside
implementation and asserts that it fails.

Your function receives NumPy arrays (or whatever ``to_device`` turns them into, e.g.
``cupy.asarray``) and may return NumPy, CuPy, Numba device arrays or anything with
``__dlpack__`` / ``__cuda_array_interface__``; :func:`unisparse_ref.to_numpy` converts.

When a case fails, the message tries to say *why*: it compares your output with the
reference run under common mistakes (an off-by-one causal mask, a wrong softmax scale,
missing forced blocks, NaN rows) and names the one that matches.

Example
-------
>>> from unisparse_ref import get_backend
>>> from unisparse_ref.oracle import testing
>>> be = get_backend("numpy")
>>> report = testing.check_block_sparse_attention(be.block_sparse_attention, quick=True)
>>> report.ok
True
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import geometry
from .. import reference as ref
from .._arrays import check_dtype, dtype_name, to_numpy
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from ..tolerance import BORDERLINE, check_attention, check_lse, compare_selection, eps_valid_rows

__all__ = [
    "LSE_DTYPES",
    "CaseResult",
    "OracleReport",
    "AttentionCase",
    "attention_cases",
    "scores_cases",
    "selection_cases",
    "pipeline_cases",
    "make_attention_inputs",
    "exact_rows",
    "assert_attention_close",
    "check_compress",
    "check_scores",
    "check_block_sparse_attention",
    "check_selection",
    "check_pipeline",
    "explain_invalid_rows",
]

#: dtypes accepted for an implementation's ``lse`` by the batteries (our own backends must
#: return float32: :func:`unisparse_ref.tolerance.check_lse`).
LSE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ============================================================================ reports
@dataclass
class CaseResult:
    """The outcome of one case of a battery.

    Attributes
    ----------
    name : str
        Short name of the case (``"gqa_ragged_causal"``, ...).
    ok : bool
        Passed (skipped cases count as passed and have ``skipped = True``).
    message : str
        One or more lines: the numbers on success, the fault on failure.
    skipped : bool
        The function raised ``NotImplementedError`` (an unsupported shape or dtype).
    borderline_rows : list of tuple
        Selection rows ``(b, g, i)`` within ``1e-6`` of ``P`` (SPEC section 7), reported, not hidden.
    """

    name: str
    ok: bool
    message: str
    skipped: bool = False
    borderline_rows: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"PASS"``, ``"FAIL"`` or ``"SKIP"``."""
        return "SKIP" if self.skipped else ("PASS" if self.ok else "FAIL")


@dataclass
class OracleReport:
    """The results of a battery: a list of :class:`CaseResult` and a summary.

    ``bool(report)`` and ``report.ok`` are True when no case failed.
    """

    stage: str
    dtype: str
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failures(self) -> list[CaseResult]:
        """The cases that failed."""
        return [c for c in self.cases if not c.ok]

    def table(self, verbose: bool = False) -> str:
        """A plain-text pass/fail table; failures always show their full message."""
        width = max([len(c.name) for c in self.cases] + [4])
        lines = [f"stage={self.stage} dtype={self.dtype}", f"{'case':<{width}}  status  detail", "-" * (width + 60)]
        for c in self.cases:
            first, *rest = c.message.splitlines() or [""]
            lines.append(f"{c.name:<{width}}  {c.status:<6}  {first}")
            if c.borderline_rows:
                lines.append(f"{'':<{width}}          borderline rows (b, g, i), excused: {c.borderline_rows[:8]}"
                             + (" ..." if len(c.borderline_rows) > 8 else ""))
            if rest and (verbose or not c.ok):
                lines += [f"{'':<{width}}          {r}" for r in rest]
        n_fail, n_skip = len(self.failures), sum(c.skipped for c in self.cases)
        lines.append("-" * (width + 60))
        lines.append(f"{len(self.cases) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} skipped: "
                     f"{'ALL PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ============================================================================ one output
def _lowprec(dtype: np.dtype) -> bool:
    return dtype not in (np.dtype(np.float32), np.dtype(np.float64))


def _kernel_dtype(inputs: np.dtype, out: np.dtype) -> np.dtype:
    """The dtype whose tolerance applies: the less precise of the inputs' and the output's."""
    rank = {np.dtype(np.float64): 3, np.dtype(np.float32): 2}
    a, b = np.dtype(inputs), np.dtype(out)
    if rank.get(a, 1) == 1 and rank.get(b, 1) == 1:
        return a
    return a if rank.get(a, 1) <= rank.get(b, 1) else b


def _masked_attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray,
                        scale: float) -> np.ndarray:
    """Plain float64 masked softmax attention (for the fault diagnosis on tiny inputs)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    G = q.shape[1] // k.shape[1]
    kk, vv = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    logits = np.where(allowed, scale * q @ np.swapaxes(kk, -1, -2), -np.inf)
    m = logits.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    p = np.exp(logits - np.where(empty, 0.0, m))
    den = p.sum(axis=-1, keepdims=True)
    return np.where(empty, 0.0, (p @ vv) / np.where(empty, 1.0, den))


def _diagnose_attention(out: np.ndarray, q: Any, k: Any, v: Any, block_mask: BlockMask,
                        config: UniSparseConfig, tol: float) -> list[str]:
    """Compare ``out`` with the reference under common mistakes; return hints that match."""
    hints: list[str] = []
    q, k, v = (to_numpy(x).astype(np.float64) for x in (q, k, v))
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    if B * Hq * Nq * Nk > 4_000_000:  # diagnosis only on small inputs
        return hints
    bad = ~np.isfinite(out)
    if bad.any():
        rows = np.argwhere(bad.any(axis=-1))
        b, h, t = (int(x) for x in rows[0])
        hints.append(f"non-finite output in {len(rows)} row(s); first at (b={b}, h={h}, t={t}) "
                     f"(query block {t // block_mask.block_size}); a row with no allowed key must give 0, not NaN")
        return hints
    rows = np.arange(Nq)
    allowed = ref.expand_block_mask(block_mask, Hq, rows)
    scale = config.scale_for(D)
    ref64 = _masked_attention64(q, k, v, allowed, scale)
    err = np.abs(out - ref64).max(axis=-1)  # [B, Hq, Nq]
    bad_rows = np.argwhere(err > tol)
    if bad_rows.size:
        b, h, t = (int(x) for x in bad_rows[0])
        blocks = sorted({int(x) for x in bad_rows[:, 2] // block_mask.block_size})
        heads = sorted({int(x) for x in bad_rows[:, 1]})
        hints.append(f"{len(bad_rows)} of {B * Hq * Nq} rows exceed the tolerance; first (b={b}, h={h}, t={t}); "
                     f"query blocks {blocks[:10]}, heads {heads[:10]}")
    variants: list[tuple[str, np.ndarray]] = []
    if block_mask.causal:
        pos = rows + (Nk - Nq)
        keys = np.arange(Nk)
        blk = ref.expand_block_mask(BlockMask(block_mask.numpy().mask, block_mask.block_size,
                                              block_mask.heads_per_mask, Nq, Nk, False), Hq, rows)
        strict = blk & (keys[None, :] < pos[:, None])
        loose = blk & (keys[None, :] <= pos[:, None] + 1)
        topleft = blk & (keys[None, :] <= rows[:, None])
        variants += [
            ("off-by-one causal mask: the diagonal key s = p(t) was excluded (used s < p(t))", strict),
            ("off-by-one causal mask: one key past the diagonal was allowed (used s <= p(t) + 1)", loose),
        ]
        if Nq != Nk:
            variants.append(("causal mask aligned top-left (s <= t) instead of bottom-right (s <= t + Nk - Nq)",
                             topleft))
        variants.append(("causal mask ignored (selected blocks attended in full)", blk))
    elif Nq <= Nk:
        variants.append(("causal mask applied although config.causal is False",
                         allowed & (np.arange(Nk)[None, :] <= (rows + Nk - Nq)[:, None])))
    for why, alt in variants:
        o = _masked_attention64(q, k, v, alt, scale)
        if np.abs(o - ref64).max() > tol and np.abs(out - o).max() <= tol:
            hints.append(f"likely fault: {why}")
            return hints
    for why, s in (("softmax scale 1 (forgot 1/sqrt(D))", 1.0), ("softmax scale 1/D instead of 1/sqrt(D)", 1.0 / D),
                   ("softmax scale sqrt(D) instead of 1/sqrt(D)", math.sqrt(D)),
                   ("softmax scale applied twice (1/D)", scale * scale)):
        if abs(s - scale) < 1e-12 * scale:
            continue
        o = _masked_attention64(q, k, v, allowed, s)
        if np.abs(out - o).max() <= tol:
            hints.append(f"likely fault: wrong {why}; config.softmax_scale={config.softmax_scale} -> {scale:.6g}")
            return hints
    # Blocks: does the output match the reference under a different mask (a forced block dropped)?
    full = ref.expand_block_mask(BlockMask.full(B, block_mask.num_mask_heads, Nq, Nk,
                                                block_size=block_mask.block_size,
                                                heads_per_mask=block_mask.heads_per_mask,
                                                causal=block_mask.causal), Hq, rows)
    o = _masked_attention64(q, k, v, full, scale)
    if np.abs(out - o).max() <= tol and np.abs(o - ref64).max() > tol:
        hints.append("likely fault: the block mask was ignored (dense attention over every visible block)")
        return hints
    m = block_mask.numpy().mask
    empty_rows = ~m.any(axis=-1)
    if empty_rows.any():
        g, i = (int(x) for x in np.argwhere(empty_rows)[0][1:])
        hints.append(f"note: the mask has {int(empty_rows.sum())} empty row(s) (e.g. mask head {g}, query block {i}); "
                     "their output must be 0 and lse -inf")
    return hints


def assert_attention_close(
    out: Any,
    q: Any,
    k: Any,
    v: Any,
    block_mask: BlockMask,
    config: UniSparseConfig | None = None,
    *,
    dtype: Any = None,
    lse: Any = None,
    diagnose: bool = True,
    lse_dtypes: Sequence[Any] = (np.float32,),
) -> None:
    """Assert that ``out`` is block-sparse attention of ``q, k, v`` under SPEC section 7.

    The reference runs in float64 (``ref64``). For a float16/bfloat16 kernel it also runs in
    its low-precision mode (``out_lp``, :func:`unisparse_ref.reference.attention.block_sparse_attention`
    with ``precision=dtype``) and ``out`` passes when
    ``max|out - ref64| <= 2 * max|out_lp - ref64| + 1e-5``; a float32 kernel passes at
    ``1e-5 * max|ref64|``.

    Parameters
    ----------
    out : array ``[B, Hq, Nq, D]``
        The output under test (any array type).
    q : array ``[B, Hq, Nq, D]``
    k, v : array ``[B, Hkv, Nk, D]``
    block_mask : BlockMask
        The mask the output was computed with.
    config : UniSparseConfig, optional
        Supplies ``softmax_scale``.
    dtype : dtype, optional
        The kernel's compute dtype; defaults to ``out``'s dtype.
    lse : array ``[B, Hq, Nq]``, optional
        Also check the log-sum-exp (``-inf`` exactly on rows with no allowed key).
    diagnose : bool
        On failure, look for a common fault and name it in the message.
    lse_dtypes : sequence of dtype
        The dtypes ``lse`` may have. Default float32 only (what this package's backends
        return); the batteries (and so ``unisparse-ref verify``) accept float32 or float64
        (:data:`LSE_DTYPES`), and a float64 ``lse`` is checked after rounding to float32.

    Raises
    ------
    AssertionError
        With the worst element, its index, your error, the tolerance and the low-precision
        reference's error, plus a hint where a common fault matches.
    """
    config = UniSparseConfig() if config is None else config
    o = to_numpy(out)
    dt = check_dtype("dtype", o.dtype if dtype is None else dtype)
    ref64, ref_lse = ref.block_sparse_attention(q, k, v, block_mask, config)
    out_lp = lse_lp = None
    if _lowprec(dt):
        out_lp, lse_lp = ref.block_sparse_attention(q, k, v, block_mask, config, precision=dt)
    if o.shape != ref64.shape:
        raise AssertionError(f"out has shape {tuple(o.shape)}, expected {ref64.shape} ([B, Hq, Nq, D])")
    res = check_attention(o, ref64, out_lp, dt)
    if not res.ok:
        lines = [res.message()]
        if diagnose:
            lines += _diagnose_attention(o.astype(np.float64), q, k, v, block_mask, config, res.tolerance)
        raise AssertionError("\n".join(lines))
    if lse is not None:
        _assert_lse_close(lse, ref_lse, lse_lp, lse_dtypes)


def _assert_lse_close(lse: Any, ref_lse: np.ndarray, lse_lp: np.ndarray | None,
                      lse_dtypes: Sequence[Any] = (np.float32,)) -> None:
    """Raise ``AssertionError`` unless ``lse`` passes :func:`unisparse_ref.tolerance.check_lse`.

    ``check_lse`` wants float32 (this package's backends); a float64 ``lse``, where
    ``lse_dtypes`` allows it, is rounded to float32 first (``-inf`` and NaN survive the
    rounding, and the tolerance is far above float32's resolution).
    """
    allowed = [np.dtype(d) for d in lse_dtypes]
    arr = to_numpy(lse)
    if arr.dtype != np.float32 and arr.dtype in allowed:
        with np.errstate(over="ignore"):
            lse = arr.astype(np.float32)
    elif arr.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise AssertionError(f"FAIL: lse must be {names}, got {arr.dtype}")
    res = check_lse(lse, ref_lse, lse_lp)
    if not res.ok:
        raise AssertionError(res.message())


# ============================================================================ cases
@dataclass(frozen=True)
class AttentionCase:
    """One shape/config of the battery.

    ``mask`` is ``"random"`` (about half the visible blocks, forced blocks kept), ``"full"``,
    ``"empty_rows"`` (random with whole query blocks empty) or ``"unisparse"`` (the reference
    pipeline's own mask). ``value_scale`` multiplies q and k (large values: nearly one-hot
    softmax rows). ``structured`` adds a RoPE locality component shared by q and k, so
    that the UniSparse scores are far from uniform and the pipeline's masks are sparse.
    ``c_q``/``c_k`` default to ``min(4, block_size)``; ``softmax_scale``, ``n_sink`` and
    ``n_local`` go into the config (and the random masks keep the forced blocks).
    ``ties`` (with ``c_q = 2``, even ``Nq``, non-causal, ``Nk/c_k`` a power of two) makes
    every composite query exactly zero (queries come in pairs ``x, -x``): every composite
    row is then exactly uniform and the block scores are exact binary fractions with exact
    ties (``1/nKb`` per full block), whatever the order of the sums.
    """

    name: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    block_size: int = 16
    causal: bool = True
    c_h: int = 1
    mask: str = "random"
    value_scale: float = 1.0
    seed: int = 0
    threshold: float = 0.9
    structured: bool = False
    c_q: int | None = None
    c_k: int | None = None
    softmax_scale: float | None = None
    n_sink: int = 1
    n_local: int = 1
    ties: bool = False

    def config(self) -> UniSparseConfig:
        c = min(4, self.block_size)
        return UniSparseConfig(block_size=self.block_size, c_q=self.c_q or c, c_k=self.c_k or c, c_h=self.c_h,
                               causal=self.causal, threshold=self.threshold, softmax_scale=self.softmax_scale,
                               n_sink_blocks=self.n_sink, n_local_blocks=self.n_local)


def attention_cases(quick: bool = False) -> list[AttentionCase]:
    """The attention battery (tiny sizes: every case runs in milliseconds on the reference)."""
    cases = [
        AttentionCase("square_causal", 1, 2, 2, 64, 64, 32),
        AttentionCase("ragged_causal", 1, 2, 1, 77, 77, 32, seed=1),
        AttentionCase("nq_lt_nk_causal", 1, 2, 2, 37, 101, 32, seed=2),
        AttentionCase("gqa4_ch2_causal", 2, 8, 2, 50, 70, 32, c_h=2, seed=3),
        AttentionCase("noncausal_nq_gt_nk", 1, 2, 1, 70, 45, 32, causal=False, seed=4),
        AttentionCase("empty_mask_rows", 1, 4, 2, 64, 80, 32, mask="empty_rows", seed=5),
        AttentionCase("extreme_values", 1, 2, 2, 48, 48, 32, value_scale=12.0, seed=6),
        AttentionCase("head_dim_64", 1, 2, 1, 40, 64, 64, seed=7),
        AttentionCase("head_dim_128_block32", 1, 2, 2, 96, 96, 128, block_size=32, seed=8),
        AttentionCase("head_dim_40", 1, 2, 2, 33, 33, 40, seed=9),
        AttentionCase("full_mask_noncausal", 2, 2, 2, 40, 64, 32, causal=False, mask="full", seed=10),
        AttentionCase("unisparse_mask_gqa", 1, 4, 2, 120, 160, 32, mask="unisparse", seed=11),
        AttentionCase("single_token", 1, 1, 1, 1, 1, 32, seed=12),
        AttentionCase("softmax_scale_0.4", 1, 2, 1, 45, 64, 32, softmax_scale=0.4, seed=13),
        AttentionCase("sink2_local2_nq_lt_nk", 1, 2, 2, 40, 120, 32, n_sink=2, n_local=2, seed=14),
    ]
    if quick:
        keep = {"ragged_causal", "nq_lt_nk_causal", "gqa4_ch2_causal", "noncausal_nq_gt_nk",
                "empty_mask_rows", "extreme_values", "softmax_scale_0.4"}
        cases = [c for c in cases if c.name in keep]
    return cases


def make_attention_inputs(case: AttentionCase, dtype: Any = np.float32
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, BlockMask, UniSparseConfig]:
    """Deterministic ``q, k, v`` (in ``dtype``), block mask and config of ``case``."""
    rng = np.random.default_rng(1000 + case.seed)
    q = case.value_scale * rng.standard_normal((case.B, case.Hq, case.Nq, case.D))
    k = case.value_scale * rng.standard_normal((case.B, case.Hkv, case.Nk, case.D))
    v = rng.standard_normal((case.B, case.Hkv, case.Nk, case.D))
    if case.structured:
        from ..evaluation.workloads import rope

        u = 3.0 * rng.standard_normal((case.B, case.Hkv, 1, case.D))
        G = case.Hq // case.Hkv
        q = rope(q + np.repeat(u, G, axis=1), np.arange(case.Nq) + max(0, case.Nk - case.Nq))
        k = rope(k + u, np.arange(case.Nk))
    # Extreme but finite: a few very large logits (softmax rows close to one-hot).
    if case.value_scale > 1:
        q[..., 0, :] *= 2
    cfg = case.config()
    if case.ties:
        if cfg.c_q != 2 or case.Nq % 2:
            raise ValueError(f"case {case.name!r}: ties=True needs c_q = 2 and an even Nq")
        q[..., 1::2, :] = -q[..., 0::2, :]  # every pair (x, -x) pools to exactly 0
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    S = case.block_size
    nqb, nkb = geometry.num_blocks(case.Nq, S), geometry.num_blocks(case.Nk, S)
    Hm = case.Hq // case.c_h
    vis = geometry.visible_blocks(case.Nq, case.Nk, S, case.causal)
    forced = geometry.forced_blocks(case.Nq, case.Nk, S, case.n_sink, case.n_local, case.causal)
    if case.mask == "full":
        mask = np.broadcast_to(vis, (case.B, Hm, nqb, nkb)).copy()
    elif case.mask == "unisparse":
        q_c, k_c = ref.compress(q, k, cfg)
        mask = ref.select_blocks(ref.block_scores(q_c, k_c, cfg, case.Nq, case.Nk), cfg, case.Nq, case.Nk).mask
    else:
        mask = (rng.random((case.B, Hm, nqb, nkb)) < 0.5) | forced
        if case.mask == "empty_rows":
            mask[:, :, 0] = False  # the first query block of every head attends nothing
            mask[0, -1, nqb - 1] = False
    return q, k, v, BlockMask(mask, S, case.c_h, case.Nq, case.Nk, case.causal), cfg


def scores_cases(quick: bool = False) -> list[AttentionCase]:
    """The battery of the first two stages (:func:`check_compress`, :func:`check_scores`).

    Composite visibility depends on ``c_q``, ``c_k`` and the offset ``Nk - Nq`` together: with
    ``c_q = c_k`` and aligned lengths, judging a composite query at its first instead of its
    last token, or a strict ``<`` in the rule, changes nothing. These cases have ``c_q > c_k``
    and ``c_q < c_k`` (down to ``c_k = 1``), offsets ``Nk - Nq`` that put a composite query's
    last position exactly on a key group's first token, short last groups, GQA with head
    pooling, a non-default ``softmax_scale``, and non-causal ``Nq > Nk``.
    """
    cases = [
        AttentionCase("cq8_ck4_nq_lt_nk", 1, 2, 1, 70, 150, 16, c_q=8, c_k=4, seed=40, structured=True),
        AttentionCase("cq4_ck8_odd_offset", 1, 2, 2, 45, 78, 16, c_q=4, c_k=8, seed=41, structured=True),
        AttentionCase("cq4_ck1", 1, 2, 1, 40, 53, 16, c_q=4, c_k=1, seed=42, structured=True),
        AttentionCase("gqa4_ch2_cq2_ck8", 2, 8, 2, 50, 70, 16, c_h=2, c_q=2, c_k=8, seed=43, structured=True),
        AttentionCase("softmax_scale_0.6", 1, 2, 2, 64, 64, 16, softmax_scale=0.6, seed=44, structured=True),
        AttentionCase("noncausal_nq_gt_nk", 1, 2, 1, 70, 45, 16, causal=False, c_q=8, c_k=2, seed=45),
        AttentionCase("block32_cq16_ck4_ragged", 1, 2, 1, 77, 99, 16, block_size=32, c_q=16, c_k=4, seed=46,
                      structured=True),
        AttentionCase("single_token", 1, 1, 1, 1, 1, 16, seed=47),
    ]
    if quick:
        keep = {"cq8_ck4_nq_lt_nk", "cq4_ck8_odd_offset", "gqa4_ch2_cq2_ck8", "softmax_scale_0.6"}
        cases = [c for c in cases if c.name in keep]
    return cases


#: Scores and ``P`` that are multiples of ``2**-16`` add up exactly in float32 and float64,
#: in any order: no rounding can excuse a different decision.
_EXACT_UNIT = 2.0**16


def exact_rows(scores: Any, threshold: float) -> np.ndarray:
    """Rows whose selection involves no rounding, bool ``[B, Hm, nQb]``.

    True where ``P`` and every score of the row are non-negative multiples of ``2**-16``
    summing to at most 1: every partial sum is then exact in float32 and float64 whatever
    the order (17 significant bits at most), so the rule
    "while m < P" has one answer even when ``m`` reaches ``P`` exactly. The oracle does not
    excuse such rows as borderline (SPEC section 7 excuses borderline rows because sums
    round). Returns all False when ``P`` is not such a multiple.
    """
    s = np.asarray(to_numpy(scores), dtype=np.float64)
    p = float(threshold) * _EXACT_UNIT
    if p != math.floor(p):
        return np.zeros(s.shape[:-1], dtype=bool)
    u = s * _EXACT_UNIT
    return ((u == np.floor(u)) & (s >= 0)).all(axis=-1) & (s.sum(axis=-1) <= 1.0)


def selection_cases(quick: bool = False) -> list[tuple[str, np.ndarray, UniSparseConfig, int, int]]:
    """The selection battery: ``(name, scores, config, nq, nk)``.

    Reference-made scores with thresholds 0.1 to 1, zero and several sink/local blocks,
    ragged and ``Nq < Nk`` lengths and non-causal rows; made-up scores with exact ties
    (equal scores: lower ``j`` first), rows whose forced blocks alone reach ``P`` (nothing
    else is taken), and exact binary fractions where the kept mass reaches ``P`` exactly
    (the loop stops there: ``m < P`` is false), compared without a borderline excuse
    (:func:`exact_rows`).
    """
    out: list[tuple[str, np.ndarray, UniSparseConfig, int, int]] = []

    def from_data(name: str, B: int, Hq: int, Hkv: int, nq: int, nk: int, seed: int, **cfg: Any) -> None:
        rng = np.random.default_rng(2000 + seed)
        config = UniSparseConfig(**{"block_size": 16, "c_q": 4, "c_k": 4, **cfg})
        q = 2.0 * rng.standard_normal((B, Hq, nq, 16))
        k = 2.0 * rng.standard_normal((B, Hkv, nk, 16))
        q_c, k_c = ref.compress(q, k, config)
        out.append((name, ref.block_scores(q_c, k_c, config, nq, nk), config, nq, nk))

    from_data("p0.9_ragged", 1, 2, 2, 150, 150, 0)
    from_data("p0.5_nq_lt_nk", 1, 2, 1, 70, 230, 1, threshold=0.5)
    from_data("p0.99_gqa_ch2", 2, 4, 1, 128, 128, 2, threshold=0.99, c_h=2)
    from_data("p1.0_keep_all", 1, 2, 2, 90, 90, 3, threshold=1.0)
    from_data("no_forced_blocks", 1, 2, 2, 160, 160, 4, threshold=0.7, n_sink_blocks=0, n_local_blocks=0)
    from_data("sink2_local3", 1, 2, 2, 200, 200, 5, threshold=0.8, n_sink_blocks=2, n_local_blocks=3)
    from_data("noncausal_nq_gt_nk", 1, 2, 2, 120, 60, 6, threshold=0.9, causal=False)
    from_data("tiny_p0.1", 1, 1, 1, 40, 300, 7, threshold=0.1)
    # Exact ties: uniform scores over 8 blocks; 0.125 sums exactly in binary.
    cfg = UniSparseConfig(block_size=16, c_q=4, c_k=4, threshold=0.45, causal=False)
    out.append(("ties_lower_j_first", np.full((1, 2, 4, 8), 0.125), cfg, 64, 128))
    out.append(_forced_reach_case())
    out.append(_exact_hit_case())
    if quick:
        keep = {"p0.9_ragged", "p0.5_nq_lt_nk", "p0.99_gqa_ch2", "sink2_local3", "ties_lower_j_first",
                "noncausal_nq_gt_nk", "forced_mass_reaches_P", "exact_threshold_hit"}
        out = [c for c in out if c[0] in keep]
    return out


def _forced_reach_case() -> tuple[str, np.ndarray, UniSparseConfig, int, int]:
    """Rows whose forced blocks (two sink, two local) alone carry at least ``P``, mixed with
    rows where they do not; some candidate blocks score more than the forced ones."""
    nq, nk, S = 150, 200, 16
    cfg = UniSparseConfig(block_size=S, c_q=4, c_k=4, threshold=0.6, n_sink_blocks=2, n_local_blocks=2)
    rng = np.random.default_rng(2100)
    vis = geometry.visible_blocks(nq, nk, S, True)
    forced = geometry.forced_blocks(nq, nk, S, 2, 2, True)
    raw = rng.exponential(size=(1, 2, *vis.shape)) ** 2 * vis
    raw[:, 0] += 4.0 * forced * raw[:, 0].sum(-1, keepdims=True) / forced.sum(-1, keepdims=True)
    return "forced_mass_reaches_P", raw / raw.sum(-1, keepdims=True), cfg, nq, nk


def _exact_hit_case() -> tuple[str, np.ndarray, UniSparseConfig, int, int]:
    """Scores that are multiples of 1/64, with ties, and ``P = 0.75``: many rows reach
    ``P`` exactly, where the loop must stop."""
    nq, nk, S = 64, 160, 16
    cfg = UniSparseConfig(block_size=S, c_q=4, c_k=4, threshold=0.75, n_local_blocks=1)
    rng = np.random.default_rng(2101)
    vis = geometry.visible_blocks(nq, nk, S, True)
    scores = np.zeros((2, 2, *vis.shape))
    for idx in np.ndindex(scores.shape[:3]):
        j = np.flatnonzero(vis[idx[2]])
        scores[idx][j] = rng.multinomial(64, rng.dirichlet(np.full(j.size, 0.7))) / 64.0
    return "exact_threshold_hit", scores, cfg, nq, nk


# ============================================================================ helpers
def _identity(x: Any) -> Any:
    return x


def _run_case(name: str, body: Callable[[], CaseResult]) -> CaseResult:
    """Run one case; ``NotImplementedError`` skips, any other exception fails with its traceback."""
    try:
        return body()
    except NotImplementedError as e:
        return CaseResult(name, True, f"skipped: the function raised NotImplementedError: {e}", skipped=True)
    except AssertionError as e:
        return CaseResult(name, False, str(e))
    except Exception as e:  # noqa: BLE001 - a user's function may raise anything
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return CaseResult(name, False, f"raised {tb}")


def _as_mask_array(result: Any, expect_shape: tuple[int, ...]) -> np.ndarray:
    """A selector's result (BlockMask or bool array) as a NumPy bool array of ``expect_shape``."""
    m = to_numpy(result.mask) if isinstance(result, BlockMask) else to_numpy(result)
    if tuple(m.shape) != tuple(expect_shape):
        raise AssertionError(f"mask has shape {tuple(m.shape)}, expected {tuple(expect_shape)} ([B, Hm, nQb, nKb])")
    if m.dtype != np.bool_:
        raise AssertionError(f"mask must be bool, got {m.dtype}")
    return m


def explain_invalid_rows(mask: np.ndarray, scores: np.ndarray, config: UniSparseConfig, nq: int, nk: int,
                         eps: float, limit: int = 3) -> list[str]:
    """Why rows of ``mask`` are not eps-valid under ``scores``: one line per row (at most ``limit``)."""
    s = np.asarray(scores, dtype=np.float64)
    S, P = config.block_size, float(config.threshold)
    vis = geometry.visible_blocks(nq, nk, S, config.causal)
    forced = geometry.forced_blocks(nq, nk, S, config.n_sink_blocks, config.n_local_blocks, config.causal)
    ok = eps_valid_rows(mask, s, config, nq, nk, eps)
    lines = []
    for b, g, i in np.argwhere(~ok)[:limit]:
        row, sc = mask[b, g, i] & vis[i], s[b, g, i]
        why = []
        miss = np.nonzero(forced[i] & ~row)[0]
        if miss.size:
            kinds = ["sink" if j < config.n_sink_blocks else "local" for j in miss]
            why.append("missing forced block(s) " + ", ".join(f"j={j} ({t})" for j, t in zip(miss, kinds, strict=True)))
        mass = float(sc[row].sum())
        if mass < P - eps:
            why.append(f"kept mass {mass:.6g} < P - eps = {P - eps:.6g}")
        nf = row & ~forced[i]
        if nf.any():
            low = float(sc[nf].min())
            if P < 1 and mass - low >= P + eps:
                why.append(f"not minimal: dropping the lowest kept block (score {low:.3g}) leaves {mass - low:.6g} "
                           f">= P + eps")
            out_hi = sc[vis[i] & ~row].max(initial=-np.inf)
            if out_hi > low + eps:
                why.append(f"order: a block left out scores {out_hi:.3g} > lowest kept {low:.3g} + eps")
        if P >= 1 and (vis[i] & ~row).any():
            why.append("P = 1 must keep every visible block")
        lines.append(f"row (b={b}, g={g}, i={i}): " + ("; ".join(why) or "invalid"))
    return lines


def _describe_mask_diff(mask: np.ndarray, want: np.ndarray, config: UniSparseConfig, nq: int, nk: int,
                        rows: Sequence[tuple[int, int, int]], limit: int = 3) -> list[str]:
    forced = geometry.forced_blocks(nq, nk, config.block_size, config.n_sink_blocks, config.n_local_blocks,
                                    config.causal)
    lines = []
    for b, g, i in list(rows)[:limit]:
        missing = np.nonzero(want[b, g, i] & ~mask[b, g, i])[0]
        extra = np.nonzero(mask[b, g, i] & ~want[b, g, i])[0]
        tag = [f"j={j}" + (" (forced: sink)" if forced[i, j] and j < config.n_sink_blocks else
                           " (forced: local)" if forced[i, j] else "") for j in missing]
        lines.append(f"row (b={b}, g={g}, i={i}): missing blocks [{', '.join(tag)}], extra blocks {extra.tolist()}")
    return lines


# ============================================================================ batteries
#: Relative tolerance (to ``max|ref|``) of composite tokens, by the dtype they are returned in.
_POOL_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def _default_score_eps(dt: np.dtype) -> float:
    return 1e-2 if _lowprec(dt) else 1e-6


def _worst(diff: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in np.unravel_index(int(np.argmax(diff)), diff.shape))


def check_compress(
    fn: Callable[..., Any],
    *,
    dtype: Any = np.float32,
    quick: bool = False,
    to_device: Callable[[np.ndarray], Any] | None = None,
    cases: Sequence[AttentionCase] | None = None,
) -> OracleReport:
    """Run the composite-token battery (SPEC section 3) against ``fn(q, k, config) -> (q_c, k_c)``.

    ``q_c`` must be ``[B, Hq/c_h, ceil(Nq/c_q), D]`` and ``k_c`` ``[B, Hkv, ceil(Nk/c_k), D]``,
    within a relative tolerance (to ``max|ref|``) set by the dtype they come back in:
    ``1e-12`` float64, ``1e-5`` float32, ``2e-3`` float16, ``1.6e-2`` bfloat16. The reference
    pools the same ``dtype`` inputs in float64. ``cases`` replaces :func:`scores_cases`.
    """
    dt = check_dtype("dtype", dtype)
    dev = to_device or _identity
    report = OracleReport("compress", dtype_name(dt))
    for case in (scores_cases(quick) if cases is None else cases):
        def body(case: AttentionCase = case) -> CaseResult:
            q, k, _, _, cfg = make_attention_inputs(case, dt)
            want = ref.compress(q, k, cfg)
            res = fn(dev(q), dev(k), cfg)
            if not isinstance(res, tuple) or len(res) != 2:
                raise AssertionError(f"expected (q_c, k_c), got {type(res).__name__}")
            errs = []
            for name, got_any, w, n, c, other in (("q_c", res[0], want[0], case.Nq, cfg.c_q, cfg.c_k),
                                                  ("k_c", res[1], want[1], case.Nk, cfg.c_k, cfg.c_q)):
                got = to_numpy(got_any)
                if tuple(got.shape) != w.shape:
                    hint = ""
                    if got.ndim == 4 and got.shape[2] == geometry.cdiv(n, other) != w.shape[2]:
                        hint = f"; {got.shape[2]} groups = ceil({n}/{other}): pooled with the other factor?"
                    raise AssertionError(f"{name} has shape {tuple(got.shape)}, expected {w.shape} "
                                         f"(c_q={cfg.c_q}, c_k={cfg.c_k}, c_h={cfg.c_h}){hint}")
                g = got.astype(np.float64)
                if not np.isfinite(g).all():
                    raise AssertionError(f"{name} holds non-finite values at {_worst(~np.isfinite(g))}")
                rtol = _POOL_RTOL.get(dtype_name(got.dtype), _POOL_RTOL["bfloat16"])
                tol = rtol * max(float(np.abs(w).max(initial=0.0)), 1e-30)
                diff = np.abs(g - w)
                err = float(diff.max(initial=0.0))
                if err > tol:
                    idx = _worst(diff)
                    lines = [f"{name}: max|{name} - ref| = {err:.3e} > tolerance {tol:.3e} ({got.dtype}); worst at "
                             f"{idx}: {g[idx]:.6g}, reference {w[idx]:.6g}"]
                    bad_groups = sorted({int(x) for x in np.argwhere(diff > tol)[:, 2]})
                    last = w.shape[2] - 1
                    if bad_groups == [last] and n % c:
                        lines.append(f"only the last group (r={last}, {n - last * c} of {c} tokens) is off: it "
                                     "averages only the tokens that exist (SPEC 3)")
                    elif name == "q_c" and cfg.c_h > 1:
                        lines.append(f"note: c_h={cfg.c_h} averages consecutive query heads "
                                     f"[g*c_h, (g+1)*c_h) (SPEC 3)")
                    raise AssertionError("\n".join(lines))
                errs.append(err)
            return CaseResult(case.name, True, f"max error q_c {errs[0]:.2e}, k_c {errs[1]:.2e} (c_q={cfg.c_q}, "
                                               f"c_k={cfg.c_k}, c_h={cfg.c_h}, Nq={case.Nq}, Nk={case.Nk})")
        report.cases.append(_run_case(case.name, body))
    return report


def check_scores(
    fn: Callable[..., Any],
    *,
    dtype: Any = np.float32,
    quick: bool = False,
    score_eps: float | None = None,
    to_device: Callable[[np.ndarray], Any] | None = None,
    cases: Sequence[AttentionCase] | None = None,
) -> OracleReport:
    """Run the block-score battery (SPEC section 4) against ``fn(q_c, k_c, config, nq, nk) -> scores``.

    ``fn`` gets the reference's composite tokens rounded to ``dtype`` and must return
    ``[B, Hq/c_h, nQb, nKb]`` scores within ``score_eps`` (absolute; default ``1e-6``, or
    ``1e-2`` for float16/bfloat16) of the reference's float64 scores of those same
    composite tokens. ``cases`` replaces :func:`scores_cases`.
    """
    dt = check_dtype("dtype", dtype)
    eps = score_eps if score_eps is not None else _default_score_eps(dt)
    dev = to_device or _identity
    report = OracleReport("scores", dtype_name(dt))
    for case in (scores_cases(quick) if cases is None else cases):
        def body(case: AttentionCase = case) -> CaseResult:
            q, k, _, _, cfg = make_attention_inputs(case, dt)
            q_c, k_c = (x.astype(dt) for x in ref.compress(q, k, cfg))
            nq, nk = case.Nq, case.Nk
            want = ref.block_scores(q_c, k_c, cfg, nq, nk)
            got = to_numpy(fn(dev(q_c), dev(k_c), cfg, nq, nk))
            if tuple(got.shape) != want.shape:
                raise AssertionError(f"scores have shape {tuple(got.shape)}, expected {want.shape} "
                                     "([B, Hq/c_h, nQb, nKb])")
            g = got.astype(np.float64)
            if not np.isfinite(g).all():
                raise AssertionError(f"scores hold non-finite values at {_worst(~np.isfinite(g))}")
            diff = np.abs(g - want)
            err = float(diff.max(initial=0.0))
            if err > eps:
                b, h, i, j = _worst(diff)
                S = cfg.block_size
                r0, r1 = geometry.cdiv(i * S, cfg.c_q), geometry.cdiv(min((i + 1) * S, nq), cfg.c_q)
                lines = [f"max|scores - ref| = {err:.3e} > eps {eps:g}; worst at (b={b}, g={h}, i={i}, j={j}): "
                         f"{g[b, h, i, j]:.6g}, reference {want[b, h, i, j]:.6g}",
                         f"{int((diff > eps).any(-1).sum())} of {diff[..., 0].size} rows off; row sums "
                         f"{g.sum(-1).min():.6g} .. {g.sum(-1).max():.6g} (must be 1); query block {i} holds "
                         f"composite queries {r0}..{r1 - 1} (c_q={cfg.c_q}), c_k={cfg.c_k}, Nk - Nq = {nk - nq}"]
                vis = geometry.visible_blocks(nq, nk, S, cfg.causal)
                if (g[..., ~vis] != 0).any():
                    lines.append("mass on key blocks no query of the block can see (must be 0)")
                if cfg.softmax_scale is not None:
                    alt = ref.block_scores(q_c, k_c, dataclasses.replace(cfg, softmax_scale=None), nq, nk)
                    if np.abs(g - alt).max() <= eps:
                        lines.append(f"likely fault: config.softmax_scale = {cfg.softmax_scale} ignored "
                                     "(1/sqrt(D) used)")
                if cfg.causal and (cfg.c_q != cfg.c_k or nk != nq):
                    lines.append("note: composite key c is visible to composite query r iff "
                                 "c*c_k <= p(last(r)), last(r) = min((r+1)*c_q, Nq) - 1 (SPEC 4)")
                raise AssertionError("\n".join(lines))
            return CaseResult(case.name, True, f"max|scores - ref| = {err:.2e} <= eps {eps:g} (c_q={cfg.c_q}, "
                                               f"c_k={cfg.c_k}, Nq={nq}, Nk={nk}, scale={cfg.softmax_scale})")
        report.cases.append(_run_case(case.name, body))
    return report


def check_block_sparse_attention(
    fn: Callable[..., Any],
    *,
    dtype: Any = np.float32,
    quick: bool = False,
    to_device: Callable[[np.ndarray], Any] | None = None,
    cases: Sequence[AttentionCase] | None = None,
) -> OracleReport:
    """Run the attention battery against ``fn(q, k, v, block_mask, config) -> (out, lse)``.

    Parameters
    ----------
    fn : callable
        Receives ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]`` of ``dtype`` (passed through
        ``to_device``), a :class:`~unisparse_ref.BlockMask` (NumPy mask) and the config.
        Returns ``(out, lse)``, or ``out`` alone (then ``lse`` is not checked); ``lse``
        may be float32 or float64.
    dtype : dtype
        Input dtype; the tolerance follows SPEC section 7 for the dtype of ``out``.
    quick : bool
        Fewer cases.
    to_device : callable, optional
        Applied to ``q``, ``k``, ``v`` before the call (e.g. ``cupy.asarray``).
    cases : sequence of AttentionCase, optional
        Replace the battery.

    Returns
    -------
    OracleReport
    """
    dt = check_dtype("dtype", dtype)
    dev = to_device or _identity
    report = OracleReport("attention", dtype_name(dt))
    for case in (attention_cases(quick) if cases is None else cases):
        def body(case: AttentionCase = case) -> CaseResult:
            q, k, v, bm, cfg = make_attention_inputs(case, dt)
            res = fn(dev(q), dev(k), dev(v), bm, cfg)
            out, lse = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
            o = to_numpy(out)
            assert_attention_close(o, q, k, v, bm, cfg, dtype=_kernel_dtype(dt, o.dtype), lse=lse,
                                   lse_dtypes=LSE_DTYPES)
            ref64, _ = ref.block_sparse_attention(q, k, v, bm, cfg)
            err = float(np.abs(o.astype(np.float64) - ref64).max())
            return CaseResult(case.name, True, f"max|out - ref64| = {err:.2e} ({o.dtype}; B={case.B} Hq={case.Hq} "
                                               f"Hkv={case.Hkv} Nq={case.Nq} Nk={case.Nk} D={case.D} "
                                               f"S={case.block_size} causal={case.causal} density={bm.density:.2f})")
        report.cases.append(_run_case(case.name, body))
    return report


def check_selection(
    fn: Callable[..., Any],
    *,
    quick: bool = False,
    to_device: Callable[[np.ndarray], Any] | None = None,
    score_dtype: Any = np.float64,
    cases: Sequence[tuple[str, np.ndarray, UniSparseConfig, int, int]] | None = None,
) -> OracleReport:
    """Run the selection battery against ``fn(scores, config, nq, nk) -> BlockMask | bool array``.

    The function gets the reference's scores (as ``score_dtype``, through ``to_device``) and
    must return the reference's mask exactly, except in borderline rows (decision within
    ``1e-6`` of ``P``), which are listed in the report. With ``score_dtype`` other than
    float64 the scores are rounded first and the mask must instead be eps-valid under the
    float64 scores with ``eps`` = 1e-6 (float32) or 1e-2 (float16/bfloat16). Rows whose
    sums cannot round (:func:`exact_rows`: scores and ``P`` multiples of ``2**-16``) are never
    borderline: there the mask must equal the reference's, for float64 and float32 scores.
    ``cases`` replaces the battery (tuples as returned by :func:`selection_cases`).

    Returns
    -------
    OracleReport
    """
    dev = to_device or _identity
    sdt = np.dtype(score_dtype)
    report = OracleReport("selection", dtype_name(sdt))
    for name, scores, cfg, nq, nk in (selection_cases(quick) if cases is None else cases):
        def body(name: str = name, scores: np.ndarray = scores, cfg: UniSparseConfig = cfg,
                 nq: int = nq, nk: int = nk) -> CaseResult:
            want = ref.select_blocks(scores, cfg, nq, nk).mask
            exact = exact_rows(scores, cfg.threshold) if sdt in (np.float64, np.float32) else None
            margin = ref.selection_margin(scores, cfg, nq, nk)
            if exact is not None:
                margin = np.where(exact, np.inf, margin)  # exact sums: nothing to excuse
            got = _as_mask_array(fn(dev(scores.astype(sdt)), cfg, nq, nk), want.shape)
            border = [tuple(int(x) for x in r) for r in np.argwhere(margin <= BORDERLINE)]
            n_exact = 0 if exact is None else int(exact.sum())
            if sdt != np.float64:
                eps = 1e-6 if sdt == np.float32 else 1e-2
                valid = eps_valid_rows(got, scores, cfg, nq, nk, eps)
                if not valid.all():
                    lines = [f"{int((~valid).sum())} row(s) not eps-valid (eps={eps}) under the float64 scores"]
                    lines += explain_invalid_rows(got, scores, cfg, nq, nk, eps)
                    return CaseResult(name, False, "\n".join(lines), borderline_rows=border)
                if n_exact:
                    differ = [tuple(int(x) for x in r) for r in np.argwhere((got != want).any(-1) & exact)]
                    if differ:
                        lines = [f"{len(differ)} row(s) with exact sums (multiples of 2**-16) differ from the "
                                 f"reference (P={cfg.threshold})"]
                        lines += _describe_mask_diff(got, want, cfg, nq, nk, differ)
                        return CaseResult(name, False, "\n".join(lines), borderline_rows=border)
                return CaseResult(name, True, f"all rows eps-valid (eps={eps}); P={cfg.threshold}"
                                  + (f"; {n_exact} exact row(s) identical" if n_exact else ""),
                                  borderline_rows=border)
            chk = compare_selection(got, want, margin)
            if not chk.ok:
                lines = [f"{len(chk.differing_rows)} row(s) differ from the reference outside the borderline "
                         f"(P={cfg.threshold}, sink={cfg.n_sink_blocks}, local={cfg.n_local_blocks}, "
                         f"causal={cfg.causal}"
                         + (f"; {n_exact} row(s) have exact sums, never borderline" if n_exact else "") + ")"]
                lines += _describe_mask_diff(got, want, cfg, nq, nk, chk.differing_rows)
                bad = eps_valid_rows(got, scores, cfg, nq, nk, 0.0)
                lines += explain_invalid_rows(got, scores, cfg, nq, nk, 0.0, limit=2) if not bad.all() else []
                return CaseResult(name, False, "\n".join(lines), borderline_rows=border)
            n_diff_border = int(((got != want).any(-1) & (margin <= BORDERLINE)).sum())
            return CaseResult(name, True, f"identical to the reference on {want.shape[0] * want.shape[1] * want.shape[2]}"
                              f" rows (P={cfg.threshold}); {n_diff_border} borderline row(s) differ",
                              borderline_rows=border)
        report.cases.append(_run_case(name, body))
    return report


def pipeline_cases(quick: bool = False) -> list[AttentionCase]:
    """Pipeline cases: ``AttentionCase`` shapes run end to end with their config.

    Besides the plain shapes: ``c_q != c_k`` and offsets ``Nk - Nq`` where composite
    visibility matters (with ``Nk - Nq = S + 1``, the first key group of a query block's
    diagonal block is visible to the block's last composite query only, and decides whether
    that block scores anything), a non-default ``softmax_scale``, several and zero sink and local
    blocks, rows whose forced block alone reaches ``P`` so that early query rows of a block
    have no allowed key (``out = 0``, ``lse = -inf``), and exact ties (see
    :class:`AttentionCase`'s ``ties``) where ``P`` is reached exactly.
    """
    cases = [
        AttentionCase("pipe_square_causal", 1, 2, 2, 128, 128, 32, seed=20, structured=True),
        AttentionCase("pipe_ragged_gqa", 1, 4, 2, 150, 150, 32, c_h=2, seed=21, threshold=0.8, structured=True),
        AttentionCase("pipe_nq_lt_nk", 2, 2, 1, 70, 190, 32, seed=22, threshold=0.95, structured=True),
        AttentionCase("pipe_noncausal", 1, 2, 2, 100, 80, 32, causal=False, seed=23, threshold=0.7, structured=True),
        AttentionCase("pipe_cq8_ck4_local0", 1, 2, 1, 90, 150, 32, c_q=8, c_k=4, n_local=0, seed=27,
                      threshold=0.8, structured=True),
        AttentionCase("pipe_cq4_ck8_gqa_ch2", 1, 4, 2, 77, 110, 32, c_h=2, c_q=4, c_k=8, n_local=0, seed=28,
                      threshold=0.8, structured=True),
        AttentionCase("pipe_offset17_local0", 1, 2, 1, 64, 81, 32, n_local=0, seed=35, threshold=0.7),
        AttentionCase("pipe_offset17_cq8_ck4_gqa", 1, 4, 2, 100, 117, 32, c_h=2, c_q=8, c_k=4, n_local=0, seed=36,
                      threshold=0.8),
        AttentionCase("pipe_softmax_scale", 1, 2, 2, 96, 120, 32, softmax_scale=0.6, seed=29, threshold=0.8),
        AttentionCase("pipe_sink0_local1_empty_rows", 1, 2, 1, 60, 100, 32, n_sink=0, n_local=1, seed=30,
                      threshold=0.3, structured=True),
        AttentionCase("pipe_sink2_local2", 1, 2, 2, 130, 160, 32, n_sink=2, n_local=2, seed=31, threshold=0.7,
                      structured=True),
        AttentionCase("pipe_exact_ties", 1, 2, 2, 64, 128, 32, causal=False, c_q=2, c_k=4, ties=True, seed=32,
                      threshold=0.75),
        AttentionCase("pipe_head_dim_64", 1, 2, 2, 96, 96, 64, seed=24, threshold=0.5, structured=True),
        AttentionCase("pipe_extreme_values", 1, 2, 2, 64, 64, 32, value_scale=6.0, seed=25),
        AttentionCase("pipe_keep_all", 1, 2, 2, 80, 80, 32, seed=26, threshold=1.0),
    ]
    if quick:
        cases = [c for c in cases if c.name not in ("pipe_square_causal", "pipe_head_dim_64", "pipe_extreme_values",
                                                    "pipe_keep_all")]
    return cases


def check_pipeline(
    fn: Callable[..., Any],
    *,
    dtype: Any = np.float32,
    quick: bool = False,
    score_eps: float | None = None,
    to_device: Callable[[np.ndarray], Any] | None = None,
    cases: Sequence[AttentionCase] | None = None,
) -> OracleReport:
    """Run the end-to-end battery against ``fn(q, k, v, config)``.

    ``fn`` returns ``out``, ``(out, lse)``, ``(out, lse, block_mask)`` or an object with
    ``out``, ``lse`` and ``block_mask`` attributes (:class:`unisparse_ref.UniSparseResult`).
    When the mask is returned, every row must be *eps-valid* under the reference scores
    (SPEC section 7) and the output is checked against the reference run with that same mask.
    Without a mask, the output is checked against the reference pipeline's output; rows whose
    selection is within ``score_eps`` of flipping are reported as borderline.

    Parameters
    ----------
    score_eps : float, optional
        The implementation's score tolerance; default ``1e-6`` for float32 / float64 inputs and
        ``1e-2`` for float16 / bfloat16.
    cases : sequence of AttentionCase, optional
        Replace the battery (:func:`pipeline_cases`).
    """
    dt = check_dtype("dtype", dtype)
    eps = score_eps if score_eps is not None else _default_score_eps(dt)
    dev = to_device or _identity
    report = OracleReport("pipeline", dtype_name(dt))
    for case in (pipeline_cases(quick) if cases is None else cases):
        def body(case: AttentionCase = case) -> CaseResult:
            q, k, v, _, cfg = make_attention_inputs(case, dt)
            q_c, k_c = ref.compress(q, k, cfg)
            scores = ref.block_scores(q_c, k_c, cfg, case.Nq, case.Nk)
            ref_mask = ref.select_blocks(scores, cfg, case.Nq, case.Nk)
            margin = ref.selection_margin(scores, cfg, case.Nq, case.Nk)
            border = [tuple(int(x) for x in r) for r in np.argwhere(margin <= max(eps, BORDERLINE))]
            res = fn(dev(q), dev(k), dev(v), cfg)
            bm = None
            if hasattr(res, "out") and hasattr(res, "block_mask"):
                out, lse, bm = res.out, getattr(res, "lse", None), res.block_mask
            elif isinstance(res, tuple):
                out, lse, bm = (tuple(res) + (None, None))[:3]
            else:
                out, lse = res, None
            if bm is not None:
                if not isinstance(bm, BlockMask):
                    bm = BlockMask(to_numpy(bm).astype(bool), cfg.block_size, cfg.c_h, case.Nq, case.Nk, cfg.causal)
                got = _as_mask_array(bm, ref_mask.shape)
                valid = eps_valid_rows(got, scores, cfg, case.Nq, case.Nk, eps)
                if not valid.all():
                    lines = [f"{int((~valid).sum())} mask row(s) are not eps-valid (eps={eps:g}) under the "
                             "reference scores"]
                    lines += explain_invalid_rows(got, scores, cfg, case.Nq, case.Nk, eps)
                    return CaseResult(case.name, False, "\n".join(lines), borderline_rows=border)
                bm = BlockMask(got, cfg.block_size, cfg.c_h, case.Nq, case.Nk, cfg.causal)
                how = "its own (eps-valid) mask"
            else:
                bm = ref_mask
                how = "the reference mask (no mask returned)"
            o = to_numpy(out)
            assert_attention_close(o, q, k, v, bm, cfg, dtype=_kernel_dtype(dt, o.dtype), lse=lse,
                                   lse_dtypes=LSE_DTYPES)
            ref64, _ = ref.block_sparse_attention(q, k, v, bm, cfg)
            err = float(np.abs(o.astype(np.float64) - ref64).max())
            return CaseResult(case.name, True, f"max|out - ref64| = {err:.2e} against {how}; density "
                                               f"{bm.density:.2f}, P={cfg.threshold}", borderline_rows=border)
        report.cases.append(_run_case(case.name, body))
    return report
