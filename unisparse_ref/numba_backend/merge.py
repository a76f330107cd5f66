"""Merging partial attention states on the device (cascade attention, split-KV).

:func:`merge_kernel` combines two partial results over disjoint key sets, row by row, as
:mod:`unisparse_ref.reference.merge` defines it:

.. code-block:: text

    hi = max(lse_a, lse_b), lo = min(lse_a, lse_b), w = exp(lo - hi)      (w in [0, 1])
    out = (out_hi + w * out_lo) / (1 + w),   lse = hi + log1p(w)
    both lse = -inf (empty rows):  out = 0, lse = -inf

One thread per output element ``(row, d)`` with a grid-stride loop (consecutive threads take
consecutive ``d``: coalesced), float32 arithmetic, the output rounded to the input dtype.
A row empty on one side gets ``w = exp(-inf) = 0``, so its ``out`` and ``lse`` are the
other side's exactly; no NaN can arise, since ``hi - lo`` is never ``inf - inf``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numpy import float32  # a conversion in kernels; cheaper than numba.float32 in the simulator

from ..geometry import cdiv
from ._simulator import SIMULATOR

__all__ = ["merge", "merge_kernel"]

#: Threads per block; one warp in the simulator, where every thread is a Python thread.
THREADS = 32 if SIMULATOR else 256
#: Largest grid launched; the grid-stride loop covers the rest.
MAX_BLOCKS = 65535


@cuda.jit
def merge_kernel(out_a, lse_a, out_b, lse_b, out, lse):
    """``out [rows, D]``, ``lse [rows]`` (float32) from two partial states of the same shapes."""
    rows, D = out.shape
    for idx in range(cuda.grid(1), rows * D, cuda.gridsize(1)):
        r = idx // D
        d = idx % D
        la = float32(lse_a[r])
        lb = float32(lse_b[r])
        if la == -math.inf and lb == -math.inf:  # no key on either side
            out[r, d] = 0
            if d == 0:
                lse[r] = float32(-math.inf)
            continue
        if la >= lb:
            hi = la
            lo = lb
            o_hi = float32(out_a[r, d])
            o_lo = float32(out_b[r, d])
        else:
            hi = lb
            lo = la
            o_hi = float32(out_b[r, d])
            o_lo = float32(out_a[r, d])
        w = float32(math.exp(lo - hi))  # 0 when lo = -inf: the other side exactly
        out[r, d] = (o_hi + w * o_lo) / (float32(1.0) + w)
        if d == 0:
            lse[r] = hi + float32(math.log1p(w))


def merge(out_a, lse_a, out_b, lse_b):
    """Launch :func:`merge_kernel` on device arrays ``out_* [rows, D]`` and float32 ``lse_* [rows]``.

    Returns ``(out [rows, D] of out_a's dtype, lse float32 [rows])`` device arrays.
    """
    rows, D = (int(s) for s in out_a.shape)
    out = cuda.device_array((rows, D), dtype=np.dtype(out_a.dtype))
    lse = cuda.device_array((rows,), dtype=np.float32)
    if rows * D:
        grid = max(1, min(cdiv(rows * D, THREADS), MAX_BLOCKS))
        merge_kernel[grid, THREADS](out_a, lse_a, out_b, lse_b, out, lse)
    return out, lse
