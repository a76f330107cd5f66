"""Backend registry: one object per layer with the same five methods.

A backend exposes ``compress``, ``block_scores``, ``select_blocks``,
``block_sparse_attention`` and ``dense_attention`` with the shapes and semantics of SPEC
sections 3 to 6 (see :class:`Backend`). ``"numpy"`` is the reference
(:mod:`unisparse_ref.reference`) and always available; the GPU layers
(:mod:`unisparse_ref.numba_backend`, :mod:`unisparse_ref.cupy_backend`) are named here by
module path and imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from .blockmask import BlockMask
from .config import UniSparseConfig
from .errors import BackendUnavailable
from .reference import NumpyBackend

__all__ = [
    "Backend",
    "available_backends",
    "backend_status",
    "get_backend",
    "register_backend",
]


@runtime_checkable
class Backend(Protocol):
    """What every backend provides (shapes: SPEC sections 3 to 6).

    Attributes
    ----------
    name : str
    supported_dtypes : tuple of numpy.dtype
        Input dtypes it accepts; others raise ``TypeError``.
    score_eps : float
        The score tolerance ``eps`` of SPEC section 7 for the scores it computes itself
        (0 for the reference).
    """

    name: str
    supported_dtypes: tuple
    score_eps: float

    def compress(self, q: Any, k: Any, config: UniSparseConfig) -> tuple[Any, Any]:
        """``q [B,Hq,Nq,D], k [B,Hkv,Nk,D] -> (q_c [B,Hq/c_h,R,D], k_c [B,Hkv,C,D])``."""
        ...

    def block_scores(self, q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
        """``-> scores [B, Hq/c_h, nQb, nKb]``, rows summing to 1."""
        ...

    def select_blocks(self, scores: Any, config: UniSparseConfig, nq: int, nk: int) -> BlockMask:
        """``-> BlockMask`` with ``mask [B, Hq/c_h, nQb, nKb]``."""
        ...

    def block_sparse_attention(
        self, q: Any, k: Any, v: Any, block_mask: BlockMask, config: UniSparseConfig
    ) -> tuple[Any, Any]:
        """``-> (out [B,Hq,Nq,D], lse float32 [B,Hq,Nq])``."""
        ...

    def dense_attention(
        self, q: Any, k: Any, v: Any, causal: bool = True, softmax_scale: float | None = None
    ) -> tuple[Any, Any]:
        """``-> (out [B,Hq,Nq,D], lse float32 [B,Hq,Nq])``."""
        ...


#: name -> "module:attribute" of a zero-argument factory, or the factory itself.
_REGISTRY: dict[str, Any] = {
    "numpy": NumpyBackend,
    "numba": "unisparse_ref.numba_backend:make_backend",
    "cupy": "unisparse_ref.cupy_backend:make_backend",
}
_CACHE: dict[str, Any] = {}


def register_backend(name: str, factory: Any) -> None:
    """Register a backend under ``name``.

    ``factory`` is a zero-argument callable returning the backend, or a
    ``"module:attribute"`` string naming one; it raises :class:`BackendUnavailable` (or
    ``ImportError``) with a reason when the backend cannot run here.
    """
    _REGISTRY[name] = factory
    _CACHE.pop(name, None)


def _load(name: str) -> Any:
    if name in _CACHE:
        return _CACHE[name]
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                raise  # the backend's own module is missing: a wrong registry entry, not a missing extra
            raise BackendUnavailable(f"backend {name!r} needs {e.name!r}: install it ({e})") from e
    backend = factory()
    _CACHE[name] = backend
    return backend


def get_backend(name: str = "numpy") -> Any:
    """The backend called ``name`` (``"numpy"``, ``"numba"`` or ``"cupy"``).

    Raises
    ------
    ValueError
        For an unknown name.
    BackendUnavailable
        When the backend is known but cannot run on this machine (the message says why).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)}")
    return _load(name)


def backend_status() -> dict[str, str | None]:
    """For every known backend, ``None`` if it can run here, else the reason it cannot."""
    status: dict[str, str | None] = {}
    for name in _REGISTRY:
        try:
            _load(name)
            status[name] = None
        except (BackendUnavailable, ImportError) as e:
            status[name] = str(e)
    return status


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, the reference first."""
    return [n for n, why in backend_status().items() if why is None]
