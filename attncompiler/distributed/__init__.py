"""Distributed multi-head attention on torch.distributed (NCCL on GPUs, gloo on CPUs).

* :func:`plan_attention`: which key rows each query shard needs (from the block layout),
  bytes sent/received and blocks computed per rank, without running anything (``attnc plan``).
* :func:`ring_attention`: sequence-parallel, sparsity-aware exchange, log-sum-exp merge.
* :func:`head_parallel_attention`: each rank computes a slice of the heads.
"""

from .comm import CommunicationError
from .heads import head_parallel_attention, head_range
from .plan import (DistributedPlan, RankPlan, dense_plan, format_plan, plan_attention, require_mask_family,
                   shard_bounds)
from .ring import merge_partials, ring_attention

__all__ = ["CommunicationError", "DistributedPlan", "RankPlan", "dense_plan", "format_plan",
           "head_parallel_attention", "head_range", "merge_partials", "plan_attention", "require_mask_family",
           "ring_attention", "shard_bounds"]
