"""Sequence-parallel ("ring") attention on torch.distributed.

Each rank holds its shard of q, k, v as the plan's :class:`~attncompiler.distributed.sharding.Sharding`
says (contiguous, zigzag or striped chunks, concatenated in global order). Key/value shards
travel around a bidirectional ring, only as far and only the rows some rank still needs
(the plan, from the layout); each rank computes one block-sparse sub-problem per (query
chunk, key chunk) pair it needs, with the pattern shifted to global indices, and merges the
partial outputs through their log-sum-exp. Communication of the next step overlaps the
compute of the current one, forward and backward (:mod:`~attncompiler.distributed.ring_fn`).
"""

from __future__ import annotations

import torch.distributed as dist

from ..errors import InputError
from ..program.schedule import Schedule
from ..dsl.score_mod import check_sinks
from .edges import prepare_mod
from .local import merge_partials, shifted_pattern
from .plan import dense_plan, plan_attention, require_mask_family
from .ring_fn import Ring, RingAttentionFn

__all__ = ["merge_partials", "ring_attention", "shifted_pattern"]


def ring_attention(pattern, q, k, v, *, seq_len: int, group=None, scale: float | None = None,
                   schedule: Schedule | None = None, stats: dict | None = None, plan=None,
                   sharding: str = "contiguous", dense_ring: bool = False, overlap: bool = True, score_mod=None,
                   sinks=None):
    """Sparsity-aware sequence-parallel ring attention on torch.distributed.

    Args:
        pattern: a mask pattern (structural families raise :class:`UnsupportedError`).
        q, k, v: this rank's shards ``[B, H, Lr, D]`` of a length-``seq_len`` sequence, cut as
            ``plan.sharding.shard(x, rank)`` cuts the full tensors (contiguous: ``x[:, :, a:b]`` with
            ``a, b = shard_bounds(L, P)[rank:rank + 2]``). Buffers follow the inputs' device and dtype.
        seq_len: the total sequence length L.
        group: the process group (default: the world).
        scale: softmax scale (default ``1/sqrt(D)``).
        schedule: block sizes of the local sub-problems (default 64, capped by the chunk sizes).
        stats: if given, ``forward_bytes_sent``/``backward_bytes_sent`` (bytes handed to
            torch.distributed) and ``compute_s``/``wait_s`` (seconds computing / blocked) are added.
        plan: a precomputed plan (default: :func:`plan_attention` with ``sharding``); its sharding wins.
        sharding: "contiguous", "zigzag", "striped" or "auto" when no plan is given; with anything
            but contiguous, cut the inputs and reassemble outputs with ``plan.sharding`` (every rank
            computes the same plan, so "auto" agrees everywhere).
        dense_ring: baseline for measurements: every shard travels whole P-1 hops forward (the dense
            ring's bytes) and every rank computes its queries on every shard (empty blocks skipped).
        overlap: post each step's communication before computing on the previous one (default);
            False waits for it first (for measuring what the overlap buys).
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` (``ac.softcap``, ``ac.alibi``,
            a function capturing tensors...), applied to every computed edge with its *global*
            positions; the partials merge by log-sum-exp unchanged.
        sinks: per-head sink logits ``[H]`` joining every row's denominator, added once after the merge.

    Gradients of the score_mod's captured tensors and of ``sinks`` are this rank's contribution
    (the edges it computed, its query rows for the sinks): every rank holds the full tensor and
    the gradients are summed over the ranks like every other parameter's gradient under sequence
    parallelism (all-reduce them over ``group``, as for the projections that made q, k, v);
    ring_attention does not reduce them itself.

    Returns:
        ``(out [B, H, Lr, Dv], lse [B, H, Lr])`` for this rank's queries, in its local order (with
        sinks, ``lse`` includes them).
        Every rank must backpropagate through ``out`` (the backward is a ring exchange too).
    """
    require_mask_family(pattern, "ring_attention")
    P, r = dist.get_world_size(group), dist.get_rank(group)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"q, k, v must be [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if plan is None:
        plan = plan_attention(pattern, seq_len, P, "ring", batch=q.shape[0], heads=q.shape[1],
                              kv_heads=k.shape[1], head_dim=k.shape[3], value_dim=v.shape[3],
                              elem_bytes=k.element_size(), sharding=sharding)
    if plan.mode != "ring" or plan.world_size != P or plan.seq_len != seq_len:
        raise InputError(f"the plan is for mode={plan.mode!r}, L={plan.seq_len}, P={plan.world_size}; this call "
                         f"has ring mode, L={seq_len}, P={P}")
    n = plan.sharding.local_len(r)
    if q.shape[2] != n or k.shape[2] != n or v.shape[2] != n:
        raise InputError(f"rank {r} holds {q.shape[2]} queries / {k.shape[2]} keys, but its {plan.sharding.kind} "
                         f"shard of L={seq_len} over {P} ranks has {n} tokens; cut it with plan.sharding.shard()")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    fn, captured = prepare_mod(score_mod, q, seq_len)
    sinks = check_sinks(sinks, q.shape[1], q.device)
    if dense_ring:
        plan = dense_plan(plan)
    ring = Ring(pattern, plan, plan, r, group, scale, schedule, overlap, stats, score_mod=fn, captured=captured)
    return RingAttentionFn.apply(q, k, v, ring, sinks, *(t for _, t in captured))
