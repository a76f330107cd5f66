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
]

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
