"""``BlockMask``: the selected key blocks of every query block (SPEC section 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import geometry
from ._convert import to_numpy

__all__ = ["BlockMask"]


def _xp(a: Any) -> Any:
    """The array module of ``a``: CuPy for CuPy arrays, NumPy otherwise."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A boolean block mask and what it needs to be read.

    Attributes
    ----------
    mask : array of bool, shape ``[B, Hm, nQb, nKb]``
        ``mask[b, g, i, j]``: key block ``j`` is selected for query block ``i`` of mask head
        ``g``. ``Hm = Hq / heads_per_mask``; query head ``h`` uses mask head
        ``h // heads_per_mask``. A NumPy array, or a CuPy array for the GPU backends.
    block_size : int
        ``S``, the tile size for queries and keys.
    heads_per_mask : int
        ``c_h``: how many consecutive query heads share one mask head.
    nq, nk : int
        Query and key lengths (``nQb = ceil(nq/S)``, ``nKb = ceil(nk/S)``).
    causal : bool
        Whether the attention that uses this mask is causal. Selected blocks above the
        diagonal are allowed in ``mask`` but attend to nothing, since the causal token mask
        still applies.
    """

    mask: Any
    block_size: int
    heads_per_mask: int
    nq: int
    nk: int
    causal: bool = True

    def __post_init__(self) -> None:
        m = self.mask
        if not hasattr(m, "shape") or len(m.shape) != 4:
            raise ValueError(f"BlockMask.mask must have rank 4 [B, Hm, nQb, nKb], got {getattr(m, 'shape', type(m))}")
        if m.dtype != np.bool_:
            raise TypeError(f"BlockMask.mask must be bool, got {m.dtype}")
        S = self.block_size
        if not isinstance(S, int) or S < 1:
            raise ValueError(f"BlockMask.block_size must be a positive int, got {S!r}")
        if not isinstance(self.heads_per_mask, int) or self.heads_per_mask < 1:
            raise ValueError(f"BlockMask.heads_per_mask must be a positive int, got {self.heads_per_mask!r}")
        if self.nq < 1 or self.nk < 1:
            raise ValueError(f"BlockMask.nq and nk must be >= 1, got {self.nq}, {self.nk}")
        if self.causal and self.nq > self.nk:
            raise ValueError(f"causal BlockMask needs nq <= nk, got nq={self.nq}, nk={self.nk}")
        want = (geometry.num_blocks(self.nq, S), geometry.num_blocks(self.nk, S))
        if tuple(m.shape[2:]) != want:
            raise ValueError(
                f"BlockMask.mask has blocks {tuple(m.shape[2:])}, expected (nQb, nKb) = {want} "
                f"for nq={self.nq}, nk={self.nk}, block_size={S}"
            )

    # ------------------------------------------------------------------ shape helpers
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, Hm, nQb, nKb)``."""
        return tuple(int(s) for s in self.mask.shape)  # type: ignore[return-value]

    @property
    def num_mask_heads(self) -> int:
        """``Hm``, the number of mask heads."""
        return int(self.mask.shape[1])

    def visible(self) -> np.ndarray:
        """The causally visible blocks, bool ``[nQb, nKb]`` (all True when non-causal)."""
        return geometry.visible_blocks(self.nq, self.nk, self.block_size, self.causal)

    @property
    def density(self) -> float:
        """Selected visible blocks over visible blocks, over all batches and mask heads.

        A selected block that is not visible (above the causal diagonal) does no work and
        is not counted.
        """
        m = to_numpy(self.mask)
        vis = self.visible()
        total = vis.sum() * m.shape[0] * m.shape[1]
        return float((m & vis).sum() / total)

    def numpy(self) -> BlockMask:
        """This mask with ``mask`` as a NumPy array."""
        return BlockMask(to_numpy(self.mask), self.block_size, self.heads_per_mask, self.nq, self.nk, self.causal)

    # ------------------------------------------------------------------ index form
    def to_indices(self) -> tuple[Any, Any]:
        """The FlexAttention index form of the mask.

        Returns
        -------
        kv_counts : int32, shape ``[B, Hm, nQb]``
            Number of selected key blocks of each query block.
        kv_indices : int32, shape ``[B, Hm, nQb, nKb]``
            The selected key block indices in ascending order, padded with ``-1``.

        Arrays are of the same module (NumPy or CuPy) as ``mask``.
        """
        xp = _xp(self.mask)
        m = self.mask
        nkb = m.shape[-1]
        counts = m.sum(axis=-1).astype(xp.int32)
        j = xp.arange(nkb, dtype=xp.int32)
        # Selected blocks keep their index, the others get nKb (sorted last), then -1.
        keyed = xp.where(m, j, xp.int32(nkb))
        idx = xp.sort(keyed, axis=-1)
        idx = xp.where(idx == nkb, xp.int32(-1), idx).astype(xp.int32)
        return counts, idx

    @classmethod
    def from_indices(
        cls,
        kv_counts: Any,
        kv_indices: Any,
        *,
        block_size: int,
        nq: int,
        nk: int,
        heads_per_mask: int = 1,
        causal: bool = True,
    ) -> BlockMask:
        """Build a mask from the FlexAttention index form (see :meth:`to_indices`).

        Only the first ``kv_counts[b, g, i]`` entries of each row of ``kv_indices`` are read;
        they must be valid block indices in ``[0, nKb)``. The result is a NumPy mask.

        Raises
        ------
        ValueError
            On shapes that do not match ``nq``, ``nk``, ``block_size``, counts out of
            ``[0, nKb]`` or indices out of range.
        """
        counts = to_numpy(kv_counts).astype(np.int64)
        idx = to_numpy(kv_indices).astype(np.int64)
        nqb, nkb = geometry.num_blocks(nq, block_size), geometry.num_blocks(nk, block_size)
        if counts.ndim != 3 or counts.shape[2] != nqb:
            raise ValueError(f"kv_counts must have shape [B, Hm, nQb={nqb}], got {counts.shape}")
        if idx.ndim != 4 or idx.shape[:3] != counts.shape or idx.shape[3] > nkb or idx.shape[3] < 1:
            raise ValueError(
                f"kv_indices must have shape [B, Hm, nQb, <= nKb={nkb}] matching kv_counts {counts.shape}, got {idx.shape}"
            )
        if (counts < 0).any() or (counts > idx.shape[3]).any():
            raise ValueError(f"kv_counts must lie in [0, {idx.shape[3]}]")
        used = np.arange(idx.shape[3])[None, None, None, :] < counts[..., None]
        if ((idx < 0) | (idx >= nkb))[used].any():
            raise ValueError(f"kv_indices holds a block index outside [0, {nkb}) among the counted entries")
        mask = np.zeros(counts.shape + (nkb,), dtype=bool)
        b, g, i, slot = np.nonzero(used)
        mask[b, g, i, idx[b, g, i, slot]] = True
        return cls(mask, block_size, heads_per_mask, nq, nk, causal)

    @classmethod
    def full(
        cls, batch: int, mask_heads: int, nq: int, nk: int, *, block_size: int = 128,
        heads_per_mask: int = 1, causal: bool = True,
    ) -> BlockMask:
        """Every visible block selected: block-sparse attention with it is dense attention."""
        vis = geometry.visible_blocks(nq, nk, block_size, causal)
        mask = np.broadcast_to(vis, (batch, mask_heads) + vis.shape).copy()
        return cls(mask, block_size, heads_per_mask, nq, nk, causal)

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, heads_per_mask={self.heads_per_mask}, "
            f"nq={self.nq}, nk={self.nk}, causal={self.causal}, density={self.density:.3f})"
        )
