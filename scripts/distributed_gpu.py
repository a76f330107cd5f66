#!/usr/bin/env python3
"""The GPU check of context-parallel UniSparse on NCCL (issue 17): one command, PASS or FAIL.

Spawns ``--nprocs`` processes (default 1), one per GPU (rank ``r`` on GPU ``r % count``), each
an :class:`unisparse_ref.distributed.NcclComm` rank. Each first round-trips the communicator
itself (ragged shapes, bfloat16, NumPy and CuPy arrays, all-gather and all-to-all), then runs
:func:`~unisparse_ref.distributed.context_parallel_attention` on its shard of a seeded
problem (GQA Hq=8/Hkv=2, ragged Nq=1999 < Nk=2600, S=64). The parent assembles the ranks'
rows and prints PASS when they equal the one-device reference
(``unisparse_attention(..., backend="numpy")``: masks identical, out within 1e-12, lse within one
float32 ulp) and the counted bytes equal the formula; otherwise FAIL. Exit status 0 on PASS,
1 on FAIL, 2 when CuPy/NCCL is missing.

Usage (on the GPU machine, from the repository root):

    python scripts/distributed_gpu.py                 # one GPU: the NCCL path with one rank
    python scripts/distributed_gpu.py --nprocs 2      # two GPUs (or two ranks sharing one GPU)
    mpirun -n 4 python -m unisparse_ref.distributed nccl --mpi   # ranks started by MPI (mpi4py)

Any option of ``python -m unisparse_ref.distributed nccl`` is accepted (``--combine merge``,
``--n``, ``--nk``, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unisparse_ref.distributed.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["nccl", *sys.argv[1:]]))
