"""Merging partial attention states (SPEC section 6 over a split key set), in the reference.

Attention of one query row over a key set ``K`` is the pair ``(out, lse)`` with
``lse = log(sum_{s in K} exp(x_s))`` and ``out = sum_{s in K} exp(x_s - lse) v_s``
(``x_s = scale * q . k_s``). For two *disjoint* key sets ``A`` and ``B`` the attention over
``A ∪ B`` follows from the two partial states alone:

.. code-block:: text

    lse   = log(exp(lse_a) + exp(lse_b))
    out   = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

This is how cascade attention (a shared prefix attended once for many requests, then each
request's own suffix) and split-KV decoding combine their pieces, and how chunked prefill
could combine a cached prefix with a new chunk. Written with ``hi = max(lse_a, lse_b)``,
``lo = min(...)`` and ``w = exp(lo - hi)`` in ``[0, 1]`` it never overflows:

.. code-block:: text

    out = (out_hi + w out_lo) / (1 + w),   lse = hi + log1p(w)

Empty rows (SPEC section 6: no allowed key, ``out = 0``, ``lse = -inf``) merge exactly:
one side empty gives the other side's ``out`` and ``lse`` bit for bit (``w = 0``); both
empty give ``out = 0``, ``lse = -inf``; never NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import check_finite, check_merge_states, to_numpy

__all__ = ["merge_attention_states"]


def _lse(name: str, x: Any) -> np.ndarray:
    """``x`` as float64, refused when it holds NaN or ``+inf`` (``-inf`` marks an empty row)."""
    a = np.asarray(to_numpy(x), dtype=np.float64)
    if np.isnan(a).any() or np.isposinf(a).any():
        raise ValueError(f"{name} must be finite or -inf (an empty row), it holds NaN or +inf")
    return a


def merge_attention_states(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Attention over the union of two disjoint key sets, from the two partial results.

    Parameters
    ----------
    out_a, out_b : array, shape ``[..., D]``
        Partial outputs (``[B, Hq, Nq, D]``, or the packed ``[total_q, Hq, D]``); finite.
    lse_a, lse_b : array, shape ``[...]`` (``out``'s shape without ``D``)
        Their log-sum-exps; ``-inf`` on empty rows, never NaN or ``+inf``. For the packed
        layout, whose ``lse`` is ``[Hq, total_q]``, pass ``lse.T`` (a view).

    Returns
    -------
    out : float64, shape ``[..., D]``
        ``(out_hi + w out_lo) / (1 + w)`` with ``w = exp(lo - hi)``; 0 where both are empty.
    lse : float32, shape ``[...]``
        ``hi + log1p(w)``; ``-inf`` where both are empty.

    Exact in exact arithmetic; computed in float64. The float32 ``lse`` of the inputs (SPEC
    section 6) bounds what a merge can reproduce: the weights carry its rounding, about
    ``6e-8 * |lse|`` relative.

    Raises
    ------
    ValueError
        Shapes that disagree (:func:`unisparse_ref._arrays.check_merge_states`), non-finite
        outputs, NaN or ``+inf`` in an ``lse``.
    """
    check_merge_states(out_a, lse_a, out_b, lse_b)
    oa = np.asarray(to_numpy(out_a), dtype=np.float64)
    ob = np.asarray(to_numpy(out_b), dtype=np.float64)
    check_finite("out_a", oa)
    check_finite("out_b", ob)
    la, lb = _lse("lse_a", lse_a), _lse("lse_b", lse_b)
    hi, lo = np.maximum(la, lb), np.minimum(la, lb)
    empty = np.isneginf(hi)  # both sides empty
    w = np.exp(lo - np.where(empty, 0.0, hi))  # in [0, 1]; exactly 0 when one side is empty
    a_hi = (la >= lb)[..., None]
    out_hi, out_lo = np.where(a_hi, oa, ob), np.where(a_hi, ob, oa)
    out = np.where(empty[..., None], 0.0, (out_hi + w[..., None] * out_lo) / (1.0 + w[..., None]))
    lse = np.where(empty, -np.inf, hi + np.log1p(w))
    return out, lse.astype(np.float32)
