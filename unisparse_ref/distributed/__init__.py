"""Context-parallel UniSparse: one long sequence sharded over ranks (issue 17).

* :mod:`~unisparse_ref.distributed.comm`: the communicator interface, with an in-process
  simulation of ``W`` ranks (:class:`SimulatedComm`, :func:`run_simulated`) and NCCL through
  CuPy (:class:`NcclComm`, one process per GPU; CuPy is imported only when one is made);
* :mod:`~unisparse_ref.distributed.sharding`: which rank owns which query and key blocks
  (zigzag / head-tail causal load balancing, :func:`make_plan`);
* :mod:`~unisparse_ref.distributed.context_parallel`: the algorithm, in the float64
  reference (:func:`context_parallel_attention` per rank, :func:`simulate_context_parallel`
  for all ranks in one process), and the bytes it moves (:func:`expected_bytes`);
* :mod:`~unisparse_ref.distributed.model`: the scaling model of the docs page;
* ``python -m unisparse_ref.distributed``: the launcher (simulated ranks, NCCL ranks
  spawned one per GPU or started by ``mpirun``, the scaling model).

See the *Context parallelism* page of the docs (``docs/layers/distributed.md``).
"""

from __future__ import annotations

from .comm import (
    CommStats,
    Communicator,
    NcclComm,
    SimulatedComm,
    SimulatedGroup,
    nccl_unique_id,
    run_simulated,
)
from .context_parallel import (
    COMBINES,
    TAGS,
    DistributedResult,
    LocalShard,
    RankResult,
    assemble,
    context_parallel_attention,
    expected_bytes,
    shard_inputs,
    simulate_context_parallel,
)
from .sharding import (
    STRATEGIES,
    ShardPlan,
    head_tail_order,
    make_plan,
    partition_by_midpoint,
    query_block_costs,
)

__all__ = [
    "COMBINES",
    "STRATEGIES",
    "TAGS",
    "CommStats",
    "Communicator",
    "DistributedResult",
    "LocalShard",
    "NcclComm",
    "RankResult",
    "ShardPlan",
    "SimulatedComm",
    "SimulatedGroup",
    "assemble",
    "context_parallel_attention",
    "expected_bytes",
    "head_tail_order",
    "make_plan",
    "nccl_unique_id",
    "partition_by_midpoint",
    "query_block_costs",
    "run_simulated",
    "shard_inputs",
    "simulate_context_parallel",
]
