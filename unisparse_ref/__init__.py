"""unisparse-ref: the reference implementation and PyTorch-free GPU kernels of UniSparse.

UniSparse pools queries and keys into composite tokens, scores attention in that
compressed space, keeps the top-P key blocks of every query block and computes exact
attention over those blocks only. See ``SPEC.md`` and the documentation.
"""

from __future__ import annotations

from ._arrays import BFLOAT16, SUPPORTED_DTYPES, to_numpy
from .api import UniSparseResult, unisparse_attention
from .backends import (
    Backend,
    BackendUnavailable,
    available_backends,
    backend_status,
    get_backend,
    register_backend,
)
from .blockmask import BlockMask
from .config import UniSparseConfig

__version__ = "0.1.0"

__all__ = [
    "BFLOAT16",
    "SUPPORTED_DTYPES",
    "Backend",
    "BackendUnavailable",
    "BlockMask",
    "UniSparseConfig",
    "UniSparseResult",
    "__version__",
    "available_backends",
    "backend_status",
    "get_backend",
    "register_backend",
    "to_numpy",
    "unisparse_attention",
]
