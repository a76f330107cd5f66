"""Array conversion and every input check shared by the layers.

The reference, the Numba layer and the CuPy layer all validate their inputs with the
functions here (SPEC sections 1 to 6), so an input is refused with the same message whatever
backend runs it. Everything below works on shapes and dtypes only, except where a docstring
says it looks at values (:func:`check_finite`, :func:`as_checked_numpy`, :func:`check_scores`).

It imports only the bottom modules :mod:`unisparse_ref._convert` (array conversion, re-exported
here), :mod:`unisparse_ref.config` and :mod:`unisparse_ref.blockmask`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._convert import BFLOAT16, SUPPORTED_DTYPES, dtype_name, to_numpy
from .blockmask import BlockMask
from .config import UniSparseConfig

__all__ = [
    "BFLOAT16",
    "SUPPORTED_DTYPES",
    "to_numpy",
    "dtype_name",
    "check_dtype",
    "check_qkv",
    "check_finite",
    "check_composite_shapes",
    "check_config",
    "check_head_pooling",
    "check_mask_against",
    "check_scores",
    "as_checked_numpy",
    "check_scores_shape",
    "check_cu_seqlens",
    "packed_offsets",
    "check_varlen_qkv",
    "check_varlen_lengths",
    "check_paged_kv",
    "check_paged_qkv",
    "check_packed_mask",
    "check_merge_states",
]

#: Largest offset the packed layouts hold: ``cu_seqlens`` and block tables are int32.
INT32_MAX = 2**31 - 1

def check_dtype(name: str, dtype: Any) -> np.dtype:
    """Raise ``TypeError`` naming ``name`` unless ``dtype`` is one of :data:`SUPPORTED_DTYPES`."""
    dt = np.dtype(dtype)
    if dt not in SUPPORTED_DTYPES:
        allowed = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {dt}; expected one of {allowed}")
    return dt


def check_finite(name: str, x: np.ndarray) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or infinity."""
    finite = np.isfinite(x)  # elementwise on the input dtype (ml_dtypes' bfloat16 included)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(f"{name} holds a non-finite value at index {tuple(int(i) for i in bad)}")


def check_qkv(
    q: Any, k: Any, v: Any, *, causal: bool, shape_only: bool = False
) -> tuple[int, int, int, int, int, int]:
    """Validate attention inputs (SPEC section 1) and return ``(B, Hq, Hkv, Nq, Nk, D)``.

    Only shapes and dtypes are looked at, so this works for any array type with ``.shape``
    and ``.dtype``.

    Raises
    ------
    ValueError
        Wrong rank, mismatched batch / head dim / KV shapes, ``Hq % Hkv != 0``, ``Nq > Nk``
        when causal, empty sequences or head dims.
    TypeError
        Unsupported dtypes, or q, k, v of different dtypes.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
        if len(x.shape) != 4:
            raise ValueError(
                f"{name} must have rank 4 [B, H, N, D], got shape {tuple(x.shape)}"
            )
    if not shape_only:
        dq = check_dtype("q", q.dtype)
        for name, x in (("k", k), ("v", v)):
            if check_dtype(name, x.dtype) != dq:
                raise TypeError(f"{name} has dtype {np.dtype(x.dtype)} but q has {dq}; they must match")
    B, Hq, Nq, D = (int(s) for s in q.shape)
    Bk, Hkv, Nk, Dk = (int(s) for s in k.shape)
    if tuple(int(s) for s in v.shape) != (Bk, Hkv, Nk, Dk):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"k has batch {Bk} but q has batch {B}")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} but q has head dim {D}")
    if min(B, Hq, Hkv, D) < 1:
        raise ValueError(f"q and k must have B, H, D >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Nq < 1:
        raise ValueError(f"q must hold at least one query (Nq >= 1), got shape {tuple(q.shape)}")
    if Nk < 1:
        raise ValueError(f"k must hold at least one key (Nk >= 1), got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv}")
    if causal and Nq > Nk:
        raise ValueError(
            f"causal attention needs Nq <= Nk (queries are the last Nq positions), got Nq={Nq}, Nk={Nk}"
        )
    return B, Hq, Hkv, Nq, Nk, D


def check_head_pooling(Hq: int, Hkv: int, c_h: int) -> None:
    """Raise ``ValueError`` unless ``c_h`` divides the GQA group size ``G = Hq // Hkv`` (SPEC 3)."""
    G = Hq // Hkv
    if G % c_h != 0:
        raise ValueError(f"config.c_h={c_h} must divide the GQA group size G = Hq/Hkv = {G}")


def check_composite_shapes(q_c: Any, k_c: Any, config: Any, nq: Any, nk: Any) -> None:
    """Validate composite tokens for ``block_scores`` (SPEC sections 3 and 4), shapes only.

    Works for any array type with ``.shape`` (no host copy). ``config`` is a
    :class:`~unisparse_ref.UniSparseConfig`.

    Raises
    ------
    ValueError
        Wrong rank, non-positive or non-integer ``nq``/``nk``, ``nq > nk`` when causal, a
        composite length other than ``ceil(nq/c_q)`` / ``ceil(nk/c_k)``, batch or head-dim
        mismatch, or composite heads incompatible with the KV heads and ``c_h``.
    """
    for name, x in (("q_c", q_c), ("k_c", k_c)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"q_c and k_c must have rank 4, got {name} {getattr(x, 'shape', type(x))}")
    if not (isinstance(nq, (int, np.integer)) and isinstance(nk, (int, np.integer))) or nq < 1 or nk < 1:
        raise ValueError(f"nq and nk must be positive ints, got {nq!r}, {nk!r}")
    if config.causal and nq > nk:
        raise ValueError(f"causal scoring needs nq <= nk, got nq={nq}, nk={nk}")
    qs, ks = tuple(int(s) for s in q_c.shape), tuple(int(s) for s in k_c.shape)
    R, C = -(-int(nq) // config.c_q), -(-int(nk) // config.c_k)
    if qs[2] != R:
        raise ValueError(f"q_c has {qs[2]} composite queries, expected ceil(nq/c_q) = {R}")
    if ks[2] != C:
        raise ValueError(f"k_c has {ks[2]} composite keys, expected ceil(nk/c_k) = {C}")
    if qs[0] != ks[0] or qs[3] != ks[3]:
        raise ValueError(f"q_c {qs} and k_c {ks} must agree in batch and head dim")
    Hq = qs[1] * config.c_h
    if Hq % ks[1] != 0 or (Hq // ks[1]) % config.c_h != 0:
        raise ValueError(
            f"q_c has {qs[1]} composite heads (Hq = {Hq} with c_h={config.c_h}), incompatible with {ks[1]} KV heads"
        )


def check_config(config: Any) -> UniSparseConfig:
    """``config``, or ``UniSparseConfig()`` for ``None``; ``TypeError`` for anything else."""
    if config is None:
        return UniSparseConfig()
    if not isinstance(config, UniSparseConfig):
        raise TypeError(f"config must be a UniSparseConfig, got {type(config)!r}")
    return config


def check_no_packed_sinks(config: Any, where: str) -> None:
    """``NotImplementedError`` for the research option ``sink_tokens`` on packed or paged batches.

    The packed layouts hold ``C_i`` composite keys per sequence (a paged cache pools them
    when keys are appended); the un-pooled sinks in front of them are not implemented there.
    ``threshold_mode`` and ``diagonal_correction`` need nothing packed and work. ``where``
    names the refusing function in the message.
    """
    if config.sink_tokens > 0:
        raise NotImplementedError(
            f"{where}: the research option sink_tokens={config.sink_tokens} is not implemented for packed "
            "(varlen) or paged batches; run unisparse_attention per sequence, or use sink_tokens=0"
        )


def check_spec_variants(config: Any, layer: str, supported: tuple[str, ...] | frozenset[str] = ()) -> None:
    """Refuse a config that sets a research variant the layer ``layer`` does not implement.

    The options ``threshold_mode``, ``sink_tokens`` and ``diagonal_correction`` of
    :class:`~unisparse_ref.UniSparseConfig` (the *Calibration* page) run in the NumPy reference
    and the Numba layer; a layer that implements only some of them calls this at the start of
    its scoring, selection and pipeline entry points, naming the ones it implements in
    ``supported``, so that a variant is never silently ignored. ``None`` (the default config)
    passes.

    Raises
    ------
    NotImplementedError
        Naming the option(s) set and not supported, and the layer.
    """
    if config is None or not isinstance(config, UniSparseConfig):
        return
    unsupported = []
    if config.threshold_mode != "total" and "threshold_mode" not in supported:
        unsupported.append(f"threshold_mode={config.threshold_mode!r}")
    if config.sink_tokens != 0 and "sink_tokens" not in supported:
        unsupported.append(f"sink_tokens={config.sink_tokens}")
    if config.diagonal_correction and "diagonal_correction" not in supported:
        unsupported.append("diagonal_correction=True")
    if unsupported:
        raise NotImplementedError(
            f"{layer}: the research option(s) {', '.join(unsupported)} of UniSparseConfig are not implemented "
            "in this layer (they are in the NumPy reference, backend='numpy', and the numba backend)"
        )


def as_checked_numpy(name: str, x: Any) -> np.ndarray:
    """``x`` as a NumPy array of a supported dtype, checked for NaN and infinity (looks at values)."""
    a = to_numpy(x)
    check_dtype(name, a.dtype)
    check_finite(name, a)
    return a


def check_scores(scores: Any) -> np.ndarray:
    """Block scores as a float64 NumPy array ``[B, Hm, nQb, nKb]``, checked finite and non-negative.

    Raises
    ------
    ValueError
        Wrong rank, or a negative or non-finite score.
    """
    s = np.asarray(to_numpy(scores), dtype=np.float64)
    if s.ndim != 4:
        raise ValueError(f"scores must have rank 4 [B, Hm, nQb, nKb], got shape {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("scores must be finite and non-negative")
    return s


def check_scores_shape(shape: tuple[int, ...], config: UniSparseConfig, nq: int, nk: int) -> None:
    """``ValueError`` unless ``shape`` is ``[B, Hm, nQb, nKb]`` for ``nq``, ``nk`` and the block size."""
    S = config.block_size
    want = (-(-int(nq) // S), -(-int(nk) // S))
    if len(shape) != 4 or tuple(int(x) for x in shape[2:]) != want:
        raise ValueError(
            f"scores must have shape [B, Hm, nQb={want[0]}, nKb={want[1]}] for nq={nq}, nk={nk}, "
            f"block_size={S}; got {tuple(shape)}"
        )
    if config.causal and nq > nk:
        raise ValueError(f"causal selection needs nq <= nk, got nq={nq}, nk={nk}")


def check_mask_against(bm: Any, B: int, Hq: int, Hkv: int, Nq: int, Nk: int, config: UniSparseConfig) -> None:
    """Raise unless the :class:`~unisparse_ref.BlockMask` ``bm`` fits inputs of these sizes and ``config``.

    Raises
    ------
    TypeError
        ``bm`` is not a BlockMask.
    ValueError
        Lengths, block size, causality, mask heads or batch disagree.
    """
    if not isinstance(bm, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask, got {type(bm)!r}")
    if (bm.nq, bm.nk) != (Nq, Nk):
        raise ValueError(f"block_mask is for nq={bm.nq}, nk={bm.nk} but the inputs have Nq={Nq}, Nk={Nk}")
    if bm.block_size != config.block_size:
        raise ValueError(f"block_mask.block_size={bm.block_size} differs from config.block_size={config.block_size}")
    if bm.causal != config.causal:
        raise ValueError(f"block_mask.causal={bm.causal} differs from config.causal={config.causal}")
    if Hq % bm.heads_per_mask != 0 or bm.mask.shape[1] != Hq // bm.heads_per_mask:
        raise ValueError(
            f"block_mask has {bm.mask.shape[1]} mask heads with heads_per_mask={bm.heads_per_mask}; "
            f"expected Hq/heads_per_mask = {Hq}/{bm.heads_per_mask}"
        )
    if bm.mask.shape[0] != B:
        raise ValueError(f"block_mask has batch {bm.mask.shape[0]} but q has batch {B}")


# ---------------------------------------------------------------------------- serving layouts
# Packed ragged batches (FlashAttention's varlen convention), paged KV caches and partial
# attention states (docs/layers/serving.md). Sequence ``i`` of a packed array ``x [total, H, D]``
# is ``x[cu[i]:cu[i+1]]``; its length ``N_i = cu[i+1] - cu[i]`` may be 0.


def _integer_vector(name: str, x: Any, ndim: int) -> np.ndarray:
    """``x`` (an array, or a list of ints) as an int64 NumPy array of rank ``ndim``.

    Raises ``TypeError`` unless it holds integers (bool excluded), ``ValueError`` on a wrong
    rank or a value that does not fit int32.
    """
    if isinstance(x, (list, tuple)):
        a = np.asarray(x)
        if a.size == 0:
            a = a.astype(np.int64)
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
        a = to_numpy(x)
    else:
        raise TypeError(f"{name} must be an integer array (int32), got {type(x).__name__}")
    if a.dtype == np.bool_ or a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (int32), got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(a.shape)}")
    a = a.astype(np.int64)
    if a.size and (a.max() > INT32_MAX or a.min() < -INT32_MAX - 1):
        raise ValueError(f"{name} holds a value that does not fit int32")
    return a


def check_cu_seqlens(name: str, cu_seqlens: Any, total: int) -> np.ndarray:
    """Cumulative sequence offsets ``cu_seqlens [batch + 1]`` checked, as an int32 NumPy array.

    Looks at values (a copy to the host for a device array; it is small).

    Parameters
    ----------
    name : str
        Named in the messages (``"cu_seqlens_q"``, ...).
    cu_seqlens : integer array or list of ints, shape ``[batch + 1]``
        Any integer dtype is accepted (FlashAttention's is int32); values must fit int32.
    total : int
        The packed length the offsets must end at (``q.shape[0]`` for ``cu_seqlens_q``).

    Raises
    ------
    TypeError
        Not an integer array (floats and bools are refused, not rounded).
    ValueError
        Rank other than 1, fewer than 2 entries (``batch >= 1``), ``cu[0] != 0``,
        ``cu[-1] != total``, or a decrease (``cu[i+1] < cu[i]``: a negative length).
        Equal neighbours are allowed: an empty sequence.
    """
    cu = _integer_vector(name, cu_seqlens, 1)
    if cu.size < 2:
        raise ValueError(f"{name} must have batch + 1 >= 2 entries, got {cu.size}")
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(cu[0])}")
    steps = np.diff(cu)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(
            f"{name} must be non-decreasing: {name}[{i + 1}] = {int(cu[i + 1])} < {name}[{i}] = {int(cu[i])}"
        )
    if cu[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {name}[-1] = {int(cu[-1])}")
    return cu.astype(np.int32)


def packed_offsets(cu_seqlens: np.ndarray, group: int) -> np.ndarray:
    """Offsets of the groups of ``group`` tokens of every sequence in a packed array, int32 ``[batch + 1]``.

    ``out[i] = sum(ceil(N_j / group) for j < i)`` with ``N_j = cu_seqlens[j+1] - cu_seqlens[j]``:
    with ``group = S`` the offsets of the query blocks (the rows of a packed block mask), with
    ``group = c_q`` or ``c_k`` those of the composite tokens.
    """
    n = np.diff(np.asarray(cu_seqlens, dtype=np.int64))
    return np.concatenate([[0], np.cumsum(-(-n // group))]).astype(np.int32)


def check_varlen_lengths(cu_seqlens_q: np.ndarray, seqlens_k: np.ndarray, causal: bool) -> None:
    """Per-sequence lengths of a ragged batch (SPEC section 1, sequence by sequence).

    ``N_q,i = cu_seqlens_q[i+1] - cu_seqlens_q[i]`` queries against ``seqlens_k[i]`` keys.
    A sequence without queries is allowed (it contributes no rows) whatever its keys;
    a sequence with queries needs at least one key, and ``N_q,i <= N_k,i`` when causal.

    Raises
    ------
    ValueError
        Naming the first sequence that breaks a rule.
    """
    nq = np.diff(np.asarray(cu_seqlens_q, dtype=np.int64))
    nk = np.asarray(seqlens_k, dtype=np.int64)
    if nq.shape != nk.shape:
        raise ValueError(f"{nq.size} query sequences but {nk.size} key sequences")
    no_keys = (nq > 0) & (nk == 0)
    if no_keys.any():
        i = int(np.argmax(no_keys))
        raise ValueError(f"sequence {i} has {int(nq[i])} queries but no key (a sequence with queries needs Nk >= 1)")
    if causal and (nq > nk).any():
        i = int(np.argmax(nq > nk))
        raise ValueError(
            f"causal attention needs Nq <= Nk in every sequence (queries are its last Nq positions); "
            f"sequence {i} has Nq={int(nq[i])}, Nk={int(nk[i])}"
        )


def check_varlen_qkv(
    q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, causal: bool, shape_only: bool = False
) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Validate a packed ragged batch and return ``(cu_seqlens_q, cu_seqlens_k, Hq, Hkv, D)``.

    ``q [total_q, Hq, D]``, ``k``/``v [total_k, Hkv, D]``; the offsets come back as int32
    NumPy arrays (:func:`check_cu_seqlens`), the per-sequence lengths are checked by
    :func:`check_varlen_lengths`. Shapes and dtypes of q, k, v only (any array type).

    Raises
    ------
    ValueError
        Wrong ranks or shapes, ``Hq % Hkv != 0``, bad offsets, batch sizes that differ, or a
        sequence that breaks :func:`check_varlen_lengths`.
    TypeError
        Unsupported or mixed dtypes, non-integer offsets.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
        if len(x.shape) != 3:
            raise ValueError(f"{name} must have rank 3 [total, H, D] (packed), got shape {tuple(x.shape)}")
    if not shape_only:
        dq = check_dtype("q", q.dtype)
        for name, x in (("k", k), ("v", v)):
            if check_dtype(name, x.dtype) != dq:
                raise TypeError(f"{name} has dtype {np.dtype(x.dtype)} but q has {dq}; they must match")
    total_q, Hq, D = (int(s) for s in q.shape)
    total_k, Hkv, Dk = (int(s) for s in k.shape)
    if tuple(int(s) for s in v.shape) != (total_k, Hkv, Dk):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} but q has head dim {D}")
    if min(Hq, Hkv, D) < 1:
        raise ValueError(f"q and k must have H, D >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv}")
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k)
    if cu_q.size != cu_k.size:
        raise ValueError(
            f"cu_seqlens_q has {cu_q.size} entries (batch {cu_q.size - 1}) but cu_seqlens_k has {cu_k.size}"
        )
    check_varlen_lengths(cu_q, np.diff(cu_k), causal)
    return cu_q, cu_k, Hq, Hkv, D


def check_paged_kv(
    k_pages: Any, v_pages: Any, block_table: Any, seqused_k: Any, *, shape_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a paged KV cache and return ``(block_table, seqused_k)`` as int32 NumPy arrays.

    Key ``s`` of sequence ``b`` is ``k_pages[block_table[b, s // page_size], s % page_size]``
    for ``s < seqused_k[b]``; entries of ``block_table`` past ``ceil(seqused_k[b] / page_size)``
    are not read (``-1`` or anything). Pages may be shared by sequences (a common prefix).

    Parameters
    ----------
    k_pages, v_pages : array, shape ``[num_pages, page_size, Hkv, D]``
    block_table : integer array, shape ``[batch, max_pages]``
    seqused_k : integer array, shape ``[batch]``

    Raises
    ------
    ValueError
        Wrong ranks or shapes, a length outside ``[0, max_pages * page_size]``, a used
        block-table entry outside ``[0, num_pages)``.
    TypeError
        Unsupported or mixed dtypes of the pages, non-integer tables.
    """
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
        if len(x.shape) != 4:
            raise ValueError(f"{name} must have rank 4 [num_pages, page_size, Hkv, D], got shape {tuple(x.shape)}")
    if tuple(v_pages.shape) != tuple(k_pages.shape):
        raise ValueError(f"v_pages must have the shape of k_pages {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    if not shape_only and check_dtype("k_pages", k_pages.dtype) != check_dtype("v_pages", v_pages.dtype):
        raise TypeError(f"v_pages has dtype {np.dtype(v_pages.dtype)} but k_pages has {np.dtype(k_pages.dtype)}")
    num_pages, page_size, Hkv, D = (int(s) for s in k_pages.shape)
    if min(num_pages, page_size, Hkv, D) < 1:
        raise ValueError(f"k_pages must have every dimension >= 1, got {tuple(k_pages.shape)}")
    table = _integer_vector("block_table", block_table, 2)
    used = _integer_vector("seqused_k", seqused_k, 1)
    if used.shape[0] != table.shape[0]:
        raise ValueError(f"seqused_k has {used.shape[0]} sequences but block_table has {table.shape[0]} rows")
    capacity = table.shape[1] * page_size
    if (used < 0).any() or (used > capacity).any():
        b = int(np.argmax((used < 0) | (used > capacity)))
        raise ValueError(
            f"seqused_k[{b}] = {int(used[b])} must lie in [0, max_pages * page_size = {capacity}]"
        )
    pages_used = -(-used // page_size)
    read = np.arange(table.shape[1])[None, :] < pages_used[:, None]
    bad = read & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, p = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{b}, {p}] = {int(table[b, p])} is read but lies outside [0, {num_pages})")
    return table.astype(np.int32), used.astype(np.int32)


def check_paged_qkv(
    q: Any, k_pages: Any, v_pages: Any, cu_seqlens_q: Any, block_table: Any, seqused_k: Any, *, causal: bool,
    shape_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """Validate packed queries against a paged KV cache; return ``(cu_seqlens_q, block_table, seqused_k, Hq, Hkv, D)``.

    ``q [total_q, Hq, D]``; the pages, block table and lengths as in :func:`check_paged_kv`;
    ``cu_seqlens_q [batch + 1]`` with one sequence per block-table row, and every sequence
    checked by :func:`check_varlen_lengths` against ``seqused_k`` (its queries are its last
    ``N_q,b`` positions).

    Raises
    ------
    ValueError
        Any shape, offset or length that disagrees.
    TypeError
        Unsupported or mixed dtypes, non-integer offsets or tables.
    """
    if not hasattr(q, "shape") or not hasattr(q, "dtype"):
        raise TypeError(f"q must be an array with .shape and .dtype, got {type(q)!r}")
    if len(q.shape) != 3:
        raise ValueError(f"q must have rank 3 [total_q, Hq, D] (packed), got shape {tuple(q.shape)}")
    table, used = check_paged_kv(k_pages, v_pages, block_table, seqused_k, shape_only=shape_only)
    if not shape_only and check_dtype("q", q.dtype) != np.dtype(k_pages.dtype):
        raise TypeError(f"k_pages has dtype {np.dtype(k_pages.dtype)} but q has {np.dtype(q.dtype)}; they must match")
    total_q, Hq, D = (int(s) for s in q.shape)
    Hkv, Dk = int(k_pages.shape[2]), int(k_pages.shape[3])
    if Dk != D:
        raise ValueError(f"k_pages has head dim {Dk} but q has head dim {D}")
    if Hq < 1 or Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a positive multiple of k/v heads Hkv={Hkv}")
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
    if cu_q.size - 1 != used.size:
        raise ValueError(f"cu_seqlens_q describes {cu_q.size - 1} sequences but block_table has {used.size} rows")
    check_varlen_lengths(cu_q, used, causal)
    return cu_q, table, used, Hq, Hkv, D


def check_packed_mask(
    kv_counts: Any, kv_indices: Any, cu_seqlens_q: np.ndarray, seqlens_k: np.ndarray, block_size: int,
    num_mask_heads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the packed index form of per-sequence block masks; return ``(counts, indices, cu_qblocks)``.

    The packed form stacks every sequence's query blocks: row ``cu_qblocks[i] + qi`` is query
    block ``qi`` of sequence ``i``, with ``cu_qblocks = packed_offsets(cu_seqlens_q, S)``.
    ``kv_counts [Hm, total_qb]`` counts the selected key blocks of a row and
    ``kv_indices [Hm, total_qb, W]`` lists them ascending, local to the sequence (in
    ``[0, nKb_i)``), padded with ``-1`` (``W >= max_i nKb_i``). Looks at values (host copies).

    Raises
    ------
    ValueError
        Wrong shapes, a count outside ``[0, nKb_i]``, or a counted index outside
        ``[0, nKb_i)``.
    TypeError
        Non-integer arrays.
    """
    counts = _integer_vector("kv_counts", kv_counts, 2)
    idx = _integer_vector("kv_indices", kv_indices, 3)
    cu_qb = packed_offsets(cu_seqlens_q, block_size)
    total_qb = int(cu_qb[-1])
    nkb = -(-np.asarray(seqlens_k, dtype=np.int64) // block_size)
    if counts.shape != (num_mask_heads, total_qb):
        raise ValueError(f"kv_counts must have shape [Hm={num_mask_heads}, total_qb={total_qb}], got {counts.shape}")
    width = int(nkb.max(initial=0))
    if idx.shape[:2] != counts.shape or idx.shape[2] < max(width, 1):
        raise ValueError(
            f"kv_indices must have shape [Hm={num_mask_heads}, total_qb={total_qb}, W >= {max(width, 1)}], "
            f"got {idx.shape}"
        )
    row_nkb = np.repeat(nkb, np.diff(cu_qb))  # nKb of the sequence of every packed row
    if (counts < 0).any() or (counts > row_nkb[None, :]).any():
        g, r = (int(x) for x in np.argwhere((counts < 0) | (counts > row_nkb[None, :]))[0])
        raise ValueError(f"kv_counts[{g}, {r}] = {int(counts[g, r])} lies outside [0, nKb = {int(row_nkb[r])}]")
    used = np.arange(idx.shape[2])[None, None, :] < counts[..., None]
    bad = used & ((idx < 0) | (idx >= row_nkb[None, :, None]))
    if bad.any():
        g, r, s = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"kv_indices[{g}, {r}, {s}] = {int(idx[g, r, s])} lies outside [0, nKb = {int(row_nkb[r])})")
    return counts.astype(np.int32), idx.astype(np.int32), cu_qb


def check_merge_states(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> None:
    """Validate two partial attention states for merging (shapes only, any array type).

    ``out_a``, ``out_b``: the same shape ``[..., D]``; ``lse_a``, ``lse_b``: ``out``'s shape
    without ``D`` (``[B, Hq, Nq]`` for ``[B, Hq, Nq, D]``; for the packed ``[total_q, Hq, D]``
    pass the varlen ``lse [Hq, total_q]`` transposed, ``lse.T``, a view).

    Raises
    ------
    ValueError
        Shapes that disagree.
    TypeError
        Arguments that are not arrays.
    """
    for name, x in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array with .shape and .dtype, got {type(x)!r}")
    sa, sb = tuple(int(s) for s in out_a.shape), tuple(int(s) for s in out_b.shape)
    if len(sa) < 2:
        raise ValueError(f"out_a must have rank >= 2 ([..., D] with at least one row axis), got shape {sa}")
    if sa != sb:
        raise ValueError(f"out_a {sa} and out_b {sb} must have the same shape")
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(int(s) for s in x.shape) != sa[:-1]:
            raise ValueError(
                f"{name} must have out's shape without D, {sa[:-1]}, got {tuple(x.shape)} "
                f"(for the packed layout pass lse.T)"
            )
