"""Stage 1 on the GPU: composite tokens (SPEC 3) with ``us_pool_seq<T>`` of ``raw_kernels/pooling.cu``.

``x [B, H, N, D] -> float32 [B, H/c_h, ceil(N/c), D]``: one thread per 16 bytes of a token's
``d`` (8 halves or 4 floats: :func:`outputs_per_thread`) of one ``(r, b, g)``, float32 sums over
the ``c`` tokens of a group and then over ``c_h`` heads (the same order for every ``d``). Queries
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

__all__ = ["FILE", "INSTANTIATIONS", "OPTIONS", "THREADS", "kernel_spec", "launch_config", "launch_pool",
           "launch_pool_keys", "sinks_kernel_spec"]

FILE = "pooling.cu"
#: Threads per block (``US_POOL_THREADS`` in pooling.cu).
THREADS = 256
#: NVRTC options of every instantiation of this stage (the one place they are written).
OPTIONS: tuple[str, ...] = (f"-DUS_POOL_THREADS={THREADS}",)


def kernel_spec(ctype: str) -> KernelSpec:
    """The instantiation for the C++ element type ``ctype`` (a value of ``CTYPES``)."""
    return KernelSpec(FILE, f"us_pool_seq<{ctype}>", OPTIONS)


def sinks_kernel_spec(ctype: str) -> KernelSpec:
    """The keys-with-sink-tokens instantiation (research variant ``sink_tokens``) for ``ctype``."""
    return KernelSpec(FILE, f"us_pool_keys_sinks<{ctype}>", OPTIONS)


#: Every instantiation this stage launches (per input dtype: SPEC pooling, keys with sink tokens).
INSTANTIATIONS: list[KernelSpec] = [kernel_spec(t) for t in CTYPES.values()] + [
    sinks_kernel_spec(t) for t in CTYPES.values()]


def outputs_per_thread(dtype: np.dtype | str, D: int, ptr: int) -> int:
    """Consecutive ``d`` one thread of ``us_pool_seq<T>`` pools: ``V = 16 / itemsize`` (one 16-byte
    load per token) when ``D % V == 0`` and the input address ``ptr`` is 16-byte aligned, else 1
    (the kernel makes the same test, ``us_pool_vector``)."""
    V = 16 // np.dtype("uint16" if str(dtype) == "bfloat16" else dtype).itemsize
    return V if D % V == 0 and int(ptr) % 16 == 0 else 1


def launch_config(batch: int, heads_out: int, R: int, D: int, per_thread: int = 1) -> dict[str, Any]:
    """Grid and block of one launch: ``R * D / per_thread`` threads per ``(b, g)`` over ``THREADS``-thread blocks.

    ``per_thread``: ``outputs_per_thread`` of the input (1 for ``us_pool_keys_sinks``).

    Returns
    -------
    dict
        ``grid`` ``(ceil(R * D / per_thread / THREADS), B * H/c_h, 1)``, ``block`` ``(THREADS, 1, 1)``,
        ``shared_mem`` 0.
    """
    return {"grid": (geometry.cdiv(R * (D // per_thread), THREADS), batch * heads_out, 1), "block": (THREADS, 1, 1),
            "shared_mem": 0}


def launch_pool(x: Any, dtype: np.dtype, c: int, c_h: int) -> Any:
    """``us_pool_seq<T>``: ``x [B, H, N, D] -> float32 [B, H/c_h, ceil(N/c), D]`` (CuPy arrays).

    ``x`` is C-contiguous; bf16 arrives as ``uint16`` bits with ``dtype`` bfloat16.
    """
    cp = cupy_module()
    B, H, N, D = (int(s) for s in x.shape)
    R, Hout = geometry.cdiv(N, c), H // c_h
    out = cp.empty((B, Hout, R, D), dtype=cp.float32)
    kernel = _loader.get_function(kernel_spec(CTYPES[str(dtype)]))
    lc = launch_config(B, Hout, R, D, outputs_per_thread(dtype, D, x.data.ptr))
    _loader.launch(kernel, lc["grid"], lc["block"], (x, out, i32(H), i32(N), i32(D), i32(c), i32(c_h)),
                   shared_mem=lc["shared_mem"])
    return out


def launch_pool_keys(x: Any, dtype: np.dtype, c_k: int, sink_tokens: int = 0) -> Any:
    """Composite keys: ``launch_pool(x, dtype, c_k, 1)``, or with ``sink_tokens = t > 0`` (research
    variant, the reference's ``pool_keys_with_sinks``) ``us_pool_keys_sinks<T>``:
    ``x [B, Hkv, Nk, D] -> float32 [B, Hkv, t + ceil(Nk/c_k), D]``, the first ``t`` keys un-pooled.
    """
    t = int(sink_tokens)
    if t == 0:
        return launch_pool(x, dtype, c_k, 1)
    cp = cupy_module()
    B, H, N, D = (int(s) for s in x.shape)
    W = t + geometry.cdiv(N, c_k)
    out = cp.empty((B, H, W, D), dtype=cp.float32)
    lc = launch_config(B, H, W, D)
    _loader.launch(_loader.get_function(sinks_kernel_spec(CTYPES[str(dtype)])), lc["grid"], lc["block"],
                   (x, out, i32(N), i32(D), i32(c_k), i32(t)), shared_mem=lc["shared_mem"])
    return out
