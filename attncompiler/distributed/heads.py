"""Head-parallel attention: each rank computes a contiguous slice of the heads.

Every rank holds the whole sequence; rank ``r`` computes heads ``[h0, h1)`` as
:func:`~attncompiler.distributed.sharding.shard_bounds` splits them (uneven counts allowed). The
output stays sharded by head, or is all-gathered (padded to equal chunks) on request.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..program.autograd_guard import single_backward
from ..errors import InputError, LayoutError
from ..layout.block_layout import BlockLayout
from ..program.schedule import Schedule
from .plan import require_mask_family
from .sharding import shard_bounds


def head_range(heads: int, world_size: int, rank: int) -> tuple[int, int]:
    """Heads ``[h0, h1)`` computed by ``rank``."""
    if heads < world_size:
        raise LayoutError(f"head-parallel attention needs heads >= world_size, got {heads} < {world_size}; "
                          "use ring (sequence-parallel) mode instead")
    b = shard_bounds(heads, world_size)
    return b[rank], b[rank + 1]


def _head_slice(layout: BlockLayout, h0: int, h1: int) -> BlockLayout:
    gi = layout.group_index
    if gi.shape[1] == 1:  # the same layout for every head
        return layout
    return BlockLayout(layout.pattern, layout.geom, layout.groups, np.ascontiguousarray(gi[:, h0:h1]))


class _GatherHeads(torch.autograd.Function):
    """All-gather head chunks; backward keeps this rank's chunk of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, out, heads, group, stats):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        b = shard_bounds(heads, P)
        width = max(b[i + 1] - b[i] for i in range(P))
        pad = out.new_zeros(out.shape[0], width, *out.shape[2:])  # [B, Hmax, L, Dv]
        pad[:, :out.shape[1]] = out
        chunks = [torch.empty_like(pad) for _ in range(P)]
        dist.all_gather(chunks, pad, group=group)
        if stats is not None:
            sent = pad.numel() * pad.element_size() * (P - 1)
            stats["forward_bytes_sent"] = stats.get("forward_bytes_sent", 0) + sent
        ctx.range = (b[r], b[r + 1])
        return torch.cat([c[:, :b[i + 1] - b[i]] for i, c in enumerate(chunks)], dim=1)  # [B, H, L, Dv]

    @staticmethod
    @single_backward("the head-parallel output gather")
    def backward(ctx, grad):
        h0, h1 = ctx.range
        return grad[:, h0:h1], None, None, None


def head_parallel_attention(pattern, q, k, v, *, group=None, scale: float | None = None, gather: bool = False,
                            schedule: Schedule | None = None, stats: dict | None = None):
    """Head-parallel attention on torch.distributed.

    Args:
        pattern: a mask pattern (structural families raise :class:`UnsupportedError`).
        q, k, v: the full ``[B, H, L, D]`` tensors (the same on every rank); each rank reads only
            its heads, so gradients land in its slice of ``q``/``k``/``v``.
        group: the process group (default: the world).
        scale: softmax scale (default ``1/sqrt(D)``).
        gather: all-gather the output to ``[B, H, L, Dv]`` on every rank (each rank's loss is then
            taken to be the same replicated loss); otherwise return this rank's ``[B, h1-h0, L, Dv]``.
        schedule: block sizes (default 64, capped by L).
        stats: if given, ``forward_bytes_sent`` of the gather is added to it.

    Returns:
        ``(out, (h0, h1))``: the output and the heads this rank computed.
    """
    from ..codegen.pytorch.attention import block_sparse_attention

    require_mask_family(pattern, "head_parallel_attention")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"q, k, v must be [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] != q.shape[1]:
        raise InputError(f"head-parallel mode needs as many key heads as query heads, got {k.shape[1]} vs "
                         f"{q.shape[1]}; repeat the key/value heads first")
    P, r = dist.get_world_size(group), dist.get_rank(group)
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    h0, h1 = head_range(H, P, r)
    sched = schedule or Schedule(block_m=min(64, L), block_n=min(64, S))
    layout = _head_slice(pattern.layout(L, S, sched.block_m, sched.block_n, batch=q.shape[0], heads=H), h0, h1)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = block_sparse_attention(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], layout, sched, scale)
    if gather:
        out = _GatherHeads.apply(out, H, group, stats)
    return out, (h0, h1)
