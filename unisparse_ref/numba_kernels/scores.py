"""Stage 2 kernels: block scores from composite tokens (SPEC section 4).

For composite head ``g`` (KV head ``(g*c_h) // G``) and composite query ``r``:

* logits ``x[r, c] = scale * Qh[r] . Kc[c]`` over the composite keys ``c`` visible to ``r``
  (causal: ``c*c_k <= p(last(r))``, ``last(r) = min((r+1)*c_q, Nq) - 1``, exactly
  :func:`unisparse_ref.geometry.composite_visibility`); since ``c`` is visible iff
  ``c <= p(last(r)) // c_k``, the visible keys are the prefix ``c < n_vis(r)``;
* ``A[r, c] = exp(x[r, c] - M_r) / L_r``, a *global* softmax over the whole compressed row
  (``M_r`` the row max, ``L_r`` the row sum of ``exp(x - M_r)``);
* ``scores[i, j] = (1/R_i) * sum(A[r, c] for r in query block i, c in key block j)``.

Two kernels, so that no block-sized scratch of the whole ``[R, C]`` matrix is ever stored:

1. :func:`row_stats_kernel`, one thread per ``(b, g, r)``: an online softmax (running max
   ``M`` and sum ``L``, rescaled when the max grows) along the row's visible keys.
2. :func:`block_scores_kernel`, one thread block per ``(b, g, i)``: thread ``tid`` owns the
   key blocks ``j = tid, tid + THREADS, ...`` and sums ``A[r, c]`` over its ``R_i x S/c_k``
   entries, recomputing the logits. One thread per output, fixed summation order: no
   atomics, bit-reproducible.

Everything is float64 (composite tokens, logits, exponentials, sums), like the reference:
the selection runs on these scores, and float32 sums over thousands of composite keys
(relative error ~1e-6 at 32K tokens) would put about one row in a thousand outside the
eps-valid band of SPEC section 7. The work is ``R x C x D``, ``c_q * c_k`` (256 by default)
times less than the attention's, and the H200's float64 rate is half its float32 rate, so
this costs little. The backend declares ``score_eps = 1e-9`` accordingly.
"""

from __future__ import annotations

import math

from numba import cuda
from numpy import float64  # a conversion in kernels; cheaper than numba.float64 in the simulator

from ..geometry import cdiv
from . import SIMULATOR

#: Threads per block of both scoring kernels;
#: one warp in the simulator, where every thread is a Python thread and idle ones cost time.
THREADS = 32 if SIMULATOR else 128


def row_stats_geometry(B: int, Hm: int, R: int) -> tuple[tuple[int, int, int], int]:
    """``(grid, block)`` of :func:`row_stats_kernel`: one thread per composite query ``r`` of ``(g, b)``."""
    return (cdiv(R, THREADS), Hm, B), THREADS


def block_scores_geometry(B: int, Hm: int, nqb: int) -> tuple[tuple[int, int, int], int]:
    """``(grid, block)`` of :func:`block_scores_kernel`: one block per query block ``(i, g, b)``."""
    return (nqb, Hm, B), THREADS


@cuda.jit(device=True, inline=True)
def visible_composites(r, c_q, c_k, nq, nk, C, causal):
    """``n_vis(r)``: composite keys ``c < n_vis(r)`` are visible to composite query ``r``."""
    if not causal:
        return C
    last_pos = min((r + 1) * c_q, nq) - 1 + (nk - nq)  # p(last(r)) >= 0 since nq <= nk
    return min(C, last_pos // c_k + 1)


@cuda.jit(device=True, inline=True)
def composite_logit(q_c, k_c, b, g, r, kvh, c, scale):
    """``scale * Qh[b, g, r] . Kc[b, kvh, c]`` in float64."""
    acc = float64(0.0)
    for d in range(q_c.shape[3]):
        acc += q_c[b, g, r, d] * k_c[b, kvh, c, d]
    return scale * acc


@cuda.jit
def row_stats_kernel(q_c, k_c, scale, c_q, c_k, c_h, group, nq, nk, causal, row_max, row_sum):
    """``row_max[b, g, r] = M_r`` and ``row_sum[b, g, r] = L_r`` of every compressed row."""
    r = cuda.grid(1)  # this thread's composite query
    g = cuda.blockIdx.y
    b = cuda.blockIdx.z
    if r >= q_c.shape[2]:
        return
    kvh = (g * c_h) // group  # composite head g scores against KV head (g*c_h)//G
    n_vis = visible_composites(r, c_q, c_k, nq, nk, k_c.shape[2], causal)
    # Online softmax along the row: the threads of a warp read the same Kc[c] (a broadcast).
    m = float64(-math.inf)
    l = float64(0.0)
    for c in range(n_vis):
        x = composite_logit(q_c, k_c, b, g, r, kvh, c, scale)
        if x > m:
            l = l * math.exp(m - x) + float64(1.0)  # rescale the sum to the new max; exp(-inf) = 0
            m = x
        else:
            l += math.exp(x - m)
    row_max[b, g, r] = m
    row_sum[b, g, r] = l


@cuda.jit
def block_scores_kernel(q_c, k_c, row_max, row_sum, scale, S, c_q, c_k, c_h, group, nq, nk, causal, scores):
    """``scores[b, g, i, j] = (1/R_i) sum_{r in i, c in j} exp(x[r, c] - M_r) / L_r``."""
    i = cuda.blockIdx.x
    g = cuda.blockIdx.y
    b = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    R = q_c.shape[2]
    C = k_c.shape[2]
    nkb = scores.shape[3]
    kvh = (g * c_h) // group
    r_lo = i * (S // c_q)  # composite queries of query block i (c_q divides S)
    r_hi = min(r_lo + S // c_q, R)
    for j in range(tid, nkb, THREADS):  # this thread owns key block j: no other thread writes it
        c_lo = j * (S // c_k)  # composite keys of key block j
        c_hi = min(c_lo + S // c_k, C)
        acc = float64(0.0)
        for r in range(r_lo, r_hi):
            m = row_max[b, g, r]
            l = row_sum[b, g, r]
            c_end = min(c_hi, visible_composites(r, c_q, c_k, nq, nk, C, causal))
            for c in range(c_lo, c_end):
                acc += math.exp(composite_logit(q_c, k_c, b, g, r, kvh, c, scale) - m) / l
        scores[b, g, i, j] = acc / float64(r_hi - r_lo)  # divide by R_i
