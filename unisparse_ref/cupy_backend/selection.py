"""Stage 3 on the GPU: top-P block selection (SPEC 5) with ``raw_kernels/selection.cu``.

``us_select_topp<float|double>``: one thread block per mask row ``(b, g, i)``, whatever
``nKb``; the visible candidate blocks are sorted by score in shared memory (bitonic sort of
64-bit keys, ties by lower block index), the running masses are a block-wide float64 scan, and
a row whose decisive mass lies within a rounding bound of the threshold is walked again by one
thread in the reference's order of additions: the mask equals the reference's bit for bit on
the same scores (the head of ``selection.cu`` gives the argument). Both threshold modes:
``"total"`` (SPEC) and ``"remaining"`` (issue 15's research variant). It can also write
FlexAttention's index form (``kv_counts``, ascending ``kv_indices`` padded with -1), which the
attention reads.
``us_mask_to_indices`` writes that index form for any bool mask (a user's BlockMask).
The same ``us_select_topp`` also reads the packed scores of a ragged batch (issue 16) in one
launch: a per-query-block row table (:func:`packed_row_table`) gives each row its sequence's
geometry, and the kernel writes the packed index form directly (:func:`launch_select_packed`).

Here: the instantiations (:data:`INSTANTIATIONS`, NVRTC options :data:`OPTIONS`), the launch
configurations (:func:`launch_config`, :func:`mask_to_indices_config`) and the launches
(:func:`launch_select`, :func:`launch_select_packed`, :func:`launch_mask_to_indices`).
Imports without CuPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import UniSparseConfig
from . import _loader
from ._device import cupy_module, i32, upload_int32
from ._loader import KernelSpec

__all__ = ["FILE", "INSTANTIATIONS", "MASK_TO_INDICES", "EMAX", "OPTIONS", "THREADS", "THRESHOLD_MODES", "launch_config",
           "launch_mask_to_indices", "launch_select", "launch_select_packed", "mask_to_indices_config",
           "packed_row_table", "select_spec"]

FILE = "selection.cu"
#: Most threads per block (``US_SEL_THREADS`` in selection.cu); :func:`launch_config` uses
#: fewer for short rows.
THREADS = 256
#: Candidate scores per thread held in registers by the kernel's fast path (``US_SEL_EMAX``).
EMAX = 32
#: ``UniSparseConfig.threshold_mode`` -> the kernel's ``threshold_mode`` argument.
THRESHOLD_MODES: dict[str, int] = {"total": 0, "remaining": 1}
#: NVRTC options of every instantiation of this stage (the one place they are written).
#: ``--maxrregcount=255``: without it NVRTC's ptxas holds ``us_select_topp<float>`` to 80
#: registers and spills 68 B of the fast path's candidate array (sm_90, EMAX = 32); with it the
#: kernel takes 103 registers and spills nothing (``make test-nvrtc`` checks "no spills").
OPTIONS: tuple[str, ...] = (f"-DUS_SEL_THREADS={THREADS}", f"-DUS_SEL_EMAX={EMAX}", "--maxrregcount=255")


def select_spec(ctype: str) -> KernelSpec:
    """``us_select_topp<ctype>`` for scores of C++ type ``ctype`` (``float`` or ``double``)."""
    return KernelSpec(FILE, f"us_select_topp<{ctype}>", OPTIONS)


MASK_TO_INDICES = KernelSpec(FILE, "us_mask_to_indices", OPTIONS)
#: Every instantiation this stage launches.
INSTANTIATIONS: list[KernelSpec] = [select_spec("float"), select_spec("double"), MASK_TO_INDICES]


def _threads(np2: int, per_thread: int = 4) -> int:
    """Threads for a row of ``np2`` slots, ``per_thread`` slots each: at least one warp, at most
    :data:`THREADS`; always a multiple of 32."""
    return min(THREADS, max(32, np2 // per_thread))


def launch_config(rows: int, nkb: int, score_itemsize: int) -> dict[str, Any]:
    """``us_select_topp``: one block per mask row; shared memory for the sort keys and the flags.

    Dynamic shared memory holds ``NP`` sort keys (8 bytes for float32 scores: score bits and
    block id in one word; 16 bytes for float64: the bits and the id) and ``nKb`` keep flags
    (one byte each), ``NP`` the next power of two >= ``nKb``. Threads: float32 scores with
    ``NP <= EMAX * THREADS`` take the kernel's register fast path, ``NP / EMAX`` threads
    (``EMAX`` candidates each); otherwise the sort, ``NP / 4`` threads; clamped to
    ``[32, THREADS]``.
    """
    np2 = 1 << max(0, (nkb - 1).bit_length())
    key_bytes = 8 if score_itemsize == 4 else 16
    # float32 scores up to EMAX * THREADS blocks a row: the register fast path, EMAX per thread;
    # otherwise the sort, NP / 4 threads (two compare-exchanges per thread and stage).
    fast = score_itemsize == 4 and np2 <= EMAX * THREADS
    threads = _threads(np2, EMAX if fast else 4)
    return {"grid": (rows, 1, 1), "block": (threads, 1, 1), "shared_mem": np2 * key_bytes + nkb}


def mask_to_indices_config(rows: int, nkb: int) -> dict[str, Any]:
    """``us_mask_to_indices``: one block per mask row; ``nKb`` one-byte flags in shared memory."""
    np2 = 1 << max(0, (nkb - 1).bit_length())
    return {"grid": (rows, 1, 1), "block": (_threads(np2), 1, 1), "shared_mem": nkb}


def launch_select(scores: Any, config: UniSparseConfig, nq: int, nk: int, with_indices: bool) -> tuple[Any, ...]:
    """``us_select_topp<T>``: mask (and, ``with_indices``, kv_counts and kv_indices) from scores.

    ``scores`` is a C-contiguous float32 or float64 CuPy array ``[B, Hm, nQb, nKb]``;
    ``config.threshold_mode`` may be ``"total"`` (SPEC) or ``"remaining"``.

    Returns
    -------
    mask : cupy bool ``[B, Hm, nQb, nKb]``
    kv_counts : cupy int32 ``[B, Hm, nQb]`` or None
    kv_indices : cupy int32 ``[B, Hm, nQb, nKb]`` or None
    """
    cp = cupy_module()
    B, Hm, nqb, nkb = (int(s) for s in scores.shape)
    mask = cp.empty((B, Hm, nqb, nkb), dtype=cp.bool_)
    if with_indices:
        counts = cp.empty((B, Hm, nqb), dtype=cp.int32)
        indices = cp.empty((B, Hm, nqb, nkb), dtype=cp.int32)
        cptr, iptr = counts, indices
    else:
        counts = indices = None
        cptr = iptr = np.uintp(0)  # null pointers: the kernel skips the index form
    _launch_topp(scores, mask, cptr, iptr, np.uintp(0), B * Hm * nqb, nqb, nkb, nq, nk, config)
    return mask, counts, indices


def _launch_topp(scores: Any, mask: Any, counts: Any, indices: Any, geom: Any, rows: int, nqb: int, nkb: int,
                 nq: int, nk: int, config: UniSparseConfig) -> None:
    """One launch of ``us_select_topp<T>`` (T from ``scores.dtype``) over ``rows`` rows of
    stride ``nkb``; ``geom`` the packed row table or a null pointer (the batch layout)."""
    cp = cupy_module()
    ctype = "double" if scores.dtype == cp.float64 else "float"
    lc = launch_config(rows, nkb, scores.dtype.itemsize)
    _loader.launch(
        _loader.get_function(select_spec(ctype)), lc["grid"], lc["block"],
        (scores, mask, counts, indices, geom, i32(nqb), i32(nkb), i32(nq), i32(nk), i32(config.block_size),
         i32(config.n_sink_blocks), i32(config.n_local_blocks), np.int32(1 if config.causal else 0),
         np.float64(config.threshold), np.int32(THRESHOLD_MODES[config.threshold_mode])),
        shared_mem=lc["shared_mem"],
    )


def packed_row_table(cu_seqlens_q: np.ndarray, cu_seqlens_k: np.ndarray, block_size: int) -> np.ndarray:
    """The packed selection's row table, int32 ``[total_qb, 4]`` (host, NumPy).

    Row ``qb`` of the packed scores (query block ``i`` of sequence ``b``) holds
    ``(i, N_q,b, N_k,b, nKb_b)``, ``nKb_b = ceil(N_k,b / S)``; sequences without queries have no
    row. ``cu_seqlens_q`` and ``cu_seqlens_k`` are checked offsets ``[batch + 1]``.
    """
    nq = np.diff(np.asarray(cu_seqlens_q, dtype=np.int64))
    nk = np.diff(np.asarray(cu_seqlens_k, dtype=np.int64))
    S = int(block_size)
    nqb = -(-nq // S)
    seq = np.repeat(np.arange(nq.size), nqb)  # the sequence of every packed query block
    first = np.repeat(np.cumsum(nqb) - nqb, nqb)  # its sequence's first packed query block
    table = np.stack([np.arange(seq.size) - first, nq[seq], nk[seq], -(-nk[seq] // S)], axis=1)
    return np.ascontiguousarray(table, dtype=np.int32).reshape(-1, 4)


def launch_select_packed(scores: Any, table: np.ndarray, config: UniSparseConfig, *,
                         device_table: Any = None) -> tuple[Any, Any]:
    """``us_select_topp<T>`` in the packed layout: one launch over every sequence's rows.

    ``scores`` is a C-contiguous float32 or float64 CuPy array ``[Hm, total_qb, W]`` (row
    ``g * total_qb + qb``), ``table`` the host row table of :func:`packed_row_table` (uploaded
    here; every ``nKb_b <= W``). Same launch configuration as the batch layout with
    ``nKb = W``; no bool mask. ``config.threshold_mode`` may be ``"total"`` or ``"remaining"``.
    ``device_table``: the table already on the device (int32, from
    ``_device.upload_int32``), else it is uploaded here.

    Returns
    -------
    kv_counts : cupy int32 ``[Hm, total_qb]``
    kv_indices : cupy int32 ``[Hm, total_qb, W]`` (ascending, local to the sequence, -1 padded)
    """
    cp = cupy_module()
    Hm, total_qb, W = (int(s) for s in scores.shape)
    table = np.asarray(table)
    if table.dtype != np.int32 or table.shape != (total_qb, 4) or (total_qb and int(table[:, 3].max()) > W):
        raise ValueError(f"the row table must be int32 [total_qb={total_qb}, 4] with every nKb_b <= W={W}, got "
                         f"{table.dtype} {table.shape}")
    counts = cp.empty((Hm, total_qb), dtype=cp.int32)
    indices = cp.empty((Hm, total_qb, W), dtype=cp.int32)
    if Hm * total_qb:
        if device_table is None:
            (device_table,) = upload_int32(table)
        _launch_topp(scores, np.uintp(0), counts, indices, device_table, Hm * total_qb, total_qb, W, 0, 0, config)
    return counts, indices


def launch_mask_to_indices(mask: Any) -> tuple[Any, Any]:
    """``us_mask_to_indices``: FlexAttention index form of a C-contiguous CuPy bool mask ``[B, Hm, nQb, nKb]``."""
    cp = cupy_module()
    B, Hm, nqb, nkb = (int(s) for s in mask.shape)
    counts = cp.empty((B, Hm, nqb), dtype=cp.int32)
    indices = cp.empty((B, Hm, nqb, nkb), dtype=cp.int32)
    lc = mask_to_indices_config(B * Hm * nqb, nkb)
    _loader.launch(_loader.get_function(MASK_TO_INDICES), lc["grid"], lc["block"], (mask, counts, indices, i32(nkb)),
                   shared_mem=lc["shared_mem"])
    return counts, indices
