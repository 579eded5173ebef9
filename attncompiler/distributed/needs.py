"""Which keys each chunk of queries needs, read from the pattern's block layout (no tensors).

Chunks are contiguous ranges of the sequence (``chunk_bounds``). Query chunk ``a`` needs key
chunk ``b`` when a non-empty layout block overlaps both, and then only the global key range
``[lo[a, b], hi[a, b])`` those blocks cover. Blocks that straddle a chunk boundary are refined
by evaluating only their undecided pieces, so no need is missed and few are over-estimated.
"""

from __future__ import annotations

import numpy as np


def chunk_of(bounds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Index of the chunk holding each position in ``idx``."""
    return np.searchsorted(bounds, idx, side="right") - 1


def _refine_straddling(grp, g, b_arr, lo, hi, which, q0, q1, k0, k1) -> None:
    """Widen key ranges for blocks that straddle chunk boundaries, evaluating only undecided pieces."""
    import torch

    for n, i in enumerate(which):
        r, c = int(grp.rows[i]), int(grp.cols[i])
        for qi in {int(q0[n]), int(q1[n])}:
            for kj in {int(k0[n]), int(k1[n])}:
                qa, qb = max(g.q_lo(r), b_arr[qi]), min(g.q_hi(r) + 1, b_arr[qi + 1])
                ka, kb = max(g.k_lo(c), b_arr[kj]), min(g.k_hi(c) + 1, b_arr[kj + 1])
                if lo[qi, kj] <= ka and hi[qi, kj] >= kb:
                    continue  # already covered
                q = torch.arange(qa, qb)[:, None]  # [bm', 1]
                k = torch.arange(ka, kb)[None, :]  # [1, bn']
                if bool(grp.pattern.evaluate(0, 0, q, k, g.q_len, g.kv_len).any()):
                    lo[qi, kj] = min(lo[qi, kj], ka)
                    hi[qi, kj] = max(hi[qi, kj], kb)


def chunk_needs(layout, chunk_bounds) -> tuple[np.ndarray, np.ndarray]:
    """Global key ranges ``(lo, hi)`` [C, C] that query chunk a needs from key chunk b (``hi <= lo``: none).

    The layout's blocks must be no larger than the smallest chunk (a block then spans at most
    two chunks per side).
    """
    g = layout.geom
    b_arr = np.asarray(chunk_bounds)
    C = len(b_arr) - 1
    lo = np.full((C, C), g.kv_len, dtype=np.int64)
    hi = np.zeros((C, C), dtype=np.int64)
    # chunks of each block row / column (per row and column, not per block: 1M tokens has 4M blocks)
    r_idx, c_idx = np.arange(g.nqb), np.arange(g.nkb)
    rq0, rq1 = chunk_of(b_arr, g.q_lo(r_idx)), chunk_of(b_arr, g.q_hi(r_idx))
    ck0, ck1 = chunk_of(b_arr, g.k_lo(c_idx)), chunk_of(b_arr, g.k_hi(c_idx))
    whole_col = ck0 == ck1
    for grp in layout.groups:
        rows, cols = grp.rows, grp.cols
        if len(rows) == 0:
            continue
        whole = (rq0 == rq1)[rows] & whole_col[cols]
        seen = np.zeros((C, g.nkb), dtype=bool)  # [query chunk, key block column]: some block there
        seen[rq0[rows[whole]], cols[whole]] = True
        for kc in range(C):
            cs = np.flatnonzero(whole_col & (ck0 == kc))  # columns inside key chunk kc, ascending
            if len(cs) == 0:
                continue
            sub = seen[:, cs]  # [C, n]
            hit = sub.any(1)
            first = cs[sub.argmax(1)]
            last = cs[len(cs) - 1 - sub[:, ::-1].argmax(1)]
            lo[hit, kc] = np.minimum(lo[hit, kc], g.k_lo(first[hit]))
            hi[hit, kc] = np.maximum(hi[hit, kc], g.k_hi(last[hit]) + 1)
        straddle = np.flatnonzero(~whole)
        _refine_straddling(grp, g, b_arr, lo, hi, straddle, rq0[rows[straddle]], rq1[rows[straddle]],
                           ck0[cols[straddle]], ck1[cols[straddle]])
    return lo, hi


def chunk_blocks(layout, chunk_bounds, batch: int, heads: int) -> np.ndarray:
    """Layout blocks whose query block starts in each chunk, summed over every (batch, head)."""
    g = layout.geom
    b_arr = np.asarray(chunk_bounds)
    C = len(b_arr) - 1
    row_chunk = chunk_of(b_arr, g.q_lo(np.arange(g.nqb)))
    per_group = [np.bincount(row_chunk[grp.rows], minlength=C)[:C] for grp in layout.groups]
    gi = layout.group_index
    blocks = np.zeros(C, dtype=np.int64)
    for idx, n in zip(*np.unique(gi.reshape(-1), return_counts=True)):
        blocks += per_group[idx] * n
    if gi.size < batch * heads:  # pattern shared over batch/heads: count every (b, h)
        blocks *= (batch * heads) // gi.size
    return blocks
