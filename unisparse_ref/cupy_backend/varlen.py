"""Serving layouts in the CuPy layer: packed ragged batches, paged KV caches, merging states.

The functions here are the CuPy backend's packed stages; :mod:`unisparse_ref.varlen` finds
them by name (``native_stage``) and passes the backend as the first argument. Conventions are
those of :mod:`unisparse_ref.reference.varlen` (the *Serving layouts* page of the docs):
``q [total_q, Hq, D]``, ``k``/``v [total_k, Hkv, D]``, ``cu_seqlens`` int32 ``[batch + 1]``,
bottom-right causal alignment per sequence, the masks in the packed index form
(``kv_counts [Hm, total_qb]``, ``kv_indices [Hm, total_qb, W]``, block indices local to the
sequence).

========================================  ==========================================================
function                                  how
========================================  ==========================================================
:func:`block_sparse_attention_varlen`     **one launch** of rung v9's ``us_fa3_fwd_varlen``
                                          (``attention_hopper.cu``): TMA tensor maps over the packed
                                          token axis, a work list of 128-row query tiles of every
                                          sequence, longest first across the batch, walked by the
                                          persistent grid's dynamic scheduler; keys past ``N_k,b``
                                          masked; rows stored only up to ``N_q,b``. Hopper, float16 /
                                          bfloat16, ``S`` a multiple of 128 (any ``D <= 256``,
                                          zero-padded to 64 / 128 / 256). Otherwise: per-sequence
                                          fallback (the batch kernel on each sequence, copies)
:func:`block_sparse_attention_paged`      the same kernel reading ``block_table`` (no gather) when
                                          ``page_size`` is a multiple of the key tile ``Bc`` (128;
                                          64 at ``D = 256``); otherwise the pages are gathered on
                                          the device (one copy), then the packed attention
:func:`merge_attention_states`            ``us_merge_states<T>`` (``varlen.cu``), one launch
:func:`compress_varlen`,                  ``us_pool_varlen<T>`` (``varlen.cu``), one launch per
:func:`compress_queries_varlen`           tensor, reading ``cu_seqlens`` (bit for bit the batch
                                          kernel's composite tokens of each sequence)
:func:`block_scores_varlen`               **one launch** of ``us_scores_mma`` in its packed mode
                                          (``scores.cu``; ``scores.launch_scores_packed``): keys
                                          centred per (sequence, KV head), rows split where they
                                          lie, a work list of (sequence, row tile) longest first
                                          across the batch, a descriptor table per sequence. Per
                                          sequence (copies) only for version-3 shapes and
                                          ``diagonal_correction``
:func:`select_blocks_varlen`              **one launch** of ``us_select_topp<T>`` with the row table
                                          ``selection.packed_row_table`` (int32 ``[total_qb, 4]`` =
                                          ``{i, N_q,b, N_k,b, nKb_b}``), writing ``kv_counts`` /
                                          ``kv_indices [Hm, total_qb, W]`` directly, no copies
========================================  ==========================================================

Imports without CuPy.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from .. import geometry
from .._arrays import (
    BFLOAT16,
    check_config,
    check_cu_seqlens,
    check_dtype,
    check_head_pooling,
    check_merge_states,
    check_no_packed_sinks,
    check_packed_mask,
    check_paged_qkv,
    check_varlen_lengths,
    check_varlen_qkv,
    packed_offsets,
)
from ..config import UniSparseConfig
from ..pagetable import PageTable
from . import _hopper, _loader, attention, pooling, scores
from ._device import (
    as_bfloat16,
    check_finite_device,
    cupy_module,
    device_input,
    i32,
    nonfinite_counts,
    raise_if_nonfinite,
    upload_int32,
    wrap_output,
)
from ._loader import CTYPES, KernelSpec

__all__ = [
    "CupyPagedKVCache",
    "FILE",
    "INSTANTIATIONS",
    "block_scores_varlen",
    "block_sparse_attention_paged",
    "block_sparse_attention_varlen",
    "compress_queries_varlen",
    "compress_varlen",
    "launch_config",
    "launch_merge",
    "launch_pool_varlen",
    "merge_attention_states",
    "select_blocks_varlen",
    "unisparse_attention_varlen",
    "uses_v9",
]

FILE = "varlen.cu"
#: Threads per block of the elementwise kernels (``US_VARLEN_THREADS`` in varlen.cu).
THREADS = 256
#: Largest grid of the grid-stride kernels.
MAX_BLOCKS = 65535
OPTIONS: tuple[str, ...] = (f"-DUS_VARLEN_THREADS={THREADS}",)


def merge_spec(ctype: str) -> KernelSpec:
    return KernelSpec(FILE, f"us_merge_states<{ctype}>", OPTIONS)


def pool_spec(ctype: str) -> KernelSpec:
    return KernelSpec(FILE, f"us_pool_varlen<{ctype}>", OPTIONS)


#: Every instantiation these stages launch (merge and packed pooling per element type, and
#: the varlen attention of rung v9).
INSTANTIATIONS: list[KernelSpec] = [
    *(merge_spec(t) for t in CTYPES.values()),
    *(pool_spec(t) for t in CTYPES.values()),
    *_hopper.FA3_VARLEN_INSTANTIATIONS,
]


def launch_config(n: int) -> dict[str, Any]:
    """Grid and block of the grid-stride kernels over ``n`` outputs (one thread each)."""
    return {"grid": (max(1, min(geometry.cdiv(n, THREADS), MAX_BLOCKS)), 1, 1), "block": (THREADS, 1, 1),
            "shared_mem": 0}


# ----------------------------------------------------------------------------- merge
def launch_merge(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any, dtype: np.dtype) -> tuple[Any, Any]:
    """``us_merge_states<T>`` on C-contiguous CuPy arrays ``out_* [rows, D]``, float32 ``lse_* [rows]``."""
    cp = cupy_module()
    rows, D = (int(s) for s in out_a.shape)
    out = cp.empty_like(out_a)
    lse = cp.empty((rows,), dtype=cp.float32)
    if rows * D:
        lc = launch_config(rows * D)
        _loader.launch(_loader.get_function(merge_spec(CTYPES[str(dtype)])), lc["grid"], lc["block"],
                       (out_a, lse_a, out_b, lse_b, out, lse, np.int64(rows), i32(D)), shared_mem=0)
    return out, lse


def merge_attention_states(be: Any, out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """Attention over the union of two disjoint key sets from the two partial states (one launch).

    Parameters
    ----------
    be : CupyBackend
    out_a, out_b : array ``[..., D]``, float16, bfloat16 or float32 (the same)
    lse_a, lse_b : array ``[...]`` (out's shape without ``D``; ``lse.T`` for the packed layout,
        copied contiguous: it is small)

    Returns
    -------
    out : ``[..., D]`` of the inputs' dtype, lse : cupy float32 ``[...]``

    Raises
    ------
    ValueError
        Shapes that disagree, non-finite outputs, NaN or ``+inf`` in an ``lse``.
    TypeError
        Mixed or unsupported dtypes.
    """
    cp = cupy_module()
    check_merge_states(out_a, lse_a, out_b, lse_b)
    da, dta = device_input("out_a", out_a)
    db, dtb = device_input("out_b", out_b)
    if dta != dtb:
        raise TypeError(f"out_b has dtype {dtb} but out_a has {dta}; they must match")
    la, lb = (cp.ascontiguousarray(x if isinstance(x, cp.ndarray) else cp.asarray(np.asarray(x, np.float32)),
                                   dtype=cp.float32) for x in (lse_a, lse_b))
    check_finite_device(("out_a", da, dta), ("out_b", db, dtb))
    bad = [cp.count_nonzero(cp.isnan(x) | cp.isposinf(x)) for x in (la, lb)]
    for name, n in zip(("lse_a", "lse_b"), bad, strict=True):
        if int(n):
            raise ValueError(f"{name} must be finite or -inf (an empty row), it holds NaN or +inf")
    shape = tuple(int(s) for s in da.shape)
    rows, D = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    out, lse = launch_merge(da.reshape(rows, D), la.reshape(rows), db.reshape(rows, D), lb.reshape(rows), dta)
    return wrap_output(out.reshape(shape), dta), lse.reshape(shape[:-1])


# ----------------------------------------------------------------------------- stage 1, packed
def launch_pool_varlen(x: Any, dtype: np.dtype, cu: np.ndarray, c: int, c_h: int,
                       device_offsets: tuple[Any, Any] | None = None) -> Any:
    """``us_pool_varlen<T>``: packed ``x [total, H, D]`` -> float32 ``[sum ceil(N_b / c), H / c_h, D]``
    (a grid-stride launch over the threads: one per output, or per 16-byte group of outputs).

    ``cu`` are the checked host offsets; ``device_offsets`` ``(cu, packed_offsets(cu, c))`` as
    int32 device arrays if the caller uploaded them already (else one ``upload_int32`` here).
    """
    cp = cupy_module()
    _, H, D = (int(s) for s in x.shape)
    cu_out = packed_offsets(cu, c)
    Hout = H // c_h
    out = cp.empty((int(cu_out[-1]), Hout, D), dtype=cp.float32)
    if out.size:
        cu_d, cu_out_d = device_offsets if device_offsets is not None else upload_int32(cu, cu_out)
        # outputs per thread: as us_pool_seq's (16-byte loads where D and the alignment allow)
        lc = launch_config(out.size // pooling.outputs_per_thread(x.dtype, D, x.data.ptr))
        _loader.launch(_loader.get_function(pool_spec(CTYPES[str(dtype)])), lc["grid"], lc["block"],
                       (x, cu_d, cu_out_d, out, i32(cu.size - 1), i32(H), i32(D), i32(c), i32(c_h)), shared_mem=0)
    return out


def compress_varlen(be: Any, q: Any, k: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                    config: UniSparseConfig) -> tuple[Any, Any]:
    """Composite tokens of a packed batch (SPEC 3), one launch per tensor.

    Returns
    -------
    q_c : cupy float32 ``[sum R_i, Hq / c_h, D]``, k_c : cupy float32 ``[sum C_i, Hkv, D]``
        Offsets ``packed_offsets(cu_seqlens_q, c_q)`` and ``packed_offsets(cu_seqlens_k, c_k)``.
    """
    config = check_config(config)
    check_no_packed_sinks(config, "compress_varlen")
    qd, dt = device_input("q", q)
    kd, dtk = device_input("k", k)
    if dtk != dt:
        raise TypeError(f"k has dtype {dtk} but q has {dt}; they must match")
    cu_q, cu_k, Hq, Hkv, _ = check_varlen_qkv(qd, kd, kd, cu_seqlens_q, cu_seqlens_k, causal=config.causal,
                                              shape_only=True)
    check_head_pooling(Hq, Hkv, config.c_h)
    q_c, k_c, _, _ = _queue_pooling(qd, kd, dt, cu_q, cu_k, config)
    check_finite_device(("q", q_c, np.dtype(np.float32)), ("k", k_c, np.dtype(np.float32)))
    return q_c, k_c


def _queue_pooling(qd: Any, kd: Any, dt: np.dtype, cu_q: np.ndarray, cu_k: np.ndarray,
                   config: UniSparseConfig) -> tuple[Any, Any, np.ndarray, Any]:
    """Queue both packed poolings, their four offset arrays in one ``upload_int32``: returns
    ``q_c``, ``k_c`` and the composite-key offsets on the host and on the device (the scoring's
    centring reads them)."""
    cu_c = packed_offsets(cu_k, config.c_k)
    offs = upload_int32(cu_q, packed_offsets(cu_q, config.c_q), cu_k, cu_c)
    q_c = launch_pool_varlen(qd, dt, cu_q, config.c_q, config.c_h, (offs[0], offs[1]))
    k_c = launch_pool_varlen(kd, dt, cu_k, config.c_k, 1, (offs[2], offs[3]))
    return q_c, k_c, cu_c, offs[3]


def compress_queries_varlen(be: Any, q: Any, cu_seqlens_q: Any, config: UniSparseConfig, *,
                            num_kv_heads: int | None = None) -> Any:
    """Composite queries only (the keys' come from a cache): cupy float32 ``[sum R_i, Hq / c_h, D]``."""
    config = check_config(config)
    qd, dt = device_input("q", q)
    if qd.ndim != 3:
        raise ValueError(f"q must have rank 3 [total_q, Hq, D], got shape {tuple(qd.shape)}")
    Hq = int(qd.shape[1])
    Hkv = Hq if num_kv_heads is None else int(num_kv_heads)
    if Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv}")
    check_head_pooling(Hq, Hkv, config.c_h)
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, int(qd.shape[0]))
    q_c = launch_pool_varlen(qd, dt, cu_q, config.c_q, config.c_h)
    check_finite_device(("q", q_c, np.dtype(np.float32)))
    return q_c


# ----------------------------------------------------------------------------- stages 2 and 3, per sequence
def _offsets(cu_seqlens_q: Any, cu_seqlens_k: Any, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    def last(cu: Any) -> int:
        a = np.asarray(cu.get() if hasattr(cu, "get") else cu).reshape(-1)
        return int(a[-1]) if a.size and a.dtype.kind in "iu" else 0

    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, last(cu_seqlens_q))
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, last(cu_seqlens_k))
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q has {cu_q.size} entries but cu_seqlens_k has {cu_k.size}")
    check_varlen_lengths(cu_q, np.diff(cu_k), causal)
    return cu_q, cu_k


def _f32_device(name: str, x: Any) -> Any:
    cp = cupy_module()
    if isinstance(x, cp.ndarray):
        return x
    if isinstance(x, np.ndarray):
        return cp.asarray(x.astype(np.float32))
    return device_input(name, x)[0]


def block_scores_varlen(be: Any, q_c: Any, k_c: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                        config: UniSparseConfig) -> Any:
    """Block scores of every sequence (SPEC 4), packed: cupy float32 ``[Hm, total_qb, W]`` (zero past ``nKb_i``).

    ``q_c [sum R_i, Hm, D]`` and ``k_c [sum C_i, Hkv, D]`` as :func:`compress_varlen` returns them;
    row ``cu_qblocks[i] + qi`` of the result is query block ``qi`` of sequence ``i``.

    **One pass over the packed arrays** (``scores.launch_scores_packed``)
    where scores version 4 takes the shape and the config is SPEC's (no ``diagonal_correction``):
    the composite keys centred per (sequence, KV head) (``us_center_keys`` with the offsets), the
    composite rows split where they lie (``us_split_rows``, no copy), then ONE launch of
    ``us_scores_mma`` in its packed mode, whose work list holds every (sequence, row tile) sorted
    longest first across the sequences and whose items read their sequence's geometry from a
    descriptor table. No per-sequence Python loop, no repacking copy. Each sequence's rows are
    bit for bit the batch call ``be.block_scores`` on that sequence's composite tokens.

    **Per sequence** (the batch scoring once per sequence with queries, on a transposed copy of
    its composite tokens, written into the packed array) in the other cases: shapes only version
    3 takes (a query block of more composite rows than a work item holds, ``block_size / c_q > 256``
    with the default two parts, or tiles beyond shared memory: ``scores.mma_applicable``), and the
    research variant ``diagonal_correction`` (``sink_tokens`` is refused for packed batches, as
    everywhere).
    """
    config = check_config(config)  # the other research variants: refused (or not) by be.block_scores
    check_no_packed_sinks(config, "block_scores_varlen")
    cp = cupy_module()
    qc, kc = _f32_device("q_c", q_c), _f32_device("k_c", k_c)
    if qc.ndim != 3 or kc.ndim != 3:
        raise ValueError(f"q_c and k_c must have rank 3 (packed), got {qc.shape} and {kc.shape}")
    cu_q, cu_k = _offsets(cu_seqlens_q, cu_seqlens_k, config.causal)
    cu_r, cu_c = packed_offsets(cu_q, config.c_q), packed_offsets(cu_k, config.c_k)
    if qc.shape[0] != cu_r[-1] or kc.shape[0] != cu_c[-1]:
        raise ValueError(
            f"q_c has {qc.shape[0]} composite queries and k_c {kc.shape[0]} composite keys; the offsets "
            f"need {int(cu_r[-1])} and {int(cu_c[-1])}"
        )
    if qc.shape[2] != kc.shape[2]:
        raise ValueError(f"q_c and k_c must have the same head dim, got {qc.shape[2]} and {kc.shape[2]}")
    Hq, Hkv = int(qc.shape[1]) * config.c_h, int(kc.shape[1])
    if Hq % Hkv or (Hq // Hkv) % config.c_h:
        raise ValueError(f"q_c has {int(qc.shape[1])} composite heads and k_c {Hkv} KV heads: with c_h={config.c_h} "
                         "the query heads Hm*c_h must be a multiple of Hkv, with c_h dividing the group size")
    if scores.packed_applicable(config, int(qc.shape[2]), _loader.max_dynamic_shared_memory()):
        return scores.launch_scores_packed(cp.ascontiguousarray(qc), cp.ascontiguousarray(kc), cu_q, cu_k, config)
    return _block_scores_per_sequence(be, qc, kc, cu_q, cu_k, cu_r, cu_c, config)


def _block_scores_per_sequence(be: Any, qc: Any, kc: Any, cu_q: np.ndarray, cu_k: np.ndarray, cu_r: np.ndarray,
                               cu_c: np.ndarray, config: UniSparseConfig) -> Any:
    """The fallback of :func:`block_scores_varlen`: ``be.block_scores`` once per sequence with queries."""
    cp = cupy_module()
    S = config.block_size
    cu_qb = packed_offsets(cu_q, S)
    nk_all = np.diff(cu_k)
    W = max(1, geometry.num_blocks(int(nk_all.max(initial=0)), S))
    out = cp.zeros((int(qc.shape[1]), int(cu_qb[-1]), W), dtype=cp.float32)
    for i in range(cu_q.size - 1):
        nq, nk = int(cu_q[i + 1] - cu_q[i]), int(nk_all[i])
        if nq == 0:
            continue
        qi = cp.ascontiguousarray(qc[cu_r[i]:cu_r[i + 1]].transpose(1, 0, 2)[None])
        ki = cp.ascontiguousarray(kc[cu_c[i]:cu_c[i + 1]].transpose(1, 0, 2)[None])
        s = be.block_scores(qi, ki, config, nq, nk)
        if tuple(s.shape[1:]) == tuple(out.shape):  # one sequence fills the packed array: no copy
            return s[0]
        out[:, cu_qb[i]:cu_qb[i + 1], : s.shape[-1]] = s[0]
    return out


def select_blocks_varlen(be: Any, scores: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                         config: UniSparseConfig, *, check_finite: bool = True) -> tuple[Any, Any]:
    """Top-P selection of every sequence (SPEC 5) in the packed index form (cupy int32), one launch.

    One launch of ``us_select_topp<T>`` (``selection.cu``) over the packed scores: a row table
    built on the host from the offsets (``selection.packed_row_table``, int32 ``[total_qb, 4]``,
    uploaded once) gives every row its sequence's query block,
    ``N_q``, ``N_k`` and ``nKb``, and the kernel writes the packed index form directly: no
    per-sequence loop, no copy of the scores. The result is bit for bit the batch selection
    (``CupyBackend.select_blocks_indices``) run on each sequence's scores alone, hence the
    reference's selection on the same scores.

    Parameters
    ----------
    be : CupyBackend
    scores : array ``[Hm, total_qb, W]``
        float32 or float64 (other dtypes are converted to float64), ``W >= nKb`` of every
        sequence with queries (:func:`block_scores_varlen` gives ``W = max(1, max nKb)``);
        entries past a sequence's ``nKb`` are not read.
    cu_seqlens_q, cu_seqlens_k : int array ``[batch + 1]`` (checked on the host)
    config : UniSparseConfig
    check_finite : bool
        Default ``True``: raise for a negative or non-finite score of a sequence (one reduction
        over the packed array, one synchronisation; a bad value only in the padding past
        ``nKb`` is ignored). ``False`` (scores from :func:`block_scores_varlen`): no check.

    Returns
    -------
    kv_counts : cupy int32 ``[Hm, total_qb]``
    kv_indices : cupy int32 ``[Hm, total_qb, max(W, 1)]``
        Ascending, local to the sequence, padded with -1.

    Raises
    ------
    ValueError
        Bad offsets, scores of another shape or narrower than a sequence's ``nKb``, a bad score.
    """
    from . import selection
    from ._device import count_bad

    cp = cupy_module()
    config = check_config(config)
    be._refuse_variants(config, "cupy backend select_blocks_varlen")
    s = scores if isinstance(scores, cp.ndarray) else cp.asarray(np.asarray(scores))
    cu_q, cu_k = _offsets(cu_seqlens_q, cu_seqlens_k, config.causal)
    S = config.block_size
    cu_qb = packed_offsets(cu_q, S)
    if s.ndim != 3 or s.shape[1] != cu_qb[-1]:
        raise ValueError(f"scores must have shape [Hm, total_qb={int(cu_qb[-1])}, W], got {tuple(s.shape)}")
    table = selection.packed_row_table(cu_q, cu_k, S)
    Hm, total_qb, W = (int(x) for x in s.shape)
    need = int(table[:, 3].max(initial=0))
    if W < need:
        raise ValueError(f"scores must have shape [Hm, total_qb={total_qb}, W >= {need}] (the key blocks of the "
                         f"longest sequence with queries), got {tuple(s.shape)}")
    if W == 0:  # no row (every sequence without queries): the index form is one -1 wide
        return cp.zeros((Hm, total_qb), dtype=cp.int32), cp.full((Hm, total_qb, 1), -1, dtype=cp.int32)
    if s.dtype not in (cp.float32, cp.float64):
        s = s.astype(cp.float64)
    s = cp.ascontiguousarray(s)
    if check_finite and s.size and int(count_bad(s, "score")):
        # Something is negative or not finite: in a sequence's scores (refused, as the batch
        # selection refuses it) or only in the padding past its nKb (never read: ignored).
        host = s.get()
        inside = np.arange(W)[None, :] < table[:, 3][:, None]  # [total_qb, W]
        v = host[:, inside]
        if ((v < 0) | ~np.isfinite(v)).any():
            raise ValueError("scores must be finite and non-negative")
    return selection.launch_select_packed(s, table, config)


# ----------------------------------------------------------------------------- the whole pipeline, queued
def _device_qkv(q: Any, k: Any, v: Any) -> tuple[Any, Any, Any, np.dtype]:
    """q, k, v as device arrays (:func:`device_input`) and their one dtype (``TypeError`` if k's or v's differs)."""
    (qd, dt), (kd, dtk), (vd, dtv) = (device_input(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
    for name, d in (("k", dtk), ("v", dtv)):
        if d != dt:
            raise TypeError(f"{name} has dtype {d} but q has {dt}; they must match")
    return qd, kd, vd, dt


def unisparse_attention_varlen(be: Any, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                               config: UniSparseConfig, *, check_finite: bool = True) -> tuple[Any, ...]:
    """The whole packed pipeline (SPEC 3-6), queued with no host synchronisation between its stages.

    The kernels and results of :func:`compress_varlen` -> :func:`block_scores_varlen` ->
    :func:`select_blocks_varlen` -> :func:`block_sparse_attention_varlen` (bit for bit), queued
    the way ``CupyBackend.unisparse_attention`` queues the batch pipeline. The chain of stages
    waits for the GPU twice (its NaN checks read their counts back after the pooling and before
    the attention), and each stage builds its host tables only when it is called, so the GPU
    idles while the host prepares the next launch (before session 6 every table also went up
    with ``cupy.asarray``, which waits for the kernels queued before it). Here, in order:

    1. the checks of the inputs and offsets (host), then the two poolings, their offsets in one
       asynchronous copy (``_device.upload_int32``), the
       scoring's operands (``scores.packed_operands``: keys centred, rows split; they need
       no work list) and the NaN/inf counts of the pooled q, k and of v kept on the device;
    2. while the GPU does those, the host builds the scoring's work list and descriptor table
       (``scores.device_packed_launch_config``), the selection's row table and the
       attention's tile list, and copies them in one more asynchronous upload (on the H200 the
       host took longer than the pooling alone, so the operands are queued before);
    3. scoring (one packed launch, or per sequence where :func:`scores.packed_applicable` says
       no), selection (one launch), attention (one launch of rung v9 where :func:`uses_v9`, else
       per sequence);
    4. with ``check_finite`` (default), the counts are read once, after every kernel has been
       queued: ``ValueError`` naming ``q``, ``k`` or ``v``, as the stages would have raised.
       ``check_finite=False``: no check and no synchronisation at all.

    Returns
    -------
    out, lse, kv_counts, kv_indices, scores, q_c, k_c, cu_seqlens_q, cu_seqlens_k
        As :class:`unisparse_ref.varlen.VarlenResult` holds them (CuPy arrays; the offsets checked,
        NumPy int32).
    """
    from . import selection

    config = check_config(config)
    check_no_packed_sinks(config, "unisparse_attention_varlen")
    be._refuse_variants(config, "cupy backend unisparse_attention_varlen")
    qd, kd, vd, dt = _device_qkv(q, k, v)
    cu_q, cu_k, Hq, Hkv, D = check_varlen_qkv(qd, kd, vd, cu_seqlens_q, cu_seqlens_k, causal=config.causal,
                                              shape_only=True)
    check_head_pooling(Hq, Hkv, config.c_h)
    f32 = np.dtype(np.float32)
    # 1. pooling (SPEC 3); the counts of the pooled tokens (a mean is non-finite iff an input of
    #    its group is, as compress_varlen checks) and of v
    S, Hm, nk = config.block_size, Hq // config.c_h, np.diff(cu_k)
    packed = scores.packed_applicable(config, D, _loader.max_dynamic_shared_memory())
    q_c, k_c, cu_c, cu_c_d = _queue_pooling(qd, kd, dt, cu_q, cu_k, config)
    # the scoring's operands (centred keys, split rows) need no work list: queued now, so that the
    # GPU has them and the counts to do while the host builds the tables below
    operands = scores.packed_operands(q_c, k_c, cu_c, cu_c_d, D) if packed else None
    counts = nonfinite_counts(("q", q_c, f32), ("k", k_c, f32), ("v", vd, dt)) if check_finite else None
    # 2. the host tables of the later stages, built while the GPU works, then one upload
    v9 = uses_v9(dt, D, S)
    lc = scores.device_packed_launch_config(cu_q, cu_k, Hm, D, config) if packed else None
    row_table = selection.packed_row_table(cu_q, cu_k, S)
    # (the packed scoring's descriptor table and work list; its composite-key offsets went up with the pooling's)
    host = [*(scores.packed_host_tables(lc)[:2] if packed else ()), row_table]
    if v9:
        host.append(_hopper.varlen_tiles(cu_q, nk, cu_k[:-1], S, config.causal))
    dev = upload_int32(*host)
    # 3. scores (SPEC 4), selection (SPEC 5), attention (SPEC 6)
    if packed:
        sc = scores.launch_scores_packed(q_c, k_c, cu_q, cu_k, config, lc=lc, device_tables=(dev[0], dev[1], cu_c_d),
                                         operands=operands)
    else:
        sc = _block_scores_per_sequence(be, q_c, k_c, cu_q, cu_k, packed_offsets(cu_q, config.c_q), cu_c, config)
    kv_counts, kv_indices = selection.launch_select_packed(sc, row_table, config, device_table=dev[2 if packed else 0])
    scale = config.scale_for(D)
    if v9:
        out, lse = _attend_v9(qd, kd, vd, kv_counts, kv_indices, cu_q, nk, cu_k[:-1], config, scale, tiles=dev[-1])
    else:
        out, lse = _attend_per_sequence(qd, kd, vd, kv_counts, kv_indices, cu_q, cu_k, config, scale)
    # 4. the one read-back
    if check_finite:
        raise_if_nonfinite(counts, ("q", "k", "v"))
    return wrap_output(out, dt), lse, kv_counts, kv_indices, sc, q_c, k_c, cu_q, cu_k


# ----------------------------------------------------------------------------- stage 4, packed and paged
def uses_v9(dtype: np.dtype, head_dim: int, block_size: int) -> bool:
    """Whether the packed attention runs in one launch of rung v9 here (else the per-sequence fallback)."""
    if str(dtype) not in ("float16", "bfloat16") or head_dim > max(_hopper.FA3_HEAD_DIMS):
        return False
    if block_size % _hopper.FA3_BR:
        return False
    return attention._has_sm90()


def _v9_head_dim(D: int) -> int:
    return min(d for d in _hopper.FA3_HEAD_DIMS if d >= D)


def _pad_d(x: Any, Dp: int) -> Any:
    cp = cupy_module()
    D = int(x.shape[-1])
    return x if Dp == D else cp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Dp - D)])


def _packed_mask(kv_counts: Any, kv_indices: Any, cu_q: np.ndarray, nk: np.ndarray, block_size: int,
                 Hm: int) -> tuple[Any, Any]:
    """The packed index form on the device: host arrays fully checked (:func:`check_packed_mask`);
    CuPy arrays (our own selection's output) checked for shape and dtype only, like the batch
    attention's index form (``validate=False``)."""
    cp = cupy_module()
    if isinstance(kv_counts, cp.ndarray) and isinstance(kv_indices, cp.ndarray):
        total_qb = int(packed_offsets(cu_q, block_size)[-1])
        width = max(1, geometry.num_blocks(int(np.asarray(nk).max(initial=0)), block_size))
        if (tuple(kv_counts.shape) != (Hm, total_qb) or kv_indices.ndim != 3
                or tuple(kv_indices.shape[:2]) != (Hm, total_qb) or kv_indices.shape[2] < width):
            raise ValueError(
                f"kv_counts must have shape [Hm={Hm}, total_qb={total_qb}] and kv_indices [Hm, total_qb, W >= "
                f"{width}], got {tuple(kv_counts.shape)} and {tuple(kv_indices.shape)}"
            )
        if kv_counts.dtype.kind not in "iu" or kv_indices.dtype.kind not in "iu":
            raise TypeError("kv_counts and kv_indices must be integer arrays")
        return (cp.ascontiguousarray(kv_counts, dtype=cp.int32), cp.ascontiguousarray(kv_indices, dtype=cp.int32))
    counts, idx, _ = check_packed_mask(kv_counts, kv_indices, cu_q, nk, block_size, Hm)
    return cp.asarray(counts), cp.asarray(idx)


def _attend_v9(qd: Any, kd: Any, vd: Any, counts: Any, indices: Any, cu_q: np.ndarray, nk: np.ndarray,
               k_start: np.ndarray, config: UniSparseConfig, scale: float, block_table: Any = None,
               page_size: int = 0, tiles: Any = None) -> tuple[Any, Any]:
    """One launch of ``us_fa3_fwd_varlen``; ``tiles``: :func:`_hopper.varlen_tiles` of these offsets
    already on the device (the queued pipeline uploads it ahead), else built and uploaded here."""
    cp = cupy_module()
    D = int(qd.shape[-1])
    Dp = _v9_head_dim(D)
    qd, kd, vd = (_pad_d(x, Dp) for x in (qd, kd, vd))
    if tiles is None:
        (tiles,) = upload_int32(_hopper.varlen_tiles(cu_q, nk, k_start, config.block_size, config.causal))
    total_qb = int(packed_offsets(cu_q, config.block_size)[-1])
    out, lse = _hopper.fa3_forward_varlen(
        qd, kd, vd, counts, indices, tiles, total_qb=total_qb, block_size=config.block_size,
        heads_per_mask=config.c_h, causal=config.causal, softmax_scale=scale, block_table=block_table,
        page_size=page_size)
    if Dp != D:
        out = cp.ascontiguousarray(out[..., :D])
    return out, lse


def _attend_per_sequence(qd: Any, kd: Any, vd: Any, counts: Any, indices: Any, cu_q: np.ndarray,
                         cu_k: np.ndarray, config: UniSparseConfig, scale: float) -> tuple[Any, Any]:
    """The fallback: the batch attention (:func:`~unisparse_ref.cupy_backend.attention.attention_forward`)
    on each sequence with queries, through ``[1, H, N_i, D]`` copies."""
    cp = cupy_module()
    total_q, Hq, D = (int(s) for s in qd.shape)
    out = cp.zeros_like(qd)
    lse = cp.empty((Hq, total_q), dtype=cp.float32)
    S = config.block_size
    cu_qb = packed_offsets(cu_q, S)
    Dp = attention.padded_head_dim(D)
    for i in range(cu_q.size - 1):
        nq, nk = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
        if nq == 0:
            continue
        qi, ki, vi = (cp.ascontiguousarray(_pad_d(x[int(c[i]):int(c[i + 1])], Dp).transpose(1, 0, 2)[None])
                      for x, c in ((qd, cu_q), (kd, cu_k), (vd, cu_k)))
        nkb = geometry.num_blocks(nk, S)
        ci = cp.ascontiguousarray(counts[None, :, cu_qb[i]:cu_qb[i + 1]])
        ii = cp.ascontiguousarray(indices[None, :, cu_qb[i]:cu_qb[i + 1], :nkb])
        o, l_ = attention.attention_forward(qi, ki, vi, ci, ii, nq=nq, nk=nk, block_size=S,
                                            heads_per_mask=config.c_h, causal=config.causal, softmax_scale=scale)
        out[int(cu_q[i]):int(cu_q[i + 1])] = o[0, :, :, :D].transpose(1, 0, 2)
        lse[:, int(cu_q[i]):int(cu_q[i + 1])] = l_[0]
    return out, lse


def block_sparse_attention_varlen(be: Any, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                                  kv_counts: Any, kv_indices: Any, config: UniSparseConfig, *,
                                  check_finite: bool = True) -> tuple[Any, Any]:
    """Exact attention over every sequence's selected blocks (SPEC 6), packed.

    One launch of ``us_fa3_fwd_varlen`` where :func:`uses_v9` (Hopper, float16 / bfloat16,
    ``S`` a multiple of 128); otherwise the batch kernels once per sequence.
    ``check_finite=False`` (the pipeline, whose pooling already checked ``q`` and ``k``) checks
    ``v`` only.

    Returns
    -------
    out : ``[total_q, Hq, D]`` of q's dtype, lse : cupy float32 ``[Hq, total_q]``
        (``-inf`` on rows with no allowed key).
    """
    config = check_config(config)
    qd, kd, vd, dt = _device_qkv(q, k, v)
    cu_q, cu_k, Hq, _, D = check_varlen_qkv(qd, kd, vd, cu_seqlens_q, cu_seqlens_k, causal=config.causal,
                                            shape_only=True)
    nk = np.diff(cu_k)
    counts, indices = _packed_mask(kv_counts, kv_indices, cu_q, nk, config.block_size, Hq // config.c_h)
    if check_finite:
        check_finite_device(("q", qd, dt), ("k", kd, dt), ("v", vd, dt))
    else:
        check_finite_device(("v", vd, dt))
    scale = config.scale_for(D)
    if uses_v9(dt, D, config.block_size):
        out, lse = _attend_v9(qd, kd, vd, counts, indices, cu_q, nk, cu_k[:-1], config, scale)
    else:
        out, lse = _attend_per_sequence(qd, kd, vd, counts, indices, cu_q, cu_k, config, scale)
    return wrap_output(out, dt), lse


def block_sparse_attention_paged(be: Any, q: Any, k_pages: Any, v_pages: Any, cu_seqlens_q: Any, block_table: Any,
                                 seqused_k: Any, kv_counts: Any, kv_indices: Any,
                                 config: UniSparseConfig, *, check_finite: bool = True) -> tuple[Any, Any]:
    """Packed queries against a paged KV cache (SPEC 6): the kernel reads ``block_table`` itself.

    ``k_pages``, ``v_pages [num_pages, page_size, Hkv, D]``; key ``s`` of sequence ``b`` is
    ``k_pages[block_table[b, s // page_size], s % page_size]``. One launch of
    ``us_fa3_fwd_varlen`` (no gather) where :func:`uses_v9` and ``page_size`` is a multiple
    of the key tile (128; 64 at ``D = 256``); otherwise the used pages are gathered on the
    device into a packed copy and :func:`block_sparse_attention_varlen` runs on it. The whole
    page arrays must be finite (unused slots included: a key tile may read past ``N_k,b``
    inside its last page, where a NaN would reach the P V product); they are checked, except
    the pages of a :class:`CupyPagedKVCache`, which are zero-initialised and written only by
    its checked :meth:`~CupyPagedKVCache.append`. ``check_finite=False`` (the pipeline, whose
    query pooling already checked ``q``) skips the check of ``q``.

    Returns
    -------
    out : ``[total_q, Hq, D]`` of q's dtype, lse : cupy float32 ``[Hq, total_q]``.
    """
    cp = cupy_module()
    config = check_config(config)
    (qd, dt), (kd, dtk), (vd, dtv) = (device_input(n, x) for n, x in
                                      (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)))
    for name, d in (("k_pages", dtk), ("v_pages", dtv)):
        if d != dt:
            raise TypeError(f"{name} has dtype {d} but q has {dt}; they must match")
    cu_q, table, used, Hq, Hkv, D = check_paged_qkv(qd, kd, vd, cu_seqlens_q, block_table, seqused_k,
                                                    causal=config.causal, shape_only=True)
    counts, indices = _packed_mask(kv_counts, kv_indices, cu_q, used, config.block_size, Hq // config.c_h)
    num_pages, page_size = int(kd.shape[0]), int(kd.shape[1])
    scale = config.scale_for(D)
    bc = _hopper.fa3_config(_v9_head_dim(D)).bc if D <= max(_hopper.FA3_HEAD_DIMS) else 0
    if uses_v9(dt, D, config.block_size) and bc and page_size % bc == 0:
        items = [("q", qd, dt)] if check_finite else []
        if not (_cache_pages(kd) and _cache_pages(vd)):  # a CupyPagedKVCache's pages: finite by construction
            items += [("k_pages", kd, dt), ("v_pages", vd, dt)]
        if items:
            check_finite_device(*items)
        k2, v2 = (x.reshape(num_pages * page_size, Hkv, D) for x in (kd, vd))
        k0 = np.zeros_like(used)
        table_d, tiles_d = upload_int32(table, _hopper.varlen_tiles(cu_q, used, k0, config.block_size, config.causal))
        out, lse = _attend_v9(qd, k2, v2, counts, indices, cu_q, used, k0, config, scale, block_table=table_d,
                              page_size=page_size, tiles=tiles_d)
        return wrap_output(out, dt), lse
    # Gather: slot of key s of sequence b = block_table[b, s // page_size] * page_size + s % page_size.
    slots = [table[b, np.arange(n) // page_size].astype(np.int64) * page_size + np.arange(n) % page_size
             for b, n in enumerate(used.tolist())]
    flat = cp.asarray(np.concatenate(slots) if slots else np.zeros(0, np.int64))
    k2, v2 = (x.reshape(num_pages * page_size, Hkv, D)[flat] for x in (kd, vd))
    cu_k = np.concatenate([[0], np.cumsum(used)]).astype(np.int32)
    check_finite_device(("q", qd, dt), ("k_pages", k2, dt), ("v_pages", v2, dt))
    if uses_v9(dt, D, config.block_size):
        out, lse = _attend_v9(qd, k2, v2, counts, indices, cu_q, used, cu_k[:-1], config, scale)
    else:
        out, lse = _attend_per_sequence(qd, k2, v2, counts, indices, cu_q, cu_k, config, scale)
    return wrap_output(out, dt), lse


# ----------------------------------------------------------------------------- the paged cache on the device
#: Device pointer of a CupyPagedKVCache's page array -> the cache (weakly): pages known to be finite.
_CACHE_PAGES: dict[int, Any] = {}


def _cache_pages(arr: Any) -> bool:
    """Whether ``arr`` (a CuPy array) is the page array of a live :class:`CupyPagedKVCache`."""
    ref = _CACHE_PAGES.get(int(arr.data.ptr))
    cache = ref() if ref is not None else None
    return cache is not None and any(int(x.data.ptr) == int(arr.data.ptr) and x.size == arr.size
                                     for x in (cache._k, cache._v))


class CupyPagedKVCache(PageTable):
    """The paged KV cache of :class:`~unisparse_ref.reference.paged.PagedKVCache` on the GPU (CuPy).

    The same layout, block table, page order and rules (``c_k`` divides ``page_size``; the
    composite keys of every group that new keys touch are recomputed, a partial last group
    included), with the pages and their composite keys in device memory:

    * ``k_pages``, ``v_pages``: CuPy ``[num_pages, page_size, Hkv, D]`` (bfloat16 as a bf16
      view of ``uint16`` storage), zero-initialised;
    * ``kc_pages``: CuPy float32 ``[num_pages, page_size // c_k, Hkv, D]``, written by the
      packed pooling kernel ``us_pool_varlen`` (the batch kernel's arithmetic: a sequence's
      cached composite keys are bit for bit ``CupyBackend.compress`` of the whole sequence);
    * ``block_table``, ``seqused_k``: int32 NumPy on the host (small; the bookkeeping is the
      reference's), copied to the device by the attention call.

    :meth:`append` writes the new keys and values into their pages with one scatter each and
    pools only the groups it touches; :meth:`packed_composite_keys` gathers every sequence's
    composite keys into a packed float32 array on the device (a small copy: one float32 row
    per ``c_k`` keys). :func:`unisparse_ref.unisparse_attention_paged` with ``backend="cupy"``
    reads it: queries pooled by ``us_pool_varlen``, composite keys from here, scores and
    selection per sequence, the attention ``us_fa3_fwd_varlen`` on the pages.

    The constructor takes the parameters of
    :class:`~unisparse_ref.reference.paged.PagedKVCache` (``dtype``: float16, bfloat16 or
    float32; default float16). Write the pages only through :meth:`append`: the attention
    trusts them to be finite.
    """

    def __init__(
        self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, batch: int = 1,
        max_pages: int | None = None, c_k: int = 16, dtype: Any = np.float16, page_order: Any = None,
    ) -> None:
        cp = cupy_module()
        # The reference's rules, messages and host bookkeeping: PageTable's (pagetable.py).
        super().__init__(num_pages, page_size, num_kv_heads, head_dim, batch=batch, max_pages=max_pages, c_k=c_k,
                         page_order=page_order)
        self.dtype = check_dtype("dtype", dtype)
        if self.dtype not in (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32)):
            raise TypeError(f"CupyPagedKVCache holds float16, bfloat16 or float32, got {self.dtype}")
        # The pages and their composite keys live on the device.
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        storage = cp.uint16 if self.dtype == BFLOAT16 else self.dtype
        self._k = cp.zeros(shape, dtype=storage)
        self._v = cp.zeros(shape, dtype=storage)
        self.kc_pages = cp.zeros((num_pages, page_size // c_k, num_kv_heads, head_dim), dtype=cp.float32)
        for pages in (self._k, self._v):  # finite by construction: the attention skips their check
            _CACHE_PAGES[int(pages.data.ptr)] = weakref.ref(self)

    @property
    def k_pages(self) -> Any:
        """CuPy ``[num_pages, page_size, Hkv, D]`` (bfloat16: a bf16 view of the ``uint16`` storage)."""
        return as_bfloat16(self._k) if self.dtype == BFLOAT16 else self._k

    @property
    def v_pages(self) -> Any:
        """Like :attr:`k_pages`."""
        return as_bfloat16(self._v) if self.dtype == BFLOAT16 else self._v

    @property
    def num_kv_heads(self) -> int:
        return int(self._k.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self._k.shape[3])

    def _flat_slots(self, seq: int, positions: np.ndarray) -> np.ndarray:
        ps = self.page_size
        return self.block_table[seq][positions // ps].astype(np.int64) * ps + positions % ps

    def append(self, k_new: Any, v_new: Any, seq: int = 0) -> None:
        """Append ``n`` keys and values ``[n, Hkv, D]`` (any accepted array; copied to the device) to ``seq``.

        As the reference's ``PagedKVCache.append``:
        pages assigned as needed, nothing written when a check fails (shapes, dtype,
        non-finite values, a full block-table row or pool); then one scatter of the keys and
        one of the values, and ``us_pool_varlen`` over the touched groups (group-aligned).
        """
        cp = cupy_module()
        self._check_seq(seq)
        (kd, dk), (vd, dv) = device_input("k_new", k_new), device_input("v_new", v_new)
        want = (self.num_kv_heads, self.head_dim)
        for name, x, d in (("k_new", kd, dk), ("v_new", vd, dv)):
            if x.ndim != 3 or tuple(x.shape[1:]) != want:
                raise ValueError(f"{name} must have shape [n, Hkv={want[0]}, D={want[1]}], got {tuple(x.shape)}")
            if check_dtype(name, d) != self.dtype:
                raise TypeError(f"{name} has dtype {d} but the cache holds {self.dtype}")
        if kd.shape != vd.shape:
            raise ValueError(f"v_new must have the shape of k_new {tuple(kd.shape)}, got {tuple(vd.shape)}")
        n, ps, c = int(kd.shape[0]), self.page_size, self.c_k
        if n == 0:
            return
        L, L_new, first_new_page, pages_needed = self._pages_for(seq, n)
        check_finite_device(("k_new", kd, dk), ("v_new", vd, dv))
        row = self._assign_pages(seq, first_new_page, pages_needed)
        Hkv, D = want
        k_flat, v_flat = (x.reshape(-1, Hkv, D) for x in (self._k, self._v))
        slots = cp.asarray(self._flat_slots(seq, np.arange(L, L_new)))
        k_flat[slots] = kd
        v_flat[slots] = vd
        # Composite keys of groups g0 .. g1-1 from the cached keys, the partial group [g0*c, L) included.
        g0, g1 = L // c, geometry.cdiv(L_new, c)
        tokens = k_flat[cp.asarray(self._flat_slots(seq, np.arange(g0 * c, L_new)))]
        kc = launch_pool_varlen(tokens, self.dtype, np.array([0, L_new - g0 * c], np.int32), c, 1)
        groups = np.arange(g0, g1) * c
        kc_rows = row[groups // ps].astype(np.int64) * (ps // c) + (groups % ps) // c
        self.kc_pages.reshape(-1, Hkv, D)[cp.asarray(kc_rows)] = kc
        self.seqused_k[seq] = L_new

    def append_varlen(self, k_new: Any, v_new: Any, cu_seqlens: Any) -> None:
        """Append a packed batch ``[total, Hkv, D]``: sequence ``b`` gets rows ``cu_seqlens[b]:cu_seqlens[b+1]``."""
        (kd, _), (vd, _) = device_input("k_new", k_new), device_input("v_new", v_new)
        cu = check_cu_seqlens("cu_seqlens", cu_seqlens, int(kd.shape[0]) if kd.ndim else -1)
        if cu.size - 1 != self.batch:
            raise ValueError(f"cu_seqlens describes {cu.size - 1} sequences, the cache holds {self.batch}")
        for b in range(self.batch):
            if cu[b + 1] > cu[b]:
                self.append(_wrap(kd[cu[b]:cu[b + 1]], self.dtype), _wrap(vd[cu[b]:cu[b + 1]], self.dtype), b)

    # ------------------------------------------------------------------ reading (device gathers)
    def _gather(self, pages: Any, seqs: range) -> Any:
        cp = cupy_module()
        parts = [self._flat_slots(b, np.arange(int(self.seqused_k[b]))) for b in seqs]
        idx = cp.asarray(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return pages.reshape(-1, self.num_kv_heads, self.head_dim)[idx]

    def keys(self, seq: int) -> Any:
        """Sequence ``seq``'s keys ``[N_k, Hkv, D]`` (a gathered device copy)."""
        return _wrap(self._gather(self._k, range(seq, seq + 1)), self.dtype)

    def values(self, seq: int) -> Any:
        """Sequence ``seq``'s values ``[N_k, Hkv, D]`` (a gathered device copy)."""
        return _wrap(self._gather(self._v, range(seq, seq + 1)), self.dtype)

    def _composite_rows(self, seqs: range) -> Any:
        cp = cupy_module()
        per_page, c = self.page_size // self.c_k, self.c_k
        parts = []
        for b in seqs:
            g = np.arange(geometry.cdiv(int(self.seqused_k[b]), c)) * c
            parts.append(self.block_table[b][g // self.page_size].astype(np.int64) * per_page
                         + (g % self.page_size) // c)
        idx = cp.asarray(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return self.kc_pages.reshape(-1, self.num_kv_heads, self.head_dim)[idx]

    def composite_keys(self, seq: int) -> Any:
        """Sequence ``seq``'s composite keys, CuPy float32 ``[ceil(N_k / c_k), Hkv, D]``."""
        return self._composite_rows(range(seq, seq + 1))

    def packed_keys(self) -> tuple[Any, Any, np.ndarray]:
        """Every sequence's keys and values packed (device copies), with their offsets."""
        everyone = range(self.batch)
        return (_wrap(self._gather(self._k, everyone), self.dtype), _wrap(self._gather(self._v, everyone), self.dtype),
                self.cu_seqlens_k)

    def packed_composite_keys(self) -> Any:
        """Every sequence's composite keys packed, CuPy float32 ``[sum C_b, Hkv, D]`` (a small device copy)."""
        return self._composite_rows(range(self.batch))

    def __repr__(self) -> str:
        return (f"CupyPagedKVCache(pages={self._k.shape[0]}, page_size={self.page_size}, c_k={self.c_k}, "
                f"batch={self.batch}, seqused_k={self.seqused_k.tolist()}, free={self.free_pages})")


def _wrap(bits: Any, dtype: np.dtype) -> Any:
    """Device storage as the logical dtype (bfloat16: a view of the uint16 bits)."""
    return as_bfloat16(bits) if dtype == BFLOAT16 else bits
