"""The byte-level BPE tokenizer of a GGUF (GPT-2 style), rebuilt with the ``tokenizers`` package.

The GGUF holds the vocabulary (tokens in GPT-2's byte-to-unicode alphabet), the merges in
priority order and the token types (3 = control). SmolLM2's pre-tokenizer (``tokenizer.ggml.pre
= "smollm"``, the StarCoder rule in llama.cpp) splits every digit on its own, then applies the
GPT-2 byte-level regex without a prefix space; the decoder maps the byte alphabet back to UTF-8.
Control tokens (``<|im_start|>``, ``<|endoftext|>``, ...) are matched as whole special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .gguf_loader import INSTALL_HINT, ModelNotInstalledError

__all__ = ["BPETokenizer"]

#: Pre-tokenizer names of llama.cpp this module reproduces.
_SUPPORTED_PRE = ("smollm", "starcoder", "refact", "codeshell")


class BPETokenizer:
    """Byte-level BPE from a GGUF vocabulary and merges.

    Parameters
    ----------
    tokens : sequence of str
        Vocabulary, index = token id.
    merges : sequence of str
        ``"left right"`` pairs, highest priority first.
    token_types : int array ``[vocab]``, optional
        Tokens of type 3 (control) become special tokens.
    pre : str
        llama.cpp's ``tokenizer.ggml.pre`` (only the StarCoder family is supported).
    eos_token_id, bos_token_id : int, optional

    Raises
    ------
    ModelNotInstalledError
        When ``tokenizers`` is not installed.
    ValueError
        For an unsupported pre-tokenizer.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Any = None,
        *,
        pre: str = "smollm",
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
    ) -> None:
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ModelNotInstalledError(f"the package 'tokenizers' is needed: {INSTALL_HINT}") from e
        if pre not in _SUPPORTED_PRE:
            raise ValueError(f"pre-tokenizer {pre!r} is not supported (supported: {_SUPPORTED_PRE})")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
        tk.decoder = decoders.ByteLevel()
        types = np.zeros(len(tokens), dtype=np.int32) if token_types is None else np.asarray(token_types)
        self.special_tokens = [tokens[i] for i in np.flatnonzero(types == 3)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.special_tokens])
        self._tk = tk
        self.vocab_size = len(tokens)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, int64 ``[n]``; special-token strings (``<|im_start|>``) become
        their ids. No BOS is added (SmolLM2's ``add_bos_token`` is false)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.asarray(self._tk.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Any, *, skip_special: bool = False) -> str:
        """Text of token ids (any integer sequence or array)."""
        return self._tk.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=skip_special)

    def tokens_of(self, ids: Any) -> list[str]:
        """The vocabulary strings of ``ids`` (byte alphabet, for display)."""
        return [self._tk.id_to_token(int(i)) for i in np.asarray(ids).ravel()]

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, special={len(self.special_tokens)})"
