"""The CuPy RawKernel backend: the production GPU layer, without PyTorch.

Every stage of the pipeline is a CUDA C++ kernel in ``raw_kernels/`` compiled by NVRTC
through :class:`cupy.RawModule`. Each stage has one module here holding its kernel
instantiations with their NVRTC options, its launch configuration (one visible function) and
its launch; ``unisparse_ref.cupy_backend._loader`` reads, compiles and launches:

============================  ==============================================  =====================
method                        kernels (module)                                source
============================  ==============================================  =====================
``compress``                  ``us_pool_seq<T>`` (:mod:`.pooling`)            ``pooling.cu``
``block_scores``              ``us_split_rows`` + ``us_scores_mma<NW, VAR>``  ``scores.cu``
                              (v4, tensor cores; v3 ``us_scores_onepass``
                              for ``S/c_q > 256`` or ``D > 256``)
                              (:mod:`.scores`)
``select_blocks``             ``us_select_topp<float|double>``                ``selection.cu``
                              (:mod:`.selection`)
``block_sparse_attention``    ``us_mask_to_indices`` + the attention ladder   ``selection.cu``,
                              v1, v6, v7 (:mod:`.attention`)                  ``attention.cu``
``dense_attention``           the same with every visible block selected      ``attention.cu``
============================  ==============================================  =====================

Inputs
------
CuPy arrays; NumPy arrays (copied to the device); any object exposing ``__dlpack__`` or
``__cuda_array_interface__`` (a PyTorch or JAX CUDA tensor: zero-copy, neither library is
imported). Accepted dtypes: float16, bfloat16 and float32 (float64 raises ``TypeError``).
A non-contiguous input is copied into a C-contiguous array first (this costs one copy;
pass contiguous tensors to avoid it). Inputs must be finite; ``compress``, the attention and
the pipeline count NaN/infinity on the device and raise ``ValueError`` otherwise (one
synchronisation per call, at its end for the pipeline; ``check_finite=False`` skips it).

Pipeline
--------
:meth:`CupyBackend.unisparse_attention` queues every stage without a host synchronisation
between them; ``graph=True`` (or :meth:`CupyBackend.plan`) replays it from a CUDA graph
captured once per shapes, dtype and config (:class:`PipelinePlan`, ``cupy_backend/plan.py``).

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
Pooling, softmax and block sums run in float32; the compressed logits run on the tensor cores
from two fp16 parts per float32 operand (22-bit operands, float32 sums; scores version 4) of
the *centred* composite keys (each key minus the mean of the first 64 keys of its sequence and
KV head: the same softmax, smaller float32 logits), ``score_eps = 1e-6`` (SPEC 7). Largest
error over every GPU case of the scores tests (H200, 2026-12-01, session 5): 4.9e-7 (two
parts), 3.1e-7 (three), 6.2e-7 (version 3) (docs/gpu_results/estimator.md). The selection adds
in float64 exactly as the reference does, so on identical scores its mask is the reference's.
Attention accumulates in float32; ``lse`` is float32.

This package imports without CuPy; CuPy is imported by :func:`make_backend` and the methods.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from .._arrays import (
    check_composite_shapes,
    check_config,
    check_head_pooling,
    check_mask_against,
    check_spec_variants,
)
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from ..errors import BackendUnavailable
from . import attention, pooling, scores, selection, varlen
from ._device import (
    SUPPORTED_DTYPES,
    BFloat16Array,
    as_bfloat16,
    check_finite_device,
    composite_input,
    cupy_module,
    nonfinite_counts,
    qkv_inputs,
    raise_if_nonfinite,
    scores_input,
    wrap_output,
)
from ._loader import KernelSpec, read_source
from ._nvrtc import CompileResult, NvrtcUnavailable, compile_offline
from .plan import PipelinePlan

__all__ = [
    "SUPPORTED_DTYPES",
    "BFloat16Array",
    "CompileResult",
    "CupyBackend",
    "KernelSpec",
    "NvrtcUnavailable",
    "PipelinePlan",
    "all_instantiations",
    "as_bfloat16",
    "compile_offline",
    "make_backend",
    "read_source",
]


def all_instantiations() -> list[KernelSpec]:
    """Every kernel instantiation the backend can launch: the stage modules' lists, in stage order.

    Each entry is ``KernelSpec(file, name_expression, options)`` with exactly the NVRTC options
    the stage launches it with; the no-GPU compile test builds each of them.
    """
    return [*pooling.INSTANTIATIONS, *scores.INSTANTIATIONS, *selection.INSTANTIATIONS,
            *attention.INSTANTIATIONS, *varlen.INSTANTIATIONS]


# ---------------------------------------------------------------------------- backend
class CupyBackend:
    """UniSparse on CUDA through CuPy RawKernels (see the module docstring).

    Every method takes the arguments of the reference (:mod:`unisparse_ref.reference`) and
    returns CuPy arrays (bf16 outputs: see :func:`as_bfloat16`); ``select_blocks`` returns a
    :class:`~unisparse_ref.BlockMask` whose ``mask`` is a CuPy bool array.
    """

    name = "cupy"
    supported_dtypes = SUPPORTED_DTYPES
    #: The eps of SPEC 7 for this layer's scores (float32 arithmetic); every GPU case is within it
    #: since the keys are centred (largest 4.9e-7, see the module docstring).
    score_eps = 1e-6

    #: Any D up to 256 (the kernels run 32, 64, 128 and 256; other D are zero-padded up to the
    #: next). Off Hopper, D > 128 runs on the scalar rung v1.
    supported_head_dims = tuple(range(1, attention.KERNEL_HEAD_DIMS[-1] + 1))

    #: Most pipeline plans (CUDA graphs) :meth:`unisparse_attention` keeps for ``graph=True``,
    #: least recently used dropped first (each holds its buffers: see :class:`PipelinePlan`).
    max_plans = 4
    #: Research options of :class:`~unisparse_ref.UniSparseConfig` this layer implements
    #: (``check_spec_variants`` refuses the others): ``threshold_mode`` (selection), ``sink_tokens``
    #: (``compress`` puts the sink keys in front of ``k_c``; scores version 4) and ``diagonal_correction``
    #: (scores version 4).
    implemented_variants: tuple[str, ...] = ("threshold_mode", "sink_tokens", "diagonal_correction")

    def __init__(self, device_name: str = "") -> None:
        self.device_name = device_name
        self._plans: OrderedDict[tuple[Any, ...], PipelinePlan] = OrderedDict()

    def _refuse_variants(self, config: UniSparseConfig, layer: str) -> None:
        """``check_spec_variants`` for the options this layer does not implement."""
        check_spec_variants(config, layer, supported=self.implemented_variants)

    # -------------------------------------------------------------- stage 1
    def compress(self, q: Any, k: Any, config: UniSparseConfig, *, check_finite: bool = True) -> tuple[Any, Any]:
        """Composite tokens (SPEC 3).

        Parameters
        ----------
        q : array ``[B, Hq, Nq, D]``
        k : array ``[B, Hkv, Nk, D]``
        config : UniSparseConfig
        check_finite : bool
            Default ``True``: raise ``ValueError`` for NaN/infinity in q or k (counted on the
            pooled tokens on the device; one synchronisation). ``False``: no check, no sync.

        Returns
        -------
        q_c : cupy float32 ``[B, Hq/c_h, R, D]``
        k_c : cupy float32 ``[B, Hkv, C, D]``
        """
        config = check_config(config)
        (qd, kd), dt, (_, Hq, Hkv, _, _, _) = qkv_inputs(q, k, None, config.causal)
        check_head_pooling(Hq, Hkv, config.c_h)
        q_c = pooling.launch_pool(qd, dt, config.c_q, config.c_h)
        k_c = pooling.launch_pool_keys(kd, dt, config.c_k, config.sink_tokens)
        if check_finite:  # pooled means are non-finite iff some input in their group is: a cheap full check
            check_finite_device(("q", q_c, np.dtype(np.float32)), ("k", k_c, np.dtype(np.float32)))
        return q_c, k_c

    # -------------------------------------------------------------- stage 2
    def block_scores(self, q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
        """Block scores (SPEC 4): cupy float32 ``[B, Hq/c_h, nQb, nKb]``, rows summing to 1."""
        config = check_config(config)
        self._refuse_variants(config, "cupy backend block_scores")
        qc, kc = composite_input("q_c", q_c), composite_input("k_c", k_c)
        t = config.sink_tokens  # research variant: k_c is [B, Hkv, t + C, D], the t sink keys in front
        if t and kc.shape[2] <= t:
            raise ValueError(f"with sink_tokens={t}, k_c must be [B, Hkv, {t} + C, D]; got {tuple(kc.shape)}")
        check_composite_shapes(qc, kc[:, :, t:] if t else kc, config, nq, nk)
        return scores.launch_scores(qc, kc, config, int(nq), int(nk))

    # -------------------------------------------------------------- stage 3
    def select_blocks(
        self, scores: Any, config: UniSparseConfig, nq: int, nk: int, *, check_finite: bool = True
    ) -> BlockMask:
        """Top-P selection (SPEC 5): a :class:`BlockMask` with a CuPy bool mask.

        ``config.threshold_mode`` may be ``"total"`` (SPEC) or ``"remaining"``. ``check_finite``
        (default ``True``) checks the scores finite and non-negative first (one synchronisation);
        ``False`` skips that.
        """
        config = check_config(config)
        self._refuse_variants(config, "cupy backend select_blocks")
        s = scores_input(scores, config, nq, nk, check=check_finite)
        mask, _, _ = selection.launch_select(s, config, nq, nk, with_indices=False)
        return BlockMask(mask, config.block_size, config.c_h, nq, nk, config.causal)

    def select_blocks_indices(
        self, scores: Any, config: UniSparseConfig, nq: int, nk: int, *, check_finite: bool = True
    ) -> tuple[BlockMask, Any, Any]:
        """:meth:`select_blocks` plus the index form from the same kernel.

        Returns
        -------
        block_mask : BlockMask
        kv_counts : cupy int32 ``[B, Hm, nQb]``
        kv_indices : cupy int32 ``[B, Hm, nQb, nKb]`` (ascending, -1 padded)
        """
        config = check_config(config)
        self._refuse_variants(config, "cupy backend select_blocks_indices")
        s = scores_input(scores, config, nq, nk, check=check_finite)
        mask, counts, indices = selection.launch_select(s, config, nq, nk, with_indices=True)
        return BlockMask(mask, config.block_size, config.c_h, nq, nk, config.causal), counts, indices

    # -------------------------------------------------------------- stage 4
    def block_sparse_attention(
        self, q: Any, k: Any, v: Any, block_mask: BlockMask, config: UniSparseConfig, *, check_finite: bool = True
    ) -> tuple[Any, Any]:
        """Exact attention over the selected blocks (SPEC 6).

        ``check_finite`` (default ``True``) raises ``ValueError`` for NaN/infinity in q, k or v
        (counted on the device, one synchronisation); ``False`` skips it.

        Returns
        -------
        out : ``[B, Hq, Nq, D]`` of q's dtype (bf16: see :func:`as_bfloat16`)
        lse : cupy float32 ``[B, Hq, Nq]`` (``-inf`` on rows with no allowed key)
        """
        cp = cupy_module()
        config = check_config(config)
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask)!r}")
        (qd, kd, vd), dt, (B, Hq, Hkv, Nq, Nk, D) = qkv_inputs(q, k, v, block_mask.causal)
        check_mask_against(block_mask, B, Hq, Hkv, Nq, Nk, config)
        if check_finite:
            check_finite_device(("q", qd, dt), ("k", kd, dt), ("v", vd, dt))
        mask = cp.ascontiguousarray(cp.asarray(block_mask.mask, dtype=cp.bool_))
        counts, indices = selection.launch_mask_to_indices(mask)
        out, lse = attention.attend(qd, kd, vd, counts, indices, block_mask, config.scale_for(D))
        return wrap_output(out, dt), lse

    def dense_attention(
        self, q: Any, k: Any, v: Any, causal: bool = True, softmax_scale: float | None = None, *,
        check_finite: bool = True,
    ) -> tuple[Any, Any]:
        """Dense attention: :meth:`block_sparse_attention` with every visible block selected."""
        cp = cupy_module()
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        (qd, kd, vd), dt, (B, Hq, Hkv, Nq, Nk, D) = qkv_inputs(q, k, v, causal)
        config = UniSparseConfig(causal=causal, softmax_scale=softmax_scale)  # validates the scale
        if check_finite:
            check_finite_device(("q", qd, dt), ("k", kd, dt), ("v", vd, dt))
        S = config.block_size
        # One mask head per KV head (heads_per_mask = G): the smallest index form the attention takes.
        G = Hq // Hkv
        bm = BlockMask.full(B, Hkv, Nq, Nk, block_size=S, heads_per_mask=G, causal=causal)
        counts, indices = selection.launch_mask_to_indices(cp.asarray(bm.mask))
        out, lse = attention.attend(qd, kd, vd, counts, indices, bm, config.scale_for(D))
        return wrap_output(out, dt), lse

    # -------------------------------------------------------------- pipeline
    def unisparse_attention(
        self, q: Any, k: Any, v: Any, config: UniSparseConfig, *, check_finite: bool = True,
        graph: bool = False,
    ) -> tuple[Any, Any, BlockMask, Any, Any, Any]:
        """The whole pipeline (SPEC 3-6) in one call, for :func:`unisparse_ref.unisparse_attention`.

        The same kernels and results as ``compress`` -> ``block_scores`` -> ``select_blocks`` ->
        ``block_sparse_attention``, with no host synchronisation between them: the inputs are
        checked once, the intermediate arrays are not re-checked (they come from our own
        kernels), and the attention reads the index form that the selection kernel writes.

        Parameters
        ----------
        q : array ``[B, Hq, Nq, D]``
        k, v : array ``[B, Hkv, Nk, D]``
        config : UniSparseConfig
        check_finite : bool
            Default ``True``: NaN/infinity in the pooled q, k and in v are counted on the device
            while the stages run, and the counts are read once, after every kernel has been
            queued (one synchronisation at the end of the call; ``ValueError`` naming the
            input). ``False``: no check and no synchronisation at all; the call returns as soon
            as the kernels are queued (a non-finite input then gives non-finite outputs).
        graph : bool
            Default ``False``. ``True`` runs a :class:`PipelinePlan`, the pipeline captured as a
            CUDA graph, built on the first call for these shapes, dtype, config and
            ``check_finite`` and kept (at most :attr:`max_plans`). The returned arrays are then
            the plan's own buffers, overwritten by the next ``graph=True`` call of the same
            shapes: copy what you keep.

        Returns
        -------
        out, lse, block_mask, scores, q_c, k_c
            As :class:`unisparse_ref.UniSparseResult` (CuPy arrays).
        """
        config = check_config(config)
        if graph:
            return self._run_plan(q, k, v, config, check_finite)
        self._refuse_variants(config, "cupy backend unisparse_attention")
        (qd, kd, vd), dt, (_, Hq, Hkv, _, _, _) = qkv_inputs(q, k, v, config.causal)
        check_head_pooling(Hq, Hkv, config.c_h)
        outs, counts = self._queue_pipeline(qd, kd, vd, dt, config, check_finite)
        if check_finite:
            raise_if_nonfinite(counts, ("q", "k", "v"))
        return outs

    def plan(self, q: Any, k: Any, v: Any, config: UniSparseConfig, *, check_finite: bool = True) -> PipelinePlan:
        """A :class:`PipelinePlan`: the pipeline for these shapes, dtype and config as a CUDA graph.

        ``plan(q2, k2, v2)`` then runs it on new inputs of the same shapes (see
        :class:`PipelinePlan` for what it keeps and overwrites).
        """
        return PipelinePlan(self, q, k, v, check_config(config), check_finite=check_finite)

    def clear_plans(self) -> None:
        """Drop the plans kept by ``unisparse_attention(..., graph=True)`` (and their memory)."""
        self._plans.clear()

    def _run_plan(self, q: Any, k: Any, v: Any, config: UniSparseConfig,
                  check_finite: bool) -> tuple[Any, Any, BlockMask, Any, Any, Any]:
        """Run the kept plan of these inputs' key (built first if missing) on them."""
        from .plan import plan_key

        self._refuse_variants(config, "cupy backend unisparse_attention")
        (qd, kd, vd), dt, _ = qkv_inputs(q, k, v, config.causal)
        key = plan_key(qd, kd, vd, dt, config, check_finite)
        plan = self._plans.get(key)
        if plan is None:
            plan = PipelinePlan(self, *(wrap_output(x, dt) for x in (qd, kd, vd)), config, check_finite=check_finite)
            self._plans[key] = plan
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan.run_converted(qd, kd, vd)

    def _queue_pipeline(
        self, qd: Any, kd: Any, vd: Any, dt: np.dtype, config: UniSparseConfig, check_finite: bool
    ) -> tuple[tuple[Any, Any, BlockMask, Any, Any, Any], Any]:
        """Queue every kernel of the pipeline on the current stream; read nothing back.

        ``qd``, ``kd``, ``vd`` are checked C-contiguous device arrays (bf16 as ``uint16``
        bits) of dtype ``dt``. Returns the outputs and the device array of non-finite counts
        of (pooled q, pooled k, v) (``None`` without ``check_finite``). The eager pipeline and
        the graph capture of :class:`PipelinePlan` both run exactly this.
        """
        Nq, Nk, D = int(qd.shape[2]), int(kd.shape[2]), int(qd.shape[3])
        q_c = pooling.launch_pool(qd, dt, config.c_q, config.c_h)
        k_c = pooling.launch_pool_keys(kd, dt, config.c_k, config.sink_tokens)
        # Pooled means are non-finite iff some input in their group is (as compress checks).
        counts = (nonfinite_counts(("q", q_c, np.dtype(np.float32)), ("k", k_c, np.dtype(np.float32)),
                                   ("v", vd, dt)) if check_finite else None)
        sc = scores.launch_scores(q_c, k_c, config, Nq, Nk)
        mask, kv_counts, kv_indices = selection.launch_select(sc, config, Nq, Nk, with_indices=True)
        bm = BlockMask(mask, config.block_size, config.c_h, Nq, Nk, config.causal)
        out, lse = attention.attend(qd, kd, vd, kv_counts, kv_indices, bm, config.scale_for(D))
        return (wrap_output(out, dt), lse, bm, sc, q_c, k_c), counts

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
