"""The per-rank compute through a backend's stage methods: ``backend="cupy"`` on the GPU.

:func:`~unisparse_ref.distributed.context_parallel_attention` with ``backend="reference"``
(the default) computes a rank's share with the float64 reference's own operations on the host.
With ``backend="cupy"`` (or any backend object with the four stage methods of
:class:`unisparse_ref.backends.Backend`) the same seven steps run here, on the backend's
arrays, and only through its public stage methods (``compress``, ``block_scores``,
``select_blocks``, ``block_sparse_attention``):

1. **meta** (as the reference path): shapes, lengths, dtype, finiteness (counted on the
   device), so that a bad shard is refused on every rank at once.
2. **pool**: ``compress`` of the rank's query rows and of its keys (each the concatenation of
   whole blocks in ascending order, so that its groups of ``c_q`` / ``c_k`` are the one-device
   groups: only the globally last block can be short, and it comes last here too).
3. **composite_keys** (``all_gather``, on the device): all ``C`` composite keys, in the
   backend's composite dtype (float32 on the GPU: ``e_c = 4``).
4. **score and select**, per *chunk*: a rank's query blocks form runs of consecutive blocks
   (zigzag: a head run and a tail run). A run of rows ``[a, b)`` is a query sequence of
   ``nq' = b - a`` rows whose positions ``p(t) = t + Nk - Nq`` end at ``Nk - Nq + b - 1``; in
   the bottom-right causal form of SPEC 1 that is ``nq'`` queries over ``nk' = Nk - Nq + b``
   keys (the keys truncated at the run's end). Every position, hence every composite
   visibility, visible and forced block (sink and diagonal), is then the one-device one, and
   the truncated keys are exactly those no row of the run may see. The stage methods run on
   that form: ``block_scores(q_c rows of the run, first ceil(nk'/c_k) gathered composite keys,
   nq', nk')`` (the one-device composite keys, so a group that straddles ``nk'`` keeps its
   one-device mean), then ``select_blocks``. Non-causal attention has no position to truncate
   at; it is refused here when ``n_local_blocks > 0`` (the forced diagonal blocks depend on
   the global positions), otherwise the run sees all ``Nk`` keys.
5. **requests** (``all_gather``, one byte per ``(b, kv head, key block)``), as the reference.
6. **kv_blocks** (``all_to_all``): the owners send the requested tiles, gathered on the device
   by one row index per destination (K and V viewed as ``[B * Hkv * keys, D]`` rows), in the
   input dtype (bf16 as its 16-bit pattern); the receiver copies its own blocks (a few
   contiguous runs) and scatters the fetched rows into a key/value buffer of full length whose
   other tiles stay zero (the attention never reads a block no mask row selected).
7. **attend**, per chunk: ``block_sparse_attention`` of the run's rows over the truncated
   buffer, with the run's mask; ``combine="gather"``: one call over owned and fetched blocks;
   ``combine="merge"``: one call over the owned blocks, one over the fetched, combined with
   the lse merge (:func:`merge_states`: float32 on the device, float64 for float64 outputs).

The CPU tests run this module with :class:`unisparse_ref.reference.NumpyBackend` as the
backend (NumPy arrays): the same glue, checked against the one-device reference to the
reference's own tolerances; the GPU tests run it on CuPy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import geometry
from .._arrays import check_config, check_head_pooling, check_qkv, check_spec_variants
from .._convert import BFLOAT16, SUPPORTED_DTYPES, to_numpy
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from .comm import Communicator

__all__ = [
    "ArrayOps",
    "chunks_of",
    "merge_states",
    "stage_rank",
]


# --------------------------------------------------------------------------------------------
# arrays: NumPy or CuPy, bf16 carried as its bit pattern on the device
# --------------------------------------------------------------------------------------------


class ArrayOps:
    """The array module of a backend and how its inputs and outputs are carried.

    On CuPy, bfloat16 travels and is indexed as its raw ``uint16`` pattern (CuPy's own bf16
    dtype supports few operations) and is handed to the backend through
    ``unisparse_ref.cupy_backend.as_bfloat16``; on NumPy, arrays are used as they are.

    Parameters
    ----------
    backend : object
        A backend; ``backend.name == "cupy"`` (or the string ``"cupy"``) selects CuPy,
        anything else NumPy.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.on_device = backend == "cupy" or getattr(backend, "name", "") == "cupy"
        if self.on_device:
            import cupy

            self.xp = cupy
        else:
            self.xp = np

    def raw(self, x: Any) -> tuple[Any, np.dtype]:
        """``x`` as this module's array (bf16 as ``uint16`` bits on CuPy) and its logical dtype."""
        xp = self.xp
        if not self.on_device:
            a = to_numpy(x)
            return a, np.dtype(a.dtype)
        from ..cupy_backend import BFloat16Array

        if isinstance(x, BFloat16Array):
            return x.data, BFLOAT16
        if isinstance(x, xp.ndarray):
            dt = np.dtype(x.dtype)
            if dt == np.uint16:
                raise TypeError("a uint16 CuPy array: pass bf16 bit patterns through cupy_backend.as_bfloat16")
            return (x.view(xp.uint16), dt) if dt == BFLOAT16 else (x, dt)
        if isinstance(x, np.ndarray):
            dt = np.dtype(x.dtype)
            return xp.asarray(np.ascontiguousarray(x).view(np.uint16) if dt == BFLOAT16 else x), dt
        raise TypeError(f"backend 'cupy' takes CuPy or NumPy arrays (or BFloat16Array), got {type(x).__name__}")

    def wrap(self, raw: Any, dt: np.dtype) -> Any:
        """The backend's input (or a caller's output) for ``raw`` of logical dtype ``dt``."""
        if self.on_device and dt == BFLOAT16:
            from ..cupy_backend import as_bfloat16

            return as_bfloat16(raw)
        return raw

    def host(self, x: Any) -> np.ndarray:
        """A NumPy copy (a view on the host)."""
        return to_numpy(x)

    def index(self, idx: np.ndarray) -> Any:
        """Host int64 indices as this module's array."""
        return self.xp.asarray(np.ascontiguousarray(idx, dtype=np.int64))

    def count_nonfinite(self, raw: Any, dt: np.dtype) -> Any:
        """Entries of ``raw`` that are NaN or infinite (a 0-d array; bf16 read from its bits)."""
        xp = self.xp
        if self.on_device and dt == BFLOAT16:
            return ((raw & 0x7F80) == 0x7F80).sum()
        return (~xp.isfinite(raw.astype(np.float32) if dt == BFLOAT16 else raw)).sum()

    def to_float(self, raw: Any, dt: np.dtype) -> Any:
        """``raw`` as float32 (float64 stays float64)."""
        xp = self.xp
        if dt == np.float64:
            return raw
        if self.on_device and dt == BFLOAT16:
            return (raw.astype(xp.uint32) << 16).view(xp.float32)
        return raw.astype(np.float32)

    def from_float(self, x: Any, dt: np.dtype) -> Any:
        """Float32 (or float64) ``x`` rounded to ``dt``, carried as :meth:`raw` carries it."""
        xp = self.xp
        if self.on_device and dt == BFLOAT16:
            # round to nearest even on the bit pattern (finite values: the merge makes no NaN)
            bits = x.astype(xp.float32).view(xp.uint32)
            bits = bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))
            return (bits >> 16).astype(xp.uint16)
        return x.astype(dt)

    def sync(self) -> None:
        """Wait for the device (nothing on NumPy)."""
        if self.on_device:
            self.xp.cuda.get_current_stream().synchronize()


def merge_states(ops: ArrayOps, out_a: Any, lse_a: Any, out_b: Any, lse_b: Any, dt: np.dtype) -> tuple[Any, Any]:
    """The lse merge of two partial states over disjoint key sets, elementwise on ``ops.xp``.

    The formula of :func:`unisparse_ref.reference.merge.merge_attention_states`:
    ``hi = max(lse_a, lse_b)``, ``w = exp(min - hi)``, ``out = (out_hi + w out_lo) / (1 + w)``,
    ``lse = hi + log1p(w)``; both empty (``-inf``): ``out = 0``, ``lse = -inf``; one empty: the
    other side bit for bit. Computed in float32 (float64 for float64 outputs).

    Parameters
    ----------
    ops : ArrayOps
    out_a, out_b : array, shape ``[B, Hq, n, D]``
        Carried as :meth:`ArrayOps.raw` carries logical dtype ``dt``.
    lse_a, lse_b : float32 ``[B, Hq, n]``
    dt : numpy.dtype

    Returns
    -------
    out : array, shape ``[B, Hq, n, D]``
        Of logical dtype ``dt``, carried as :meth:`ArrayOps.raw` carries it.
    lse : float32 ``[B, Hq, n]``
    """
    xp = ops.xp
    oa, ob = ops.to_float(out_a, dt), ops.to_float(out_b, dt)
    wdt = oa.dtype
    la, lb = lse_a.astype(wdt), lse_b.astype(wdt)
    hi, lo = xp.maximum(la, lb), xp.minimum(la, lb)
    empty = hi == -np.inf
    w = xp.where(empty, 0.0, xp.exp(lo - xp.where(empty, 0.0, hi))).astype(wdt)
    a_hi = (la >= lb)[..., None]
    o_hi, o_lo = xp.where(a_hi, oa, ob), xp.where(a_hi, ob, oa)
    out = xp.where(empty[..., None], 0.0, (o_hi + w[..., None] * o_lo) / (1 + w[..., None])).astype(wdt)
    lse = xp.where(empty, -np.inf, hi + xp.log1p(w)).astype(np.float32)
    return ops.from_float(out, dt), lse


# --------------------------------------------------------------------------------------------
# geometry of a rank's runs
# --------------------------------------------------------------------------------------------


def chunks_of(q_blocks: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive query blocks: ``(first block, end block, index of the first in q_blocks)``."""
    runs: list[tuple[int, int, int]] = []
    for li, b in enumerate(int(x) for x in q_blocks):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1, runs[-1][2])
        else:
            runs.append((b, b + 1, li))
    return runs


def _block_len(j: Any, n: int, S: int) -> Any:
    return np.minimum((np.asarray(j) + 1) * S, n) - np.asarray(j) * S


def _position_runs(pos: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive values in ascending ``pos``: ``(first, end, index of first in pos)``."""
    if pos.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pos) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [pos.size]])
    return [(int(pos[a]), int(pos[b - 1]) + 1, int(a)) for a, b in zip(starts, ends, strict=True)]


def _tokens_of_tiles(tiles: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, ...]:
    """Token indices ``(b, h, position)`` of tiles ``(b, h, j)``, tile ``j`` at ``starts[j]``, ``lens[j]`` long."""
    if tiles.size == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    b, h, j = (tiles[:, c].astype(np.int64) for c in range(3))
    n = lens[j]
    first = np.repeat(np.cumsum(n) - n, n)
    pos = np.repeat(starts[j], n) + (np.arange(int(n.sum()), dtype=np.int64) - first)
    return np.repeat(b, n), np.repeat(h, n), pos


# --------------------------------------------------------------------------------------------
# one rank
# --------------------------------------------------------------------------------------------


def _check_stage_shard(shard: Any, plan: Any, config: UniSparseConfig, comm: Communicator, ops: ArrayOps
                       ) -> tuple[Any, Any, Any, np.dtype]:
    """Shapes, dtype and finiteness of a shard for the stage path; ``(q, k, v, dtype)`` as raw arrays."""
    check_spec_variants(config, "context parallelism through stage methods")
    if not config.causal and config.n_local_blocks > 0:
        raise ValueError(
            "non-causal context parallelism through stage methods needs n_local_blocks=0: the forced "
            "diagonal blocks depend on global positions, which a non-causal run cannot be truncated to "
            "(use backend='reference')"
        )
    (q, dq), (k, dk), (v, dv) = (ops.raw(x) for x in (shard.q, shard.k, shard.v))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"rank {shard.rank}: {name} must have rank 4, got shape {tuple(x.shape)}")
    if not dq == dk == dv:
        raise TypeError(f"rank {shard.rank}: q, k, v must share a dtype, got {dq}, {dk}, {dv}")
    supported = tuple(np.dtype(d) for d in getattr(ops.backend, "supported_dtypes", SUPPORTED_DTYPES))
    if dq not in supported:
        raise TypeError(f"backend {getattr(ops.backend, 'name', ops.backend)!r} does not take {dq}; "
                        f"it takes {[str(d) for d in supported]}")
    rows, keys = plan.q_rows(shard.rank).size, plan.k_rows(shard.rank).size
    if q.shape[2] != rows or k.shape[2] != keys or v.shape[2] != keys:
        raise ValueError(
            f"rank {shard.rank}: the plan gives it {rows} query rows and {keys} keys; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)} (use shard_inputs)"
        )
    stand = [np.zeros((*x.shape[:2], 1, x.shape[3]), dtype=dq) for x in (q, k, v)]
    check_qkv(*stand, causal=False)
    check_head_pooling(q.shape[1], k.shape[1], config.c_h)
    bad = ops.count_nonfinite(q, dq) + ops.count_nonfinite(k, dq) + ops.count_nonfinite(v, dq)
    if int(bad):
        raise ValueError(f"rank {shard.rank}: q, k or v holds non-finite values (NaN or infinity)")
    return q, k, v, dq


def _pool(ops: ArrayOps, q: Any, k: Any, dt: np.dtype, config: UniSparseConfig) -> tuple[Any, Any]:
    """``compress`` of the rank's rows and keys (either may be empty; pooling ignores ``causal``)."""
    xp, be = ops.xp, ops.backend
    B, Hq, rows, D = q.shape
    Hkv, keys = k.shape[1], k.shape[2]
    cfg = dataclasses.replace(config, causal=False)
    one_q = q if rows else xp.zeros((B, Hq, 1, D), dtype=q.dtype)
    one_k = k if keys else xp.zeros((B, Hkv, 1, D), dtype=k.dtype)
    q_c, k_c = be.compress(ops.wrap(one_q, dt), ops.wrap(one_k, dt), cfg)
    if not rows:
        q_c = q_c[:, :, :0]
    if not keys:
        k_c = k_c[:, :, :0]
    return q_c, k_c


def stage_rank(
    shard: Any,
    plan: Any,
    config: UniSparseConfig | None,
    comm: Communicator,
    backend: Any,
    *,
    combine: str = "gather",
    exchange_meta: Callable[..., Any],
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One rank of context-parallel UniSparse through ``backend``'s stage methods.

    Called by :func:`~unisparse_ref.distributed.context_parallel_attention` (``backend=``
    ``"cupy"`` or a backend object); see the module docstring for the steps.

    Parameters
    ----------
    shard : LocalShard
    plan : ShardPlan
    config : UniSparseConfig
    comm : Communicator
    backend : object
        With ``compress``, ``block_scores``, ``select_blocks``, ``block_sparse_attention``.
    combine : str
        ``"gather"`` or ``"merge"``.
    exchange_meta : callable
        ``exchange_meta(comm, check) -> value of check()``: the meta step of the reference path
        (refuses bad shards on every rank together).
    timings : dict, optional
        Filled with the seconds of each local step (``pool``, ``score_select``, ``requests``,
        ``pack``, ``unpack``, ``attend``), the device synchronised at the end of each: the
        rank's own compute, apart from the collective calls.

    Returns
    -------
    dict
        ``q_blocks``, ``out`` (input dtype), ``lse`` (float32), ``mask`` (bool), ``scores``,
        ``q_c``, ``k_c`` (the backend's arrays; ``out`` wrapped for the caller).
    """
    config = check_config(config)
    ops = ArrayOps(backend)
    xp = ops.xp
    rank, W = comm.rank, comm.world_size
    t = timings if timings is not None else {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        ops.sync()
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - clock[0]
        clock[0] = now

    q, k, v, dt = exchange_meta(comm, lambda: _check_stage_shard(shard, plan, config, comm, ops))
    clock[0] = time.perf_counter()

    B, Hq, rows_total, D = q.shape
    Hkv = k.shape[1]
    nq, nk, S = plan.nq, plan.nk, config.block_size
    off = nk - nq
    G, Hm = Hq // Hkv, Hq // config.c_h
    nkb = plan.nkb
    q_blocks, k_blocks = plan.q_blocks(rank), plan.k_blocks(rank)
    nloc = q_blocks.size
    runs = chunks_of(q_blocks)

    # 2. pool
    q_c, k_c_own = _pool(ops, q, k, dt, config)
    lap("pool")

    # 3. composite keys
    gathered = comm.all_gather(k_c_own, tag="composite_keys")
    C = geometry.cdiv(nk, config.c_k)
    k_c = xp.empty((B, Hkv, C, D), dtype=k_c_own.dtype)
    for src, part in enumerate(gathered):
        idx = _composite_positions(plan.k_blocks(src), nk, config.c_k, S)
        if tuple(part.shape) != (B, Hkv, idx.size, D):
            raise RuntimeError(f"rank {src} sent composite keys {tuple(part.shape)}, expected {(B, Hkv, idx.size, D)}")
        if idx.size:
            k_c[:, :, ops.index(idx)] = part
    clock[0] = time.perf_counter()

    # 4. score and select, run by run (the bottom-right form of each run)
    mask = xp.zeros((B, Hm, nloc, nkb), dtype=bool)
    scores = None
    bms: list[Any] = []
    lrow = lcomp = 0
    geo = []  # (local row start, rows nq', keys nk') of every run
    for i0, i1, li in runs:
        a, b = i0 * S, min(i1 * S, nq)
        nq_c = b - a
        nk_c = off + b if config.causal else nk
        r_c = geometry.cdiv(nq_c, config.c_q)
        sc = backend.block_scores(q_c[:, :, lcomp : lcomp + r_c], k_c[:, :, : geometry.cdiv(nk_c, config.c_k)],
                                  config, nq_c, nk_c)
        bm = backend.select_blocks(sc, config, nq_c, nk_c)
        nkb_c = geometry.num_blocks(nk_c, S)
        if scores is None:
            scores = xp.zeros((B, Hm, nloc, nkb), dtype=sc.dtype)
        scores[:, :, li : li + (i1 - i0), :nkb_c] = sc
        mask[:, :, li : li + (i1 - i0), :nkb_c] = xp.asarray(bm.mask)
        bms.append(bm)
        geo.append((lrow, nq_c, nk_c))
        lrow += nq_c
        lcomp += r_c
    if scores is None:
        scores = xp.zeros((B, Hm, 0, nkb), dtype=k_c.dtype)
    lap("score_select")

    # 5. requests: the selected (b, kv head, key block) tiles owned elsewhere
    mine = plan.k_owner == rank
    per_head = mask.any(axis=2)  # [B, Hm, nKb]
    need = per_head.reshape(B, Hkv, G // config.c_h, nkb).any(axis=2)  # mask head g -> kv head g*c_h // G
    request = need & ops.index(~mine).astype(bool)[None, None, :]
    request_u8 = request.astype(xp.uint8)
    lap("requests")
    requests = [ops.host(r).astype(bool) for r in comm.all_gather(request_u8, tag="requests")]
    request_h = requests[rank]
    clock[0] = time.perf_counter()

    # 6. kv_blocks: gather the asked tiles, K then V: one flat row index per destination
    # (rows of k viewed as [B * Hkv * keys_r, D]), one take each for K and V
    k_lens = np.asarray(_block_len(k_blocks, nk, S), dtype=np.int64)
    local_start = np.zeros(nkb, dtype=np.int64)
    local_start[k_blocks] = np.cumsum(k_lens) - k_lens
    len_j = np.asarray(_block_len(np.arange(nkb), nk, S), dtype=np.int64)
    keys_r = k.shape[2]
    k_rows, v_rows = xp.ascontiguousarray(k).reshape(-1, D), xp.ascontiguousarray(v).reshape(-1, D)
    sends = []
    for dst in range(W):
        tiles = np.argwhere(requests[dst] & mine[None, None, :]) if dst != rank else np.zeros((0, 3), np.int64)
        if not tiles.size:
            sends.append(xp.zeros((2, 0, D), dtype=k.dtype))
            continue
        bi, hi, pi = _tokens_of_tiles(tiles, local_start, len_j)
        rows = ops.index((bi * Hkv + hi) * keys_r + pi)
        sends.append(xp.stack([k_rows[rows], v_rows[rows]]))
    lap("pack")
    received = comm.all_to_all(sends, tag="kv_blocks")
    clock[0] = time.perf_counter()

    # the rank's keys and values at their global positions; unselected tiles stay zero
    kbuf = xp.zeros((B, Hkv, nk, D), dtype=k.dtype)
    vbuf = xp.zeros((B, Hkv, nk, D), dtype=v.dtype)
    for g0, g1, l0 in _position_runs(plan.k_rows(rank)):  # own blocks: a few contiguous copies
        kbuf[:, :, g0:g1] = k[:, :, l0 : l0 + g1 - g0]
        vbuf[:, :, g0:g1] = v[:, :, l0 : l0 + g1 - g0]
    kbuf_rows, vbuf_rows = kbuf.reshape(-1, D), vbuf.reshape(-1, D)  # views: [B * Hkv * nk, D]
    for src in range(W):
        if src == rank:
            continue
        tiles = np.argwhere(request_h & (plan.k_owner == src)[None, None, :])
        bi, hi, pi = _tokens_of_tiles(tiles, np.arange(nkb, dtype=np.int64) * S, len_j)
        if bi.size != received[src].shape[1]:
            raise RuntimeError(f"rank {rank}: rank {src} sent {received[src].shape[1]} key tokens, expected {bi.size}")
        if bi.size:
            rows = ops.index((bi * Hkv + hi) * nk + pi)
            kbuf_rows[rows] = received[src][0]
            vbuf_rows[rows] = received[src][1]
    lap("unpack")

    # 7. attend, run by run, over the truncated buffers
    # the output's carrier dtype: the input's on the device; the backend's (float64) on NumPy
    out = xp.zeros((B, Hq, rows_total, D), dtype=q.dtype) if ops.on_device else None
    lse = xp.zeros((B, Hq, rows_total), dtype=xp.float32)
    own_cols = ops.index(mine).astype(bool)
    for (r0, n_r, nk_c), bm in zip(geo, bms, strict=True):
        qr = q[:, :, r0 : r0 + n_r]
        kr, vr = (kbuf, vbuf) if nk_c == nk else (kbuf[:, :, :nk_c], vbuf[:, :, :nk_c])
        nkb_c = geometry.num_blocks(nk_c, S)
        args = (ops.wrap(xp.ascontiguousarray(qr), dt), ops.wrap(xp.ascontiguousarray(kr), dt),
                ops.wrap(xp.ascontiguousarray(vr), dt))
        m = xp.asarray(bm.mask)
        if combine == "gather":
            o, l_ = backend.block_sparse_attention(*args, bm, config)
            o = ops.raw(o)[0]
        else:
            parts = []
            for cols in (own_cols[:nkb_c], ~own_cols[:nkb_c]):
                part = BlockMask(m & cols, S, config.c_h, bm.nq, bm.nk, bm.causal)
                po, pl = backend.block_sparse_attention(*args, part, config)
                parts.append((ops.raw(po)[0], xp.asarray(pl)))
            (oa, la), (ob, lb) = parts
            o, l_ = merge_states(ops, oa, la, ob, lb, dt if ops.on_device else np.dtype(oa.dtype))
        if out is None:
            out = xp.zeros((B, Hq, rows_total, D), dtype=o.dtype)
        out[:, :, r0 : r0 + n_r] = o
        lse[:, :, r0 : r0 + n_r] = xp.asarray(l_)
    if out is None:  # a rank without query rows
        out = xp.zeros((B, Hq, 0, D), dtype=np.float64)
    lap("attend")
    return {"q_blocks": q_blocks, "out": ops.wrap(out, dt), "lse": lse, "mask": mask, "scores": scores,
            "q_c": q_c, "k_c": k_c}


def _composite_positions(blocks: np.ndarray, n: int, c: int, S: int) -> np.ndarray:
    """Global indices of the composite tokens (groups of ``c``) inside ``blocks``, ascending."""
    parts = [np.arange(b * S // c, b * S // c + geometry.cdiv(int(_block_len(b, n, S)), c)) for b in blocks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
