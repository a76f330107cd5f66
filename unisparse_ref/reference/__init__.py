"""The NumPy reference of the whole UniSparse pipeline: the correctness oracle.

Deliberately naive and readable. Every stage computes in float64 whatever the input dtype
(float16, bfloat16 through ``ml_dtypes``, float32, float64) and follows the specification
(``docs/spec.md``) line by line: no online softmax, no clever indexing. One module per stage,
under the same names in every layer:

- :mod:`.pooling` (SPEC section 3): :func:`~.pooling.compress`, :func:`~.pooling.pool_sequence`,
  :func:`~.pooling.pool_heads`;
- :mod:`.scores` (section 4): :func:`~.scores.block_scores`, :func:`~.scores.kv_head_of_mask_head`;
- :mod:`.selection` (section 5): :func:`~.selection.select_blocks`, :func:`~.selection.selection_margin`;
- :mod:`.attention` (section 6): :func:`~.attention.block_sparse_attention`,
  :func:`~.attention.dense_attention`, :func:`~.attention.expand_block_mask`;
- :mod:`.tiled` (section 6): the same attention walked tile by tile with the online softmax,
  as the GPU kernels do, for teaching.

Serving-shaped inputs (the *Serving layouts* page), built on the stages above:

- :mod:`~unisparse_ref.reference.varlen`: packed ragged batches (``cu_seqlens``), every stage packed;
- :mod:`~unisparse_ref.reference.paged`: a paged KV cache that keeps its composite keys
  (:class:`~unisparse_ref.reference.paged.PagedKVCache`), and attention against it;
- :mod:`~unisparse_ref.reference.merge`: :func:`~unisparse_ref.reference.merge.merge_attention_states`,
  exact combination of partial attention over disjoint key sets.

Every function is also importable from this package (``reference.compress`` and so on).

Notation (see the docs' notation table): ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value
heads, ``G = Hq // Hkv``, ``Hm = Hq // c_h`` composite (mask) heads, ``Nq``/``Nk`` lengths,
``D`` head dim, ``S`` block size, ``R = ceil(Nq/c_q)``, ``C = ceil(Nk/c_k)``,
``nQb = ceil(Nq/S)``, ``nKb = ceil(Nk/S)``.

Edge semantics: a query row with no allowed key gives ``out = 0`` and ``lse = -inf``
(never NaN). Memory stays bounded: attention and scoring run over chunks of query blocks.
Every input check is shared with the other layers (:mod:`unisparse_ref._arrays`).
"""

from __future__ import annotations

from typing import Any

from .._convert import SUPPORTED_DTYPES
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from . import varlen as _varlen
from .attention import block_sparse_attention, dense_attention, expand_block_mask
from .merge import merge_attention_states
from .paged import block_sparse_attention_paged
from .pooling import compress, pool_heads, pool_sequence
from .scores import block_scores, kv_head_of_mask_head
from .selection import select_blocks, selection_margin

__all__ = [
    "NumpyBackend",
    "block_scores",
    "block_sparse_attention",
    "compress",
    "dense_attention",
    "expand_block_mask",
    "kv_head_of_mask_head",
    "pool_heads",
    "pool_sequence",
    "select_blocks",
    "selection_margin",
]


class NumpyBackend:
    """The float64 NumPy reference as a backend (the functions of this package).

    Accepts any array :func:`unisparse_ref.to_numpy` converts; returns float64 NumPy arrays
    (``lse`` float32).
    """

    name = "numpy"
    supported_dtypes = SUPPORTED_DTYPES
    score_eps = 0.0

    def compress(self, q: Any, k: Any, config: UniSparseConfig) -> tuple[Any, Any]:
        return compress(q, k, config)

    def block_scores(self, q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
        return block_scores(q_c, k_c, config, nq, nk)

    def select_blocks(self, scores: Any, config: UniSparseConfig, nq: int, nk: int) -> BlockMask:
        return select_blocks(scores, config, nq, nk)

    def block_sparse_attention(
        self, q: Any, k: Any, v: Any, block_mask: BlockMask, config: UniSparseConfig
    ) -> tuple[Any, Any]:
        return block_sparse_attention(q, k, v, block_mask, config)

    def dense_attention(
        self, q: Any, k: Any, v: Any, causal: bool = True, softmax_scale: float | None = None
    ) -> tuple[Any, Any]:
        return dense_attention(q, k, v, causal, softmax_scale)

    # ------------------------------------------------------------------ serving layouts
    # Packed ragged batches, paged KV caches and merging (:mod:`.varlen`, :mod:`.paged`,
    # :mod:`.merge`); unisparse_attention_varlen and unisparse_attention_paged call these.
    def compress_varlen(self, q: Any, k: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                        config: UniSparseConfig) -> tuple[Any, Any]:
        return _varlen.compress_varlen(q, k, cu_seqlens_q, cu_seqlens_k, config)

    def compress_queries_varlen(self, q: Any, cu_seqlens_q: Any, config: UniSparseConfig,
                                num_kv_heads: int | None = None) -> Any:
        return _varlen.compress_queries_varlen(q, cu_seqlens_q, config, num_kv_heads=num_kv_heads)

    def block_scores_varlen(self, q_c: Any, k_c: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                            config: UniSparseConfig) -> Any:
        return _varlen.block_scores_varlen(q_c, k_c, cu_seqlens_q, cu_seqlens_k, config)

    def select_blocks_varlen(self, scores: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                             config: UniSparseConfig) -> tuple[Any, Any]:
        return _varlen.select_blocks_varlen(scores, cu_seqlens_q, cu_seqlens_k, config)

    def block_sparse_attention_varlen(self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                                      kv_counts: Any, kv_indices: Any, config: UniSparseConfig) -> tuple[Any, Any]:
        return _varlen.block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices,
                                                     config)

    def block_sparse_attention_paged(self, q: Any, k_pages: Any, v_pages: Any, cu_seqlens_q: Any, block_table: Any,
                                     seqused_k: Any, kv_counts: Any, kv_indices: Any,
                                     config: UniSparseConfig) -> tuple[Any, Any]:
        return block_sparse_attention_paged(q, k_pages, v_pages, cu_seqlens_q, block_table, seqused_k, kv_counts,
                                            kv_indices, config)

    def merge_attention_states(self, out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> tuple[Any, Any]:
        return merge_attention_states(out_a, lse_a, out_b, lse_b)

    def __repr__(self) -> str:
        return "NumpyBackend()"


def make_backend() -> NumpyBackend:
    """The reference backend (always available)."""
    return NumpyBackend()
