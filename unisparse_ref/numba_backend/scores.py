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

Research variants (not SPEC; the options of :class:`~unisparse_ref.UniSparseConfig`, as in
:func:`unisparse_ref.reference.scores.variant_log_weights`). With ``sink_tokens = t > 0`` the
key columns are the ``t`` un-pooled sinks followed by the ``C`` composite keys (``W = t + C``
columns; the sinks and composite 0 lie in key block 0); with ``sink_tokens`` or
``diagonal_correction`` set, :func:`column_log_weight` adds ``log w[r, j]`` to the logit of
column ``j`` (the number of keys the column stands for, times the exact share of causally
visible token pairs; ``-inf``: invisible). Otherwise the offset is 0 on the visible prefix and
the arithmetic is SPEC's. The visible columns of row ``r`` all lie in the prefix
``j < t + n_vis(r)``; a column there whose weight is 0 is skipped.

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


@cuda.jit(device=True, inline=True)
def column_log_weight(r, j, t, c_q, c_k, nq, nk, C, causal, weighted, diag):
    """The offset added to the logit of column ``j`` for composite query ``r``; ``-inf``: left out.

    SPEC (``weighted`` false, ``t = 0``): 0 for a visible composite key, ``-inf`` otherwise.
    Research variants (``weighted``): ``log w[r, j]`` of
    :func:`unisparse_ref.reference.scores.variant_log_weights`, with column ``j`` standing for
    the keys ``[lo, hi)`` (sink ``j < t``: ``[j, j+1)``; composite ``c = j - t``: SPEC's group,
    from ``t`` for ``c = 0``) and ``w`` = visibility (SPEC's rule on the column's first key)
    x the share of visible token pairs (``diag``, causal only) x ``hi - lo`` (``t > 0``).
    """
    if not weighted:
        if j < visible_composites(r, c_q, c_k, nq, nk, C, causal):
            return float64(0.0)
        return -math.inf
    if j < t:  # an un-pooled sink key
        first = j
        lo = j
        hi = min(j + 1, nk)
    else:
        c = j - t
        first = c * c_k
        lo = t if c == 0 else c * c_k  # composite 0 starts after the sinks
        hi = min((c + 1) * c_k, nk)
    n = max(hi - lo, 0)  # keys the column stands for (0: an empty composite 0)
    w = float64(1.0)
    if causal:
        t0 = r * c_q  # query tokens [t0, t1) of composite query r
        t1 = min(t0 + c_q, nq)
        off = nk - nq  # p(token) = token + off
        if first > t1 - 1 + off:
            return -math.inf  # invisible: its first key comes after p(last(r))
        if diag:
            pairs = 0  # pairs (token u in r, key s in [lo, hi)) with s <= p(u)
            for u in range(t0, t1):
                pairs += min(max(u + off - lo + 1, 0), n)
            w = w * (float64(pairs) / (float64(t1 - t0) * float64(n if n > 0 else 1)))
    if t > 0:
        w = w * float64(n)
    if w > 0.0:
        return math.log(w)
    return -math.inf


@cuda.jit(device=True, inline=True)
def key_block_columns(kb, t, S, c_k, C):
    """Columns ``[lo, hi)`` of key block ``kb``: its composite keys, and for ``kb = 0`` the ``t`` sinks."""
    per = S // c_k  # composite keys per key block (c_k divides S)
    lo = 0 if kb == 0 else t + kb * per
    hi = t + min((kb + 1) * per, C)
    return lo, hi


@cuda.jit
def row_stats_kernel(q_t, k_t, scale, c_q, c_k, c_h, group, nq, nk, causal, t, weighted, diag, row_max, row_sum):
    """``row_max[b, g, r] = M_r``, ``row_sum[b, g, r] = L_r``; ``q_t [B,Hm,D,R]``, ``k_t [B,Hkv,D,t+C]``."""
    r = cuda.grid(1)  # this thread's composite query
    g = cuda.blockIdx.y
    b = cuda.blockIdx.z
    if r >= q_t.shape[3]:
        return
    D = q_t.shape[2]
    C = k_t.shape[3] - t
    kvh = (g * c_h) // group  # composite head g scores against KV head (g*c_h)//G
    n_cols = t + visible_composites(r, c_q, c_k, nq, nk, C, causal)  # every visible column is below
    m = float64(-math.inf)
    l = float64(0.0)
    for j in range(n_cols):
        lw = column_log_weight(r, j, t, c_q, c_k, nq, nk, C, causal, weighted, diag)
        if lw == -math.inf:
            continue
        acc = float64(0.0)
        for d in range(D):  # q_t: the warp reads consecutive r; k_t: one address (broadcast)
            acc += q_t[b, g, d, r] * k_t[b, kvh, d, j]
        x = scale * acc + lw
        if x > m:
            l = l * math.exp(m - x) + float64(1.0)  # rescale the sum to the new max; exp(-inf) = 0
            m = x
        else:
            l += math.exp(x - m)
    row_max[b, g, r] = m
    row_sum[b, g, r] = l


@cuda.jit
def block_scores_kernel(q_c, k_t, row_max, row_sum, scale, S, c_q, c_k, c_h, group, nq, nk, causal, t, weighted,
                        diag, colsum, scores):
    """``scores[b, g, i, kb] = (1/R_i) sum_{j in kb} sum_{r in i} exp(x[r, j] - M_r) / L_r``.

    ``q_c [B,Hm,R,D]``, ``k_t [B,Hkv,D,t+C]``; ``colsum [B,Hm,nQb,t+C]`` is scratch.
    """
    i = cuda.blockIdx.x
    g = cuda.blockIdx.y
    b = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    R = q_c.shape[2]
    D = q_c.shape[3]
    W = k_t.shape[3]  # key columns: t sinks + C composite keys
    C = W - t
    nkb = scores.shape[3]
    kvh = (g * c_h) // group
    r_lo = i * (S // c_q)  # composite queries of query block i (c_q divides S)
    r_hi = min(r_lo + S // c_q, R)

    # Column sums a[j] over the rows of block i (rows that do not see j add nothing).
    for j in range(tid, W, THREADS):
        a = float64(0.0)
        for r in range(r_lo, r_hi):
            lw = column_log_weight(r, j, t, c_q, c_k, nq, nk, C, causal, weighted, diag)
            if lw != -math.inf:
                acc = float64(0.0)
                for d in range(D):  # q_c: one address for the warp; k_t: consecutive j
                    acc += q_c[b, g, r, d] * k_t[b, kvh, d, j]
                a += math.exp(scale * acc + lw - row_max[b, g, r]) / row_sum[b, g, r]
        colsum[b, g, i, j] = a
    cuda.syncthreads()  # every a[j] of this block is written before the block sums read them

    # Block sums: thread kb adds the columns of key block kb in ascending j.
    for kb in range(tid, nkb, THREADS):
        lo, hi = key_block_columns(kb, t, S, c_k, C)
        acc = float64(0.0)
        for j in range(lo, hi):
            acc += colsum[b, g, i, j]
        scores[b, g, i, kb] = acc / float64(r_hi - r_lo)  # divide by R_i


def transpose(x):
    """Launch ``transpose_kernel``: a new device array ``[B, H, D, n]`` from ``x [B, H, n, D]``."""
    B, H, N, D = x.shape
    out = cuda.device_array((B, H, D, N), dtype=x.dtype)
    grid, block = transpose_geometry(out.size)
    transpose_kernel[grid, block](x, out)
    return out


def _variant_args(config: UniSparseConfig) -> tuple[int, bool, bool]:
    """``(t, weighted, diag)`` of the kernels: the research options (``(0, False, False)`` is SPEC)."""
    t = config.sink_tokens
    return t, bool(t > 0 or config.diagonal_correction), bool(config.diagonal_correction)


def row_stats(q_t, k_t, config: UniSparseConfig, group: int, nq: int, nk: int):
    """Launch ``row_stats_kernel``: float64 device arrays ``(row_max, row_sum)``, each ``[B, Hm, R]``.

    ``q_t [B,Hm,D,R]`` and ``k_t [B,Hkv,D,t+C]`` are the transposed composite tokens
    (:func:`transpose`); ``group`` is ``G = Hq // Hkv``.
    """
    B, Hm, D, R = q_t.shape
    row_max = cuda.device_array((B, Hm, R), dtype=float64)
    row_sum = cuda.device_array((B, Hm, R), dtype=float64)
    grid, block = row_stats_geometry(B, Hm, R)
    row_stats_kernel[grid, block](q_t, k_t, float64(config.scale_for(D)), config.c_q, config.c_k, config.c_h,
                                  group, nq, nk, config.causal, *_variant_args(config), row_max, row_sum)
    return row_max, row_sum


def block_scores(q_c, k_c, config: UniSparseConfig, nq: int, nk: int):
    """Stage 2 on float64 device arrays ``q_c [B,Hm,R,D]``, ``k_c [B,Hkv,C,D]`` (already checked).

    With ``config.sink_tokens = t > 0``, ``k_c [B,Hkv,t+C,D]`` (the sinks in front, as
    :func:`~unisparse_ref.numba_backend.pooling.compress` returns it). Returns the block
    scores, a float64 device array ``[B, Hm, nQb, nKb]`` whose rows sum to 1.
    """
    B, Hm, R, D = q_c.shape
    Hkv, W = k_c.shape[1], k_c.shape[2]
    S = config.block_size
    G = Hm * config.c_h // Hkv
    nqb, nkb = num_blocks(nq, S), num_blocks(nk, S)
    q_t, k_t = transpose(q_c), transpose(k_c)  # [B, H, D, n] layouts: coalesced
    row_max, row_sum = row_stats(q_t, k_t, config, G, nq, nk)
    colsum = cuda.device_array((B, Hm, nqb, W), dtype=float64)
    out = cuda.device_array((B, Hm, nqb, nkb), dtype=float64)
    grid, block = block_scores_geometry(B, Hm, nqb)
    with simulator_launch():
        block_scores_kernel[grid, block](q_c, k_t, row_max, row_sum, float64(config.scale_for(D)), S, config.c_q,
                                         config.c_k, config.c_h, G, nq, nk, config.causal, *_variant_args(config),
                                         colsum, out)
    return out
