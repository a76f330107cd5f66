"""The one configuration shared by every backend (SPEC section 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["THRESHOLD_MODES", "UniSparseConfig"]

#: Accepted values of ``UniSparseConfig.threshold_mode``.
THRESHOLD_MODES = ("total", "remaining")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class UniSparseConfig:
    """Hyper-parameters of UniSparse, validated at construction.

    The three research variants ``threshold_mode``, ``sink_tokens`` and
    ``diagonal_correction`` (see the *Calibration* page) are implemented in the NumPy
    reference and the Numba layer; a layer that lacks one refuses a config that sets it
    (``unisparse_ref._arrays.check_spec_variants``). :meth:`calibrated` returns the
    recommended configuration.

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
    threshold_mode : str
        *(research variant)* ``"total"`` (SPEC section 5, the default): keep
        blocks while the kept mass ``m < P``, forced blocks included. ``"remaining"``: ``P`` is
        applied to the mass outside the forced blocks, i.e. take candidates while
        ``m - m_F < P * (T - m_F)`` (``m_F`` the forced mass, ``T`` the row's visible mass).
    sink_tokens : int
        *(research variant)* ``0`` (SPEC). ``t > 0``: the first ``t`` keys are
        kept un-pooled as ``t`` composite keys of their own (composite key 0 then averages keys
        ``t .. c_k - 1``), and every composite key's softmax weight is multiplied by the number
        of keys it stands for. Must be ``< c_k``.
    diagonal_correction : bool
        *(research variant)* ``False`` (SPEC). ``True``: the softmax weight of
        composite key ``c`` for composite query ``r`` is multiplied by the share of token pairs
        ``(t in r, s in c)`` with ``s <= p(t)`` (the exact causal visibility of the pair of
        groups; 1 off the diagonal, about 1/2 for the group on the diagonal).

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
    threshold_mode: str = "total"
    sink_tokens: int = 0
    diagonal_correction: bool = False

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
        if not isinstance(self.threshold_mode, str):
            raise TypeError(f"UniSparseConfig.threshold_mode must be a str, got {self.threshold_mode!r}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(
                f"UniSparseConfig.threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}"
            )
        if not _is_int(self.sink_tokens):
            raise TypeError(f"UniSparseConfig.sink_tokens must be an int, got {self.sink_tokens!r}")
        if not (0 <= self.sink_tokens < self.c_k):
            raise ValueError(
                f"UniSparseConfig.sink_tokens must lie in [0, c_k={self.c_k}), got {self.sink_tokens}"
            )
        if not isinstance(self.diagonal_correction, bool):
            raise TypeError(
                f"UniSparseConfig.diagonal_correction must be a bool, got {self.diagonal_correction!r}"
            )
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

    def spec_variants(self) -> list[str]:
        """Names of the research options set away from the SPEC behaviour (``[]`` for SPEC)."""
        out = []
        if self.threshold_mode != "total":
            out.append(f"threshold_mode={self.threshold_mode!r}")
        if self.sink_tokens != 0:
            out.append(f"sink_tokens={self.sink_tokens}")
        if self.diagonal_correction:
            out.append("diagonal_correction=True")
        return out

    @classmethod
    def calibrated(cls, **overrides: object) -> UniSparseConfig:
        """The recommended configuration for real models, from the *Calibration* page.

        ``threshold_mode="remaining"`` and ``threshold=0.98``; every other field the SPEC
        default. The criterion is issue 15's per-layer target, recall >= 0.85 and relative
        output error <= 0.15 in every layer measured; ``P`` is the smallest swept value that
        meets it. Measured with the NumPy reference on SmolLM2-135M, prose and Python code:

        - at 8192 tokens (layers 3, 6, 12, 20 of each text, 8 layer-runs) ``remaining`` needs
          ``P = 0.98`` (worst recall 0.893, worst error 0.130, mean density 0.516), the SPEC
          default and XAttention ``P = 0.995`` (mean density 0.531 and 0.556): 3 % fewer blocks
          than SPEC for the same guarantee; ``P = 0.95`` (the recommendation before the 8K
          runs) misses it in layers 3 and 6 (worst error 0.182, recall 0.822);
        - at 2048 and 4096 tokens (layers 3, 6, 20, 12 layer-runs) ``P = 0.95`` already met it
          (worst recall 0.874, worst error 0.129) against 0.99 for SPEC.

        End to end at 8K (all 30 layers sparse) it keeps 0.500 / 0.516 of the blocks (prose /
        code) for a cross-entropy increase of +0.007 / +0.002 nats, SPEC at ``P = 0.995``
        0.505 / 0.515 for +0.003 / +0.003: the saving is on the early layers, not over the
        whole model. The mean density at 8K, 0.516, misses the issue's < 0.30 by 0.22; the mass oracle
        (SPEC's selection on the true block mass) meets the per-layer target at 0.282 and a
        per-layer ``P`` for ``remaining`` would reach 0.348 (not implemented: one ``P`` per
        config). ``diagonal_correction`` and ``sink_tokens`` are off: the first moves the
        density at matched error by a few per cent either way and nothing when combined with
        ``remaining``; the second raises the error in late layers (see the page).
        ``overrides`` replace any field (and are validated like the constructor's).
        """
        fields: dict[str, object] = dict(_CALIBRATED)
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]


#: The fields :meth:`UniSparseConfig.calibrated` sets (the rest are the SPEC defaults).
_CALIBRATED: dict[str, object] = {"threshold_mode": "remaining", "threshold": 0.98}
