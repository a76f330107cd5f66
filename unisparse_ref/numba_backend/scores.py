"""Stage 2 kernels: block scores from composite tokens (SPEC section 4).

For composite head ``g`` (KV head ``(g*c_h) // G``) and composite query ``r``:

* logits ``x[r, c] = scale * Qh[r] . Kc[c]`` over the composite keys ``c`` visible to ``r``
  (causal: ``c*c_k <= p(last(r))``, ``last(r) = min((r+1)*c_q, Nq) - 1``, exactly
  :func:`unisparse_ref.geometry.composite_visibility`); since ``c`` is visible iff
  ``c <= p(last(r)) // c_k``, the visible keys are the prefix ``c < n_vis(r)``;
* ``A[r, c] = exp(x[r, c] - M_r) / L_r``, a *global* softmax over the whole compressed row
  (``M_r`` the row max, ``L_r`` the row sum of ``exp(x - M_r)``);
* ``scores[i, j] = (1/R_i) * sum(A[r, c] for r in query block i, c in key block j)``.

:func:`block_scores` is the stage (the backend's ``block_scores`` calls it on float64 device
arrays); it launches three kernels, through :func:`transpose` and :func:`row_stats` for the
first two, and the ``[R, C]`` matrix ``A`` is never stored:

1. ``transpose_kernel`` copies ``Qh`` and ``Kc`` to ``[B, H, D, n]`` layouts, so that
   threads that differ in the token index read consecutive addresses (coalesced).
2. ``row_stats_kernel``, one thread per ``(b, g, r)``: an online softmax (running max
   ``M`` and sum ``L``, rescaled when the max grows) along the row's visible keys. The
   threads of a warp hold consecutive ``r`` and read the same ``Kc[c]`` (a broadcast).
3. :func:`block_scores_kernel`, one thread block per query block ``(b, g, i)``. First each
   thread takes composite keys ``c = tid, tid + THREADS, ...`` and sums the column
   ``a[c] = sum(A[r, c] for r in block i)``, recomputing the logits; then, after a barrier,
   thread ``j`` adds up ``a[c]`` over the ``S/c_k`` composite keys of key block ``j`` in
   order and divides by ``R_i``. One thread per output and fixed summation orders: no
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

from ..config import UniSparseConfig
from ..geometry import cdiv, num_blocks
from ._simulator import SIMULATOR, simulator_launch

#: Threads per block of the scoring kernels;
#: one warp in the simulator, where every thread is a Python thread and idle ones cost time.
THREADS = 32 if SIMULATOR else 128
#: Largest grid (x) of the transpose; its grid-stride loop covers the rest.
MAX_BLOCKS = 65535


def transpose_geometry(total: int) -> tuple[int, int]:
    """``(grid, block)`` of ``transpose_kernel`` over ``total`` elements."""
    return max(1, min(cdiv(total, THREADS), MAX_BLOCKS)), THREADS


def row_stats_geometry(B: int, Hm: int, R: int) -> tuple[tuple[int, int, int], int]:
    """``(grid, block)`` of ``row_stats_kernel``: one thread per composite query ``r`` of ``(g, b)``."""
    return (cdiv(R, THREADS), Hm, B), THREADS


def block_scores_geometry(B: int, Hm: int, nqb: int) -> tuple[tuple[int, int, int], int]:
    """``(grid, block)`` of :func:`block_scores_kernel`: one block per query block ``(i, g, b)``."""
    return (nqb, Hm, B), THREADS


@cuda.jit
def transpose_kernel(x, out):
    """``out[b, h, d, n] = x[b, h, n, d]`` (consecutive threads write consecutive ``n``)."""
    B, H, D, N = out.shape
    for idx in range(cuda.grid(1), B * H * D * N, cuda.gridsize(1)):
        n = idx % N
        d = (idx // N) % D
        h = (idx // (N * D)) % H
        b = idx // (N * D * H)
        out[b, h, d, n] = x[b, h, n, d]


@cuda.jit(device=True, inline=True)
def visible_composites(r, c_q, c_k, nq, nk, C, causal):
    """``n_vis(r)``: composite keys ``c < n_vis(r)`` are visible to composite query ``r``."""
    if not causal:
        return C
    last_pos = min((r + 1) * c_q, nq) - 1 + (nk - nq)  # p(last(r)) >= 0 since nq <= nk
    return min(C, last_pos // c_k + 1)


@cuda.jit
def row_stats_kernel(q_t, k_t, scale, c_q, c_k, c_h, group, nq, nk, causal, row_max, row_sum):
    """``row_max[b, g, r] = M_r``, ``row_sum[b, g, r] = L_r``; ``q_t [B,Hm,D,R]``, ``k_t [B,Hkv,D,C]``."""
    r = cuda.grid(1)  # this thread's composite query
    g = cuda.blockIdx.y
    b = cuda.blockIdx.z
    if r >= q_t.shape[3]:
        return
    D = q_t.shape[2]
    kvh = (g * c_h) // group  # composite head g scores against KV head (g*c_h)//G
    n_vis = visible_composites(r, c_q, c_k, nq, nk, k_t.shape[3], causal)
    m = float64(-math.inf)
    l = float64(0.0)
    for c in range(n_vis):
        acc = float64(0.0)
        for d in range(D):  # q_t: the warp reads consecutive r; k_t: one address (broadcast)
            acc += q_t[b, g, d, r] * k_t[b, kvh, d, c]
        x = scale * acc
        if x > m:
            l = l * math.exp(m - x) + float64(1.0)  # rescale the sum to the new max; exp(-inf) = 0
            m = x
        else:
            l += math.exp(x - m)
    row_max[b, g, r] = m
    row_sum[b, g, r] = l


@cuda.jit
def block_scores_kernel(q_c, k_t, row_max, row_sum, scale, S, c_q, c_k, c_h, group, nq, nk, causal,
                        colsum, scores):
    """``scores[b, g, i, j] = (1/R_i) sum_{c in j} sum_{r in i} exp(x[r, c] - M_r) / L_r``.

    ``q_c [B,Hm,R,D]``, ``k_t [B,Hkv,D,C]``; ``colsum [B,Hm,nQb,C]`` is scratch.
    """
    i = cuda.blockIdx.x
    g = cuda.blockIdx.y
    b = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    R = q_c.shape[2]
    D = q_c.shape[3]
    C = k_t.shape[3]
    nkb = scores.shape[3]
    kvh = (g * c_h) // group
    r_lo = i * (S // c_q)  # composite queries of query block i (c_q divides S)
    r_hi = min(r_lo + S // c_q, R)

    # Column sums a[c] over the rows of block i (rows that do not see c add nothing).
    for c in range(tid, C, THREADS):
        a = float64(0.0)
        for r in range(r_lo, r_hi):
            if c < visible_composites(r, c_q, c_k, nq, nk, C, causal):
                acc = float64(0.0)
                for d in range(D):  # q_c: one address for the warp; k_t: consecutive c
                    acc += q_c[b, g, r, d] * k_t[b, kvh, d, c]
                a += math.exp(scale * acc - row_max[b, g, r]) / row_sum[b, g, r]
        colsum[b, g, i, c] = a
    cuda.syncthreads()  # every a[c] of this block is written before the block sums read them

    # Block sums: thread j adds the S/c_k columns of key block j in ascending c.
    for j in range(tid, nkb, THREADS):
        acc = float64(0.0)
        for c in range(j * (S // c_k), min((j + 1) * (S // c_k), C)):
            acc += colsum[b, g, i, c]
        scores[b, g, i, j] = acc / float64(r_hi - r_lo)  # divide by R_i


def transpose(x):
    """Launch ``transpose_kernel``: a new device array ``[B, H, D, n]`` from ``x [B, H, n, D]``."""
    B, H, N, D = x.shape
    out = cuda.device_array((B, H, D, N), dtype=x.dtype)
    grid, block = transpose_geometry(out.size)
    transpose_kernel[grid, block](x, out)
    return out


def row_stats(q_t, k_t, config: UniSparseConfig, group: int, nq: int, nk: int):
    """Launch ``row_stats_kernel``: float64 device arrays ``(row_max, row_sum)``, each ``[B, Hm, R]``.

    ``q_t [B,Hm,D,R]`` and ``k_t [B,Hkv,D,C]`` are the transposed composite tokens
    (:func:`transpose`); ``group`` is ``G = Hq // Hkv``.
    """
    B, Hm, D, R = q_t.shape
    row_max = cuda.device_array((B, Hm, R), dtype=float64)
    row_sum = cuda.device_array((B, Hm, R), dtype=float64)
    grid, block = row_stats_geometry(B, Hm, R)
    row_stats_kernel[grid, block](q_t, k_t, float64(config.scale_for(D)), config.c_q, config.c_k, config.c_h,
                                  group, nq, nk, config.causal, row_max, row_sum)
    return row_max, row_sum


def block_scores(q_c, k_c, config: UniSparseConfig, nq: int, nk: int):
    """Stage 2 on float64 device arrays ``q_c [B,Hm,R,D]``, ``k_c [B,Hkv,C,D]`` (already checked).

    Returns the block scores, a float64 device array ``[B, Hm, nQb, nKb]`` whose rows sum to 1.
    """
    B, Hm, R, D = q_c.shape
    Hkv, C = k_c.shape[1], k_c.shape[2]
    S = config.block_size
    G = Hm * config.c_h // Hkv
    nqb, nkb = num_blocks(nq, S), num_blocks(nk, S)
    q_t, k_t = transpose(q_c), transpose(k_c)  # [B, H, D, n] layouts: coalesced
    row_max, row_sum = row_stats(q_t, k_t, config, G, nq, nk)
    colsum = cuda.device_array((B, Hm, nqb, C), dtype=float64)
    out = cuda.device_array((B, Hm, nqb, nkb), dtype=float64)
    grid, block = block_scores_geometry(B, Hm, nqb)
    with simulator_launch():
        block_scores_kernel[grid, block](q_c, k_t, row_max, row_sum, float64(config.scale_for(D)), S, config.c_q,
                                         config.c_k, config.c_h, G, nq, nk, config.causal, colsum, out)
    return out
