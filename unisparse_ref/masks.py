"""Block-mask interop: dense token masks, FlexAttention, MIT Block-Sparse-Attention.

:class:`~unisparse_ref.BlockMask` is a boolean ``[B, Hm, nQb, nKb]`` array plus what it needs
to be read (block size, heads per mask head, lengths, causality). This module converts it to
and from the layouts other systems use:

==================================================  ====================================================
layout                                              functions
==================================================  ====================================================
dense token mask ``[B, H, Nq, Nk]``                 :func:`to_token_mask`, :func:`from_token_mask`
FlexAttention ``(kv_num_blocks, kv_indices)``       :func:`to_flex_indices`, :func:`from_flex_indices`
                                                    (the :meth:`BlockMask.to_indices` convention)
PyTorch ``flex_attention.BlockMask``                :func:`to_flex_block_mask` (needs PyTorch; lazy)
MIT Block-Sparse-Attention (``base_blockmask``,     :func:`to_mit_bsa`, :func:`from_mit_bsa`,
``head_mask_type``)                                 :func:`mit_bsa_row_indices`
==================================================  ====================================================

All functions take and return NumPy arrays (CuPy masks are copied to the host).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import geometry
from ._arrays import to_numpy
from .blockmask import BlockMask

__all__ = [
    "to_token_mask",
    "from_token_mask",
    "to_flex_indices",
    "from_flex_indices",
    "to_flex_block_mask",
    "to_mit_bsa",
    "from_mit_bsa",
    "mit_bsa_row_indices",
    "expand_heads",
]


def _check_bm(block_mask: Any) -> BlockMask:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask)!r}")
    return block_mask.numpy()


def expand_heads(block_mask: BlockMask, num_q_heads: int | None = None) -> np.ndarray:
    """The mask per *query* head, bool ``[B, Hq, nQb, nKb]`` (query head ``h`` uses ``h // c_h``).

    ``num_q_heads`` defaults to ``Hm * heads_per_mask``.
    """
    bm = _check_bm(block_mask)
    Hq = bm.num_mask_heads * bm.heads_per_mask if num_q_heads is None else int(num_q_heads)
    if Hq != bm.num_mask_heads * bm.heads_per_mask:
        raise ValueError(
            f"num_q_heads={Hq} does not match Hm * heads_per_mask = {bm.num_mask_heads} * {bm.heads_per_mask}"
        )
    return np.repeat(bm.mask, bm.heads_per_mask, axis=1)


# ---------------------------------------------------------------------------- dense token mask
def to_token_mask(block_mask: BlockMask, *, apply_causal: bool = True, per_query_head: bool = False) -> np.ndarray:
    """Expand a block mask to a dense token mask.

    Parameters
    ----------
    block_mask : BlockMask
    apply_causal : bool
        Also apply the token-level causal rule ``s <= p(t)`` (when the mask is causal): the
        result is then exactly the set of keys each query attends.
    per_query_head : bool
        Return one head per query head (``Hq = Hm * c_h``) instead of per mask head.

    Returns
    -------
    numpy.ndarray of bool, shape ``[B, Hm, Nq, Nk]`` (or ``[B, Hq, Nq, Nk]``)
    """
    bm = _check_bm(block_mask)
    m = expand_heads(bm) if per_query_head else bm.mask
    S = bm.block_size
    tok = np.repeat(np.repeat(m, S, axis=2), S, axis=3)[:, :, : bm.nq, : bm.nk]
    if apply_causal and bm.causal:
        tok = tok & geometry.token_causal_mask(np.arange(bm.nq), bm.nq, bm.nk, True)
    return np.ascontiguousarray(tok)


def from_token_mask(
    token_mask: Any, *, block_size: int, heads_per_mask: int = 1, causal: bool = True
) -> BlockMask:
    """The coarsest block mask covering a token mask: block ``(i, j)`` is selected when any
    token pair in it is allowed (FlexAttention's ``create_block_mask`` rule).

    Parameters
    ----------
    token_mask : bool array ``[B, Hm, Nq, Nk]``
    block_size : int
    heads_per_mask : int
        Stored in the result (``c_h``).
    causal : bool

    Returns
    -------
    BlockMask
        ``from_token_mask(to_token_mask(bm, apply_causal=False), ...)`` gives ``bm`` back; with
        ``apply_causal=True`` it gives ``bm`` restricted to the causally visible blocks.
    """
    t = to_numpy(token_mask)
    if t.ndim != 4:
        raise ValueError(f"token_mask must have rank 4 [B, H, Nq, Nk], got shape {t.shape}")
    if t.dtype != np.bool_:
        raise TypeError(f"token_mask must be bool, got {t.dtype}")
    B, H, nq, nk = t.shape
    S = int(block_size)
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    pad = np.zeros((B, H, nqb * S, nkb * S), dtype=bool)
    pad[:, :, :nq, :nk] = t
    mask = pad.reshape(B, H, nqb, S, nkb, S).any(axis=(3, 5))
    return BlockMask(mask, S, heads_per_mask, nq, nk, causal)


# ---------------------------------------------------------------------------- FlexAttention
def to_flex_indices(block_mask: BlockMask) -> tuple[np.ndarray, np.ndarray]:
    """``(kv_num_blocks int32 [B, Hm, nQb], kv_indices int32 [B, Hm, nQb, nKb])``.

    FlexAttention's layout: selected key blocks packed to the left in ascending order, padded
    with ``-1`` (see :meth:`BlockMask.to_indices`).
    """
    return _check_bm(block_mask).to_indices()


def from_flex_indices(
    kv_num_blocks: Any, kv_indices: Any, *, block_size: int, nq: int, nk: int,
    heads_per_mask: int = 1, causal: bool = True,
) -> BlockMask:
    """Inverse of :func:`to_flex_indices` (see :meth:`BlockMask.from_indices`)."""
    return BlockMask.from_indices(kv_num_blocks, kv_indices, block_size=block_size, nq=nq, nk=nk,
                                  heads_per_mask=heads_per_mask, causal=causal)


def to_flex_block_mask(block_mask: BlockMask, *, per_query_head: bool | None = None, device: Any = None) -> Any:
    """A PyTorch FlexAttention ``BlockMask`` with the same selected blocks.

    Built with ``torch.nn.attention.flex_attention.BlockMask.from_kv_blocks``; when the mask is
    causal, a ``mask_mod`` applies the bottom-right causal rule ``kv_idx <= q_idx + Nk - Nq``
    inside the partial blocks, and ``seq_lengths=(Nq, Nk)`` handles ragged lengths. PyTorch is
    imported here, lazily: it is never a dependency of this package.

    Parameters
    ----------
    block_mask : BlockMask
    per_query_head : bool, optional
        Expand the heads to one per query head (FlexAttention broadcasts a head dimension of
        1 but not ``Hq / c_h``). Default: expand when ``heads_per_mask > 1``.
    device : optional
        A PyTorch device (``torch.device`` or a string).
        Where to put the index tensors (default CPU).

    Raises
    ------
    ImportError
        When PyTorch (with ``flex_attention``) is not installed.
    """
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError("to_flex_block_mask needs PyTorch >= 2.5 with torch.nn.attention.flex_attention") from e
    bm = _check_bm(block_mask)
    expand = bm.heads_per_mask > 1 if per_query_head is None else per_query_head
    mask = expand_heads(bm) if expand else bm.mask
    single = BlockMask(mask, bm.block_size, 1, bm.nq, bm.nk, bm.causal)
    counts, idx = single.to_indices()
    idx = np.where(idx < 0, 0, idx)  # entries past the count are ignored by FlexAttention
    kwargs: dict[str, Any] = {"BLOCK_SIZE": bm.block_size}
    if bm.causal:
        offset = bm.nk - bm.nq

        def causal_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return kv_idx <= q_idx + offset

        kwargs["mask_mod"] = causal_mod
    try:
        return FlexBlockMask.from_kv_blocks(
            torch.as_tensor(counts, dtype=torch.int32, device=device),
            torch.as_tensor(idx, dtype=torch.int32, device=device),
            seq_lengths=(bm.nq, bm.nk), **kwargs,
        )
    except TypeError:  # older PyTorch without seq_lengths
        return FlexBlockMask.from_kv_blocks(
            torch.as_tensor(counts, dtype=torch.int32, device=device),
            torch.as_tensor(idx, dtype=torch.int32, device=device), **kwargs,
        )


# ---------------------------------------------------------------------------- MIT Block-Sparse-Attention
def to_mit_bsa(block_mask: BlockMask) -> dict[str, Any]:
    """The inputs of MIT Block-Sparse-Attention's ``block_sparse_attn_func`` for this mask.

    MIT BSA (mit-han-lab/Block-Sparse-Attention) takes, per query head, a ``head_mask_type``:
    ``0`` dense, ``-1`` streaming, ``1`` block-sparse; the block-sparse heads consume the heads
    of ``base_blockmask`` *in order* (its tests renumber the ones with a cumulative count, so the
    ``k``-th block-sparse head reads ``base_blockmask[:, k-1]``). Its blocks are fixed at
    128 x 128 and its causal rule is bottom-right aligned (FlashAttention >= 2.1), as here.

    What is implemented: every query head is block-sparse (``head_mask_type = 1``) and
    ``base_blockmask`` holds one head per query head (mask heads repeated ``c_h`` times).
    Streaming heads are not produced (they are read by :func:`from_mit_bsa`).

    Returns
    -------
    dict with
        ``base_blockmask`` : bool ``[B, Hq, nQb, nKb]``;
        ``head_mask_type`` : int32 ``[Hq]`` (all 1);
        ``streaming_info`` : ``None``;
        ``block_size`` : int (MIT BSA requires 128; a different size is returned as is and
        ``compatible`` is False);
        ``compatible`` : bool.
    """
    bm = _check_bm(block_mask)
    base = np.ascontiguousarray(expand_heads(bm))
    return {
        "base_blockmask": base,
        "head_mask_type": np.ones(base.shape[1], dtype=np.int32),
        "streaming_info": None,
        "block_size": bm.block_size,
        "compatible": bm.block_size == 128,
    }


def from_mit_bsa(
    base_blockmask: Any,
    head_mask_type: Any,
    *,
    nq: int,
    nk: int,
    block_size: int = 128,
    causal: bool = True,
    streaming_info: Any = None,
) -> BlockMask:
    """A per-query-head :class:`BlockMask` from MIT Block-Sparse-Attention's inputs.

    Parameters
    ----------
    base_blockmask : bool ``[B, n_blocksparse_heads, nQb, nKb]``
    head_mask_type : int ``[Hq]``
        ``0``: dense head (every visible block); ``-1``: streaming head (block granularity:
        ``sink`` first blocks plus ``local`` blocks ending at the diagonal, from
        ``streaming_info``); ``> 0``: block-sparse, the ``k``-th such head (in head order)
        reading ``base_blockmask[:, k-1]``.
    streaming_info : int ``[2 * Hq]``, optional
        ``(sink_blocks, local_blocks)`` per head; needed only for streaming heads. Token-level
        streaming (``exact_streaming``) is not represented.

    Returns
    -------
    BlockMask
        ``heads_per_mask = 1``, one mask head per query head.
    """
    base = to_numpy(base_blockmask).astype(bool)
    hmt = to_numpy(head_mask_type).astype(np.int64).ravel()
    nqb, nkb = geometry.num_blocks(nq, block_size), geometry.num_blocks(nk, block_size)
    if base.ndim != 4 or base.shape[2:] != (nqb, nkb):
        raise ValueError(f"base_blockmask must have shape [B, n_blocksparse_heads, {nqb}, {nkb}], got {base.shape}")
    n_sparse = int((hmt > 0).sum())
    if base.shape[1] < n_sparse:
        raise ValueError(f"head_mask_type has {n_sparse} block-sparse heads but base_blockmask has {base.shape[1]}")
    B, Hq = base.shape[0], hmt.size
    vis = geometry.visible_blocks(nq, nk, block_size, causal)
    out = np.zeros((B, Hq, nqb, nkb), dtype=bool)
    k = 0
    for h, t in enumerate(hmt):
        if t == 0:
            out[:, h] = vis
        elif t > 0:
            out[:, h] = base[:, k]
            k += 1
        else:
            if streaming_info is None:
                raise ValueError(f"head {h} is a streaming head (-1): streaming_info is needed")
            si = to_numpy(streaming_info).astype(np.int64).ravel()
            out[:, h] = geometry.forced_blocks(nq, nk, block_size, int(si[2 * h]), int(si[2 * h + 1]), causal)
    return BlockMask(out, block_size, 1, nq, nk, causal)


def mit_bsa_row_indices(block_mask: BlockMask) -> tuple[np.ndarray, np.ndarray]:
    """The row-index form MIT BSA builds internally (``convert_blockmask_row_reverse``).

    Returns
    -------
    counts : int32 ``[B, Hq, nQb]``
    indices : int32 ``[B, Hq, nQb, nKb]``
        Selected key blocks in *descending* order, padded with ``-1``.
    """
    bm = _check_bm(block_mask)
    m = expand_heads(bm)
    nkb = m.shape[-1]
    j = np.arange(nkb, dtype=np.int32)
    keyed = np.where(m, j, -1)
    idx = -np.sort(-keyed, axis=-1)  # descending, -1 last
    return m.sum(axis=-1).astype(np.int32), idx.astype(np.int32)
