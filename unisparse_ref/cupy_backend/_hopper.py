"""Host side of attention rung v9, the FlashAttention-3-class Hopper kernel in
``raw_kernels/attention_hopper.cu`` (called by :mod:`unisparse_ref.cupy_backend.attention`).

``fa3_forward`` computes SPEC section 6 (block-sparse attention forward) with the same
conventions as :func:`unisparse_ref.cupy_backend.attention.attention_forward`: ``q`` ``[B, Hq, Nq, D]``,
``k``/``v`` ``[B, Hkv, Nk, D]`` C-contiguous CuPy arrays of dtype float16 or uint16 (bfloat16
bits); the block mask in FlexAttention's index form (``kv_counts`` ``[B, Hm, nQb]``,
``kv_indices`` ``[B, Hm, nQb, W]`` ascending, ``-1`` padded); query head ``h`` uses mask head
``h // heads_per_mask`` and KV head ``h // G``; causal attention is bottom-right aligned; a row
with no allowed key gets ``out = 0`` and ``lse = -inf``. Returns ``(out, lse)``: ``out`` in the
dtype of ``q``, ``lse`` float32 ``[B, Hq, Nq]`` (natural log).

What the host does (the kernel's opening comment says what the device does):

* encodes three TMA tensor maps (``cuTensorMapEncodeTiled`` of the driver library
  ``libcuda.so.1`` through ``ctypes``, or through ``cuda-bindings`` where the library cannot be
  opened by that name; cuda-bindings' start-up looks up driver symbols that do not exist,
  which compute-sanitizer reports as API errors): 3-D views
  ``(D, N, B*H)`` of q, k, v with boxes of ``64 x rows x 1`` elements and 128-byte swizzle;
  rows past ``Nq``/``Nk`` are zero-filled by the copy engine;
* computes grid, block and shared memory in ONE function, :func:`launch_config`;
* launches. Tensor maps are 128-byte kernel parameters (``__grid_constant__``), handed over as
  a ``ctypes`` array of parameter pointers to ``cuLaunchKernel`` (through
  ``cupy.cuda.driver.launchKernel``, which copies each parameter by the size the kernel
  declares). (Two other ways, CuPy's own call with NumPy void scalars and the maps in device
  memory, gave identical results in the development runs of ``docs/gpu_results/fa3.md`` and
  were retired.)

This module imports without CuPy (CuPy, NumPy and the driver are imported inside functions).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

from . import _loader
from ._loader import KernelSpec

__all__ = [
    "FA3_FILE",
    "FA3_HEAD_DIMS",
    "FA3_INSTANTIATIONS",
    "Fa3Config",
    "fa3_config",
    "fa3_forward",
    "fa3_forward_varlen",
    "varlen_tiles",
    "VARLEN_ORDERS",
    "launch_config",
    "name_expression",
]

FA3_FILE = "attention_hopper.cu"
#: NVRTC options of the kernel (wgmma, setmaxnreg and TMA need the arch-specific target).
FA3_OPTIONS: tuple[str, ...] = ("-arch=sm_90a",)
#: Query rows per CTA (two consumer warpgroups of 64 rows).
FA3_BR = 128
#: Threads per CTA: one producer and two consumer warpgroups.
FA3_THREADS = 384


@dataclass(frozen=True)
class Fa3Config:
    """Tile shape of one head dim: ``bc`` keys per tile, ``stages`` K/V ring slots."""

    head_dim: int
    bc: int
    stages: int

    def smem_bytes(self, itemsize: int = 2) -> int:
        """Dynamic shared memory: 1 KiB alignment slack, Q, the K and V rings, the mbarriers
        (the kernel's ``Smem<...>::BYTES``)."""
        tiles = (FA3_BR + 2 * self.stages * self.bc) * self.head_dim * itemsize
        return 1024 + tiles + 8 * (2 + 4 * self.stages)


#: Per head dim: Bc = 128 (one whole mask block per step) where the consumers' registers
#: allow (O and S each 64 fp32 registers at D = 128); D = 256 keeps O in 128 registers per
#: thread, so S takes Bc = 64.
FA3_HEAD_DIMS: dict[int, Fa3Config] = {
    64: Fa3Config(64, 128, 3),
    128: Fa3Config(128, 128, 2),
    256: Fa3Config(256, 64, 2),
}

_CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
# CUtensorMapDataType values of the driver API.
_TMAP_DTYPE = {"float16": 6, "bfloat16": 9}


def fa3_config(head_dim: int, stages: int | None = None, bc: int | None = None) -> Fa3Config:
    if head_dim not in FA3_HEAD_DIMS:
        raise ValueError(f"the Hopper kernel supports head dims {tuple(FA3_HEAD_DIMS)}, got D={head_dim}")
    c = FA3_HEAD_DIMS[head_dim]
    return Fa3Config(head_dim, bc or c.bc, stages or c.stages)


def name_expression(dtype: str, cfg: Fa3Config, varlen: bool = False) -> str:
    """The C++ name of the batch kernel ``us_fa3_fwd`` (or, ``varlen``, of ``us_fa3_fwd_varlen``)."""
    kernel = "us_fa3_fwd_varlen" if varlen else "us_fa3_fwd"
    return f"{kernel}<{_CTYPE[dtype]}, {cfg.head_dim}, {cfg.bc}, {cfg.stages}>"


#: Every instantiation the backend launches.
FA3_INSTANTIATIONS: list[KernelSpec] = [
    KernelSpec(FA3_FILE, name_expression(dt, c), FA3_OPTIONS)
    for dt in ("float16", "bfloat16")
    for c in FA3_HEAD_DIMS.values()
]


#: The packed / paged kernel ``us_fa3_fwd_varlen`` (issue 16), one per batch instantiation.
FA3_VARLEN_INSTANTIATIONS: list[KernelSpec] = [
    KernelSpec(FA3_FILE, name_expression(dt, c, varlen=True), FA3_OPTIONS)
    for dt in ("float16", "bfloat16")
    for c in FA3_HEAD_DIMS.values()
]


#: The name expressions of the one module that holds every instantiation (one NVRTC compile
#: per process, then CuPy's disk cache; a few seconds).
FA3_MODULE_NAMES: tuple[str, ...] = tuple(s.name_expression for s in FA3_INSTANTIATIONS)
#: The varlen kernels' module (a module of its own: the batch path compiles what it did).
FA3_VARLEN_MODULE_NAMES: tuple[str, ...] = tuple(s.name_expression for s in FA3_VARLEN_INSTANTIATIONS)


def _get_kernel(name: str) -> Any:
    """The compiled kernel, from the loader's cached module of all instantiations (batch or
    varlen); a name outside the lists (another ``stages``) gets a module of its own."""
    if name in FA3_MODULE_NAMES:
        names = FA3_MODULE_NAMES
    elif name in FA3_VARLEN_MODULE_NAMES:
        names = FA3_VARLEN_MODULE_NAMES
    else:
        names = (name,)
    return _loader.get_module(FA3_FILE, names, FA3_OPTIONS).get_function(name)


_NUM_SMS: dict[int, int] = {}


def _num_sms() -> int:
    import cupy as cp  # noqa: PLC0415

    dev = cp.cuda.Device().id
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = int(cp.cuda.Device(dev).attributes["MultiProcessorCount"])
    return _NUM_SMS[dev]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_config(
    *,
    batch: int,
    q_heads: int,
    nq: int,
    head_dim: int,
    itemsize: int = 2,
    stages: int | None = None,
    bc: int | None = None,
    persistent: bool = True,
    num_sms: int = 132,
) -> dict[str, Any]:
    """Grid, block and dynamic shared memory of one launch (the one place they are computed).

    The work is ``n_tasks = B * Hq * n_qtiles`` tasks (b, h, 128-row query tile), ordered
    longest causal rows first, heads fastest (the kernel decodes the order, or reads a work
    list). Persistent (default): one CTA per SM (``num_sms``; one fits per SM) walks the tasks
    with a static stride, so a CTA's next Q and K/V tiles load while it finishes the last
    task. Otherwise one CTA per task.
    """
    cfg = fa3_config(head_dim, stages, bc)
    n_qtiles = _cdiv(nq, FA3_BR)
    n_tasks = batch * q_heads * n_qtiles
    grid = min(n_tasks, num_sms) if persistent else n_tasks
    return {
        "grid": (grid, 1, 1),
        "n_tasks": n_tasks,
        "block": (FA3_THREADS, 1, 1),
        "shared_mem": cfg.smem_bytes(itemsize),
        "n_qtiles": n_qtiles,
        "br": FA3_BR,
        "cfg": cfg,
    }


# ----------------------------------------------------------------------------- tensor maps
_TMAP_CACHE: dict[tuple[Any, ...], bytes] = {}


def encode_packed_tensor_map(arr: Any, dtype: str, rows_box: int) -> bytes:
    """The TMA descriptor of a packed ``[rows, H, D]`` array (the varlen layout; pages
    ``[num_pages, page_size, H, D]`` are passed as ``[num_pages * page_size, H, D]``): the 3-D
    view ``(D, rows, H)`` with strides ``(H*D, D)`` elements, box ``(64, rows_box, 1)``,
    128-byte swizzle, zero fill past ``rows``. The same tiles in shared memory as the batch
    map's, so the kernel body is the same; only the coordinates differ."""
    rows, H, D = (int(s) for s in arr.shape)
    ptr = int(arr.data.ptr)
    dims = [D, rows, H]
    strides = [H * D * 2, D * 2]  # bytes: the token stride, then the head stride
    box = [64, rows_box, 1]
    key = ("packed", ptr, dtype, tuple(dims), rows_box)
    hit = _TMAP_CACHE.get(key)
    if hit is not None:
        return hit
    dt = _TMAP_DTYPE[dtype]
    try:
        out = _encode_ctypes(dt, ptr, dims, strides, box)
    except OSError:
        out = _encode_cuda_bindings(dt, ptr, dims, strides, box)
    if len(_TMAP_CACHE) > 256:
        _TMAP_CACHE.clear()
    _TMAP_CACHE[key] = out
    return out


def _encode_cuda_bindings(dt: int, ptr: int, dims: list[int], strides: list[int], box: list[int]) -> bytes:
    from cuda.bindings import driver as cu  # noqa: PLC0415

    err, tmap = cu.cuTensorMapEncodeTiled(
        cu.CUtensorMapDataType(dt),
        len(dims),
        ptr,
        [cu.cuuint64_t(x) for x in dims],
        [cu.cuuint64_t(x) for x in strides],
        [cu.cuuint32_t(x) for x in box],
        [cu.cuuint32_t(1) for _ in dims],
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if int(err) != 0:
        raise RuntimeError(
            f"cuTensorMapEncodeTiled failed: {err} (dims {dims}, strides {strides}, box {box})"
        )
    try:
        return ctypes.string_at(tmap.getPtr(), 128)
    except AttributeError:
        import struct  # noqa: PLC0415

        return struct.pack("<16Q", *[int(x) for x in tmap.opaque])


def _encode_ctypes(dt: int, ptr: int, dims: list[int], strides: list[int], box: list[int]) -> bytes:
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    n = len(dims)
    buf = (ctypes.c_uint64 * 16)()
    rc = fn(
        ctypes.byref(buf),
        ctypes.c_int(dt),
        ctypes.c_uint32(n),
        ctypes.c_void_p(ptr),
        (ctypes.c_uint64 * n)(*dims),
        (ctypes.c_uint64 * (n - 1))(*strides),
        (ctypes.c_uint32 * n)(*box),
        (ctypes.c_uint32 * n)(*([1] * n)),
        ctypes.c_int(0),
        ctypes.c_int(3),
        ctypes.c_int(3),
        ctypes.c_int(0),
    )
    if rc != 0:
        raise RuntimeError(
            f"cuTensorMapEncodeTiled failed: CUresult {rc} (dims {dims}, strides {strides}, box {box})"
        )
    return bytes(buf)


def encode_tensor_map(arr: Any, dtype: str, rows_box: int, *, backend: str = "auto") -> bytes:
    """The 128-byte TMA descriptor of a ``[B, H, N, D]`` array: a 3-D view ``(D, N, B*H)``,
    box ``(64, rows_box, 1)``, 128-byte swizzle, zero fill out of bounds."""
    B, H, N, D = (int(s) for s in arr.shape)
    ptr = int(arr.data.ptr)
    dims = [D, N, B * H]
    strides = [D * 2, N * D * 2]  # bytes, dims 1 and 2
    box = [64, rows_box, 1]
    key = (ptr, dtype, tuple(dims), rows_box)
    hit = _TMAP_CACHE.get(key)
    if hit is not None and backend == "auto":
        return hit
    dt = _TMAP_DTYPE[dtype]
    if backend == "ctypes":
        out = _encode_ctypes(dt, ptr, dims, strides, box)
    elif backend == "cuda-bindings":
        out = _encode_cuda_bindings(dt, ptr, dims, strides, box)
    else:  # the driver's own entry point first: no extra package, no symbol-table look-ups
        try:
            out = _encode_ctypes(dt, ptr, dims, strides, box)
        except OSError:  # no libcuda.so.1 by that name: cuda-bindings finds the driver its own way
            out = _encode_cuda_bindings(dt, ptr, dims, strides, box)
    if len(_TMAP_CACHE) > 256:
        _TMAP_CACHE.clear()
    _TMAP_CACHE[key] = out
    return out


# ----------------------------------------------------------------------------- launch paths
def _launch_param(kernel: Any, cfg: dict[str, Any], tmaps: list[bytes], args: list[Any]) -> None:
    """cuLaunchKernel with a ctypes array of parameter pointers (tensor maps by value)."""
    import cupy as cp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    keep: list[Any] = []
    ptrs: list[int] = []
    for tm in tmaps:
        buf = (ctypes.c_uint8 * 128).from_buffer_copy(tm)
        keep.append(buf)
        ptrs.append(ctypes.addressof(buf))
    for a in args:
        if isinstance(a, cp.ndarray):
            c = ctypes.c_void_p(int(a.data.ptr))
        elif a is None:
            c = ctypes.c_void_p(0)
        elif isinstance(a, np.int32):
            c = ctypes.c_int32(int(a))
        elif isinstance(a, np.float32):
            c = ctypes.c_float(float(a))
        else:
            raise TypeError(f"unexpected kernel argument {a!r}")
        keep.append(c)
        ptrs.append(ctypes.addressof(c))
    params = (ctypes.c_void_p * len(ptrs))(*ptrs)
    smem = int(cfg["shared_mem"])
    if getattr(kernel, "max_dynamic_shared_size_bytes", 0) < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    gx, gy, gz = cfg["grid"]
    bx, by, bz = cfg["block"]
    stream = cp.cuda.get_current_stream().ptr
    cp.cuda.driver.launchKernel(
        int(kernel.kernel.ptr), gx, gy, gz, bx, by, bz, smem, stream, ctypes.addressof(params), 0
    )



# ----------------------------------------------------------------------------- entry point
def fa3_forward(
    q: Any,
    k: Any,
    v: Any,
    kv_counts: Any,
    kv_indices: Any,
    *,
    nq: int,
    nk: int,
    block_size: int,
    heads_per_mask: int,
    causal: bool,
    softmax_scale: float | None,
    work: Any = None,
    stages: int | None = None,
    persistent: bool = True,
    schedule: str = "dynamic",
    max_ctas: int | None = None,
    out: Any = None,
    lse: Any = None,
) -> tuple[Any, Any]:
    """Block-sparse attention forward on a Hopper GPU (SPEC section 6); see the module doc.

    Called by :func:`unisparse_ref.cupy_backend.attention.attention_forward`, which checks the
    arguments and builds the optional ``work`` list (int32 tasks, longest mask rows first).
    Parameters beyond its: ``stages`` (K/V ring depth, default per head dim);
    ``persistent`` (one CTA per SM walking the tasks, default; else one CTA per task);
    ``schedule`` (persistent grid: ``"dynamic"``, CTAs take the next task from an atomic
    counter, default; ``"static"``, CTA c takes tasks c, c + grid, ...);
    ``max_ctas`` (a smaller persistent grid, for tests: many tasks per CTA);
    ``out``/``lse`` (preallocated outputs, for timing loops).
    """
    import cupy as cp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    # The arguments were checked once, by attention_forward (shapes, dtypes, GQA and mask-head
    # grouping, the index form's shape, block_size a multiple of 128, a Hopper GPU, the scale),
    # and arrive C-contiguous: only what is v9's own is looked at here.
    B, Hq, Nq, D = (int(x) for x in q.shape)
    Hkv, Nk = int(k.shape[1]), int(k.shape[2])
    dtype = "bfloat16" if np.dtype(q.dtype) == np.uint16 else "float16"
    cfgd = launch_config(
        batch=B,
        q_heads=Hq,
        nq=Nq,
        head_dim=D,
        itemsize=2,
        stages=stages,
        persistent=persistent,
        num_sms=max_ctas or _num_sms(),
    )
    cfg: Fa3Config = cfgd["cfg"]
    if block_size % cfg.bc:
        raise ValueError(f"block_size {block_size} must be a multiple of Bc={cfg.bc}")
    Hm = Hq // heads_per_mask
    nqb = _cdiv(Nq, block_size)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if out is None:
        out = cp.empty_like(q)
    if lse is None:
        lse = cp.empty((B, Hq, Nq), dtype=cp.float32)

    tmaps = [
        encode_tensor_map(q, dtype, FA3_BR),
        encode_tensor_map(k, dtype, cfg.bc),
        encode_tensor_map(v, dtype, cfg.bc),
    ]
    if schedule not in ("dynamic", "static"):
        raise ValueError(f"schedule must be 'dynamic' or 'static', got {schedule!r}")
    # sched[0]: the dynamic schedule's task counter (zeroed per launch; the first grid-size
    # tasks are taken without it); sched[1 + c]: CTA c's task slot (the producer announces
    # each task there).
    sched = cp.zeros(1 + int(cfgd["grid"][0]), dtype=cp.int32)
    dynamic = persistent and schedule == "dynamic"
    i32 = np.int32
    rest = [
        kv_counts,
        kv_indices,
        work,
        out,
        lse,
        i32(Hq),
        i32(Hkv),
        i32(Hm),
        i32(Nq),
        i32(Nk),
        i32(nqb),
        i32(kv_indices.shape[3]),
        i32(block_size),
        i32(heads_per_mask),
        i32(1 if causal else 0),
        i32(cfgd["n_qtiles"]),
        np.float32(scale * math.log2(math.e)),
        i32(cfgd["n_tasks"]),
        sched,
        i32(1 if dynamic else 0),
    ]
    _launch_param(_get_kernel(name_expression(dtype, cfg)), cfgd, tmaps, rest)
    return out, lse


# ----------------------------------------------------------------------------- packed / paged
#: Tile orders of :func:`varlen_tiles`; the default is ``"grouped"``.
VARLEN_ORDERS = ("grouped", "longest", "sequence")
#: Span bucket of the ``"grouped"`` order, in keys (16 query tiles).
GROUP_KEYS = 2048


def varlen_tiles(cu_seqlens_q: Any, seqlens_k: Any, k_start: Any, block_size: int, causal: bool,
                 order: str = "grouped", group_keys: int = GROUP_KEYS) -> Any:
    """The work list of :func:`fa3_forward_varlen`: int32 ``[n_tiles, 8]`` (NumPy).

    One entry per 128-row query tile of every sequence with queries,
    ``{q_off, N_q,b, k_off, N_k,b, cu_qblocks[b], q0, b, 0}``. A tile's *span* is the number of
    keys its last row may see (``p_last + 1`` causal, ``N_k,b`` otherwise). ``order``:

    * ``"grouped"`` (default): longest first across the batch by span buckets of
      ``GROUP_KEYS`` (2048) keys; inside a bucket the tiles of one sequence stay together (last
      tile first), so the CTAs running at once mostly read the same sequence's keys and
      values and share them through L2, as the batch kernel's fixed order does. Never more
      than one bucket away from the exact longest-first order;
    * ``"longest"``: exactly longest first (ties in ``(b, tile)`` order), the Numba layer's
      :func:`~unisparse_ref.numba_backend.varlen.work_list`: tiles of similar span from
      different sequences run side by side;
    * ``"sequence"``: sequences by their longest span, each one's tiles last first (the order
      of a loop over the sequences, in one launch).

    ``group_keys`` sets the bucket of ``"grouped"`` (a positive multiple of 128).
    """
    import numpy as np  # noqa: PLC0415

    if order not in VARLEN_ORDERS:
        raise ValueError(f"order must be one of {VARLEN_ORDERS}, got {order!r}")
    if group_keys < FA3_BR or group_keys % FA3_BR:
        raise ValueError(f"group_keys must be a positive multiple of {FA3_BR}, got {group_keys}")
    cu_q = np.asarray(cu_seqlens_q, dtype=np.int64)
    nq = np.diff(cu_q)
    nk = np.asarray(seqlens_k, dtype=np.int64)
    ks = np.asarray(k_start, dtype=np.int64)
    ntile = -(-nq // FA3_BR)
    cu_qb = np.concatenate([[0], np.cumsum(-(-nq // block_size))])
    b = np.repeat(np.arange(nq.size), ntile)
    first = np.concatenate([[0], np.cumsum(ntile)])[:-1]
    q0 = (np.arange(int(ntile.sum())) - np.repeat(first, ntile)) * FA3_BR
    last_row = np.minimum(q0 + FA3_BR, nq[b]) - 1
    span = last_row + (nk[b] - nq[b]) + 1 if causal else nk[b]
    if order == "longest":
        idx = np.argsort(-span, kind="stable")
    elif order == "grouped":
        idx = np.lexsort((-q0, b, -(span // group_keys)))  # last key first: bucket, sequence, tile
    else:
        seq_span = np.zeros(nq.size, dtype=np.int64)
        np.maximum.at(seq_span, b, span)
        idx = np.lexsort((-q0, b, -seq_span[b]))
    tiles = np.stack([cu_q[b], nq[b], ks[b], nk[b], cu_qb[b], q0, b, np.zeros_like(b)], axis=1)[idx]
    return np.ascontiguousarray(tiles, dtype=np.int32)


def fa3_forward_varlen(
    q: Any,
    k: Any,
    v: Any,
    kv_counts: Any,
    kv_indices: Any,
    tiles: Any,
    *,
    total_qb: int,
    block_size: int,
    heads_per_mask: int,
    causal: bool,
    softmax_scale: float,
    block_table: Any = None,
    page_size: int = 0,
    schedule: str = "dynamic",
    max_ctas: int | None = None,
    out: Any = None,
    lse: Any = None,
) -> tuple[Any, Any]:
    """Packed (or paged) block-sparse attention on Hopper: ``us_fa3_fwd_varlen``, one launch.

    Parameters
    ----------
    q : cupy ``[total_q, Hq, D]`` (C-contiguous float16, or uint16 holding bfloat16)
    k, v : cupy ``[total_k, Hkv, D]``, or with ``block_table`` the pages
        ``[num_pages * page_size, Hkv, D]`` (the page array reshaped, no copy)
    kv_counts, kv_indices : cupy int32 ``[Hm, total_qb]``, ``[Hm, total_qb, W]``
        The packed index form (local block indices, ascending, ``-1`` padded).
    tiles : cupy int32 ``[n_tiles, 8]``
        :func:`varlen_tiles` on the device.
    total_qb, block_size, heads_per_mask, causal, softmax_scale :
        ``sum_b nQb_b``, ``S`` (a multiple of 128 and of ``Bc``), ``c_h``, causality, scale.
    block_table : cupy int32 ``[batch, max_pages]``, optional
        Paged keys and values; ``page_size`` must then be a multiple of ``Bc``.
    schedule, max_ctas, out, lse :
        As in ``fa3_forward``.

    Returns
    -------
    out : cupy ``[total_q, Hq, D]`` (q's dtype), lse : cupy float32 ``[Hq, total_q]``

    The caller (:mod:`unisparse_ref.cupy_backend.varlen`) checks shapes, offsets and lengths.
    """
    import cupy as cp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    total_q, Hq, D = (int(x) for x in q.shape)
    Hkv = int(k.shape[1])
    dtype = "bfloat16" if np.dtype(q.dtype) == np.uint16 else "float16"
    n_tiles = int(tiles.shape[0])
    cfg = fa3_config(D)
    if block_size % FA3_BR or block_size % cfg.bc:
        raise ValueError(f"block_size {block_size} must be a multiple of Br=128 and Bc={cfg.bc}")
    if block_table is not None and (page_size < 1 or page_size % cfg.bc):
        raise ValueError(f"page_size {page_size} must be a multiple of Bc={cfg.bc} for the paged kernel")
    # One task per (tile, head): launch_config's n_tasks with "batch" = tiles, one tile each.
    cfgd = launch_config(batch=n_tiles, q_heads=Hq, nq=FA3_BR, head_dim=D, itemsize=2,
                         num_sms=max_ctas or _num_sms())
    if out is None:
        out = cp.empty_like(q)
    if lse is None:
        lse = cp.empty((Hq, total_q), dtype=cp.float32)
    if n_tiles == 0:
        return out, lse
    tmaps = [
        encode_packed_tensor_map(q, dtype, FA3_BR),
        encode_packed_tensor_map(k, dtype, cfg.bc),
        encode_packed_tensor_map(v, dtype, cfg.bc),
    ]
    if schedule not in ("dynamic", "static"):
        raise ValueError(f"schedule must be 'dynamic' or 'static', got {schedule!r}")
    sched = cp.zeros(1 + int(cfgd["grid"][0]), dtype=cp.int32)
    i32 = np.int32
    rest = [
        kv_counts,
        kv_indices,
        tiles,
        out,
        lse,
        i32(Hq),
        i32(Hkv),
        i32(Hq // heads_per_mask),
        i32(total_q),
        i32(total_qb),
        i32(kv_indices.shape[-1]),
        i32(block_size),
        i32(heads_per_mask),
        i32(1 if causal else 0),
        np.float32(softmax_scale * math.log2(math.e)),
        i32(cfgd["n_tasks"]),
        sched,
        i32(1 if schedule == "dynamic" else 0),
        block_table,
        i32(0 if block_table is None else block_table.shape[1]),
        i32(page_size),
    ]
    _launch_param(_get_kernel(name_expression(dtype, cfg, varlen=True)), cfgd, tmaps, rest)
    return out, lse
