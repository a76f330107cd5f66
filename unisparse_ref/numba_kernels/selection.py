"""Stage 3 kernel: top-P block selection with forced blocks (SPEC section 5).

One thread block per row ``(b, g, i)`` of the scores ``[B, Hm, nQb, nKb]``:

1. *Rank* (all threads, strided over ``j``): the mask starts as the forced blocks ``F(i)``
   (sink and local, from :func:`unisparse_ref.geometry.forced_blocks`). Every candidate
   ``j`` (visible, not forced) computes its rank among the candidates,
   ``rank(j) = #{j' : s[j'] > s[j] or (s[j'] == s[j] and j' < j)}``: score descending, ties
   to the lower index. It writes ``order[rank(j)] = j``. Ranks are distinct, so this is a
   permutation and needs no atomics; ``O(nKb^2)`` comparisons per row, cheap next to the
   attention.
2. *Walk* (thread 0): ``m = sum(s[j] for j in F)`` added left to right in ascending ``j``,
   then ``while m < P`` take ``order[0], order[1], ...`` and add their scores. Float64
   throughout, in exactly the order of :func:`unisparse_ref.reference._selection` (a cumsum),
   so on identical float64 scores the mask is identical to the reference's. ``P = 1``
   (``keep_all``) keeps every visible block, whatever the rounding of the sums.

Deterministic: each output is written by one thread, in a fixed order.
"""

from __future__ import annotations

from numba import cuda
from numpy import float64  # a conversion in kernels; cheaper than numba.float64 in the simulator

from . import SIMULATOR

#: Threads per block of the selection kernel; one warp in the simulator, where every thread
#: is a Python thread and idle ones cost time.
THREADS = 32 if SIMULATOR else 128


def selection_geometry(B: int, Hm: int, nqb: int) -> tuple[tuple[int, int, int], int]:
    """``(grid, block)``: one thread block per row ``(i, g, b)``."""
    return (nqb, Hm, B), THREADS


@cuda.jit
def select_kernel(scores, visible, forced, P, keep_all, order, mask):
    """``mask[b, g, i, :]`` (uint8) from float64 ``scores``; ``visible``/``forced`` uint8 ``[nQb, nKb]``."""
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
        m = float64(0.0)
        n_cand = 0
        for j in range(nkb):
            if forced[i, j] != 0:
                m += scores[b, g, i, j]
            elif visible[i, j] != 0:
                n_cand += 1
        for k in range(n_cand):
            if m >= P:  # "while m < P": the block that carried m past P is already kept
                break
            j = order[b, g, i, k]
            mask[b, g, i, j] = 1
            m += scores[b, g, i, j]
