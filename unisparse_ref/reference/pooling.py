"""Stage 1 of the reference: composite tokens by average pooling (SPEC section 3).

Notation: ``B`` batch, ``Hq``/``Hkv`` query and key/value heads, ``N`` length, ``D`` head dim,
``R = ceil(Nq/c_q)`` composite queries, ``C = ceil(Nk/c_k)`` composite keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from .._arrays import as_checked_numpy, check_config, check_head_pooling, check_qkv
from ..config import UniSparseConfig

__all__ = ["compress", "pool_heads", "pool_sequence"]


def pool_sequence(x: np.ndarray, c: int) -> np.ndarray:
    """Average-pool groups of ``c`` consecutive tokens (SPEC section 3).

    Parameters
    ----------
    x : array, shape ``[B, H, N, D]``
    c : int
        Pooling factor.

    Returns
    -------
    numpy.ndarray of float64, shape ``[B, H, ceil(N/c), D]``
        ``out[b, h, r] = mean(x[b, h, t] for t in [r*c, min((r+1)*c, N)))``: the last group
        averages only the tokens that exist.
    """
    x = np.asarray(x, dtype=np.float64)
    B, H, N, D = x.shape
    groups = geometry.cdiv(N, c)
    padded = np.zeros((B, H, groups * c, D), dtype=np.float64)
    padded[:, :, :N] = x
    sums = padded.reshape(B, H, groups, c, D).sum(axis=3)
    counts = np.full(groups, c, dtype=np.float64)
    counts[-1] = N - (groups - 1) * c
    return sums / counts[None, None, :, None]


def pool_heads(x: np.ndarray, c_h: int) -> np.ndarray:
    """Average groups of ``c_h`` consecutive heads: ``[B, H, R, D] -> [B, H/c_h, R, D]``."""
    x = np.asarray(x, dtype=np.float64)
    B, H, R, D = x.shape
    if H % c_h != 0:
        raise ValueError(f"c_h={c_h} must divide the number of heads {H}")
    return x.reshape(B, H // c_h, c_h, R, D).mean(axis=2)


def compress(q: Any, k: Any, config: UniSparseConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Composite tokens: pool queries over ``c_q`` tokens and ``c_h`` heads, keys over ``c_k``.

    Parameters
    ----------
    q : array, shape ``[B, Hq, Nq, D]``
    k : array, shape ``[B, Hkv, Nk, D]``
    config : UniSparseConfig, optional

    Returns
    -------
    q_c : float64, shape ``[B, Hq/c_h, R, D]``
        ``Qh[b, g, r]``, sequence pooling then head pooling (both means; they commute).
    k_c : float64, shape ``[B, Hkv, C, D]``
        ``Kc[b, h, c]``; keys are never pooled across heads.
    """
    config = check_config(config)
    q, k = as_checked_numpy("q", q), as_checked_numpy("k", k)
    _, Hq, Hkv, _, _, _ = check_qkv(q, k, k, causal=config.causal)
    check_head_pooling(Hq, Hkv, config.c_h)
    q_c = pool_heads(pool_sequence(q, config.c_q), config.c_h)
    k_c = pool_sequence(k, config.c_k)
    return q_c, k_c
