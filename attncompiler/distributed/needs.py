"""Which keys each chunk of queries needs, read from the pattern's block layout (no tensors).

Chunks are contiguous ranges of the sequence (``chunk_bounds``). Query chunk ``a`` needs key
chunk ``b`` when a non-empty layout block overlaps both, and then only the global key rows
those blocks cover, kept as a few disjoint intervals (:mod:`~attncompiler.distributed.pieces`):
global key columns and a window strip stay two small pieces instead of one hull. Blocks that
straddle a chunk boundary are refined by evaluating only their undecided pieces, so no need is
missed and few are over-estimated.

"Dense" query rows (:func:`dense_block_rows`: block rows that attend to at least half of all
key blocks, such as global query tokens) can be left out of the needs; the ring then sends
those few query rows to the key owners instead of sending every key to them.
"""

from __future__ import annotations

import numpy as np

from ..layout.block_sets import pairs_from_ranges
from .pieces import covers, merge

DENSE_FRACTION = 0.5  # a block row attending to at least this share of key blocks is a dense candidate


def chunk_of(bounds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Index of the chunk holding each position in ``idx``."""
    return np.searchsorted(bounds, idx, side="right") - 1


def dense_block_rows(layout, fraction: float = DENSE_FRACTION) -> np.ndarray:
    """Bool [nqb]: block rows whose blocks (in some group) cover at least ``fraction`` of the key blocks."""
    g = layout.geom
    out = np.zeros(g.nqb, dtype=bool)
    for grp in layout.groups:
        out |= np.diff(grp.row_ptr) >= max(1.0, fraction * g.nkb)  # counts from ranges, not blocks
    return out


def row_blocks(grp, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the blocks in the selected block rows (bool [nqb]) only, full and partial."""
    sel = rows[grp.range_rows]
    fr, fc = pairs_from_ranges(grp.range_rows[sel], grp.range_start[sel], grp.range_end[sel] - 1)
    psel = rows[grp.part_rows]
    return np.concatenate([fr, grp.part_rows[psel]]), np.concatenate([fc, grp.part_cols[psel]])


def _refine_straddling(grp, g, b_arr, extra, rows, cols, q0, q1, k0, k1) -> None:
    """Add the exact key pieces of blocks that straddle chunk boundaries, evaluating only undecided pieces."""
    import torch

    for n, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        for qi in {int(q0[n]), int(q1[n])}:
            for kj in {int(k0[n]), int(k1[n])}:
                qa, qb = max(g.q_lo(r), b_arr[qi]), min(g.q_hi(r) + 1, b_arr[qi + 1])
                ka, kb = max(g.k_lo(c), b_arr[kj]), min(g.k_hi(c) + 1, b_arr[kj + 1])
                have = extra.setdefault((qi, kj), [])
                if qa >= qb or ka >= kb or covers(merge(have), ((ka, kb),)):
                    continue  # empty or already covered
                q = torch.arange(qa, qb)[:, None]  # [bm', 1]
                k = torch.arange(ka, kb)[None, :]  # [1, bn']
                if bool(grp.pattern.evaluate(0, 0, q, k, g.q_len, g.kv_len).any()):
                    have.append((ka, kb))


def chunk_needs(layout, chunk_bounds, skip_rows: np.ndarray | None = None) -> dict:
    """``{(a, b): pieces}``: global key intervals of chunk b that query chunk a needs (absent: none).

    Block rows flagged in ``skip_rows`` (bool [nqb]) are left out. The layout's blocks must be
    no larger than the smallest chunk (a block then spans at most two chunks per side).
    """
    g = layout.geom
    b_arr = np.asarray(chunk_bounds)
    C = len(b_arr) - 1
    # chunks of each block row / column (per row and column, not per block: 1M tokens has 4M blocks)
    r_idx, c_idx = np.arange(g.nqb), np.arange(g.nkb)
    rq0, rq1 = chunk_of(b_arr, g.q_lo(r_idx)), chunk_of(b_arr, g.q_hi(r_idx))
    ck0, ck1 = chunk_of(b_arr, g.k_lo(c_idx)), chunk_of(b_arr, g.k_hi(c_idx))
    whole_col = ck0 == ck1
    keep_row = np.ones(g.nqb, dtype=bool) if skip_rows is None else ~skip_rows
    seen = np.zeros((C, g.nkb), dtype=bool)  # [query chunk, key block column]: some block there
    extra: dict = {}
    nonwhole_cols = np.flatnonzero(~whole_col)  # at most C - 1 columns
    whole_row = (rq0 == rq1) & keep_row
    for grp in layout.groups:
        # full ranges of whole rows: mark [start, end) per query chunk with a difference array
        rr, s, e = grp.range_rows, grp.range_start, grp.range_end
        w = whole_row[rr]
        marks = np.zeros((C, g.nkb + 1), dtype=np.int32)
        np.add.at(marks, (rq0[rr[w]], s[w]), 1)
        np.add.at(marks, (rq0[rr[w]], e[w]), -1)
        seen |= np.cumsum(marks, axis=1)[:, :g.nkb] > 0
        # partial blocks of whole rows in whole columns
        pr, pc = grp.part_rows, grp.part_cols
        pw = whole_row[pr] & whole_col[pc]
        seen[rq0[pr[pw]], pc[pw]] = True
        # straddling blocks: every block of a kept row that spans chunks, and the blocks of whole
        # rows in the few columns that span chunks
        sr, sc = row_blocks(grp, keep_row & (rq0 != rq1))
        parts_r, parts_c = [sr, pr[whole_row[pr] & ~whole_col[pc]]], [sc, pc[whole_row[pr] & ~whole_col[pc]]]
        for j in nonwhole_cols:
            hit = w & (s <= j) & (e > j)
            parts_r.append(rr[hit])
            parts_c.append(np.full(int(hit.sum()), j, dtype=np.int64))
        r, c = np.concatenate(parts_r), np.concatenate(parts_c)
        _refine_straddling(grp, g, b_arr, extra, r, c, rq0[r], rq1[r], ck0[c], ck1[c])
    out: dict = {}
    for a in range(C):
        cs = np.flatnonzero(seen[a] & whole_col)
        if len(cs) == 0:
            continue
        # runs of consecutive columns inside one key chunk -> one interval each
        brk = np.flatnonzero((np.diff(cs) != 1) | (np.diff(ck0[cs]) != 0)) + 1
        starts, ends = cs[np.r_[0, brk]], cs[np.r_[brk - 1, len(cs) - 1]]
        for s, e in zip(starts, ends):
            out.setdefault((a, int(ck0[s])), []).append((int(g.k_lo(s)), int(g.k_hi(e)) + 1))
    for key, ivs in extra.items():
        if ivs:
            out.setdefault(key, []).extend(ivs)
    return {key: merge(ivs) for key, ivs in out.items()}


def dense_chunk_needs(layout, chunk_bounds, rows: np.ndarray) -> np.ndarray:
    """Bool [C, C]: query chunk a holds some of the block ``rows`` (bool [nqb]) and they touch key chunk b."""
    g = layout.geom
    b_arr = np.asarray(chunk_bounds)
    C = len(b_arr) - 1
    out = np.zeros((C, C), dtype=bool)
    r_idx, c_idx = np.arange(g.nqb), np.arange(g.nkb)
    rq = (chunk_of(b_arr, g.q_lo(r_idx)), chunk_of(b_arr, g.q_hi(r_idx)))
    ck = (chunk_of(b_arr, g.k_lo(c_idx)), chunk_of(b_arr, g.k_hi(c_idx)))
    for grp in layout.groups:
        r, c = row_blocks(grp, rows)
        for qa in rq:
            for kb in ck:
                out[qa[r], kb[c]] = True
    return out


def dense_row_intervals(layout, rows: np.ndarray):
    """Global query intervals of the block ``rows`` (bool [nqb]), merged."""
    g = layout.geom
    idx = np.flatnonzero(rows)
    return merge((int(g.q_lo(r)), int(g.q_hi(r)) + 1) for r in idx)


def chunk_blocks(layout, chunk_bounds, batch: int, heads: int, dense_rows: np.ndarray | None = None) -> np.ndarray:
    """Layout blocks computed in each chunk, summed over every (batch, head).

    A block belongs to the chunk where its query block starts, except in ``dense_rows``
    (bool [nqb]), computed by the key owner: there the chunk where its key block starts.
    """
    g = layout.geom
    b_arr = np.asarray(chunk_bounds)
    C = len(b_arr) - 1
    row_chunk = chunk_of(b_arr, g.q_lo(np.arange(g.nqb)))
    col_chunk = chunk_of(b_arr, g.k_lo(np.arange(g.nkb)))
    per_group = []
    d = np.zeros(g.nqb, dtype=bool) if dense_rows is None else dense_rows
    for grp in layout.groups:  # per-row counts from ranges; dense rows (few) listed by key block
        counts = np.where(d, 0, np.diff(grp.row_ptr))
        _, dc = row_blocks(grp, d)
        per_group.append(np.bincount(row_chunk, weights=counts, minlength=C)[:C].astype(np.int64)
                         + np.bincount(col_chunk[dc], minlength=C)[:C])
    gi = layout.group_index
    blocks = np.zeros(C, dtype=np.int64)
    for idx, n in zip(*np.unique(gi.reshape(-1), return_counts=True)):
        blocks += per_group[idx] * n
    if gi.size < batch * heads:  # pattern shared over batch/heads: count every (b, h)
        blocks *= (batch * heads) // gi.size
    return blocks
