"""The fused CPU attention kernels' view of one layout group (:class:`.attention.KernelTables`).

Built once per ``Blocks2D`` (cached while the layout lives) straight from its ranges: full key
blocks stay ``[start, end)`` ranges per query block (and, transposed for dk/dv, query-block
ranges per key block), so causal at a million tokens is one range per row, never one entry per
block. Only partial blocks carry an element mask; for shift-invariant predicates (windows,
causal, strided, traced functions of ``q - k``) blocks with equal offsets share one mask
(:mod:`attncompiler.layout.shift`), so a sliding window or causal layout holds a handful of
masks however long the sequence. Other predicates evaluate every partial block, under a budget:
past it the caller keeps the plain torch path.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from attncompiler.layout.block_layout import Blocks2D, block_masks
from attncompiler.layout.shift import shift_classes, shift_period

from .attention import KernelTables

# Element masks of partial blocks held per layout (bytes). A layout needing more (a predicate
# with no shift symmetry and very many partial blocks) runs on the plain torch path.
MASK_BUDGET_BYTES = 256 << 20
_EVAL_BLOCKS = 4096  # partial blocks evaluated per call of the predicate (bounded temporaries)

_cache: dict[int, KernelTables | None] = {}
_lock = threading.Lock()


def kernel_tables(blocks: Blocks2D) -> KernelTables | None:
    """The group's :class:`KernelTables` (cached with the layout), or None when its partial
    blocks' masks would exceed :data:`MASK_BUDGET_BYTES`."""
    key = id(blocks)
    with _lock:
        if key in _cache:
            return _cache[key]
    tables = _build(blocks)
    with _lock:
        if key not in _cache:
            _cache[key] = tables
            weakref.finalize(blocks, _cache.pop, key, None)
    return _cache[key]


def _build(blocks: Blocks2D) -> KernelTables | None:
    g = blocks.geom
    rows, cols = blocks.part_rows, blocks.part_cols
    rep, mask_of = _mask_classes(blocks, rows, cols)
    if len(rep) * g.block_m * g.block_n > MASK_BUDGET_BYTES:
        return None
    masks = torch.empty(len(rep), g.block_m, g.block_n, dtype=torch.uint8)
    for i in range(0, len(rep), _EVAL_BLOCKS):
        sel = rep[i:i + _EVAL_BLOCKS]
        masks[i:i + len(sel)] = block_masks(blocks, rows[sel], cols[sel]).to(torch.uint8)
    col_range_ptr, row_start, row_end = blocks.csc_ranges
    col_part_ptr, col_part_rows = blocks.csc_partial
    order = np.lexsort((rows, cols))  # the order csc_partial lists the partial blocks in

    def i64(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    def i32(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))

    return KernelTables(
        bm=g.block_m, bn=g.block_n, nqb=g.nqb, nkb=g.nkb,
        range_ptr=i64(blocks.range_ptr), range_start=i64(blocks.range_start), range_end=i64(blocks.range_end),
        part_ptr=i64(blocks.part_ptr), part_cols=i64(cols), part_mask=i32(mask_of),
        col_range_ptr=i64(col_range_ptr), row_start=i64(row_start), row_end=i64(row_end),
        col_part_ptr=i64(col_part_ptr), col_part_rows=i64(col_part_rows), col_part_mask=i32(mask_of[order]),
        masks=masks)


def _mask_classes(blocks: Blocks2D, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(representatives, class of every partial block)``: one class per block unless the
    predicate is shift-invariant, then one per (offset, phase, block size)."""
    g = blocks.geom
    n = len(rows)
    period = shift_period(blocks.pattern, g.q_end, g.kv_len) if n else None
    if period is None:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    q_lo, k_lo = g.q_lo(rows), g.k_lo(cols)
    q_size, k_size = g.q_hi(rows) - q_lo + 1, g.k_hi(cols) - k_lo + 1
    first, inverse = shift_classes(period, q_lo, q_size, k_lo, k_size)
    return np.asarray(first, dtype=np.int64), np.asarray(inverse, dtype=np.int64)
