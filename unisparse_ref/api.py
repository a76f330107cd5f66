"""The one-call entry point: ``unisparse_attention``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._arrays import check_config
from .backends import get_backend
from .blockmask import BlockMask
from .config import UniSparseConfig

__all__ = ["UniSparseResult", "unisparse_attention"]


@dataclass
class UniSparseResult:
    """Everything one UniSparse call computed (arrays of the backend that ran it).

    Attributes
    ----------
    out : ``[B, Hq, Nq, D]``
    lse : float32 ``[B, Hq, Nq]``
    block_mask : BlockMask, ``mask [B, Hq/c_h, nQb, nKb]``
    scores : ``[B, Hq/c_h, nQb, nKb]``
    q_c : ``[B, Hq/c_h, R, D]``
    k_c : ``[B, Hkv, C, D]``
    """

    out: Any
    lse: Any
    block_mask: BlockMask
    scores: Any
    q_c: Any
    k_c: Any


def unisparse_attention(
    q: Any,
    k: Any,
    v: Any,
    config: UniSparseConfig | None = None,
    *,
    backend: str | Any = "numpy",
    return_details: bool = False,
) -> Any:
    """UniSparse attention: compress, score, select, then exact block-sparse attention.

    A backend may provide its own ``unisparse_attention(q, k, v, config)`` returning
    ``(out, lse, block_mask, scores, q_c, k_c)``: the same four stages with less work between
    them (the CuPy backend checks its inputs once and passes the selection's index form
    straight to the attention). Otherwise the four stage methods run one after the other.

    Parameters
    ----------
    q : array, shape ``[B, Hq, Nq, D]``
    k, v : array, shape ``[B, Hkv, Nk, D]``
    config : UniSparseConfig, optional
        Defaults to ``UniSparseConfig()`` (SPEC section 2).
    backend : str or backend object
        ``"numpy"`` (the reference), ``"numba"`` or ``"cupy"``.
    return_details : bool
        Return a :class:`UniSparseResult` instead of ``out`` alone.

    Returns
    -------
    out : ``[B, Hq, Nq, D]``, or a :class:`UniSparseResult`.
    """
    config = check_config(config)
    be = get_backend(backend) if isinstance(backend, str) else backend
    fused = getattr(be, "unisparse_attention", None)
    if fused is not None:  # a backend's own pipeline: the same stages with less host work between them
        out, lse, block_mask, scores, q_c, k_c = fused(q, k, v, config)
    else:
        nq, nk = int(q.shape[2]), int(k.shape[2])
        q_c, k_c = be.compress(q, k, config)
        scores = be.block_scores(q_c, k_c, config, nq, nk)
        block_mask = be.select_blocks(scores, config, nq, nk)
        out, lse = be.block_sparse_attention(q, k, v, block_mask, config)
    if return_details:
        return UniSparseResult(out, lse, block_mask, scores, q_c, k_c)
    return out
