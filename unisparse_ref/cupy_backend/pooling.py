"""Stage 1 on the GPU: composite tokens (SPEC 3) with ``us_pool_seq<T>`` of ``raw_kernels/pooling.cu``.

``x [B, H, N, D] -> float32 [B, H/c_h, ceil(N/c), D]``: one thread per output ``(r, d)`` of one
``(b, g)``, float32 sums over the ``c`` tokens of a group and then over ``c_h`` heads. Queries
use ``(c_q, c_h)``, keys ``(c_k, 1)``.

Here: the instantiations (:data:`INSTANTIATIONS`, with their NVRTC options :data:`OPTIONS`),
the launch configuration (:func:`launch_config`) and the launch (:func:`launch_pool`).
Imports without CuPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from . import _loader
from ._device import cupy_module, i32
from ._loader import CTYPES, KernelSpec

__all__ = ["FILE", "INSTANTIATIONS", "OPTIONS", "THREADS", "kernel_spec", "launch_config", "launch_pool"]

FILE = "pooling.cu"
#: Threads per block (``US_POOL_THREADS`` in pooling.cu).
THREADS = 256
#: NVRTC options of every instantiation of this stage (the one place they are written).
OPTIONS: tuple[str, ...] = (f"-DUS_POOL_THREADS={THREADS}",)


def kernel_spec(ctype: str) -> KernelSpec:
    """The instantiation for the C++ element type ``ctype`` (a value of ``CTYPES``)."""
    return KernelSpec(FILE, f"us_pool_seq<{ctype}>", OPTIONS)


#: Every instantiation this stage launches (one per input dtype).
INSTANTIATIONS: list[KernelSpec] = [kernel_spec(t) for t in CTYPES.values()]


def launch_config(batch: int, heads_out: int, R: int, D: int) -> dict[str, Any]:
    """Grid and block of one launch: ``R * D`` outputs per ``(b, g)`` over ``THREADS``-thread blocks.

    Returns
    -------
    dict
        ``grid`` ``(ceil(R * D / THREADS), B * H/c_h, 1)``, ``block`` ``(THREADS, 1, 1)``,
        ``shared_mem`` 0.
    """
    return {"grid": (geometry.cdiv(R * D, THREADS), batch * heads_out, 1), "block": (THREADS, 1, 1), "shared_mem": 0}


def launch_pool(x: Any, dtype: np.dtype, c: int, c_h: int) -> Any:
    """``us_pool_seq<T>``: ``x [B, H, N, D] -> float32 [B, H/c_h, ceil(N/c), D]`` (CuPy arrays).

    ``x`` is C-contiguous; bf16 arrives as ``uint16`` bits with ``dtype`` bfloat16.
    """
    cp = cupy_module()
    B, H, N, D = (int(s) for s in x.shape)
    R, Hout = geometry.cdiv(N, c), H // c_h
    out = cp.empty((B, Hout, R, D), dtype=cp.float32)
    kernel = _loader.get_function(kernel_spec(CTYPES[str(dtype)]))
    lc = launch_config(B, Hout, R, D)
    _loader.launch(kernel, lc["grid"], lc["block"], (x, out, i32(H), i32(N), i32(D), i32(c), i32(c_h)),
                   shared_mem=lc["shared_mem"])
    return out
