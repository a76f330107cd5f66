"""A paged KV cache that keeps its composite keys, in the reference.

Serving engines keep keys and values in fixed-size pages (``page_size`` tokens each) and give
every sequence a *block table*, the list of its pages in order (vLLM's PagedAttention,
FlashAttention's ``block_table`` / ``seqused_k``):

.. code-block:: text

    k_pages, v_pages  [num_pages, page_size, Hkv, D]
    block_table       int32 [batch, max_pages]       (-1: no page yet)
    seqused_k         int32 [batch]                  (N_k,b: keys held for sequence b)
    key s of sequence b = k_pages[block_table[b, s // page_size], s % page_size]

UniSparse also needs the *composite keys* of the cached prefix (SPEC section 3: means of
``c_k`` consecutive keys) to score a new chunk of queries against it. :class:`PagedKVCache`
keeps them next to the pages, in the same pages, so a new chunk pools only its own keys:

.. code-block:: text

    kc_pages          float64 [num_pages, page_size // c_k, Hkv, D]
    composite key c of sequence b = kc_pages[block_table[b, c*c_k // page_size], c % (page_size // c_k)]

``c_k`` must divide ``page_size``, so a group of ``c_k`` keys never straddles two pages and a
page's composite keys depend on that page alone (pages shared by sequences with a common
prefix share their composite keys too). A partial last group holds the mean of the keys that
exist (SPEC section 3); :meth:`PagedKVCache.append` recomputes it from the cached keys when
new keys arrive, so after any sequence of appends the composite keys are *bit for bit* those
that :func:`~unisparse_ref.reference.pooling.compress` computes from the whole sequence at once.

Chunked prefill on this cache: append the chunk's keys and values, then attend with the
chunk's queries, which are the last ``N_q`` positions of the sequence (bottom-right causal,
SPEC section 1); see :func:`unisparse_ref.unisparse_attention_paged`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import geometry
from .._arrays import (
    as_checked_numpy,
    check_config,
    check_cu_seqlens,
    check_dtype,
    check_paged_kv,
    check_paged_qkv,
)
from ..config import UniSparseConfig
from ..pagetable import PageTable
from .pooling import pool_sequence
from .varlen import block_sparse_attention_varlen

__all__ = [
    "PagedKVCache",
    "gather_pages",
    "gather_composite_keys",
    "block_sparse_attention_paged",
]


def _cu_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int32)


def _slots(block_table_row: np.ndarray, positions: np.ndarray, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(page, slot) of token ``positions`` of one sequence."""
    return block_table_row[positions // page_size].astype(np.int64), positions % page_size


def gather_pages(pages: Any, block_table: Any, seqused: Any) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of every sequence, packed: ``pages [P, page_size, H, D]`` -> ``([sum N_b, H, D], cu [batch+1])``.

    Token ``s`` of sequence ``b`` is ``pages[block_table[b, s // page_size], s % page_size]``
    for ``s < seqused[b]``. The packed array keeps the pages' dtype; ``cu`` is int32.
    """
    pages = np.asarray(pages)
    table, used = check_paged_kv(pages, pages, block_table, seqused, shape_only=True)
    ps = pages.shape[1]
    parts = []
    for b in range(used.size):
        page, slot = _slots(table[b], np.arange(int(used[b])), ps)
        parts.append(pages[page, slot])
    packed = np.concatenate(parts, axis=0) if parts else np.zeros((0,) + pages.shape[2:], pages.dtype)
    return packed, _cu_of(used)


def gather_composite_keys(kc_pages: Any, block_table: Any, seqused_k: Any, c_k: int) -> np.ndarray:
    """Composite keys of every sequence, packed float64 ``[sum C_b, Hkv, D]`` (``C_b = ceil(N_k,b / c_k)``).

    Composite key ``c`` of sequence ``b`` is
    ``kc_pages[block_table[b, c*c_k // page_size], c % (page_size // c_k)]``.
    """
    kc_pages = np.asarray(kc_pages, dtype=np.float64)
    per_page = kc_pages.shape[1]
    page_size = per_page * c_k
    table = np.asarray(block_table, dtype=np.int64)
    used = np.asarray(seqused_k, dtype=np.int64)
    parts = []
    for b in range(used.size):
        c = np.arange(geometry.cdiv(int(used[b]), c_k))
        parts.append(kc_pages[table[b, (c * c_k) // page_size], c % per_page])
    if not parts:
        return np.zeros((0,) + kc_pages.shape[2:])
    return np.concatenate(parts, axis=0)


def block_sparse_attention_paged(
    q: Any, k_pages: Any, v_pages: Any, cu_seqlens_q: Any, block_table: Any, seqused_k: Any, kv_counts: Any,
    kv_indices: Any, config: UniSparseConfig | None = None, *, precision: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Block-sparse attention of a packed batch of queries against a paged KV cache (SPEC section 6).

    The reference gathers every sequence's keys and values out of the pages and runs
    :func:`~unisparse_ref.reference.varlen.block_sparse_attention_varlen`: the result is that of the contiguous
    layout, bit for bit.

    Parameters
    ----------
    q : array, shape ``[total_q, Hq, D]``
        Sequence ``b``'s queries (rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``) are the last
        ``N_q,b`` of its ``seqused_k[b]`` positions.
    k_pages, v_pages : array, shape ``[num_pages, page_size, Hkv, D]``
    cu_seqlens_q : int array, shape ``[batch + 1]``
    block_table : int array, shape ``[batch, max_pages]``
    seqused_k : int array, shape ``[batch]``
    kv_counts, kv_indices :
        The packed index form of the masks (:func:`~unisparse_ref.reference.varlen.select_blocks_varlen` with the
        key offsets ``cumsum(seqused_k)``).
    config, precision :
        As in :func:`~unisparse_ref.reference.varlen.block_sparse_attention_varlen`.

    Returns
    -------
    out : float64 (or ``precision``), shape ``[total_q, Hq, D]``
    lse : float32, shape ``[Hq, total_q]``
    """
    config = check_config(config)
    q = as_checked_numpy("q", q)
    k_pages, v_pages = as_checked_numpy("k_pages", k_pages), as_checked_numpy("v_pages", v_pages)
    _, table, used, _, _, _ = check_paged_qkv(q, k_pages, v_pages, cu_seqlens_q, block_table, seqused_k,
                                              causal=config.causal)
    k, cu_k = gather_pages(k_pages, table, used)
    v, _ = gather_pages(v_pages, table, used)
    return block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_k, kv_counts, kv_indices, config,
                                         precision=precision)


class PagedKVCache(PageTable):
    """A paged KV cache holding keys, values and the composite keys of its pages (NumPy, host).

    The host bookkeeping (rules, block table, used lengths, free pages, ``check_queries``,
    ``clear``) is :class:`~unisparse_ref.pagetable.PageTable`'s, shared with the CuPy layer's cache.

    Parameters
    ----------
    num_pages : int
        Pages in the pool.
    page_size : int
        Tokens per page; a multiple of ``c_k``.
    num_kv_heads, head_dim : int
        ``Hkv`` and ``D``.
    batch : int
        Sequences (rows of the block table).
    max_pages : int, optional
        Columns of the block table (pages one sequence may hold); default ``num_pages``.
    c_k : int
        The key pooling factor of the configuration the cache serves (SPEC section 2).
    dtype : dtype
        Of the keys and values (float16, bfloat16, float32 or float64); appended arrays must
        have it.
    page_order : sequence of int, optional
        The order in which free pages are handed out (default ascending); any permutation
        gives the same attention, which the tests use to scatter sequences over the pool.

    Attributes
    ----------
    k_pages, v_pages : ``[num_pages, page_size, Hkv, D]``
    kc_pages : float64 ``[num_pages, page_size // c_k, Hkv, D]``
    block_table : int32 ``[batch, max_pages]``, ``-1`` where no page is assigned
    seqused_k : int32 ``[batch]``

    Raises
    ------
    ValueError
        ``c_k`` not dividing ``page_size``, sizes below 1, a ``page_order`` that is not a
        permutation of the pages.
    """

    def __init__(
        self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, batch: int = 1,
        max_pages: int | None = None, c_k: int = 16, dtype: Any = np.float32, page_order: Sequence[int] | None = None,
    ) -> None:
        # The rules, the block table, the used lengths and the free pages: PageTable's.
        super().__init__(num_pages, page_size, num_kv_heads, head_dim, batch=batch, max_pages=max_pages, c_k=c_k,
                         page_order=page_order)
        self.dtype = check_dtype("dtype", dtype)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_pages = np.zeros(shape, dtype=self.dtype)
        self.v_pages = np.zeros(shape, dtype=self.dtype)
        self.kc_pages = np.zeros((num_pages, page_size // c_k, num_kv_heads, head_dim), dtype=np.float64)

    # ------------------------------------------------------------------ sizes
    @property
    def num_kv_heads(self) -> int:
        return int(self.k_pages.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.k_pages.shape[3])

    # ------------------------------------------------------------------ writing
    def append(self, k_new: Any, v_new: Any, seq: int = 0) -> None:
        """Append ``n`` keys and values ``[n, Hkv, D]`` to sequence ``seq``.

        Pages are assigned as needed. The composite keys of every group the new keys touch
        are recomputed from the cached keys, the partial last group included, with the
        reference's :func:`~unisparse_ref.reference.pooling.pool_sequence` on group-aligned keys: the same sums in
        the same order as pooling the whole sequence at once.

        Raises
        ------
        ValueError
            Wrong shapes, non-finite values, ``seq`` out of range, the block table row or the
            page pool full (nothing is written then).
        TypeError
            A dtype other than the cache's.
        """
        self._check_seq(seq)
        k_new, v_new = as_checked_numpy("k_new", k_new), as_checked_numpy("v_new", v_new)
        want = (self.num_kv_heads, self.head_dim)
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            if x.ndim != 3 or x.shape[1:] != want:
                raise ValueError(f"{name} must have shape [n, Hkv={want[0]}, D={want[1]}], got {x.shape}")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the cache holds {self.dtype}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"v_new must have the shape of k_new {k_new.shape}, got {v_new.shape}")
        n, ps, c = k_new.shape[0], self.page_size, self.c_k
        if n == 0:
            return
        L, L_new, first_new_page, pages_needed = self._pages_for(seq, n)
        row = self._assign_pages(seq, first_new_page, pages_needed)
        page, slot = _slots(row, np.arange(L, L_new), ps)
        self.k_pages[page, slot] = k_new
        self.v_pages[page, slot] = v_new
        # Composite keys of groups g0 .. g1-1: the partial group [g0*c, L) is refilled.
        g0, g1 = L // c, geometry.cdiv(L_new, c)
        page, slot = _slots(row, np.arange(g0 * c, L_new), ps)
        tokens = self.k_pages[page, slot]  # [L_new - g0*c, Hkv, D], group-aligned
        kc = pool_sequence(tokens.swapaxes(0, 1)[None], c)[0].swapaxes(0, 1)  # [g1 - g0, Hkv, D]
        groups = np.arange(g0, g1)
        kc_page, kc_slot = _slots(row, groups * c, ps)
        self.kc_pages[kc_page, kc_slot // c] = kc
        self.seqused_k[seq] = L_new

    def append_varlen(self, k_new: Any, v_new: Any, cu_seqlens: Any) -> None:
        """Append a packed batch ``[total, Hkv, D]``: sequence ``b`` gets rows ``cu_seqlens[b]:cu_seqlens[b+1]``."""
        k_new, v_new = as_checked_numpy("k_new", k_new), as_checked_numpy("v_new", v_new)
        cu = check_cu_seqlens("cu_seqlens", cu_seqlens, int(k_new.shape[0]) if k_new.ndim else -1)
        if cu.size - 1 != self.batch:
            raise ValueError(f"cu_seqlens describes {cu.size - 1} sequences, the cache holds {self.batch}")
        for b in range(self.batch):
            if cu[b + 1] > cu[b]:
                self.append(k_new[cu[b] : cu[b + 1]], v_new[cu[b] : cu[b + 1]], b)

    # ------------------------------------------------------------------ reading
    def keys(self, seq: int) -> np.ndarray:
        """Sequence ``seq``'s keys ``[N_k, Hkv, D]`` (a gathered copy)."""
        page, slot = _slots(self.block_table[seq], np.arange(int(self.seqused_k[seq])), self.page_size)
        return self.k_pages[page, slot]

    def values(self, seq: int) -> np.ndarray:
        """Sequence ``seq``'s values ``[N_k, Hkv, D]`` (a gathered copy)."""
        page, slot = _slots(self.block_table[seq], np.arange(int(self.seqused_k[seq])), self.page_size)
        return self.v_pages[page, slot]

    def composite_keys(self, seq: int) -> np.ndarray:
        """Sequence ``seq``'s composite keys, float64 ``[ceil(N_k / c_k), Hkv, D]``."""
        return gather_composite_keys(self.kc_pages, self.block_table[seq : seq + 1], self.seqused_k[seq : seq + 1],
                                     self.c_k)

    def packed_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every sequence's keys and values packed, with their offsets: ``(k, v, cu_seqlens_k)``."""
        k, cu = gather_pages(self.k_pages, self.block_table, self.seqused_k)
        v, _ = gather_pages(self.v_pages, self.block_table, self.seqused_k)
        return k, v, cu

    def packed_composite_keys(self) -> np.ndarray:
        """Every sequence's composite keys packed, float64 ``[sum C_b, Hkv, D]`` (offsets ``packed_offsets(cu_seqlens_k, c_k)``)."""
        return gather_composite_keys(self.kc_pages, self.block_table, self.seqused_k, self.c_k)

    def __repr__(self) -> str:
        return (f"PagedKVCache(pages={self.k_pages.shape[0]}, page_size={self.page_size}, c_k={self.c_k}, "
                f"batch={self.batch}, seqused_k={self.seqused_k.tolist()}, free={self.free_pages})")
