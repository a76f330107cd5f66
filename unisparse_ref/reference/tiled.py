"""Block-sparse attention walked tile by tile with the online softmax, in NumPy.

This is the algorithm the Numba and CuPy kernels implement (FlashAttention-2's forward),
written out for teaching and tested against the naive masked softmax of
:mod:`unisparse_ref.reference.attention`. It loops in Python over ``(b, h, i)`` and over the selected
key blocks of each query block, so it is slow; use it on small inputs.

For one query block ``Q_i`` (``Br`` rows) and its selected key blocks ``j_1 < j_2 < ...``:

.. code-block:: text

    m_i = -inf, l_i = 0, O_i = 0                       # running max, sum, unnormalised output
    for j in selected(i):
        S_ij = scale * Q_i K_j^T   (-inf where s > p(t) when causal)
        m_new = max(m_i, rowmax(S_ij))
        P_ij = exp(S_ij - m_new)
        l_i  = exp(m_i - m_new) * l_i + rowsum(P_ij)
        O_i  = exp(m_i - m_new) * O_i + P_ij V_j
        m_i  = m_new
    out_i = O_i / l_i,  lse_i = m_i + log(l_i)          # rows with l_i = 0: out 0, lse -inf

Rescaling by ``exp(m_old - m_new)`` keeps every partial sum equal to the dense one up to a
common factor, so the final division gives exactly the softmax over all selected keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from .._arrays import as_checked_numpy, check_config, check_mask_against, check_qkv
from ..blockmask import BlockMask
from ..config import UniSparseConfig

__all__ = ["online_softmax_update", "tiled_block_sparse_attention"]


def online_softmax_update(
    m: np.ndarray, l: np.ndarray, acc: np.ndarray, s: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of the online softmax for one tile.

    Parameters
    ----------
    m, l : float64 ``[Br]``
        Running row max and row sum of ``exp(S - m)`` so far.
    acc : float64 ``[Br, D]``
        Running ``sum exp(S - m) V``.
    s : float64 ``[Br, Bc]``
        Scaled logits of the tile, ``-inf`` where masked.
    v : float64 ``[Bc, D]``
        The value tile.

    Returns
    -------
    m, l, acc : the updated running state.
    """
    m_new = np.maximum(m, s.max(axis=1))
    # A row that has seen only masked keys keeps m = -inf; shift it by 0 to avoid inf - inf.
    shift = np.where(np.isfinite(m_new), m_new, 0.0)
    p = np.exp(s - shift[:, None])
    alpha = np.exp(np.where(np.isfinite(m), m, -np.inf) - shift)  # exp(m_old - m_new)
    l_new = alpha * l + p.sum(axis=1)
    acc_new = alpha[:, None] * acc + p @ v
    return m_new, l_new, acc_new


def tiled_block_sparse_attention(
    q: Any, k: Any, v: Any, block_mask: BlockMask, config: UniSparseConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FlashAttention-style block-sparse attention over the selected blocks (float64).

    Same parameters, shapes and edge semantics as
    :func:`unisparse_ref.reference.attention.block_sparse_attention`; query tiles are ``Br = S`` rows and
    key tiles ``Bc = S`` keys, walked in ascending block order.
    """
    config = check_config(config)
    q, k, v = (as_checked_numpy(n, x).astype(np.float64) for n, x in (("q", q), ("k", k), ("v", v)))
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, causal=block_mask.causal)
    check_mask_against(block_mask, B, Hq, Hkv, Nq, Nk, config)
    S, G = block_mask.block_size, Hq // Hkv
    scale = config.scale_for(D)
    kv_counts, kv_indices = block_mask.numpy().to_indices()
    out = np.zeros((B, Hq, Nq, D))
    lse = np.zeros((B, Hq, Nq), dtype=np.float32)
    for b in range(B):
        for h in range(Hq):
            g = h // block_mask.heads_per_mask  # mask head
            kvh = h // G  # KV head
            for i in range(geometry.num_blocks(Nq, S)):
                t = np.arange(i * S, min((i + 1) * S, Nq))
                m = np.full(t.size, -np.inf)
                l = np.zeros(t.size)
                acc = np.zeros((t.size, D))
                for j in kv_indices[b, g, i, : kv_counts[b, g, i]]:
                    s_idx = np.arange(j * S, min((j + 1) * S, Nk))
                    s = scale * (q[b, h, t] @ k[b, kvh, s_idx].T)
                    if block_mask.causal:
                        # Only the diagonal tiles have masked entries; others pass unchanged.
                        s = np.where(geometry.token_causal_mask(t, Nq, Nk, True)[:, s_idx], s, -np.inf)
                    m, l, acc = online_softmax_update(m, l, acc, s, v[b, kvh, s_idx])
                empty = l == 0
                out[b, h, t] = np.where(empty[:, None], 0.0, acc / np.where(empty, 1.0, l)[:, None])
                lse[b, h, t] = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))
    return out, lse
