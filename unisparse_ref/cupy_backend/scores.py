"""Stage 2 on the GPU: block scores (SPEC 4) with ``raw_kernels/scores.cu``.

Version 4 (the default): ``us_split_rows`` writes the composite rows as fp16 hi/lo pairs with
one power-of-two factor per row, then ``us_scores_mma<NW, VAR>`` computes the compressed logits
on the tensor cores (``mma.sync`` m16n8k16, three products per k-step, float32 sums) in one
pass with the online row softmax and per-(row, tile) key-block piece sums, rescaled after the
walk (the flash-attention rescale), every sum in a fixed order. A persistent grid takes work
items (``32*NW`` composite rows of one mask head) from an atomic counter, longest first; its
scratch is per slot (thread block), not per head. ``VAR = true`` adds the research variants
``sink_tokens`` and ``diagonal_correction`` (an additive log-weight per column and a band of
per-row log-weights near the diagonal, built on the host by :func:`variant_weights`).

Packed batches (serving layouts): :func:`launch_scores_packed` scores every sequence of a packed
batch (``q_c [total_r, Hm, D]``, ``k_c [total_c, Hkv, D]``) in ONE launch of the same kernel in its
packed mode: the keys centred per (sequence, KV head), the rows split where they lie (no copy),
and a work list of (sequence, row tile) entries sorted longest first across the sequences, each
item reading its geometry from a descriptor table (:func:`packed_launch_config`). Each
sequence's scores are bit for bit those of :func:`launch_scores` on that sequence.

Version 3 (``us_scores_onepass``, float32 FMA, scratch per head) remains for the shapes version
4 does not take: a query block of more than ``32*NW`` composite rows (``block_size / c_q > 256``)
or a head dim above 256. ``scores.cu``'s opening comments give the formulas and the barriers.

Here: the instantiations (:data:`INSTANTIATIONS`, NVRTC options :data:`OPTIONS`), the launch
configurations (:func:`launch_config` for version 3, :func:`mma_launch_config` for version 4,
:func:`packed_launch_config` for its packed mode; grid, block, shared memory, scratch and work
list, pure Python) and the launches (:func:`launch_scores`, :func:`launch_scores_packed`).
Imports without CuPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from .._arrays import packed_offsets
from ..config import UniSparseConfig
from . import _loader
from ._device import cupy_module, i32, upload_int32
from ._loader import KernelSpec

__all__ = ["CENTER_KERNEL", "DEFAULT_PARTS", "FILE", "KREF", "INSTANTIATIONS", "KERNEL", "MMA_TC", "MMA_WARPS", "OPTIONS", "SCRATCH_BYTES",
           "SPLIT_KERNEL", "TC", "TR", "center_config", "center_keys", "launch_config", "launch_scores", "mma_applicable", "mma_kernel",
           "mma_launch_config", "split_layout", "packed_applicable", "packed_launch_config", "device_packed_launch_config",
           "packed_host_tables", "packed_operands", "launch_scores_packed", "row_bytes",
           "variant_weights"]

FILE = "scores.cu"
#: Composite rows (TR) and columns (TC) per tile, passed to NVRTC with -D so Python and CUDA agree.
TR = 64
TC = 64
#: Threads per block: 16 x 16, each owning (TR/16) x (TC/16) logits of a tile (US_SC_T in scores.cu).
BLOCK = (16, 16, 1)
#: NVRTC options of the kernel (the one place they are written).
OPTIONS: tuple[str, ...] = (f"-DUS_SC_TR={TR}", f"-DUS_SC_TC={TC}")
#: Version 3, float32 FMA (the shapes version 4 does not take).
KERNEL = KernelSpec(FILE, "us_scores_onepass", OPTIONS)
#: Version 4's operand split (fp16 hi/lo words in fragment order, one factor per row).
SPLIT_KERNEL = KernelSpec(FILE, "us_split_rows", OPTIONS)
#: Step 0 of both versions: the composite keys minus the mean of their first :data:`KREF` columns.
CENTER_KERNEL = KernelSpec(FILE, "us_center_keys", OPTIONS)
#: Columns whose mean is subtracted from every composite key (``US_KREF`` in scores.cu), and the
#: columns one thread block of ``us_center_keys`` writes (``US_KC_ROWS``).
KREF = 64
CENTER_ROWS = 256
#: fp16 parts per operand of version 4 (the template parameter P): 2 (the default: 22-bit
#: operands, three products per k-step) or 3 (fp32 inputs represented exactly, six products).
#: Two parts became the default once the keys are centred (:func:`center_keys`): on the H200
#: (2026-12-01, session 5) the largest error over the GPU cases of tests/test_cupy_scores.py was
#: 4.9e-7 with two parts and 3.1e-7 with three (before centring two parts reached 1.5e-6 on
#: structured D = 16 cases), and at 131072 tokens two parts take 9.0 ms against 11.7 ms.
DEFAULT_PARTS = 2
#: Warps per thread block built for each number of parts (16 rows per warp with three parts, 32 with two).
MMA_WARPS: dict[int, tuple[int, ...]] = {3: (8,), 2: (4, 8)}
#: Composite key columns per tile of version 4 (US_SM_TC in scores.cu).
MMA_TC = 64
#: Widest head dim (after padding to a multiple of 32) version 4 takes.
MMA_MAX_DP = 256


def mma_kernel(warps: int, variant: bool, parts: int = DEFAULT_PARTS) -> KernelSpec:
    """Version 4's instantiation ``us_scores_mma<warps, variant, parts>``."""
    return KernelSpec(FILE, f"us_scores_mma<{int(warps)}, {'true' if variant else 'false'}, {int(parts)}>", OPTIONS)


#: Every instantiation this stage launches.
INSTANTIATIONS: list[KernelSpec] = [KERNEL, SPLIT_KERNEL, CENTER_KERNEL] + [
    mma_kernel(w, v, p) for p in (3, 2) for v in (False, True) for w in MMA_WARPS[p]]
#: Registers per thread of ``us_scores_mma`` by parts (ptxas, sm_90a, rounded up to 8; at most 255
#: with __launch_bounds__(32*NW, 1)): the occupancy estimate of :func:`mma_launch_config`.
MMA_REGISTERS = {2: 248, 3: 248}
#: Shared memory per SM and per block reserved by the driver (Hopper and Ampere: 228 KiB, 1 KiB).
SM_SHARED_BYTES = 228 * 1024
BLOCK_RESERVED_SHARED = 1024
#: Most bytes of scratch one launch may hold; above it the launch is split into chunks of mask
#: heads (at least one head per chunk). At 131072 tokens with 32 heads it needs 1.1 GiB.
SCRATCH_BYTES = 2 * 1024**3


def launch_config(batch: int, mask_heads: int, R: int, config: UniSparseConfig, C: int | None = None,
                  scratch_bytes: int | None = None) -> dict[str, Any]:
    """Grid, block, shared memory and scratch of ``us_scores_onepass`` (pure Python, no GPU needed).

    One thread block per ``RG = max(TR, RB)`` composite rows (``NQ = RG / RB`` whole query
    blocks) of one mask head. Dynamic shared memory: the ``[TR, TC+1]`` exp tile, ``[TR, 16]``
    partial row maxima, ``[TR, NKS]`` piece sums, ``[TR]`` tile maxima, ``[TR]`` last visible
    columns (int32) and the running ``m_r``, ``l_r`` of ``RG`` rows (4 bytes each). Global
    float32 scratch per mask head: ``ntiles * R * NKS`` piece sums and ``ntiles * R`` tile
    maxima (``ntiles = ceil(C / TC)``, ``NKS = TC / min(KB, TC)``). When ``B * Hm`` heads of
    scratch exceed ``scratch_bytes`` (default :data:`SCRATCH_BYTES`, 2 GiB) the kernel is
    launched once per chunk of ``heads_per_chunk`` heads (grid y), reusing one buffer. A chunk
    holds at least one head, so one head's scratch alone may exceed the budget (with
    ``c_q = c_k = 1`` at 131072 tokens it is 5 GiB): rows are not chunked.

    Parameters
    ----------
    batch, mask_heads, R : int
        ``B``, ``Hm = Hq / c_h`` and the composite query count.
    config : UniSparseConfig
    C : int, optional
        Composite key count; defaults to ``R``.
    scratch_bytes : int, optional
        Scratch budget in bytes; defaults to :data:`SCRATCH_BYTES`.

    Returns
    -------
    dict with ``grid`` (one chunk), ``block``, ``shared_mem`` (bytes), ``ntiles``, ``NKS``,
    ``scratch_per_head`` (bytes), ``heads_per_chunk``, and the tile numbers ``TR``, ``TC``,
    ``RB``, ``KB``, ``RG``, ``NQ``.
    """
    RB, KB = config.block_size // config.c_q, config.block_size // config.c_k
    RG = max(TR, RB)
    NQ = RG // RB
    NKS = TC // min(KB, TC)
    C = R if C is None else int(C)
    budget = SCRATCH_BYTES if scratch_bytes is None else int(scratch_bytes)
    heads = batch * mask_heads
    ntiles = geometry.cdiv(C, TC)
    per_head = 4 * ntiles * R * (NKS + 1)
    chunk = max(1, min(heads, budget // max(1, per_head)))
    return {
        "grid": (geometry.cdiv(R, RG), chunk, 1),
        "block": BLOCK,
        "shared_mem": 4 * (TR * (TC + 1) + TR * BLOCK[0] + TR * NKS + 2 * TR + 2 * RG),
        "ntiles": ntiles, "NKS": NKS, "scratch_per_head": per_head, "heads_per_chunk": chunk,
        "TR": TR, "TC": TC, "RB": RB, "KB": KB, "RG": RG, "NQ": NQ,
    }


def center_config(segments: int, W: int, D: int) -> dict[str, Any]:
    """Grid and block of ``us_center_keys`` (pure Python, no GPU needed): one thread block per
    (segment, ``CENTER_ROWS`` columns, 32 head-dim entries), 32 x 8 threads; static shared
    memory only. ``segments`` = ``B * Hkv`` (batch) or ``batch * Hkv`` (packed), ``W`` the (longest)
    segment's columns."""
    return {"grid": (max(1, int(segments) * geometry.cdiv(max(int(W), 1), CENTER_ROWS)), geometry.cdiv(int(D), 32), 1),
            "block": (32, 8, 1), "shared_mem": 0}


def center_keys(k_c: Any, cu: np.ndarray | None = None, cu_device: Any = None) -> Any:
    """The composite keys minus one reference key per (sequence, KV head): a new float32 CuPy array.

    Step 0 of both scoring versions (``us_center_keys``; scores.cu's comment gives the argument):
    ``out[c] = k_c[c] - kbar`` with ``kbar`` the mean of the first ``min(W, KREF)`` columns. The
    scores are unchanged in exact arithmetic (a per-row shift of the logits), and the float32
    logits lose the keys' common component before any rounding.

    Parameters
    ----------
    k_c : cupy.ndarray
        float32, C-contiguous: ``[B, Hkv, W, D]``, or packed ``[total_c, Hkv, D]`` with ``cu``.
    cu : numpy integer array ``[nseq + 1]``, optional
        Composite-key offsets of the packed layout, on the host (``None``: the batch layout).
    cu_device : cupy.ndarray, optional
        int32 ``[nseq + 1]``: the same offsets on the device (uploaded here when not given).
    """
    cp = cupy_module()
    out = cp.empty(k_c.shape, dtype=cp.float32)
    if k_c.size == 0:
        return out
    if cu is None:
        B, Hkv, W, D = (int(s) for s in k_c.shape)
        segments = B * Hkv
    else:
        Hkv, D = int(k_c.shape[1]), int(k_c.shape[2])
        offs = np.asarray(cu, dtype=np.int64)
        W = int(np.diff(offs).max(initial=0))
        segments = (int(offs.size) - 1) * Hkv
        if cu_device is None:
            (cu_device,) = upload_int32(offs)
    lc = center_config(segments, W, D)
    _loader.launch(_loader.get_function(CENTER_KERNEL), lc["grid"], lc["block"],
                   (k_c, out, np.uint64(0) if cu is None else cu_device, i32(Hkv), i32(W), i32(D)),
                   shared_mem=lc["shared_mem"])
    return out


def _launch_v3(q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
    """``us_scores_onepass`` (version 3) over chunks of mask heads: float32 scores ``[B, Hm, nQb, nKb]``.

    ``q_c [B, Hm, R, D]`` and ``k_c [B, Hkv, C, D]`` are C-contiguous float32 CuPy arrays.
    """
    cp = cupy_module()
    B, Hm, R, D = (int(s) for s in q_c.shape)
    Hkv, C = int(k_c.shape[1]), int(k_c.shape[2])
    S, c_q, c_k, c_h = config.block_size, config.c_q, config.c_k, config.c_h
    G = Hm * c_h // Hkv
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    scale = np.float32(config.scale_for(D))
    causal = np.int32(1 if config.causal else 0)
    sizes = (i32(Hm), i32(Hkv), i32(R), i32(C), i32(D), i32(nq), i32(nk), i32(c_q), i32(c_k), i32(c_h), i32(G))
    scores = cp.zeros((B, Hm, nqb, nkb), dtype=cp.float32)  # blocks no row sees stay 0
    lc = launch_config(B, Hm, R, config, C)
    chunk = lc["heads_per_chunk"]
    part = cp.empty((chunk, lc["ntiles"], R, lc["NKS"]), dtype=cp.float32)  # piece sums e
    tmax = cp.empty((chunk, lc["ntiles"], R), dtype=cp.float32)             # tile maxima M, then weights w
    kernel = _loader.get_function(KERNEL)
    for bh0 in range(0, B * Hm, chunk):
        grid = (lc["grid"][0], min(chunk, B * Hm - bh0), 1)
        _loader.launch(kernel, grid, lc["block"], (q_c, k_c, scores, part, tmax, i32(bh0)) + sizes + (i32(S), causal, scale),
                       shared_mem=lc["shared_mem"])
    return scores


# ---------------------------------------------------------------------------- version 4
def mma_applicable(config: UniSparseConfig, D: int, shared_limit: int = 227 * 1024, parts: int | None = None) -> bool:
    """Whether version 4 with ``parts`` (default :data:`DEFAULT_PARTS`) takes this shape: whole
    query blocks in a work item (``block_size / c_q`` at most 128 rows with three parts, 256 with
    two), a head dim of at most :data:`MMA_MAX_DP` after padding to a multiple of 32, and the
    tiles within ``shared_limit`` bytes of shared memory (three parts: D <= 192)."""
    try:
        mma_launch_config(1, 1, 1, 1, D, config, shared_limit=shared_limit, parts=parts)
    except ValueError:
        return False
    return True


def row_bytes(Dp: int, parts: int) -> int:
    """Shared-memory bytes of one split row (``us_sm_row_bytes`` in scores.cu): ``2*parts*Dp``
    padded to a stride of 16 (two parts) or 64 (three parts) modulo 128, free of bank conflicts."""
    return 4 * Dp + 16 if parts == 2 else 6 * Dp + ((64 - (6 * Dp) % 128) & 127)


def split_layout(D: int, parts: int | None = None) -> tuple[int, int]:
    """``(Dp, P)`` of version 4's split operands: the head dim padded to whole 32-wide chunks
    (``Dp = 32 ceil(D / 32)``) and the fp16 parts per operand (default :data:`DEFAULT_PARTS`;
    ``ValueError`` unless 2 or 3). :func:`mma_launch_config` and :func:`packed_operands` share it."""
    P = DEFAULT_PARTS if parts is None else int(parts)
    if P not in MMA_WARPS:
        raise ValueError(f"parts must be 2 or 3, got {P}")
    return 32 * geometry.cdiv(int(D), 32), P


def mma_launch_config(batch: int, mask_heads: int, R: int, W: int, D: int, config: UniSparseConfig, *,
                      num_sms: int = 132, warps: int | None = None, stages: int | None = None,
                      variant: bool = False, shared_limit: int = 227 * 1024,
                      parts: int | None = None) -> dict[str, Any]:
    """Grid, block, shared memory and scratch of ``us_scores_mma`` (pure Python, no GPU needed).

    Work items of ``RG = rows_per_warp * warps`` composite rows of one mask head (16 rows per
    warp with three parts, 32 with two); a persistent grid of ``slots = min(items, num_sms *
    blocks_per_sm)`` thread blocks takes them from a counter. Dynamic shared memory (as laid out
    in ``scores.cu``): the Q tile ``RG`` rows and ``stages`` K tiles of ``TC`` rows, each row
    :func:`row_bytes` bytes (``Dp = 32 * ceil(D / 32)``), then the floats ``qf[RG]``,
    ``kf[stages][TC]``, ``kw[stages][TC]``, ``rm[RG]``, ``rl[RG]`` and 16 bytes for the item
    index. Scratch per slot, float32: ``ntiles * RG * NKS`` piece sums and ``ntiles * RG`` tile
    maxima (``ntiles = ceil(W / TC)``; ``NKS = TC / min(KB, TC)``, ``TC`` with the variants,
    whose pieces are single columns).

    Parameters
    ----------
    batch, mask_heads, R, W, D : int
        ``B``, ``Hm``, composite queries, key columns (``C``, or ``t + C`` with sink tokens), head dim.
    config : UniSparseConfig
    num_sms : int
        Streaming multiprocessors of the device.
    warps : int, optional
        Warps per block (one of ``MMA_WARPS[parts]``); default: the fewest whose work item holds
        a query block.
    stages : int, optional
        K tiles in flight (1 or 2); default 2 where it leaves room for the blocks per SM that
        the registers allow, else 1.
    variant : bool
        The research-variant instantiation (single-column pieces).
    shared_limit : int
        The device's opt-in shared memory per block.
    parts : int, optional
        fp16 parts per operand, 2 or 3; default :data:`DEFAULT_PARTS`.
    """
    Dp, parts = split_layout(D, parts)
    RB, KB = config.block_size // config.c_q, config.block_size // config.c_k
    per_warp = 16 if parts == 3 else 32
    if warps is None:
        fits = [w for w in MMA_WARPS[parts] if RB <= per_warp * w]
        warps = fits[0] if fits else MMA_WARPS[parts][-1]
    if warps not in MMA_WARPS[parts]:
        raise ValueError(f"warps must be one of {MMA_WARPS[parts]} with {parts} parts, got {warps}")
    RG, TCm = per_warp * warps, MMA_TC
    if RB > RG:
        raise ValueError(f"a query block of {RB} composite rows does not fit a work item of {RG} rows")
    if Dp > MMA_MAX_DP:
        raise ValueError(f"head dim {D} above version 4's {MMA_MAX_DP}")
    rowb = row_bytes(Dp, parts)

    def shared(st: int) -> int:
        return RG * rowb + st * TCm * rowb + 4 * (RG + 2 * st * TCm + 2 * RG) + 16

    threads = 32 * warps
    reg_blocks = max(1, 65536 // (threads * MMA_REGISTERS[parts]))

    def per_sm(st: int) -> int:
        return max(0, min(reg_blocks, SM_SHARED_BYTES // (shared(st) + BLOCK_RESERVED_SHARED)))

    if stages is None:
        stages = 2 if shared(2) <= shared_limit and per_sm(2) >= per_sm(1) else 1
    if stages not in (1, 2):
        raise ValueError(f"stages must be 1 or 2, got {stages}")
    if shared(stages) > shared_limit:
        raise ValueError(f"version 4 needs {shared(stages)} bytes of shared memory, the device allows {shared_limit}")
    KBe = 1 if variant else min(KB, TCm)
    NKS = TCm // KBe
    ntiles = geometry.cdiv(int(W), TCm)
    nitems = batch * mask_heads * geometry.cdiv(int(R), RG)
    slots = max(1, min(nitems, int(num_sms) * max(1, per_sm(stages))))
    return {
        "grid": (slots, 1, 1), "block": (threads, 1, 1), "shared_mem": shared(stages), "stages": stages,
        "warps": warps, "parts": parts, "RG": RG, "TC": TCm, "Dp": Dp, "row_bytes": rowb, "NKS": NKS,
        "ntiles": ntiles, "items": nitems, "slots": slots, "blocks_per_sm": per_sm(stages),
        "scratch_per_slot": 4 * ntiles * RG * (NKS + 1),
    }


_VARIANT_CACHE: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}


def variant_weights(config: UniSparseConfig, nq: int, nk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The research variants' log-weights in the form ``us_scores_mma<NW, true>`` reads (host, cached).

    The dense ``log_w [R, t + C]`` of
    :func:`unisparse_ref.reference.scores.variant_log_weights` equals, on every column a row can
    see, ``colw[j] + band[r, j - j0[r]]`` (the band term where ``0 <= j - j0[r] < NB``, else 0):
    ``colw`` is the log of the keys column ``j`` stands for (``sink_tokens > 0``; else 0), and the
    band holds the log of the diagonal correction's share for the columns of row ``r`` that are
    neither fully visible nor beyond its last visible column (``diagonal_correction`` with a
    causal mask; else ``NB = 0``). Sinks' visibility (``s <= p(last(r))``) and SPEC's composite
    rule are the kernel's.

    Returns
    -------
    colw : float32 ``[t + C]``
    j0 : int32 ``[R]``
    band : float32 ``[R, max(NB, 1)]``
    NB : int
    """
    key = (config.sink_tokens, config.diagonal_correction, config.causal, config.c_q, config.c_k,
           config.block_size, int(nq), int(nk))
    hit = _VARIANT_CACHE.get(key)
    if hit is not None:
        return hit
    t, c_q, c_k = config.sink_tokens, config.c_q, config.c_k
    R, C = geometry.cdiv(nq, c_q), geometry.cdiv(nk, c_k)
    W = t + C
    lo = np.concatenate([np.arange(t), np.arange(C) * c_k]).astype(np.int64)
    hi = np.concatenate([np.arange(t) + 1, np.minimum((np.arange(C) + 1) * c_k, nk)]).astype(np.int64)
    lo[t] = t
    hi = np.minimum(hi, nk)
    n = np.maximum(hi - lo, 0).astype(np.float64)
    with np.errstate(divide="ignore"):
        colw = np.log(n) if t > 0 else np.zeros(W)
    j0 = np.zeros(R, np.int64)
    NB = 0
    band = np.zeros((R, 1))
    if config.diagonal_correction and config.causal:
        first = np.arange(R) * c_q
        last = np.minimum((np.arange(R) + 1) * c_q, nq) - 1
        off = nk - nq
        # columns fully visible to every token of r: hi_j - 1 <= p(first(r)); hi is ascending
        j0 = np.searchsorted(hi - 1, first + off, side="right").astype(np.int64)
        last_comp = np.minimum(C - 1, (last + off) // c_k)
        jl = t + last_comp  # the last column SPEC's rule lets the row see
        NB = int(max(1, (jl - j0 + 1).max(initial=1)))
        cols = j0[:, None] + np.arange(NB)[None, :]  # [R, NB]
        inside = cols < W
        cc = np.minimum(cols, W - 1)
        toks = first[:, None] + np.arange(c_q)[None, :]  # [R, c_q]
        tok_ok = toks <= last[:, None]
        pos = toks + off
        per = np.clip(pos[:, :, None] - lo[cc][:, None, :] + 1, 0, n[cc][:, None, :])  # [R, c_q, NB]
        pairs = np.where(tok_ok[:, :, None], per, 0.0).sum(axis=1)
        cnt = tok_ok.sum(axis=1).astype(np.float64)
        share = pairs / (cnt[:, None] * np.where(n[cc] > 0, n[cc], 1.0))
        with np.errstate(divide="ignore"):
            band = np.where(inside & (share > 0), np.log(np.where(share > 0, share, 1.0)), -np.inf)
    out = (np.ascontiguousarray(colw, np.float32), np.ascontiguousarray(j0, np.int32),
           np.ascontiguousarray(band, np.float32), NB)
    if len(_VARIANT_CACHE) > 64:
        _VARIANT_CACHE.clear()
    _VARIANT_CACHE[key] = out
    return out


_SMS: dict[int, int] = {}
_VARIANT_DEVICE: dict[tuple[Any, ...], tuple[Any, Any, Any, int]] = {}


def _num_sms() -> int:
    """Streaming multiprocessors of the current device (cached: reading the attributes costs host time)."""
    cp = cupy_module()
    dev = cp.cuda.Device()
    n = _SMS.get(dev.id)
    if n is None:
        try:
            n = int(dev.attributes.get("MultiProcessorCount", 132))
        except Exception:  # noqa: BLE001 - a stand-in device without attributes
            n = 132
        _SMS[dev.id] = n
    return n


def _variant_device(config: UniSparseConfig, nq: int, nk: int) -> tuple[Any, Any, Any, int]:
    """:func:`variant_weights` on the device, cached per device and shape (no host copy inside a graph
    capture once a shape has run)."""
    cp = cupy_module()
    key = (cp.cuda.Device().id, config.sink_tokens, config.diagonal_correction, config.causal, config.c_q,
           config.c_k, config.block_size, int(nq), int(nk))
    hit = _VARIANT_DEVICE.get(key)
    if hit is None:
        colw, j0, band, NB = variant_weights(config, nq, nk)
        hit = (cp.asarray(colw), cp.asarray(j0), cp.asarray(band), NB)
        if len(_VARIANT_DEVICE) > 64:
            _VARIANT_DEVICE.clear()
        _VARIANT_DEVICE[key] = hit
    return hit


def _split(x: Any, D: int, Dp: int, parts: int) -> tuple[Any, Any]:
    """``us_split_rows`` of a float32 ``[..., D]`` CuPy array: (uint32 ``[rows, Dp*parts/2]`` words,
    float32 ``[rows]`` factors)."""
    cp = cupy_module()
    rows = int(np.prod(x.shape[:-1]))
    words = cp.empty((rows, Dp * parts // 2), dtype=cp.uint32)
    fac = cp.empty((rows,), dtype=cp.float32)
    _loader.launch(_loader.get_function(SPLIT_KERNEL), (geometry.cdiv(rows, 4), 1, 1), (128, 1, 1),
                   (x, words, fac, i32(rows), i32(D), i32(Dp), i32(parts)))
    return words, fac


def _mma_state(lc: dict[str, Any], config: UniSparseConfig, D: int) -> tuple[Any, Any, Any, np.float32]:
    """What every ``us_scores_mma`` launch needs besides its operands: the per-slot scratch
    ``part [slots, ntiles, RG, NKS]`` and ``tmax [slots, ntiles, RG]`` (float32), the zeroed work-item
    counter and ``scale * log2(e)``."""
    cp = cupy_module()
    slots, ntiles, RG = lc["slots"], lc["ntiles"], lc["RG"]
    part = cp.empty((slots, ntiles, RG, lc["NKS"]), dtype=cp.float32)
    tmax = cp.empty((slots, ntiles, RG), dtype=cp.float32)
    counter = cp.zeros((1,), dtype=cp.int32)
    return part, tmax, counter, np.float32(config.scale_for(D) * 1.4426950408889634)


def launch_scores(q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int, *, version: int | None = None,
                  warps: int | None = None, stages: int | None = None, parts: int | None = None) -> Any:
    """Block scores, float32 ``[B, Hm, nQb, nKb]``: version 4 where it applies, else version 3.

    ``q_c [B, Hm, R, D]`` and ``k_c [B, Hkv, W, D]`` are C-contiguous float32 CuPy arrays
    (``W = C``, or ``sink_tokens + C`` with that research variant). Version 4 runs with
    ``DEFAULT_PARTS`` parts where ``mma_applicable``; otherwise the SPEC computation runs
    on version 3, and the research variants on version 4 with two parts (or raise
    ``NotImplementedError`` where neither applies). ``version``, ``warps``, ``stages`` and
    ``parts`` force a kernel and its configuration (benchmarks and tests).
    """
    cp = cupy_module()
    B, Hm, R, D = (int(s) for s in q_c.shape)
    Hkv, W = int(k_c.shape[1]), int(k_c.shape[2])
    variant = config.sink_tokens > 0 or config.diagonal_correction
    limit = _loader.max_dynamic_shared_memory()
    if version is None:
        version = 4
        if parts is None and not mma_applicable(config, D, limit):
            if not variant:
                version = 3
            elif mma_applicable(config, D, limit, parts=2):
                parts = 2
            else:
                raise NotImplementedError(
                    "cupy backend block_scores: the research variants run on scores version 4 only, which needs "
                    f"block_size / c_q <= 256 and a head dim <= {MMA_MAX_DP} (got "
                    f"{config.block_size // config.c_q} rows per query block, D = {D})")
    if version == 3:
        if variant:
            raise NotImplementedError("cupy backend block_scores: scores version 3 does not compute the research "
                                      "variants sink_tokens / diagonal_correction")
        return _launch_v3(q_c, center_keys(k_c), config, nq, nk)
    if version != 4:
        raise ValueError(f"version must be 3 or 4, got {version}")
    S, c_q, c_k, c_h = config.block_size, config.c_q, config.c_k, config.c_h
    if W != config.sink_tokens + geometry.cdiv(nk, c_k):
        raise ValueError(f"k_c has {W} key columns; with sink_tokens={config.sink_tokens} and nk={nk} it must have "
                         f"{config.sink_tokens} + ceil(nk/c_k) = {config.sink_tokens + geometry.cdiv(nk, c_k)} "
                         "(compress with the same config)")
    G = Hm * c_h // Hkv
    lc = mma_launch_config(B, Hm, R, W, D, config, num_sms=_num_sms(), warps=warps, stages=stages,
                           variant=variant, shared_limit=limit, parts=parts)
    Dp, P = lc["Dp"], lc["parts"]
    qw, qf = _split(q_c, D, Dp, P)
    kw, kf = _split(center_keys(k_c), D, Dp, P)
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    scores = cp.zeros((B, Hm, nqb, nkb), dtype=cp.float32)  # blocks no row sees stay 0
    part, tmax, counter, scale_log2 = _mma_state(lc, config, D)
    if variant:
        colw, j0, band, NB = _variant_device(config, nq, nk)
        extra = (colw, j0, band, i32(NB))
    else:
        extra = (np.uint64(0), np.uint64(0), np.uint64(0), i32(0))
    args = (qw, qf, kw, kf, scores, part, tmax, counter, i32(B * Hm), i32(Hm), i32(Hkv), i32(R), i32(W), i32(Dp),
            i32(nq), i32(nk), i32(c_q), i32(c_k), i32(c_h), i32(G), i32(S), i32(1 if config.causal else 0),
            scale_log2, i32(lc["stages"]), i32(lc["ntiles"]), i32(config.sink_tokens)) + extra + _BATCH_MODE
    _loader.launch(_loader.get_function(mma_kernel(lc["warps"], variant, P)), lc["grid"], lc["block"], args,
                   shared_mem=lc["shared_mem"])
    return scores


# ---------------------------------------------------------------------------- version 4, packed batches
#: The packed-mode arguments of a batch launch: no descriptor table, no work list (null pointers).
_BATCH_MODE = (np.uint64(0), np.uint64(0), i32(0), i32(0), i32(0))
#: Integers per sequence in the descriptor table: R_i, W_i = C_i, N_q,i, N_k,i, cu_r[i], cu_c[i], cu_qb[i], 0.
DESC_INTS = 8


def packed_applicable(config: UniSparseConfig, D: int, shared_limit: int = 227 * 1024) -> bool:
    """Whether a packed batch is scored in one launch (:func:`launch_scores_packed`): the SPEC
    computation (no research variant) on a shape version 4 takes with ``DEFAULT_PARTS`` parts."""
    return not (config.sink_tokens > 0 or config.diagonal_correction) and mma_applicable(config, D, shared_limit)


def packed_launch_config(cu_seqlens_q: Any, cu_seqlens_k: Any, mask_heads: int, D: int, config: UniSparseConfig, *,
                         num_sms: int = 132, warps: int | None = None, stages: int | None = None,
                         shared_limit: int = 227 * 1024, parts: int | None = None) -> dict[str, Any]:
    """Grid, block, shared memory, scratch, descriptor table and work list of ``us_scores_mma`` in
    its packed mode (pure Python, no GPU needed).

    The tile numbers, shared memory and blocks per SM are ``mma_launch_config``'s (they do not
    depend on the lengths). Sequence ``i`` (``N_q,i = cu_seqlens_q[i+1] - cu_seqlens_q[i]``, likewise
    ``N_k,i``) has ``R_i = ceil(N_q,i / c_q)`` composite queries, ``C_i = ceil(N_k,i / c_k)`` composite
    keys and ``nQb_i = ceil(N_q,i / S)`` score rows. The descriptor table ``desc`` (int32 ``[nseq, 8]``)
    holds ``{R_i, C_i, N_q,i, N_k,i, cu_r[i], cu_c[i], cu_qb[i], 0}``; the work list ``work`` (int32
    ``[nwork, 2]``) one ``(i, x)`` per row tile ``x < ceil(R_i / RG)`` of every sequence, sorted by
    the column tiles its last row walks (``geometry.last_visible_composite_keys`` of row
    ``min((x+1) RG, R_i) - 1``, ``// TC + 1``), most first,
    across the sequences (ties: sequence ascending, then ``x`` descending). Items: ``nwork * Hm``
    (item ``e * Hm + g``: entry ``e``, mask head ``g``); slots ``min(items, num_sms * blocks_per_sm)``;
    scratch per slot for the widest sequence (``ntiles = ceil(max_i C_i / TC)``). Output
    ``[Hm, total_qb, width]`` with ``width = max(1, max_i nKb_i)`` (the packed layout's ``W``).

    Parameters
    ----------
    cu_seqlens_q, cu_seqlens_k : integer arrays ``[nseq + 1]`` (host)
    mask_heads, D : int
        ``Hm = Hq / c_h`` and the head dim.
    config : UniSparseConfig
        The SPEC computation (no research variant).
    num_sms, warps, stages, shared_limit, parts
        As ``mma_launch_config``.

    Returns
    -------
    dict with ``mma_launch_config``'s keys (``items``, ``slots``, ``ntiles`` of the packed
    launch) plus ``desc``, ``work``, ``nwork``, ``total_qb``, ``width``, ``cu_r``, ``cu_c``, ``cu_qb``.
    """
    cu_q = np.asarray(cu_seqlens_q, dtype=np.int64).reshape(-1)
    cu_k = np.asarray(cu_seqlens_k, dtype=np.int64).reshape(-1)
    S = config.block_size
    cu_r, cu_c, cu_qb = packed_offsets(cu_q, config.c_q), packed_offsets(cu_k, config.c_k), packed_offsets(cu_q, S)
    nq, nk = np.diff(cu_q), np.diff(cu_k)
    R, C = np.diff(cu_r), np.diff(cu_c)
    Cmax = int(C.max(initial=0))
    lc = mma_launch_config(1, mask_heads, 1, max(1, Cmax), D, config, num_sms=num_sms, warps=warps, stages=stages,
                           shared_limit=shared_limit, parts=parts)
    RG, TCm = lc["RG"], lc["TC"]
    nseq = int(nq.size)
    desc = np.zeros((nseq, DESC_INTS), np.int32)
    if nseq:
        desc[:, :7] = np.stack([R, C, nq, nk, cu_r[:-1], cu_c[:-1], cu_qb[:-1]], axis=1)
    # Per row tile (all sequences at once): its sequence, x, and the column tiles its last row walks.
    nt = -(-R // RG)
    seqs = np.repeat(np.arange(nseq, dtype=np.int64), nt)
    tiles = np.arange(seqs.size, dtype=np.int64) - np.repeat(np.cumsum(nt) - nt, nt)
    last_row = np.minimum((tiles + 1) * RG, R[seqs]) - 1
    last = geometry.last_visible_composite_key_of_rows(last_row, nq[seqs], nk[seqs], config.c_q, config.c_k,
                                                       config.causal)
    walks = last // TCm + 1
    order = np.lexsort((-tiles, seqs, -walks))  # longest first, then sequence ascending, x descending
    work = np.stack([seqs[order], tiles[order]], axis=1).astype(np.int32).reshape(-1, 2)
    nwork = int(work.shape[0])
    items = nwork * int(mask_heads)
    slots = max(1, min(items, int(num_sms) * max(1, lc["blocks_per_sm"])))
    ntiles = geometry.cdiv(max(1, Cmax), TCm)
    width = max(1, int((-(-nk // S)).max(initial=0)))  # the most key blocks of a sequence
    lc.update({"grid": (slots, 1, 1), "items": items, "slots": slots, "ntiles": ntiles,
               "scratch_per_slot": 4 * ntiles * RG * (lc["NKS"] + 1), "desc": desc, "work": work, "nwork": nwork,
               "total_qb": int(cu_qb[-1]), "width": width, "cu_r": cu_r, "cu_c": cu_c, "cu_qb": cu_qb})
    return lc


def device_packed_launch_config(cu_seqlens_q: Any, cu_seqlens_k: Any, mask_heads: int, D: int,
                                config: UniSparseConfig, *, warps: int | None = None, stages: int | None = None,
                                parts: int | None = None) -> dict[str, Any]:
    """:func:`packed_launch_config` for the current device (its SM count and shared-memory limit):
    the configuration :func:`launch_scores_packed` launches."""
    return packed_launch_config(cu_seqlens_q, cu_seqlens_k, mask_heads, D, config, num_sms=_num_sms(), warps=warps,
                                stages=stages, shared_limit=_loader.max_dynamic_shared_memory(), parts=parts)


def packed_operands(q_c: Any, k_c: Any, cu_c: np.ndarray, cu_c_device: Any, D: int,
                    parts: int | None = None) -> tuple[Any, Any, Any, Any]:
    """The operands of the packed ``us_scores_mma`` launch, queued: the keys centred per (sequence,
    KV head) (:func:`center_keys` with the composite-key offsets ``cu_c``, host, and their int32
    device copy), then ``us_split_rows`` of the queries and of the centred keys as they lie.
    Returns ``(qw, qf, kw, kf)`` for :func:`launch_scores_packed`'s ``operands``; needs no work
    list, so the queued packed pipeline launches it before building one (``Dp`` and ``parts``:
    :func:`split_layout`, as :func:`mma_launch_config` takes them)."""
    Dp, P = split_layout(D, parts)
    qw, qf = _split(q_c, D, Dp, P)
    kw, kf = _split(center_keys(k_c, cu=cu_c, cu_device=cu_c_device), D, Dp, P)
    return qw, qf, kw, kf


def packed_host_tables(lc: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host tables the packed launch reads, in :func:`launch_scores_packed`'s ``device_tables``
    order: the descriptor table, the work list and the composite-key offsets of
    :func:`packed_launch_config`'s ``lc``."""
    return lc["desc"], lc["work"], lc["cu_c"]


def launch_scores_packed(q_c: Any, k_c: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, config: UniSparseConfig, *,
                         warps: int | None = None, stages: int | None = None, parts: int | None = None,
                         lc: dict[str, Any] | None = None, device_tables: tuple[Any, ...] | None = None,
                         operands: tuple[Any, Any, Any, Any] | None = None) -> Any:
    """Block scores of every sequence of a packed batch in one launch: float32 ``[Hm, total_qb, W]``.

    ``q_c [total_r, Hm, D]`` and ``k_c [total_c, Hkv, D]`` are C-contiguous float32 CuPy arrays
    (offsets ``packed_offsets(cu_seqlens_q, c_q)`` and ``packed_offsets(cu_seqlens_k, c_k)``);
    ``cu_seqlens_*`` are checked host arrays. Steps: :func:`center_keys` on the packed keys (one
    ``kbar`` per sequence and KV head), ``us_split_rows`` on the packed rows as they lie (rows are
    (composite index, head) pairs: no copy), then ONE launch of ``us_scores_mma`` in its packed mode
    with the descriptor table and work list of :func:`packed_launch_config` (uploaded in one copy).
    Row ``cu_qb[i] + qi`` is query block ``qi`` of sequence ``i``; entries past ``nKb_i`` are zero.
    Each sequence's rows are bit for bit :func:`launch_scores` on that sequence's composite tokens
    (``[1, Hm, R_i, D]``, ``[1, Hkv, C_i, D]``) with the same ``parts``. The SPEC computation only
    (:func:`packed_applicable`); ``warps``, ``stages``, ``parts`` force a configuration (tests).
    ``lc`` and ``device_tables``: :func:`packed_launch_config`'s result for these offsets and the
    device copies of its ``packed_host_tables`` (int32), when the caller (the queued packed
    pipeline) prepared and uploaded them ahead; otherwise both are made here (one
    ``_device.upload_int32``). ``operands``: those of
    ``packed_operands`` already queued (with ``lc``'s parts), else queued here.
    """
    cp = cupy_module()
    if config.sink_tokens > 0 or config.diagonal_correction:
        raise NotImplementedError("launch_scores_packed: the research variants are scored per sequence "
                                  "(launch_scores on each sequence)")
    Hm, D = int(q_c.shape[1]), int(q_c.shape[2])
    Hkv = int(k_c.shape[1])
    G = Hm * config.c_h // Hkv
    if lc is None:
        lc = device_packed_launch_config(cu_seqlens_q, cu_seqlens_k, Hm, D, config, warps=warps, stages=stages,
                                         parts=parts)
    if int(q_c.shape[0]) != int(lc["cu_r"][-1]) or int(k_c.shape[0]) != int(lc["cu_c"][-1]):
        raise ValueError(f"q_c has {int(q_c.shape[0])} composite queries and k_c {int(k_c.shape[0])} composite keys; "
                         f"the offsets need {int(lc['cu_r'][-1])} and {int(lc['cu_c'][-1])}")
    scores = cp.zeros((Hm, lc["total_qb"], lc["width"]), dtype=cp.float32)  # entries past nKb_i stay 0
    if lc["nwork"] == 0:
        return scores
    Dp, P = lc["Dp"], lc["parts"]
    desc_d, work_d, cu_c_d = device_tables if device_tables is not None else upload_int32(*packed_host_tables(lc))
    if operands is None:
        operands = packed_operands(q_c, k_c, lc["cu_c"], cu_c_d, D, P)
    qw, qf, kw, kf = operands
    if tuple(qw.shape) != (int(q_c.shape[0]) * Hm, Dp * P // 2) or tuple(kw.shape) != (int(k_c.shape[0]) * Hkv,
                                                                                     Dp * P // 2):
        raise ValueError(f"operands of {tuple(qw.shape)} and {tuple(kw.shape)} words do not match the launch's "
                         f"Dp = {Dp}, parts = {P}")
    part, tmax, counter, scale_log2 = _mma_state(lc, config, D)
    S = config.block_size
    args = (qw, qf, kw, kf, scores, part, tmax, counter, i32(Hm), i32(Hm), i32(Hkv), i32(0), i32(0), i32(Dp),
            i32(0), i32(0), i32(config.c_q), i32(config.c_k), i32(config.c_h), i32(G), i32(S),
            i32(1 if config.causal else 0), scale_log2, i32(lc["stages"]), i32(lc["ntiles"]), i32(0),
            np.uint64(0), np.uint64(0), np.uint64(0), i32(0),
            desc_d, work_d, i32(lc["nwork"]), i32(lc["total_qb"]), i32(lc["width"]))
    _loader.launch(_loader.get_function(mma_kernel(lc["warps"], False, P)), lc["grid"], lc["block"], args,
                   shared_mem=lc["shared_mem"])
    return scores
