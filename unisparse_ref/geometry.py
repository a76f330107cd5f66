"""Index geometry shared by every layer: positions, blocks, visibility (SPEC sections 1, 4, 5).

Everything here depends only on lengths and the configuration, never on data, and returns
small NumPy arrays. All positions are 0-based. Queries are the *last* ``nq`` positions of a
sequence of ``nk`` keys (bottom-right alignment): query row ``t`` sits at absolute position
``p(t) = t + (nk - nq)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "cdiv",
    "num_blocks",
    "query_positions",
    "last_query_position_of_blocks",
    "diagonal_blocks",
    "visible_blocks",
    "forced_blocks",
    "composite_visibility",
    "composite_counts_per_block",
    "token_causal_mask",
    "block_pair_counts",
]


def cdiv(a: int, b: int) -> int:
    """Ceiling division ``ceil(a / b)`` for non-negative integers."""
    return -(-a // b)


def num_blocks(n: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` tokens covering ``n`` tokens, ``ceil(n / S)``."""
    return cdiv(n, block_size)


def query_positions(nq: int, nk: int) -> np.ndarray:
    """Absolute positions ``p(t) = t + nk - nq`` of the ``nq`` query rows, int64 ``[nq]``."""
    return np.arange(nq, dtype=np.int64) + (nk - nq)


def last_query_position_of_blocks(nq: int, nk: int, block_size: int) -> np.ndarray:
    """``p_last(i) = p(min((i+1)*S, nq) - 1)`` for every query block ``i``, int64 ``[nQb]``."""
    nqb = num_blocks(nq, block_size)
    last_row = np.minimum((np.arange(nqb, dtype=np.int64) + 1) * block_size, nq) - 1
    return last_row + (nk - nq)


def diagonal_blocks(nq: int, nk: int, block_size: int) -> np.ndarray:
    """The diagonal key block ``d(i) = p_last(i) // S`` of every query block, int64 ``[nQb]``.

    It is defined the same way when attention is not causal (the reference's choice where
    SPEC is silent): the local forced blocks then still end at the block holding the query
    block's last position.
    """
    return last_query_position_of_blocks(nq, nk, block_size) // block_size


def visible_blocks(nq: int, nk: int, block_size: int, causal: bool) -> np.ndarray:
    """Key blocks a query block may see, bool ``[nQb, nKb]``.

    Causal: ``j*S <= p_last(i)``. Non-causal: every block.
    """
    nqb, nkb = num_blocks(nq, block_size), num_blocks(nk, block_size)
    if not causal:
        return np.ones((nqb, nkb), dtype=bool)
    first_key = np.arange(nkb, dtype=np.int64) * block_size
    return first_key[None, :] <= last_query_position_of_blocks(nq, nk, block_size)[:, None]


def forced_blocks(
    nq: int, nk: int, block_size: int, n_sink_blocks: int, n_local_blocks: int, causal: bool
) -> np.ndarray:
    """Blocks always kept, bool ``[nQb, nKb]`` (SPEC section 5).

    ``F(i) = ({0 .. n_sink-1} U {d(i)-n_local+1 .. d(i)}) ∩ visible(i)``.
    """
    nkb = num_blocks(nk, block_size)
    j = np.arange(nkb, dtype=np.int64)[None, :]
    d = diagonal_blocks(nq, nk, block_size)[:, None]
    sink = j < n_sink_blocks
    local = (j <= d) & (j > d - n_local_blocks)
    return (sink | local) & visible_blocks(nq, nk, block_size, causal)


def composite_visibility(nq: int, nk: int, c_q: int, c_k: int, causal: bool) -> np.ndarray:
    """Which composite keys each composite query sees, bool ``[R, C]`` (SPEC section 4).

    ``R = ceil(nq / c_q)``, ``C = ceil(nk / c_k)``. Causal: key group ``c`` is visible to
    query group ``r`` iff its first token ``c*c_k`` is at most ``p(last(r))`` with
    ``last(r) = min((r+1)*c_q, nq) - 1``. Non-causal: all visible.

    Edges: the rule is judged at the group's *last* query (a short last group included), and
    is inclusive: a key group whose first token is exactly ``p(last(r))`` is visible, even
    though its other tokens lie in the future. With ``c_q = c_k`` and ``nk - nq`` a multiple
    of ``c_k``, the two plausible mistakes (judging at the group's first query; a strict ``<``)
    mostly give the same matrix, so the oracle's cases use other factors and offsets
    (``tests/test_mutations.py`` plants both).
    """
    C = cdiv(nk, c_k)
    return np.arange(C, dtype=np.int64)[None, :] <= last_visible_composite_keys(nq, nk, c_q, c_k, causal)[:, None]


def last_visible_composite_keys(nq: int, nk: int, c_q: int, c_k: int, causal: bool) -> np.ndarray:
    """The last composite key each composite query sees, int64 ``[R]`` (SPEC section 4).

    Composite keys ``0 .. last[r]`` are visible to composite query ``r`` (the rule of
    :func:`composite_visibility`, row by row): causal, ``last[r] = min(C - 1, floor(p(last(r)) / c_k))``
    with ``last(r) = min((r+1)*c_q, nq) - 1``, ``-1`` when no key is visible; non-causal ``C - 1``.
    The kernels' launch configurations use it to size a row's walk over the keys.
    """
    return last_visible_composite_key_of_rows(np.arange(cdiv(nq, c_q), dtype=np.int64), nq, nk, c_q, c_k, causal)


def last_visible_composite_key_of_rows(rows: Any, nq: Any, nk: Any, c_q: int, c_k: int, causal: bool) -> np.ndarray:
    """:func:`last_visible_composite_keys` at given composite rows, elementwise over arrays.

    ``rows``, ``nq``, ``nk``: integer arrays of one shape (or scalars), composite row ``rows[e]``
    of a sequence of ``nq[e]`` queries and ``nk[e]`` keys; returns int64 of that shape, the same
    rule (used for many sequences at once by the packed launch configurations).
    """
    r, nq, nk = (np.asarray(a, dtype=np.int64) for a in (rows, nq, nk))
    C = -(-nk // c_k)
    if not causal:
        return np.broadcast_to(C - 1, np.broadcast(r, nq, nk).shape).astype(np.int64)
    last = np.minimum((r + 1) * c_q, nq) - 1 + (nk - nq)
    return np.minimum(C - 1, np.floor_divide(last, c_k))


def composite_counts_per_block(n: int, c: int, block_size: int) -> np.ndarray:
    """``R_i``: how many composite tokens (groups of ``c``) lie in each block, int64 ``[nb]``."""
    groups = cdiv(n, c)
    block_of_group = (np.arange(groups, dtype=np.int64) * c) // block_size
    return np.bincount(block_of_group, minlength=num_blocks(n, block_size)).astype(np.int64)


def token_causal_mask(rows: np.ndarray, nq: int, nk: int, causal: bool) -> np.ndarray:
    """Token-level visibility for the query rows ``rows``, bool ``[len(rows), nk]``.

    Causal: key ``s`` is visible to query ``t`` iff ``s <= p(t)``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not causal:
        return np.ones((rows.size, nk), dtype=bool)
    pos = rows + (nk - nq)
    return np.arange(nk, dtype=np.int64)[None, :] <= pos[:, None]


def block_pair_counts(nq: int, nk: int, block_size: int, causal: bool) -> np.ndarray:
    """Number of allowed (query, key) pairs inside every tile, int64 ``[nQb, nKb]``.

    A selected tile ``(i, j)`` costs ``4 * D`` FLOPs per pair (``QK^T`` and ``PV``); the dense
    work is the sum over all tiles. Causal pairs satisfy ``s <= p(t)``.
    """
    S = block_size
    nqb, nkb = num_blocks(nq, S), num_blocks(nk, S)
    rows_lo = np.arange(nqb, dtype=np.int64) * S
    rows_hi = np.minimum(rows_lo + S, nq)  # exclusive
    keys_lo = np.arange(nkb, dtype=np.int64) * S
    keys_hi = np.minimum(keys_lo + S, nk)
    if not causal:
        return (rows_hi - rows_lo)[:, None] * (keys_hi - keys_lo)[None, :]
    counts = np.zeros((nqb, nkb), dtype=np.int64)
    for i in range(nqb):  # per query row t the keys [0, p(t)] are visible
        pos = np.arange(rows_lo[i], rows_hi[i]) + (nk - nq)  # p(t) of the block's rows
        counts[i] = np.clip(pos[:, None] + 1 - keys_lo[None, :], 0, (keys_hi - keys_lo)[None, :]).sum(axis=0)
    return counts
