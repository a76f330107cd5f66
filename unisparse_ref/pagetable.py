"""The host bookkeeping of a paged KV cache (serving layouts, issue 16).

The reference's :class:`~unisparse_ref.reference.paged.PagedKVCache` (pages in NumPy) and the
CuPy layer's ``CupyPagedKVCache`` (pages on the device) keep the same bookkeeping on the host.
It lives here, below the layers, so that both extend one :class:`PageTable` (a layer imports
no other layer): the constructor's rules and messages, the block table ``[batch, max_pages]``
(``-1`` = no page), the used lengths ``seqused_k [batch]``, the free list in ``page_order``,
and the page assignment of an append. The pages themselves, and how keys are written into
them and pooled, belong to the caches.

Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from . import geometry
from ._arrays import check_config, check_cu_seqlens, check_varlen_lengths
from .config import UniSparseConfig

__all__ = ["PageTable"]

_Table = TypeVar("_Table", bound="PageTable")


class PageTable:
    """Block table, used lengths and free pages of a paged KV cache (host, NumPy).

    Parameters
    ----------
    num_pages, page_size, num_kv_heads, head_dim : int
        Pool size and page shape ``[page_size, Hkv, D]``; each at least 1.
    batch : int
        Sequences (rows of the block table).
    max_pages : int, optional
        Block-table width (default ``num_pages``).
    c_k : int
        Key pooling factor; it must divide ``page_size`` (a group of ``c_k`` keys never
        straddles two pages).
    page_order : sequence of int, optional
        The order in which free pages are handed out (a permutation of ``range(num_pages)``).

    Raises
    ------
    ValueError
        Sizes below 1, ``c_k`` not dividing ``page_size``, ``max_pages < 1``, a ``page_order``
        that is not a permutation. Messages name the cache class.
    """

    def __init__(
        self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, batch: int = 1,
        max_pages: int | None = None, c_k: int = 16, page_order: Sequence[int] | None = None,
    ) -> None:
        name = type(self).__name__
        for arg, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                           ("head_dim", head_dim), ("batch", batch), ("c_k", c_k)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if page_size % c_k != 0:
            raise ValueError(
                f"{name}: c_k={c_k} must divide page_size={page_size} (a group of c_k keys must not "
                f"straddle two pages)"
            )
        max_pages = num_pages if max_pages is None else int(max_pages)
        if max_pages < 1:
            raise ValueError(f"{name}: max_pages must be >= 1, got {max_pages}")
        self._order = list(range(num_pages)) if page_order is None else [int(p) for p in page_order]
        if sorted(self._order) != list(range(num_pages)):
            raise ValueError(f"{name}: page_order must be a permutation of range(num_pages)")
        self.page_size, self.c_k = int(page_size), int(c_k)
        self.block_table = np.full((batch, max_pages), -1, dtype=np.int32)
        self.seqused_k = np.zeros(batch, dtype=np.int32)
        self._free = self._order[::-1]  # pop() hands out page_order[0] first

    @classmethod
    def for_config(cls: type[_Table], config: UniSparseConfig, num_pages: int, page_size: int, num_kv_heads: int,
                   head_dim: int, **kwargs: Any) -> _Table:
        """A cache whose ``c_k`` is ``config.c_k``."""
        return cls(num_pages, page_size, num_kv_heads, head_dim, c_k=check_config(config).c_k, **kwargs)

    @property
    def batch(self) -> int:
        """Sequences the cache holds."""
        return int(self.block_table.shape[0])

    @property
    def free_pages(self) -> int:
        """Pages not yet handed out."""
        return len(self._free)

    @property
    def cu_seqlens_k(self) -> np.ndarray:
        """int32 ``[batch + 1]``: the offsets of the packed keys."""
        return np.concatenate([[0], np.cumsum(self.seqused_k.astype(np.int64))]).astype(np.int32)

    def check_queries(self, cu_seqlens_q: Any, total_q: int, causal: bool) -> np.ndarray:
        """``cu_seqlens_q`` checked against the cache: one entry per sequence, ``N_q,b <= seqused_k[b]`` when causal."""
        cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
        if cu_q.size - 1 != self.batch:
            raise ValueError(f"cu_seqlens_q describes {cu_q.size - 1} sequences, the cache holds {self.batch}")
        check_varlen_lengths(cu_q, self.seqused_k, causal)
        return cu_q

    def clear(self) -> None:
        """Empty every sequence and give every page back (the pages' contents stay until overwritten)."""
        self.block_table[:] = -1
        self.seqused_k[:] = 0
        self._free = self._order[::-1]

    def _check_seq(self, seq: Any) -> None:
        """``ValueError`` unless ``seq`` is a sequence index of the cache."""
        if not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.batch:
            raise ValueError(f"seq must be an int in [0, {self.batch}), got {seq!r}")

    def _pages_for(self, seq: int, n: int) -> tuple[int, int, int, int]:
        """Room for ``n`` more keys of ``seq``: ``(L, L + n, first new page, pages needed)``.

        Raises ``ValueError`` (and changes nothing) when the block-table row or the pool is too small.
        """
        L = int(self.seqused_k[seq])
        L_new = L + n
        first_new_page, pages_needed = geometry.cdiv(L, self.page_size), geometry.cdiv(L_new, self.page_size)
        if pages_needed > self.block_table.shape[1]:
            raise ValueError(
                f"sequence {seq} would need {pages_needed} pages, its block-table row holds {self.block_table.shape[1]}"
            )
        if pages_needed - first_new_page > len(self._free):
            raise ValueError(f"the page pool is full: {pages_needed - first_new_page} pages needed, "
                             f"{len(self._free)} free")
        return L, L_new, first_new_page, pages_needed

    def _assign_pages(self, seq: int, first_new_page: int, pages_needed: int) -> np.ndarray:
        """Hand out pages ``first_new_page .. pages_needed - 1`` of ``seq``'s row; returns the row."""
        row = self.block_table[seq]
        for p in range(first_new_page, pages_needed):
            row[p] = self._free.pop()
        return row
