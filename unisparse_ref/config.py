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
    reference only; the GPU layers refuse a config that sets any of them
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
        *(research variant, reference only)* ``"total"`` (SPEC section 5, the default): keep
        blocks while the kept mass ``m < P``, forced blocks included. ``"remaining"``: ``P`` is
        applied to the mass outside the forced blocks, i.e. take candidates while
        ``m - m_F < P * (T - m_F)`` (``m_F`` the forced mass, ``T`` the row's visible mass).
    sink_tokens : int
        *(research variant, reference only)* ``0`` (SPEC). ``t > 0``: the first ``t`` keys are
        kept un-pooled as ``t`` composite keys of their own (composite key 0 then averages keys
        ``t .. c_k - 1``), and every composite key's softmax weight is multiplied by the number
        of keys it stands for. Must be ``< c_k``.
    diagonal_correction : bool
        *(research variant, reference only)* ``False`` (SPEC). ``True``: the softmax weight of
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

        ``threshold_mode="remaining"`` and ``threshold=0.95``; every other field the SPEC
        default. Measured with the NumPy reference on SmolLM2-135M (layers 3, 6 and 20; prose and
        Python code; 2048 and 4096 tokens; 12 layer-runs, see the *Calibration* page): the
        smallest swept ``P`` at which every layer-run has recall >= 0.85 and relative output
        error <= 0.15 is 0.95 for this variant (worst recall 0.874, worst error 0.129, mean
        density 0.721, 0.634 at 4096 tokens) against 0.99 for the SPEC default (worst recall
        0.899, worst error 0.132, mean density 0.767, 0.695 at 4096 tokens): about 6-9 % fewer
        blocks for the same guarantee on those layers. Over all 30 layers end to end (2048
        tokens) the saving vanishes: density 0.774 / 0.758 (prose / code) against SPEC-at-0.99's
        0.771 / 0.746, cross-entropy increase +0.002 / +0.000 nats against -0.001 / -0.002. At
        matched end-to-end density the variant loses less: P = 0.8 gives +0.023 nats at 0.546,
        SPEC at P = 0.95 +0.053 nats at 0.556 (prose). ``diagonal_correction`` and ``sink_tokens`` are off:
        the first changed the densities at matched error by a few per cent either way, the
        second raised the error in late layers (see the page). The 8K target of issue 15
        (mean density < 0.30) was not measured.
        ``overrides`` replace any field (and are validated like the constructor's).
        """
        fields: dict[str, object] = dict(_CALIBRATED)
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]


#: The fields :meth:`UniSparseConfig.calibrated` sets (the rest are the SPEC defaults).
_CALIBRATED: dict[str, object] = {"threshold_mode": "remaining", "threshold": 0.95}
