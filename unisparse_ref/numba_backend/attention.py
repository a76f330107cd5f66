"""Stage 4 of the Numba layer: block-sparse attention forward, the FlashAttention-2 way (SPEC section 6).

:func:`block_sparse_attention` is the stage (the backend's ``block_sparse_attention`` calls it
on device arrays and a checked :class:`~unisparse_ref.BlockMask`; :func:`dense_attention` is
the same with every visible block): it turns the mask into its index form, and
:func:`attend` launches the kernel.

One thread block per ``(b, h, query tile)``: a tile is ``Br`` consecutive query rows, and
``Br`` divides the block size ``S``, so a query block ``i`` of ``S`` rows is covered by
``S / Br`` tiles (one tile when ``Br = S``), all reading the same row
``kv_indices[b, h // c_h, i, :kv_counts[b, h // c_h, i]]`` of the block mask in index form.
For each selected key block ``j`` the kernel walks its ``S`` keys in tiles of ``Bc``; K and V
tiles are staged in shared memory (in the input dtype), and the online softmax of
:mod:`unisparse_ref.reference.tiled` keeps per row

.. code-block:: text

    m_i (running max), l_i (running sum of exp(S - m_i)), O_i (running sum of exp(S - m_i) V)
    S_ij = scale * Q_i K_j^T, -inf where s > p(t) = t + Nk - Nq (causal) or past Nk
    m_new = max(m_i, rowmax(S_ij)),  P_ij = exp(S_ij - m_new),  alpha = exp(m_i - m_new)
    l_i = alpha * l_i + rowsum(P_ij),  O_i = alpha * O_i + P_ij V_j,  m_i = m_new
    out = O_i / l_i,  lse = m_i + log(l_i)            (l_i = 0: out 0, lse -inf)

Thread layout: ``TPR`` consecutive threads share a query row; thread ``lane`` of a row owns
the tile columns ``c = lane + TPR*k`` of ``S_ij``/``P_ij`` and the output dims
``d = lane + TPR*k`` of ``O_i`` (float32 registers). Row maxima and sums are combined across
the ``TPR`` threads through shared memory in a fixed order, so results are bit-reproducible.
``P_ij`` is rounded to the input dtype before the product with ``V`` (as tensor-core kernels
do, and as the reference's low-precision mode assumes); everything else accumulates in
float32. GQA: query head ``h`` reads KV head ``h // G``. Dense attention is this kernel
with every visible block selected.

Shared memory is static (at most 48 KiB per block, no opt-in needed); :func:`choose_tiles`
picks ``Br x Bc`` for the head dimension and dtype. Rows are padded by 4 bytes so that the
threads of a warp, which read different rows of the same column, hit different banks.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba import types as nbtypes
from numpy import float32  # a conversion in kernels; cheaper than numba.float32 in the simulator

from ..blockmask import BlockMask
from ..geometry import cdiv
from ._simulator import SIMULATOR, simulator_launch

#: Largest head dimension the kernel accepts (tiles must fit the static shared memory).
MAX_HEAD_DIM = 256
#: Static shared memory available to one block without opt-in (bytes).
SHARED_BUDGET = 48 * 1024
#: Output dims owned by one thread at most (float32 registers of O_i).
MAX_DIMS_PER_THREAD = 32
#: Threads per block at most (the launch bounds ask for two resident blocks per SM).
MAX_THREADS = 256
#: Tile columns owned by one thread at most (float32 registers of S_ij).
MAX_COLUMNS_PER_THREAD = 16
#: Thread blocks per SM the compiler is asked to fit (registers <= 64K / (2 * threads)).
MIN_BLOCKS_PER_SM = 2
#: Candidate (Br, Bc) tiles, largest first.
_TILE_CANDIDATES = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16), (16, 8))

_STORAGE = {np.dtype(np.float16): nbtypes.float16, np.dtype(np.float32): nbtypes.float32}


def shared_bytes(br: int, bc: int, d: int, tpr: int, itemsize: int) -> int:
    """Shared memory of one block: Q, K, V and P tiles (input dtype, padded) and row partials."""
    pad = 4 // itemsize
    return (br * (d + pad) + 2 * bc * (d + pad) + br * (bc + pad)) * itemsize + 2 * br * tpr * 4


def threads_per_row(d: int) -> int:
    """``TPR``: threads sharing a query row, a power of two, so that each owns at most 32 output dims."""
    tpr = 2
    while tpr * MAX_DIMS_PER_THREAD < d:
        tpr *= 2
    return tpr


def choose_tiles(d: int, dtype: np.dtype, block_size: int) -> tuple[int, int, int]:
    """``(Br, Bc, TPR)`` for head dim ``d``, input ``dtype`` and mask block size ``S``.

    ``Br`` and ``Bc`` are powers of two at most ``S`` (so they divide it), and the tiles fit
    :data:`SHARED_BUDGET`.

    Raises
    ------
    ValueError
        For ``d > 256`` (the head dims of current models are 64 to 256).
    """
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the numba attention kernel supports head dims up to {MAX_HEAD_DIM}, got D={d}")
    itemsize = np.dtype(dtype).itemsize
    tpr = threads_per_row(d)
    for br, bc in _TILE_CANDIDATES:
        br, bc = min(br, block_size), min(bc, block_size)
        fits = shared_bytes(br, bc, d, tpr, itemsize) <= SHARED_BUDGET
        if tpr <= bc <= tpr * MAX_COLUMNS_PER_THREAD and br * tpr <= MAX_THREADS and fits:
            return br, bc, tpr
    raise ValueError(f"no tile fits {SHARED_BUDGET} bytes of shared memory for D={d}, dtype {dtype}")


def launch_geometry(B: int, Hq: int, nq: int, br: int, tpr: int) -> tuple[tuple[int, int, int], int]:
    """``(grid, block)``: one block of ``Br * TPR`` threads per query tile ``(tile, h, b)``."""
    return (cdiv(nq, br), Hq, B), br * tpr


_KERNELS: dict[tuple, object] = {}


def get_kernel(d: int, br: int, bc: int, tpr: int, dtype: np.dtype):
    """The kernel specialised (compile-time tile shapes) for ``D``, ``Br``, ``Bc``, ``TPR`` and dtype."""
    key = (d, br, bc, tpr, np.dtype(dtype))
    if key not in _KERNELS:
        _KERNELS[key] = _make_kernel(d, br, bc, tpr, _STORAGE[np.dtype(dtype)], np.dtype(dtype).itemsize)
    return _KERNELS[key]


def make_tile_update(D: int, BC: int, TPR: int):
    """The online-softmax update of ``(m_i, l_i, O_i)`` by one ``Bc``-key tile, a device function.

    Shared by this module's kernel and the packed (varlen/paged) kernel of
    :mod:`unisparse_ref.numba_backend.varlen`, which differ only in how they address Q, K, V
    and the mask. On entry ``sQ`` holds ``Q_i`` and ``sK``, ``sV`` the tile ``K_j``, ``V_j``
    (keys ``kv0 .. kv0 + Bc - 1``); ``live`` says whether this thread's row has work in the
    tile. Every thread of the block must call it (it has block-wide barriers). Returns the
    new ``(m_i, l_i)``; ``acc`` (``O_i``) is updated in place, ``s_loc`` is scratch.
    """
    CPT = cdiv(BC, TPR)  # tile columns per thread
    DPT = cdiv(D, TPR)  # output dims per thread
    D_EXACT = D % TPR == 0  # every d = lane + TPR*kd < D: the guard folds away at compile time

    @cuda.jit(device=True, inline=True)
    def tile_update(sQ, sK, sV, sP, s_max, s_sum, row, lane, live, kv0, nk, pos, causal, scale,
                    m_i, l_i, acc, s_loc):
        # S_ij = scale * Q_i K_j^T for my columns, masked; then my part of rowmax.
        for kc in range(CPT):
            s_loc[kc] = float32(0.0)
        if live:
            for d in range(D):
                qd = float32(sQ[row, d])
                for kc in range(CPT):  # c = lane + TPR*kc < Bc: Bc and TPR are powers of two
                    s_loc[kc] += qd * float32(sK[lane + TPR * kc, d])
        m_part = float32(-math.inf)
        for kc in range(CPT):
            c = lane + TPR * kc
            s = kv0 + c  # key position
            if live and s < nk and (not causal or s <= pos):
                s_loc[kc] = scale * s_loc[kc]
            else:
                s_loc[kc] = float32(-math.inf)
            m_part = max(m_part, s_loc[kc])
        s_max[row, lane] = m_part
        cuda.syncthreads()  # all partial row maxima are written before any row reads them

        m_new = m_i
        for ln in range(TPR):
            m_new = max(m_new, s_max[row, ln])
        # A row that has seen only masked keys keeps m = -inf: shift by 0, not by -inf.
        shift = m_new if m_new != -math.inf else float32(0.0)
        alpha = math.exp(m_i - shift)  # exp(m_old - m_new); 0 when m_old = -inf
        l_part = float32(0.0)
        for kc in range(CPT):
            c = lane + TPR * kc
            p = math.exp(s_loc[kc] - shift)  # masked entries: exp(-inf) = 0
            l_part += p
            sP[row, c] = p  # rounded to the input dtype here, before P V
        s_sum[row, lane] = l_part
        cuda.syncthreads()  # the P tile and the partial row sums are complete before use

        l_new = float32(0.0)
        for ln in range(TPR):
            l_new += s_sum[row, ln]
        l_i = alpha * l_i + l_new
        m_i = m_new
        for kd in range(DPT):
            acc[kd] *= alpha
        if live:  # O_i += P_ij V_j (a dead row's P is 0)
            for c in range(BC):
                p = float32(sP[row, c])
                for kd in range(DPT):
                    d = lane + TPR * kd
                    if D_EXACT or d < D:
                        acc[kd] += p * float32(sV[c, d])
        return m_i, l_i

    return tile_update


def _make_kernel(D: int, BR: int, BC: int, TPR: int, storage, itemsize: int):
    """Build the kernel with its tile shapes as compile-time constants."""
    tile_update = make_tile_update(D, BC, TPR)
    THREADS = BR * TPR
    CPT = cdiv(BC, TPR)  # tile columns per thread
    DPT = cdiv(D, TPR)  # output dims per thread
    D_EXACT = D % TPR == 0  # every d = lane + TPR*kd < D: the guard folds away at compile time
    DP = D + 4 // itemsize  # padded row length of the Q, K, V tiles
    BCP = BC + 4 // itemsize  # padded row length of the P tile

    def block_sparse_attention_kernel(q, k, v, kv_counts, kv_indices, S, heads_per_mask, group,
                                      causal, scale, out, lse):
        nq = q.shape[2]
        nk = k.shape[2]
        n_tiles = cdiv_dev(nq, BR)
        # Heaviest tiles (last query rows, most keys when causal) are scheduled first.
        tile = n_tiles - 1 - cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        row = tid // TPR  # this thread's row of the tile
        lane = tid % TPR  # and its place among the TPR threads of that row

        sQ = cuda.shared.array((BR, DP), storage)
        sK = cuda.shared.array((BC, DP), storage)
        sV = cuda.shared.array((BC, DP), storage)
        sP = cuda.shared.array((BR, BCP), storage)
        s_max = cuda.shared.array((BR, TPR), float32)
        s_sum = cuda.shared.array((BR, TPR), float32)

        t0 = tile * BR  # first query row of the tile
        i = t0 // S  # its query block (Br divides S)
        g = h // heads_per_mask  # mask head
        kvh = h // group  # KV head (GQA)
        t = t0 + row  # this thread's query row
        pos = t + (nk - nq)  # p(t), bottom-right aligned
        tile_last_pos = min(t0 + BR, nq) - 1 + (nk - nq)  # p of the tile's last row

        # Q_i: Br x D, rows past Nq are zeros (their results are never stored).
        for e in range(tid, BR * D, THREADS):
            rr = e // D
            dd = e % D
            if t0 + rr < nq:
                sQ[rr, dd] = q[b, h, t0 + rr, dd]
            else:
                sQ[rr, dd] = 0

        m_i = float32(-math.inf)
        l_i = float32(0.0)
        acc = cuda.local.array(DPT, float32)  # O_i, my dims d = lane + TPR*kd
        for kd in range(DPT):
            acc[kd] = float32(0.0)
        s_loc = cuda.local.array(CPT, float32)  # S_ij / P_ij, my columns c = lane + TPR*kc

        for sel in range(kv_counts[b, g, i]):
            j = kv_indices[b, g, i, sel]
            for kv0 in range(j * S, min((j + 1) * S, nk), BC):
                if causal and kv0 > tile_last_pos:
                    break  # every key from here on is after every row's p(t) (same for all threads)
                cuda.syncthreads()  # the previous tile's reads of sK, sV, sP, s_max, s_sum are done

                # K_j, V_j: Bc x D tiles, keys past Nk are zeros (and masked below).
                for e in range(tid, BC * D, THREADS):
                    cc = e // D
                    dd = e % D
                    if kv0 + cc < nk:
                        sK[cc, dd] = k[b, kvh, kv0 + cc, dd]
                        sV[cc, dd] = v[b, kvh, kv0 + cc, dd]
                    else:
                        sK[cc, dd] = 0
                        sV[cc, dd] = 0
                cuda.syncthreads()  # sK, sV (and sQ, on the first tile) are complete before use

                # Row t has work in this tile iff it exists and (causal) the tile's first key is visible.
                live = t < nq and (not causal or kv0 <= pos)
                m_i, l_i = tile_update(sQ, sK, sV, sP, s_max, s_sum, row, lane, live, kv0, nk, pos, causal,
                                       scale, m_i, l_i, acc, s_loc)

        if t < nq:
            if l_i > float32(0.0):
                inv_l = float32(1.0) / l_i
                for kd in range(DPT):
                    d = lane + TPR * kd
                    if D_EXACT or d < D:
                        out[b, h, t, d] = acc[kd] * inv_l
                if lane == 0:
                    lse[b, h, t] = m_i + math.log(l_i)
            else:  # no allowed key: out 0, lse -inf (never NaN)
                for kd in range(DPT):
                    d = lane + TPR * kd
                    if D_EXACT or d < D:
                        out[b, h, t, d] = 0
                if lane == 0:
                    lse[b, h, t] = float32(-math.inf)

    return _jit_with_launch_bounds(block_sparse_attention_kernel, THREADS)


def _jit_with_launch_bounds(fn, threads: int):
    """``cuda.jit(fn)`` with launch bounds ``(threads, MIN_BLOCKS_PER_SM)``.

    The bounds let the compiler budget registers for two resident blocks per SM. The
    simulator, and numba-cuda releases older than the option, compile without them.
    """
    if SIMULATOR:
        return cuda.jit(fn)
    try:
        return cuda.jit(launch_bounds=(threads, MIN_BLOCKS_PER_SM))(fn)
    except TypeError:
        return cuda.jit(fn)


@cuda.jit(device=True, inline=True)
def cdiv_dev(a, b):
    """``ceil(a / b)`` on the device."""
    return (a + b - 1) // b


def attend(q, k, v, kv_counts, kv_indices, block_size: int, heads_per_mask: int, causal: bool, scale: float):
    """Launch the kernel on device arrays; returns ``(out [B,Hq,Nq,D] input dtype, lse float32 [B,Hq,Nq])``.

    ``kv_counts [B,Hm,nQb]`` and ``kv_indices [B,Hm,nQb,nKb]`` (int32) are the mask in index
    form (:meth:`BlockMask.to_indices <unisparse_ref.BlockMask.to_indices>`).
    """
    B, Hq, nq, D = q.shape
    Hkv = k.shape[1]
    dtype = np.dtype(q.dtype)
    br, bc, tpr = choose_tiles(D, dtype, block_size)
    out = cuda.device_array((B, Hq, nq, D), dtype=dtype)
    lse = cuda.device_array((B, Hq, nq), dtype=np.float32)
    grid, block = launch_geometry(B, Hq, nq, br, tpr)
    kernel = get_kernel(D, br, bc, tpr, dtype)
    with simulator_launch():
        kernel[grid, block](q, k, v, kv_counts, kv_indices, block_size, heads_per_mask, Hq // Hkv,
                            causal, np.float32(scale), out, lse)
    return out, lse


def _index_array(x):
    """An int32 array of :meth:`BlockMask.to_indices` on the device: CuPy in place, NumPy copied."""
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x)
    return cuda.to_device(np.ascontiguousarray(x, dtype=np.int32))


def block_sparse_attention(q, k, v, block_mask: BlockMask, scale: float):
    """Stage 4 on device arrays ``q [B,Hq,Nq,D]``, ``k``, ``v [B,Hkv,Nk,D]`` and a mask checked against them.

    Returns ``(out [B,Hq,Nq,D] input dtype, lse float32 [B,Hq,Nq])`` as device arrays.
    """
    counts, indices = block_mask.to_indices()
    return attend(q, k, v, _index_array(counts), _index_array(indices), block_mask.block_size,
                  block_mask.heads_per_mask, block_mask.causal, scale)


def dense_attention(q, k, v, causal: bool, scale: float, block_size: int):
    """Dense attention on checked device arrays: :func:`block_sparse_attention` with ``BlockMask.full``."""
    B, Hq, nq, _ = q.shape
    full = BlockMask.full(B, Hq, nq, k.shape[2], block_size=block_size, causal=causal)
    return block_sparse_attention(q, k, v, full, scale)


def tiles_walked(block_mask: BlockMask, h: int, br: int, bc: int, b: int = 0) -> np.ndarray:
    """Boolean ``[query tiles, key tiles]``: the ``Br x Bc`` tiles the kernel computes for head ``h``.

    The kernel's loops over the selected blocks and their key tiles, early exit included, run
    on the host without computing anything (``block_mask`` holds a NumPy mask).
    """
    S, nq, nk = block_mask.block_size, block_mask.nq, block_mask.nk
    counts, indices = block_mask.to_indices()
    walked = np.zeros((cdiv(nq, br), cdiv(nk, bc)), dtype=bool)
    for tile in range(walked.shape[0]):
        t0 = tile * br
        i, g = t0 // S, h // block_mask.heads_per_mask
        last_pos = min(t0 + br, nq) - 1 + (nk - nq)  # p of the tile's last row
        for j in indices[b, g, i, : counts[b, g, i]]:
            for kv0 in range(j * S, min((j + 1) * S, nk), bc):
                if block_mask.causal and kv0 > last_pos:
                    break  # the kernel's early exit
                walked[tile, kv0 // bc] = True
    return walked
