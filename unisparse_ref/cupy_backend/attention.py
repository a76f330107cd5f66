"""Stage 4 on the GPU: block-sparse attention (SPEC 6) with the kernels of ``raw_kernels/attention.cu``.

The kernels read the block mask in FlexAttention's index form (``kv_counts`` ``[B, Hm, nQb]``,
``kv_indices`` ``[B, Hm, nQb, nKb]`` ascending, ``-1`` padded) and compute SPEC section 6:
query head ``h`` uses mask head ``h // c_h`` and KV head ``h // G``; causal attention is
bottom-right aligned; a row with no allowed key gives ``out = 0`` and ``lse = -inf``.

The kernels form a teaching ladder, one rung per version (:data:`KERNEL_VERSIONS`; the table
at the top of ``attention.cu`` says what each adds, ``docs/performance.md`` what each
measured and which rungs were retired):

====  =====================================  ============================================
ver   kernel                                 role
====  =====================================  ============================================
1     ``us_attn_fwd_v1<T, D>``               scalar FMA, one thread per query row; float32
                                             and every head dim; always correct, slow
6     ``us_attn_fwd_mma<T, D, 4, 2, 64>``    ``mma.sync`` tensor cores (sm_80+); the
                                             default off Hopper
7     ``us_attn_fwd_wgmma<T, D>``            Hopper ``wgmma`` (sm_90a), synchronous inside
                                             a CTA
9     ``us_fa3_fwd<T, D, Bc, stages>``       FlashAttention-3-class (sm_90a): a TMA
                                             producer warpgroup, two ping-pong consumer
                                             warpgroups, persistent grid; D = 64, 128,
                                             256; the default on Hopper
                                             (``attention_hopper.cu``, launched by
                                             :mod:`._hopper`)
====  =====================================  ============================================

Arrays are CuPy arrays; bfloat16 travels as a ``uint16`` CuPy array holding the bits (the
element types are :data:`unisparse_ref.cupy_backend._loader.CTYPES`), float16 and float32 as
themselves. ``out`` comes back in the dtype of ``q``, ``lse`` in float32.

Here: the registry, the instantiations (:data:`INSTANTIATIONS`, built by :func:`kernel_spec`,
which the launch uses too), the launch configuration (:func:`launch_config`) and the launch
(:func:`attention_forward`; :func:`attend` adds the head-dim padding the backend needs).
Adding a rung: one :class:`AttentionVersion` entry (its ``file`` may be another ``.cu``, its
``kind`` selects the shared-memory rule in :func:`launch_config`). Imports without CuPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._arrays import check_head_pooling, check_qkv
from ..blockmask import BlockMask
from . import _hopper, _loader
from ._device import cupy_module
from ._loader import CTYPES, KernelSpec

__all__ = [
    "AttentionVersion",
    "DEFAULT_VERSION",
    "FALLBACK_VERSION",
    "INSTANTIATIONS",
    "KERNEL_HEAD_DIMS",
    "KERNEL_VERSIONS",
    "attend",
    "attention_forward",
    "check_index_form",
    "dense_indices",
    "kernel_spec",
    "launch_config",
    "padded_head_dim",
]

FILE = "attention.cu"

#: Head dims the scalar v1 kernel is instantiated for (it runs every D the backend takes, so
#: any GPU serves D up to 256; only Hopper's v9 runs D = 256 fast).
V1_HEAD_DIMS: tuple[int, ...] = (32, 64, 128, 256)
#: Head dims of the tensor-core kernels.
MMA_HEAD_DIMS: tuple[int, ...] = (64, 128)
_V1_BC = 16  # keys per v1 tile (V1_BC in attention.cu)


@dataclass(frozen=True)
class AttentionVersion:
    """One rung of the kernel ladder (see the table at the top of ``attention.cu``).

    Attributes
    ----------
    number : int
    summary : str
    kernel : str
        The C++ kernel template, instantiated as ``kernel<T, D>``.
    kind : str
        ``"scalar"`` (v1: one thread per query row, K/V tiles in static shared memory),
        ``"mma"`` (mma.sync) or ``"wgmma"`` (Hopper): picks the shared-memory rule of
        :func:`launch_config`.
    warps, m_tiles, bc : int
        Tensor-core versions: ``Br = warps * m_tiles * 16`` query rows per CTA (each warp owns
        ``m_tiles`` m16 tiles), ``Bc`` keys per tile. ``0`` for v1 (``Br = min(64, S)``
        threads, ``Bc = 16``). The mma.sync kernel takes ``warps, m_tiles, bc`` as template
        arguments; the wgmma kernel is written for 2 warpgroups of 64 rows and ``Bc = 64``.
    options : tuple of str
        Extra NVRTC options of every instantiation (the wgmma kernel: ``-arch=sm_90a``).
    file : str
        The ``.cu`` file in ``raw_kernels/``.
    dims : tuple of int
        Head dims it is built for (empty: v1's, or the mma/wgmma kernels').

    Tensor-core versions run a 1-D grid in the fixed longest-first order "query tiles
    last-first, heads fastest" (or, with ``sort_work=True``, a work list sorted by mask-row
    length); v1 the 3-D grid ``(Hq, n_qtiles, B)``.
    """

    number: int
    summary: str
    kernel: str
    kind: str = "scalar"
    warps: int = 0
    m_tiles: int = 0
    bc: int = 0
    options: tuple[str, ...] = ()
    file: str = FILE
    dims: tuple[int, ...] = ()

    @property
    def tensor_core(self) -> bool:
        return self.kind != "scalar"

    @property
    def wgmma(self) -> bool:
        """Needs Hopper (sm_90a)."""
        return self.kind in ("wgmma", "fa3")

    @property
    def sorted_work(self) -> bool:
        """1-D longest-first grid (and the optional sorted work list)."""
        return self.tensor_core

    @property
    def head_dims(self) -> tuple[int, ...]:
        if self.dims:
            return self.dims
        return MMA_HEAD_DIMS if self.tensor_core else V1_HEAD_DIMS

    def rows_per_cta(self, block_size: int) -> int:
        """``Br``, query rows per CTA."""
        return self.warps * self.m_tiles * 16 if self.tensor_core else min(64, block_size)

    def tile_keys(self) -> int:
        """``Bc``, keys per shared-memory tile."""
        return self.bc if self.tensor_core else _V1_BC

    def dtypes(self) -> tuple[str, ...]:
        return ("float16", "bfloat16") if self.tensor_core else ("float16", "bfloat16", "float32")


#: The kernel ladder, version number -> description and tile parameters. The numbers are the
#: historical ones (v2-v5 and v8 were retired; their timings are on docs/performance.md).
KERNEL_VERSIONS: dict[int, AttentionVersion] = {
    1: AttentionVersion(1, "scalar FMA, one thread per query row, K/V tiles as float in shared memory",
                        "us_attn_fwd_v1"),
    6: AttentionVersion(6, "mma.sync m16n8k16 + ldmatrix, cp.async double buffer, swizzled smem; Br=128 as "
                        "4 warps x 32 rows (K/V fragments reused twice), Bc=64; 1-D longest-first grid",
                        "us_attn_fwd_mma", kind="mma", warps=4, m_tiles=2, bc=64),
    7: AttentionVersion(7, "Hopper wgmma (sm_90a): 2 warpgroups x 64 rows (Br=128), Q/K/V^T from swizzled smem "
                        "descriptors, P from registers, V transposed in smem, 2 CTAs/SM; 1-D longest-first grid",
                        "us_attn_fwd_wgmma", kind="wgmma", warps=8, m_tiles=1, bc=64, options=("-arch=sm_90a",)),
    9: AttentionVersion(9, "FlashAttention-3-class (sm_90a): TMA producer warpgroup + two ping-pong consumer "
                        "warpgroups (Br=128), K/V ring on mbarriers, S_{j+1} issued before softmax_j, V as an "
                        "MN-major wgmma operand, Bc = one mask block (128; 64 at D=256), persistent grid",
                        "us_fa3_fwd", kind="fa3", warps=8, m_tiles=1, bc=128, options=_hopper.FA3_OPTIONS,
                        file=_hopper.FA3_FILE, dims=tuple(_hopper.FA3_HEAD_DIMS)),
}

#: The version used when ``version=None`` (fp16/bf16; float32 always runs v1).
DEFAULT_VERSION = 9
#: The default where the default needs hardware this GPU lacks (wgmma runs on Hopper only).
FALLBACK_VERSION = 6


def kernel_spec(ver: AttentionVersion, dtype: str, head_dim: int) -> KernelSpec:
    """The instantiation of ``ver`` for input dtype name ``dtype`` and head dim ``head_dim``."""
    if ver.kind == "fa3":
        return KernelSpec(ver.file, _hopper.name_expression(dtype, _hopper.fa3_config(head_dim)), ver.options)
    args = [CTYPES[dtype], str(head_dim)]
    if ver.kind == "mma":
        args += [str(ver.warps), str(ver.m_tiles), str(ver.bc)]
    return KernelSpec(ver.file, f"{ver.kernel}<{', '.join(args)}>", ver.options)


#: Every instantiation this stage can launch (every version, dtype and head dim).
INSTANTIATIONS: list[KernelSpec] = [
    kernel_spec(ver, dt, d) for ver in KERNEL_VERSIONS.values() for dt in ver.dtypes() for d in ver.head_dims
]

#: Head dims the backend runs; other D are zero-padded up to the next (see :func:`attend`).
KERNEL_HEAD_DIMS = V1_HEAD_DIMS


def padded_head_dim(D: int) -> int:
    """The kernel head dim used for ``D``: the smallest of :data:`KERNEL_HEAD_DIMS` that holds it."""
    for d in KERNEL_HEAD_DIMS:
        if D <= d:
            return d
    raise ValueError(
        f"the cupy backend supports head dims up to {KERNEL_HEAD_DIMS[-1]}, got D={D}"
    )


# ----------------------------------------------------------------------------- helpers
def _dtype_name(arr: Any) -> str:
    dt = np.dtype(arr.dtype)
    if dt == np.uint16:
        return "bfloat16"
    if dt == np.float16:
        return "float16"
    if dt == np.float32:
        return "float32"
    raise TypeError(f"q has dtype {dt}; expected float16, float32 or uint16 (bfloat16 bits)")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_config(
    ver: AttentionVersion, *, batch: int, q_heads: int, nq: int, block_size: int, head_dim: int, itemsize: int
) -> dict[str, Any]:
    """Grid, block and dynamic shared memory of one launch: the one place they are computed.

    Returns
    -------
    dict
        ``grid``, ``block``, ``shared_mem`` (bytes), ``br`` (rows per CTA), ``n_qtiles``.
        Tensor-core versions use a 1-D grid of ``B * Hq * n_qtiles`` CTAs in the
        longest-first order (or over a sorted work list); v1 the 3-D grid ``(Hq, n_qtiles, B)``.
    """
    if ver.kind == "fa3":  # v9: persistent grid of its own (one CTA per SM); see _hopper.launch_config
        return _hopper.launch_config(batch=batch, q_heads=q_heads, nq=nq, head_dim=head_dim, itemsize=itemsize)
    br = ver.rows_per_cta(block_size)
    n_qtiles = _cdiv(nq, br)
    if ver.kind == "scalar":
        # One thread per row; K and V tiles are static shared memory (2 * Bc * D floats).
        return {"grid": (q_heads, n_qtiles, batch), "block": (br,), "shared_mem": 0, "br": br,
                "n_qtiles": n_qtiles}
    if ver.kind == "wgmma":
        # Q [Br][D] + K [2][Bc][D] + V staging [Bc][D] + V^T [D][Bc], plus 1 KiB to align the
        # tiles to the 1024-byte swizzle atom of the wgmma descriptors.
        smem = (br + 4 * ver.bc) * head_dim * itemsize + 1024
    elif ver.kind == "mma":
        smem = (br + 4 * ver.bc) * head_dim * itemsize  # Q [Br][D] + K, V [2][Bc][D]
    else:
        raise ValueError(f"attention kernel v{ver.number}: no launch rule for kind {ver.kind!r}")
    return {"grid": (batch * q_heads * n_qtiles,), "block": (ver.warps * 32,), "shared_mem": smem, "br": br,
            "n_qtiles": n_qtiles}


def _work_list(kv_counts: Any, *, batch: int, q_heads: int, heads_per_mask: int, n_qtiles: int,
               br: int, block_size: int) -> Any:
    """CTA tasks ``(b * Hq + h) * n_qtiles + qtile``, longest mask rows first (int32 CuPy).

    Ties keep the order (b, qtile descending, h ascending): GQA siblings stay adjacent and
    share K/V tiles through L2; later query tiles (longer causal rows) go first.
    """
    cp = cupy_module()

    qt = cp.arange(n_qtiles, dtype=cp.int64)
    i = (qt * br) // block_size
    h = cp.arange(q_heads, dtype=cp.int64)
    counts = kv_counts.astype(cp.int64)[:, h // heads_per_mask][:, :, i]  # [B, Hq, n_qtiles]
    b = cp.arange(batch, dtype=cp.int64)[:, None, None]
    task = (b * q_heads + h[None, :, None]) * n_qtiles + qt[None, None, :]
    # Tie order: b, then qtile descending, then h.
    rank = (b * n_qtiles + (n_qtiles - 1 - qt)[None, None, :]) * q_heads + h[None, :, None]
    n = batch * q_heads * n_qtiles
    key = (-counts) * n + rank
    order = cp.argsort(key.ravel())
    return task.ravel()[order].astype(cp.int32)


_DENSE_CACHE: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def dense_indices(batch: int, mask_heads: int, nq: int, nk: int, block_size: int, causal: bool) -> tuple[Any, Any]:
    """``(kv_counts, kv_indices)`` of the mask with every visible block selected (CuPy, cached).

    Block ``j`` is visible to query block ``i`` iff ``j * S <= p_last(i)`` (SPEC section 5).
    """
    cp = cupy_module()

    dev = cp.cuda.Device().id
    key = (dev, batch, mask_heads, nq, nk, block_size, causal)
    if key not in _DENSE_CACHE:
        nqb, nkb = _cdiv(nq, block_size), _cdiv(nk, block_size)
        i = cp.arange(nqb, dtype=cp.int32)
        j = cp.arange(nkb, dtype=cp.int32)
        if causal:
            p_last = cp.minimum((i + 1) * block_size, nq) - 1 + (nk - nq)
            vis = j[None, :] * block_size <= p_last[:, None]
        else:
            vis = cp.ones((nqb, nkb), dtype=bool)
        counts = vis.sum(axis=1).astype(cp.int32)
        idx = cp.where(vis, j[None, :], cp.int32(-1)).astype(cp.int32)  # visible blocks are a prefix
        counts = cp.ascontiguousarray(cp.broadcast_to(counts, (batch, mask_heads, nqb)))
        idx = cp.ascontiguousarray(cp.broadcast_to(idx, (batch, mask_heads, nqb, nkb)))
        _DENSE_CACHE[key] = (counts, idx)
    return _DENSE_CACHE[key]


def check_index_form(kv_counts: Any, kv_indices: Any, nkb: int) -> None:
    """Raise ``ValueError`` unless the index form is valid (NumPy or CuPy arrays).

    Valid: ``0 <= kv_counts <= W`` (``W`` the last dim of ``kv_indices``), and the first
    ``kv_counts`` entries of each row strictly ascending block indices in ``[0, nkb)``.
    One pass over the arrays on their device; one scalar comes back to the host.
    """
    xp = _array_module(kv_indices)
    W = kv_indices.shape[-1]
    counts = kv_counts.astype(xp.int64)
    idx = kv_indices.astype(xp.int64)
    if bool(((counts < 0) | (counts > W)).any()):
        raise ValueError(f"kv_counts must lie in [0, {W}] (the last dim of kv_indices)")
    used = xp.arange(W)[None, None, None, :] < counts[..., None]
    bad_range = used & ((idx < 0) | (idx >= nkb))
    bad_order = used[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
    if bool(bad_range.any()):
        raise ValueError(f"kv_indices holds a block index outside [0, {nkb}) among the counted entries")
    if bool(bad_order.any()):
        raise ValueError("kv_indices must be strictly ascending within the counted entries of each row")


def _array_module(a: Any) -> Any:
    return cupy_module() if type(a).__module__.split(".")[0] == "cupy" else np


def _has_sm90() -> bool:
    cp = cupy_module()

    return str(cp.cuda.Device().compute_capability) == "90"


def _resolve_version(version: int | None, dtype: str, head_dim: int, block_size: int) -> AttentionVersion:
    if version is None:
        # The first rung of DEFAULT_VERSION, FALLBACK_VERSION, v1 that runs this GPU, dtype,
        # head dim and block size (float32 and small S end at the scalar kernel).
        ver = KERNEL_VERSIONS[1]
        for n in (DEFAULT_VERSION, FALLBACK_VERSION):
            cand = KERNEL_VERSIONS[n]
            if cand.wgmma and not _has_sm90():
                continue
            if (dtype in cand.dtypes() and head_dim in cand.head_dims
                    and block_size % max(cand.rows_per_cta(block_size), cand.tile_keys()) == 0):
                ver = cand
                break
    else:
        if version not in KERNEL_VERSIONS:
            raise ValueError(f"version must be one of {sorted(KERNEL_VERSIONS)} or None, got {version!r}")
        ver = KERNEL_VERSIONS[version]
        if dtype not in ver.dtypes():
            raise TypeError(f"attention kernel v{version} supports {ver.dtypes()}, not {dtype} (use v1)")
    if head_dim not in ver.head_dims:
        raise ValueError(f"attention kernel v{ver.number} supports head dims {ver.head_dims}, got D={head_dim}")
    if ver.wgmma and not _has_sm90():
        raise ValueError(f"attention kernel v{ver.number} needs a Hopper GPU (compute capability 9.0)")
    if ver.tensor_core:
        need = max(ver.rows_per_cta(block_size), ver.tile_keys())
        if block_size % need:
            raise ValueError(
                f"attention kernel v{ver.number} needs block_size to be a multiple of {need} (Br and Bc), "
                f"got {block_size}; use v1 for smaller blocks"
            )
    elif block_size % _V1_BC:
        raise ValueError(f"attention kernel v1 needs block_size to be a multiple of {_V1_BC}, got {block_size}")
    return ver


# ----------------------------------------------------------------------------- the entry points
def attention_forward(
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
    version: int | None = None,
    sort_work: bool = False,
    work: Any = None,
    validate: bool = False,
) -> tuple[Any, Any]:
    """Block-sparse attention forward on the GPU (SPEC section 6).

    Parameters
    ----------
    q : cupy.ndarray ``[B, Hq, Nq, D]``
        float16, float32, or uint16 holding bfloat16 bits.
    k, v : cupy.ndarray ``[B, Hkv, Nk, D]``, the dtype of ``q``
    kv_counts : cupy.ndarray int32 ``[B, Hm, nQb]``
    kv_indices : cupy.ndarray int32 ``[B, Hm, nQb, W]``
        Ascending block indices, ``-1`` padded; ``W <= nKb``.
    nq, nk, block_size : int
        ``Nq``, ``Nk`` and ``S`` (checked against the shapes).
    heads_per_mask : int
        ``c_h``: query head ``h`` uses mask head ``h // c_h``.
    causal : bool
    softmax_scale : float or None
        ``None``: ``1/sqrt(D)``.
    version : int, optional
        A key of :data:`KERNEL_VERSIONS`; ``None`` picks :data:`DEFAULT_VERSION` (v1 for
        float32 or shapes the tensor-core kernels do not take).
    sort_work : bool
        Tensor-core versions (1-D grid): order the CTAs by the length of their mask row (a device
        sort of ``kv_counts``, longest first) instead of the fixed order "query tiles
        last-first, heads fastest", which is already longest-first for causal masks. Costs a
        sort per call; worth it for masks whose row densities differ wildly.
    work : cupy.ndarray int32, optional
        A precomputed work list for those versions (overrides ``sort_work``).
    validate : bool
        Check the index form on the device first (:func:`check_index_form`; costs a pass
        over it and a synchronisation). Off by default: the kernels trust ``kv_counts`` and
        ``kv_indices`` (the backends build them from a :class:`~unisparse_ref.BlockMask`), and
        an index out of range there is an illegal memory access.

    Returns
    -------
    out : cupy.ndarray ``[B, Hq, Nq, D]``, the dtype of ``q``
    lse : cupy.ndarray float32 ``[B, Hq, Nq]``
    """
    cp = cupy_module()

    for name, x in (("q", q), ("k", k), ("v", v), ("kv_counts", kv_counts), ("kv_indices", kv_indices)):
        if not isinstance(x, cp.ndarray):
            raise TypeError(f"{name} must be a CuPy array, got {type(x)!r}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, causal=causal, shape_only=True)
    if (Nq, Nk) != (nq, nk):
        raise ValueError(f"nq={nq}, nk={nk} do not match the shapes Nq={Nq}, Nk={Nk}")
    if heads_per_mask < 1:
        raise ValueError(f"heads_per_mask must be >= 1, got {heads_per_mask}")
    check_head_pooling(Hq, Hkv, heads_per_mask)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    Hm = Hq // heads_per_mask
    nqb, nkb = _cdiv(Nq, block_size), _cdiv(Nk, block_size)
    if kv_counts.shape != (B, Hm, nqb) or kv_indices.ndim != 4 or kv_indices.shape[:3] != (B, Hm, nqb):
        raise ValueError(
            f"kv_counts must be [B, Hm, nQb] = {(B, Hm, nqb)} and kv_indices [B, Hm, nQb, W]; "
            f"got {kv_counts.shape} and {kv_indices.shape}"
        )
    if kv_indices.shape[3] > nkb or kv_indices.shape[3] < 1:
        raise ValueError(f"kv_indices' last dim must be in [1, nKb={nkb}], got {kv_indices.shape[3]}")
    if validate:
        check_index_form(kv_counts, kv_indices, nkb)
    dtype = _dtype_name(q)
    ver = _resolve_version(version, dtype, D, block_size)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")

    q, k, v = (cp.ascontiguousarray(x) for x in (q, k, v))
    kv_counts = cp.ascontiguousarray(kv_counts, dtype=cp.int32)
    kv_indices = cp.ascontiguousarray(kv_indices, dtype=cp.int32)
    if ver.kind == "fa3":  # its own launcher: tensor maps, persistent grid (launch_config there)
        if work is None and sort_work:
            work = _work_list(kv_counts, batch=B, q_heads=Hq, heads_per_mask=heads_per_mask,
                              n_qtiles=_cdiv(Nq, _hopper.FA3_BR), br=_hopper.FA3_BR, block_size=block_size)
        return _hopper.fa3_forward(q, k, v, kv_counts, kv_indices, nq=Nq, nk=Nk, block_size=block_size,
                                   heads_per_mask=heads_per_mask, causal=causal, softmax_scale=scale,
                                   work=work)
    out = cp.empty_like(q)
    lse = cp.empty((B, Hq, Nq), dtype=cp.float32)

    cfg = launch_config(ver, batch=B, q_heads=Hq, nq=Nq, block_size=block_size, head_dim=D,
                        itemsize=q.dtype.itemsize)
    if ver.sorted_work and work is None and sort_work:
        work = _work_list(kv_counts, batch=B, q_heads=Hq, heads_per_mask=heads_per_mask,
                          n_qtiles=cfg["n_qtiles"], br=cfg["br"], block_size=block_size)
    work_arg = work if (ver.sorted_work and work is not None) else np.uint64(0)  # nullptr: fixed order
    kernel = _loader.get_function(kernel_spec(ver, dtype, D))
    i32 = cp.int32
    args = (
        q, k, v, kv_counts, kv_indices, work_arg, out, lse,
        i32(Hq), i32(Hkv), i32(Hm), i32(Nq), i32(Nk), i32(nqb), i32(kv_indices.shape[3]),
        i32(block_size), i32(heads_per_mask), i32(1 if causal else 0), i32(cfg["n_qtiles"]),
        cp.float32(scale * math.log2(math.e)),
    )
    _loader.launch(kernel, cfg["grid"], cfg["block"], args, shared_mem=cfg["shared_mem"])
    return out, lse


def attend(q: Any, k: Any, v: Any, kv_counts: Any, kv_indices: Any, block_mask: BlockMask,
           softmax_scale: float) -> tuple[Any, Any]:
    """:func:`attention_forward` for any head dim up to 256, as the backend calls it.

    Head dims the kernels are not built for are zero-padded up to :func:`padded_head_dim`: zero
    columns change no dot product ``q . k`` and give zero output columns, which are cut off
    again; ``softmax_scale`` is that of the true ``D`` (passed explicitly). The mask's
    geometry (``nq``, ``nk``, block size, ``heads_per_mask``, causality) comes from
    ``block_mask``; the index form is ``kv_counts``, ``kv_indices``.
    """
    cp = cupy_module()

    D = int(q.shape[3])
    Dp = padded_head_dim(D)
    if Dp != D:
        widths = ((0, 0), (0, 0), (0, 0), (0, Dp - D))
        q, k, v = (cp.pad(a, widths) for a in (q, k, v))
    out, lse = attention_forward(
        q, k, v, kv_counts, kv_indices, nq=block_mask.nq, nk=block_mask.nk, block_size=block_mask.block_size,
        heads_per_mask=block_mask.heads_per_mask, causal=block_mask.causal, softmax_scale=float(softmax_scale),
    )
    if Dp != D:
        out = cp.ascontiguousarray(out[..., :D])
    return out, lse
