"""Schedule decision of the torch backend on CPU: run a stage program one slice of heads at a time.

A diffusion program reads its stored P once per hop. Run over every (batch, head) at once, each
hop streams all heads' P and vectors through the cache before the next hop comes back to the
first head, so on a CPU whose cache share holds one head but not all of them every hop reads P
from memory. Run slice by slice (all stages for a few heads, then the next few), P stays in
cache across the hops. Slices never straddle a GQA group unevenly: a slice is either whole
groups of query heads or a part of one group, so it maps onto a contiguous range of key/value
heads. Outputs are joined with ``torch.cat``, so autograd runs the backward slice by slice too.
"""

from __future__ import annotations

from typing import Callable

import torch

# A slice's working set (stored P plus four hop-sized vectors) should stay within this many bytes:
# about what one core's share of a shared L3 cache holds. Measured on the 2-core CPU machine
# (diffuser graph, L=4096, D=64): one head per slice (6 MiB) runs 1.1-1.25x faster than both
# heads at once (12 MiB); at L=16384 (24 MiB per head) slicing still gains about 5%.
SLICE_BYTES = 8 << 20


def group_compatible(head_block: int, heads: int, kv_heads: int) -> int:
    """``head_block`` rounded down (to at least 1) to a multiple of the GQA group size, or to a
    divisor of it when smaller, so that no slice straddles a group unevenly."""
    group = heads // kv_heads
    head_block = max(1, min(head_block, heads))
    if head_block >= group:
        return head_block // group * group
    return max(d for d in range(1, group + 1) if group % d == 0 and d <= head_block)


def choose_head_block(bytes_per_head: int, batch: int, heads: int, kv_heads: int, budget: int | None = None) -> int:
    """Query heads per slice: ``batch * heads`` (no slicing) when everything fits ``budget``
    (default :data:`SLICE_BYTES`), else the most heads of one batch entry that fit (at least one,
    see :func:`group_compatible`)."""
    budget = SLICE_BYTES if budget is None else budget
    if batch * heads * bytes_per_head <= budget:
        return batch * heads
    return group_compatible(budget // max(1, bytes_per_head), heads, kv_heads)


def run_by_head_slices(run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                       q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_block: int) -> torch.Tensor:
    """``run(q, k, v)`` on slices of ``head_block`` query heads of one batch entry each (their
    key/value heads alongside), joined back into ``[B, H, L, Dv]``. ``head_block >= B * H`` runs
    everything at once: ``run`` gets the tensors themselves."""
    B, H = q.shape[:2]
    group = H // k.shape[1]
    if head_block >= B * H:
        return run(q, k, v)
    head_block = group_compatible(head_block, H, k.shape[1])
    rows = []
    for b in range(B):
        parts = []
        for h0 in range(0, H, head_block):
            h1 = min(H, h0 + head_block)
            kv = slice(h0 // group, (h1 - 1) // group + 1)
            parts.append(run(q[b:b + 1, h0:h1], k[b:b + 1, kv], v[b:b + 1, kv]))
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
