"""Stage 1 of the Numba layer: composite tokens by average pooling (SPEC section 3).

:func:`compress` is the stage (the backend's ``compress`` calls it on device arrays); it
launches two elementwise kernels, one thread per output element (grid-stride loop):

* ``pool_sequence_kernel`` -- sequence granularity,
  ``Qc[b, h, r, d] = mean(q[b, h, t, d] for t in [r*c, min((r+1)*c, N)))``; the last group
  averages only the tokens that exist. Used with ``c = c_q`` for queries and ``c = c_k`` for
  keys (``R = ceil(Nq/c_q)``, ``C = ceil(Nk/c_k)``).
* ``pool_heads_kernel`` -- head granularity,
  ``Qh[b, g, r, d] = mean(Qc[b, h, r, d] for h in [g*c_h, (g+1)*c_h))``.
* ``pool_keys_with_sinks_kernel`` -- keys under the research option ``sink_tokens = t > 0``
  (not SPEC; :func:`unisparse_ref.reference.pooling.pool_keys_with_sinks`): ``t + C`` columns,
  the keys ``0 .. t-1`` un-pooled, then SPEC's composite keys except that composite key 0
  averages only the keys ``t .. min(c_k, Nk) - 1`` (zeros when that range is empty).

Consecutive threads handle consecutive ``d``, so every load and store is coalesced along
the head dimension. Sums are formed in float64 whatever the input dtype
(the scoring works in float64: see :mod:`.scores`).
"""

from __future__ import annotations

from numba import cuda
from numpy import float64  # a conversion in kernels; cheaper than numba.float64 in the simulator

from ..config import UniSparseConfig
from ..geometry import cdiv
from ._simulator import SIMULATOR

#: Threads per block of both pooling kernels; one warp in the simulator, where every thread
#: is a Python thread and idle ones cost time.
THREADS = 32 if SIMULATOR else 128
#: Largest grid (x) launched; the grid-stride loop covers the rest.
MAX_BLOCKS = 65535


def launch_geometry(total: int) -> tuple[int, int]:
    """``(grid, block)`` of a pooling launch over ``total`` output elements."""
    block = THREADS
    grid = max(1, min(cdiv(total, THREADS), MAX_BLOCKS))
    return grid, block


@cuda.jit
def pool_sequence_kernel(x, c, out):
    """``out[b, h, r, :] = mean(x[b, h, t, :] for t in group r)``; ``x [B,H,N,D]``, ``out [B,H,ceil(N/c),D]``."""
    B, H, R, D = out.shape
    N = x.shape[2]
    total = B * H * R * D
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        d = idx % D
        r = (idx // D) % R
        h = (idx // (D * R)) % H
        b = idx // (D * R * H)
        t0 = r * c
        t1 = min(t0 + c, N)  # the last group may be short
        acc = float64(0.0)
        for t in range(t0, t1):
            acc += float64(x[b, h, t, d])
        out[b, h, r, d] = acc / float64(t1 - t0)


@cuda.jit
def pool_heads_kernel(x, c_h, out):
    """``out[b, g, r, :] = mean(x[b, h, r, :] for h in [g*c_h, (g+1)*c_h))``; ``out [B, H/c_h, R, D]``."""
    B, Hm, R, D = out.shape
    total = B * Hm * R * D
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        d = idx % D
        r = (idx // D) % R
        g = (idx // (D * R)) % Hm
        b = idx // (D * R * Hm)
        acc = float64(0.0)
        for h in range(g * c_h, (g + 1) * c_h):
            acc += x[b, h, r, d]
        out[b, g, r, d] = acc / float64(c_h)


@cuda.jit
def pool_keys_with_sinks_kernel(k, c_k, t, out):
    """Keys with ``t`` un-pooled sinks in front: ``k [B,Hkv,Nk,D]``, ``out [B,Hkv,t+C,D]``.

    Column ``j < t`` is key ``j`` (zeros when ``j >= Nk``); column ``t + c`` is the mean of the
    keys ``[lo, min((c+1)*c_k, Nk))`` with ``lo = c*c_k``, except ``lo = t`` for ``c = 0``
    (zeros when the range is empty).
    """
    B, H, W, D = out.shape
    N = k.shape[2]
    total = B * H * W * D
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        d = idx % D
        j = (idx // D) % W
        h = (idx // (D * W)) % H
        b = idx // (D * W * H)
        if j < t:  # an un-pooled sink key
            lo = j
            hi = min(j + 1, N)
        else:  # composite key c = j - t
            c = j - t
            lo = t if c == 0 else c * c_k  # composite 0 starts after the sinks (t < c_k)
            hi = min((c + 1) * c_k, N)
        acc = float64(0.0)
        for s in range(lo, hi):
            acc += float64(k[b, h, s, d])
        out[b, h, j, d] = acc / float64(hi - lo) if hi > lo else float64(0.0)


def pool_sequence(x, c: int):
    """Launch ``pool_sequence_kernel`` on device array ``x [B,H,N,D]``; float64 ``[B,H,ceil(N/c),D]``."""
    B, H, N, D = x.shape
    out = cuda.device_array((B, H, cdiv(N, c), D), dtype="float64")
    grid, block = launch_geometry(out.size)
    pool_sequence_kernel[grid, block](x, c, out)
    return out


def pool_heads(x, c_h: int):
    """Launch ``pool_heads_kernel`` on float64 device array ``x [B,H,R,D]``; ``[B,H/c_h,R,D]``."""
    B, H, R, D = x.shape
    out = cuda.device_array((B, H // c_h, R, D), dtype="float64")
    grid, block = launch_geometry(out.size)
    pool_heads_kernel[grid, block](x, c_h, out)
    return out


def pool_keys_with_sinks(k, c_k: int, t: int):
    """Launch ``pool_keys_with_sinks_kernel`` on ``k [B,Hkv,Nk,D]``; float64 ``[B,Hkv,t+ceil(Nk/c_k),D]``."""
    B, H, N, D = k.shape
    out = cuda.device_array((B, H, t + cdiv(N, c_k), D), dtype="float64")
    grid, block = launch_geometry(out.size)
    pool_keys_with_sinks_kernel[grid, block](k, c_k, t, out)
    return out


def compress(q, k, config: UniSparseConfig):
    """Stage 1 on device arrays ``q [B,Hq,Nq,D]``, ``k [B,Hkv,Nk,D]`` (inputs already checked).

    Returns float64 device arrays ``q_c [B, Hq/c_h, ceil(Nq/c_q), D]`` (sequence pooling, then
    head pooling when ``c_h > 1``) and ``k_c [B, Hkv, ceil(Nk/c_k), D]``; with the research
    option ``sink_tokens = t > 0``, ``k_c [B, Hkv, t + ceil(Nk/c_k), D]`` (the sinks in front).
    """
    q_c = pool_sequence(q, config.c_q)
    if config.c_h > 1:
        q_c = pool_heads(q_c, config.c_h)
    if config.sink_tokens > 0:
        return q_c, pool_keys_with_sinks(k, config.c_k, config.sink_tokens)
    k_c = pool_sequence(k, config.c_k)
    return q_c, k_c
