"""Stage 3 of the Numba layer: top-P block selection with forced blocks (SPEC section 5).

:func:`select_blocks` is the stage (the backend's ``select_blocks`` calls it on checked host
scores); :func:`select` launches its kernel, ``select_kernel``, with one thread block per
row ``(b, g, i)`` of the scores ``[B, Hm, nQb, nKb]``:

1. *Rank* (all threads, strided over ``j``): the mask starts as the forced blocks ``F(i)``
   (sink and local, from :func:`unisparse_ref.geometry.forced_blocks`). Every candidate
   ``j`` (visible, not forced) computes its rank among the candidates,
   ``rank(j) = #{j' : s[j'] > s[j] or (s[j'] == s[j] and j' < j)}``: score descending, ties
   to the lower index. It writes ``order[rank(j)] = j``. Ranks are distinct, so this is a
   permutation and needs no atomics; ``O(nKb^2)`` comparisons per row, cheap next to the
   attention.
2. *Walk* (thread 0): ``m = sum(s[j] for j in F)`` added left to right in ascending ``j``,
   then ``while m < P`` take ``order[0], order[1], ...`` and add their scores. Float64
   throughout, in exactly the order of the reference's cumulative sum
   (:func:`unisparse_ref.reference.selection.select_blocks`), so on identical float64 scores
   the mask is identical to the reference's. ``P = 1`` (``keep_all``) keeps every visible
   block, whatever the rounding of the sums.

   Research variant ``threshold_mode="remaining"`` (``remaining``; not SPEC): ``P`` applies to
   the mass outside the forced blocks. Thread 0 also adds the row's visible mass ``T`` (all
   visible blocks, ascending ``j``), sets ``target = P * (T - m_F)`` and takes candidates while
   their running mass (from 0, in rank order) is ``< target``: the reference's sums in the
   reference's order again.

Deterministic: each output is written by one thread, in a fixed order.
"""

from __future__ import annotations

import numpy as np
from numba import cuda
from numpy import float64  # a conversion in kernels; cheaper than numba.float64 in the simulator

from ..blockmask import BlockMask
from ..config import UniSparseConfig
from ..geometry import forced_blocks, visible_blocks
from ._simulator import SIMULATOR, simulator_launch

#: Threads per block of the selection kernel; one warp in the simulator, where every thread
#: is a Python thread and idle ones cost time.
THREADS = 32 if SIMULATOR else 128


def selection_geometry(B: int, Hm: int, nqb: int) -> tuple[tuple[int, int, int], int]:
    """``(grid, block)``: one thread block per row ``(i, g, b)``."""
    return (nqb, Hm, B), THREADS


@cuda.jit
def select_kernel(scores, visible, forced, P, keep_all, remaining, order, mask):
    """``mask[b, g, i, :]`` (uint8) from float64 ``scores``; ``visible``/``forced`` uint8 ``[nQb, nKb]``.

    ``remaining``: the research option ``threshold_mode="remaining"`` (else SPEC's total mass).
    """
    i = cuda.blockIdx.x
    g = cuda.blockIdx.y
    b = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    nkb = scores.shape[3]

    # Phase 1: forced blocks in, candidates ranked.
    for j in range(tid, nkb, THREADS):
        if keep_all:
            mask[b, g, i, j] = visible[i, j]
        else:
            mask[b, g, i, j] = forced[i, j]
            if visible[i, j] != 0 and forced[i, j] == 0:
                s = scores[b, g, i, j]
                rank = 0
                for j2 in range(nkb):
                    if visible[i, j2] != 0 and forced[i, j2] == 0:
                        s2 = scores[b, g, i, j2]
                        if s2 > s or (s2 == s and j2 < j):
                            rank += 1
                order[b, g, i, rank] = j
    cuda.syncthreads()  # order[] is complete (written by all threads) before thread 0 walks it

    # Phase 2: the cumulative walk to P, sequential and in float64.
    if tid == 0 and not keep_all:
        m = float64(0.0)  # m_F: the forced mass, ascending j
        n_cand = 0
        for j in range(nkb):
            if forced[i, j] != 0:
                m += scores[b, g, i, j]
            elif visible[i, j] != 0:
                n_cand += 1
        target = P
        if remaining:
            total = float64(0.0)  # T: the row's visible mass, ascending j
            for j in range(nkb):
                if visible[i, j] != 0:
                    total += scores[b, g, i, j]
            target = P * (total - m)
            m = float64(0.0)  # the candidates' running mass starts from 0
        for k in range(n_cand):
            if m >= target:  # "while m < target": the block that carried m past it is already kept
                break
            j = order[b, g, i, k]
            mask[b, g, i, j] = 1
            m += scores[b, g, i, j]


def select(scores, visible, forced, threshold: float, remaining: bool = False):
    """Launch ``select_kernel`` on host arrays; ``(mask uint8, order int32)`` device arrays.

    ``scores`` float64 ``[B, Hm, nQb, nKb]``; ``visible``, ``forced`` uint8 ``[nQb, nKb]``;
    ``threshold`` is ``P``; ``remaining`` the research option ``threshold_mode="remaining"``.
    ``order[b, g, i, :n]`` lists the ``n`` candidates of row ``(b, g, i)`` by rank (the rest of the row is unwritten); ``P >= 1`` keeps every visible
    block and ranks nothing.
    """
    order = cuda.device_array(scores.shape, dtype=np.int32)
    mask = cuda.device_array(scores.shape, dtype=np.uint8)
    B, Hm, nqb, _ = scores.shape
    grid, block = selection_geometry(B, Hm, nqb)
    P = float(threshold)
    with simulator_launch():
        select_kernel[grid, block](
            cuda.to_device(np.ascontiguousarray(scores)), cuda.to_device(visible), cuda.to_device(forced), P, P >= 1.0,
            bool(remaining), order, mask
        )
    return mask, order


def select_blocks(scores: np.ndarray, config: UniSparseConfig, nq: int, nk: int) -> BlockMask:
    """Stage 3 on checked host scores, float64 ``[B, Hm, nQb, nKb]``; a :class:`BlockMask` with a NumPy mask.

    The visible and forced blocks come from :mod:`unisparse_ref.geometry`; the mask is
    copied back to the host, since a ``BlockMask`` holds NumPy or CuPy masks only.
    """
    S = config.block_size
    visible = visible_blocks(nq, nk, S, config.causal).astype(np.uint8)
    forced = forced_blocks(nq, nk, S, config.n_sink_blocks, config.n_local_blocks, config.causal).astype(np.uint8)
    mask, _ = select(scores, visible, forced, config.threshold, config.threshold_mode == "remaining")
    return BlockMask(mask.copy_to_host().astype(bool), S, config.c_h, nq, nk, config.causal)
