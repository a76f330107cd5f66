"""The one configuration shared by every backend (SPEC section 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["UniSparseConfig"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class UniSparseConfig:
    """Hyper-parameters of UniSparse, validated at construction.

    Parameters
    ----------
    block_size : int
        ``S``, the tile of the block mask for queries and keys alike; a power of two >= 16.
    c_q : int
        Query pooling factor; must divide ``block_size``.
    c_k : int
        Key pooling factor; must divide ``block_size``.
    c_h : int
        Head pooling factor; must divide the GQA group size ``G = Hq // Hkv`` (checked when
        the inputs are seen, since ``G`` is not known here).
    threshold : float
        ``P``, the cumulative block mass to keep, in ``(0, 1]``. ``P = 1`` keeps every
        visible block.
    n_sink_blocks : int
        The first key blocks always kept (>= 0). *(reading)*
    n_local_blocks : int
        Key blocks ending at the diagonal block always kept (>= 0). *(reading)*
    causal : bool
        Causal (bottom-right aligned) attention.
    softmax_scale : float or None
        Scale of the logits; ``None`` means ``1 / sqrt(D)``. Used by the scoring and the
        attention alike.

    Raises
    ------
    ValueError
        Naming the field, for any invalid value.
    TypeError
        Naming the field, for a value of the wrong type.
    """

    block_size: int = 128
    c_q: int = 16
    c_k: int = 16
    c_h: int = 1
    threshold: float = 0.9
    n_sink_blocks: int = 1
    n_local_blocks: int = 1
    causal: bool = True
    softmax_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "c_q", "c_k", "c_h", "n_sink_blocks", "n_local_blocks"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"UniSparseConfig.{name} must be an int, got {value!r}")
        S = self.block_size
        if S < 16 or S & (S - 1) != 0:
            raise ValueError(f"UniSparseConfig.block_size must be a power of two >= 16, got {S}")
        for name in ("c_q", "c_k"):
            c = getattr(self, name)
            if c < 1 or S % c != 0:
                raise ValueError(
                    f"UniSparseConfig.{name} must be a positive divisor of block_size={S}, got {c}"
                )
        if self.c_h < 1:
            raise ValueError(f"UniSparseConfig.c_h must be >= 1, got {self.c_h}")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool):
            raise TypeError(f"UniSparseConfig.threshold must be a float, got {self.threshold!r}")
        if not (0.0 < float(self.threshold) <= 1.0) or math.isnan(float(self.threshold)):
            raise ValueError(
                f"UniSparseConfig.threshold must lie in (0, 1], got {self.threshold!r}"
            )
        for name in ("n_sink_blocks", "n_local_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"UniSparseConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"UniSparseConfig.causal must be a bool, got {self.causal!r}")
        if self.softmax_scale is not None:
            s = self.softmax_scale
            if not isinstance(s, (int, float)) or isinstance(s, bool):
                raise TypeError(f"UniSparseConfig.softmax_scale must be a float or None, got {s!r}")
            if not math.isfinite(float(s)) or float(s) <= 0.0:
                raise ValueError(
                    f"UniSparseConfig.softmax_scale must be a finite positive number, got {s!r}"
                )

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale used for head dimension ``head_dim`` (``1/sqrt(D)`` by default)."""
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return 1.0 / math.sqrt(head_dim)
