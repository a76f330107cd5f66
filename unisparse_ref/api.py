"""The one-call entry point: ``unisparse_attention``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._arrays import check_config
from .backends import get_backend
from .blockmask import BlockMask
from .config import UniSparseConfig

__all__ = ["LAYOUTS", "UniSparseResult", "unisparse_attention"]

#: Memory layouts of q, k, v (and out) that :func:`unisparse_attention` takes.
#: ``"bhnd"``: ``[B, H, N, D]`` (SPEC section 1, PyTorch SDPA and FlexAttention);
#: ``"bnhd"``: ``[B, N, H, D]`` (FlashAttention's ``flash_attn_func`` and most model code).
LAYOUTS = ("bhnd", "bnhd")


def _as_array(name: str, x: Any) -> Any:
    """``x`` itself if it is an array (has ``shape`` and ``dtype``), a NumPy array for a list or
    tuple, else ``TypeError`` naming ``name``."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    if isinstance(x, (list, tuple)):
        import numpy as np

        a = np.asarray(x)
        if a.dtype == object or a.dtype.kind not in "fiub":
            raise TypeError(f"{name}: a nested list of numbers is accepted, this one gives dtype {a.dtype}")
        return a if a.dtype.kind == "f" else a.astype(np.float32)
    raise TypeError(f"{name} must be an array (NumPy, CuPy, or any with __dlpack__), got {type(x).__name__}")


def _swap_heads_and_tokens(name: str, x: Any) -> Any:
    """``[B, N, H, D] <-> [B, H, N, D]``: a view (no copy) for NumPy, CuPy and PyTorch arrays."""
    if len(x.shape) != 4:
        raise ValueError(f"{name} must have rank 4, got shape {tuple(x.shape)}")
    if hasattr(x, "swapaxes"):  # NumPy, CuPy, PyTorch
        return x.swapaxes(1, 2)
    if hasattr(x, "gpu_data") and hasattr(x, "strides"):  # a Numba device array: a strided view
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        shape, strides = list(x.shape), list(x.strides)
        shape[1], shape[2] = shape[2], shape[1]
        strides[1], strides[2] = strides[2], strides[1]
        return DeviceNDArray(tuple(shape), tuple(strides), x.dtype, stream=x.stream, gpu_data=x.gpu_data)
    raise TypeError(f"{name}: cannot reorder the axes of a {type(x).__name__} (give layout='bhnd')")


@dataclass
class UniSparseResult:
    """Everything one UniSparse call computed (arrays of the backend that ran it).

    Attributes
    ----------
    out : ``[B, Hq, Nq, D]`` (``[B, Nq, Hq, D]`` when called with ``layout="bnhd"``)
    lse : float32 ``[B, Hq, Nq]``
    block_mask : BlockMask, ``mask [B, Hq/c_h, nQb, nKb]``
    scores : ``[B, Hq/c_h, nQb, nKb]``
    q_c : ``[B, Hq/c_h, R, D]``
    k_c : ``[B, Hkv, C, D]``
    """

    out: Any
    lse: Any
    block_mask: BlockMask
    scores: Any
    q_c: Any
    k_c: Any


def unisparse_attention(
    q: Any,
    k: Any,
    v: Any,
    config: UniSparseConfig | None = None,
    *,
    backend: str | Any = "numpy",
    return_details: bool = False,
    layout: str = "bhnd",
) -> Any:
    """UniSparse attention: compress, score, select, then exact block-sparse attention.

    A backend may provide its own ``unisparse_attention(q, k, v, config)`` returning
    ``(out, lse, block_mask, scores, q_c, k_c)``: the same four stages with less work between
    them (the CuPy backend checks its inputs once and passes the selection's index form
    straight to the attention). Otherwise the four stage methods run one after the other.

    Parameters
    ----------
    q : array, shape ``[B, Hq, Nq, D]`` (``[B, Nq, Hq, D]`` with ``layout="bnhd"``)
        NumPy, CuPy, or any array with ``__dlpack__`` / ``__cuda_array_interface__``; a nested
        list is converted with NumPy.
    k, v : array, shape ``[B, Hkv, Nk, D]`` (``[B, Nk, Hkv, D]`` with ``layout="bnhd"``)
    config : UniSparseConfig, optional
        Defaults to ``UniSparseConfig()`` (SPEC section 2).
    backend : str or backend object
        ``"numpy"`` (the reference), ``"numba"`` or ``"cupy"``.
    return_details : bool
        Return a :class:`UniSparseResult` instead of ``out`` alone.
    layout : str
        ``"bhnd"`` (default) or ``"bnhd"``: how q, k, v (and ``out``) are laid out. ``"bhnd"`` is SPEC's ``[B, H, N, D]``.
        ``"bnhd"`` is FlashAttention's ``[B, N, H, D]``: the arrays are read through a
        transposed view (the GPU backends copy a non-contiguous view into a contiguous one
        once) and ``out`` comes back as ``[B, Nq, Hq, D]``; ``lse``, the block mask and the
        composite tokens keep their head-major shapes. Passing ``[B, N, H, D]`` arrays with the
        default layout is not detectable in general (it is valid input of other sizes) and
        computes attention over the wrong axis: say ``layout="bnhd"``.

    Returns
    -------
    out : ``[B, Hq, Nq, D]`` (``[B, Nq, Hq, D]`` with ``layout="bnhd"``), or a
        :class:`UniSparseResult`.

    Raises
    ------
    ValueError
        For an unknown ``layout`` or inputs that break SPEC section 1.
    TypeError
        For a ``config`` that is not a :class:`UniSparseConfig`, or inputs that are not arrays.
    """
    config = check_config(config)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    q, k, v = _as_array("q", q), _as_array("k", k), _as_array("v", v)
    if layout == "bnhd":
        q, k, v = (_swap_heads_and_tokens(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
    be = get_backend(backend) if isinstance(backend, str) else backend
    fused = getattr(be, "unisparse_attention", None)
    if fused is not None:  # a backend's own pipeline: the same stages with less host work between them
        out, lse, block_mask, scores, q_c, k_c = fused(q, k, v, config)
    else:
        nq, nk = int(q.shape[2]), int(k.shape[2])
        q_c, k_c = be.compress(q, k, config)
        scores = be.block_scores(q_c, k_c, config, nq, nk)
        block_mask = be.select_blocks(scores, config, nq, nk)
        out, lse = be.block_sparse_attention(q, k, v, block_mask, config)
    if layout == "bnhd":
        out = _swap_heads_and_tokens("out", out)
    if return_details:
        return UniSparseResult(out, lse, block_mask, scores, q_c, k_c)
    return out
