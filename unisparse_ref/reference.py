"""The NumPy reference of the whole UniSparse pipeline: the correctness oracle.

Deliberately naive and readable. Every stage computes in float64 whatever the input dtype
(float16, bfloat16 through ``ml_dtypes``, float32, float64) and follows ``SPEC.md`` line by
line. No online softmax, no clever indexing: the block-sparse attention expands the block
mask to a token mask and runs a masked softmax (:mod:`unisparse_ref.tiled` has the
FlashAttention-style walk, written for teaching and tested against this).

Notation (see the docs' notation table): ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value
heads, ``G = Hq // Hkv``, ``Hm = Hq // c_h`` composite (mask) heads, ``Nq``/``Nk`` lengths,
``D`` head dim, ``S`` block size, ``R = ceil(Nq/c_q)``, ``C = ceil(Nk/c_k)``,
``nQb = ceil(Nq/S)``, ``nKb = ceil(Nk/S)``.

Edge semantics: a query row with no allowed key gives ``out = 0`` and ``lse = -inf``
(never NaN). Memory stays bounded: attention and scoring run over chunks of query blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import geometry
from ._arrays import (
    check_composite_shapes,
    check_dtype,
    check_finite,
    check_head_pooling,
    check_qkv,
    to_numpy,
)
from .blockmask import BlockMask
from .config import UniSparseConfig

__all__ = [
    "pool_sequence",
    "pool_heads",
    "compress",
    "block_scores",
    "select_blocks",
    "selection_margin",
    "block_sparse_attention",
    "dense_attention",
    "expand_block_mask",
    "kv_head_of_mask_head",
]

#: Elements of one float64 logits chunk ``[B, Hq, rows, keys]`` (128 MiB).
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------- helpers
def _as_input(name: str, x: Any) -> np.ndarray:
    """``x`` as a NumPy array of a supported dtype, checked for NaN and infinity."""
    a = to_numpy(x)
    check_dtype(name, a.dtype)
    check_finite(name, a)
    return a


def _check_config(config: UniSparseConfig | None) -> UniSparseConfig:
    if config is None:
        return UniSparseConfig()
    if not isinstance(config, UniSparseConfig):
        raise TypeError(f"config must be a UniSparseConfig, got {type(config)!r}")
    return config


def kv_head_of_mask_head(num_mask_heads: int, c_h: int, group_size: int) -> np.ndarray:
    """KV head of every composite head ``g``: ``(g * c_h) // G``, int64 ``[Hm]``."""
    return (np.arange(num_mask_heads, dtype=np.int64) * c_h) // group_size


# ---------------------------------------------------------------------------- stage 1
def pool_sequence(x: np.ndarray, c: int) -> np.ndarray:
    """Average-pool groups of ``c`` consecutive tokens (SPEC section 3).

    Parameters
    ----------
    x : array, shape ``[B, H, N, D]``
    c : int
        Pooling factor.

    Returns
    -------
    numpy.ndarray of float64, shape ``[B, H, ceil(N/c), D]``
        ``out[b, h, r] = mean(x[b, h, t] for t in [r*c, min((r+1)*c, N)))``: the last group
        averages only the tokens that exist.
    """
    x = np.asarray(x, dtype=np.float64)
    B, H, N, D = x.shape
    groups = geometry.cdiv(N, c)
    padded = np.zeros((B, H, groups * c, D), dtype=np.float64)
    padded[:, :, :N] = x
    sums = padded.reshape(B, H, groups, c, D).sum(axis=3)
    counts = np.full(groups, c, dtype=np.float64)
    counts[-1] = N - (groups - 1) * c
    return sums / counts[None, None, :, None]


def pool_heads(x: np.ndarray, c_h: int) -> np.ndarray:
    """Average groups of ``c_h`` consecutive heads: ``[B, H, R, D] -> [B, H/c_h, R, D]``."""
    x = np.asarray(x, dtype=np.float64)
    B, H, R, D = x.shape
    if H % c_h != 0:
        raise ValueError(f"c_h={c_h} must divide the number of heads {H}")
    return x.reshape(B, H // c_h, c_h, R, D).mean(axis=2)


def compress(q: Any, k: Any, config: UniSparseConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Composite tokens: pool queries over ``c_q`` tokens and ``c_h`` heads, keys over ``c_k``.

    Parameters
    ----------
    q : array, shape ``[B, Hq, Nq, D]``
    k : array, shape ``[B, Hkv, Nk, D]``
    config : UniSparseConfig, optional

    Returns
    -------
    q_c : float64, shape ``[B, Hq/c_h, R, D]``
        ``Qh[b, g, r]``, sequence pooling then head pooling (both means; they commute).
    k_c : float64, shape ``[B, Hkv, C, D]``
        ``Kc[b, h, c]``; keys are never pooled across heads.
    """
    config = _check_config(config)
    q, k = _as_input("q", q), _as_input("k", k)
    _, Hq, Hkv, _, _, _ = check_qkv(q, k, k, causal=config.causal)
    check_head_pooling(Hq, Hkv, config.c_h)
    q_c = pool_heads(pool_sequence(q, config.c_q), config.c_h)
    k_c = pool_sequence(k, config.c_k)
    return q_c, k_c


# ---------------------------------------------------------------------------- stage 2
def _check_composite(q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> tuple[np.ndarray, np.ndarray]:
    q_c = np.asarray(to_numpy(q_c), dtype=np.float64)
    k_c = np.asarray(to_numpy(k_c), dtype=np.float64)
    check_composite_shapes(q_c, k_c, config, nq, nk)
    return q_c, k_c


def block_scores(
    q_c: Any, k_c: Any, config: UniSparseConfig | None, nq: int, nk: int
) -> np.ndarray:
    """Block importance scores from composite tokens (SPEC section 4).

    ``A[r, :] = softmax(scale * Qh[r] . Kc[c])`` over the composite keys visible to ``r``
    (a global softmax over the whole compressed row), then
    ``scores[i, j] = (1/R_i) * sum(A[r, c] for r in query block i, c in key block j)``.

    Parameters
    ----------
    q_c : array, shape ``[B, Hm, R, D]``
    k_c : array, shape ``[B, Hkv, C, D]``
    config : UniSparseConfig
    nq, nk : int
        The original lengths (positions and visibility depend on them).

    Returns
    -------
    numpy.ndarray of float64, shape ``[B, Hm, nQb, nKb]``
        Each row sums to 1; blocks no composite query of the row sees are 0.
    """
    config = _check_config(config)
    q_c, k_c = _check_composite(q_c, k_c, config, nq, nk)
    B, Hm, R, D = q_c.shape
    Hkv, C = k_c.shape[1], k_c.shape[2]
    G = Hm * config.c_h // Hkv
    S = config.block_size
    scale = config.scale_for(D)
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    kv = kv_head_of_mask_head(Hm, config.c_h, G)
    k_heads = k_c[:, kv]  # [B, Hm, C, D], composite head g reads KV head (g*c_h)//G
    visible = geometry.composite_visibility(nq, nk, config.c_q, config.c_k, config.causal)
    q_block_of_r = (np.arange(R) * config.c_q) // S
    k_block_of_c = (np.arange(C) * config.c_k) // S
    r_per_block = geometry.composite_counts_per_block(nq, config.c_q, S).astype(np.float64)

    # One-hot [C, nKb] matrix that sums composite columns into key blocks.
    col_to_block = np.zeros((C, nkb))
    col_to_block[np.arange(C), k_block_of_c] = 1.0

    scores = np.zeros((B, Hm, nqb, nkb), dtype=np.float64)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hm * C))
    for r0 in range(0, R, rows_per_chunk):
        r1 = min(R, r0 + rows_per_chunk)
        logits = scale * (q_c[:, :, r0:r1] @ np.swapaxes(k_heads, -1, -2))  # [B, Hm, rows, C]
        logits = np.where(visible[r0:r1], logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)  # every row sees composite key 0
        A = np.exp(logits)
        A /= A.sum(axis=-1, keepdims=True)
        per_block = A @ col_to_block  # [B, Hm, rows, nKb]: sum over c in key block j
        # sum over r in query block i (unbuffered add: several rows share a block)
        np.add.at(scores, (slice(None), slice(None), q_block_of_r[r0:r1]), per_block)
    return scores / r_per_block[None, None, :, None]


# ---------------------------------------------------------------------------- stage 3
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


def _check_scores(scores: Any) -> np.ndarray:
    s = np.asarray(to_numpy(scores), dtype=np.float64)
    if s.ndim != 4:
        raise ValueError(f"scores must have rank 4 [B, Hm, nQb, nKb], got shape {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("scores must be finite and non-negative")
    return s


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
    config = _check_config(config)
    s = _check_scores(scores)
    mask, _ = _selection(s, config, nq, nk)
    return BlockMask(mask, config.block_size, config.c_h, nq, nk, config.causal)


def selection_margin(scores: Any, config: UniSparseConfig | None, nq: int, nk: int) -> np.ndarray:
    """How close each row's selection is to flipping, float64 ``[B, Hm, nQb]``.

    The smaller of ``|m_before - P|`` (the mass before the last block taken) and
    ``|m_after - P|`` (where the loop stopped); ``inf`` when nothing could flip (``P = 1``).
    SPEC section 7 calls a row *borderline* when this is at most ``1e-6``.
    """
    config = _check_config(config)
    _, margin = _selection(_check_scores(scores), config, nq, nk)
    return margin


# ---------------------------------------------------------------------------- stage 4
def expand_block_mask(block_mask: BlockMask, num_q_heads: int, rows: np.ndarray) -> np.ndarray:
    """Token mask of the query ``rows`` (block mask and, if causal, ``s <= p(t)``).

    Returns
    -------
    numpy.ndarray of bool, shape ``[B, Hq, len(rows), Nk]``
    """
    S = block_mask.block_size
    m = to_numpy(block_mask.mask)
    heads = np.arange(num_q_heads) // block_mask.heads_per_mask  # query head h -> mask head
    per_row = m[:, heads][:, :, np.asarray(rows) // S]  # [B, Hq, rows, nKb]
    tokens = np.repeat(per_row, S, axis=-1)[..., : block_mask.nk]
    causal = geometry.token_causal_mask(rows, block_mask.nq, block_mask.nk, block_mask.causal)
    return tokens & causal


def _attend(
    q_rows: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    allowed: np.ndarray,
    scale: float,
    precision: np.dtype | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Masked softmax attention of a chunk of rows.

    ``q_rows`` ``[B, Hq, rows, D]``, ``k``/``v`` ``[B, Hkv, n, D]`` (already float64, or
    float32 in the low-precision mode), ``allowed`` bool
    ``[B, Hq, rows, n]``. ``precision=None``: float64. Otherwise the kernel rounding of
    SPEC section 7: inputs already rounded, float32 logits and sums, probabilities rounded
    to ``precision`` before the product with V, output rounded to ``precision``.
    """
    B, Hq, rows, D = q_rows.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    work = np.float64 if precision is None else np.float32
    q5 = q_rows.astype(work).reshape(B, Hkv, G, rows, D)  # query head h = kv*G + g uses KV head kv
    logits = scale * (q5 @ np.swapaxes(k, -1, -2)[:, :, None])  # [B, Hkv, G, rows, n]
    logits = logits.reshape(B, Hq, rows, -1).astype(work)
    logits = np.where(allowed, logits, -np.inf)
    m = logits.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)  # rows with no allowed key
    m = np.where(empty, 0.0, m).astype(work)
    p = np.exp(logits - m)  # exp(-inf) = 0 for masked keys
    denom = p.sum(axis=-1, keepdims=True, dtype=work)
    if precision is not None:
        p = p.astype(precision).astype(np.float32)  # P rounded like a kernel before P @ V
    pv = (p.reshape(B, Hkv, G, rows, -1) @ v[:, :, None]).reshape(B, Hq, rows, D)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(empty, 0.0, pv / np.where(empty, 1.0, denom))
        lse = np.where(empty[..., 0], -np.inf, m[..., 0] + np.log(np.where(empty[..., 0], 1.0, denom[..., 0])))
    if precision is not None:
        out = out.astype(precision)
    return out, lse.astype(np.float32)


def _attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    allowed_fn: Any,
    block_size: int,
    causal: bool,
    precision: Any,
    query_blocks: Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Chunked driver: run :func:`_attend` over groups of query blocks."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    prec = None if precision is None else check_dtype("precision", precision)
    if prec is not None:  # q, k, v rounded to the kernel's dtype
        q, k, v = (x.astype(prec) for x in (q, k, v))
    work = np.float64 if prec is None else np.float32
    k, v = k.astype(work), v.astype(work)  # converted once, not per chunk
    nqb = geometry.num_blocks(Nq, block_size)
    blocks = np.arange(nqb) if query_blocks is None else np.asarray(query_blocks, dtype=np.int64)
    if blocks.ndim != 1 or (blocks < 0).any() or (blocks >= nqb).any():
        raise ValueError(f"query_blocks must be indices in [0, {nqb}), got {query_blocks!r}")
    rows_all = [np.arange(i * block_size, min((i + 1) * block_size, Nq)) for i in blocks]
    out_dtype = np.float64 if prec is None else prec
    out = np.zeros((B, Hq, sum(r.size for r in rows_all), D), dtype=out_dtype)
    lse = np.zeros((B, Hq, out.shape[2]), dtype=np.float32)
    # Chunks: groups of query blocks, and when one block of all heads is still too large
    # (long sequences), groups of KV heads (each with its G query heads).
    per_block_and_kv_head = B * G * block_size * Nk
    kv_per_chunk = int(min(Hkv, max(1, _CHUNK_ELEMENTS // max(1, per_block_and_kv_head))))
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, per_block_and_kv_head * kv_per_chunk))
    pos = 0
    for c0 in range(0, len(rows_all), blocks_per_chunk):
        rows = np.concatenate(rows_all[c0 : c0 + blocks_per_chunk])
        # Keys past the chunk's last position are never visible when causal: skip them.
        n = Nk if not causal else int(rows.max()) + (Nk - Nq) + 1
        allowed = allowed_fn(rows)[..., :n]
        for h0 in range(0, Hkv, kv_per_chunk):
            kvs = slice(h0, min(Hkv, h0 + kv_per_chunk))
            qs = slice(kvs.start * G, kvs.stop * G)
            o, l_ = _attend(q[:, qs][:, :, rows], k[:, kvs, :n], v[:, kvs, :n], allowed[:, qs], scale, prec)
            out[:, qs, pos : pos + rows.size] = o
            lse[:, qs, pos : pos + rows.size] = l_
        pos += rows.size
    return out, lse


def block_sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    block_mask: BlockMask,
    config: UniSparseConfig | None = None,
    *,
    precision: Any = None,
    query_blocks: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact attention over the selected blocks (SPEC section 6), written naively.

    Query ``t`` in block ``i`` attends key ``s`` iff block ``s // S`` is selected for
    ``(b, h // c_h, i)`` and, when causal, ``s <= p(t)``. The block mask is expanded to a token
    mask and a masked softmax is taken, in chunks of query blocks.

    Parameters
    ----------
    q : array, shape ``[B, Hq, Nq, D]``
    k, v : array, shape ``[B, Hkv, Nk, D]``
    block_mask : BlockMask
        ``mask`` ``[B, Hq/c_h, nQb, nKb]``; its ``block_size``, ``nq``, ``nk`` and ``causal``
        must match the inputs and ``config``.
    config : UniSparseConfig, optional
        Supplies ``softmax_scale`` (``None``: ``1/sqrt(D)``).
    precision : dtype, optional
        ``None`` (default): float64 throughout, the oracle. A dtype (``float16``,
        ``bfloat16``, ``float32``): the *low-precision mode* of SPEC section 7 that rounds like
        a kernel, whose error sets the tolerance of kernels of that dtype.
    query_blocks : sequence of int, optional
        Compute only these query blocks; their rows come back concatenated in this order.

    Returns
    -------
    out : float64 (or ``precision``), shape ``[B, Hq, Nq, D]``
    lse : float32, shape ``[B, Hq, Nq]``
        Natural log of the softmax denominator. Rows with no allowed key: ``out = 0``,
        ``lse = -inf``.
    """
    config = _check_config(config)
    q, k, v = _as_input("q", q), _as_input("k", k), _as_input("v", v)
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, causal=block_mask.causal)
    _check_mask_against(block_mask, B, Hq, Hkv, Nq, Nk, config)
    return _attention(
        q, k, v, config.scale_for(D), lambda rows: expand_block_mask(block_mask, Hq, rows),
        block_mask.block_size, block_mask.causal, precision, query_blocks,
    )


def _check_mask_against(bm: BlockMask, B: int, Hq: int, Hkv: int, Nq: int, Nk: int, config: UniSparseConfig) -> None:
    if not isinstance(bm, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask, got {type(bm)!r}")
    if (bm.nq, bm.nk) != (Nq, Nk):
        raise ValueError(f"block_mask is for nq={bm.nq}, nk={bm.nk} but the inputs have Nq={Nq}, Nk={Nk}")
    if bm.block_size != config.block_size:
        raise ValueError(f"block_mask.block_size={bm.block_size} differs from config.block_size={config.block_size}")
    if bm.causal != config.causal:
        raise ValueError(f"block_mask.causal={bm.causal} differs from config.causal={config.causal}")
    if Hq % bm.heads_per_mask != 0 or bm.mask.shape[1] != Hq // bm.heads_per_mask:
        raise ValueError(
            f"block_mask has {bm.mask.shape[1]} mask heads with heads_per_mask={bm.heads_per_mask}; "
            f"expected Hq/heads_per_mask = {Hq}/{bm.heads_per_mask}"
        )
    if bm.mask.shape[0] != B:
        raise ValueError(f"block_mask has batch {bm.mask.shape[0]} but q has batch {B}")


def dense_attention(
    q: Any,
    k: Any,
    v: Any,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    precision: Any = None,
    query_blocks: Sequence[int] | None = None,
    block_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense (optionally causal, bottom-right aligned) softmax attention, computed directly.

    Parameters
    ----------
    q : array, shape ``[B, Hq, Nq, D]``
    k, v : array, shape ``[B, Hkv, Nk, D]``
    causal : bool
    softmax_scale : float, optional
        ``None``: ``1/sqrt(D)``.
    precision, query_blocks :
        As in :func:`block_sparse_attention` (``query_blocks`` counts blocks of
        ``block_size`` rows).

    Returns
    -------
    out : float64 (or ``precision``), shape ``[B, Hq, Nq, D]``
    lse : float32, shape ``[B, Hq, Nq]``
    """
    q, k, v = _as_input("q", q), _as_input("k", k), _as_input("v", v)
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, causal=causal)
    scale = UniSparseConfig(softmax_scale=softmax_scale).scale_for(D)

    def allowed(rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(geometry.token_causal_mask(rows, Nq, Nk, causal), (B, Hq, rows.size, Nk))

    return _attention(q, k, v, scale, allowed, block_size, causal, precision, query_blocks)
