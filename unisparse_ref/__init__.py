"""unisparse-ref: the reference implementation and PyTorch-free GPU kernels of UniSparse.

UniSparse pools queries and keys into composite tokens, scores attention in that
compressed space, keeps the top-P key blocks of every query block and computes exact
attention over those blocks only. See the specification (``docs/spec.md``) and the documentation.

Layout: :mod:`unisparse_ref.reference` (NumPy, the oracle), :mod:`unisparse_ref.numba_backend`
(Numba CUDA prototypes) and :mod:`unisparse_ref.cupy_backend` (CUDA C++ through CuPy) hold the
same four stage modules (``pooling``, ``scores``, ``selection``, ``attention``);
:mod:`unisparse_ref.oracle` checks implementations against the reference and
:mod:`unisparse_ref.evaluation` compares selection methods. Serving-shaped inputs (packed
ragged batches, paged KV caches, merging partial results): :mod:`unisparse_ref.varlen`.
"""

from __future__ import annotations

from ._convert import BFLOAT16, SUPPORTED_DTYPES, to_numpy
from .api import UniSparseResult, unisparse_attention
from .backends import (
    Backend,
    available_backends,
    backend_status,
    get_backend,
    register_backend,
)
from .blockmask import BlockMask
from .config import UniSparseConfig
from .errors import BackendUnavailable
from .reference.paged import PagedKVCache
from .varlen import (
    VarlenResult,
    merge_attention_states,
    unisparse_attention_paged,
    unisparse_attention_varlen,
)

__version__ = "0.1.0"

__all__ = [
    "BFLOAT16",
    "SUPPORTED_DTYPES",
    "Backend",
    "BackendUnavailable",
    "BlockMask",
    "PagedKVCache",
    "UniSparseConfig",
    "UniSparseResult",
    "VarlenResult",
    "__version__",
    "available_backends",
    "backend_status",
    "get_backend",
    "merge_attention_states",
    "register_backend",
    "to_numpy",
    "unisparse_attention",
    "unisparse_attention_paged",
    "unisparse_attention_varlen",
]
