"""The CuPy RawKernel backend: the production GPU layer, without PyTorch.

Every stage of the pipeline is a CUDA C++ kernel in ``raw_kernels/`` compiled by NVRTC
through :class:`cupy.RawModule` (see :mod:`unisparse_ref._loader`):

============================  ==============================================  =====================
method                        kernels                                         source
============================  ==============================================  =====================
``compress``                  ``us_pool_seq<T>`` (q: c_q and c_h; k: c_k)     ``pooling.cu``
``block_scores``              ``us_scores_onepass`` (default version 3;       ``scores.cu``
                              versions 1, 2: ``us_scores_rowstats``,
                              ``us_scores_blocksum``)
``select_blocks``             ``us_select_topp<float|double>``                ``selection.cu``
``block_sparse_attention``    ``us_mask_to_indices`` + attention kernels      ``selection.cu``,
                                                                              ``attention.cu``
``dense_attention``           the same with every visible block selected      ``attention.cu``
============================  ==============================================  =====================

Inputs
------
CuPy arrays; NumPy arrays (copied to the device); any object exposing ``__dlpack__`` or
``__cuda_array_interface__`` (a PyTorch or JAX CUDA tensor: zero-copy, neither library is
imported). Accepted dtypes: float16, bfloat16 and float32 (float64 raises ``TypeError``).
A non-contiguous input is copied into a C-contiguous array first (this costs one copy;
pass contiguous tensors to avoid it). Inputs must be finite; ``compress`` and the attention
check this on the device and raise ``ValueError`` otherwise.

bfloat16
--------
bf16 arrives as an ``ml_dtypes.bfloat16`` NumPy array, a bf16 DLPack tensor, a CuPy bf16
array (CuPy >= 14) or a :class:`BFloat16Array`. On the device it is carried as its raw
16-bit pattern (a ``uint16`` CuPy view) and read by the kernels as ``__nv_bfloat16``. A bf16
output comes back as a CuPy bfloat16 array where CuPy supports that dtype (CuPy >= 14 with
NumPy >= 2.1.2), otherwise as a :class:`BFloat16Array`; :func:`unisparse_ref.to_numpy` reads
both. :func:`as_bfloat16` turns a ``uint16`` CuPy array of bf16 bits into the same.

Precision
---------
Pooling, logits, softmax and block sums run in float32 (``score_eps = 1e-6``, SPEC 7);
the selection adds in float64 exactly as the reference does, so on identical scores its mask
is the reference's. Attention accumulates in float32; ``lse`` is float32.

This module imports without CuPy; CuPy is imported by :func:`make_backend` and the methods.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import numpy as np

from . import _loader, geometry
from ._arrays import BFLOAT16, check_composite_shapes, check_head_pooling, check_qkv
from .backends import BackendUnavailable
from .blockmask import BlockMask
from .config import UniSparseConfig

__all__ = ["BFloat16Array", "CupyBackend", "as_bfloat16", "make_backend", "scores_launch_config"]

#: Input dtypes of this backend.
SUPPORTED_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32))

# Tile sizes of scores.cu, passed to NVRTC with -D so Python and CUDA agree on them.
_SC_TR = 64  # composite rows per tile
_SC_TC = 64  # composite columns per tile
_SC_BLOCK = (16, 16, 1)
_POOL_THREADS = 256
_SEL_THREADS = 256


def _cupy() -> Any:
    import cupy

    return cupy


# ---------------------------------------------------------------------------- bfloat16
_BF16_NATIVE: bool | None = None


def _cupy_has_bf16() -> bool:
    """Whether CuPy can hold ``ml_dtypes.bfloat16`` arrays (CuPy >= 14)."""
    global _BF16_NATIVE
    if _BF16_NATIVE is None:
        cp = _cupy()
        try:
            a = cp.zeros(2, dtype=cp.uint16).view(BFLOAT16)
            _BF16_NATIVE = np.dtype(a.dtype) == BFLOAT16 and a.get().dtype == BFLOAT16
        except Exception:  # noqa: BLE001 - any failure means "not supported"
            _BF16_NATIVE = False
    return _BF16_NATIVE


class BFloat16Array:
    """A bfloat16 device array for CuPy versions without a bf16 dtype.

    Attributes
    ----------
    data : cupy.ndarray of uint16
        The raw bf16 bit patterns.

    ``get()`` / ``copy_to_host()`` return an ``ml_dtypes.bfloat16`` NumPy array, so
    :func:`unisparse_ref.to_numpy` reads it.
    """

    def __init__(self, data: Any) -> None:
        if np.dtype(data.dtype) != np.uint16:
            raise TypeError(f"BFloat16Array holds uint16 bit patterns, got {data.dtype}")
        self.data = data

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return BFLOAT16

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def get(self) -> np.ndarray:
        """Copy to the host as an ``ml_dtypes.bfloat16`` NumPy array."""
        return self.data.get().view(BFLOAT16)

    copy_to_host = get

    def __repr__(self) -> str:
        return f"BFloat16Array(shape={self.shape})"


def as_bfloat16(bits: Any) -> Any:
    """View a ``uint16`` CuPy array of bf16 bit patterns as a bfloat16 device array.

    Returns a CuPy bfloat16 array (no copy) where CuPy supports the dtype, else a
    :class:`BFloat16Array`.
    """
    if np.dtype(bits.dtype) != np.uint16:
        raise TypeError(f"as_bfloat16 expects a uint16 array of bf16 bit patterns, got {bits.dtype}")
    return bits.view(BFLOAT16) if _cupy_has_bf16() else BFloat16Array(bits)


def _wrap_output(arr: Any, dtype: np.dtype) -> Any:
    return as_bfloat16(arr) if dtype == BFLOAT16 else arr


# ---------------------------------------------------------------------------- inputs
def _from_foreign(name: str, x: Any) -> tuple[Any, np.dtype]:
    """A CuPy view of a DLPack / CUDA-array-interface object (zero-copy), and its dtype."""
    cp = _cupy()
    if type(x).__module__.split(".")[0] == "torch":  # PyTorch is already imported by the caller
        t = x.detach()
        bf16 = str(t.dtype) == "torch.bfloat16"
        if bf16:  # an int16 view of the same memory: works whether or not CuPy has bf16
            t = t.view(sys.modules["torch"].int16)
        arr = cp.from_dlpack(t) if t.device.type == "cuda" else cp.asarray(t.numpy())
        return (arr.view(cp.uint16), BFLOAT16) if bf16 else (arr, np.dtype(arr.dtype))
    try:
        arr = cp.from_dlpack(x) if hasattr(x, "__dlpack__") else cp.asarray(x)
    except (TypeError, BufferError, RuntimeError, ValueError) as e:
        try:  # a host (CPU) DLPack tensor
            host = np.from_dlpack(x)
        except Exception:  # noqa: BLE001
            raise TypeError(f"{name}: cannot view {type(x).__name__} on the GPU through DLPack ({e})") from e
        return _from_numpy(host)
    return arr, np.dtype(arr.dtype)


def _from_numpy(a: np.ndarray, name: str = "input") -> tuple[Any, np.dtype]:
    cp = _cupy()
    dt = np.dtype(a.dtype)
    if dt not in SUPPORTED_DTYPES:  # before the copy: CuPy itself cannot hold e.g. float128
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {dt}; the cupy backend accepts {allowed}")
    if dt == BFLOAT16:
        return cp.asarray(np.ascontiguousarray(a).view(np.uint16)), BFLOAT16
    return cp.asarray(a), dt


def _device_input(name: str, x: Any) -> tuple[Any, np.dtype]:
    """``x`` as a C-contiguous CuPy array (bf16 as uint16 bits) and its logical dtype.

    Raises
    ------
    TypeError
        For an unsupported array type or dtype (naming ``name``).
    """
    cp = _cupy()
    if isinstance(x, BFloat16Array):
        arr, dt = x.data, BFLOAT16
    elif isinstance(x, cp.ndarray):
        arr, dt = x, np.dtype(x.dtype)
        if dt == np.uint16:
            raise TypeError(
                f"{name} is a uint16 CuPy array; if it holds bfloat16 bit patterns pass "
                f"unisparse_ref.cupy_backend.as_bfloat16({name})"
            )
    elif isinstance(x, np.ndarray):
        arr, dt = _from_numpy(x, name)
    elif hasattr(x, "__dlpack__") or hasattr(x, "__cuda_array_interface__"):
        arr, dt = _from_foreign(name, x)
    else:
        raise TypeError(
            f"{name} must be a CuPy or NumPy array or expose __dlpack__ / __cuda_array_interface__, "
            f"got {type(x).__name__}"
        )
    if dt == BFLOAT16 and np.dtype(arr.dtype) != np.uint16:
        arr = arr.view(cp.uint16)
    if dt not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {dt}; the cupy backend accepts {allowed}")
    if not arr.flags.c_contiguous:
        arr = cp.ascontiguousarray(arr)  # documented: non-contiguous inputs are copied
    return arr, dt


def _qkv_inputs(q: Any, k: Any, v: Any | None, causal: bool) -> tuple[list[Any], np.dtype, tuple[int, ...]]:
    arrs, dts = [], []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        a, dt = _device_input(name, x)
        arrs.append(a)
        dts.append(dt)
    for name, dt in zip(("k", "v"), dts[1:], strict=False):
        if dt != dts[0]:
            raise TypeError(f"{name} has dtype {dt} but q has {dts[0]}; they must match")
    third = arrs[2] if len(arrs) > 2 else arrs[1]
    dims = check_qkv(arrs[0], arrs[1], third, causal=causal, shape_only=True)
    return arrs, dts[0], dims


def _composite_input(name: str, x: Any) -> Any:
    """A float32 C-contiguous CuPy array of composite tokens (any float input converted)."""
    cp = _cupy()
    if isinstance(x, cp.ndarray):
        a = x
    elif isinstance(x, np.ndarray):
        a = cp.asarray(x.astype(np.float32) if np.dtype(x.dtype) == BFLOAT16 else x)
    else:
        a, dt = _device_input(name, x)
        if dt == BFLOAT16:
            raise TypeError(f"{name}: composite tokens must be float32, got bfloat16")
    if a.ndim != 4:
        raise ValueError(f"{name} must have rank 4, got shape {tuple(a.shape)}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got {a.dtype}")
    return cp.ascontiguousarray(a, dtype=cp.float32)


_NONFINITE: dict[str, Any] = {}

# Elementwise "is bad" tests, summed by a cupy.ReductionKernel without temporaries. The
# parameter is called v and literals are decimal on purpose: CuPy rewrites the parameter name
# inside the expression, which mangled a hexadecimal literal containing it (0x7F80 with x).
_BAD_EXPR = {
    "bf16": "((v & 32640) == 32640) ? 1 : 0",  # bf16 bits: exponent all ones (0x7F80) = inf or NaN
    "float": "isfinite((float)v) ? 0 : 1",
    "score": "(v < 0 || !isfinite((double)v)) ? 1 : 0",  # scores must be finite and >= 0
}


def _bad_count_device(arr: Any, kind: str) -> Any:
    """A 0-d device array: how many entries of ``arr`` fail the test ``kind`` (no host sync)."""
    cp = _cupy()
    if kind not in _NONFINITE:
        _NONFINITE[kind] = cp.ReductionKernel("T v", "int64 y", _BAD_EXPR[kind], "a + b", "y = a", "0",
                                              f"us_bad_{kind}")
    return _NONFINITE[kind](arr)


def _count_nonfinite(arr: Any, dtype: np.dtype) -> int:
    """Number of NaN/inf entries of a device array (bf16 given as uint16 bits)."""
    return int(_bad_count_device(arr, "bf16" if dtype == BFLOAT16 else "float"))


def _check_finite(*items: tuple[str, Any, np.dtype]) -> None:
    """Raise ``ValueError`` naming the first of ``(name, array, dtype)`` holding NaN or infinity.

    All counts are summed on the device and read back once (one synchronisation).
    """
    counts = [_bad_count_device(a, "bf16" if dt == BFLOAT16 else "float") for _, a, dt in items]
    total = counts[0]
    for c in counts[1:]:
        total = total + c
    if int(total):
        bad = next(name for (name, _, _), c in zip(items, counts, strict=True) if int(c))
        raise ValueError(f"{bad} holds non-finite values (NaN or infinity)")


def _check_config(config: Any) -> UniSparseConfig:
    if config is None:
        return UniSparseConfig()
    if not isinstance(config, UniSparseConfig):
        raise TypeError(f"config must be a UniSparseConfig, got {type(config)!r}")
    return config


#: Head dims the attention kernels are built for; other D <= 128 are zero-padded up to the next.
_KERNEL_HEAD_DIMS = (32, 64, 128)


def _padded_head_dim(D: int) -> int:
    """The kernel head dim used for ``D``: the smallest of 32, 64, 128 that holds it."""
    for d in _KERNEL_HEAD_DIMS:
        if D <= d:
            return d
    raise ValueError(
        f"the cupy backend supports head dims up to {_KERNEL_HEAD_DIMS[-1]}, got D={D} "
        "(the numpy and numba backends take up to 256)"
    )


def _i32(x: int) -> np.int32:
    if not -(2**31) <= int(x) < 2**31:
        raise ValueError(f"size {x} does not fit the kernels' int32 indexing")
    return np.int32(x)


# ---------------------------------------------------------------------------- launches
# Each function below computes grid, block and shared memory of one kernel in one place.
def _launch_pool(x: Any, dtype: np.dtype, c: int, c_h: int) -> Any:
    """``us_pool_seq<T>``: ``x [B, H, N, D] -> float32 [B, H/c_h, ceil(N/c), D]``."""
    cp = _cupy()
    B, H, N, D = (int(s) for s in x.shape)
    R, Hout = geometry.cdiv(N, c), H // c_h
    out = cp.empty((B, Hout, R, D), dtype=cp.float32)
    kernel = _loader.get_function("pooling.cu", f"us_pool_seq<{_loader.CTYPES[str(dtype)]}>", _pool_options())
    grid = (geometry.cdiv(R * D, _POOL_THREADS), B * Hout, 1)
    block = (_POOL_THREADS, 1, 1)
    _loader.launch(kernel, grid, block, (x, out, _i32(H), _i32(N), _i32(D), _i32(c), _i32(c_h)), shared_mem=0)
    return out


#: Versions of scores.cu (see its version table): 1 and 2 take two passes over C (2 with a
#: float4 logits micro-kernel); 3 takes one pass with a global float32 scratch buffer.
SCORES_VERSIONS = (1, 2, 3)
#: The version used unless ``CupyBackend(scores_version=...)`` or ``UNISPARSE_SCORES_VERSION`` says otherwise.
DEFAULT_SCORES_VERSION = 3  # one pass: 2.0x faster than v1 on the H200 (docs/performance.md)
#: Most bytes of scratch version 3 may hold at once; above it the launch is split into chunks of
#: mask heads (at least one head per chunk). At 131072 tokens with 32 heads it needs 1.1 GiB.
_SC3_SCRATCH_BYTES = 2 * 1024**3


def _scores_kernels(version: int = DEFAULT_SCORES_VERSION) -> tuple[str, ...]:
    """The kernels of scores.cu one version launches, in order."""
    return ("us_scores_onepass",) if version == 3 else ("us_scores_rowstats", "us_scores_blocksum")


def _scores_options(version: int = DEFAULT_SCORES_VERSION) -> tuple[str, ...]:
    return (f"-DUS_SC_TR={_SC_TR}", f"-DUS_SC_TC={_SC_TC}", f"-DUS_SC_VERSION={version}")


def _pool_options() -> tuple[str, ...]:
    return (f"-DUS_POOL_THREADS={_POOL_THREADS}",)


def _select_options() -> tuple[str, ...]:
    return (f"-DUS_SEL_THREADS={_SEL_THREADS}",)


def scores_launch_config(batch: int, mask_heads: int, R: int, config: UniSparseConfig, C: int | None = None,
                         scratch_bytes: int | None = None) -> dict[str, Any]:
    """Grid, block, shared memory and scratch of the scoring kernels (pure Python, no GPU needed).

    Versions 1 and 2. Pass 1 (``us_scores_rowstats``): one thread block per ``TR`` composite
    rows of one ``(b, g)``, static shared memory only. Pass 2 (``us_scores_blocksum``): one
    thread block per ``RG = max(TR, RB)`` rows (``NQ = RG / RB`` whole query blocks), with
    dynamic shared memory for the ``[TR, TC+1]`` tile of ``A``, the ``[NQ, TC]`` column sums
    and the ``[NQ, TC / min(KB, TC)]`` running block sums (float32 each).

    Version 3 (``us_scores_onepass``): the thread blocks of pass 2, walking C once. Dynamic
    shared memory: the ``[TR, TC+1]`` exp tile, ``[TR, 16]`` partial row maxima, ``[TR, NKS]``
    piece sums, ``[TR]`` tile maxima, ``[TR]`` last visible columns (int32) and the running
    ``m_r``, ``l_r`` of ``RG`` rows (4 bytes each). Global float32 scratch per mask head:
    ``ntiles * R * NKS`` piece sums and ``ntiles * R`` tile maxima (``ntiles = ceil(C / TC)``,
    ``NKS = TC / min(KB, TC)``). When ``B * Hm`` heads of
    scratch exceed ``scratch_bytes`` (default ``_SC3_SCRATCH_BYTES``, 2 GiB) the kernel is
    launched once per chunk of ``heads_per_chunk3`` heads (grid y), reusing one buffer. A
    chunk holds at least one head, so one head's scratch alone may exceed the budget (with
    ``c_q = c_k = 1`` at 131072 tokens it is 5 GiB): rows are not chunked.

    Parameters
    ----------
    batch, mask_heads, R : int
        ``B``, ``Hm = Hq / c_h`` and the composite query count.
    config : UniSparseConfig
    C : int, optional
        Composite key count (version 3's scratch); defaults to ``R``.
    scratch_bytes : int, optional
        Scratch budget of version 3 in bytes; defaults to ``_SC3_SCRATCH_BYTES``.

    Returns
    -------
    dict with ``grid1``, ``grid2``, ``block``, ``shared1``, ``shared2`` (bytes), version 3's
    ``grid3`` (one chunk), ``shared3``, ``ntiles``, ``NKS``, ``scratch3_per_head`` (bytes),
    ``heads_per_chunk3``, and the tile numbers.
    """
    RB, KB = config.block_size // config.c_q, config.block_size // config.c_k
    RG = max(_SC_TR, RB)
    NQ = RG // RB
    NKS = _SC_TC // min(KB, _SC_TC)
    C = R if C is None else int(C)
    budget = _SC3_SCRATCH_BYTES if scratch_bytes is None else int(scratch_bytes)
    heads = batch * mask_heads
    ntiles = geometry.cdiv(C, _SC_TC)
    per_head = 4 * ntiles * R * (NKS + 1)
    chunk = max(1, min(heads, budget // max(1, per_head)))
    return {
        "grid1": (geometry.cdiv(R, _SC_TR), heads, 1),
        "grid2": (geometry.cdiv(R, RG), heads, 1),
        "grid3": (geometry.cdiv(R, RG), chunk, 1),
        "block": _SC_BLOCK,
        "shared1": 0,
        "shared2": 4 * (_SC_TR * (_SC_TC + 1) + NQ * _SC_TC + NQ * NKS),
        "shared3": 4 * (_SC_TR * (_SC_TC + 1) + _SC_TR * _SC_BLOCK[0] + _SC_TR * NKS + 2 * _SC_TR + 2 * RG),
        "ntiles": ntiles, "NKS": NKS, "scratch3_per_head": per_head, "heads_per_chunk3": chunk,
        "TR": _SC_TR, "TC": _SC_TC, "RB": RB, "KB": KB, "RG": RG, "NQ": NQ,
    }


def _launch_scores(q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int,
                   version: int = DEFAULT_SCORES_VERSION) -> Any:
    """Versions 1, 2: ``us_scores_rowstats`` then ``us_scores_blocksum`` (two passes over C,
    SPEC 4). Version 3: ``us_scores_onepass`` (one pass, global scratch), per chunk of heads."""
    cp = _cupy()
    B, Hm, R, D = (int(s) for s in q_c.shape)
    Hkv, C = int(k_c.shape[1]), int(k_c.shape[2])
    S, c_q, c_k, c_h = config.block_size, config.c_q, config.c_k, config.c_h
    G = Hm * c_h // Hkv
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    scale = np.float32(config.scale_for(D))
    causal = np.int32(1 if config.causal else 0)
    common = (_i32(Hm), _i32(Hkv), _i32(R), _i32(C), _i32(D), _i32(nq), _i32(nk), _i32(c_q), _i32(c_k),
              _i32(c_h), _i32(G))
    scores = cp.zeros((B, Hm, nqb, nkb), dtype=cp.float32)
    lc = scores_launch_config(B, Hm, R, config, C)
    if version == 3:
        chunk, ntiles, NKS = lc["heads_per_chunk3"], lc["ntiles"], lc["NKS"]
        part = cp.empty((chunk, ntiles, R, NKS), dtype=cp.float32)  # piece sums e
        tmax = cp.empty((chunk, ntiles, R), dtype=cp.float32)       # tile maxima M, then weights w
        k3 = _loader.get_function("scores.cu", "us_scores_onepass", _scores_options(version))
        for bh0 in range(0, B * Hm, chunk):
            grid = (lc["grid3"][0], min(chunk, B * Hm - bh0), 1)
            _loader.launch(k3, grid, lc["block"],
                           (q_c, k_c, scores, part, tmax, _i32(bh0)) + common + (_i32(S), causal, scale),
                           shared_mem=lc["shared3"])
        return scores
    row_max = cp.empty((B, Hm, R), dtype=cp.float32)
    row_sum = cp.empty((B, Hm, R), dtype=cp.float32)
    k1 = _loader.get_function("scores.cu", "us_scores_rowstats", _scores_options(version))
    _loader.launch(k1, lc["grid1"], lc["block"], (q_c, k_c, row_max, row_sum) + common + (causal, scale),
                   shared_mem=lc["shared1"])
    k2 = _loader.get_function("scores.cu", "us_scores_blocksum", _scores_options(version))
    _loader.launch(k2, lc["grid2"], lc["block"],
                   (q_c, k_c, row_max, row_sum, scores) + common + (_i32(S), causal, scale),
                   shared_mem=lc["shared2"])
    return scores


def _launch_select(scores: Any, config: UniSparseConfig, nq: int, nk: int, with_indices: bool) -> tuple[Any, ...]:
    """``us_select_topp<T>``: mask (and optionally kv_counts, kv_indices) from scores."""
    cp = _cupy()
    B, Hm, nqb, nkb = (int(s) for s in scores.shape)
    ctype = "double" if scores.dtype == cp.float64 else "float"
    rows = B * Hm * nqb
    mask = cp.empty((B, Hm, nqb, nkb), dtype=cp.bool_)
    if with_indices:
        counts = cp.empty((B, Hm, nqb), dtype=cp.int32)
        indices = cp.empty((B, Hm, nqb, nkb), dtype=cp.int32)
        cptr, iptr = counts, indices
    else:
        counts = indices = None
        cptr = iptr = np.uintp(0)  # null pointers: the kernel skips the index form
    np2 = 1 << max(0, (nkb - 1).bit_length())
    shared = np2 * (scores.dtype.itemsize + 8)  # sort keys + block ids + keep flags
    kernel = _loader.get_function("selection.cu", f"us_select_topp<{ctype}>", _select_options())
    _loader.launch(
        kernel, (rows, 1, 1), (_SEL_THREADS, 1, 1),
        (scores, mask, cptr, iptr, _i32(nqb), _i32(nkb), _i32(nq), _i32(nk), _i32(config.block_size),
         _i32(config.n_sink_blocks), _i32(config.n_local_blocks), np.int32(1 if config.causal else 0),
         np.float64(config.threshold)),
        shared_mem=shared,
    )
    return mask, counts, indices


def _launch_mask_to_indices(mask: Any) -> tuple[Any, Any]:
    """``us_mask_to_indices``: FlexAttention index form of a bool mask ``[B, Hm, nQb, nKb]``."""
    cp = _cupy()
    B, Hm, nqb, nkb = (int(s) for s in mask.shape)
    counts = cp.empty((B, Hm, nqb), dtype=cp.int32)
    indices = cp.empty((B, Hm, nqb, nkb), dtype=cp.int32)
    kernel = _loader.get_function("selection.cu", "us_mask_to_indices", _select_options())
    _loader.launch(kernel, (B * Hm * nqb, 1, 1), (_SEL_THREADS, 1, 1), (mask, counts, indices, _i32(nkb)),
                   shared_mem=4 * nkb)
    return counts, indices


# ---------------------------------------------------------------------------- backend
class CupyBackend:
    """UniSparse on CUDA through CuPy RawKernels (see the module docstring).

    Every method takes the arguments of the reference (:mod:`unisparse_ref.reference`) and
    returns CuPy arrays (bf16 outputs: see :func:`as_bfloat16`); ``select_blocks`` returns a
    :class:`~unisparse_ref.BlockMask` whose ``mask`` is a CuPy bool array.
    """

    name = "cupy"
    supported_dtypes = SUPPORTED_DTYPES
    #: Any D up to 128 (the kernels run 32, 64 and 128; smaller D are zero-padded).
    supported_head_dims = tuple(range(1, _KERNEL_HEAD_DIMS[-1] + 1))
    score_eps = 1e-6

    def __init__(self, device_name: str = "", scores_version: int | None = None) -> None:
        self.device_name = device_name
        if scores_version is None:
            scores_version = int(os.environ.get("UNISPARSE_SCORES_VERSION", DEFAULT_SCORES_VERSION))
        if scores_version not in SCORES_VERSIONS:
            raise ValueError(f"scores_version must be one of {SCORES_VERSIONS}, got {scores_version!r}")
        #: Version of scores.cu (1: two passes; 2: two passes with float4 shared loads;
        #: 3, the default: one pass with a global scratch buffer).
        self.scores_version = scores_version

    # -------------------------------------------------------------- stage 1
    def compress(self, q: Any, k: Any, config: UniSparseConfig) -> tuple[Any, Any]:
        """Composite tokens (SPEC 3).

        Parameters
        ----------
        q : array ``[B, Hq, Nq, D]``
        k : array ``[B, Hkv, Nk, D]``
        config : UniSparseConfig

        Returns
        -------
        q_c : cupy float32 ``[B, Hq/c_h, R, D]``
        k_c : cupy float32 ``[B, Hkv, C, D]``
        """
        config = _check_config(config)
        (qd, kd), dt, (_, Hq, Hkv, _, _, _) = _qkv_inputs(q, k, None, config.causal)
        check_head_pooling(Hq, Hkv, config.c_h)
        q_c = _launch_pool(qd, dt, config.c_q, config.c_h)
        k_c = _launch_pool(kd, dt, config.c_k, 1)
        # Pooled means are non-finite iff some input in their group is: a cheap full check.
        _check_finite(("q", q_c, np.dtype(np.float32)), ("k", k_c, np.dtype(np.float32)))
        return q_c, k_c

    # -------------------------------------------------------------- stage 2
    def block_scores(self, q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
        """Block scores (SPEC 4): cupy float32 ``[B, Hq/c_h, nQb, nKb]``, rows summing to 1."""
        config = _check_config(config)
        qc, kc = _composite_input("q_c", q_c), _composite_input("k_c", k_c)
        check_composite_shapes(qc, kc, config, nq, nk)
        nq, nk = int(nq), int(nk)
        return _launch_scores(qc, kc, config, nq, nk, self.scores_version)

    # -------------------------------------------------------------- stage 3
    def _scores_input(self, scores: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
        cp = _cupy()
        if isinstance(scores, cp.ndarray):
            s = scores
        elif isinstance(scores, np.ndarray):
            s = cp.asarray(scores)
        else:
            s, _ = _device_input("scores", scores)
        if s.dtype not in (cp.float32, cp.float64):
            s = s.astype(cp.float64)
        s = cp.ascontiguousarray(s)
        S = config.block_size
        want = (geometry.num_blocks(nq, S), geometry.num_blocks(nk, S))
        if s.ndim != 4 or tuple(s.shape[2:]) != want:
            raise ValueError(
                f"scores must have shape [B, Hm, nQb={want[0]}, nKb={want[1]}] for nq={nq}, nk={nk}, "
                f"block_size={S}; got {tuple(s.shape)}"
            )
        if s.size and int(_bad_count_device(s, "score")):
            raise ValueError("scores must be finite and non-negative")
        return s

    def select_blocks(self, scores: Any, config: UniSparseConfig, nq: int, nk: int) -> BlockMask:
        """Top-P selection (SPEC 5): a :class:`BlockMask` with a CuPy bool mask."""
        config = _check_config(config)
        s = self._scores_input(scores, config, nq, nk)
        mask, _, _ = _launch_select(s, config, nq, nk, with_indices=False)
        return BlockMask(mask, config.block_size, config.c_h, nq, nk, config.causal)

    def select_blocks_indices(
        self, scores: Any, config: UniSparseConfig, nq: int, nk: int
    ) -> tuple[BlockMask, Any, Any]:
        """:meth:`select_blocks` plus the index form from the same kernel.

        Returns
        -------
        block_mask : BlockMask
        kv_counts : cupy int32 ``[B, Hm, nQb]``
        kv_indices : cupy int32 ``[B, Hm, nQb, nKb]`` (ascending, -1 padded)
        """
        config = _check_config(config)
        s = self._scores_input(scores, config, nq, nk)
        mask, counts, indices = _launch_select(s, config, nq, nk, with_indices=True)
        return BlockMask(mask, config.block_size, config.c_h, nq, nk, config.causal), counts, indices

    # -------------------------------------------------------------- stage 4
    def block_sparse_attention(
        self, q: Any, k: Any, v: Any, block_mask: BlockMask, config: UniSparseConfig
    ) -> tuple[Any, Any]:
        """Exact attention over the selected blocks (SPEC 6).

        Returns
        -------
        out : ``[B, Hq, Nq, D]`` of q's dtype (bf16: see :func:`as_bfloat16`)
        lse : cupy float32 ``[B, Hq, Nq]`` (``-inf`` on rows with no allowed key)
        """
        from .reference import _check_mask_against

        cp = _cupy()
        config = _check_config(config)
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask)!r}")
        (qd, kd, vd), dt, (B, Hq, Hkv, Nq, Nk, D) = _qkv_inputs(q, k, v, block_mask.causal)
        _check_mask_against(block_mask, B, Hq, Hkv, Nq, Nk, config)
        _check_finite(("q", qd, dt), ("k", kd, dt), ("v", vd, dt))
        mask = block_mask.mask
        mask = cp.ascontiguousarray(cp.asarray(mask, dtype=cp.bool_))
        counts, indices = _launch_mask_to_indices(mask)
        return self._attend(qd, kd, vd, dt, counts, indices, block_mask, config.scale_for(D))

    def _attend(self, qd: Any, kd: Any, vd: Any, dt: np.dtype, counts: Any, indices: Any, bm: BlockMask,
                scale: float) -> tuple[Any, Any]:
        try:
            att = importlib.import_module("unisparse_ref._cupy_attention")
        except ModuleNotFoundError as e:
            raise NotImplementedError(
                "the CuPy attention launcher (unisparse_ref/_cupy_attention.py) is not part of this installation"
            ) from e
        cp = _cupy()
        D = int(qd.shape[3])
        Dp = _padded_head_dim(D)
        if Dp != D:
            # Zero columns change no dot product q.k and give zero output columns, which are
            # cut off again; the scale stays that of the true D (passed explicitly).
            widths = ((0, 0), (0, 0), (0, 0), (0, Dp - D))
            qd, kd, vd = (cp.pad(a, widths) for a in (qd, kd, vd))
        out, lse = att.attention_forward(
            qd, kd, vd, counts, indices, nq=bm.nq, nk=bm.nk, block_size=bm.block_size,
            heads_per_mask=bm.heads_per_mask, causal=bm.causal, softmax_scale=float(scale),
        )
        if Dp != D:
            out = cp.ascontiguousarray(out[..., :D])
        return _wrap_output(out, dt), lse

    def dense_attention(
        self, q: Any, k: Any, v: Any, causal: bool = True, softmax_scale: float | None = None
    ) -> tuple[Any, Any]:
        """Dense attention: :meth:`block_sparse_attention` with every visible block selected."""
        cp = _cupy()
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        (qd, kd, vd), dt, (B, Hq, Hkv, Nq, Nk, D) = _qkv_inputs(q, k, v, causal)
        config = UniSparseConfig(causal=causal, softmax_scale=softmax_scale)  # validates the scale
        _check_finite(("q", qd, dt), ("k", kd, dt), ("v", vd, dt))
        S = config.block_size
        # One mask head per KV head (heads_per_mask = G): the smallest index form the attention takes.
        G = Hq // Hkv
        bm = BlockMask.full(B, Hkv, Nq, Nk, block_size=S, heads_per_mask=G, causal=causal)
        mask = cp.asarray(bm.mask)
        counts, indices = _launch_mask_to_indices(mask)
        return self._attend(qd, kd, vd, dt, counts, indices, bm, config.scale_for(D))

    # -------------------------------------------------------------- pipeline
    def unisparse_attention(
        self, q: Any, k: Any, v: Any, config: UniSparseConfig
    ) -> tuple[Any, Any, BlockMask, Any, Any, Any]:
        """The whole pipeline (SPEC 3-6) in one call, for :func:`unisparse_ref.unisparse_attention`.

        The same kernels and results as ``compress`` -> ``block_scores`` -> ``select_blocks`` ->
        ``block_sparse_attention``, with less host work between them: ``q``, ``k``, ``v`` are
        checked once (one host synchronisation for their finiteness), the intermediate arrays
        are not re-checked (they come from our own kernels), and the attention reads the index
        form that the selection kernel writes instead of converting the mask again. At 8K
        tokens, where every kernel is short, the stage-by-stage calls spend a noticeable part of
        the pipeline's time in those checks and launches.

        Returns
        -------
        out, lse, block_mask, scores, q_c, k_c
            As :class:`unisparse_ref.UniSparseResult` (CuPy arrays).
        """
        config = _check_config(config)
        (qd, kd, vd), dt, (_, Hq, Hkv, Nq, Nk, D) = _qkv_inputs(q, k, v, config.causal)
        check_head_pooling(Hq, Hkv, config.c_h)
        _check_finite(("q", qd, dt), ("k", kd, dt), ("v", vd, dt))
        q_c = _launch_pool(qd, dt, config.c_q, config.c_h)
        k_c = _launch_pool(kd, dt, config.c_k, 1)
        scores = _launch_scores(q_c, k_c, config, Nq, Nk, self.scores_version)
        mask, counts, indices = _launch_select(scores, config, Nq, Nk, with_indices=True)
        bm = BlockMask(mask, config.block_size, config.c_h, Nq, Nk, config.causal)
        out, lse = self._attend(qd, kd, vd, dt, counts, indices, bm, config.scale_for(D))
        return out, lse, bm, scores, q_c, k_c

    def __repr__(self) -> str:
        return f"CupyBackend({self.device_name!r})"


def make_backend() -> CupyBackend:
    """The CuPy backend, or :class:`~unisparse_ref.BackendUnavailable` saying why not.

    Raises
    ------
    BackendUnavailable
        CuPy is not installed, or no CUDA device is usable.
    """
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailable(
            f"cupy is not installed ({e}); install unisparse-ref[cuda13] or [cuda12]"
        ) from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError and driver failures alike
        raise BackendUnavailable(f"cupy cannot reach a CUDA device: {e}") from e
    if n < 1:
        raise BackendUnavailable("cupy found no CUDA device")
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        major = int(props["major"])
    except Exception as e:  # noqa: BLE001
        raise BackendUnavailable(f"cupy cannot query the CUDA device: {e}") from e
    if major < 8:
        raise BackendUnavailable(f"the cupy backend needs compute capability >= 8.0 (bf16); {name} has {major}.x")
    return CupyBackend(name)
