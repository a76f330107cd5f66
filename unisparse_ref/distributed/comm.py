"""Communicators: the calls context parallelism needs, simulated in one process or on NCCL.

Two collective calls move every byte of :mod:`unisparse_ref.distributed.context_parallel`:

* ``all_gather(x, tag=...)``: every rank contributes one array (shapes may differ between
  ranks); every rank receives the list of all ``W`` arrays, in rank order;
* ``all_to_all(xs, tag=...)``: rank ``r`` passes ``W`` arrays, ``xs[d]`` for rank ``d``; it
  receives ``W`` arrays, the one each rank addressed to ``r``, in rank order.

Both copy: what a rank receives never aliases what another rank holds. Every call counts
its *payload* bytes per rank and per ``tag`` in :class:`CommStats`: bytes sent to and
received from *other* ranks (a rank's own contribution moves nothing). The counts are the
same for every implementation; the NCCL one also counts its extra wire bytes (shape headers,
padding of the all-gather to the largest contribution) apart, as ``control``.

Implementations:

* :class:`SimulatedComm`: ``W`` ranks as ``W`` threads of one process
  (:func:`run_simulated`), meeting at a barrier in lock step. Arrays may be NumPy or CuPy
  (one GPU); this is what the CPU tests run.
* :class:`NcclComm`: one process per GPU, through ``cupy.cuda.nccl``; CuPy is imported when
  an instance is made, so this module imports without it, and making one without CuPy
  raises :class:`~unisparse_ref.errors.BackendUnavailable`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._convert import BFLOAT16
from ..errors import BackendUnavailable

__all__ = [
    "CommStats",
    "Communicator",
    "NcclComm",
    "SimulatedComm",
    "SimulatedGroup",
    "nccl_unique_id",
    "run_simulated",
]


@dataclass
class CommStats:
    """Bytes moved by one rank, per tag.

    Attributes
    ----------
    sent : dict of str to int
        Payload bytes sent to other ranks.
    recv : dict of str to int
        Payload bytes received from other ranks.
    calls : dict of str to int
        Number of collective calls.
    control : int
        Wire bytes beyond the payload (NCCL headers and padding; 0 when simulated).
    """

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recv: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    control: int = 0

    @property
    def total_sent(self) -> int:
        """Payload bytes sent, all tags."""
        return int(sum(self.sent.values()))

    @property
    def total_recv(self) -> int:
        """Payload bytes received, all tags."""
        return int(sum(self.recv.values()))

    def as_dict(self) -> dict[str, Any]:
        """Plain dictionaries (picklable, printable)."""
        return {"sent": dict(self.sent), "recv": dict(self.recv), "calls": dict(self.calls),
                "control": int(self.control)}


class Communicator:
    """The interface :func:`~unisparse_ref.distributed.context_parallel_attention` calls.

    Attributes
    ----------
    rank : int
    world_size : int
    stats : CommStats
    """

    rank: int
    world_size: int
    stats: CommStats

    def _count(self, tag: str, sent: int, recv: int) -> None:
        self.stats.sent[tag] += int(sent)
        self.stats.recv[tag] += int(recv)
        self.stats.calls[tag] += 1

    def all_gather(self, x: Any, *, tag: str) -> list[Any]:
        """Every rank's ``x``, in rank order (copies; shapes may differ between ranks)."""
        raise NotImplementedError

    def all_to_all(self, xs: Sequence[Any], *, tag: str) -> list[Any]:
        """``xs[d]`` goes to rank ``d``; returns what each rank sent here, in rank order."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank has arrived."""
        raise NotImplementedError


def _nbytes(x: Any) -> int:
    return int(x.nbytes)


def _copy(x: Any) -> Any:
    return x.copy()


class _Turn:
    """One rank computes at a time between collective calls (:func:`run_simulated`).

    Ranks run as threads; letting them all run NumPy at once oversubscribes the cores (each
    BLAS call also starts its own threads: 50x slower on two cores). A rank takes the turn when
    it starts, gives it up while it waits in a collective call, and takes it back after.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = threading.local()

    def held(self) -> bool:
        return bool(getattr(self._owner, "held", False))

    def acquire(self) -> None:
        self._lock.acquire()
        self._owner.held = True

    def release(self) -> None:
        self._owner.held = False
        self._lock.release()


class SimulatedGroup:
    """The shared state of ``world_size`` simulated ranks (slots and a barrier).

    Parameters
    ----------
    world_size : int
    timeout_s : float
        How long a rank waits at the barrier before the whole group fails (a rank that
        skipped a collective call would otherwise hang the others).
    """

    def __init__(self, world_size: int, timeout_s: float = 120.0) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        self.world_size = int(world_size)
        self._barrier = threading.Barrier(self.world_size, timeout=timeout_s)
        self._slots: list[Any] = [None] * self.world_size
        self._tags: list[str | None] = [None] * self.world_size
        self._turn = _Turn()

    def comms(self) -> list[SimulatedComm]:
        """One communicator per rank."""
        return [SimulatedComm(self, r) for r in range(self.world_size)]

    def abort(self) -> None:
        """Break the barrier: every waiting rank raises ``threading.BrokenBarrierError``."""
        self._barrier.abort()

    def _exchange(self, rank: int, tag: str, value: Any) -> list[Any]:
        self._slots[rank] = value
        self._tags[rank] = tag
        held = self._turn.held()
        if held:
            self._turn.release()
        try:
            self._barrier.wait()
            tags = set(self._tags)
            if len(tags) != 1:  # every rank must be in the same call
                raise RuntimeError(f"rank {rank}: ranks are in different collective calls: {sorted(map(str, tags))}")
            seen = list(self._slots)
            self._barrier.wait()  # nobody overwrites a slot before all have read it
        finally:
            if held:
                self._turn.acquire()
        return seen


class SimulatedComm(Communicator):
    """Rank ``rank`` of a :class:`SimulatedGroup`; each rank must run in its own thread.

    Parameters
    ----------
    group : SimulatedGroup
    rank : int
    """

    def __init__(self, group: SimulatedGroup, rank: int) -> None:
        self.group = group
        self.rank = int(rank)
        self.world_size = group.world_size
        self.stats = CommStats()

    def all_gather(self, x: Any, *, tag: str) -> list[Any]:
        """Every rank's ``x`` in rank order (see :class:`Communicator`)."""
        seen = self.group._exchange(self.rank, tag, x)
        out = [_copy(a) for a in seen]
        others = sum(_nbytes(a) for i, a in enumerate(seen) if i != self.rank)
        self._count(tag, _nbytes(x) * (self.world_size - 1), others)
        return out

    def all_to_all(self, xs: Sequence[Any], *, tag: str) -> list[Any]:
        """``xs[d]`` to rank ``d`` (see :class:`Communicator`)."""
        if len(xs) != self.world_size:
            raise ValueError(f"all_to_all needs one array per rank ({self.world_size}), got {len(xs)}")
        seen = self.group._exchange(self.rank, tag, list(xs))
        out = [_copy(seen[src][self.rank]) for src in range(self.world_size)]
        sent = sum(_nbytes(a) for d, a in enumerate(xs) if d != self.rank)
        recv = sum(_nbytes(a) for s, a in enumerate(out) if s != self.rank)
        self._count(tag, sent, recv)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        self.group._exchange(self.rank, "barrier", None)


def run_simulated(fn: Callable[[Communicator], Any], world_size: int, *, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(comm)`` on ``world_size`` simulated ranks (one thread each); results in rank order.

    Parameters
    ----------
    fn : callable
        Called once per rank with that rank's :class:`SimulatedComm`.
    world_size : int
    timeout_s : float
        Barrier timeout of the group.

    Returns
    -------
    list
        ``fn``'s result of every rank.

    Raises
    ------
    Exception
        The first exception a rank raised (the others are stopped by breaking the barrier),
        with the rank added to its message notes.
    """
    group = SimulatedGroup(world_size, timeout_s)
    comms = group.comms()
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def body(r: int) -> None:
        group._turn.acquire()
        try:
            results[r] = fn(comms[r])
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors[r] = e
            group.abort()
        finally:
            if group._turn.held():
                group._turn.release()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [(r, e) for r, e in enumerate(errors) if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real:
        r, e = real[0]
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"(raised on simulated rank {r} of {world_size})")
        raise e
    broken = [r for r, e in enumerate(errors) if e is not None]
    if broken:
        raise RuntimeError(f"simulated ranks {broken} timed out at a collective call (a rank skipped one?)")
    return results


# --------------------------------------------------------------------------------------------
# NCCL
# --------------------------------------------------------------------------------------------

#: dtypes the NCCL communicator can move, with their header codes.
_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(d) for d in (np.uint8, np.bool_, np.int32, np.int64, np.float16, np.float32, np.float64)
) + (np.dtype(BFLOAT16), np.dtype(np.uint16))  # uint16: bf16 bit patterns of the CuPy path
_MAX_DIMS = 8
_HEADER = 2 + _MAX_DIMS  # dtype code, ndim, shape


def _import_nccl() -> tuple[Any, Any]:
    """``(cupy, cupy.cuda.nccl)``, or :class:`BackendUnavailable` saying why not."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        raise BackendUnavailable(
            "NcclComm needs CuPy with NCCL (pip install cupy-cuda12x or cupy-cuda13x, and NCCL: "
            f"python -m cupyx.tools.install_library --library nccl --cuda 12.x); importing CuPy failed: {e}"
        ) from e
    try:
        from cupy.cuda import nccl
    except Exception as e:
        raise BackendUnavailable(f"NcclComm: CuPy is installed but cupy.cuda.nccl is not: {e}") from e
    if not getattr(nccl, "available", True):
        raise BackendUnavailable("NcclComm: CuPy was built without NCCL (cupy.cuda.nccl.available is False)")
    return cupy, nccl


def nccl_unique_id() -> Any:
    """A fresh NCCL unique id (made once, by one process, and handed to every rank)."""
    _, nccl = _import_nccl()
    return nccl.get_unique_id()


class NcclComm(Communicator):
    """One rank of an NCCL communicator (one process per GPU), through ``cupy.cuda.nccl``.

    NumPy arrays are staged through the GPU (host -> device -> NCCL -> device -> host) and
    come back as NumPy arrays; CuPy arrays stay on the device. Every array moves as raw
    bytes after a header (dtype code, shape) exchange, so any dtype of ``_DTYPES`` (bfloat16
    included) travels and shapes may differ between ranks. ``all_gather`` is ``ncclAllGather``
    of the contributions padded to the largest; ``all_to_all`` is grouped ``ncclSend`` /
    ``ncclRecv`` (NCCL >= 2.7), the own slot a local copy.

    Parameters
    ----------
    rank, world_size : int
    unique_id : object
        From :func:`nccl_unique_id`, made by one process and passed to all.
    device : int, optional
        The GPU of this rank; default ``rank % device count``.

    Raises
    ------
    BackendUnavailable
        CuPy or its NCCL module is missing.
    """

    def __init__(self, rank: int, world_size: int, unique_id: Any, device: int | None = None) -> None:
        cupy, nccl = _import_nccl()
        self._cp, self._nccl = cupy, nccl
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if device is None:
            device = self.rank % cupy.cuda.runtime.getDeviceCount()
        self.device = int(device)
        cupy.cuda.Device(self.device).use()
        self._comm = nccl.NcclCommunicator(self.world_size, unique_id, self.rank)
        self.stats = CommStats()

    @classmethod
    def from_mpi(cls, device: int | None = None) -> NcclComm:
        """Ranks started by ``mpirun``: rank 0 makes the unique id, ``mpi4py`` broadcasts it."""
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise BackendUnavailable(f"NcclComm.from_mpi needs mpi4py: {e}") from e
        world = MPI.COMM_WORLD
        uid = nccl_unique_id() if world.Get_rank() == 0 else None
        uid = world.bcast(uid, root=0)
        return cls(world.Get_rank(), world.Get_size(), uid, device)

    # -- helpers ---------------------------------------------------------------------------

    def _stream(self) -> Any:
        return self._cp.cuda.get_current_stream()

    def _header(self, x: Any) -> np.ndarray:
        dt = np.dtype(x.dtype)
        if dt not in _DTYPES:
            raise TypeError(f"NcclComm cannot move dtype {dt}; supported: {[str(d) for d in _DTYPES]}")
        if x.ndim > _MAX_DIMS:
            raise ValueError(f"NcclComm moves arrays of rank <= {_MAX_DIMS}, got {x.ndim}")
        h = np.zeros(_HEADER, dtype=np.int64)
        h[0], h[1] = _DTYPES.index(dt), x.ndim
        h[2 : 2 + x.ndim] = x.shape
        return h

    def _bytes_on_device(self, x: Any) -> Any:
        """``x`` as a flat uint8 device array."""
        cp = self._cp
        if isinstance(x, np.ndarray):
            return cp.asarray(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
        return cp.ascontiguousarray(x).reshape(-1).view(cp.uint8)

    def _from_bytes(self, buf: Any, header: np.ndarray, like_numpy: bool) -> Any:
        dt = _DTYPES[int(header[0])]
        shape = tuple(int(s) for s in header[2 : 2 + int(header[1])])
        if like_numpy or dt == np.dtype(BFLOAT16):  # CuPy has no bfloat16: such arrays come back on the host
            return self._cp.asnumpy(buf).view(dt).reshape(shape)
        return buf.copy().view(dt).reshape(shape)  # a fresh (aligned) allocation

    def _all_gather_raw(self, send: Any, count: int, dtype: int) -> Any:
        cp, stream = self._cp, self._stream()
        recv = cp.empty(count * self.world_size, dtype=send.dtype)
        if count:
            self._comm.allGather(send.data.ptr, recv.data.ptr, count, dtype, stream.ptr)
        stream.synchronize()
        return recv.reshape(self.world_size, count)

    def _gather_headers(self, h: np.ndarray) -> np.ndarray:
        flat = self._cp.asarray(np.ascontiguousarray(h).reshape(-1))
        got = self._all_gather_raw(flat, flat.size, self._nccl.NCCL_INT64)
        self.stats.control += h.nbytes * (self.world_size - 1)
        return self._cp.asnumpy(got).reshape((self.world_size, *h.shape))

    # -- the interface ---------------------------------------------------------------------

    def all_gather(self, x: Any, *, tag: str) -> list[Any]:
        """Every rank's ``x`` in rank order (see :class:`Communicator`)."""
        like_numpy = isinstance(x, np.ndarray)
        headers = self._gather_headers(self._header(x))
        sizes = [int(np.prod(h[2 : 2 + int(h[1])], dtype=np.int64)) * _DTYPES[int(h[0])].itemsize for h in headers]
        width = -(-max(sizes) // 16) * 16  # every rank's slot 16-byte aligned
        mine = self._bytes_on_device(x)
        send = self._cp.zeros(width, dtype=self._cp.uint8)
        send[: mine.size] = mine
        got = self._all_gather_raw(send, width, self._nccl.NCCL_UINT8)
        out = [self._from_bytes(got[r, : sizes[r]], headers[r], like_numpy) for r in range(self.world_size)]
        others = sum(s for r, s in enumerate(sizes) if r != self.rank)
        self._count(tag, sizes[self.rank] * (self.world_size - 1), others)
        self.stats.control += sum(width - s for r, s in enumerate(sizes) if r != self.rank)
        return out

    def all_to_all(self, xs: Sequence[Any], *, tag: str) -> list[Any]:
        """``xs[d]`` to rank ``d`` (see :class:`Communicator`)."""
        W = self.world_size
        if len(xs) != W:
            raise ValueError(f"all_to_all needs one array per rank ({W}), got {len(xs)}")
        like_numpy = all(isinstance(x, np.ndarray) for x in xs)
        headers = self._gather_headers(np.stack([self._header(x) for x in xs]))  # [src, dst, _HEADER]
        mine = headers[:, self.rank]  # what each source sends here
        sizes = [int(np.prod(h[2 : 2 + int(h[1])], dtype=np.int64)) * _DTYPES[int(h[0])].itemsize for h in mine]
        sends = [self._bytes_on_device(x) for x in xs]
        recvs = [self._cp.empty(s, dtype=self._cp.uint8) for s in sizes]
        stream = self._stream()
        self._nccl.groupStart()
        for peer in range(W):
            if peer == self.rank:
                continue
            if sends[peer].size:
                self._comm.send(sends[peer].data.ptr, sends[peer].size, self._nccl.NCCL_UINT8, peer, stream.ptr)
            if sizes[peer]:
                self._comm.recv(recvs[peer].data.ptr, sizes[peer], self._nccl.NCCL_UINT8, peer, stream.ptr)
        self._nccl.groupEnd()
        recvs[self.rank] = sends[self.rank].copy()
        stream.synchronize()
        out = [self._from_bytes(recvs[s], mine[s], like_numpy) for s in range(W)]
        sent = sum(int(b.size) for d, b in enumerate(sends) if d != self.rank)
        recv = sum(s for r, s in enumerate(sizes) if r != self.rank)
        self._count(tag, sent, recv)
        return out

    def barrier(self) -> None:
        """An all-reduce of one integer."""
        cp, stream = self._cp, self._stream()
        one = cp.ones(1, dtype=cp.int64)
        self._comm.allReduce(one.data.ptr, one.data.ptr, 1, self._nccl.NCCL_INT64, self._nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()

    def destroy(self) -> None:
        """Release the NCCL communicator."""
        self._comm.destroy()
