"""Serving-shaped inputs: packed ragged batches, paged KV caches, merging partial attention.

Three entry points beside :func:`unisparse_ref.unisparse_attention` (see the *Serving layouts*
page of the docs):

* :func:`unisparse_attention_varlen`: a batch of sequences of different lengths packed along
  the token axis (FlashAttention's ``cu_seqlens`` convention); every sequence is its own
  UniSparse problem (own causal alignment, composite tokens, scores, selection, mask);
* :func:`unisparse_attention_paged`: the same for queries against a
  :class:`~unisparse_ref.reference.paged.PagedKVCache` (keys and values in pages addressed
  by a block table, with their composite keys kept beside them): chunked prefill;
* :func:`merge_attention_states`: attention over the union of two disjoint key sets from the
  two partial results (cascade attention, split-KV).

Backends. Each stage runs the backend's own packed version when it has one
(``compress_varlen``, ``compress_queries_varlen``, ``block_scores_varlen``,
``select_blocks_varlen``, ``block_sparse_attention_varlen``, ``block_sparse_attention_paged``,
``merge_attention_states``); otherwise the reference's packed function drives the backend's
batch stage once per sequence (:mod:`unisparse_ref.reference.varlen`, ``stage=``) and packs
the results on the host. The reference has every one; the Numba layer has the attention
kernels (varlen and paged, reading ``cu_seqlens`` and the block table directly) and the
merge, and runs pooling, scoring and selection one sequence at a time. The CuPy layer's
packed stages live in :mod:`unisparse_ref.cupy_backend.varlen` (found by
:func:`native_stage`): every stage one launch over the packed batch (attention packed and
paged through rung v9 on Hopper, scoring and selection with their work lists and row tables,
pooling, merge), and the whole pipeline of :func:`unisparse_attention_varlen` queued with no
host synchronisation between the stages (a backend's own ``unisparse_attention_varlen``, when
it has one, replaces the stage-by-stage chain). Without a native
``block_sparse_attention_paged`` the pages are gathered on the host first; without a native
merge the reference merges on the host.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import check_config, check_head_pooling, check_varlen_qkv, packed_offsets, to_numpy
from .api import _as_array
from .backends import get_backend
from .blockmask import BlockMask
from .config import UniSparseConfig
from .reference import varlen as ref_varlen
from .reference.merge import merge_attention_states as _reference_merge
from .reference.paged import PagedKVCache

__all__ = [
    "VarlenResult",
    "merge_attention_states",
    "native_stage",
    "unisparse_attention_paged",
    "unisparse_attention_varlen",
]

#: The batch stage method a packed stage falls back to, run once per sequence.
_PER_SEQUENCE = {
    "compress_varlen": "compress",
    "compress_queries_varlen": "compress",
    "block_scores_varlen": "block_scores",
    "select_blocks_varlen": "select_blocks",
    "block_sparse_attention_varlen": "block_sparse_attention",
}


def _backend(backend: str | Any) -> Any:
    return get_backend(backend) if isinstance(backend, str) else backend


#: Packed stages kept beside a backend's class, in a module of their own: backend name ->
#: module whose function ``name(backend, *args)`` is the stage (the CuPy layer's,
#: :mod:`unisparse_ref.cupy_backend.varlen`).
_STAGE_MODULES = {"cupy": "unisparse_ref.cupy_backend.varlen"}


def native_stage(backend: str | Any, name: str) -> Any:
    """The backend's own packed stage ``name`` (a bound callable), or ``None`` if it has none.

    A method of the backend object, else a function of its stage module (``_STAGE_MODULES``)
    called with the backend first.
    """
    be = _backend(backend)
    own = getattr(be, name, None)
    if own is not None:
        return own
    module = _STAGE_MODULES.get(getattr(be, "name", None))
    if module is not None:
        fn = getattr(importlib.import_module(module), name, None)
        if fn is not None:
            return functools.partial(fn, be)
    return None


def _cache_types() -> tuple[type, ...]:
    """The paged caches the entry points read: the reference's and the CuPy layer's (which
    imports without CuPy; its pages need CuPy only when one is built)."""
    from .cupy_backend.varlen import CupyPagedKVCache

    return (PagedKVCache, CupyPagedKVCache)


def _unchecked_stage(be: Any, name: str) -> Any:
    """The native stage ``name`` with ``check_finite=False`` for the pipeline, if it takes that
    argument (else ``None``): the attention (the pooling already checked ``q`` and ``k``; the
    stage still checks the rest), the selection of scores from the native scoring stage."""
    fn = native_stage(be, name)
    if fn is not None and "check_finite" in inspect.signature(fn).parameters:
        return functools.partial(fn, check_finite=False)
    return None


def _select_stage(be: Any) -> Any:
    """The selection for scores the backend's own packed scoring computed (no re-check)."""
    if native_stage(be, "block_scores_varlen") is not None:
        return _unchecked_stage(be, "select_blocks_varlen") or _stage(be, "select_blocks_varlen")
    return _stage(be, "select_blocks_varlen")


def _stage(be: Any, name: str) -> Any:
    """The backend's packed stage ``name``, or the reference's driving its batch stage per sequence."""
    own = native_stage(be, name)
    if own is not None:
        return own
    return functools.partial(getattr(ref_varlen, name), stage=getattr(be, _PER_SEQUENCE[name]))


@dataclass
class VarlenResult:
    """Everything one packed UniSparse call computed.

    Arrays are the backend's (NumPy for the reference, and for a stage a backend ran
    sequence by sequence); the packed index form of the masks is always NumPy.

    Attributes
    ----------
    out : ``[total_q, Hq, D]``
    lse : float32 ``[Hq, total_q]``
    kv_counts : int32 ``[Hm, total_qb]``
        Selected key blocks of every packed query block (row ``cu_qblocks[i] + qi`` is query
        block ``qi`` of sequence ``i``).
    kv_indices : int32 ``[Hm, total_qb, W]``
        Their indices, ascending, local to the sequence, padded with ``-1``;
        ``W = max(1, max_i nKb_i)``.
    scores : float64 ``[Hm, total_qb, W]``
        Block scores (zero past ``nKb_i``).
    q_c : float64 ``[sum R_i, Hm, D]``
        Composite queries (offsets ``packed_offsets(cu_seqlens_q, c_q)``).
    k_c : float64 ``[sum C_i, Hkv, D]``
        Composite keys (offsets ``packed_offsets(cu_seqlens_k, c_k)``).
    cu_seqlens_q, cu_seqlens_k : int32 ``[batch + 1]``
        The offsets, checked (for a paged call, ``cu_seqlens_k = [0, cumsum(seqused_k)]``).
    config : UniSparseConfig
    """

    out: Any
    lse: Any
    kv_counts: np.ndarray
    kv_indices: np.ndarray
    scores: Any
    q_c: Any
    k_c: Any
    cu_seqlens_q: np.ndarray
    cu_seqlens_k: np.ndarray
    config: UniSparseConfig

    @property
    def batch(self) -> int:
        """Number of sequences."""
        return int(self.cu_seqlens_q.size - 1)

    @property
    def cu_qblocks(self) -> np.ndarray:
        """int32 ``[batch + 1]``: sequence ``i``'s query blocks are rows ``cu_qblocks[i]:cu_qblocks[i+1]``."""
        return packed_offsets(self.cu_seqlens_q, self.config.block_size)

    def block_mask(self, i: int) -> BlockMask | None:
        """Sequence ``i``'s mask as a :class:`~unisparse_ref.BlockMask` with ``B = 1``; ``None`` if it has no query."""
        if not 0 <= i < self.batch:
            raise IndexError(f"sequence {i} out of range for a batch of {self.batch}")
        return ref_varlen.block_mask_of_sequence(self.kv_counts, self.kv_indices, self.cu_seqlens_q,
                                                 self.cu_seqlens_k, i, self.config)

    @property
    def density(self) -> float:
        """Selected visible blocks over visible blocks, over every sequence and mask head."""
        selected = visible = 0
        for i in range(self.batch):
            bm = self.block_mask(i)
            if bm is None:
                continue
            vis = bm.visible()
            selected += int((bm.mask & vis).sum())
            visible += int(vis.sum()) * bm.num_mask_heads
        return selected / visible if visible else 0.0


def unisparse_attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    config: UniSparseConfig | None = None,
    *,
    backend: str | Any = "numpy",
    return_details: bool = False,
) -> Any:
    """UniSparse attention of a packed batch of sequences of different lengths.

    Sequence ``i`` is ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` (``N_q,i`` queries) against
    ``k``, ``v[cu_seqlens_k[i]:cu_seqlens_k[i+1]]`` (``N_k,i`` keys) and is computed exactly as
    :func:`unisparse_ref.unisparse_attention` computes it alone (``B = 1``): its queries are
    its last ``N_q,i`` positions (bottom-right causal), with its own composite tokens, scores,
    selection and block mask. In the reference the result equals the per-sequence calls bit
    for bit.

    Parameters
    ----------
    q : array, shape ``[total_q, Hq, D]``
    k, v : array, shape ``[total_k, Hkv, D]``
    cu_seqlens_q, cu_seqlens_k : integer array, shape ``[batch + 1]``
        Offsets: start at 0, never decrease, end at ``total_q`` / ``total_k``. int32 as in
        FlashAttention (any integer dtype is accepted; floats are refused).
    config : UniSparseConfig, optional
    backend : str or backend object
    return_details : bool
        Return a :class:`VarlenResult` (masks in the packed index form) instead of ``out``.

    Returns
    -------
    out : ``[total_q, Hq, D]``, or a :class:`VarlenResult`
        ``lse`` (in the result) is float32 ``[Hq, total_q]``.

    Empty sequences: ``N_q,i = 0`` is allowed (no output row, no mask row; such a sequence
    may also have no key). A sequence with queries needs ``N_k,i >= 1``, and
    ``N_q,i <= N_k,i`` when causal: otherwise ``ValueError`` naming it.

    Raises
    ------
    ValueError
        Bad shapes or offsets, or a sequence that breaks the rules above.
    TypeError
        Non-array inputs, non-integer offsets, unsupported dtypes, a bad ``config``.
    """
    config = check_config(config)
    q, k, v = _as_array("q", q), _as_array("k", k), _as_array("v", v)
    be = _backend(backend)
    whole = native_stage(be, "unisparse_attention_varlen")
    if whole is not None:  # the backend's own pipeline checks the inputs and queues every stage itself
        # (the CuPy layer: the same checks as below, no host synchronisation between the stages)
        out, lse, kv_counts, kv_indices, scores, q_c, k_c, cu_q, cu_k = whole(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                                              config)
    else:
        cu_q, cu_k, Hq, Hkv, _ = check_varlen_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=config.causal,
                                                  shape_only=True)
        check_head_pooling(Hq, Hkv, config.c_h)
        q_c, k_c = _stage(be, "compress_varlen")(q, k, cu_q, cu_k, config)
        scores = _stage(be, "block_scores_varlen")(q_c, k_c, cu_q, cu_k, config)
        kv_counts, kv_indices = _select_stage(be)(scores, cu_q, cu_k, config)
        attend = _unchecked_stage(be, "block_sparse_attention_varlen") or _stage(be, "block_sparse_attention_varlen")
        out, lse = attend(q, k, v, cu_q, cu_k, kv_counts, kv_indices, config)
    if return_details:
        return VarlenResult(out, lse, to_numpy(kv_counts), to_numpy(kv_indices), scores, q_c, k_c, cu_q, cu_k,
                            config)
    return out


def unisparse_attention_paged(
    q: Any,
    cache: Any,
    cu_seqlens_q: Any,
    config: UniSparseConfig | None = None,
    *,
    backend: str | Any = "numpy",
    return_details: bool = False,
) -> Any:
    """UniSparse attention of a packed batch of queries against a paged KV cache (chunked prefill).

    Sequence ``b``'s queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` are the last ``N_q,b``
    of the ``cache.seqused_k[b]`` positions the cache holds (append the chunk's keys and
    values first). Composite keys come from the cache (pooled once, when appended); only the
    queries are pooled here. The result is that of :func:`unisparse_attention_varlen` on the
    cache's keys and values gathered contiguous (bit for bit in the reference).

    With chunk boundaries at multiples of the block size ``S``, a chunk's query blocks,
    composite queries and composite keys are those of the one-shot call over the whole
    prompt, so its scores agree with the one-shot rows up to float64 rounding, its mask rows
    are the same (except SPEC section 7's borderline rows) and its output rows agree within
    the float64 rule of SPEC section 7. Other boundaries give another blocking of the same
    prompt (query blocks start at the chunk).

    Parameters
    ----------
    q : array, shape ``[total_q, Hq, D]``
    cache : PagedKVCache or CupyPagedKVCache
        The reference's host cache, or the CuPy layer's device cache
        (:class:`unisparse_ref.cupy_backend.varlen.CupyPagedKVCache`, the same layout). Its
        ``c_k`` must be ``config.c_k``; ``Hkv`` and ``D`` must fit ``q``.
    cu_seqlens_q : integer array, shape ``[cache.batch + 1]``
    config, backend, return_details :
        As in :func:`unisparse_attention_varlen`.

    Returns
    -------
    out : ``[total_q, Hq, D]``, or a :class:`VarlenResult` (``cu_seqlens_k`` from ``seqused_k``).
    """
    config = check_config(config)
    if not isinstance(cache, _cache_types()):
        raise TypeError(f"cache must be a PagedKVCache or a CupyPagedKVCache, got {type(cache)!r}")
    if cache.c_k != config.c_k:
        raise ValueError(f"the cache pools keys with c_k={cache.c_k} but config.c_k={config.c_k}")
    q = _as_array("q", q)
    if len(q.shape) != 3:
        raise ValueError(f"q must have rank 3 [total_q, Hq, D] (packed), got shape {tuple(q.shape)}")
    total_q, Hq, D = (int(s) for s in q.shape)
    Hkv = cache.num_kv_heads
    if D != cache.head_dim:
        raise ValueError(f"q has head dim {D} but the cache holds {cache.head_dim}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of the cache's k/v heads Hkv={Hkv}")
    check_head_pooling(Hq, Hkv, config.c_h)
    cu_q = cache.check_queries(cu_seqlens_q, total_q, config.causal)
    cu_k = cache.cu_seqlens_k
    be = _backend(backend)
    q_c = _stage(be, "compress_queries_varlen")(q, cu_q, config, num_kv_heads=Hkv)
    k_c = cache.packed_composite_keys()
    scores = _stage(be, "block_scores_varlen")(q_c, k_c, cu_q, cu_k, config)
    kv_counts, kv_indices = _select_stage(be)(scores, cu_q, cu_k, config)
    paged = _unchecked_stage(be, "block_sparse_attention_paged") or native_stage(be, "block_sparse_attention_paged")
    if paged is not None:
        out, lse = paged(q, cache.k_pages, cache.v_pages, cu_q, cache.block_table, cache.seqused_k, kv_counts,
                         kv_indices, config)
    else:  # gather the pages on the host, then the packed attention
        k, v, _ = cache.packed_keys()
        out, lse = _stage(be, "block_sparse_attention_varlen")(q, k, v, cu_q, cu_k, kv_counts, kv_indices, config)
    if return_details:
        return VarlenResult(out, lse, to_numpy(kv_counts), to_numpy(kv_indices), scores, q_c, k_c, cu_q, cu_k,
                            config)
    return out


def merge_attention_states(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any, *,
                           backend: str | Any = "numpy") -> tuple[Any, Any]:
    """Attention over the union of two disjoint key sets from the two partial results.

    ``out = (exp(lse_a) out_a + exp(lse_b) out_b) / (exp(lse_a) + exp(lse_b))`` and
    ``lse = log(exp(lse_a) + exp(lse_b))``, computed without overflow; rows empty on one side
    (``lse = -inf``) give the other side exactly, rows empty on both give ``out = 0``,
    ``lse = -inf``, never NaN (:mod:`unisparse_ref.reference.merge`).

    Parameters
    ----------
    out_a, out_b : array, shape ``[..., D]``
    lse_a, lse_b : array, shape ``[...]``, ``out``'s shape without ``D``
        For the packed layout (``out [total_q, Hq, D]``, ``lse [Hq, total_q]``) pass ``lse.T``.
    backend : str or backend object
        Its own ``merge_attention_states`` if it has one, else the reference's (on the host).

    Returns
    -------
    (out, lse) : ``[..., D]`` and float32 ``[...]``.
    """
    be = _backend(backend)
    merge = native_stage(be, "merge_attention_states") or _reference_merge
    return merge(out_a, lse_a, out_b, lse_b)

