"""Baseline block selectors, re-implemented in NumPy for one harness.

Every selector has the signature ``selector(q, k, v, config, **params) -> BlockMask`` with
``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]`` and returns a mask of the config's block size
``S`` (``heads_per_mask = 1``, one mask head per query head, except :func:`unisparse`, which
follows ``config.c_h``). They run on any workload, with GQA (a query head reads its KV head),
``B > 1``, ragged lengths and non-causal attention, which the original implementations do not
all support. Each docstring cites the paper and lists every simplification; where a method's
rule coincides with SPEC section 5 (top-P with forced blocks, the crossing block kept) the
reference selector is reused.

========================  ===================  ===============================================
name                      swept parameter      scoring
========================  ===================  ===============================================
``unisparse``             ``threshold`` P      composite tokens (SPEC 3-5), the reference
``xattention``            ``threshold``        strided antidiagonal sums, per-row top-P
``flexprefill``           ``gamma``            last-block attention, vertical-slash or pooled
                                               query-aware map with a global cumulative gamma
``minference``            ``budget``           vertical-and-slash from the last 64 queries
``sparge``                ``cdf_threshold``    block-mean pooled q, k; per-row CDF
``oracle``                ``threshold``        top-P on the true dense block mass (upper bound)
``sink_local``            ``n_local``          fixed sink + local window (no scoring)
========================  ===================  ===============================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import geometry
from .. import reference as ref
from .._arrays import check_qkv, to_numpy
from ..blockmask import BlockMask
from ..config import UniSparseConfig

__all__ = [
    "Selector",
    "SELECTORS",
    "unisparse",
    "xattention",
    "flexprefill",
    "minference",
    "sparge",
    "oracle",
    "sink_local",
    "dense_block_mass",
]


# ---------------------------------------------------------------------------- helpers
def _inputs(q: Any, k: Any, config: UniSparseConfig) -> tuple[np.ndarray, np.ndarray, int, int, int, int, int]:
    q, k = (np.asarray(to_numpy(x), dtype=np.float64) for x in (q, k))
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, k, causal=config.causal, shape_only=True)
    return q, k, B, Hq, Nq, Nk, D


def _kv_per_q_head(k: np.ndarray, Hq: int) -> np.ndarray:
    """``k [B, Hkv, N, D] -> [B, Hq, N, D]`` (query head ``h`` reads KV head ``h // G``)."""
    return np.repeat(k, Hq // k.shape[1], axis=1)


def _select(scores: np.ndarray, config: UniSparseConfig, nq: int, nk: int, threshold: float,
            n_sink: int, n_local: int) -> np.ndarray:
    """SPEC section 5 on per-query-head ``scores`` (rows normalised to sum to 1)."""
    s = np.asarray(scores, dtype=np.float64)
    tot = s.sum(axis=-1, keepdims=True)
    s = np.where(tot > 0, s / np.where(tot > 0, tot, 1.0), 0.0)
    cfg = dataclasses.replace(config, threshold=float(min(1.0, max(threshold, 1e-12))), c_h=1,
                              n_sink_blocks=n_sink, n_local_blocks=n_local)
    return ref.select_blocks(s, cfg, nq, nk).mask


def _bm(mask: np.ndarray, config: UniSparseConfig, nq: int, nk: int) -> BlockMask:
    vis = geometry.visible_blocks(nq, nk, config.block_size, config.causal)
    return BlockMask(np.ascontiguousarray(mask & vis), config.block_size, 1, nq, nk, config.causal)


def _block_pool(x: np.ndarray, S: int) -> np.ndarray:
    """Mean over blocks of ``S`` tokens (the tail block divided by its true length)."""
    return ref.pool_sequence(x, S)


def _softmax_rows(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    z = np.where(allowed, logits, -np.inf)
    m = z.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(z - m)
    den = e.sum(axis=-1, keepdims=True)
    return e / np.where(den > 0, den, 1.0)


def _last_queries_attention(q: np.ndarray, kq: np.ndarray, n_last: int, causal: bool, scale: float
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Exact attention of the last ``n_last`` queries: ``(A [B, Hq, n_last, Nk], positions [n_last])``."""
    Nq, Nk = q.shape[2], kq.shape[2]
    n_last = min(n_last, Nq)
    rows = np.arange(Nq - n_last, Nq)
    allowed = geometry.token_causal_mask(rows, Nq, Nk, causal)
    A = _softmax_rows(scale * q[:, :, rows] @ np.swapaxes(kq, -1, -2), allowed)
    return A, rows + (Nk - Nq)


def _offset_profile(A: np.ndarray, pos: np.ndarray, Nk: int) -> np.ndarray:
    """Sum of ``A[..., r, s]`` along diagonals ``delta = pos[r] - s``; index ``delta + Nk - 1``.

    Returns ``[B, Hq, Nk + max(pos)]`` (offsets from ``-(Nk-1)`` to ``max(pos)``).
    """
    B, H, R, _ = A.shape
    size = Nk + int(pos.max())
    out = np.zeros((B, H, size))
    s = np.arange(Nk)
    for r in range(R):
        out[:, :, pos[r] - s + Nk - 1] += A[:, :, r]
    return out


def _slash_block_mask(deltas: np.ndarray, nq: int, nk: int, S: int) -> np.ndarray:
    """Blocks ``(i, j)`` crossed by the diagonals ``s = p(t) - delta`` for any ``delta`` given."""
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    out = np.zeros((nqb, nkb), dtype=bool)
    if deltas.size == 0:
        return out
    first = np.arange(nqb) * S + (nk - nq)  # position of the first query of each block
    last = geometry.last_query_position_of_blocks(nq, nk, S)
    # Key range of each (i, delta): [first_i - delta, last_i - delta] clipped to [0, nk-1];
    # mark its blocks with a difference array (+1 at the first block, -1 past the last).
    lo = first[:, None] - deltas[None, :]
    hi = last[:, None] - deltas[None, :]
    ok = (hi >= 0) & (lo <= nk - 1)
    lo_b = np.clip(lo, 0, nk - 1) // S
    hi_b = np.clip(hi, 0, nk - 1) // S
    diff = np.zeros((nqb, nkb + 1), dtype=np.int64)
    rows = np.broadcast_to(np.arange(nqb)[:, None], lo.shape)
    np.add.at(diff, (rows[ok], lo_b[ok]), 1)
    np.add.at(diff, (rows[ok], hi_b[ok] + 1), -1)
    return np.cumsum(diff, axis=1)[:, :nkb] > 0


# ---------------------------------------------------------------------------- dense block mass
def dense_block_mass(q: Any, k: Any, config: UniSparseConfig) -> np.ndarray:
    """The true block importance: dense attention mass per block, float64 ``[B, Hq, nQb, nKb]``.

    ``mass[b, h, i, j] = mean over rows t of block i of sum over keys s in block j of A[t, s]``
    with ``A`` the dense (causal, bottom-right) softmax of query head ``h``. Rows sum to 1.
    Computed in float64, one query block at a time.
    """
    q, k, B, Hq, Nq, Nk, D = _inputs(q, k, config)
    S, scale = config.block_size, config.scale_for(D)
    kq = _kv_per_q_head(k, Hq)
    nqb, nkb = geometry.num_blocks(Nq, S), geometry.num_blocks(Nk, S)
    out = np.zeros((B, Hq, nqb, nkb))
    for i in range(nqb):
        rows = np.arange(i * S, min((i + 1) * S, Nq))
        allowed = geometry.token_causal_mask(rows, Nq, Nk, config.causal)
        A = _softmax_rows(scale * q[:, :, rows] @ np.swapaxes(kq, -1, -2), allowed)
        pad = np.zeros(A.shape[:-1] + (nkb * S,))
        pad[..., :Nk] = A
        out[:, :, i] = pad.reshape(B, Hq, rows.size, nkb, S).sum(axis=-1).mean(axis=2)
    return out


# ---------------------------------------------------------------------------- selectors
def unisparse(q: Any, k: Any, v: Any, config: UniSparseConfig, *, threshold: float | None = None,
              backend: Any = None) -> BlockMask:
    """UniSparse (arXiv 2512.14082) as specified in SPEC sections 3-5: composite tokens pooled
    over ``c_q``/``c_k`` tokens (and ``c_h`` heads), a global softmax in the compressed space,
    block aggregation, top-P with forced sink and local blocks.

    ``backend`` (a backend object) computes the scores and the selection; default the NumPy
    reference. ``threshold`` overrides ``config.threshold``.
    """
    cfg = config if threshold is None else dataclasses.replace(config, threshold=float(threshold))
    nq, nk = int(q.shape[2]), int(k.shape[2])
    if backend is None:
        q_c, k_c = ref.compress(q, k, cfg)
        return ref.select_blocks(ref.block_scores(q_c, k_c, cfg, nq, nk), cfg, nq, nk)
    q_c, k_c = backend.compress(q, k, cfg)
    bm = backend.select_blocks(backend.block_scores(q_c, k_c, cfg, nq, nk), cfg, nq, nk)
    return bm.numpy()


_XATTN_CACHE: dict[str, Any] = {}


def xattention(q: Any, k: Any, v: Any, config: UniSparseConfig, *, threshold: float = 0.9,
               stride: int = 8) -> BlockMask:
    """XAttention (Xu et al., ICML 2025, arXiv 2503.16428): strided antidiagonal scoring.

    Inside each block, the score sums ``q . k`` along antidiagonals taken at ``stride``: the
    queries are re-laid as ``stride`` reversed phases concatenated along the feature axis
    (``Qr[t'] = concat_i q[t'*stride + stride-1-i]``), the keys as the forward phases
    (``Kr[s'] = concat_i k[s'*stride + i]``), so ``Qr . Kr`` is the antidiagonal sum of a
    ``stride x stride`` tile. A softmax over the reduced keys, scaled by
    ``1 / (sqrt(D) * stride)``, is summed into ``S x S`` blocks; each row keeps blocks by
    score until the cumulative share reaches ``threshold``, with column 0 and the diagonal
    block forced and the crossing block kept (``find_blocks_chunked``).

    Simplifications: no chunking (the whole row at once); the reduced softmax and the block
    sums are those of SPEC section 4 with the antidiagonal vectors as composite tokens (a
    reduced key is visible when its first token is; padded tokens of a ragged tail are zeros);
    GQA shares the KV head (XAttention asserts ``Hq == Hkv``); any batch (it asserts 1);
    ``norm = 1``; no per-head thresholds. ``stride`` must divide ``S``.
    """
    q, k, B, Hq, Nq, Nk, D = _inputs(q, k, config)
    S = config.block_size
    if S % stride:
        raise ValueError(f"stride={stride} must divide block_size={S}")

    def relayout(x: np.ndarray, reverse: bool) -> np.ndarray:
        b, h, n, d = x.shape
        groups = geometry.cdiv(n, stride)
        pad = np.zeros((b, h, groups * stride, d))
        pad[:, :, :n] = x
        g = pad.reshape(b, h, groups, stride, d)
        if reverse:
            g = g[:, :, :, ::-1]
        return g.reshape(b, h, groups, stride * d)

    cfg = dataclasses.replace(config, c_q=stride, c_k=stride, c_h=1, softmax_scale=1.0 / (np.sqrt(D) * stride))
    # The scores do not depend on the threshold: a sweep reuses them (one entry, keyed by content).
    key = (q.shape, k.shape, stride, cfg, hash(q.tobytes()), hash(k.tobytes()))
    if _XATTN_CACHE.get("key") == key:
        scores = _XATTN_CACHE["scores"]
    else:
        qr, kr = relayout(q, True), relayout(k, False)
        scores = ref.block_scores(qr, kr, cfg, Nq, Nk)
        _XATTN_CACHE.update(key=key, scores=scores)
    return _bm(_select(scores, config, Nq, Nk, threshold, 1, 1), config, Nq, Nk)


def _js_distance(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Square root of the Jensen-Shannon divergence (natural log) along the last axis."""
    m = 0.5 * (p + r)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / np.where(m > 0, m, 1.0)), 0.0).sum(-1)
        kl_r = np.where(r > 0, r * np.log(r / np.where(m > 0, m, 1.0)), 0.0).sum(-1)
    return np.sqrt(np.maximum(0.5 * (kl_p + kl_r), 0.0))


def flexprefill(q: Any, k: Any, v: Any, config: UniSparseConfig, *, gamma: float = 0.9, tau: float = 0.1
                ) -> BlockMask:
    """FlexPrefill (Lai et al., ICLR 2025, arXiv 2502.20766): per-head pattern choice.

    1. The last block of ``S`` queries attends every key exactly (causal); the mean over those
       queries is the *vertical* profile, the sums along diagonals (divided by the query
       count) the *slash* profile.
    2. Head classification: ``softmax(mean(q_last) . blockmean(K) / sqrt(D))`` estimates the
       block distribution; if its square-root Jensen-Shannon divergence from the block-pooled
       vertical profile is below ``tau`` the head is *query-aware*.
    3. Every head gets vertical-slash blocks: the fewest vertical tokens (and slash offsets)
       whose cumulative mass reaches ``gamma`` give a budget of ``count // S + 1`` key blocks
       (columns by block-pooled vertical mass) and of block diagonals (by block-pooled slash
       mass); column 0 and the diagonal are forced.
    4. Query-aware heads add the pooled map ``softmax(blockmean(q_i) . blockmean(K) / sqrt(D))``
       (causal over blocks), flattened over all rows, keeping the largest entries until their
       sum reaches ``gamma * nQb`` (a *global* top-p: each row sums to 1).

    Simplifications: ``min_budget``/``max_budget`` are not applied; the token-to-block budget
    uses ``S`` (the original hard-codes 128); a token slash offset ``delta`` marks both block
    diagonals it crosses; the union with vertical-slash for query-aware heads follows the
    research notes; short inputs are not sent to dense attention; any batch, GQA by KV head.
    """
    q, k, B, Hq, Nq, Nk, D = _inputs(q, k, config)
    S, scale = config.block_size, config.scale_for(D)
    nqb, nkb = geometry.num_blocks(Nq, S), geometry.num_blocks(Nk, S)
    kq = _kv_per_q_head(k, Hq)
    vis = geometry.visible_blocks(Nq, Nk, S, config.causal)
    A, pos = _last_queries_attention(q, kq, S, config.causal, scale)
    vertical = A.mean(axis=2)  # [B, Hq, Nk]
    slash = _offset_profile(A, pos, Nk) / A.shape[2]  # [B, Hq, Nk + max(pos)], offset delta at index delta+Nk-1

    # Head classification: estimated vs true block distribution of the last query block.
    kbar = _block_pool(kq, S)  # [B, Hq, nKb, D]
    qbar_last = q[:, :, Nq - A.shape[2]:].mean(axis=2)  # [B, Hq, D]
    est = _softmax_rows(scale * np.einsum("bhd,bhjd->bhj", qbar_last, kbar), vis[-1])
    pad = np.zeros((B, Hq, nkb * S))
    pad[..., :Nk] = vertical
    true_blocks = pad.reshape(B, Hq, nkb, S).sum(-1)
    query_aware = _js_distance(est, true_blocks) < tau  # [B, Hq]

    # Pooled query-aware map.
    qbar = _block_pool(q, S)  # [B, Hq, nQb, D]
    pooled = _softmax_rows(scale * qbar @ np.swapaxes(kbar, -1, -2), vis)  # [B, Hq, nQb, nKb]

    def budget(profile: np.ndarray) -> int:
        srt = np.sort(profile)[::-1]
        c = np.cumsum(srt)
        n_tok = int(np.searchsorted(c, gamma * c[-1] - 1e-15)) + 1 if c[-1] > 0 else 1
        return n_tok // S + 1

    d = geometry.diagonal_blocks(Nq, Nk, S)
    mask = np.zeros((B, Hq, nqb, nkb), dtype=bool)
    deltas_all = np.arange(slash.shape[-1]) - (Nk - 1)
    for b in range(B):
        for h in range(Hq):
            # Vertical: top block columns by pooled vertical mass, column 0 forced.
            nv = budget(vertical[b, h])
            col_score = true_blocks[b, h].copy()
            col_score[0] = np.inf
            cols = np.argsort(-col_score, kind="stable")[:nv]
            m = np.zeros((nqb, nkb), dtype=bool)
            m[:, cols] = True
            # Slash: top block diagonals by pooled slash mass, the diagonal (offset 0) forced.
            ns = budget(slash[b, h])
            groups = np.floor_divide(deltas_all, S)
            gmin = int(groups.min())
            gscore = np.bincount(groups - gmin, weights=slash[b, h])
            gscore[-gmin] = np.inf  # group 0: offsets 0 .. S-1, the diagonal
            chosen = np.argsort(-gscore, kind="stable")[:ns] + gmin
            jb = d[:, None] - chosen[None, :]  # block diagonal g: j = d(i) - g, and g+1 for the crossing
            for off in (0, 1):
                jj = jb - off
                ok = (jj >= 0) & (jj < nkb)
                ii = np.broadcast_to(np.arange(nqb)[:, None], jj.shape)
                m[ii[ok], jj[ok]] = True
            if query_aware[b, h]:
                flat = np.where(vis, pooled[b, h], 0.0).ravel()
                order = np.argsort(-flat, kind="stable")
                c = np.cumsum(flat[order])
                n_take = int(np.searchsorted(c, gamma * nqb - 1e-12)) + 1
                sel = np.zeros(flat.size, dtype=bool)
                sel[order[:n_take]] = True
                m |= sel.reshape(nqb, nkb)
            mask[b, h] = m
    return _bm(mask, config, Nq, Nk)


def minference(q: Any, k: Any, v: Any, config: UniSparseConfig, *, budget: float = 0.05, last_q: int = 64
               ) -> BlockMask:
    """MInference vertical-and-slash (Jiang et al., NeurIPS 2024, arXiv 2407.02490).

    The last ``last_q`` queries attend every key exactly (causal softmax). Column sums give
    the vertical profile, sums along diagonals the slash profile. The top
    ``vertical_size = max(30, budget * Nk)`` columns and top ``slash_size = max(50, budget * Nk)``
    offsets are kept, with the first 30 columns and the last 100 offsets (the local band)
    forced as in the original (``vertical[..., :30] = inf``, ``slash[..., -100:] = inf``).

    Simplifications: the original kernel computes vertical *columns* at token granularity and
    slash lines in 64-row blocks; here both are coarsened to the config's ``S x S`` block mask
    (a block is selected when any chosen column or diagonal crosses it), so the density
    reported over-counts MInference's true work on vertical columns. The per-head pattern
    search (offline, choosing among A-shape, vertical-slash and block-sparse) is not run:
    every head is vertical-slash with the same budget. Any batch, GQA by KV head,
    non-causal handled by signed offsets.
    """
    q, k, B, Hq, Nq, Nk, D = _inputs(q, k, config)
    S, scale = config.block_size, config.scale_for(D)
    nqb, nkb = geometry.num_blocks(Nq, S), geometry.num_blocks(Nk, S)
    kq = _kv_per_q_head(k, Hq)
    A, pos = _last_queries_attention(q, kq, last_q, config.causal, scale)
    vertical = A.sum(axis=2)  # [B, Hq, Nk]
    slash = _offset_profile(A, pos, Nk)  # offset delta at index delta + Nk - 1
    deltas_all = np.arange(slash.shape[-1]) - (Nk - 1)
    v_size = int(min(Nk, max(30, round(budget * Nk))))
    s_size = int(min(slash.shape[-1], max(50, round(budget * Nk))))
    mask = np.zeros((B, Hq, nqb, nkb), dtype=bool)
    for b in range(B):
        for h in range(Hq):
            vs = vertical[b, h].copy()
            vs[:30] = np.inf
            cols = np.argsort(-vs, kind="stable")[:v_size]
            ss = slash[b, h].copy()
            ss[(deltas_all >= 0) & (deltas_all < 100)] = np.inf
            deltas = deltas_all[np.argsort(-ss, kind="stable")[:s_size]]
            m = _slash_block_mask(deltas, Nq, Nk, S)
            m[:, np.unique(cols // S)] = True
            mask[b, h] = m
    return _bm(mask, config, Nq, Nk)


def sparge(q: Any, k: Any, v: Any, config: UniSparseConfig, *, cdf_threshold: float = 0.9,
           attention_sink: bool = True, sim_threshold: float | None = None) -> BlockMask:
    """SpargeAttn-style selection (Zhang et al., ICML 2025, arXiv 2502.18137).

    Queries and keys are mean-pooled over whole blocks (the tail block divided by its true
    length), ``softmax(qbar . kbar / sqrt(D))`` is taken over the visible key blocks, and each
    row keeps blocks by score until the cumulative share reaches ``cdf_threshold`` (the block
    that crosses it kept). ``attention_sink`` forces column 0: on by default here, since every
    other causal selector in this comparison keeps the sink (SpargeAttn's own default is off;
    without it, block-mean pooling dilutes the few sink tokens and the sink block is missed). ``sim_threshold`` enables the
    self-similarity gate: a query block whose tokens' mean pairwise cosine similarity is below
    it keeps its whole row, a key block below it is kept in every row.

    Simplifications: one block size ``S`` for queries and keys (SpargeAttn uses 128 x 64 or
    64 x 128); the gate is off by default (SpargeAttn's top-k API sets ``simthreshd1 = -0.1``,
    which is effectively off); no in-kernel ``pvthreshd`` skipping; no quantisation; any
    batch, GQA by KV head. It is UniSparse with ``c_q = c_k = S`` and no forced blocks.
    """
    q, k, B, Hq, Nq, Nk, D = _inputs(q, k, config)
    S, scale = config.block_size, config.scale_for(D)
    kq = _kv_per_q_head(k, Hq)
    vis = geometry.visible_blocks(Nq, Nk, S, config.causal)
    qbar, kbar = _block_pool(q, S), _block_pool(kq, S)
    scores = _softmax_rows(scale * qbar @ np.swapaxes(kbar, -1, -2), vis)
    mask = _select(scores, config, Nq, Nk, cdf_threshold, 1 if attention_sink else 0, 0)
    if sim_threshold is not None:
        def self_sim(x: np.ndarray) -> np.ndarray:
            b, h, n, d = x.shape
            nb = geometry.num_blocks(n, S)
            out = np.ones((b, h, nb))
            for i in range(nb):
                t = x[:, :, i * S : (i + 1) * S]
                t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
                out[:, :, i] = (t @ np.swapaxes(t, -1, -2)).mean(axis=(-1, -2))
            return out
        mask |= (self_sim(q) < sim_threshold)[..., None]
        mask |= (self_sim(kq) < sim_threshold)[:, :, None, :]
    return _bm(mask, config, Nq, Nk)


def oracle(q: Any, k: Any, v: Any, config: UniSparseConfig, *, threshold: float = 0.9,
           block_mass: np.ndarray | None = None) -> BlockMask:
    """The exact oracle: SPEC section 5's top-P on the *true* dense block mass.

    ``block_mass`` (from :func:`dense_block_mass`, per query head) is computed when not given.
    It is the best any scorer can do under the same selection rule (same forced sink and
    local blocks), so the gap between a method and this line is the cost of its estimate.
    """
    nq, nk = int(q.shape[2]), int(k.shape[2])
    mass = dense_block_mass(q, k, config) if block_mass is None else np.asarray(block_mass)
    return _bm(_select(mass, config, nq, nk, threshold, config.n_sink_blocks, config.n_local_blocks),
               config, nq, nk)


def sink_local(q: Any, k: Any, v: Any, config: UniSparseConfig, *, n_local: int = 2, n_sink: int = 1
               ) -> BlockMask:
    """A fixed window: ``n_sink`` first key blocks plus ``n_local`` blocks ending at the diagonal.

    The StreamingLLM / "A-shape" pattern (Xiao et al., arXiv 2309.17453; MInference's A-shape
    heads) at block granularity: no scoring at all, the lower bound on estimation cost.
    """
    B, Hq, nq, nk = int(q.shape[0]), int(q.shape[1]), int(q.shape[2]), int(k.shape[2])
    f = geometry.forced_blocks(nq, nk, config.block_size, n_sink, int(n_local), config.causal)
    return _bm(np.broadcast_to(f, (B, Hq) + f.shape).copy(), config, nq, nk)


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Selector:
    """A selector and the parameter the evaluation sweeps.

    Attributes
    ----------
    fn : callable ``(q, k, v, config, **{param: value}) -> BlockMask``
    param : str
        The swept keyword.
    values : tuple
        The full sweep; ``quick_values`` the ``--quick`` one.
    paper : str
    """

    fn: Callable[..., BlockMask]
    param: str
    values: tuple
    quick_values: tuple
    paper: str


SELECTORS: dict[str, Selector] = {
    "unisparse": Selector(unisparse, "threshold", (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
                          (0.7, 0.9, 0.98), "arXiv 2512.14082"),
    "xattention": Selector(xattention, "threshold", (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
                           (0.7, 0.9, 0.98), "arXiv 2503.16428"),
    "flexprefill": Selector(flexprefill, "gamma", (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
                            (0.7, 0.9, 0.98), "arXiv 2502.20766"),
    "minference": Selector(minference, "budget", (0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
                           (0.005, 0.02, 0.1), "arXiv 2407.02490"),
    "sparge": Selector(sparge, "cdf_threshold", (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
                       (0.7, 0.9, 0.98), "arXiv 2502.18137"),
    "oracle": Selector(oracle, "threshold", (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
                       (0.7, 0.9, 0.98), "upper bound"),
    "sink_local": Selector(sink_local, "n_local", (1, 2, 4, 8, 16), (1, 4), "arXiv 2309.17453"),
}
