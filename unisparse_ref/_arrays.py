"""Array conversion and input validation shared by every backend."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "BFLOAT16",
    "SUPPORTED_DTYPES",
    "to_numpy",
    "dtype_name",
    "check_dtype",
    "check_qkv",
    "check_finite",
    "check_composite_shapes",
]

#: NumPy's bfloat16, from ml_dtypes.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

#: Input dtypes every backend accepts (a backend may accept fewer and says so).
SUPPORTED_DTYPES: tuple[np.dtype, ...] = (
    np.dtype(np.float16),
    BFLOAT16,
    np.dtype(np.float32),
    np.dtype(np.float64),
)


def dtype_name(dtype: Any) -> str:
    """A short name for a dtype: ``float16``, ``bfloat16``, ``float32`` or ``float64``."""
    return str(np.dtype(dtype))


def to_numpy(x: Any) -> np.ndarray:
    """Convert any backend's array to a NumPy array (a copy off the device when needed).

    Accepts NumPy arrays, CuPy arrays, Numba device arrays, and any object with
    ``__cuda_array_interface__`` or ``__dlpack__`` (PyTorch and JAX tensors, CPU or CUDA),
    without importing PyTorch or JAX. bfloat16 comes back as ``ml_dtypes.bfloat16``.

    Parameters
    ----------
    x : array-like
        The array to convert.

    Returns
    -------
    numpy.ndarray
    """
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (np.generic, int, float, bool, list, tuple)):
        return np.asarray(x)
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        return x.get()
    if hasattr(x, "copy_to_host"):  # numba device array
        return x.copy_to_host()
    if mod == "torch":
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            return to_numpy(t.view(_torch_int16(t))).view(BFLOAT16)
        return t.cpu().numpy()
    if hasattr(x, "__cuda_array_interface__"):
        try:
            import cupy

            return cupy.asarray(x).get()
        except ImportError:  # pragma: no cover - only without CuPy
            from numba import cuda

            return cuda.as_cuda_array(x).copy_to_host()
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (RuntimeError, BufferError, TypeError):
            import cupy

            return cupy.from_dlpack(x).get()
    return np.asarray(x)


def _torch_int16(t: Any) -> Any:
    import sys

    return sys.modules["torch"].int16


def check_dtype(name: str, dtype: Any) -> np.dtype:
    """Raise ``TypeError`` naming ``name`` unless ``dtype`` is one of :data:`SUPPORTED_DTYPES`."""
    dt = np.dtype(dtype)
    if dt not in SUPPORTED_DTYPES:
        allowed = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {dt}; expected one of {allowed}")
    return dt


def check_finite(name: str, x: np.ndarray) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or infinity."""
    finite = np.isfinite(x)  # elementwise on the input dtype (ml_dtypes' bfloat16 included)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(f"{name} holds a non-finite value at index {tuple(int(i) for i in bad)}")


def check_qkv(
    q: Any, k: Any, v: Any, *, causal: bool, shape_only: bool = False
) -> tuple[int, int, int, int, int, int]:
    """Validate attention inputs (SPEC section 1) and return ``(B, Hq, Hkv, Nq, Nk, D)``.

    Only shapes and dtypes are looked at, so this works for any array type with ``.shape``
    and ``.dtype``.

    Raises
    ------
    ValueError
        Wrong rank, mismatched batch / head dim / KV shapes, ``Hq % Hkv != 0``, ``Nq > Nk``
        when causal, empty sequences or head dims.
    TypeError
        Unsupported dtypes, or q, k, v of different dtypes.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
        if len(x.shape) != 4:
            raise ValueError(
                f"{name} must have rank 4 [B, H, N, D], got shape {tuple(x.shape)}"
            )
    if not shape_only:
        dq = check_dtype("q", q.dtype)
        for name, x in (("k", k), ("v", v)):
            if check_dtype(name, x.dtype) != dq:
                raise TypeError(f"{name} has dtype {np.dtype(x.dtype)} but q has {dq}; they must match")
    B, Hq, Nq, D = (int(s) for s in q.shape)
    Bk, Hkv, Nk, Dk = (int(s) for s in k.shape)
    if tuple(int(s) for s in v.shape) != (Bk, Hkv, Nk, Dk):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"k has batch {Bk} but q has batch {B}")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} but q has head dim {D}")
    if min(B, Hq, Hkv, D) < 1:
        raise ValueError(f"q and k must have B, H, D >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Nq < 1:
        raise ValueError(f"q must hold at least one query (Nq >= 1), got shape {tuple(q.shape)}")
    if Nk < 1:
        raise ValueError(f"k must hold at least one key (Nk >= 1), got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv}")
    if causal and Nq > Nk:
        raise ValueError(
            f"causal attention needs Nq <= Nk (queries are the last Nq positions), got Nq={Nq}, Nk={Nk}"
        )
    return B, Hq, Hkv, Nq, Nk, D


def check_head_pooling(Hq: int, Hkv: int, c_h: int) -> None:
    """Raise ``ValueError`` unless ``c_h`` divides the GQA group size ``G = Hq // Hkv`` (SPEC 3)."""
    G = Hq // Hkv
    if G % c_h != 0:
        raise ValueError(f"config.c_h={c_h} must divide the GQA group size G = Hq/Hkv = {G}")


def check_composite_shapes(q_c: Any, k_c: Any, config: Any, nq: Any, nk: Any) -> None:
    """Validate composite tokens for ``block_scores`` (SPEC sections 3 and 4), shapes only.

    Works for any array type with ``.shape`` (no host copy). ``config`` is a
    :class:`~unisparse_ref.UniSparseConfig`.

    Raises
    ------
    ValueError
        Wrong rank, non-positive or non-integer ``nq``/``nk``, ``nq > nk`` when causal, a
        composite length other than ``ceil(nq/c_q)`` / ``ceil(nk/c_k)``, batch or head-dim
        mismatch, or composite heads incompatible with the KV heads and ``c_h``.
    """
    for name, x in (("q_c", q_c), ("k_c", k_c)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"q_c and k_c must have rank 4, got {name} {getattr(x, 'shape', type(x))}")
    if not (isinstance(nq, (int, np.integer)) and isinstance(nk, (int, np.integer))) or nq < 1 or nk < 1:
        raise ValueError(f"nq and nk must be positive ints, got {nq!r}, {nk!r}")
    if config.causal and nq > nk:
        raise ValueError(f"causal scoring needs nq <= nk, got nq={nq}, nk={nk}")
    qs, ks = tuple(int(s) for s in q_c.shape), tuple(int(s) for s in k_c.shape)
    R, C = -(-int(nq) // config.c_q), -(-int(nk) // config.c_k)
    if qs[2] != R:
        raise ValueError(f"q_c has {qs[2]} composite queries, expected ceil(nq/c_q) = {R}")
    if ks[2] != C:
        raise ValueError(f"k_c has {ks[2]} composite keys, expected ceil(nk/c_k) = {C}")
    if qs[0] != ks[0] or qs[3] != ks[3]:
        raise ValueError(f"q_c {qs} and k_c {ks} must agree in batch and head dim")
    Hq = qs[1] * config.c_h
    if Hq % ks[1] != 0 or (Hq // ks[1]) % config.c_h != 0:
        raise ValueError(
            f"q_c has {qs[1]} composite heads (Hq = {Hq} with c_h={config.c_h}), incompatible with {ks[1]} KV heads"
        )
