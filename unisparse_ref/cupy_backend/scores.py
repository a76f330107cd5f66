"""Stage 2 on the GPU: block scores (SPEC 4) with ``us_scores_onepass`` of ``raw_kernels/scores.cu``.

One pass over the composite keys: a thread block owns ``RG = max(TR, RB)`` composite query
rows (whole query blocks), walks the column tiles once with the online softmax, writes each
tile's running maximum and key-block piece sums to a global float32 scratch, and after the
walk rescales them into its scores (the flash-attention rescale), every sum in a fixed order.
``scores.cu``'s opening comment gives the formulas and the barriers.

Here: the instantiation (:data:`INSTANTIATIONS`, NVRTC options :data:`OPTIONS`), the launch
configuration (:func:`launch_config`: grid, block, shared memory and scratch, pure Python)
and the launch (:func:`launch_scores`). Imports without CuPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import geometry
from ..config import UniSparseConfig
from . import _loader
from ._device import cupy_module, i32
from ._loader import KernelSpec

__all__ = ["FILE", "INSTANTIATIONS", "OPTIONS", "SCRATCH_BYTES", "TC", "TR", "KERNEL", "launch_config",
           "launch_scores"]

FILE = "scores.cu"
#: Composite rows (TR) and columns (TC) per tile, passed to NVRTC with -D so Python and CUDA agree.
TR = 64
TC = 64
#: Threads per block: 16 x 16, each owning (TR/16) x (TC/16) logits of a tile (US_SC_T in scores.cu).
BLOCK = (16, 16, 1)
#: NVRTC options of the kernel (the one place they are written).
OPTIONS: tuple[str, ...] = (f"-DUS_SC_TR={TR}", f"-DUS_SC_TC={TC}")
#: The one instantiation of this stage.
KERNEL = KernelSpec(FILE, "us_scores_onepass", OPTIONS)
INSTANTIATIONS: list[KernelSpec] = [KERNEL]
#: Most bytes of scratch one launch may hold; above it the launch is split into chunks of mask
#: heads (at least one head per chunk). At 131072 tokens with 32 heads it needs 1.1 GiB.
SCRATCH_BYTES = 2 * 1024**3


def launch_config(batch: int, mask_heads: int, R: int, config: UniSparseConfig, C: int | None = None,
                  scratch_bytes: int | None = None) -> dict[str, Any]:
    """Grid, block, shared memory and scratch of ``us_scores_onepass`` (pure Python, no GPU needed).

    One thread block per ``RG = max(TR, RB)`` composite rows (``NQ = RG / RB`` whole query
    blocks) of one mask head. Dynamic shared memory: the ``[TR, TC+1]`` exp tile, ``[TR, 16]``
    partial row maxima, ``[TR, NKS]`` piece sums, ``[TR]`` tile maxima, ``[TR]`` last visible
    columns (int32) and the running ``m_r``, ``l_r`` of ``RG`` rows (4 bytes each). Global
    float32 scratch per mask head: ``ntiles * R * NKS`` piece sums and ``ntiles * R`` tile
    maxima (``ntiles = ceil(C / TC)``, ``NKS = TC / min(KB, TC)``). When ``B * Hm`` heads of
    scratch exceed ``scratch_bytes`` (default :data:`SCRATCH_BYTES`, 2 GiB) the kernel is
    launched once per chunk of ``heads_per_chunk`` heads (grid y), reusing one buffer. A chunk
    holds at least one head, so one head's scratch alone may exceed the budget (with
    ``c_q = c_k = 1`` at 131072 tokens it is 5 GiB): rows are not chunked.

    Parameters
    ----------
    batch, mask_heads, R : int
        ``B``, ``Hm = Hq / c_h`` and the composite query count.
    config : UniSparseConfig
    C : int, optional
        Composite key count; defaults to ``R``.
    scratch_bytes : int, optional
        Scratch budget in bytes; defaults to :data:`SCRATCH_BYTES`.

    Returns
    -------
    dict with ``grid`` (one chunk), ``block``, ``shared_mem`` (bytes), ``ntiles``, ``NKS``,
    ``scratch_per_head`` (bytes), ``heads_per_chunk``, and the tile numbers ``TR``, ``TC``,
    ``RB``, ``KB``, ``RG``, ``NQ``.
    """
    RB, KB = config.block_size // config.c_q, config.block_size // config.c_k
    RG = max(TR, RB)
    NQ = RG // RB
    NKS = TC // min(KB, TC)
    C = R if C is None else int(C)
    budget = SCRATCH_BYTES if scratch_bytes is None else int(scratch_bytes)
    heads = batch * mask_heads
    ntiles = geometry.cdiv(C, TC)
    per_head = 4 * ntiles * R * (NKS + 1)
    chunk = max(1, min(heads, budget // max(1, per_head)))
    return {
        "grid": (geometry.cdiv(R, RG), chunk, 1),
        "block": BLOCK,
        "shared_mem": 4 * (TR * (TC + 1) + TR * BLOCK[0] + TR * NKS + 2 * TR + 2 * RG),
        "ntiles": ntiles, "NKS": NKS, "scratch_per_head": per_head, "heads_per_chunk": chunk,
        "TR": TR, "TC": TC, "RB": RB, "KB": KB, "RG": RG, "NQ": NQ,
    }


def launch_scores(q_c: Any, k_c: Any, config: UniSparseConfig, nq: int, nk: int) -> Any:
    """``us_scores_onepass`` over chunks of mask heads: float32 scores ``[B, Hm, nQb, nKb]``.

    ``q_c [B, Hm, R, D]`` and ``k_c [B, Hkv, C, D]`` are C-contiguous float32 CuPy arrays.
    """
    cp = cupy_module()
    B, Hm, R, D = (int(s) for s in q_c.shape)
    Hkv, C = int(k_c.shape[1]), int(k_c.shape[2])
    S, c_q, c_k, c_h = config.block_size, config.c_q, config.c_k, config.c_h
    G = Hm * c_h // Hkv
    nqb, nkb = geometry.num_blocks(nq, S), geometry.num_blocks(nk, S)
    scale = np.float32(config.scale_for(D))
    causal = np.int32(1 if config.causal else 0)
    sizes = (i32(Hm), i32(Hkv), i32(R), i32(C), i32(D), i32(nq), i32(nk), i32(c_q), i32(c_k), i32(c_h), i32(G))
    scores = cp.zeros((B, Hm, nqb, nkb), dtype=cp.float32)  # blocks no row sees stay 0
    lc = launch_config(B, Hm, R, config, C)
    chunk = lc["heads_per_chunk"]
    part = cp.empty((chunk, lc["ntiles"], R, lc["NKS"]), dtype=cp.float32)  # piece sums e
    tmax = cp.empty((chunk, lc["ntiles"], R), dtype=cp.float32)             # tile maxima M, then weights w
    kernel = _loader.get_function(KERNEL)
    for bh0 in range(0, B * Hm, chunk):
        grid = (lc["grid"][0], min(chunk, B * Hm - bh0), 1)
        _loader.launch(kernel, grid, lc["block"], (q_c, k_c, scores, part, tmax, i32(bh0)) + sizes + (i32(S), causal, scale),
                       shared_mem=lc["shared_mem"])
    return scores
