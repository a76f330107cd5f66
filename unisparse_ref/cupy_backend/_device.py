"""Device arrays of the CuPy layer: input conversion, the bfloat16 carrier, checks on the device.

Every stage module and :class:`~unisparse_ref.cupy_backend.CupyBackend` take their inputs
through here:

* :func:`device_input`: any accepted array (CuPy, NumPy, ``BFloat16Array``, DLPack,
  ``__cuda_array_interface__``) as a C-contiguous CuPy array and its logical dtype; bf16 is
  carried as its raw 16-bit pattern (a ``uint16`` CuPy array) and read by the kernels as
  ``__nv_bfloat16``;
* :func:`qkv_inputs`, :func:`composite_input`, :func:`scores_input`: the inputs of the
  attention, of the scores and of the selection, with the shape checks of
  :mod:`unisparse_ref._arrays` (the checks every backend shares);
* :func:`nonfinite_counts`, :func:`raise_if_nonfinite`, :func:`check_finite_device` and
  :func:`count_bad`: NaN / infinity (and negative-score) counts kept on the device; reading
  them back is the only host synchronisation of a check (the pipeline reads its counts once,
  after every stage has been queued);
* :class:`BFloat16Array` and :func:`as_bfloat16`: a bf16 device array on CuPy versions
  without a bf16 dtype;
* :func:`upload_int32`: host tables (offsets, work lists) to the device in one copy that the
  host does not wait for (``cupy.asarray`` of a NumPy array waits for every kernel queued
  before it, which would leave the GPU idle while the host prepares the next launch).

This module imports without CuPy (CuPy is imported by the functions that need it).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .._arrays import BFLOAT16, check_qkv, check_scores_shape
from ..config import UniSparseConfig

__all__ = [
    "SUPPORTED_DTYPES",
    "BFloat16Array",
    "as_bfloat16",
    "check_finite_device",
    "nonfinite_counts",
    "raise_if_nonfinite",
    "composite_input",
    "count_bad",
    "count_nonfinite",
    "cupy_module",
    "device_input",
    "i32",
    "qkv_inputs",
    "scores_input",
    "upload_int32",
    "wrap_output",
]

#: Input dtypes of the CuPy layer.
SUPPORTED_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32))


def cupy_module() -> Any:
    """``cupy``, imported on first use (this package imports without it)."""
    import cupy

    return cupy


def i32(x: int) -> np.int32:
    """``x`` as the kernels' ``int`` argument; ``ValueError`` if it does not fit int32."""
    if not -(2**31) <= int(x) < 2**31:
        raise ValueError(f"size {x} does not fit the kernels' int32 indexing")
    return np.int32(x)


# ---------------------------------------------------------------------------- bfloat16
_BF16_NATIVE: bool | None = None


def _cupy_has_bf16() -> bool:
    """Whether CuPy can hold ``ml_dtypes.bfloat16`` arrays (CuPy >= 14)."""
    global _BF16_NATIVE
    if _BF16_NATIVE is None:
        cp = cupy_module()
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
    data : cupy.ndarray
        Of dtype ``uint16``:
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


def wrap_output(arr: Any, dtype: np.dtype) -> Any:
    """A kernel's output in the caller's dtype: bf16 bits become a bfloat16 device array."""
    return as_bfloat16(arr) if dtype == BFLOAT16 else arr


# ---------------------------------------------------------------------------- inputs
def _unsupported(name: str, dt: np.dtype) -> TypeError:
    allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
    return TypeError(f"{name} has dtype {dt}; the cupy backend accepts {allowed}")


def _from_foreign(name: str, x: Any) -> tuple[Any, np.dtype]:
    """A CuPy view of a DLPack / CUDA-array-interface object (zero-copy), and its dtype."""
    cp = cupy_module()
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
    cp = cupy_module()
    dt = np.dtype(a.dtype)
    if dt not in SUPPORTED_DTYPES:  # before the copy: CuPy itself cannot hold e.g. float128
        raise _unsupported(name, dt)
    if dt == BFLOAT16:
        return cp.asarray(np.ascontiguousarray(a).view(np.uint16)), BFLOAT16
    return cp.asarray(a), dt


def device_input(name: str, x: Any) -> tuple[Any, np.dtype]:
    """``x`` as a C-contiguous CuPy array (bf16 as uint16 bits) and its logical dtype.

    Raises
    ------
    TypeError
        For an unsupported array type or dtype (naming ``name``).
    """
    cp = cupy_module()
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
        raise _unsupported(name, dt)
    if not arr.flags.c_contiguous:
        arr = cp.ascontiguousarray(arr)  # documented: non-contiguous inputs are copied
    return arr, dt


def qkv_inputs(q: Any, k: Any, v: Any | None, causal: bool) -> tuple[list[Any], np.dtype, tuple[int, ...]]:
    """``q``, ``k`` (and ``v`` unless ``None``) on the device, their common dtype and
    ``(B, Hq, Hkv, Nq, Nk, D)`` from :func:`unisparse_ref._arrays.check_qkv`."""
    arrs, dts = [], []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        a, dt = device_input(name, x)
        arrs.append(a)
        dts.append(dt)
    for name, dt in zip(("k", "v"), dts[1:], strict=False):
        if dt != dts[0]:
            raise TypeError(f"{name} has dtype {dt} but q has {dts[0]}; they must match")
    third = arrs[2] if len(arrs) > 2 else arrs[1]
    dims = check_qkv(arrs[0], arrs[1], third, causal=causal, shape_only=True)
    return arrs, dts[0], dims


def composite_input(name: str, x: Any) -> Any:
    """A float32 C-contiguous CuPy array of composite tokens (any float input converted)."""
    cp = cupy_module()
    if isinstance(x, cp.ndarray):
        a = x
    elif isinstance(x, np.ndarray):
        a = cp.asarray(x.astype(np.float32) if np.dtype(x.dtype) == BFLOAT16 else x)
    else:
        a, dt = device_input(name, x)
        if dt == BFLOAT16:
            raise TypeError(f"{name}: composite tokens must be float32, got bfloat16")
    if a.ndim != 4:
        raise ValueError(f"{name} must have rank 4, got shape {tuple(a.shape)}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got {a.dtype}")
    return cp.ascontiguousarray(a, dtype=cp.float32)


def scores_input(scores: Any, config: UniSparseConfig, nq: int, nk: int, check: bool = True) -> Any:
    """Block scores as a C-contiguous float32 or float64 CuPy array, checked on the device
    (``check=False``: the shape only, no synchronisation).

    Raises
    ------
    ValueError
        A shape other than ``[B, Hm, nQb, nKb]`` (:func:`unisparse_ref._arrays.check_scores_shape`),
        or a negative or non-finite score.
    """
    cp = cupy_module()
    if isinstance(scores, cp.ndarray):
        s = scores
    elif isinstance(scores, np.ndarray):
        s = cp.asarray(scores)
    else:
        s, _ = device_input("scores", scores)
    if s.dtype not in (cp.float32, cp.float64):
        s = s.astype(cp.float64)
    s = cp.ascontiguousarray(s)
    check_scores_shape(tuple(s.shape), config, nq, nk)
    if check and s.size and int(count_bad(s, "score")):
        raise ValueError("scores must be finite and non-negative")
    return s


# ---------------------------------------------------------------------------- host tables to the device
#: Pinned staging buffers of :func:`upload_int32` whose copy may still be running, each with the
#: event recorded after it: a buffer is released only once its event has completed.
_STAGING: list[tuple[Any, Any]] = []
#: Alignment of every table in :func:`upload_int32`'s device buffer, in int32 (64 bytes).
_ALIGN_INTS = 16


def upload_int32(*tables: Any) -> list[Any]:
    """Host integer tables as int32 device arrays, in ONE copy the host does not wait for.

    ``cupy.asarray(numpy_array)`` copies from pageable memory: the host blocks until every
    kernel queued before it has finished, and the GPU then idles while the host prepares the
    next launch. Here the tables are concatenated into one page-locked buffer and copied with
    ``cudaMemcpyAsync`` on the current stream, which orders the copy before the kernels
    queued after it; the buffer is kept (``_STAGING``) until an event recorded after the copy
    has completed. Not for use inside a CUDA graph capture (the copy would read the staging
    buffer at every replay).

    Parameters
    ----------
    *tables : array_like of integers (any shape; values must fit int32)

    Returns
    -------
    list of cupy int32 arrays, the tables' shapes, views into one device buffer, each starting
    on a 64-byte boundary.
    """
    arrays = [np.asarray(t) for t in tables]
    for a in arrays:  # (int32 tables need no range check)
        if a.size and a.dtype != np.int32 and (a.dtype.kind not in "iub" or int(a.min()) < -(2**31)
                                               or int(a.max()) >= 2**31):
            raise ValueError(f"upload_int32: a table of dtype {a.dtype} does not fit int32")
    cp = cupy_module()
    flat = [np.ascontiguousarray(a, dtype=np.int32).reshape(-1) for a in arrays]
    # Every table starts on a 64-byte boundary of the buffer (cp.empty's start is 256-byte
    # aligned): kernels read table rows with vector loads (the attention's tile list as 16-byte
    # loads) and would fault on a table placed right after one of odd length.
    starts = np.cumsum([0] + [-(-f.size // _ALIGN_INTS) * _ALIGN_INTS for f in flat])
    total = int(starts[-1])
    pinned = getattr(getattr(cp, "cuda", None), "alloc_pinned_memory", None)
    mem = None if pinned is None else pinned(max(4, 4 * total))  # None: a stand-in for CuPy (tests)
    host = np.zeros(total, np.int32) if mem is None else np.frombuffer(mem, np.int32, total)
    for f, a in zip(flat, starts, strict=False):
        host[a:a + f.size] = f
    if mem is None:
        dev = cp.asarray(host, dtype=cp.int32)  # a plain copy
    else:
        dev = cp.empty(total, dtype=cp.int32)
        stream = cp.cuda.get_current_stream()
        if total:
            dev.set(host, stream=stream)  # cudaMemcpyAsync from page-locked memory: returns at once
        _STAGING[:] = [(e, m) for e, m in _STAGING if not e.done]  # copies that finished free their buffer
        _STAGING.append((stream.record(), mem))
    return [dev[int(b):int(b) + f.size].reshape(a.shape) for a, f, b in zip(arrays, flat, starts, strict=False)]


# ---------------------------------------------------------------------------- checks on the device
_NONFINITE: dict[str, Any] = {}

# Elementwise "is bad" tests, summed by a cupy.ReductionKernel without temporaries. The
# parameter is called v and literals are decimal on purpose: CuPy rewrites the parameter name
# inside the expression, which mangled a hexadecimal literal containing it (0x7F80 with x).
_BAD_EXPR = {
    "bf16": "((v & 32640) == 32640) ? 1 : 0",  # bf16 bits: exponent all ones (0x7F80) = inf or NaN
    "float": "isfinite((float)v) ? 0 : 1",
    "score": "(v < 0 || !isfinite((double)v)) ? 1 : 0",  # scores must be finite and >= 0
}


def _lanes(bits: int, mask: int) -> str:
    """The lane-wise test on an 8-byte word ``v`` of ``64 / bits`` values: how many lanes have
    every exponent bit (``mask``) set, i.e. hold infinity or NaN."""
    return " + ".join(f"(((v >> {s}) & {mask}ULL) == {mask}ULL ? 1 : 0)" for s in range(0, 64, bits))


# The same counts read as 8-byte words (four 16-bit or two 32-bit values per thread load): the
# 2-byte inputs (q, k, v of the pipelines) are counted in a quarter of the elements: on the H200
# the counts of the packed bench batch (q_c, k_c, v) took 0.167 ms instead of 0.355 ms.
_BAD_EXPR.update({
    "bf16x4": _lanes(16, 32640),  # bf16: exponent 0x7F80
    "halfx4": _lanes(16, 31744),  # float16: exponent 0x7C00
    "floatx2": _lanes(32, 2139095040),  # float32: exponent 0x7F800000
})
#: The word kind of an input dtype (see :func:`nonfinite_counts`).
_WORD_KIND = {"bfloat16": "bf16x4", "float16": "halfx4", "float32": "floatx2"}


def count_bad(arr: Any, kind: str, out: Any = None) -> Any:
    """A 0-d device array: how many entries of ``arr`` fail the test ``kind`` (no host sync).

    ``out``: a 0-d int64 device array to write the count into (e.g. ``flags[n, ...]``).
    """
    cp = cupy_module()
    if kind not in _NONFINITE:
        _NONFINITE[kind] = cp.ReductionKernel("T v", "int64 y", _BAD_EXPR[kind], "a + b", "y = a", "0",
                                              f"us_bad_{kind}")
    return _NONFINITE[kind](arr) if out is None else _NONFINITE[kind](arr, out=out)


def count_nonfinite(arr: Any, dtype: np.dtype) -> int:
    """Number of NaN/inf entries of a device array (bf16 given as uint16 bits)."""
    return int(count_bad(arr, "bf16" if dtype == BFLOAT16 else "float"))


def nonfinite_counts(*items: tuple[str, Any, np.dtype]) -> Any:
    """NaN/inf counts of ``(name, array, dtype)`` items in one int64 device array (no host sync).

    One reduction kernel per item writes its count into its slot; nothing is read back, so the
    counts can be taken before later kernels are queued (or inside a captured CUDA graph) and
    read once at the end by :func:`raise_if_nonfinite`.
    """
    cp = cupy_module()
    counts = cp.empty(len(items), dtype=cp.int64)
    for n, (_, a, dt) in enumerate(items):
        word = _WORD_KIND.get(str(np.dtype(dt)))
        if (word is not None and a.size and a.flags.c_contiguous and a.nbytes % 8 == 0 and a.data.ptr % 8 == 0
                and a.dtype.itemsize == np.dtype(dt).itemsize):
            # the same test on 8-byte words of the same bits (a contiguous, aligned array)
            count_bad(a.reshape(-1).view(cp.uint64), word, out=counts[n, ...])
        else:
            count_bad(a, "bf16" if dt == BFLOAT16 else "float", out=counts[n, ...])
    return counts


def raise_if_nonfinite(counts: Any, names: tuple[str, ...] | list[str]) -> None:
    """Read :func:`nonfinite_counts`' array back (one synchronisation); ``ValueError`` naming
    the first of ``names`` whose count is not zero."""
    host = np.asarray(counts.get()).reshape(-1)
    for name, c in zip(names, host, strict=True):
        if int(c):
            raise ValueError(f"{name} holds non-finite values (NaN or infinity)")


def check_finite_device(*items: tuple[str, Any, np.dtype]) -> None:
    """Raise ``ValueError`` naming the first of ``(name, array, dtype)`` holding NaN or infinity.

    All counts are kept on the device and read back once (one synchronisation).
    """
    raise_if_nonfinite(nonfinite_counts(*items), [name for name, _, _ in items])
