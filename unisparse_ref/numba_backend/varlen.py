"""Stage 4 of the Numba layer for serving layouts: packed (varlen) and paged block-sparse attention.

One kernel, ``_make_kernel``'s ``varlen_attention_kernel``, reads a packed ragged batch
directly, with no per-sequence launch and no repacking copy:

* queries ``q [total_q, Hq, D]`` and the output ``out [total_q, Hq, D]``: sequence ``b``'s
  rows start at ``cu_seqlens_q[b]``; ``lse [Hq, total_q]``;
* keys and values as pages ``k4``, ``v4 [num_pages, page_size, Hkv, D]``: key ``s`` of
  sequence ``b`` is ``k4[block_table[b, s // page_size], s % page_size]`` when ``paged``;
  a contiguous packed ``k [total_k, Hkv, D]`` is passed as one page
  (``k4 = k.reshape(1, total_k, Hkv, D)``) with key ``s`` at slot ``cu_seqlens_k[b] + s``;
  ``seqlen_k[b]`` is ``N_k,b`` either way;
* the masks in the packed index form: ``kv_counts [Hm, total_qb]``,
  ``kv_indices [Hm, total_qb, W]``, row ``cu_qblocks[b] + i`` for query block ``i`` of
  sequence ``b`` (:func:`unisparse_ref._arrays.check_packed_mask`).

The tile loop is that of ``unisparse_ref.numba_backend.attention`` (one thread block per query tile of ``Br`` rows
and head ``h``; K/V tiles of ``Bc`` keys in shared memory; the same
:func:`~unisparse_ref.numba_backend.attention.choose_tiles`), and the update of one tile (the
online softmax with float32 accumulation and ``P`` rounded to the input dtype) is the same
device function, ``unisparse_ref.numba_backend.attention.make_tile_update``; only the
addressing differs. Bottom-right causal alignment is per sequence:
``p(t) = t + N_k,b - N_q,b``.

Scheduling: the grid is ``(n_work, Hq)`` over a *work list* built on the host,
``work [n_work, 2] = (b, tile)`` for every query tile of every sequence, ordered longest
first across the whole batch (by the keys the tile's last row may see, ``p_last + 1`` when
causal, ``N_k,b`` otherwise), so that the heaviest tiles start first and no block is
launched for a sequence's missing tiles.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numpy import float32  # a conversion in kernels; cheaper than numba.float32 in the simulator

from .._arrays import packed_offsets
from ..geometry import cdiv
from ._simulator import simulator_launch
from .attention import _STORAGE, _jit_with_launch_bounds, choose_tiles, make_tile_update

__all__ = ["attend_varlen", "block_sparse_attention_varlen", "block_sparse_attention_paged", "work_list"]


def work_list(cu_seqlens_q: np.ndarray, seqlen_k: np.ndarray, br: int, causal: bool) -> np.ndarray:
    """int32 ``[n_work, 2]``: ``(b, tile)`` for every query tile of ``Br`` rows, longest first.

    A tile's length is the number of keys its last row may see (``p_last + 1`` when causal,
    ``N_k,b`` otherwise); ties keep ``(b, tile)`` order. Sequences without queries have no tile.
    """
    items, span = [], []
    nq_all = np.diff(np.asarray(cu_seqlens_q, dtype=np.int64))
    for b, (nq, nk) in enumerate(zip(nq_all, np.asarray(seqlen_k, dtype=np.int64), strict=True)):
        for tile in range(cdiv(int(nq), br)):
            items.append((b, tile))
            last_row = min((tile + 1) * br, int(nq)) - 1
            span.append(last_row + int(nk - nq) + 1 if causal else int(nk))
    if not items:
        return np.zeros((0, 2), dtype=np.int32)
    order = np.argsort(-np.asarray(span), kind="stable")
    return np.asarray(items, dtype=np.int32)[order]


_KERNELS: dict[tuple, object] = {}


def get_kernel(d: int, br: int, bc: int, tpr: int, dtype: np.dtype):
    """The varlen kernel specialised for ``D``, ``Br``, ``Bc``, ``TPR`` and dtype."""
    key = (d, br, bc, tpr, np.dtype(dtype))
    if key not in _KERNELS:
        _KERNELS[key] = _make_kernel(d, br, bc, tpr, _STORAGE[np.dtype(dtype)], np.dtype(dtype).itemsize)
    return _KERNELS[key]


def _make_kernel(D: int, BR: int, BC: int, TPR: int, storage, itemsize: int):
    """Build the kernel with its tile shapes as compile-time constants (as ``unisparse_ref.numba_backend.attention`` does).

    The update of one K/V tile is that module's ``unisparse_ref.numba_backend.attention.make_tile_update``;
    only the addressing of Q, K, V, the mask and the output is this kernel's own.
    """
    tile_update = make_tile_update(D, BC, TPR)
    THREADS = BR * TPR
    CPT = cdiv(BC, TPR)  # tile columns per thread
    DPT = cdiv(D, TPR)  # output dims per thread
    D_EXACT = D % TPR == 0
    DP = D + 4 // itemsize  # padded row length of the Q, K, V tiles
    BCP = BC + 4 // itemsize  # padded row length of the P tile

    def varlen_attention_kernel(q, k4, v4, cu_q, k_start, seqlen_k, block_table, page_size, paged, work,
                                cu_qb, kv_counts, kv_indices, S, heads_per_mask, group, causal, scale, out, lse):
        b = work[cuda.blockIdx.x, 0]  # this block's sequence
        tile = work[cuda.blockIdx.x, 1]  # and its query tile in that sequence
        h = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        row = tid // TPR
        lane = tid % TPR

        sQ = cuda.shared.array((BR, DP), storage)
        sK = cuda.shared.array((BC, DP), storage)
        sV = cuda.shared.array((BC, DP), storage)
        sP = cuda.shared.array((BR, BCP), storage)
        s_max = cuda.shared.array((BR, TPR), float32)
        s_sum = cuda.shared.array((BR, TPR), float32)

        q0 = cu_q[b]  # sequence b's first packed query row
        nq = cu_q[b + 1] - q0
        nk = seqlen_k[b]
        t0 = tile * BR  # first query row of the tile, in the sequence
        i = t0 // S  # its query block (Br divides S)
        qb = cu_qb[b] + i  # and that block's row of the packed mask
        g = h // heads_per_mask
        kvh = h // group
        t = t0 + row
        pos = t + (nk - nq)  # p(t), bottom-right aligned in sequence b
        tile_last_pos = min(t0 + BR, nq) - 1 + (nk - nq)

        for e in range(tid, BR * D, THREADS):
            rr = e // D
            dd = e % D
            if t0 + rr < nq:
                sQ[rr, dd] = q[q0 + t0 + rr, h, dd]
            else:
                sQ[rr, dd] = 0

        m_i = float32(-math.inf)
        l_i = float32(0.0)
        acc = cuda.local.array(DPT, float32)
        for kd in range(DPT):
            acc[kd] = float32(0.0)
        s_loc = cuda.local.array(CPT, float32)

        for sel in range(kv_counts[g, qb]):
            j = kv_indices[g, qb, sel]
            for kv0 in range(j * S, min((j + 1) * S, nk), BC):
                if causal and kv0 > tile_last_pos:
                    break
                cuda.syncthreads()  # the previous tile's reads of sK, sV, sP, s_max, s_sum are done

                # K_j, V_j tiles: key s of sequence b from its page (or its packed row).
                for e in range(tid, BC * D, THREADS):
                    cc = e // D
                    dd = e % D
                    s = kv0 + cc
                    if s < nk:
                        if paged:
                            page = block_table[b, s // page_size]
                            slot = s % page_size
                        else:
                            page = 0
                            slot = k_start[b] + s
                        sK[cc, dd] = k4[page, slot, kvh, dd]
                        sV[cc, dd] = v4[page, slot, kvh, dd]
                    else:
                        sK[cc, dd] = 0
                        sV[cc, dd] = 0
                cuda.syncthreads()  # sK, sV (and sQ, on the first tile) are complete before use

                live = t < nq and (not causal or kv0 <= pos)
                m_i, l_i = tile_update(sQ, sK, sV, sP, s_max, s_sum, row, lane, live, kv0, nk, pos, causal,
                                       scale, m_i, l_i, acc, s_loc)

        if t < nq:
            if l_i > float32(0.0):
                inv_l = float32(1.0) / l_i
                for kd in range(DPT):
                    d = lane + TPR * kd
                    if D_EXACT or d < D:
                        out[q0 + t, h, d] = acc[kd] * inv_l
                if lane == 0:
                    lse[h, q0 + t] = m_i + math.log(l_i)
            else:  # no allowed key: out 0, lse -inf (never NaN)
                for kd in range(DPT):
                    d = lane + TPR * kd
                    if D_EXACT or d < D:
                        out[q0 + t, h, d] = 0
                if lane == 0:
                    lse[h, q0 + t] = float32(-math.inf)

    return _jit_with_launch_bounds(varlen_attention_kernel, THREADS)


def _int32_device(x):
    """An int32 array on the device: CUDA arrays in place, host arrays copied."""
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x)
    return cuda.to_device(np.ascontiguousarray(x, dtype=np.int32))


def attend_varlen(q, k4, v4, cu_seqlens_q, seqlen_k, k_start, block_table, paged: bool, kv_counts, kv_indices,
                  block_size: int, heads_per_mask: int, causal: bool, scale: float):
    """Launch the kernel; returns ``(out [total_q, Hq, D] input dtype, lse float32 [Hq, total_q])`` device arrays.

    ``q [total_q, Hq, D]`` and ``k4``, ``v4 [num_pages, page_size, Hkv, D]`` are device arrays;
    ``cu_seqlens_q``, ``seqlen_k``, ``k_start``, ``block_table``, ``kv_counts``, ``kv_indices``
    host (int32) arrays, checked by the caller.
    """
    total_q, Hq, D = (int(s) for s in q.shape)
    Hkv = int(k4.shape[2])
    dtype = np.dtype(q.dtype)
    out = cuda.device_array((total_q, Hq, D), dtype=dtype)
    lse = cuda.device_array((Hq, total_q), dtype=np.float32)
    br, bc, tpr = choose_tiles(D, dtype, block_size)
    work = work_list(cu_seqlens_q, seqlen_k, br, causal)
    if work.shape[0] == 0:
        return out, lse  # no query in the batch
    kernel = get_kernel(D, br, bc, tpr, dtype)
    args = (
        q, k4, v4, _int32_device(cu_seqlens_q), _int32_device(k_start), _int32_device(seqlen_k),
        _int32_device(block_table), int(k4.shape[1]), bool(paged), _int32_device(work),
        _int32_device(packed_offsets(cu_seqlens_q, block_size)), _int32_device(kv_counts), _int32_device(kv_indices),
        block_size, heads_per_mask, Hq // Hkv, causal, np.float32(scale), out, lse,
    )
    with simulator_launch():
        kernel[(work.shape[0], Hq), br * tpr](*args)
    return out, lse


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices, block_size: int,
                                  heads_per_mask: int, causal: bool, scale: float):
    """Packed attention on device arrays ``q [total_q, Hq, D]``, ``k``, ``v [total_k, Hkv, D]`` (checked).

    The offsets and the packed masks are checked host int32 arrays. Returns
    ``(out [total_q, Hq, D], lse float32 [Hq, total_q])`` device arrays.
    """
    cu_k = np.asarray(cu_seqlens_k, dtype=np.int32)
    total_k, Hkv, D = (int(s) for s in k.shape)
    k4 = k.reshape(1, total_k, Hkv, D)  # one page holding every packed key
    v4 = v.reshape(1, total_k, Hkv, D)
    return attend_varlen(q, k4, v4, cu_seqlens_q, np.diff(cu_k), cu_k[:-1], np.zeros((1, 1), np.int32), False,
                         kv_counts, kv_indices, block_size, heads_per_mask, causal, scale)


def block_sparse_attention_paged(q, k_pages, v_pages, cu_seqlens_q, block_table, seqused_k, kv_counts, kv_indices,
                                 block_size: int, heads_per_mask: int, causal: bool, scale: float):
    """Packed queries against device pages ``[num_pages, page_size, Hkv, D]`` through ``block_table`` (checked).

    Returns ``(out [total_q, Hq, D], lse float32 [Hq, total_q])`` device arrays.
    """
    used = np.asarray(seqused_k, dtype=np.int32)
    return attend_varlen(q, k_pages, v_pages, cu_seqlens_q, used, np.zeros_like(used), block_table, True,
                         kv_counts, kv_indices, block_size, heads_per_mask, causal, scale)
