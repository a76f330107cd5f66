"""The Numba CUDA prototype layer: the five stages as Numba CUDA kernels.

One module per stage holds its readable kernels and their launches (grid, block and the
host code around them), each entered through one function:

============================  ==================================================
:mod:`.pooling`               stage 1, :func:`~.pooling.compress`
:mod:`.scores`                stage 2, :func:`~.scores.block_scores`
:mod:`.selection`             stage 3, :func:`~.selection.select_blocks`
:mod:`.attention`             stage 4, :func:`~.attention.block_sparse_attention`
                              (and :func:`~.attention.dense_attention`)
:mod:`.varlen`                stage 4 on serving layouts: packed ragged batches
                              and paged KV caches, one launch for the batch
:mod:`.merge`                 merging partial attention states
============================  ==================================================

Serving layouts (the *Serving layouts* page): the backend's
``block_sparse_attention_varlen`` and ``block_sparse_attention_paged`` read ``cu_seqlens``
and the block table in the kernel; pooling, scoring and selection of a packed batch run
through the batch stages one sequence at a time
(:func:`unisparse_ref.unisparse_attention_varlen` drives them).

:class:`NumbaBackend` only checks its inputs (with the shared checks of
:mod:`unisparse_ref._arrays`), puts them on the device and calls those functions. The stage
modules import numba; this module imports them only when the backend is built, so it
imports without numba. Runs on an NVIDIA GPU, or on the CPU in Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported), where every thread is a Python
thread: slow, but the same code, barriers included.

Inputs: NumPy arrays (copied to the device, after the shared checks) or any object
with ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors, Numba device arrays),
used in place without a copy. Outputs are Numba device arrays
(:func:`unisparse_ref.to_numpy` copies them to the host), except the block mask, which is
returned as a NumPy :class:`~unisparse_ref.BlockMask`.

Precision: pooling, scoring and selection in float64, like the reference (``score_eps =
1e-9``: only the summation order differs; selection on identical scores gives the
reference's mask); attention with float32 accumulation and probabilities rounded to the
input dtype (float16 or float32). bfloat16 and float64 inputs raise ``TypeError``.

The research variants of :class:`~unisparse_ref.UniSparseConfig` (``threshold_mode``,
``sink_tokens``, ``diagonal_correction``; the *Calibration* page) run here as in the reference:
``compress`` returns ``k_c [B, Hkv, t + C, D]`` with ``sink_tokens = t > 0``, ``block_scores``
adds the variants' log-weights to the logits, ``select_blocks`` applies ``P`` to the remaining
mass.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._arrays import (
    check_composite_shapes,
    check_config,
    check_finite,
    check_head_pooling,
    check_mask_against,
    check_merge_states,
    check_packed_mask,
    check_paged_qkv,
    check_qkv,
    check_scores,
    check_scores_shape,
    check_varlen_qkv,
    dtype_name,
    to_numpy,
)
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from ..errors import BackendUnavailable

__all__ = ["NumbaBackend", "make_backend"]


class _Shape:
    """A stand-in with only ``.shape``: the shape checks of :mod:`unisparse_ref._arrays` look at nothing else."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(s) for s in shape)


class NumbaBackend:
    """UniSparse with Numba CUDA kernels (the prototype layer).

    Same methods, shapes and semantics as the reference backend (:mod:`unisparse_ref.reference`);
    see the module docstring for array types and precision. Build it with :func:`make_backend`.
    """

    name = "numba"
    supported_dtypes: tuple[np.dtype, ...] = (np.dtype(np.float16), np.dtype(np.float32))
    #: Score tolerance (SPEC section 7). The scoring runs in float64 like the reference, so
    #: scores differ from it only by summation order (~1e-15); 1e-9 leaves a wide margin.
    score_eps = 1e-9

    def __init__(self) -> None:
        from numba import cuda

        from . import attention, merge, pooling, scores, selection, varlen  # these import numba

        self._cuda = cuda
        self._pooling, self._scores, self._selection, self._attention = pooling, scores, selection, attention
        self._varlen, self._merge = varlen, merge

    # ------------------------------------------------------------------ arrays
    def _check_supported(self, name: str, dt: np.dtype) -> None:
        """``TypeError`` naming ``name`` unless ``dt`` is float16 or float32."""
        if dt not in self.supported_dtypes:
            allowed = ", ".join(dtype_name(d) for d in self.supported_dtypes)
            raise TypeError(f"{name} has dtype {dtype_name(dt)}; the numba backend supports {allowed}")

    def _device(self, name: str, x: Any) -> Any:
        """``x`` as a Numba device array: zero-copy for CUDA arrays, a checked copy otherwise."""
        if hasattr(x, "__cuda_array_interface__"):
            self._check_supported(name, np.dtype(x.__cuda_array_interface__["typestr"]))
            return self._cuda.as_cuda_array(x)  # no copy; non-finite values are not checked
        a = to_numpy(x)
        self._check_supported(name, np.dtype(a.dtype))
        check_finite(name, a)
        return self._cuda.to_device(np.ascontiguousarray(a))

    def _device_float64(self, x: Any) -> Any:
        """``x`` (composite tokens) as a float64 device array: zero-copy when it is one already."""
        cuda = self._cuda
        if hasattr(x, "__cuda_array_interface__") and np.dtype(x.__cuda_array_interface__["typestr"]) == np.float64:
            return cuda.as_cuda_array(x)
        return cuda.to_device(np.ascontiguousarray(np.asarray(to_numpy(x), dtype=np.float64)))

    def _qkv(self, q: Any, k: Any, v: Any, causal: bool) -> tuple[Any, Any, Any, tuple[int, ...]]:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not hasattr(x, "shape"):
                raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
        dq, dk = self._device("q", q), self._device("k", k)
        dv = dk if v is k else self._device("v", v)
        dims = check_qkv(dq, dk, dv, causal=causal)
        return dq, dk, dv, dims

    # ------------------------------------------------------------------ stage 1
    def compress(self, q: Any, k: Any, config: UniSparseConfig) -> tuple[Any, Any]:
        """Composite tokens: ``q_c`` float64 ``[B, Hq/c_h, R, D]``, ``k_c`` float64 ``[B, Hkv, C, D]``
        (``[B, Hkv, t + C, D]`` with the research option ``sink_tokens = t > 0``)."""
        config = check_config(config)
        dq, dk, _, (_, Hq, Hkv, _, _, _) = self._qkv(q, k, k, config.causal)
        check_head_pooling(Hq, Hkv, config.c_h)
        return self._pooling.compress(dq, dk, config)

    # ------------------------------------------------------------------ stage 2
    def block_scores(self, q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
        """Block scores, float64 device array ``[B, Hm, nQb, nKb]`` (rows sum to 1).

        With ``config.sink_tokens = t > 0``, ``k_c`` is ``[B, Hkv, t + C, D]`` as :meth:`compress`
        returns it.
        """
        config = check_config(config)
        t = config.sink_tokens
        if t > 0:  # research variant: t un-pooled sink keys in front of the C composite keys
            if not hasattr(k_c, "shape") or len(k_c.shape) != 4 or int(k_c.shape[2]) <= t:
                raise ValueError(f"with sink_tokens={t}, k_c must be [B, Hkv, {t} + C, D]; "
                                 f"got {getattr(k_c, 'shape', type(k_c))}")
            check_composite_shapes(q_c, _Shape(tuple(k_c.shape[:2]) + (int(k_c.shape[2]) - t, k_c.shape[3])),
                                   config, nq, nk)
        else:
            check_composite_shapes(q_c, k_c, config, nq, nk)
        return self._scores.block_scores(self._device_float64(q_c), self._device_float64(k_c), config, nq, nk)

    # ------------------------------------------------------------------ stage 3
    def select_blocks(self, scores: Any, config: UniSparseConfig, nq: int, nk: int) -> BlockMask:
        """Top-P selection on the device; a :class:`BlockMask` with a NumPy ``mask``."""
        config = check_config(config)
        s = check_scores(scores)  # on the host: small ([B, Hm, nQb, nKb]); checks finite, >= 0
        check_scores_shape(s.shape, config, nq, nk)
        return self._selection.select_blocks(s, config, nq, nk)

    # ------------------------------------------------------------------ stage 4
    def block_sparse_attention(
        self, q: Any, k: Any, v: Any, block_mask: BlockMask, config: UniSparseConfig
    ) -> tuple[Any, Any]:
        """``(out [B,Hq,Nq,D] input dtype, lse float32 [B,Hq,Nq])`` as device arrays."""
        config = check_config(config)
        if not isinstance(block_mask, BlockMask):  # before block_mask.causal is read below
            raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask)!r}")
        dq, dk, dv, (B, Hq, Hkv, Nq, Nk, D) = self._qkv(q, k, v, block_mask.causal)
        check_mask_against(block_mask, B, Hq, Hkv, Nq, Nk, config)
        return self._attention.block_sparse_attention(dq, dk, dv, block_mask, config.scale_for(D))

    def dense_attention(
        self, q: Any, k: Any, v: Any, causal: bool = True, softmax_scale: float | None = None
    ) -> tuple[Any, Any]:
        """Dense attention: the block-sparse kernel with every visible block (``BlockMask.full``)."""
        config = UniSparseConfig(causal=bool(causal), softmax_scale=softmax_scale)
        dq, dk, dv, (_, _, _, _, _, D) = self._qkv(q, k, v, config.causal)
        return self._attention.dense_attention(dq, dk, dv, config.causal, config.scale_for(D), config.block_size)

    # ------------------------------------------------------------------ serving layouts
    def _packed_device(self, name: str, x: Any) -> Any:
        """``x`` on the device (:meth:`_device`), refused if a CUDA array is not C-contiguous (the kernel reshapes it)."""
        d = self._device(name, x)
        if not d.is_c_contiguous():
            raise ValueError(f"{name}: the numba varlen kernels need a C-contiguous CUDA array")
        return d

    def block_sparse_attention_varlen(
        self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, kv_counts: Any, kv_indices: Any,
        config: UniSparseConfig,
    ) -> tuple[Any, Any]:
        """Packed attention in one launch: ``(out [total_q, Hq, D] input dtype, lse float32 [Hq, total_q])``.

        ``q [total_q, Hq, D]``, ``k``, ``v [total_k, Hkv, D]``; the masks in the packed index
        form (``kv_counts [Hm, total_qb]``, ``kv_indices [Hm, total_qb, W]``); block size,
        ``c_h`` and causality from ``config``. The kernel reads ``cu_seqlens`` itself
        (:mod:`unisparse_ref.numba_backend.varlen`).
        """
        config = check_config(config)
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not hasattr(x, "shape"):
                raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
        dq, dk = self._packed_device("q", q), self._packed_device("k", k)
        dv = dk if v is k else self._packed_device("v", v)
        cu_q, cu_k, Hq, _, D = check_varlen_qkv(dq, dk, dv, cu_seqlens_q, cu_seqlens_k, causal=config.causal)
        counts, indices, _ = check_packed_mask(kv_counts, kv_indices, cu_q, np.diff(cu_k), config.block_size,
                                               Hq // config.c_h)
        return self._varlen.block_sparse_attention_varlen(dq, dk, dv, cu_q, cu_k, counts, indices, config.block_size,
                                                          config.c_h, config.causal, config.scale_for(D))

    def block_sparse_attention_paged(
        self, q: Any, k_pages: Any, v_pages: Any, cu_seqlens_q: Any, block_table: Any, seqused_k: Any,
        kv_counts: Any, kv_indices: Any, config: UniSparseConfig,
    ) -> tuple[Any, Any]:
        """Packed queries against a paged KV cache in one launch; the kernel reads the block table itself.

        ``q [total_q, Hq, D]``, ``k_pages``, ``v_pages [num_pages, page_size, Hkv, D]``,
        ``block_table [batch, max_pages]``, ``seqused_k [batch]``, the packed masks as in
        :meth:`block_sparse_attention_varlen`. Returns ``(out [total_q, Hq, D], lse float32 [Hq, total_q])``.
        """
        config = check_config(config)
        for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
            if not hasattr(x, "shape"):
                raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
        dq = self._packed_device("q", q)
        dk, dv = self._packed_device("k_pages", k_pages), self._packed_device("v_pages", v_pages)
        cu_q, table, used, Hq, _, D = check_paged_qkv(dq, dk, dv, cu_seqlens_q, block_table, seqused_k,
                                                      causal=config.causal)
        counts, indices, _ = check_packed_mask(kv_counts, kv_indices, cu_q, used, config.block_size, Hq // config.c_h)
        return self._varlen.block_sparse_attention_paged(dq, dk, dv, cu_q, table, used, counts, indices,
                                                         config.block_size, config.c_h, config.causal,
                                                         config.scale_for(D))

    def _lse_device(self, name: str, x: Any) -> Any:
        """An ``lse`` as a contiguous float32 device array; host values checked (no NaN, no ``+inf``)."""
        if hasattr(x, "__cuda_array_interface__"):
            d = self._cuda.as_cuda_array(x)
            if np.dtype(d.dtype) != np.float32 or not d.is_c_contiguous():
                raise TypeError(f"{name}: a CUDA lse must be a C-contiguous float32 array, got {d.dtype}")
            return d
        a = np.ascontiguousarray(to_numpy(x), dtype=np.float32)
        if np.isnan(a).any() or np.isposinf(a).any():
            raise ValueError(f"{name} must be finite or -inf (an empty row), it holds NaN or +inf")
        return self._cuda.to_device(a)

    def merge_attention_states(self, out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> tuple[Any, Any]:
        """Merge two partial states over disjoint key sets on the device (:mod:`unisparse_ref.numba_backend.merge`).

        ``out_a``, ``out_b [..., D]`` (float16 or float32, the same), ``lse_a``, ``lse_b``
        ``[...]`` (out's shape without ``D``; ``lse.T`` for the packed layout). Returns
        ``(out [..., D] of the inputs' dtype, lse float32 [...])`` as device arrays.
        """
        check_merge_states(out_a, lse_a, out_b, lse_b)
        da, db = self._packed_device("out_a", out_a), self._packed_device("out_b", out_b)
        if np.dtype(da.dtype) != np.dtype(db.dtype):
            raise TypeError(f"out_b has dtype {db.dtype} but out_a has {da.dtype}; they must match")
        la, lb = self._lse_device("lse_a", lse_a), self._lse_device("lse_b", lse_b)
        shape = tuple(int(s) for s in da.shape)
        rows, D = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
        out, lse = self._merge.merge(da.reshape(rows, D), la.reshape(rows), db.reshape(rows, D), lb.reshape(rows))
        return out.reshape(*shape), lse.reshape(*shape[:-1])

    def __repr__(self) -> str:
        return "NumbaBackend()"


def make_backend() -> NumbaBackend:
    """The Numba backend, or :class:`~unisparse_ref.BackendUnavailable` saying why not.

    Needs numba-cuda, and either a CUDA GPU (``numba.cuda.is_available()``) or the simulator
    (``NUMBA_ENABLE_CUDASIM=1`` in the environment before numba is imported).
    """
    try:
        from numba import cuda
    except ImportError as e:
        raise BackendUnavailable(f"numba-cuda is not installed ({e}); pip install 'unisparse-ref[numba]'") from e
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if not simulator:
        try:
            ok = cuda.is_available()
        except Exception as e:  # a broken driver install raises instead of returning False
            raise BackendUnavailable(f"numba.cuda.is_available() failed: {e}") from e
        if not ok:
            raise BackendUnavailable(
                "no CUDA GPU is usable by numba (numba.cuda.is_available() is False); "
                "set NUMBA_ENABLE_CUDASIM=1 before importing numba to run the kernels in the simulator"
            )
    return NumbaBackend()
