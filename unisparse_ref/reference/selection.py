"""Stage 3 of the reference: top-P block selection with forced blocks (SPEC section 5)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from .._arrays import check_config, check_scores
from ..blockmask import BlockMask
from ..config import UniSparseConfig

__all__ = ["select_blocks", "selection_margin"]


def _selection(
    scores: np.ndarray, config: UniSparseConfig, nq: int, nk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run SPEC section 5 on every row; return (mask, margin)."""
    S = config.block_size
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    if scores.ndim != 4 or scores.shape[2:] != (nqb, nkb):
        raise ValueError(
            f"scores must have shape [B, Hm, nQb={nqb}, nKb={nkb}] for nq={nq}, nk={nk}, "
            f"block_size={S}; got {scores.shape}"
        )
    visible = geometry.visible_blocks(nq, nk, S, config.causal)
    forced = geometry.forced_blocks(nq, nk, S, config.n_sink_blocks, config.n_local_blocks, config.causal)
    shape = scores.shape
    P = float(config.threshold)
    if P >= 1.0:  # P = 1 keeps every visible block, whatever the rounding of the sums.
        mask = np.broadcast_to(visible, shape).copy()
        return mask, np.full(shape[:3], np.inf)

    # m = sum of the forced scores, added left to right in ascending block order.
    forced_b = np.broadcast_to(forced, shape)
    m0 = np.cumsum(np.where(forced_b, scores, 0.0), axis=-1)[..., -1]

    # Candidates: visible, not forced; ordered by score descending, ties to the lower j.
    candidate = np.broadcast_to(visible & ~forced, shape)
    j = np.broadcast_to(np.arange(nkb), shape)
    sort_key = np.where(candidate, -scores, np.inf)  # non-candidates last
    order = np.lexsort((j, sort_key), axis=-1)
    sorted_scores = np.take_along_axis(np.where(candidate, scores, 0.0), order, axis=-1)
    sorted_is_cand = np.take_along_axis(candidate, order, axis=-1)

    if config.threshold_mode == "remaining":
        # Research variant: P of the mass outside the forced blocks. The candidates' running
        # mass (from 0) is compared with target = P * (T - m0), T the row's visible mass.
        total = np.cumsum(np.where(np.broadcast_to(visible, shape), scores, 0.0), axis=-1)[..., -1]
        target = P * (total - m0)
        running = np.cumsum(np.concatenate([np.zeros_like(m0)[..., None], sorted_scores], axis=-1), axis=-1)
        before = running[..., :-1]
        take = sorted_is_cand & (before < target[..., None])
        P = target  # the margins below are measured against this row's target
    else:
        # Mass before taking the k-th candidate: m0 + s_1 + ... + s_(k-1), added left to right.
        running = np.cumsum(np.concatenate([m0[..., None], sorted_scores], axis=-1), axis=-1)
        before = running[..., :-1]
        take = sorted_is_cand & (before < P)  # "while m < P, take the next block"

    mask = forced_b.copy()
    np.put_along_axis(mask, order, take | np.take_along_axis(mask, order, axis=-1), axis=-1)

    # Margin: how far the decisive masses are from P (the mass before the last block taken,
    # and after it, i.e. where the loop stopped).
    n_taken = take.sum(axis=-1)
    after = np.take_along_axis(running, n_taken[..., None], axis=-1)[..., 0]
    last_before = np.where(
        n_taken > 0,
        np.take_along_axis(running, np.maximum(n_taken - 1, 0)[..., None], axis=-1)[..., 0],
        np.inf,
    )
    exhausted = n_taken == sorted_is_cand.sum(axis=-1)
    stop_margin = np.where(exhausted & (after < P), np.inf, np.abs(after - P))
    margin = np.minimum(stop_margin, np.abs(last_before - P))
    return mask, margin


def select_blocks(
    scores: Any, config: UniSparseConfig | None, nq: int, nk: int
) -> BlockMask:
    """Top-P block selection with forced sink and local blocks (SPEC section 5).

    For every ``(b, g, i)``: start from the forced blocks ``F`` with mass ``m``; take the other
    visible blocks by score descending (ties: lower ``j`` first) while ``m < P``. The block that
    carries ``m`` past ``P`` is kept. ``P = 1`` keeps every visible block. Sums are formed left
    to right in float64: forced blocks in ascending ``j``, then candidates in order.

    Parameters
    ----------
    scores : array, shape ``[B, Hm, nQb, nKb]``
    config : UniSparseConfig
    nq, nk : int

    Returns
    -------
    BlockMask
        ``mask`` bool ``[B, Hm, nQb, nKb]`` with ``heads_per_mask = config.c_h``.
    """
    config = check_config(config)
    s = check_scores(scores)
    mask, _ = _selection(s, config, nq, nk)
    return BlockMask(mask, config.block_size, config.c_h, nq, nk, config.causal)


def selection_margin(scores: Any, config: UniSparseConfig | None, nq: int, nk: int) -> np.ndarray:
    """How close each row's selection is to flipping, float64 ``[B, Hm, nQb]``.

    The smaller of ``|m_before - P|`` (the mass before the last block taken) and
    ``|m_after - P|`` (where the loop stopped); ``inf`` when nothing could flip (``P = 1``).
    SPEC section 7 calls a row *borderline* when this is at most ``1e-6``.
    """
    config = check_config(config)
    _, margin = _selection(check_scores(scores), config, nq, nk)
    return margin
