"""Seeded synthetic workloads whose attention looks like a long-context model's.

Plain Gaussian q and k give nearly uniform attention, on which no sparse method can work.
Real prefill attention has structure, which these generators plant on purpose:

* **attention sinks**: the first few keys take a large share of every query's attention;
* **local decay**: as with rotary position embeddings (RoPE), ``q_t . k_s`` is largest for
  nearby positions and decays with ``|t - s|``;
* **needles**: a few planted query-key pairs far apart (retrieval), which a selector must
  find from the compressed scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Workload", "rope", "demo_workload", "structured_workload"]


@dataclass
class Workload:
    """Inputs and ground truth of a synthetic workload.

    Attributes
    ----------
    q : float32 ``[B, Hq, Nq, D]``
    k, v : float32 ``[B, Hkv, Nk, D]``
    needles : list of ``(b, h, query_position, key_position)``
        Planted pairs (``h`` a query head; positions absolute, 0-based).
    description : str
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    needles: list[tuple[int, int, int, int]] = field(default_factory=list)
    description: str = ""


def rope(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Rotary position embedding on the last axis (pairs ``(2i, 2i+1)`` rotated by ``pos * theta_i``).

    Parameters
    ----------
    x : ``[..., N, D]`` with ``D`` even
    positions : ``[N]`` absolute positions
    """
    D = x.shape[-1]
    theta = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # [D/2]
    ang = positions[:, None].astype(np.float64) * theta[None, :]  # [N, D/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x, dtype=np.float64)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def structured_workload(
    n: int = 8192,
    *,
    batch: int = 1,
    q_heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    n_queries: int | None = None,
    n_sinks: int = 4,
    n_needles: int = 4,
    locality: float = 3.0,
    sink_strength: float = 5.0,
    needle_strength: float = 4.0,
    seed: int = 0,
) -> Workload:
    """Queries and keys with sinks, RoPE-like local decay and planted needles.

    Parameters
    ----------
    n : int
        Number of keys ``Nk``.
    n_queries : int, optional
        ``Nq`` (the last ``Nq`` positions); defaults to ``n``.
    locality, sink_strength, needle_strength : float
        Norms (in units of ``sqrt(D)``-scaled logits) of the shared positional component,
        the sink direction and the needle direction.
    seed : int

    Returns
    -------
    Workload
        float32 arrays, deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    nq = n if n_queries is None else n_queries
    D, G = head_dim, q_heads // kv_heads
    sqrt_d = np.sqrt(D)
    pos_k = np.arange(n)
    pos_q = pos_k[n - nq :]

    # A per-KV-head direction shared by q and k: after RoPE, q_t . k_s ~ sum cos((t-s) theta).
    u = rng.standard_normal((batch, kv_heads, 1, D))
    u *= locality * D**0.25 / np.linalg.norm(u, axis=-1, keepdims=True)
    k_raw = u + 0.5 * rng.standard_normal((batch, kv_heads, n, D))
    q_raw = np.repeat(u, G, axis=1) + 0.5 * rng.standard_normal((batch, q_heads, nq, D))
    k = rope(k_raw, pos_k)
    q = rope(q_raw, pos_q)

    # Attention sinks: a direction every query carries and the first keys carry strongly.
    w = rng.standard_normal((batch, kv_heads, 1, D))
    w *= D**0.25 / np.linalg.norm(w, axis=-1, keepdims=True)
    q += sink_strength * np.repeat(w, G, axis=1) / 2
    k[:, :, :n_sinks] += sink_strength * w

    # Needles: a query at depth t strongly retrieves one far-away key s.
    needles: list[tuple[int, int, int, int]] = []
    for _ in range(n_needles):
        b = int(rng.integers(batch))
        h = int(rng.integers(q_heads))
        t = int(rng.integers(max(1, nq // 2), nq))  # query row
        s = int(rng.integers(n_sinks, max(n_sinks + 1, pos_q[t] - 256)))  # far back
        z = rng.standard_normal(D)
        z *= needle_strength * D**0.25 / np.linalg.norm(z)
        lo = max(0, t - 8)
        q[b, h, lo : t + 1] += z  # a short run of queries asks for it
        k[b, h // G, s] += z
        needles.append((b, h, int(pos_q[t]), s))

    v = rng.standard_normal((batch, kv_heads, n, D))
    del sqrt_d
    return Workload(
        q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), needles,
        f"structured: {n} keys, {nq} queries, B={batch}, Hq={q_heads}, Hkv={kv_heads}, D={head_dim}, "
        f"{n_sinks} sinks, {n_needles} needles, seed={seed}",
    )


def demo_workload(n: int = 8192, *, seed: int = 0, head_dim: int = 64) -> Workload:
    """The demo's workload: 8K tokens, B=1, Hq=8, Hkv=2, D=64, seeded."""
    return structured_workload(n, batch=1, q_heads=8, kv_heads=2, head_dim=head_dim, seed=seed)
