"""Checking a context-parallel run of the stage path against the one-device run (SPEC 7).

:func:`compare_stage_run` is what the GPU tests (``tests/test_distributed_gpu.py``) and the
launcher's ``--backend cupy`` checks call: one body for every backend. It compares a
:class:`~unisparse_ref.distributed.DistributedResult` of ``backend="cupy"`` (or any backend)
with the one-device run of the same backend, and both with the float64 reference:

* **masks**: equal to the one-device masks, or, in the rows where the scores of the two runs
  differ enough to flip a decision, *eps-valid* under the reference scores with the
  backend's ``score_eps`` (:func:`unisparse_ref.tolerance.eps_valid_rows`); the report says
  which rows and whether they were;
* **out, lse**: within SPEC 7 of the float64 reference computed with the distributed masks
  (:func:`unisparse_ref.tolerance.check_attention`, :func:`~unisparse_ref.tolerance.check_lse`),
  and, on the rows whose masks agree, within twice that tolerance of the one-device output
  (both runs are within it of the reference; the report also says whether they are equal
  bit for bit);
* **bytes**: every rank's counted bytes equal :func:`~unisparse_ref.distributed.expected_bytes`
  with the element sizes of the backend's arrays (composite keys of ``q_c``'s dtype, K/V of
  the input dtype).

The float64 reference runs over the whole problem on the host: for test sizes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._convert import to_numpy
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from ..tolerance import check_attention, check_lse, eps_valid_rows
from .context_parallel import TAGS, DistributedResult, expected_bytes

__all__ = ["StageReport", "compare_stage_run"]


@dataclass
class StageReport:
    """What :func:`compare_stage_run` found; ``failures`` empty means PASS.

    Attributes
    ----------
    failures : list of str
    rows_differ : int
        Mask rows ``(b, mask head, query block)`` that differ from the one-device run.
    rows_eps_valid : bool
        Whether every differing row is eps-valid under the reference scores.
    out_error, out_tolerance : float
        SPEC 7 against the float64 reference (with the distributed masks).
    lse_error, lse_tolerance : float
    vs_one_device : float
        ``max |out - out_one_device|`` over the rows whose masks agree (bound: twice the
        SPEC 7 tolerance).
    out_bitwise_equal, lse_bitwise_equal : bool
        Whether those rows are bit for bit the one-device ones.
    bytes_ok : bool
    expected : list of dict
        The formula's bytes per rank.
    """

    failures: list[str] = field(default_factory=list)
    rows_differ: int = 0
    rows_eps_valid: bool = True
    out_error: float = 0.0
    out_tolerance: float = 0.0
    lse_error: float = 0.0
    lse_tolerance: float = 0.0
    vs_one_device: float = 0.0
    out_bitwise_equal: bool = False
    lse_bitwise_equal: bool = False
    bytes_ok: bool = False
    expected: list[dict[str, dict[str, int]]] = field(default_factory=list)

    def summary(self) -> str:
        """One line."""
        masks = ("masks equal" if not self.rows_differ else
                 f"{self.rows_differ} mask rows differ ({'all' if self.rows_eps_valid else 'NOT all'} eps-valid)")
        return (f"{'PASS' if not self.failures else 'FAIL'}: {masks}; out err {self.out_error:.3g} <= "
                f"{self.out_tolerance:.3g} (SPEC 7); lse err {self.lse_error:.3g} <= {self.lse_tolerance:.3g}; "
                f"vs one device {self.vs_one_device:.3g} (bitwise: out {self.out_bitwise_equal}, lse "
                f"{self.lse_bitwise_equal}); bytes {'= formula' if self.bytes_ok else '!= formula'}"
                + ("" if not self.failures else " -- " + "; ".join(self.failures)))


def compare_stage_run(res: DistributedResult, one: Any, q: Any, k: Any, v: Any, config: UniSparseConfig,
                      score_eps: float, cache: dict[Any, Any] | None = None) -> StageReport:
    """Compare a distributed run with the one-device run ``one`` and the float64 reference.

    Parameters
    ----------
    res : DistributedResult
        From :func:`~unisparse_ref.distributed.simulate_context_parallel` (or assembled NCCL ranks).
    one : UniSparseResult
        ``unisparse_attention(q, k, v, config, backend=..., return_details=True)`` of the same
        backend on one device.
    q, k, v : array
        The global inputs, on the host (any dtype of the backend).
    config : UniSparseConfig
    score_eps : float
        The backend's ``score_eps`` (SPEC 7).
    cache : dict, optional
        Keeps the float64 and low-precision reference runs per mask (and the reference
        scores) between calls on the same ``q``, ``k``, ``v`` and ``config``: the reference is
        the slow part of a comparison.

    Returns
    -------
    StageReport
    """
    from ..reference import block_scores, block_sparse_attention, compress

    rep = StageReport()
    qh, kh, vh = (to_numpy(x) for x in (q, k, v))
    dt = np.dtype(qh.dtype)
    B, Hq, nq, D = qh.shape
    Hkv, nk = kh.shape[1], kh.shape[2]
    S, ch = config.block_size, config.c_h
    m, m1 = to_numpy(res.block_mask.mask).astype(bool), to_numpy(one.block_mask.mask).astype(bool)
    differ = (m != m1).any(axis=-1)  # [B, Hm, nQb]
    rep.rows_differ = int(differ.sum())
    cache = {} if cache is None else cache
    if rep.rows_differ:
        if "scores" not in cache:
            q_c, k_c = compress(qh, kh, config)
            cache["scores"] = block_scores(q_c, k_c, config, nq, nk)
        ref_scores = cache["scores"]
        valid = eps_valid_rows(m, ref_scores, config, nq, nk, score_eps)
        rep.rows_eps_valid = bool(valid[differ].all())
        if not rep.rows_eps_valid:
            rep.failures.append(f"{int((differ & ~valid).sum())} differing mask rows are not eps-valid")
    key = hashlib.sha1(np.packbits(m).tobytes()).hexdigest()
    if key not in cache:
        bm = BlockMask(m, S, ch, nq, nk, config.causal)
        cache[key] = (*block_sparse_attention(qh, kh, vh, bm, config),
                      *((None, None) if dt in (np.float32, np.float64) else
                        block_sparse_attention(qh, kh, vh, bm, config, precision=dt)))
    ref64, lse64, lp, lse_lp = cache[key]
    out, lse = to_numpy(res.out), to_numpy(res.lse)
    chk = check_attention(out, ref64, lp, dt)
    rep.out_error, rep.out_tolerance = chk.max_error, chk.tolerance
    if not chk.ok:
        rep.failures.append("out: " + chk.message())
    lchk = check_lse(lse, lse64, lse_lp)
    rep.lse_error, rep.lse_tolerance = lchk.max_error, lchk.tolerance
    if not lchk.ok:
        rep.failures.append("lse: " + lchk.message())
    # the rows whose masks agree, against the one-device run
    same = ~np.repeat(np.repeat(differ, ch, axis=1), S, axis=2)[:, :, :nq]  # [B, Hq, nq]
    o, o1 = out.astype(np.float64), to_numpy(one.out).astype(np.float64)
    l_, l1 = lse.astype(np.float64), to_numpy(one.lse).astype(np.float64)
    d = np.abs(o - o1)[same]
    rep.vs_one_device = float(d.max()) if d.size else 0.0
    rep.out_bitwise_equal = bool(np.array_equal(out[same], to_numpy(one.out)[same]))
    rep.lse_bitwise_equal = bool(np.array_equal(lse[same], to_numpy(one.lse)[same]))
    if rep.vs_one_device > 2 * chk.tolerance:
        rep.failures.append(f"max |out - one device| = {rep.vs_one_device:.3g} > 2 x {chk.tolerance:.3g}")
    fin = np.isfinite(l1) & same
    if not np.array_equal(np.isfinite(l_)[same], np.isfinite(l1)[same]):
        rep.failures.append("lse is -inf on other rows than the one-device run's")
    elif fin.any() and float(np.abs(l_ - l1)[fin].max()) > 2 * lchk.tolerance:
        rep.failures.append(f"max |lse - one device| = {float(np.abs(l_ - l1)[fin].max()):.3g} > 2 x {lchk.tolerance:.3g}")
    # bytes
    rep.expected = expected_bytes(res.plan, m, kv_heads=Hkv, head_dim=D, kv_itemsize=dt.itemsize, c_k=config.c_k,
                                  heads_per_mask=ch, composite_itemsize=np.dtype(res.k_c.dtype).itemsize)
    rep.bytes_ok = True
    for r, (got, want) in enumerate(zip(res.stats, rep.expected, strict=True)):
        for way in ("sent", "recv"):
            g = {t: got[way].get(t, 0) for t in TAGS}
            if g != want[way]:
                rep.bytes_ok = False
                rep.failures.append(f"rank {r} {way} bytes {g} != formula {want[way]}")
    return rep
