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

__all__ = ["block_scores", "kv_head_of_mask_head", "variant_log_weights"]

#: Elements of one float64 logits chunk ``[B, Hq, rows, keys]`` (128 MiB): memory stays
#: bounded because scoring and attention run over chunks of rows.
_CHUNK_ELEMENTS = 1 << 24


def kv_head_of_mask_head(num_mask_heads: int, c_h: int, group_size: int) -> np.ndarray:
    """KV head of every composite head ``g``: ``(g * c_h) // G``, int64 ``[Hm]``."""
    return (np.arange(num_mask_heads, dtype=np.int64) * c_h) // group_size


def _check_composite(q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> tuple[np.ndarray, np.ndarray]:
    q_c = np.asarray(to_numpy(q_c), dtype=np.float64)
    k_c = np.asarray(to_numpy(k_c), dtype=np.float64)
    t = config.sink_tokens
    if t > 0:  # research variant: t un-pooled sink keys in front of the C composite keys
        if k_c.ndim != 4 or k_c.shape[2] <= t:
            raise ValueError(f"with sink_tokens={t}, k_c must be [B, Hkv, {t} + C, D]; got {k_c.shape}")
        check_composite_shapes(q_c, k_c[:, :, t:], config, nq, nk)
    else:
        check_composite_shapes(q_c, k_c, config, nq, nk)
    return q_c, k_c


def variant_log_weights(config: UniSparseConfig, nq: int, nk: int) -> tuple[np.ndarray, np.ndarray]:
    """Column geometry and softmax log-weights of the research variants (not SPEC).

    The columns are the ``t = config.sink_tokens`` un-pooled sink keys followed by the ``C``
    composite keys; column ``j`` stands for the keys ``[lo_j, hi_j)`` (sinks: ``[s, s+1)``;
    composite 0: ``[t, min(c_k, Nk))``; composite ``c > 0``: SPEC's group). For composite query
    ``r`` (tokens ``[r*c_q, min((r+1)*c_q, Nq))``) the weight of column ``j`` is

    - visibility: 0 when invisible (sinks: ``s <= p(last(r))``; composites: SPEC section 4);
    - ``sink_tokens > 0``: times ``hi_j - lo_j``, the number of keys the column stands for;
    - ``diagonal_correction``: times ``#{(t, s): t in r, s in [lo_j, hi_j), s <= p(t)} /
      (|r| * (hi_j - lo_j))``, the exact share of causally visible token pairs.

    Returns
    -------
    key_block : int64 ``[t + C]``
        The key block of every column.
    log_w : float64 ``[R, t + C]``
        ``log`` of the weight, ``-inf`` where it is 0; added to the logits before the softmax.
    """
    t, c_q, c_k, S = config.sink_tokens, config.c_q, config.c_k, config.block_size
    R, C = geometry.cdiv(nq, c_q), geometry.cdiv(nk, c_k)
    lo = np.concatenate([np.arange(t), np.arange(C) * c_k]).astype(np.int64)
    hi = np.concatenate([np.arange(t) + 1, np.minimum((np.arange(C) + 1) * c_k, nk)]).astype(np.int64)
    lo[t] = t  # composite 0 starts after the sinks (t < c_k)
    hi = np.minimum(hi, nk)
    n = np.maximum(hi - lo, 0).astype(np.float64)  # keys per column (0: an empty composite 0)
    key_block = np.where(np.arange(t + C) < t, 0, (np.arange(t + C) - t) * c_k // S).astype(np.int64)

    pos = np.arange(nq) + (nk - nq)  # p(t) of every query token
    weight = np.ones((R, t + C))
    if config.causal:
        last = np.minimum((np.arange(R) + 1) * c_q, nq) - 1
        first_key = np.concatenate([np.arange(t), np.arange(C) * c_k])  # SPEC: a group is visible if its first token is
        weight *= first_key[None, :] <= pos[last][:, None]
    if config.diagonal_correction and config.causal:
        # visible pairs of query token t and column j: clip(p(t) - lo_j + 1, 0, n_j); mean over t in r
        per_token = np.clip(pos[:, None] - lo[None, :] + 1, 0, n[None, :])  # [Nq, t + C]
        group = np.arange(nq) // c_q
        pairs = np.zeros((R, t + C))
        np.add.at(pairs, group, per_token)
        q_count = np.bincount(group, minlength=R).astype(np.float64)  # tokens per query group
        share = pairs / (q_count[:, None] * np.where(n > 0, n, 1.0)[None, :])
        weight *= share
    if t > 0:
        weight *= n[None, :]
    with np.errstate(divide="ignore"):
        log_w = np.where(weight > 0, np.log(np.where(weight > 0, weight, 1.0)), -np.inf)
    return key_block, log_w


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

    Research variants (not SPEC; see :class:`~unisparse_ref.UniSparseConfig`): with
    ``sink_tokens = t > 0`` ``k_c`` is ``[B, Hkv, t + C, D]`` (the first ``t`` keys un-pooled, as
    :func:`~unisparse_ref.reference.pooling.compress` returns it); with ``sink_tokens`` or
    ``diagonal_correction`` set, the logits get the log-weights of
    ``variant_log_weights`` before the softmax. Otherwise the computation is SPEC's, bit for bit.
    """
    config = check_config(config)
    q_c, k_c = _check_composite(q_c, k_c, config, nq, nk)
    if config.sink_tokens > 0 or config.diagonal_correction:
        # Research variants: column j of a composite row also gets log_w[r, j] (-inf: invisible).
        key_block, log_w = variant_log_weights(config, nq, nk)  # [W], [R, W]
        return _summed_softmax(q_c, k_c, config, nq, nk, key_block, lambda r0, r1, x: x + log_w[r0:r1])
    # SPEC: every column is a composite key; invisible ones are left out of the softmax.
    k_block_of_c = (np.arange(k_c.shape[2]) * config.c_k) // config.block_size
    visible = geometry.composite_visibility(nq, nk, config.c_q, config.c_k, config.causal)
    return _summed_softmax(q_c, k_c, config, nq, nk, k_block_of_c,
                           lambda r0, r1, x: np.where(visible[r0:r1], x, -np.inf))


def _summed_softmax(q_c: np.ndarray, k_c: np.ndarray, config: UniSparseConfig, nq: int, nk: int,
                    key_block: np.ndarray, mask_logits: Any) -> np.ndarray:
    """The row softmax over the key columns, summed into blocks (the body of :func:`block_scores`).

    ``A[r, :] = softmax(mask_logits(scale * Qh[r] . K[:]))`` over the ``W`` columns of ``k_c``
    (column ``j`` in key block ``key_block[j]``), then
    ``scores[i, j] = (1/R_i) * sum(A[r, c] for r in query block i, c in key block j)``.
    ``mask_logits(r0, r1, logits)`` returns the logits of rows ``[r0, r1)`` with the invisible
    columns at ``-inf`` (and any additive weights), ``[B, Hm, rows, W]``.
    """
    B, Hm, R, D = q_c.shape
    Hkv, W = k_c.shape[1], k_c.shape[2]
    G = Hm * config.c_h // Hkv
    S = config.block_size
    scale = config.scale_for(D)
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    k_heads = k_c[:, kv_head_of_mask_head(Hm, config.c_h, G)]  # [B, Hm, W, D]: head g reads KV head (g*c_h)//G
    q_block_of_r = (np.arange(R) * config.c_q) // S
    r_per_block = geometry.composite_counts_per_block(nq, config.c_q, S).astype(np.float64)

    # One-hot [W, nKb] matrix that sums key columns into key blocks.
    col_to_block = np.zeros((W, nkb))
    col_to_block[np.arange(W), key_block] = 1.0

    scores = np.zeros((B, Hm, nqb, nkb), dtype=np.float64)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hm * W))
    for r0 in range(0, R, rows_per_chunk):
        r1 = min(R, r0 + rows_per_chunk)
        logits = mask_logits(r0, r1, scale * (q_c[:, :, r0:r1] @ np.swapaxes(k_heads, -1, -2)))  # [B, Hm, rows, W]
        logits -= logits.max(axis=-1, keepdims=True)  # every row sees key column 0
        A = np.exp(logits)
        A /= A.sum(axis=-1, keepdims=True)
        per_block = A @ col_to_block  # [B, Hm, rows, nKb]: sum over the columns of key block j
        # sum over r in query block i (unbuffered add: several rows share a block)
        np.add.at(scores, (slice(None), slice(None), q_block_of_r[r0:r1]), per_block)
    return scores / r_per_block[None, None, :, None]
