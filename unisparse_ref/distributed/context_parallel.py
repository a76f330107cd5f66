"""Context-parallel UniSparse: one sequence sharded over ranks, in the float64 reference.

Every rank runs :func:`context_parallel_attention` on its shard (the query rows of its query
blocks, the keys and values of its key blocks; :mod:`~unisparse_ref.distributed.sharding`)
with a :class:`~unisparse_ref.distributed.comm.Communicator`. The steps, and the only data
that crosses ranks:

1. **meta** (``all_gather``, 320 bytes: 8 int64 and a message): shapes, lengths, dtype and
   whether the rank accepted its inputs (if not, why), so that a bad shard is refused on
   every rank at once, with its reason, never a hang.
2. **pool** (SPEC 3, local): composite queries of the rank's query blocks and composite keys
   of its key blocks. A group of ``c_q`` (``c_k``) tokens never crosses a block of ``S``, so
   every composite token is made by its block's owner, from the same tokens as on one device.
3. **composite_keys** (``all_gather``): every rank receives all ``C = ceil(Nk/c_k)`` composite
   keys. All of them are needed: the softmax of SPEC 4 is global over the whole compressed
   row, so a query's scores of one block depend on every composite key the query sees, and
   a zigzag rank holds late query blocks, which see nearly all of them.
4. **score and select** (SPEC 4-5, local): the rows of the rank's query blocks, with the
   reference's operations, against the gathered composite keys.
5. **requests** (``all_gather``, one byte per ``(b, kv head, key block)``): the key blocks
   some local query block selected for some head, that the rank does not own.
6. **kv_blocks** (``all_to_all``): each owner sends exactly the requested ``(b, kv head,
   block)`` tiles of K and V, in the input dtype.
7. **attend** (SPEC 6, local): each local query block over its selected blocks, from its own
   and the fetched tiles; ``combine="gather"``: one softmax over the gathered keys (the
   default); ``combine="merge"``: one partial state over the owned blocks and one over the
   fetched, combined with the exact lse merge (:mod:`unisparse_ref.reference.merge`), the
   form a GPU rank uses to overlap the fetch with the attention over its own blocks.

What holds against :func:`unisparse_ref.unisparse_attention` (``backend="numpy"``) on the
whole sequence: composite tokens bit for bit; scores up to the rounding of the BLAS products
(a product's bits depend on the matrix shape; observed below 1e-16, tested at 1e-13); block
masks identical unless a row's selection is within that rounding of ``P`` (tested identical);
``out`` within ``1e-12`` absolute, ``lse`` (float32) within one float32 ulp of the float64
value (tested). ``docs/layers/distributed.md`` gives the bytes of every step as a formula,
:func:`expected_bytes` computes it, and the tests check it against the counted bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import geometry
from .._arrays import as_checked_numpy, check_config, check_head_pooling, check_qkv
from .._convert import SUPPORTED_DTYPES
from ..backends import get_backend
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from ..reference.merge import merge_attention_states
from ..reference.pooling import pool_heads, pool_sequence
from ..reference.scores import kv_head_of_mask_head
from .comm import Communicator, run_simulated
from .sharding import ShardPlan, make_plan

__all__ = [
    "COMBINES",
    "DistributedResult",
    "LocalShard",
    "RankResult",
    "TAGS",
    "assemble",
    "context_parallel_attention",
    "expected_bytes",
    "shard_inputs",
    "simulate_context_parallel",
]

#: How a rank combines its own and fetched key blocks (see the module docstring).
COMBINES = ("gather", "merge")
#: The tags under which the communicator counts bytes, in call order.
TAGS = ("meta", "composite_keys", "requests", "kv_blocks")
#: Elements of one float64 logits chunk, as in the reference's scoring.
_CHUNK_ELEMENTS = 1 << 24
_META = 8  # int64 entries of the meta record
_META_BYTES = 320  # the meta record: 8 int64, then the rank's refusal message (utf-8, zero padded)


@dataclass
class LocalShard:
    """What one rank holds before the call.

    Attributes
    ----------
    rank : int
    q : array, shape ``[B, Hq, rows_r, D]``
        The rows ``plan.q_rows(rank)`` of ``q`` (its query blocks, ascending).
    k, v : array, shape ``[B, Hkv, keys_r, D]``
        The positions ``plan.k_rows(rank)`` of ``k`` and ``v`` (its key blocks, ascending).
    """

    rank: int
    q: Any
    k: Any
    v: Any


@dataclass
class RankResult:
    """What :func:`context_parallel_attention` returns on one rank.

    Attributes
    ----------
    rank : int
    q_blocks : int64 ``[nloc]``
        The rank's query blocks, ascending; rows below follow this order.
    out : float64 ``[B, Hq, rows_r, D]``
    lse : float32 ``[B, Hq, rows_r]``
    mask : bool ``[B, Hm, nloc, nKb]``
        The block-mask rows of the rank's query blocks.
    scores : float64 ``[B, Hm, nloc, nKb]``
    q_c : float64 ``[B, Hm, R_r, D]``
        Composite queries of the rank's blocks.
    k_c : float64 ``[B, Hkv, C, D]``
        All composite keys (after the all-gather).
    stats : dict
        :meth:`~unisparse_ref.distributed.comm.CommStats.as_dict` of the rank's communicator after the call.
    """

    rank: int
    q_blocks: np.ndarray
    out: np.ndarray
    lse: np.ndarray
    mask: np.ndarray
    scores: np.ndarray
    q_c: np.ndarray
    k_c: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistributedResult:
    """A whole sequence assembled from every rank (:func:`assemble`).

    Attributes
    ----------
    out : float64 ``[B, Hq, Nq, D]``
    lse : float32 ``[B, Hq, Nq]``
    block_mask : BlockMask, ``mask [B, Hm, nQb, nKb]``
    scores : float64 ``[B, Hm, nQb, nKb]``
    q_c : float64 ``[B, Hm, R, D]``
    k_c : float64 ``[B, Hkv, C, D]``
    plan : ShardPlan
    stats : list of dict
        Per rank, the bytes counted by its communicator.
    """

    out: np.ndarray
    lse: np.ndarray
    block_mask: BlockMask
    scores: np.ndarray
    q_c: np.ndarray
    k_c: np.ndarray
    plan: ShardPlan
    stats: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------


def _block_len(j: int | np.ndarray, n: int, S: int) -> Any:
    return np.minimum((np.asarray(j) + 1) * S, n) - np.asarray(j) * S


def _composite_index(blocks: np.ndarray, n: int, c: int, S: int) -> np.ndarray:
    """Global indices of the composite tokens (groups of ``c``) inside ``blocks``, ascending."""
    parts = [np.arange(b * S // c, b * S // c + geometry.cdiv(int(_block_len(b, n, S)), c)) for b in blocks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _composite_visibility_rows(r: np.ndarray, nq: int, nk: int, c_q: int, c_k: int, causal: bool) -> np.ndarray:
    """Rows ``r`` of :func:`unisparse_ref.geometry.composite_visibility`, bool ``[len(r), C]``."""
    C = geometry.cdiv(nk, c_k)
    if not causal:
        return np.ones((r.size, C), dtype=bool)
    last = np.minimum((r + 1) * c_q, nq) - 1 + (nk - nq)
    return np.arange(C, dtype=np.int64)[None, :] * c_k <= last[:, None]


def _pool_blocks(x: np.ndarray, blocks: np.ndarray, n: int, c: int, S: int, c_h: int) -> np.ndarray:
    """Composite tokens of the concatenated blocks ``x`` (``[B, H, sum len, D]``), block by block."""
    B, H, _, D = x.shape
    parts, pos = [], 0
    for b in blocks:
        m = int(_block_len(b, n, S))
        parts.append(pool_heads(pool_sequence(x[:, :, pos : pos + m], c), c_h))
        pos += m
    if not parts:
        return np.zeros((B, H // c_h, 0, D), dtype=np.float64)
    return np.concatenate(parts, axis=2)


# --------------------------------------------------------------------------------------------
# local stages
# --------------------------------------------------------------------------------------------


def _local_scores(
    q_c: np.ndarray, k_c: np.ndarray, r_glob: np.ndarray, row_block: np.ndarray, nloc: int,
    config: UniSparseConfig, nq: int, nk: int, G: int,
) -> tuple[np.ndarray, np.ndarray]:
    """SPEC 4 for the composite rows ``r_glob`` (the reference's operations, on fewer rows).

    ``row_block[r]`` is the local index of the query block of composite row ``r``. Returns the
    unnormalised block sums ``[B, Hm, nloc, nKb]`` and ``R_i`` of every query block ``[nQb]``.
    """
    B, Hm, Rl, D = q_c.shape
    C = k_c.shape[2]
    S = config.block_size
    nkb = geometry.num_blocks(nk, S)
    scale = config.scale_for(D)
    k_heads = k_c[:, kv_head_of_mask_head(Hm, config.c_h, G)]
    visible = _composite_visibility_rows(r_glob, nq, nk, config.c_q, config.c_k, config.causal)
    col_to_block = np.zeros((C, nkb))
    col_to_block[np.arange(C), (np.arange(C) * config.c_k) // S] = 1.0
    scores = np.zeros((B, Hm, nloc, nkb), dtype=np.float64)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hm * C))
    for r0 in range(0, Rl, rows_per_chunk):
        r1 = min(Rl, r0 + rows_per_chunk)
        logits = scale * (q_c[:, :, r0:r1] @ np.swapaxes(k_heads, -1, -2))
        logits = np.where(visible[r0:r1], logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        A = np.exp(logits)
        A /= A.sum(axis=-1, keepdims=True)
        np.add.at(scores, (slice(None), slice(None), row_block[r0:r1]), A @ col_to_block)
    return scores, geometry.composite_counts_per_block(nq, config.c_q, S).astype(np.float64)


def _select_rows(scores: np.ndarray, visible: np.ndarray, forced: np.ndarray, P: float) -> np.ndarray:
    """SPEC 5 on the rows of ``scores`` ``[B, Hm, n, nKb]`` whose visibility and forced blocks
    are ``visible``, ``forced`` ``[n, nKb]``: the reference's selection, row for row."""
    shape = scores.shape
    if P >= 1.0:
        return np.broadcast_to(visible, shape).copy()
    forced_b = np.broadcast_to(forced, shape)
    m0 = np.cumsum(np.where(forced_b, scores, 0.0), axis=-1)[..., -1]
    candidate = np.broadcast_to(visible & ~forced, shape)
    j = np.broadcast_to(np.arange(shape[-1]), shape)
    order = np.lexsort((j, np.where(candidate, -scores, np.inf)), axis=-1)
    sorted_scores = np.take_along_axis(np.where(candidate, scores, 0.0), order, axis=-1)
    sorted_is_cand = np.take_along_axis(candidate, order, axis=-1)
    running = np.cumsum(np.concatenate([m0[..., None], sorted_scores], axis=-1), axis=-1)
    take = sorted_is_cand & (running[..., :-1] < P)
    mask = forced_b.copy()
    np.put_along_axis(mask, order, take | np.take_along_axis(mask, order, axis=-1), axis=-1)
    return mask


def _attend(q_rows: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray, scale: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Masked softmax attention in float64: ``q_rows [h, n, D]``, ``keys``/``values [m, D]``,
    ``allowed [n, m]``; returns ``out [h, n, D]`` and float64 ``lse [h, n]`` (empty rows:
    ``0`` and ``-inf``)."""
    h, n, D = q_rows.shape
    if keys.shape[0] == 0:
        return np.zeros((h, n, D)), np.full((h, n), -np.inf)
    logits = np.where(allowed, scale * (q_rows @ keys.T), -np.inf)
    m = logits.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    m = np.where(empty, 0.0, m)
    p = np.exp(logits - m)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(empty, 0.0, (p @ values) / np.where(empty, 1.0, denom))
        lse = np.where(empty[..., 0], -np.inf, m[..., 0] + np.log(np.where(empty[..., 0], 1.0, denom[..., 0])))
    return out, lse


def _needed(mask_rows: np.ndarray, kv_of_g: np.ndarray, Hkv: int) -> np.ndarray:
    """``need[b, h, j]``: some local query block selected key block ``j`` for a mask head of KV head ``h``."""
    B, Hm, _, nkb = mask_rows.shape
    per_g = mask_rows.any(axis=2)  # [B, Hm, nKb]
    need = np.zeros((B, Hkv, nkb), dtype=bool)
    for g in range(Hm):
        need[:, kv_of_g[g]] |= per_g[:, g]
    return need


# --------------------------------------------------------------------------------------------
# the per-rank algorithm
# --------------------------------------------------------------------------------------------


def _check_local(shard: LocalShard, plan: ShardPlan, config: UniSparseConfig, comm: Communicator,
                 combine: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.dtype]:
    _common_checks(shard, plan, config, comm)
    q, k, v = (as_checked_numpy(n, x) for n, x in (("q", shard.q), ("k", shard.k), ("v", shard.v)))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"rank {shard.rank}: {name} must have rank 4, got shape {x.shape}")
    rows, keys = plan.q_rows(shard.rank).size, plan.k_rows(shard.rank).size
    if q.shape[2] != rows or k.shape[2] != keys or v.shape[2] != keys:
        raise ValueError(
            f"rank {shard.rank}: the plan gives it {rows} query rows and {keys} keys; got q {q.shape}, "
            f"k {k.shape}, v {v.shape} (use shard_inputs)"
        )
    # The shape and dtype rules of SPEC 1 on one-token stand-ins (the shard may be empty).
    stand = [x[:, :, :1] if x.shape[2] else np.zeros((*x.shape[:2], 1, x.shape[3]), x.dtype) for x in (q, k, v)]
    check_qkv(*stand, causal=False)
    check_head_pooling(q.shape[1], k.shape[1], config.c_h)
    return q, k, v, np.dtype(q.dtype)


def _common_checks(shard: LocalShard, plan: ShardPlan, config: UniSparseConfig, comm: Communicator) -> None:
    """The checks of the plan against the communicator and the config (both paths)."""
    if comm.world_size != plan.world_size:
        raise ValueError(f"the communicator has {comm.world_size} ranks, the plan {plan.world_size}")
    if comm.rank != shard.rank:
        raise ValueError(f"shard of rank {shard.rank} given to communicator rank {comm.rank}")
    if plan.block_size != config.block_size or plan.causal != config.causal:
        raise ValueError(
            f"the plan (block_size={plan.block_size}, causal={plan.causal}) does not match the config "
            f"(block_size={config.block_size}, causal={config.causal})"
        )


def _exchange_meta(comm: Communicator, plan: ShardPlan, check: Any) -> Any:
    """Step 1 (meta): run ``check()`` -> ``(q, k, v, dtype)`` and tell every rank how it went.

    Every rank all-gathers 8 int64 (ok, B, Hq, Hkv, D, nq, nk, dtype code) and its refusal
    message; a rank whose check raised re-raises, every other rank raises ``ValueError`` with
    the refusing ranks' messages; ranks that disagree on the shapes all raise. Returns what
    ``check`` returned.
    """
    rank, W = comm.rank, comm.world_size
    err: Exception | None = None
    got = None
    meta = np.full(_META, -1, dtype=np.int64)
    try:
        got = check()
        q, k, _, dt = got
        meta[:] = (1, q.shape[0], q.shape[1], k.shape[1], q.shape[3], plan.nq, plan.nk,
                   list(SUPPORTED_DTYPES).index(np.dtype(dt)))
    except (ValueError, TypeError, NotImplementedError) as e:
        err = e
        meta[0] = 0
    record = np.zeros(_META_BYTES, dtype=np.uint8)
    record[: 8 * _META] = meta.view(np.uint8)
    text = (f"{type(err).__name__}: {err}" if err is not None else "").encode()[: _META_BYTES - 8 * _META]
    record[8 * _META : 8 * _META + len(text)] = np.frombuffer(text, dtype=np.uint8)
    records = comm.all_gather(record, tag="meta")
    metas = np.stack([np.asarray(rec[: 8 * _META]).view(np.int64) for rec in records])
    if err is not None:
        raise err
    bad = [r for r in range(W) if metas[r, 0] != 1]
    if bad:
        why = "; ".join(f"rank {r}: {bytes(records[r][8 * _META:]).rstrip(bytes(1)).decode(errors='replace')}"
                        for r in bad)
        raise ValueError(f"rank {rank}: ranks {bad} refused their inputs ({why})")
    if (metas[:, 1:] != metas[rank, 1:]).any():
        raise ValueError(
            "ranks disagree on (B, Hq, Hkv, D, nq, nk, dtype): "
            + "; ".join(f"rank {r}: {tuple(int(x) for x in metas[r, 1:])}" for r in range(W))
        )
    return got


def context_parallel_attention(
    shard: LocalShard,
    plan: ShardPlan,
    config: UniSparseConfig | None,
    comm: Communicator,
    *,
    combine: str = "gather",
    backend: Any = "reference",
    timings: dict[str, float] | None = None,
) -> RankResult:
    """UniSparse attention of one rank's shard (run on every rank, with the same ``plan``).

    Parameters
    ----------
    shard : LocalShard
        The rank's query rows ``[B, Hq, rows_r, D]`` and keys/values ``[B, Hkv, keys_r, D]``
        (:func:`shard_inputs`).
    plan : ShardPlan
        From :func:`~unisparse_ref.distributed.make_plan`, the same on every rank.
    config : UniSparseConfig, optional
        Its ``block_size`` and ``causal`` must match the plan's.
    comm : Communicator
        This rank's communicator (``comm.rank == shard.rank``).
    combine : str
        ``"gather"`` (default): one softmax over owned + fetched keys; ``"merge"``: two
        partial states merged by lse.
    backend : str or object
        ``"reference"`` (default): the float64 reference's own operations on the host.
        ``"cupy"``: the rank computes on its GPU through the CuPy layer's stage methods
        (:mod:`~unisparse_ref.distributed.stages`); any other registered name (``"numpy"``:
        the reference's stage methods, the CPU tests of that glue) or a backend object
        likewise.
    timings : dict, optional
        Stage path only: filled with the seconds of the rank's local steps
        (:func:`~unisparse_ref.distributed.stages.stage_rank`).

    Returns
    -------
    RankResult
        The rank's rows of ``out``, ``lse``, the block mask and the scores. Reference path:
        the types below. Stage path: the backend's arrays (on ``"cupy"``: CuPy; ``out`` of
        the input dtype, ``lse`` float32, ``scores`` and composite tokens float32).

    Raises
    ------
    ValueError, TypeError
        Inputs that break SPEC 1 or disagree with the plan or with the other ranks. Every
        rank raises (the meta exchange comes first), none hangs.
    RuntimeError
        A key block was read that the rank neither owns nor fetched (an internal error).
    """
    config = check_config(config)
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if backend != "reference":
        from .stages import stage_rank

        be = get_backend(backend) if isinstance(backend, str) else backend
        got = stage_rank(shard, plan, config, comm, be, combine=combine, timings=timings,
                         exchange_meta=lambda c, check: _exchange_meta(c, plan, lambda: _common_checks(
                             shard, plan, config, c) or check()))
        return RankResult(comm.rank, got["q_blocks"], got["out"], got["lse"], got["mask"], got["scores"],
                          got["q_c"], got["k_c"], comm.stats.as_dict())
    rank, W = comm.rank, comm.world_size

    # 1. meta: refuse bad shards on every rank together.
    q, k, v, _ = _exchange_meta(comm, plan, lambda: _check_local(shard, plan, config, comm, combine))

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    nq, nk, S = plan.nq, plan.nk, config.block_size
    G, Hm = Hq // Hkv, Hq // config.c_h
    kv_of_g = kv_head_of_mask_head(Hm, config.c_h, G)
    q_blocks, k_blocks = plan.q_blocks(rank), plan.k_blocks(rank)
    nloc = q_blocks.size
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))

    # 2. pool: composite queries of own query blocks, composite keys of own key blocks.
    q_c = _pool_blocks(q64, q_blocks, nq, config.c_q, S, config.c_h)
    k_c_own = _pool_blocks(k64, k_blocks, nk, config.c_k, S, 1)
    r_glob = _composite_index(q_blocks, nq, config.c_q, S)
    row_block = np.searchsorted(q_blocks, (r_glob * config.c_q) // S)

    # 3. composite keys: all-gather.
    gathered = comm.all_gather(k_c_own, tag="composite_keys")
    C = geometry.cdiv(nk, config.c_k)
    k_c = np.empty((B, Hkv, C, D), dtype=np.float64)
    for src, part in enumerate(gathered):
        idx = _composite_index(plan.k_blocks(src), nk, config.c_k, S)
        if part.shape != (B, Hkv, idx.size, D):
            raise RuntimeError(f"rank {src} sent composite keys {part.shape}, expected {(B, Hkv, idx.size, D)}")
        k_c[:, :, idx] = part

    # 4. scores and selection of the local query blocks.
    scores, r_per_block = _local_scores(q_c, k_c, r_glob, row_block, nloc, config, nq, nk, G)
    scores = scores / r_per_block[q_blocks][None, None, :, None]
    visible = geometry.visible_blocks(nq, nk, S, config.causal)[q_blocks]
    forced = geometry.forced_blocks(nq, nk, S, config.n_sink_blocks, config.n_local_blocks, config.causal)[q_blocks]
    mask = _select_rows(scores, visible, forced, float(config.threshold))

    # 5. requests: the selected (b, kv head, key block) tiles owned elsewhere.
    not_mine = plan.k_owner != rank
    request = _needed(mask, kv_of_g, Hkv) & not_mine[None, None, :]
    requests = [r.astype(bool) for r in comm.all_gather(request.astype(np.uint8), tag="requests")]

    # 6. kv_blocks: every owner sends the tiles asked of it, K then V, in the input dtype.
    k_lens = np.asarray(_block_len(k_blocks, nk, S), dtype=np.int64)
    local_start = {int(j): int(st) for j, st in zip(k_blocks, np.cumsum(k_lens) - k_lens, strict=True)}
    mine = plan.k_owner == rank
    sends = []
    for dst in range(W):
        tiles = np.argwhere(requests[dst] & mine[None, None, :]) if dst != rank else np.zeros((0, 3), int)
        ks = [k[b, h, local_start[j] : local_start[j] + int(_block_len(j, nk, S))] for b, h, j in tiles]
        vs = [v[b, h, local_start[j] : local_start[j] + int(_block_len(j, nk, S))] for b, h, j in tiles]
        sends.append(np.stack([np.concatenate(ks), np.concatenate(vs)]) if ks else np.zeros((2, 0, D), k.dtype))
    received = comm.all_to_all(sends, tag="kv_blocks")

    # What the rank holds, placed at global positions; what it does not hold stays NaN.
    kbuf = np.full((B, Hkv, nk, D), np.nan)
    vbuf = np.full((B, Hkv, nk, D), np.nan)
    kbuf[:, :, plan.k_rows(rank)] = k64
    vbuf[:, :, plan.k_rows(rank)] = v64
    for src in range(W):
        if src == rank:
            continue
        pos = 0
        for b, h, j in np.argwhere(request & (plan.k_owner == src)[None, None, :]):
            m = int(_block_len(j, nk, S))
            kbuf[b, h, j * S : j * S + m] = received[src][0, pos : pos + m]
            vbuf[b, h, j * S : j * S + m] = received[src][1, pos : pos + m]
            pos += m
        if pos != received[src].shape[1]:
            raise RuntimeError(f"rank {rank}: rank {src} sent {received[src].shape[1]} key tokens, expected {pos}")

    # 7. attention of every local query block over its selected blocks.
    rows_total = q.shape[2]
    out = np.zeros((B, Hq, rows_total, D), dtype=np.float64)
    lse = np.zeros((B, Hq, rows_total), dtype=np.float32)
    scale = config.scale_for(D)
    pos = 0
    for li, i in enumerate(q_blocks):
        n_i = int(_block_len(i, nq, S))
        p = np.arange(i * S, i * S + n_i) + (nk - nq)  # absolute positions of the block's rows
        for b in range(B):
            for g in range(Hm):
                js = np.flatnonzero(mask[b, g, li])
                heads = slice(g * config.c_h, (g + 1) * config.c_h)
                h = int(kv_of_g[g])
                qr = q64[b, heads, pos : pos + n_i]
                parts = []
                groups = [js] if combine == "gather" else [js[~not_mine[js]], js[not_mine[js]]]
                for sel in groups:
                    keys = (np.concatenate([np.arange(j * S, j * S + int(_block_len(j, nk, S))) for j in sel])
                            if sel.size else np.zeros(0, dtype=np.int64))
                    kk, vv = kbuf[b, h, keys], vbuf[b, h, keys]
                    if np.isnan(kk).any() or np.isnan(vv).any():
                        raise RuntimeError(f"rank {rank} reads key blocks {sel.tolist()} it neither owns nor fetched")
                    allowed = keys[None, :] <= p[:, None] if config.causal else np.ones((n_i, keys.size), bool)
                    parts.append(_attend(qr, kk, vv, allowed, scale))
                if combine == "gather":
                    o, l_ = parts[0][0], parts[0][1].astype(np.float32)
                else:
                    (oa, la), (ob, lb) = parts
                    o, l_ = merge_attention_states(oa, la, ob, lb)  # float64 lse in: float64 weights
                out[b, heads, pos : pos + n_i] = o
                lse[b, heads, pos : pos + n_i] = l_
        pos += n_i
    return RankResult(rank, q_blocks, out, lse, mask, scores, q_c, k_c, comm.stats.as_dict())


# --------------------------------------------------------------------------------------------
# driving all ranks, assembling, the byte formula
# --------------------------------------------------------------------------------------------


def shard_inputs(q: Any, k: Any, v: Any, plan: ShardPlan) -> list[LocalShard]:
    """Cut global ``q [B, Hq, Nq, D]``, ``k``, ``v [B, Hkv, Nk, D]`` into the plan's shards.

    Host arrays are checked (dtype, finiteness) and cut on the host; CuPy arrays (or
    ``BFloat16Array``) are cut on their GPU (shapes checked; the values are checked by the
    ranks), and the shards are CuPy arrays (bf16 as the CuPy layer returns it).

    Returns
    -------
    list of LocalShard
        One per rank: ``q[:, :, plan.q_rows(r)]`` and ``k``, ``v[:, :, plan.k_rows(r)]`` (copies).
    """
    if any(type(x).__module__.split(".")[0] == "cupy" or type(x).__name__ == "BFloat16Array" for x in (q, k, v)):
        from .stages import ArrayOps

        ops = ArrayOps("cupy")
        (qr, dt), (kr, dk), (vr, dv) = (ops.raw(x) for x in (q, k, v))
        if not dt == dk == dv:
            raise TypeError(f"q, k, v must share a dtype, got {dt}, {dk}, {dv}")
        _, _, _, nq, nk, _ = check_qkv(qr, kr, vr, causal=plan.causal, shape_only=True)
        if (nq, nk) != (plan.nq, plan.nk):
            raise ValueError(f"the inputs have nq={nq}, nk={nk}; the plan was made for nq={plan.nq}, nk={plan.nk}")
        return [
            LocalShard(r, ops.wrap(qr[:, :, ops.index(plan.q_rows(r))], dt),
                       ops.wrap(kr[:, :, ops.index(plan.k_rows(r))], dt), ops.wrap(vr[:, :, ops.index(plan.k_rows(r))], dt))
            for r in range(plan.world_size)
        ]
    q, k, v = as_checked_numpy("q", q), as_checked_numpy("k", k), as_checked_numpy("v", v)
    _, _, _, nq, nk, _ = check_qkv(q, k, v, causal=plan.causal)
    if (nq, nk) != (plan.nq, plan.nk):
        raise ValueError(f"the inputs have nq={nq}, nk={nk}; the plan was made for nq={plan.nq}, nk={plan.nk}")
    return [
        LocalShard(r, q[:, :, plan.q_rows(r)], k[:, :, plan.k_rows(r)], v[:, :, plan.k_rows(r)])
        for r in range(plan.world_size)
    ]


def assemble(results: Sequence[RankResult], plan: ShardPlan, config: UniSparseConfig | None) -> DistributedResult:
    """Put every rank's rows back in global order (a host-side step, outside the communicator).

    Parameters
    ----------
    results : sequence of RankResult
        One per rank, in rank order.
    plan : ShardPlan
    config : UniSparseConfig

    Returns
    -------
    DistributedResult
    """
    config = check_config(config)
    if len(results) != plan.world_size:
        raise ValueError(f"need {plan.world_size} rank results, got {len(results)}")
    r0 = results[0]
    on_device = type(r0.lse).__module__.split(".")[0] == "cupy"
    if on_device:  # the stage path on CuPy: assemble on the GPU
        from .stages import ArrayOps

        ops = ArrayOps("cupy")
        xp, ix = ops.xp, ops.index
    else:
        ops, xp, ix = None, np, (lambda a: a)

    def raw(x: Any) -> Any:
        return ops.raw(x) if ops is not None else (np.asarray(x), np.dtype(np.asarray(x).dtype))

    out0, dt = raw(r0.out)
    B, Hq, _, D = r0.out.shape
    Hm, nkb = r0.mask.shape[1], plan.nkb
    R = geometry.cdiv(plan.nq, config.c_q)
    out = xp.zeros((B, Hq, plan.nq, D), dtype=out0.dtype)
    lse = xp.zeros((B, Hq, plan.nq), dtype=np.float32)
    mask = xp.zeros((B, Hm, plan.nqb, nkb), dtype=bool)
    scores = xp.zeros((B, Hm, plan.nqb, nkb), dtype=r0.scores.dtype)
    q_c = xp.zeros((B, Hm, R, D), dtype=r0.q_c.dtype)
    for r, res in enumerate(results):
        rows, qb = ix(plan.q_rows(r)), ix(res.q_blocks)
        out[:, :, rows] = raw(res.out)[0]
        lse[:, :, rows] = res.lse
        mask[:, :, qb], scores[:, :, qb] = res.mask, res.scores
        q_c[:, :, ix(_composite_index(res.q_blocks, plan.nq, config.c_q, plan.block_size))] = res.q_c
    bm = BlockMask(mask, plan.block_size, config.c_h, plan.nq, plan.nk, plan.causal)
    out_w = ops.wrap(out, dt) if ops is not None else out
    return DistributedResult(out_w, lse, bm, scores, q_c, r0.k_c, plan, [res.stats for res in results])


def simulate_context_parallel(
    q: Any,
    k: Any,
    v: Any,
    config: UniSparseConfig | None,
    world_size: int,
    *,
    strategy: str = "zigzag",
    combine: str = "gather",
    backend: Any = "reference",
    timings: list[dict[str, float]] | None = None,
    timeout_s: float = 120.0,
) -> DistributedResult:
    """Shard ``q``, ``k``, ``v``, run every rank as a thread (:class:`~unisparse_ref.distributed.comm.SimulatedComm`), assemble.

    Parameters
    ----------
    q : array, shape ``[B, Hq, Nq, D]``
    k, v : array, shape ``[B, Hkv, Nk, D]``
    config : UniSparseConfig, optional
    world_size : int
        Number of simulated ranks (any >= 1; ranks beyond the query blocks are idle).
    strategy : str
        ``"zigzag"`` (default) or ``"contiguous"``.
    combine : str
        ``"gather"`` (default) or ``"merge"``.
    backend : str or object
        ``"reference"`` (default), ``"cupy"`` (all ranks on the one GPU, in turn), ``"numpy"``
        or a backend object: see :func:`context_parallel_attention`.
    timings : list, optional
        Stage path: one dict per rank is appended, its local steps' seconds.
    timeout_s : float

    Returns
    -------
    DistributedResult
        Comparable with ``unisparse_attention(q, k, v, config, backend="numpy",
        return_details=True)``, plus the plan and the bytes every rank moved.
    """
    config = check_config(config)
    on_device = any(type(x).__module__.split(".")[0] == "cupy" or type(x).__name__ == "BFloat16Array"
                    for x in (q, k, v))
    if not on_device:
        q, k, v = as_checked_numpy("q", q), as_checked_numpy("k", k), as_checked_numpy("v", v)
    _, Hq, Hkv, nq, nk, _ = check_qkv(q, k, k, causal=config.causal, shape_only=on_device)
    check_head_pooling(Hq, Hkv, config.c_h)
    plan = make_plan(nq, nk, config.block_size, config.causal, world_size, strategy)
    shards = shard_inputs(q, k, v, plan)
    per_rank: list[dict[str, float]] = [{} for _ in range(world_size)]
    results = run_simulated(
        lambda comm: context_parallel_attention(shards[comm.rank], plan, config, comm, combine=combine,
                                                backend=backend, timings=per_rank[comm.rank]),
        world_size, timeout_s=timeout_s,
    )
    if timings is not None:
        timings.extend(per_rank)
    return assemble(results, plan, config)


def expected_bytes(
    plan: ShardPlan,
    mask: Any,
    *,
    kv_heads: int,
    head_dim: int,
    kv_itemsize: int,
    c_k: int,
    heads_per_mask: int,
    composite_itemsize: int = 8,
) -> list[dict[str, dict[str, int]]]:
    """The payload bytes every rank sends and receives, per tag, from the formula.

    With ``W`` ranks, ``B`` batch, ``Hkv`` KV heads, ``D`` head dim, ``K_r`` the key blocks of
    rank ``r``, ``C_j`` the composite keys of key block ``j``, ``len_j`` its tokens and
    ``need_r[b, h, j]`` = some query block of rank ``r`` selected ``j`` for a mask head of KV head
    ``h`` (read from the one-device ``mask``), the bytes *received* by rank ``r`` are

    * meta: ``320 (W - 1)``
    * composite_keys: ``B Hkv D e_c (C - sum_{j in K_r} C_j)`` (``e_c = 8``: float64)
    * requests: ``(W - 1) B Hkv nKb``
    * kv_blocks: ``2 D e_kv sum_{(b,h,j): need_r, j not in K_r} len_j``

    and sent: ``320 (W - 1)``, ``(W - 1) B Hkv D e_c sum_{j in K_r} C_j``,
    ``(W - 1) B Hkv nKb``, ``2 D e_kv sum_{d != r} sum_{(b,h,j): need_d, j in K_r} len_j``.

    Parameters
    ----------
    plan : ShardPlan
    mask : bool array or BlockMask, shape ``[B, Hm, nQb, nKb]``
        The block mask the ranks used (NumPy or CuPy).
    kv_heads, head_dim, kv_itemsize, c_k, heads_per_mask : int
        ``Hkv``, ``D``, bytes per element of K/V, ``c_k``, ``c_h``.
    composite_itemsize : int
        Bytes per element of the composite keys (8: the reference sends float64; 4: the CuPy
        stage path sends float32).

    Returns
    -------
    list of dict
        Per rank ``{"sent": {tag: bytes}, "recv": {tag: bytes}}``.
    """
    m = mask.mask if isinstance(mask, BlockMask) else mask
    on_device = type(m).__module__.split(".")[0] == "cupy"  # reduce a GPU mask on its GPU
    if not on_device:
        m = np.asarray(m, dtype=bool)
    B, Hm, _, nkb = m.shape
    W, S, nk = plan.world_size, plan.block_size, plan.nk
    Hq = Hm * heads_per_mask
    G = Hq // kv_heads
    kv_of_g = (np.arange(Hm) * heads_per_mask) // G
    C_j = geometry.composite_counts_per_block(nk, c_k, S)
    C = int(C_j.sum())
    len_j = np.minimum((np.arange(nkb) + 1) * S, nk) - np.arange(nkb) * S
    # need[r, b, h, j]
    need = np.zeros((W, B, kv_heads, nkb), dtype=bool)
    for r in range(W):
        idx = np.flatnonzero(plan.q_owner == r)
        if on_device:
            import cupy

            rows = m[:, :, cupy.asarray(idx)].any(axis=2).get()  # [B, Hm, nKb]
        else:
            rows = m[:, :, idx].any(axis=2)
        for h in range(kv_heads):
            need[r, :, h] = rows[:, kv_of_g == h].any(axis=1)
    owner = plan.k_owner
    out = []
    for r in range(W):
        own = owner == r
        C_r = int(C_j[own].sum())
        recv_kv = int((need[r] & ~own[None, None, :]).sum(axis=(0, 1)) @ len_j)
        sent_kv = sum(int((need[d] & own[None, None, :]).sum(axis=(0, 1)) @ len_j) for d in range(W) if d != r)
        out.append({
            "recv": {
                "meta": _META_BYTES * (W - 1),
                "composite_keys": B * kv_heads * head_dim * composite_itemsize * (C - C_r),
                "requests": (W - 1) * B * kv_heads * nkb,
                "kv_blocks": 2 * head_dim * kv_itemsize * recv_kv,
            },
            "sent": {
                "meta": _META_BYTES * (W - 1),
                "composite_keys": (W - 1) * B * kv_heads * head_dim * composite_itemsize * C_r,
                "requests": (W - 1) * B * kv_heads * nkb,
                "kv_blocks": 2 * head_dim * kv_itemsize * sent_kv,
            },
        })
    return out
