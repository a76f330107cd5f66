"""Stage 4 of the reference: exact attention over the selected blocks, and dense attention
(SPEC section 6), written naively.

The block mask is expanded to a token mask and a masked softmax is taken in float64, over
chunks of query blocks so that memory stays bounded. A query row with no allowed key gives
``out = 0`` and ``lse = -inf`` (never NaN). :mod:`unisparse_ref.reference.tiled` walks the same
attention tile by tile with the online softmax, as the GPU kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import geometry
from .._arrays import as_checked_numpy, check_config, check_dtype, check_mask_against, check_qkv, to_numpy
from ..blockmask import BlockMask
from ..config import UniSparseConfig

__all__ = ["block_sparse_attention", "dense_attention", "expand_block_mask"]

#: Elements of one float64 logits chunk ``[B, Hq, rows, keys]`` (128 MiB): memory stays
#: bounded because scoring and attention run over chunks of rows.
_CHUNK_ELEMENTS = 1 << 24


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
    config = check_config(config)
    q, k, v = as_checked_numpy("q", q), as_checked_numpy("k", k), as_checked_numpy("v", v)
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, causal=block_mask.causal)
    check_mask_against(block_mask, B, Hq, Hkv, Nq, Nk, config)
    return _attention(
        q, k, v, config.scale_for(D), lambda rows: expand_block_mask(block_mask, Hq, rows),
        block_mask.block_size, block_mask.causal, precision, query_blocks,
    )


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
    q, k, v = as_checked_numpy("q", q), as_checked_numpy("k", k), as_checked_numpy("v", v)
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, causal=causal)
    scale = UniSparseConfig(softmax_scale=softmax_scale).scale_for(D)

    def allowed(rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(geometry.token_causal_mask(rows, Nq, Nk, causal), (B, Hq, rows.size, Nk))

    return _attention(q, k, v, scale, allowed, block_size, causal, precision, query_blocks)
