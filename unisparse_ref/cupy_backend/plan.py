"""The CuPy pipeline captured as a CUDA graph: :class:`PipelinePlan` (opt-in).

A plan is built for one set of input shapes, one dtype and one
:class:`~unisparse_ref.UniSparseConfig`. Building it runs the pipeline once eagerly (kernels
compiled, caches filled), then captures the same kernel launches into a CUDA graph
(:meth:`cupy.cuda.Stream.begin_capture` / ``end_capture``); each call afterwards copies the
inputs into the plan's own input buffers (a device-to-device copy, skipped when the caller
already wrote into :attr:`PipelinePlan.q` and friends) and launches the graph: one host call
instead of one Python round of checks and launches per kernel. The graph holds exactly the
launches of the eager pipeline (:meth:`CupyBackend._queue_pipeline
<unisparse_ref.cupy_backend.CupyBackend>`), so its results are bit-identical to it.

What to know before using it:

* **The outputs are the plan's buffers.** Every call writes the same arrays and returns them;
  a second call overwrites the first call's results. Copy what you keep (``out.copy()``).
* **One call at a time per plan.** A plan is not re-entrant: two calls on different streams
  would race on its buffers.
* **Memory.** The plan allocates from a private CuPy memory pool and keeps every buffer of
  the pipeline (inputs, intermediates such as the scores' scratch, outputs) for its lifetime.
* **The finiteness check** (``check_finite=True``, default) is captured too: the pooled q, k
  and v are counted on the device and the counts are read once after the graph launch (one
  synchronisation; ``ValueError`` naming the input). ``check_finite=False`` leaves the call
  fully asynchronous.

This module imports without CuPy.
"""

from __future__ import annotations

from typing import Any

from .._arrays import check_config, check_head_pooling
from ..config import UniSparseConfig
from ._device import cupy_module, qkv_inputs, raise_if_nonfinite, wrap_output

__all__ = ["PipelinePlan"]


class PipelinePlan:
    """The UniSparse pipeline for fixed shapes, dtype and config, replayed as a CUDA graph.

    Parameters
    ----------
    backend : CupyBackend
    q : array ``[B, Hq, Nq, D]``
    k, v : array ``[B, Hkv, Nk, D]``
        Example inputs: their shapes and dtype fix the plan; their values are used for the
        eager warm-up run.
    config : UniSparseConfig
    check_finite : bool
        Count NaN/infinity in the pooled q, k and in v inside the graph and raise
        ``ValueError`` after each call (one synchronisation per call). Default ``True``.

    Attributes
    ----------
    q, k, v : cupy.ndarray
        The plan's input buffers, in the inputs' dtype (bf16: as ``as_bfloat16`` gives it).
        Writing into them and calling ``plan(plan.q, plan.k, plan.v)`` skips the copies.
    key : tuple
        What the plan is specific to: shapes, dtype, config, ``check_finite``, device.

    Examples
    --------
    >>> plan = CupyBackend().plan(q, k, v, cfg)                      # doctest: +SKIP
    >>> out, lse, bm, scores, q_c, k_c = plan(q2, k2, v2)            # doctest: +SKIP
    """

    def __init__(self, backend: Any, q: Any, k: Any, v: Any, config: UniSparseConfig, *,
                 check_finite: bool = True) -> None:
        cp = cupy_module()
        config = check_config(config)
        backend._refuse_variants(config, "cupy backend plan")
        (qd, kd, vd), dt, (_, Hq, Hkv, _, _, _) = qkv_inputs(q, k, v, config.causal)
        check_head_pooling(Hq, Hkv, config.c_h)
        self.config = config
        self.dtype = dt
        self.check_finite = bool(check_finite)
        self.key = plan_key(qd, kd, vd, dt, config, self.check_finite)
        self._backend = backend
        self._pool = cp.cuda.MemoryPool()  # private: nothing else may reuse the graph's buffers
        self._stream = cp.cuda.Stream(non_blocking=True)
        # The example inputs were written on the caller's stream; the side stream reads them next.
        cp.cuda.get_current_stream().synchronize()
        with cp.cuda.using_allocator(self._pool.malloc), self._stream:
            self._in = tuple(cp.empty_like(x) for x in (qd, kd, vd))  # bf16 as uint16 bits
            for dst, src in zip(self._in, (qd, kd, vd), strict=True):
                dst.data.copy_from_device_async(src.data, src.nbytes, self._stream)
            self.q, self.k, self.v = (wrap_output(x, dt) for x in self._in)
            # Warm-up: compiles the kernels, fills the caches (tensor maps, device attributes)
            # and leaves the private pool holding blocks of every size the capture will ask for.
            warm, _ = backend._queue_pipeline(*self._in, dt, config, self.check_finite)
            del warm
            self._stream.synchronize()
            self._stream.begin_capture()
            try:
                self._outs, self._counts = backend._queue_pipeline(*self._in, dt, config, self.check_finite)
            except BaseException:
                self._stream.end_capture()  # leave the stream usable; the error is the one to see
                raise
            self._graph = self._stream.end_capture()
        self._stream.synchronize()

    def __call__(self, q: Any, k: Any, v: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
        """Run the captured pipeline on new inputs of the plan's shapes and dtype.

        Returns
        -------
        out, lse, block_mask, scores, q_c, k_c
            As :meth:`CupyBackend.unisparse_attention`; the plan's own buffers (see the
            module docstring: overwritten by the next call).

        Raises
        ------
        ValueError
            Inputs of other shapes or dtype than the plan's, or (``check_finite``) NaN or
            infinity in an input.
        """
        (qd, kd, vd), dt, _ = qkv_inputs(q, k, v, self.config.causal)
        got = plan_key(qd, kd, vd, dt, self.config, self.check_finite)
        if got != self.key:
            raise ValueError(f"this plan was built for {describe_key(self.key)}; got {describe_key(got)}")
        return self.run_converted(qd, kd, vd)

    def run_converted(self, qd: Any, kd: Any, vd: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
        """``plan(q, k, v)`` for inputs already converted and matched to the plan's ``key``
        (the backend's ``graph=True`` path, which has done both)."""
        cp = cupy_module()
        stream = cp.cuda.get_current_stream()
        for dst, src in zip(self._in, (qd, kd, vd), strict=True):
            if src.data.ptr != dst.data.ptr:
                dst.data.copy_from_device_async(src.data, src.nbytes, stream)
        self._graph.launch(stream)
        if self.check_finite:
            raise_if_nonfinite(self._counts, ("q", "k", "v"))
        return self._outs

    def __repr__(self) -> str:
        return f"PipelinePlan({describe_key(self.key)})"


def plan_key(qd: Any, kd: Any, vd: Any, dt: Any, config: UniSparseConfig, check_finite: bool) -> tuple[Any, ...]:
    """What a plan is specific to: the three shapes, the dtype, the config, the check, the device."""
    cp = cupy_module()
    return (tuple(qd.shape), tuple(kd.shape), tuple(vd.shape), str(dt), config, bool(check_finite),
            cp.cuda.Device().id)


def describe_key(key: tuple[Any, ...]) -> str:
    """A plan key in words, for error messages."""
    qs, ks, vs, dt, config, check, dev = key
    return f"q {qs}, k {ks}, v {vs}, {dt}, {config!r}, check_finite={check}, device {dev}"
