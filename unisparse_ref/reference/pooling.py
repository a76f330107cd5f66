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

__all__ = ["compress", "pool_heads", "pool_sequence", "pool_keys_with_sinks"]


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


def pool_keys_with_sinks(k: np.ndarray, c_k: int, sink_tokens: int) -> np.ndarray:
    """Composite keys with the first ``t = sink_tokens`` keys un-pooled (research variant).

    Parameters
    ----------
    k : array, shape ``[B, Hkv, Nk, D]``
    c_k : int
    sink_tokens : int
        ``t``, ``0 <= t < c_k``.

    Returns
    -------
    numpy.ndarray of float64, shape ``[B, Hkv, t + C, D]``
        Columns ``0 .. t-1`` are the keys ``0 .. t-1`` themselves; column ``t + c`` is composite
        key ``c`` of SPEC section 3, except that composite key 0 averages only the keys
        ``t .. min(c_k, Nk) - 1`` (zeros when that range is empty: its weight is then 0 in
        :func:`~unisparse_ref.reference.scores.block_scores`). ``t = 0`` gives SPEC's ``Kc``.
    """
    k = np.asarray(k, dtype=np.float64)
    t = int(sink_tokens)
    pooled = pool_sequence(k, c_k)
    if t == 0:
        return pooled
    Nk = k.shape[2]
    hi = min(c_k, Nk)
    if hi > t:
        pooled[:, :, 0] = k[:, :, t:hi].mean(axis=2)
    else:
        pooled[:, :, 0] = 0.0
    return np.concatenate([k[:, :, : min(t, Nk)], np.zeros(k.shape[:2] + (t - min(t, Nk), k.shape[3])),
                           pooled], axis=2)


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
        ``Kc[b, h, c]``; keys are never pooled across heads. With the research option
        ``config.sink_tokens = t > 0``: ``[B, Hkv, t + C, D]``, the first ``t`` keys un-pooled
        in front (``pool_keys_with_sinks``).
    """
    config = check_config(config)
    q, k = as_checked_numpy("q", q), as_checked_numpy("k", k)
    _, Hq, Hkv, _, _, _ = check_qkv(q, k, k, causal=config.causal)
    check_head_pooling(Hq, Hkv, config.c_h)
    q_c = pool_heads(pool_sequence(q, config.c_q), config.c_h)
    if config.sink_tokens > 0:
        return q_c, pool_keys_with_sinks(k, config.c_k, config.sink_tokens)
    k_c = pool_sequence(k, config.c_k)
    return q_c, k_c
