"""Distributed multi-head attention on torch.distributed (NCCL on GPUs, gloo on CPUs).

* :func:`plan_attention`: sharding (contiguous, zigzag, striped or auto), which key rows each
  rank needs (from the block layout), ring routes, bytes sent/received and blocks computed per
  rank, without running anything (``attnc plan``).
* :func:`ring_attention`: sequence-parallel, sparsity-aware bidirectional ring with overlapped
  ``batch_isend_irecv``, log-sum-exp merge, reverse-ring backward; shards travel as a few row
  pieces, and query rows attending to most keys (global tokens) go to the key owners instead.
* :func:`head_parallel_attention`: each rank computes a slice of the heads.
* :class:`Sharding`: cut full tensors into a rank's local part and reassemble them.
"""

from .comm import CommunicationError
from .heads import head_parallel_attention, head_range
from .plan import (DistributedPlan, RankPlan, ShardingSummary, dense_plan, format_plan, plan_attention,
                   require_mask_family)
from .local import merge_partials
from .ring import ring_attention
from .sharding import Sharding, make_sharding, shard_bounds

__all__ = ["CommunicationError", "DistributedPlan", "RankPlan", "Sharding", "ShardingSummary", "dense_plan",
           "format_plan", "head_parallel_attention", "head_range", "make_sharding", "merge_partials",
           "plan_attention", "require_mask_family", "ring_attention", "shard_bounds"]
