"""Array conversion: any backend's (or framework's) array to NumPy, and the dtypes we take.

The bottom of the package: imports nothing of it. :mod:`unisparse_ref._arrays` re-exports
everything here beside the input checks.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["BFLOAT16", "SUPPORTED_DTYPES", "dtype_name", "to_numpy"]

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
