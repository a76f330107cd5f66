"""Which rank owns which query and key blocks: causal load balancing (zigzag / head-tail).

A sequence of ``Nq`` queries (the last ``Nq`` of ``Nk`` positions, SPEC section 1) is cut
into ``nQb = ceil(Nq / S)`` query blocks, the unit of the block mask (SPEC section 5). The
blocks are dealt out to ``W`` ranks; every rank computes the plan itself from the lengths,
so the plan is never communicated.

**Work of a query block.** Under a causal mask the late blocks see more keys: query row
``t`` sees ``p(t) + 1`` keys, so the dense work of block ``i`` is
``cost(i) = sum(p(t) + 1 for t in block i)`` query-key pairs (``rows * Nk`` when not
causal). The scoring of SPEC section 4 has the same shape (composite pairs), and the
attention of SPEC section 6 is bounded by it.

**Zigzag (head-tail) order.** The blocks are listed as ``0, n-1, 1, n-2, 2, ...``: each early
(cheap) block is followed by its mirror late (expensive) block, so consecutive pairs cost
about the same (exactly the same for causal ``Nq`` a multiple of ``S``). The list is then cut
into ``W`` contiguous pieces by the *midpoint rule*: the unit whose cost interval
``[prefix, prefix + cost)`` has its midpoint in ``[r T, (r+1) T)``, ``T = total / W``, goes to
rank ``r``. A rank thus holds a head chunk and a tail chunk of the sequence.

**The bound** (proved in ``docs/layers/distributed.md``, tested): every rank's work ``w_r``
satisfies ``|w_r - T| <= max_i cost(i)``. For causal ``Nq = Nk = N`` the largest block costs
about ``S N`` against ``T = N^2 / (2W)``, so ``max_r w_r / T <= 1 + 2 W / nQb``. The same rule
over the natural order (``strategy="contiguous"``) meets the same work bound but gives the
early ranks many more tokens (storage, pooling, and the sparse attention, whose per-block work
grows more slowly than the causal cost); zigzag balances both.

**Keys.** Key block ``j`` (positions ``[jS, (j+1)S)``) belongs to the owner of the query
block that holds position ``jS`` when there is one (``jS >= Nk - Nq``): with ``Nq = Nk`` a rank
owns the keys of its own query blocks, and its diagonal (local) blocks are mostly its own.
Key blocks that start before the first query (the prefix of ``Nq < Nk``, e.g. a cached
context in chunked prefill) are split into ``W`` contiguous pieces of equal token count.

More ranks than blocks is allowed: some ranks then own no query block (and possibly no key
block); they still take part in every collective call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import geometry

__all__ = [
    "STRATEGIES",
    "ShardPlan",
    "head_tail_order",
    "make_plan",
    "partition_by_midpoint",
    "query_block_costs",
]

#: Sharding strategies of :func:`make_plan`.
STRATEGIES = ("zigzag", "contiguous")


def query_block_costs(nq: int, nk: int, block_size: int, causal: bool) -> np.ndarray:
    """Dense work of every query block: the visible (query, key) token pairs, int64 ``[nQb]``.

    Causal: ``sum(p(t) + 1 for t in block i)`` with ``p(t) = t + nk - nq``; non-causal:
    ``rows(i) * nk``. Equals ``geometry.block_pair_counts(...).sum(axis=1)`` in O(nq).
    """
    nqb = geometry.num_blocks(nq, block_size)
    starts = np.arange(nqb, dtype=np.int64) * block_size
    if causal:
        per_row = np.arange(nq, dtype=np.int64) + (nk - nq) + 1
    else:
        per_row = np.full(nq, nk, dtype=np.int64)
    return np.add.reduceat(per_row, starts).astype(np.int64)


def head_tail_order(n: int) -> np.ndarray:
    """The zigzag order ``0, n-1, 1, n-2, ...`` of ``n`` blocks, int64 ``[n]``."""
    order = np.empty(n, dtype=np.int64)
    order[0::2] = np.arange((n + 1) // 2)
    order[1::2] = n - 1 - np.arange(n // 2)
    return order


def partition_by_midpoint(costs: np.ndarray, world_size: int) -> np.ndarray:
    """Cut a list of unit costs into ``world_size`` contiguous pieces of nearly equal cost.

    Unit ``u`` goes to rank ``floor((prefix_u + cost_u / 2) * W / total)``: the rank whose
    share ``[r T, (r+1) T)`` holds the midpoint of the unit's cost interval. Then every
    rank's load is within ``max(cost)`` of ``T = total / W`` (exact integer arithmetic).

    Parameters
    ----------
    costs : int array, shape ``[n]``
        Positive costs, in the order the units are dealt.
    world_size : int

    Returns
    -------
    numpy.ndarray of int64, shape ``[n]``
        The rank of every unit; non-decreasing.
    """
    costs = np.asarray(costs, dtype=np.int64)
    if costs.size == 0:
        return np.zeros(0, dtype=np.int64)
    if (costs <= 0).any():
        raise ValueError("unit costs must be positive")
    prefix = np.concatenate([[0], np.cumsum(costs)[:-1]])
    total = int(costs.sum())
    # floor(((2 prefix + cost) / 2) * W / total), in integers (Python ints: no overflow).
    num = [(2 * int(p) + int(c)) * world_size for p, c in zip(prefix, costs, strict=True)]
    return np.array([n // (2 * total) for n in num], dtype=np.int64)


@dataclass(frozen=True)
class ShardPlan:
    """Ownership of query and key blocks across ``world_size`` ranks.

    Attributes
    ----------
    world_size : int
    nq, nk : int
        Global lengths.
    block_size : int
        ``S``.
    causal : bool
    strategy : str
        ``"zigzag"`` or ``"contiguous"``.
    q_owner : int64 ``[nQb]``
        Rank owning each query block.
    k_owner : int64 ``[nKb]``
        Rank owning each key block (its keys, values and composite keys).
    """

    world_size: int
    nq: int
    nk: int
    block_size: int
    causal: bool
    strategy: str
    q_owner: np.ndarray
    k_owner: np.ndarray

    @property
    def nqb(self) -> int:
        """Number of query blocks ``ceil(nq / S)``."""
        return geometry.num_blocks(self.nq, self.block_size)

    @property
    def nkb(self) -> int:
        """Number of key blocks ``ceil(nk / S)``."""
        return geometry.num_blocks(self.nk, self.block_size)

    def q_blocks(self, rank: int) -> np.ndarray:
        """Query blocks of ``rank``, ascending, int64."""
        return np.flatnonzero(self.q_owner == rank).astype(np.int64)

    def k_blocks(self, rank: int) -> np.ndarray:
        """Key blocks of ``rank``, ascending, int64."""
        return np.flatnonzero(self.k_owner == rank).astype(np.int64)

    def _rows(self, blocks: np.ndarray, n: int) -> np.ndarray:
        S = self.block_size
        parts = [np.arange(b * S, min((b + 1) * S, n), dtype=np.int64) for b in blocks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def q_rows(self, rank: int) -> np.ndarray:
        """Query rows held by ``rank`` (its blocks' rows, ascending), int64 ``[rows_r]``."""
        return self._rows(self.q_blocks(rank), self.nq)

    def k_rows(self, rank: int) -> np.ndarray:
        """Key positions held by ``rank`` (its key blocks' tokens, ascending), int64 ``[keys_r]``."""
        return self._rows(self.k_blocks(rank), self.nk)

    def costs(self) -> np.ndarray:
        """Dense work of every query block (:func:`query_block_costs`), int64 ``[nQb]``."""
        return query_block_costs(self.nq, self.nk, self.block_size, self.causal)

    def loads(self) -> np.ndarray:
        """Dense work per rank, int64 ``[world_size]``."""
        return np.bincount(self.q_owner, weights=self.costs(), minlength=self.world_size).astype(np.int64)

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Query rows and key tokens held per rank, two int64 ``[world_size]`` arrays."""
        q = np.array([self.q_rows(r).size for r in range(self.world_size)], dtype=np.int64)
        k = np.array([self.k_rows(r).size for r in range(self.world_size)], dtype=np.int64)
        return q, k


def _check_int(name: str, x: object, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if int(x) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def make_plan(
    nq: int, nk: int, block_size: int, causal: bool, world_size: int, strategy: str = "zigzag"
) -> ShardPlan:
    """The sharding of a sequence over ``world_size`` ranks (see the module docstring).

    Parameters
    ----------
    nq, nk : int
        Global query and key lengths (``nq <= nk`` when causal).
    block_size : int
        ``S`` of the configuration.
    causal : bool
    world_size : int
        Number of ranks, >= 1. More ranks than query blocks is allowed (idle ranks).
    strategy : str
        ``"zigzag"`` (default) or ``"contiguous"``.

    Returns
    -------
    ShardPlan

    Raises
    ------
    ValueError, TypeError
        Lengths below 1, ``nq > nk`` when causal, ``world_size < 1``, an unknown strategy.
    """
    nq, nk = _check_int("nq", nq, 1), _check_int("nk", nk, 1)
    world_size = _check_int("world_size", world_size, 1)
    block_size = _check_int("block_size", block_size, 1)
    if causal and nq > nk:
        raise ValueError(f"causal attention needs nq <= nk, got nq={nq}, nk={nk}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    S = block_size
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    costs = query_block_costs(nq, nk, S, causal)
    order = head_tail_order(nqb) if strategy == "zigzag" else np.arange(nqb, dtype=np.int64)
    q_owner = np.empty(nqb, dtype=np.int64)
    q_owner[order] = partition_by_midpoint(costs[order], world_size)

    k_owner = np.empty(nkb, dtype=np.int64)
    off = nk - nq  # position of query row 0 (negative only when not causal and nq > nk)
    first = np.arange(nkb, dtype=np.int64) * S
    in_queries = first >= off
    k_owner[in_queries] = q_owner[(first[in_queries] - off) // S]
    prefix = np.flatnonzero(~in_queries)  # key blocks that start before the first query
    if prefix.size:
        sizes = np.minimum(first[prefix] + S, nk) - first[prefix]
        k_owner[prefix] = partition_by_midpoint(sizes, world_size)
    return ShardPlan(world_size, nq, nk, S, bool(causal), strategy, q_owner, k_owner)
