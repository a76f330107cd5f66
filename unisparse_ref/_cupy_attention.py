"""Launcher of the block-sparse attention kernels in ``raw_kernels/attention.cu``.

The kernels read the block mask in FlexAttention's index form (``kv_counts`` ``[B, Hm, nQb]``,
``kv_indices`` ``[B, Hm, nQb, nKb]`` ascending, ``-1`` padded) and compute SPEC section 6:
query head ``h`` uses mask head ``h // c_h`` and KV head ``h // G``; causal attention is
bottom-right aligned; a row with no allowed key gives ``out = 0`` and ``lse = -inf``.

Arrays are CuPy arrays; bfloat16 travels as a ``uint16`` CuPy array holding the bits (the
convention of :mod:`unisparse_ref._loader`, ``CTYPES``), float16 and float32 as themselves.
``out`` comes back in the dtype of ``q`` (same convention), ``lse`` in float32.

This module imports without CuPy: :data:`INSTANTIATIONS` (every kernel instantiation, for
the no-GPU NVRTC compile test and :func:`unisparse_ref._loader.all_instantiations`) and
:data:`KERNEL_VERSIONS` (the kernel ladder) are plain data. See ``attention.cu``'s opening
comment for the version table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._loader import CTYPES, KernelSpec

__all__ = [
    "AttentionVersion",
    "DEFAULT_VERSION",
    "FALLBACK_VERSION",
    "INSTANTIATIONS",
    "KERNEL_VERSIONS",
    "attention_forward",
    "attention_instantiations",
    "check_index_form",
    "dense_indices",
    "launch_config",
]

_FILE = "attention.cu"

#: Head dims the scalar v1 kernel is instantiated for.
V1_HEAD_DIMS: tuple[int, ...] = (32, 64, 128)
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
    warps, m_tiles, bc : int
        Tensor-core versions: ``Br = warps * m_tiles * 16`` query rows per CTA, ``Bc`` keys
        per tile. ``0`` for v1 (``Br = min(64, S)`` threads, ``Bc = 16``).
    sorted_work : bool
        1-D grid in the fixed longest-first order "query tiles last-first, heads fastest"
        (or, with ``sort_work=True``, a work list sorted by mask-row length).
    q_in_regs : bool
        Q fragments held in registers (else re-read from shared memory every tile).
    """

    number: int
    summary: str
    warps: int = 0
    m_tiles: int = 0
    bc: int = 0
    sorted_work: bool = False
    q_in_regs: bool = True
    wgmma: bool = False

    @property
    def tensor_core(self) -> bool:
        return self.warps > 0

    @property
    def options(self) -> tuple[str, ...]:
        """Extra NVRTC options: the wgmma kernel needs the arch-specific sm_90a target."""
        return ("-arch=sm_90a",) if self.wgmma else ()

    @property
    def head_dims(self) -> tuple[int, ...]:
        return MMA_HEAD_DIMS if self.tensor_core else V1_HEAD_DIMS

    def br(self, block_size: int) -> int:
        """Query rows per CTA."""
        return self.warps * self.m_tiles * 16 if self.tensor_core else min(64, block_size)

    def tile_keys(self) -> int:
        """``Bc``, keys per shared-memory tile."""
        return self.bc if self.tensor_core else _V1_BC

    def name_expression(self, ctype: str, head_dim: int) -> str:
        if not self.tensor_core:
            return f"us_attn_fwd_v1<{ctype}, {head_dim}>"
        if self.wgmma:
            return f"us_attn_fwd_wgmma<{ctype}, {head_dim}, {self.warps // 4}>"
        b = lambda x: "true" if x else "false"  # noqa: E731
        return (
            f"us_attn_fwd_mma<{ctype}, {head_dim}, {self.warps}, {self.m_tiles}, {self.bc}, "
            f"{b(self.sorted_work)}, {b(self.q_in_regs)}>"
        )

    def dtypes(self) -> tuple[str, ...]:
        return ("float16", "bfloat16", "float32") if not self.tensor_core else ("float16", "bfloat16")


#: The kernel ladder: version number -> description and tile parameters.
KERNEL_VERSIONS: dict[int, AttentionVersion] = {
    1: AttentionVersion(1, "scalar FMA, one thread per query row, K/V tiles as float in shared memory"),
    2: AttentionVersion(2, "mma.sync + ldmatrix, cp.async double buffer, swizzled smem, Br=64, Q in registers",
                        warps=4, m_tiles=1, bc=64, sorted_work=False, q_in_regs=True),
    3: AttentionVersion(3, "v2 with Br=128 as 4 warps x 32 rows (K/V fragments reused twice), Bc=32, "
                        "1-D longest-first grid", warps=4, m_tiles=2, bc=32, sorted_work=True, q_in_regs=False),
    4: AttentionVersion(4, "v2 with Br=128 as 8 warps x 16 rows, 1-D longest-first grid",
                        warps=8, m_tiles=1, bc=64, sorted_work=True, q_in_regs=True),
    5: AttentionVersion(5, "v2 on the 1-D longest-first grid (Br=64)",
                        warps=4, m_tiles=1, bc=64, sorted_work=True, q_in_regs=True),
    6: AttentionVersion(6, "v3 with Bc=64 (Br=128 as 4 warps x 32 rows); the fastest mma.sync version",
                        warps=4, m_tiles=2, bc=64, sorted_work=True, q_in_regs=False),
    7: AttentionVersion(7, "Hopper wgmma (sm_90a): 2 warpgroups x 64 rows (Br=128), Q/K/V^T from swizzled smem "
                        "descriptors, P from registers, V transposed in smem, 2 CTAs/SM; 1-D longest-first grid",
                        warps=8, m_tiles=1, bc=64, sorted_work=True, q_in_regs=False, wgmma=True),
    8: AttentionVersion(8, "v7 with 1 warpgroup per CTA (Br=64), 2-3 CTAs/SM",
                        warps=4, m_tiles=1, bc=64, sorted_work=True, q_in_regs=False, wgmma=True),
}

#: The version used when ``version=None`` (fp16/bf16; float32 always runs v1).
DEFAULT_VERSION = 7
#: The default where the default needs hardware this GPU lacks (wgmma: Hopper only).
FALLBACK_VERSION = 6


def attention_instantiations() -> list[KernelSpec]:
    """Every instantiation this launcher can ask for: ``KernelSpec(file, name_expression, options)``."""
    specs: list[KernelSpec] = []
    for ver in KERNEL_VERSIONS.values():
        for dt in ver.dtypes():
            for d in ver.head_dims:
                specs.append(KernelSpec(_FILE, ver.name_expression(CTYPES[dt], d), ver.options))
    return specs


#: The same list as module data (read by :func:`unisparse_ref._loader.all_instantiations`).
INSTANTIATIONS: list[KernelSpec] = attention_instantiations()


# ----------------------------------------------------------------------------- helpers
def _dtype_name(arr: Any) -> str:
    import numpy as np

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
        Versions with ``sorted_work`` (v3-v8) use a 1-D grid of ``B * Hq * n_qtiles`` CTAs in
        the longest-first order (or over a sorted work list); v1 and v2 the 3-D grid
        ``(Hq, n_qtiles, B)`` with heads fastest.
    """
    br = ver.br(block_size)
    n_qtiles = _cdiv(nq, br)
    if not ver.tensor_core:
        # One thread per row; K and V tiles are static shared memory (2 * Bc * D floats).
        return {"grid": (q_heads, n_qtiles, batch), "block": (br,), "shared_mem": 0, "br": br,
                "n_qtiles": n_qtiles}
    threads = ver.warps * 32
    if ver.wgmma:
        # Q [Br][D] + K [2][Bc][D] + V staging [Bc][D] + V^T [D][Bc], plus 1 KiB to align the
        # tiles to the 1024-byte swizzle atom of the wgmma descriptors.
        smem = (br + 4 * ver.bc) * head_dim * itemsize + 1024
    else:
        smem = (br + 4 * ver.bc) * head_dim * itemsize  # Q [Br][D] + K, V [2][Bc][D]
    if ver.sorted_work:
        grid: tuple[int, ...] = (batch * q_heads * n_qtiles,)
    else:
        grid = (q_heads, n_qtiles, batch)
    return {"grid": grid, "block": (threads,), "shared_mem": smem, "br": br, "n_qtiles": n_qtiles}


def _work_list(kv_counts: Any, *, batch: int, q_heads: int, heads_per_mask: int, n_qtiles: int,
               br: int, block_size: int) -> Any:
    """CTA tasks ``(b * Hq + h) * n_qtiles + qtile``, longest mask rows first (int32 CuPy).

    Ties keep the order (b, qtile descending, h ascending): GQA siblings stay adjacent and
    share K/V tiles through L2; later query tiles (longer causal rows) go first.
    """
    import cupy as cp

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
    import cupy as cp

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
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy


def _has_sm90() -> bool:
    import cupy as cp

    return str(cp.cuda.Device().compute_capability) == "90"


def _resolve_version(version: int | None, dtype: str, head_dim: int, block_size: int) -> AttentionVersion:
    if version is None:
        ver = KERNEL_VERSIONS[DEFAULT_VERSION]
        if ver.wgmma and not _has_sm90():
            ver = KERNEL_VERSIONS[FALLBACK_VERSION]
        if dtype not in ver.dtypes() or head_dim not in ver.head_dims or block_size % max(ver.br(block_size), ver.bc):
            ver = KERNEL_VERSIONS[1]  # float32, other head dims or small S: the scalar kernel
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
        need = max(ver.br(block_size), ver.bc)
        if block_size % need:
            raise ValueError(
                f"attention kernel v{ver.number} needs block_size to be a multiple of {need} (Br and Bc), "
                f"got {block_size}; use v1 for smaller blocks"
            )
    elif block_size % _V1_BC:
        raise ValueError(f"attention kernel v1 needs block_size to be a multiple of {_V1_BC}, got {block_size}")
    return ver


# ----------------------------------------------------------------------------- the entry point
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
        1-D-grid versions (v3-v8): order the CTAs by the length of their mask row (a device
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
    import cupy as cp
    import numpy as np

    from ._loader import get_function, launch

    for name, x in (("q", q), ("k", k), ("v", v), ("kv_counts", kv_counts), ("kv_indices", kv_indices)):
        if not isinstance(x, cp.ndarray):
            raise TypeError(f"{name} must be a CuPy array, got {type(x)!r}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, Hq, Nq, D] and k, v [B, Hkv, Nk, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Nq, D = (int(s) for s in q.shape)
    Bk, Hkv, Nk, Dk = (int(s) for s in k.shape)
    if (Bk, Dk) != (B, D):
        raise ValueError(f"k {k.shape} must match q {q.shape} in batch and head dim")
    if (Nq, Nk) != (nq, nk):
        raise ValueError(f"nq={nq}, nk={nk} do not match the shapes Nq={Nq}, Nk={Nk}")
    if Nq < 1 or Nk < 1:
        raise ValueError("Nq and Nk must be >= 1")
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    if heads_per_mask < 1 or G % heads_per_mask:
        raise ValueError(f"heads_per_mask={heads_per_mask} must divide the GQA group size G={G}")
    if causal and Nq > Nk:
        raise ValueError(f"causal attention needs Nq <= Nk, got Nq={Nq}, Nk={Nk}")
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
    out = cp.empty_like(q)
    lse = cp.empty((B, Hq, Nq), dtype=cp.float32)

    cfg = launch_config(ver, batch=B, q_heads=Hq, nq=Nq, block_size=block_size, head_dim=D,
                        itemsize=q.dtype.itemsize)
    if ver.sorted_work and work is None and sort_work:
        work = _work_list(kv_counts, batch=B, q_heads=Hq, heads_per_mask=heads_per_mask,
                          n_qtiles=cfg["n_qtiles"], br=cfg["br"], block_size=block_size)
    work_arg = work if (ver.sorted_work and work is not None) else np.uint64(0)  # nullptr: fixed order
    kernel = get_function(_FILE, ver.name_expression(CTYPES[dtype], D), ver.options)
    i32 = cp.int32
    args = (
        q, k, v, kv_counts, kv_indices, work_arg, out, lse,
        i32(Hq), i32(Hkv), i32(Hm), i32(Nq), i32(Nk), i32(nqb), i32(kv_indices.shape[3]),
        i32(block_size), i32(heads_per_mask), i32(1 if causal else 0), i32(cfg["n_qtiles"]),
        cp.float32(scale * math.log2(math.e)),
    )
    launch(kernel, cfg["grid"], cfg["block"], args, shared_mem=cfg["shared_mem"])
    return out, lse
