"""Packed ragged batches (FlashAttention's ``varlen`` convention) in the reference.

A batch of sequences of different lengths is packed along the token axis:
``q [total_q, Hq, D]``, ``k``/``v [total_k, Hkv, D]``; sequence ``i`` is
``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` (``N_q,i`` queries) against
``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]`` (``N_k,i`` keys). Each sequence is one UniSparse
problem of its own (SPEC sections 1 to 6 with ``B = 1``): its own bottom-right causal
alignment ``p(t) = t + N_k,i - N_q,i``, composite tokens, scores, selection and block mask.
Nothing crosses a sequence boundary.

The stages, packed (``Hm = Hq / c_h``; ``R_i = ceil(N_q,i / c_q)``, ``C_i = ceil(N_k,i / c_k)``,
``nQb_i = ceil(N_q,i / S)``, ``nKb_i = ceil(N_k,i / S)``; offsets from
:func:`unisparse_ref._arrays.packed_offsets`):

* :func:`compress_varlen`: ``q_c [sum R_i, Hm, D]``, ``k_c [sum C_i, Hkv, D]`` (float64);
* :func:`block_scores_varlen`: ``scores [Hm, total_qb, W]`` float64, ``total_qb = sum nQb_i``,
  ``W = max(1, max_i nKb_i)``, zero past ``nKb_i``;
* :func:`select_blocks_varlen`: ``kv_counts [Hm, total_qb]``, ``kv_indices [Hm, total_qb, W]``
  int32, the packed index form (ascending, ``-1``-padded, block indices local to the sequence);
* :func:`block_sparse_attention_varlen`: ``out [total_q, Hq, D]``, ``lse`` float32 ``[Hq, total_q]``.

Row ``cu_qblocks[i] + qi`` of the packed scores and masks is query block ``qi`` of sequence
``i`` (``cu_qblocks = packed_offsets(cu_seqlens_q, S)``).

Edge semantics (checked by :func:`unisparse_ref._arrays.check_varlen_qkv`):

* a sequence may be empty of queries (``N_q,i = 0``): it contributes no output row, no
  composite query and no mask row; its keys (possibly none) are still pooled;
* a sequence with queries needs at least one key (``N_k,i >= 1``, SPEC section 1), and
  ``N_q,i <= N_k,i`` when causal; otherwise ``ValueError`` naming the sequence;
* ``cu_seqlens`` must be integer, start at 0, never decrease and end at the packed length.

This is the oracle, so it simply loops over the sequences and runs the batch reference on
each (a ``[1, H, N_i, D]`` view): the varlen result equals the per-sequence calls bit for
bit. Every stage function takes ``stage=``, the batch function it runs on each sequence; the
top-level :func:`unisparse_ref.unisparse_attention_varlen` passes a backend's own stage
methods there when the backend has no varlen version of a stage (one launch per sequence).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import geometry
from .._arrays import (
    as_checked_numpy,
    check_config,
    check_cu_seqlens,
    check_head_pooling,
    check_no_packed_sinks,
    check_packed_mask,
    check_varlen_lengths,
    check_varlen_qkv,
    packed_offsets,
    to_numpy,
)
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from .attention import block_sparse_attention
from .pooling import compress, pool_heads, pool_sequence
from .scores import block_scores
from .selection import select_blocks

__all__ = [
    "sequence_view",
    "pack_sequences",
    "compress_varlen",
    "compress_queries_varlen",
    "block_scores_varlen",
    "select_blocks_varlen",
    "block_sparse_attention_varlen",
    "block_mask_of_sequence",
    "pack_block_masks",
]


def sequence_view(x: Any, cu: np.ndarray, i: int) -> Any:
    """Sequence ``i`` of a packed ``x [total, H, D]`` as a ``[1, H, N_i, D]`` view (no copy).

    ``x`` is any array with slicing and ``swapaxes`` (NumPy, CuPy, PyTorch).
    """
    return x[int(cu[i]) : int(cu[i + 1])].swapaxes(0, 1)[None]


def pack_sequences(parts: list[np.ndarray], heads: int, dim: int) -> np.ndarray:
    """Inverse of :func:`sequence_view`: ``[1, H, N_i, D]`` parts -> float64 ``[sum N_i, H, D]``."""
    rows = [np.asarray(p[0], dtype=np.float64).swapaxes(0, 1) for p in parts]
    if not rows:
        return np.zeros((0, heads, dim))
    return np.concatenate(rows, axis=0)


def _lengths(cu: np.ndarray) -> np.ndarray:
    return np.diff(np.asarray(cu, dtype=np.int64))


def _last(cu: Any) -> int:
    """The last entry of an offsets array (what its packed array's length must be), 0 if none."""
    a = np.asarray(to_numpy(cu) if hasattr(cu, "shape") else cu)
    return int(a.reshape(-1)[-1]) if a.size and a.dtype.kind in "iu" else 0


def _checked_cu(cu_seqlens_q: Any, cu_seqlens_k: Any, total_q: int | None, total_k: int | None, causal: bool):
    """Both offsets checked (against the packed lengths, or only for consistency when ``None``)."""
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, _last(cu_seqlens_q) if total_q is None else total_q)
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, _last(cu_seqlens_k) if total_k is None else total_k)
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q has {cu_q.size} entries but cu_seqlens_k has {cu_k.size}")
    check_varlen_lengths(cu_q, _lengths(cu_k), causal)
    return cu_q, cu_k


# ---------------------------------------------------------------------------------- stage 1
def compress_varlen(
    q: Any, k: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, config: UniSparseConfig | None = None,
    *, stage: Callable[..., Any] = compress,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite tokens of every sequence (SPEC section 3), packed.

    Parameters
    ----------
    q : array, shape ``[total_q, Hq, D]``
    k : array, shape ``[total_k, Hkv, D]``
    cu_seqlens_q, cu_seqlens_k : int array, shape ``[batch + 1]``
    config : UniSparseConfig, optional
    stage : callable
        ``stage(q_i [1,Hq,N_q,i,D], k_i [1,Hkv,N_k,i,D], config) -> (q_c_i, k_c_i)``, run on
        every sequence (default: the reference's :func:`~unisparse_ref.reference.pooling.compress`). A sequence
        without queries but with keys is run with one zero query, whose composite token is
        dropped (its keys are still pooled).

    Returns
    -------
    q_c : float64, shape ``[sum R_i, Hm, D]``
        Sequence ``i``'s composite queries at rows ``packed_offsets(cu_seqlens_q, c_q)[i]...``.
    k_c : float64, shape ``[sum C_i, Hkv, D]``
        Sequence ``i``'s composite keys at rows ``packed_offsets(cu_seqlens_k, c_k)[i]...``.
    """
    config = check_config(config)
    check_no_packed_sinks(config, "compress_varlen")
    cu_q, cu_k, Hq, Hkv, D = check_varlen_qkv(q, k, k, cu_seqlens_q, cu_seqlens_k, causal=config.causal,
                                               shape_only=True)
    check_head_pooling(Hq, Hkv, config.c_h)
    q_parts, k_parts = [], []
    for i in range(cu_q.size - 1):
        nq, nk = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
        if nk == 0:  # then nq == 0 too (checked): nothing to pool
            continue
        k_i = sequence_view(k, cu_k, i)
        if nq > 0:
            q_c_i, k_c_i = stage(sequence_view(q, cu_q, i), k_i, config)
            q_parts.append(to_numpy(q_c_i))
        else:
            placeholder = np.zeros((1, Hq, 1, D), dtype=np.dtype(q.dtype))
            _, k_c_i = stage(placeholder, k_i, config)
        k_parts.append(to_numpy(k_c_i))
    return pack_sequences(q_parts, Hq // config.c_h, D), pack_sequences(k_parts, Hkv, D)


def compress_queries_varlen(
    q: Any, cu_seqlens_q: Any, config: UniSparseConfig | None = None, *, num_kv_heads: int | None = None,
    stage: Callable[..., Any] | None = None,
) -> np.ndarray:
    """Composite queries only, packed ``[sum R_i, Hm, D]`` float64 (the keys' come from a cache).

    Parameters
    ----------
    q : array, shape ``[total_q, Hq, D]``
    cu_seqlens_q : int array, shape ``[batch + 1]``
    num_kv_heads : int, optional
        ``Hkv``, to check ``c_h`` against the GQA group (and for ``stage``).
    stage : callable, optional
        ``None`` (default): the reference's :func:`~unisparse_ref.reference.pooling.pool_sequence` and
        :func:`~unisparse_ref.reference.pooling.pool_heads`. Otherwise a batch ``compress(q_i, k_i, config)``, run
        with ``N_q,i`` zero keys of ``num_kv_heads`` heads whose composite keys are dropped.
    """
    config = check_config(config)
    if not hasattr(q, "shape") or len(q.shape) != 3:
        raise ValueError(f"q must have rank 3 [total_q, Hq, D], got {getattr(q, 'shape', type(q))}")
    total_q, Hq, D = (int(s) for s in q.shape)
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
    Hkv = Hq if num_kv_heads is None else int(num_kv_heads)
    if Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv}")
    check_head_pooling(Hq, Hkv, config.c_h)
    if stage is None:
        q = as_checked_numpy("q", q)
    parts = []
    for i in range(cu_q.size - 1):
        nq = int(cu_q[i + 1] - cu_q[i])
        if nq == 0:
            continue
        q_i = sequence_view(q, cu_q, i)
        if stage is None:
            parts.append(pool_heads(pool_sequence(q_i, config.c_q), config.c_h))
        else:
            zeros = np.zeros((1, Hkv, nq, D), dtype=np.dtype(q.dtype))
            parts.append(to_numpy(stage(q_i, zeros, config)[0]))
    return pack_sequences(parts, Hq // config.c_h, D)


# ---------------------------------------------------------------------------------- stage 2
def block_scores_varlen(
    q_c: Any, k_c: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, config: UniSparseConfig | None = None,
    *, stage: Callable[..., Any] = block_scores,
) -> np.ndarray:
    """Block scores of every sequence (SPEC section 4), packed.

    Parameters
    ----------
    q_c : array, shape ``[sum R_i, Hm, D]``
    k_c : array, shape ``[sum C_i, Hkv, D]``
        As :func:`compress_varlen` returns them (or the composite keys of a paged cache,
        :meth:`~unisparse_ref.reference.paged.PagedKVCache.packed_composite_keys`).
    cu_seqlens_q, cu_seqlens_k : int array, shape ``[batch + 1]``
        The token offsets (the composite offsets follow from them and ``c_q``, ``c_k``).
    stage : callable
        ``stage(q_c_i [1,Hm,R_i,D], k_c_i [1,Hkv,C_i,D], config, N_q,i, N_k,i)``, run on every
        sequence with queries (default: the reference's :func:`~unisparse_ref.reference.scores.block_scores`).

    Returns
    -------
    numpy.ndarray of float64, shape ``[Hm, total_qb, W]``
        Row ``cu_qblocks[i] + qi`` holds sequence ``i``'s scores ``[nKb_i]`` then zeros;
        ``W = max(1, max_i nKb_i)``.
    """
    config = check_config(config)
    check_no_packed_sinks(config, "block_scores_varlen")
    q_c = np.asarray(to_numpy(q_c), dtype=np.float64)
    k_c = np.asarray(to_numpy(k_c), dtype=np.float64)
    if q_c.ndim != 3 or k_c.ndim != 3:
        raise ValueError(f"q_c and k_c must have rank 3 (packed), got {q_c.shape} and {k_c.shape}")
    cu_q, cu_k = _checked_cu(cu_seqlens_q, cu_seqlens_k, None, None, config.causal)
    cu_r, cu_c = packed_offsets(cu_q, config.c_q), packed_offsets(cu_k, config.c_k)
    if q_c.shape[0] != cu_r[-1] or k_c.shape[0] != cu_c[-1]:
        raise ValueError(
            f"q_c has {q_c.shape[0]} composite queries and k_c {k_c.shape[0]} composite keys; the offsets "
            f"need {int(cu_r[-1])} and {int(cu_c[-1])}"
        )
    S = config.block_size
    cu_qb = packed_offsets(cu_q, S)
    W = max(1, int(geometry.num_blocks(int(_lengths(cu_k).max(initial=0)), S)))
    out = np.zeros((q_c.shape[1], int(cu_qb[-1]), W))
    for i in range(cu_q.size - 1):
        nq, nk = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
        if nq == 0:
            continue
        s = to_numpy(stage(sequence_view(q_c, cu_r, i), sequence_view(k_c, cu_c, i), config, nq, nk))
        out[:, cu_qb[i] : cu_qb[i + 1], : s.shape[-1]] = s[0]
    return out


# ---------------------------------------------------------------------------------- stage 3
def pack_block_masks(
    masks: list[BlockMask | None], cu_seqlens_q: np.ndarray, cu_seqlens_k: np.ndarray, block_size: int,
    num_mask_heads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence masks (``B = 1``; ``None`` for a sequence without queries) -> the packed index form.

    Returns ``kv_counts [Hm, total_qb]`` and ``kv_indices [Hm, total_qb, W]`` (int32).
    """
    cu_qb = packed_offsets(cu_seqlens_q, block_size)
    W = max(1, int(geometry.num_blocks(int(_lengths(cu_seqlens_k).max(initial=0)), block_size)))
    counts = np.zeros((num_mask_heads, int(cu_qb[-1])), dtype=np.int32)
    indices = np.full((num_mask_heads, int(cu_qb[-1]), W), -1, dtype=np.int32)
    for i, bm in enumerate(masks):
        if bm is None:
            continue
        c, idx = bm.numpy().to_indices()
        counts[:, cu_qb[i] : cu_qb[i + 1]] = c[0]
        indices[:, cu_qb[i] : cu_qb[i + 1], : idx.shape[-1]] = idx[0]
    return counts, indices


def block_mask_of_sequence(
    kv_counts: Any, kv_indices: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, i: int, config: UniSparseConfig,
) -> BlockMask | None:
    """Sequence ``i``'s :class:`~unisparse_ref.BlockMask` (``B = 1``) from the packed form; ``None`` without queries."""
    cu_q = np.asarray(to_numpy(cu_seqlens_q), dtype=np.int64)
    cu_k = np.asarray(to_numpy(cu_seqlens_k), dtype=np.int64)
    nq, nk = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
    if nq == 0:
        return None
    S = config.block_size
    cu_qb = packed_offsets(cu_q, S)
    rows = slice(int(cu_qb[i]), int(cu_qb[i + 1]))
    nkb = geometry.num_blocks(nk, S)
    counts = to_numpy(kv_counts)[None, :, rows]
    indices = to_numpy(kv_indices)[None, :, rows, :nkb]
    return BlockMask.from_indices(counts, indices, block_size=S, nq=nq, nk=nk, heads_per_mask=config.c_h,
                                  causal=config.causal)


def select_blocks_varlen(
    scores: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, config: UniSparseConfig | None = None,
    *, stage: Callable[..., Any] = select_blocks,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-P selection of every sequence (SPEC section 5), in the packed index form.

    Parameters
    ----------
    scores : array, shape ``[Hm, total_qb, W]``
        As :func:`block_scores_varlen` returns them (entries past ``nKb_i`` are not read).
    cu_seqlens_q, cu_seqlens_k : int array, shape ``[batch + 1]``
    stage : callable
        ``stage(scores_i [1,Hm,nQb_i,nKb_i], config, N_q,i, N_k,i) -> BlockMask``, run on every
        sequence with queries (default: the reference's :func:`~unisparse_ref.reference.selection.select_blocks`).

    Returns
    -------
    kv_counts : int32, shape ``[Hm, total_qb]``
    kv_indices : int32, shape ``[Hm, total_qb, W]``
        Selected key blocks of each row, ascending, local to the sequence, ``-1``-padded.
    """
    config = check_config(config)
    s = np.asarray(to_numpy(scores), dtype=np.float64)
    cu_q, cu_k = _checked_cu(cu_seqlens_q, cu_seqlens_k, None, None, config.causal)
    S = config.block_size
    cu_qb = packed_offsets(cu_q, S)
    if s.ndim != 3 or s.shape[1] != cu_qb[-1]:
        raise ValueError(f"scores must have shape [Hm, total_qb={int(cu_qb[-1])}, W], got {s.shape}")
    masks: list[BlockMask | None] = []
    for i in range(cu_q.size - 1):
        nq, nk = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
        if nq == 0:
            masks.append(None)
            continue
        s_i = s[None, :, cu_qb[i] : cu_qb[i + 1], : geometry.num_blocks(nk, S)]
        masks.append(stage(np.ascontiguousarray(s_i), config, nq, nk))
    return pack_block_masks(masks, cu_q, cu_k, S, s.shape[0])


# ---------------------------------------------------------------------------------- stage 4
def block_sparse_attention_varlen(
    q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, kv_counts: Any, kv_indices: Any,
    config: UniSparseConfig | None = None, *, precision: Any = None, stage: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact attention over every sequence's selected blocks (SPEC section 6), packed.

    Parameters
    ----------
    q : array, shape ``[total_q, Hq, D]``
    k, v : array, shape ``[total_k, Hkv, D]``
    cu_seqlens_q, cu_seqlens_k : int array, shape ``[batch + 1]``
    kv_counts : int array, shape ``[Hm, total_qb]``
    kv_indices : int array, shape ``[Hm, total_qb, W]``
        The packed index form (:func:`select_blocks_varlen`); the block size, ``c_h`` (mask
        head of query head ``h``: ``h // c_h``) and causality come from ``config``.
    precision : dtype, optional
        The low-precision mode of SPEC section 7 (see
        :func:`~unisparse_ref.reference.attention.block_sparse_attention`).
    stage : callable, optional
        ``stage(q_i, k_i, v_i, block_mask_i, config) -> (out_i, lse_i)``, run on every sequence
        with queries (default: the reference's :func:`~unisparse_ref.reference.attention.block_sparse_attention`).

    Returns
    -------
    out : float64 (or ``precision``), shape ``[total_q, Hq, D]``
    lse : float32, shape ``[Hq, total_q]``
        Rows with no allowed key: ``out = 0``, ``lse = -inf`` (SPEC section 6).
    """
    config = check_config(config)
    if stage is None:
        q, k, v = as_checked_numpy("q", q), as_checked_numpy("k", k), as_checked_numpy("v", v)

        def stage(q_i, k_i, v_i, bm, cfg):
            return block_sparse_attention(q_i, k_i, v_i, bm, cfg, precision=precision)

    cu_q, cu_k, Hq, Hkv, D = check_varlen_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=config.causal)
    counts, indices, _ = check_packed_mask(kv_counts, kv_indices, cu_q, _lengths(cu_k), config.block_size,
                                           Hq // config.c_h)
    total_q = int(cu_q[-1])
    out_dtype = np.float64 if precision is None else np.dtype(precision)
    out = np.zeros((total_q, Hq, D), dtype=out_dtype)
    lse = np.zeros((Hq, total_q), dtype=np.float32)
    for i in range(cu_q.size - 1):
        bm = block_mask_of_sequence(counts, indices, cu_q, cu_k, i, config)
        if bm is None:
            continue
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        o, l_ = stage(sequence_view(q, cu_q, i), sequence_view(k, cu_k, i), sequence_view(v, cu_k, i), bm, config)
        o, l_ = to_numpy(o), to_numpy(l_)
        out[rows] = o[0].swapaxes(0, 1)
        lse[:, rows] = l_[0]
    return out, lse
