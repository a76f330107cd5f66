"""Stage 2 of the reference: block importance scores from composite tokens (SPEC section 4).

``Hm = Hq / c_h`` composite (mask) heads; composite head ``g`` reads KV head ``(g * c_h) // G``
with ``G = Hq / Hkv``; ``nQb = ceil(Nq/S)``, ``nKb = ceil(Nk/S)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from .._arrays import check_composite_shapes, check_config, to_numpy
from ..config import UniSparseConfig

__all__ = ["block_scores", "kv_head_of_mask_head"]

#: Elements of one float64 logits chunk ``[B, Hq, rows, keys]`` (128 MiB): memory stays
#: bounded because scoring and attention run over chunks of rows.
_CHUNK_ELEMENTS = 1 << 24


def kv_head_of_mask_head(num_mask_heads: int, c_h: int, group_size: int) -> np.ndarray:
    """KV head of every composite head ``g``: ``(g * c_h) // G``, int64 ``[Hm]``."""
    return (np.arange(num_mask_heads, dtype=np.int64) * c_h) // group_size


def _check_composite(q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> tuple[np.ndarray, np.ndarray]:
    q_c = np.asarray(to_numpy(q_c), dtype=np.float64)
    k_c = np.asarray(to_numpy(k_c), dtype=np.float64)
    check_composite_shapes(q_c, k_c, config, nq, nk)
    return q_c, k_c


def block_scores(
    q_c: Any, k_c: Any, config: UniSparseConfig | None, nq: int, nk: int
) -> np.ndarray:
    """Block importance scores from composite tokens (SPEC section 4).

    ``A[r, :] = softmax(scale * Qh[r] . Kc[c])`` over the composite keys visible to ``r``
    (a global softmax over the whole compressed row), then
    ``scores[i, j] = (1/R_i) * sum(A[r, c] for r in query block i, c in key block j)``.

    Parameters
    ----------
    q_c : array, shape ``[B, Hm, R, D]``
    k_c : array, shape ``[B, Hkv, C, D]``
    config : UniSparseConfig
    nq, nk : int
        The original lengths (positions and visibility depend on them).

    Returns
    -------
    numpy.ndarray of float64, shape ``[B, Hm, nQb, nKb]``
        Each row sums to 1; blocks no composite query of the row sees are 0.
    """
    config = check_config(config)
    q_c, k_c = _check_composite(q_c, k_c, config, nq, nk)
    B, Hm, R, D = q_c.shape
    Hkv, C = k_c.shape[1], k_c.shape[2]
    G = Hm * config.c_h // Hkv
    S = config.block_size
    scale = config.scale_for(D)
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    kv = kv_head_of_mask_head(Hm, config.c_h, G)
    k_heads = k_c[:, kv]  # [B, Hm, C, D], composite head g reads KV head (g*c_h)//G
    visible = geometry.composite_visibility(nq, nk, config.c_q, config.c_k, config.causal)
    q_block_of_r = (np.arange(R) * config.c_q) // S
    k_block_of_c = (np.arange(C) * config.c_k) // S
    r_per_block = geometry.composite_counts_per_block(nq, config.c_q, S).astype(np.float64)

    # One-hot [C, nKb] matrix that sums composite columns into key blocks.
    col_to_block = np.zeros((C, nkb))
    col_to_block[np.arange(C), k_block_of_c] = 1.0

    scores = np.zeros((B, Hm, nqb, nkb), dtype=np.float64)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hm * C))
    for r0 in range(0, R, rows_per_chunk):
        r1 = min(R, r0 + rows_per_chunk)
        logits = scale * (q_c[:, :, r0:r1] @ np.swapaxes(k_heads, -1, -2))  # [B, Hm, rows, C]
        logits = np.where(visible[r0:r1], logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)  # every row sees composite key 0
        A = np.exp(logits)
        A /= A.sum(axis=-1, keepdims=True)
        per_block = A @ col_to_block  # [B, Hm, rows, nKb]: sum over c in key block j
        # sum over r in query block i (unbuffered add: several rows share a block)
        np.add.at(scores, (slice(None), slice(None), q_block_of_r[r0:r1]), per_block)
    return scores / r_per_block[None, None, :, None]
