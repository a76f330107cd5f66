"""The Numba CUDA prototype layer: the five stages as Numba CUDA kernels.

Readable kernels in :mod:`unisparse_ref.numba_kernels` (one module per stage), launched
from here. Runs on an NVIDIA GPU, or on the CPU in Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported), where every thread is a Python
thread: slow, but the same code, barriers included.

Inputs: NumPy arrays (copied to the device, after the reference's checks) or any object
with ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors, Numba device arrays),
used in place without a copy. Outputs are Numba device arrays
(:func:`unisparse_ref.to_numpy` copies them to the host), except the block mask, which is
returned as a NumPy :class:`~unisparse_ref.BlockMask`.

Precision: pooling, scoring and selection in float64, like the reference (``score_eps =
1e-9``: only the summation order differs; selection on identical scores gives the
reference's mask); attention with float32 accumulation and probabilities rounded to the
input dtype (float16 or float32). bfloat16 and float64 inputs raise ``TypeError``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import geometry
from ._arrays import check_composite_shapes, check_finite, check_head_pooling, check_qkv, dtype_name, to_numpy
from .backends import BackendUnavailable
from .blockmask import BlockMask
from .config import UniSparseConfig
from .reference import _check_config, _check_mask_against, _check_scores

__all__ = ["NumbaBackend", "make_backend"]


class NumbaBackend:
    """UniSparse with Numba CUDA kernels (the prototype layer).

    Same methods, shapes and semantics as :mod:`unisparse_ref.reference`; see the module
    docstring for array types and precision. Build it with :func:`make_backend`.
    """

    name = "numba"
    supported_dtypes: tuple[np.dtype, ...] = (np.dtype(np.float16), np.dtype(np.float32))
    #: Score tolerance (SPEC section 7). The scoring runs in float64 like the reference, so
    #: scores differ from it only by summation order (~1e-15); 1e-9 leaves a wide margin.
    score_eps = 1e-9

    def __init__(self) -> None:
        from numba import cuda

        from .numba_kernels import attention, pooling, scores, selection, simulator_launch

        self._cuda = cuda
        self._simulator_launch = simulator_launch
        self._pooling, self._scores, self._selection, self._attention = pooling, scores, selection, attention

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

    def _device_float(self, name: str, x: Any, dtype: Any) -> Any:
        """``x`` as a device array of ``dtype`` (float64 composite tokens, int32 indices)."""
        cuda = self._cuda
        dt = np.dtype(dtype)
        if hasattr(x, "__cuda_array_interface__") and np.dtype(x.__cuda_array_interface__["typestr"]) == dt:
            return cuda.as_cuda_array(x)
        return cuda.to_device(np.ascontiguousarray(np.asarray(to_numpy(x), dtype=dt)))

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
        """Composite tokens: ``q_c`` float64 ``[B, Hq/c_h, R, D]``, ``k_c`` float64 ``[B, Hkv, C, D]``."""
        config = _check_config(config)
        dq, dk, _, (_, Hq, Hkv, _, _, _) = self._qkv(q, k, k, config.causal)
        check_head_pooling(Hq, Hkv, config.c_h)
        q_c = self._pooling.pool_sequence(dq, config.c_q)
        if config.c_h > 1:
            q_c = self._pooling.pool_heads(q_c, config.c_h)
        k_c = self._pooling.pool_sequence(dk, config.c_k)
        return q_c, k_c

    # ------------------------------------------------------------------ stage 2
    def block_scores(self, q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
        """Block scores, float64 device array ``[B, Hm, nQb, nKb]`` (rows sum to 1)."""
        config = _check_config(config)
        check_composite_shapes(q_c, k_c, config, nq, nk)
        dq = self._device_float("q_c", q_c, np.float64)
        dk = self._device_float("k_c", k_c, np.float64)
        B, Hm, R, D = dq.shape
        Hkv = dk.shape[1]
        S = config.block_size
        G = Hm * config.c_h // Hkv
        nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
        scale = np.float64(config.scale_for(D))
        cuda, ks = self._cuda, self._scores
        C = dk.shape[2]
        q_t = cuda.device_array((B, Hm, D, R), dtype=np.float64)  # [B, H, D, n] layouts: coalesced
        k_t = cuda.device_array((B, Hkv, D, C), dtype=np.float64)
        for x, x_t in ((dq, q_t), (dk, k_t)):
            grid, block = ks.transpose_geometry(x.size)
            ks.transpose_kernel[grid, block](x, x_t)
        row_max = cuda.device_array((B, Hm, R), dtype=np.float64)
        row_sum = cuda.device_array((B, Hm, R), dtype=np.float64)
        grid, block = ks.row_stats_geometry(B, Hm, R)
        ks.row_stats_kernel[grid, block](q_t, k_t, scale, config.c_q, config.c_k, config.c_h, G, nq, nk,
                                         config.causal, row_max, row_sum)
        colsum = cuda.device_array((B, Hm, nqb, C), dtype=np.float64)
        out = cuda.device_array((B, Hm, nqb, nkb), dtype=np.float64)
        grid, block = ks.block_scores_geometry(B, Hm, nqb)
        with self._simulator_launch():
            ks.block_scores_kernel[grid, block](dq, k_t, row_max, row_sum, scale, S, config.c_q, config.c_k,
                                                config.c_h, G, nq, nk, config.causal, colsum, out)
        return out

    # ------------------------------------------------------------------ stage 3
    def select_blocks(self, scores: Any, config: UniSparseConfig, nq: int, nk: int) -> BlockMask:
        """Top-P selection on the device; a :class:`BlockMask` with a NumPy ``mask``."""
        config = _check_config(config)
        s = _check_scores(scores)  # on the host: small ([B, Hm, nQb, nKb]); checks finite, >= 0
        S = config.block_size
        nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
        if s.shape[2:] != (nqb, nkb):
            raise ValueError(
                f"scores must have shape [B, Hm, nQb={nqb}, nKb={nkb}] for nq={nq}, nk={nk}, "
                f"block_size={S}; got {s.shape}"
            )
        if config.causal and nq > nk:
            raise ValueError(f"causal selection needs nq <= nk, got nq={nq}, nk={nk}")
        cuda = self._cuda
        B, Hm = s.shape[:2]
        visible = geometry.visible_blocks(nq, nk, S, config.causal).astype(np.uint8)
        forced = geometry.forced_blocks(
            nq, nk, S, config.n_sink_blocks, config.n_local_blocks, config.causal
        ).astype(np.uint8)
        order = cuda.device_array(s.shape, dtype=np.int32)
        mask = cuda.device_array(s.shape, dtype=np.uint8)
        grid, block = self._selection.selection_geometry(B, Hm, nqb)
        P = float(config.threshold)
        with self._simulator_launch():
            self._selection.select_kernel[grid, block](
                cuda.to_device(np.ascontiguousarray(s)), cuda.to_device(visible), cuda.to_device(forced), P, P >= 1.0, order, mask
            )
        return BlockMask(mask.copy_to_host().astype(bool), S, config.c_h, nq, nk, config.causal)

    # ------------------------------------------------------------------ stage 4
    def block_sparse_attention(
        self, q: Any, k: Any, v: Any, block_mask: BlockMask, config: UniSparseConfig
    ) -> tuple[Any, Any]:
        """``(out [B,Hq,Nq,D] input dtype, lse float32 [B,Hq,Nq])`` as device arrays."""
        config = _check_config(config)
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask)!r}")
        dq, dk, dv, (B, Hq, Hkv, Nq, Nk, D) = self._qkv(q, k, v, block_mask.causal)
        _check_mask_against(block_mask, B, Hq, Hkv, Nq, Nk, config)
        counts, indices = block_mask.to_indices()
        return self._attention.block_sparse_attention(
            dq, dk, dv, self._device_float("kv_counts", counts, np.int32),
            self._device_float("kv_indices", indices, np.int32), block_mask.block_size,
            block_mask.heads_per_mask, block_mask.causal, config.scale_for(D),
        )

    def dense_attention(
        self, q: Any, k: Any, v: Any, causal: bool = True, softmax_scale: float | None = None
    ) -> tuple[Any, Any]:
        """Dense attention: the block-sparse kernel with every visible block (``BlockMask.full``)."""
        config = UniSparseConfig(causal=bool(causal), softmax_scale=softmax_scale)
        dq, dk, dv, (B, Hq, _, Nq, Nk, _) = self._qkv(q, k, v, config.causal)
        full = BlockMask.full(B, Hq, Nq, Nk, block_size=config.block_size, causal=config.causal)
        return self.block_sparse_attention(dq, dk, dv, full, config)

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
