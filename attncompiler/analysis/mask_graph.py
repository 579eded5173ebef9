"""Attention graphs of mask patterns, at token level and as block-level quotients.

Both are built from the analytic block layout (:meth:`Pattern.layout`), never from an L x L
evaluation: full blocks contribute whole rectangles, partial blocks are evaluated element by
element (:func:`attncompiler.layout.block_layout.partial_masks`), in chunks that bound memory. Per-head
patterns give one graph for the layer: information crosses a layer through any head, so the
graph is the union of the heads' masks (the block graph evaluates that union exactly).

What the block-level quotient preserves (node = block of ``block`` consecutive tokens, edge
weight = allowed (query, key) pairs in the block pair, exact):

* allowed pairs, density and per-block cost: exactly.
* reachability: a token path maps to a block walk, so block hops are a lower bound on token
  hops and block reach an upper bound on token reach. When every non-empty block is full,
  tokens of a block are twins (identical in- and out-neighbours) and the block graph is the
  exact twin quotient: token hops, reach fractions and diameter are reproduced exactly.
* spectrum: with all blocks full, the quotient's normalized adjacency has exactly the token
  graph's eigenvalues on block-constant vectors; the rest are the twin eigenvalues
  (Laplacian 1 or 1 + 1/d), which the analysis adds. With partial blocks it is an estimate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import LayoutError, UnsupportedError
from ..layout.block_layout import FULL, PARTIAL, Blocks2D, block_masks
from ..layout.shift import shift_classes, shift_period
from ..layout.block_sets import combine_segments, pairs_from_ranges, segments_to_blocks, sort_segments, union_kind
from ..dsl.pattern import Pattern
from .graph import ATTEND, TOKEN, AttentionGraph, register_graph_builder

# Above this many L x L elements the token graph is built from the layout, not a dense mask.
_DENSE_LIMIT = 1 << 22
# Partial blocks evaluated per chunk (x block_m x block_n elements).
_CHUNK_ELEMS = 1 << 23


def head_patterns(pattern: Pattern, heads: int | None = None) -> list[Pattern]:
    """The distinct head-specialized patterns whose union forms one layer (batch entry 0)."""
    period = pattern.head_period
    if period is None and heads is None:
        raise UnsupportedError(f"{pattern!r} depends on the head in a way the analysis cannot see; "
                               "pass heads=H to analyze the union of H heads")
    n = heads if period is None else (period if heads is None else min(heads, period))
    out: list[Pattern] = []
    for h in range(max(n, 1)):
        p = pattern.specialize(0, h)
        if p not in out:
            out.append(p)
    return out


def group_layouts(pats: list[Pattern], L: int, block: int) -> list[Blocks2D]:
    """The block layout of each head pattern at length ``L`` with square ``block``-token blocks, one
    :class:`Blocks2D` per pattern (the input of the block graphs)."""
    return [p.layout(L, L, block, block).group_for(0, 0) for p in pats]


@dataclass(frozen=True, eq=False)
class UnionLayout:
    """The union of several heads' layouts, kept as the layouts keep themselves: blocks full in
    some head as per-row ``[start, end)`` ranges, the other non-empty blocks as an explicit sorted
    list. ``part_multi`` marks partial blocks non-empty in more than one head (their element mask
    is the OR of the heads'); ``part_head`` names the one head of the others."""

    geom: object
    range_rows: np.ndarray
    range_start: np.ndarray
    range_end: np.ndarray
    part_rows: np.ndarray
    part_cols: np.ndarray
    part_multi: np.ndarray
    part_head: np.ndarray
    part_index: np.ndarray  # position of the block in its head's partial list (single-head blocks)

    @property
    def num_full(self) -> int:
        return int((self.range_end - self.range_start).sum())

    @property
    def num_blocks(self) -> int:
        return self.num_full + len(self.part_rows)

    def full_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` of the full blocks, expanded (for consumers that need one entry each)."""
        return pairs_from_ranges(self.range_rows, self.range_start, self.range_end - 1)


def _segments(grp: Blocks2D):
    """A layout as block segments: full ranges FULL, partial blocks PARTIAL (sorted, disjoint)."""
    rows = np.concatenate([grp.range_rows, grp.part_rows])
    start = np.concatenate([grp.range_start, grp.part_cols])
    end = np.concatenate([grp.range_end, grp.part_cols + 1])
    kind = np.concatenate([np.full(len(grp.range_rows), FULL, np.uint8), np.full(len(grp.part_rows), PARTIAL, np.uint8)])
    return sort_segments(rows, start, end, kind, grp.geom.nkb)


def union_layout(grps: list[Blocks2D]) -> UnionLayout:
    """Union of several layouts, computed on their ranges (cost proportional to ranges plus
    partial blocks, never to the full blocks)."""
    g = grps[0].geom
    segs = _segments(grps[0])
    for grp in grps[1:]:
        segs = combine_segments(segs, _segments(grp), g.nkb, union_kind)  # PARTIAL | PARTIAL -> UNKNOWN
    rows, start, end, kind = segs
    f = kind == FULL
    pr, pc, pk = segments_to_blocks(rows[~f], start[~f], end[~f], kind[~f])
    order = np.lexsort((pc, pr))
    pr, pc, pk = pr[order], pc[order], pk[order]
    head = np.full(len(pr), -1, np.int64)
    index = np.zeros(len(pr), np.int64)
    single = pk == PARTIAL
    want = pr * g.nkb + pc
    for h, grp in enumerate(grps):  # which head holds each single-head partial block
        have = grp.part_rows * g.nkb + grp.part_cols  # sorted by (row, col)
        pos = np.searchsorted(have, want)
        pos_c = np.minimum(pos, max(len(have) - 1, 0))
        hit = single & (pos < len(have)) & (have[pos_c] == want) if len(have) else np.zeros(len(want), bool)
        head[hit], index[hit] = h, pos_c[hit]
    assert (head[single] >= 0).all(), "a partial block of the union belongs to no head"
    return UnionLayout(g, rows[f], start[f], end[f], pr, pc, ~single, head, index)


@functools.lru_cache(maxsize=32)
def partial_weights(grp: Blocks2D, dtype: torch.dtype) -> np.ndarray:
    """Allowed pairs of each partial block of ``grp`` (aligned with ``part_rows``), evaluated once
    per layout: the block graph, its cost and each head's cost share them.

    When the predicate is invariant under shifting both positions by a period ``P``
    (:func:`shift_period`: windows, strided, causal, block-local and their combinations), whole
    blocks with the same offset ``q_lo - k_lo`` and the same ``q_lo mod P`` have the same mask:
    one block per class is evaluated (exact; for block-aligned periods at most ``nqb + nkb``
    blocks instead of every partial block)."""
    g = grp.geom
    rows, cols = grp.part_rows, grp.part_cols
    w = np.zeros(len(rows), dtype=np.int64)
    period = shift_period(grp.pattern, g.q_end, g.kv_len) if len(rows) else None
    if period is not None and period <= g.q_end:  # a longer period shares nothing
        qs, ks = g.q_hi(rows) - g.q_lo(rows) + 1, g.k_hi(cols) - g.k_lo(cols) + 1
        first, inverse = shift_classes(period, g.q_lo(rows), qs, g.k_lo(cols), ks)
        w[:] = _count(grp, rows[first], cols[first], dtype)[inverse]
        return w
    return _count(grp, rows, cols, dtype)


def _count(grp: Blocks2D, rows: np.ndarray, cols: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Allowed pairs of each given block, evaluated in chunks that bound memory."""
    out = np.zeros(len(rows), dtype=np.int64)
    for sl in _chunks(len(rows), grp.geom):
        m = _eval_blocks(grp, rows[sl], cols[sl], dtype)
        out[sl] = m.reshape(len(m), -1).sum(dim=1, dtype=torch.int32).numpy()
    return out


def index_dtype(pats: list[Pattern], L: int) -> torch.dtype:
    """int32 when interval bounds prove every subexpression fits (4x faster evaluation), else int64."""
    box = {"q_idx": (np.int64(0), np.int64(L - 1)), "kv_idx": (np.int64(0), np.int64(L - 1)),
           "b": (np.int64(0), np.int64(0)), "h": (np.int64(0), np.int64(0))}
    for p in pats:
        e = p.predicate(L, L)
        if e is None:
            return torch.int64
        try:
            for node in e.walk():
                lo, hi = node.bounds(box)
                if np.min(lo) < -(2 ** 31) + 1 or np.max(hi) > 2 ** 31 - 2:
                    return torch.int64
        except Exception:  # a node without interval bounds: stay safe
            return torch.int64
    return torch.int32


def _eval_blocks(grp: Blocks2D, rows: np.ndarray, cols: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """:func:`attncompiler.layout.block_layout.block_masks` with a choice of index dtype."""
    if dtype == torch.int64:
        return block_masks(grp, rows, cols)
    g = grp.geom
    q = torch.from_numpy(g.q_lo(rows).astype(np.int32))[:, None] + torch.arange(g.block_m, dtype=dtype)
    k = torch.from_numpy(g.k_lo(cols).astype(np.int32))[:, None] + torch.arange(g.block_n, dtype=dtype)
    valid = (q < g.q_len)[:, :, None] & (k < g.kv_len)[:, None, :]
    m = grp.pattern.evaluate(0, 0, q.clamp_max(g.q_len - 1)[:, :, None], k.clamp_max(g.kv_len - 1)[:, None, :],
                             g.q_len, g.kv_len)
    return m & valid


def union_masks(grps: list[Blocks2D], rows: np.ndarray, cols: np.ndarray,
                dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Element masks ``[P, BM, BN]`` of the union of the heads on the given blocks."""
    g = grps[0].geom
    out = torch.zeros(len(rows), g.block_m, g.block_n, dtype=torch.bool)
    want = rows * g.nkb + cols
    for grp in grps:
        seg = _segments(grp)
        # kind of each wanted block in this head: look it up in the head's segments
        keys_lo, keys_hi = seg[0] * (g.nkb + 1) + seg[1], seg[0] * (g.nkb + 1) + seg[2]
        w = rows * (g.nkb + 1) + cols
        pos = np.searchsorted(keys_lo, w, side="right") - 1
        pos_c = np.maximum(pos, 0)
        hit = (pos >= 0) & (w < keys_hi[pos_c]) if len(keys_lo) else np.zeros(len(want), bool)
        if not hit.any():
            continue
        full = hit & (seg[3][pos_c] == FULL)
        out[torch.from_numpy(np.flatnonzero(full))] = _valid(g, rows[full], cols[full])
        part = hit & ~full
        if part.any():
            sel = torch.from_numpy(np.flatnonzero(part))
            out[sel] |= _eval_blocks(grp, rows[part], cols[part], dtype)
    return out


def _valid(g, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """``[P, BM, BN]`` True on elements inside the lengths (a full block's mask)."""
    q = torch.from_numpy(g.q_lo(rows))[:, None] + torch.arange(g.block_m)
    k = torch.from_numpy(g.k_lo(cols))[:, None] + torch.arange(g.block_n)
    return (q < g.q_len)[:, :, None] & (k < g.kv_len)[:, None, :]


def _chunks(n: int, g):
    """Slices of at most ``_CHUNK_ELEMS / (BM * BN)`` blocks covering ``range(n)``."""
    step = max(1, _CHUNK_ELEMS // (g.block_m * g.block_n))
    return (slice(s, min(s + step, n)) for s in range(0, n, step))


def token_adjacency(pattern: Pattern, L: int, *, block: int = 64, heads: int | None = None) -> sp.csr_matrix:
    """The token-level mask of one layer as a bool CSR ``[L, L]`` (``[query, key]``), exact."""
    pats = head_patterns(pattern, heads)
    if L * L <= _DENSE_LIMIT:
        dense = np.zeros((L, L), dtype=bool)
        for p in pats:
            dense |= p.to_dense(L).numpy()
        return sp.csr_matrix(dense)
    grps = group_layouts(pats, L, block)
    g = grps[0].geom
    u = union_layout(grps)
    qs, ks = [], []
    # full ranges: every token row of the block row sees the range's key tokens (clipped to L)
    rr, k0 = u.range_rows, u.range_start * g.block_n
    k1 = np.minimum(u.range_end * g.block_n, L)
    tq = rr[:, None] * g.block_m + np.arange(g.block_m)  # [ranges, bm] token rows
    ok = tq < L
    tq, tk0, tk1 = tq[ok], np.broadcast_to(k0[:, None], ok.shape)[ok], np.broadcast_to(k1[:, None], ok.shape)[ok]
    fq, fk = pairs_from_ranges(tq, tk0, tk1 - 1)
    qs.append(fq); ks.append(fk)
    dtype = index_dtype(pats, L)
    for sl in _chunks(len(u.part_rows), g):  # partial blocks: evaluate the union of the heads
        pr, pc = u.part_rows[sl], u.part_cols[sl]
        m = union_masks(grps, pr, pc, dtype).numpy()
        b, i, j = np.nonzero(m)
        qs.append(pr[b] * g.block_m + i); ks.append(pc[b] * g.block_n + j)
    q, k = np.concatenate(qs), np.concatenate(ks)
    adj = sp.csr_matrix((np.ones(len(q), dtype=bool), (q, k)), shape=(L, L))
    adj.sum_duplicates()
    adj.sort_indices()
    return adj


@functools.lru_cache(maxsize=16)
def block_adjacency(pattern: Pattern, L: int, block: int, *, heads: int | None = None):
    """Block quotient of one layer: ``(weights CSR [nb, nb] int64, all_full, sym_diag [nb])``.

    ``weights[r, c]`` = allowed pairs in (query block r, key block c); ``sym_diag[r]`` = ordered
    pairs of distinct tokens of block r connected in either direction (for the spectrum).

    Built from the heads' ranges: a full range is one run of the CSR row (weight = its area),
    and only partial blocks are evaluated, once per head layout (:func:`partial_weights`); a
    block partial in several heads evaluates the union of their masks. Cached (the report's
    graph and cost ask for the same quotient).
    """
    pats = head_patterns(pattern, heads)
    grps = group_layouts(pats, L, block)
    g = grps[0].geom
    u = union_layout(grps)
    dtype = index_dtype(pats, L)
    sizes = g.q_hi(np.arange(g.nqb)) - g.q_lo(np.arange(g.nqb)) + 1
    k_cum = np.concatenate([[0], np.cumsum(g.k_hi(np.arange(g.nkb)) - g.k_lo(np.arange(g.nkb)) + 1)])
    fr, fc = u.full_blocks()
    fw = sizes[fr] * (k_cum[fc + 1] - k_cum[fc])
    pw = np.zeros(len(u.part_rows), dtype=np.int64)
    for h, grp in enumerate(grps):
        mine = u.part_head == h
        if mine.any():
            pw[mine] = partial_weights(grp, dtype)[u.part_index[mine]]
    multi = np.flatnonzero(u.part_multi)
    for sl in _chunks(len(multi), g):
        sel = multi[sl]
        m = union_masks(grps, u.part_rows[sel], u.part_cols[sel], dtype)
        pw[sel] = m.reshape(len(sel), -1).sum(dim=1).numpy()
    sym_diag = np.zeros(g.nqb, dtype=np.int64)
    diag_full = fr == fc
    sym_diag[fr[diag_full]] = sizes[fr[diag_full]] * (sizes[fr[diag_full]] - 1)
    diag = np.flatnonzero(u.part_rows == u.part_cols)
    for sl in _chunks(len(diag), g):
        sel = diag[sl]
        md = union_masks(grps, u.part_rows[sel], u.part_cols[sel], dtype)
        sym = md | md.transpose(1, 2)
        sym_diag[u.part_rows[sel]] = (sym.sum(dim=(1, 2)) - torch.diagonal(sym, dim1=1, dim2=2).sum(dim=1)).numpy()
    keep = pw > 0
    rows = np.concatenate([fr, u.part_rows[keep]])
    cols = np.concatenate([fc, u.part_cols[keep]])
    adj = sp.csr_matrix((np.concatenate([fw, pw[keep]]).astype(np.int64), (rows, cols)), shape=(g.nqb, g.nkb))
    adj.sort_indices()
    return adj, bool(keep.sum() == 0), sym_diag


def causal_leak(pattern: Pattern, L: int, *, block: int = 64, heads: int | None = None) -> tuple[int, int] | None:
    """A pair ``(key, query)`` with ``key > query`` that the pattern allows, or None (exact).

    Decided on the union's ranges: a block right of the diagonal or a full diagonal block leaks
    for sure; otherwise only the partial diagonal blocks are evaluated."""
    pats = head_patterns(pattern, heads)
    grps = group_layouts(pats, L, block)
    g = grps[0].geom
    u = union_layout(grps)
    rr, rs, re_ = u.range_rows, u.range_start, u.range_end
    right = re_ - 1 > rr  # a full range reaching past the diagonal
    on_diag = (rs <= rr) & (rr < re_) & (g.block_m > 1)
    cand = []
    if right.any():
        i = int(np.flatnonzero(right)[0]); cand.append((int(rr[i]), max(int(rs[i]), int(rr[i]) + 1)))
    if on_diag.any():
        i = int(np.flatnonzero(on_diag)[0]); cand.append((int(rr[i]), int(rr[i])))
    pright = np.flatnonzero(u.part_cols > u.part_rows)
    if len(pright):
        cand.append((int(u.part_rows[pright[0]]), int(u.part_cols[pright[0]])))
    if cand:  # a sure leak: show one pair of it
        r, c = min(cand)
        rows, cols = np.array([r]), np.array([c])
    else:
        check = np.flatnonzero(u.part_cols == u.part_rows)
        rows, cols = u.part_rows[check], u.part_cols[check]
    for sl in _chunks(len(rows), g):
        m = union_masks(grps, rows[sl], cols[sl])  # [P, BM, BN]
        q = torch.from_numpy(g.q_lo(rows[sl]))[:, None, None] + torch.arange(g.block_m)[None, :, None]
        k = torch.from_numpy(g.k_lo(cols[sl]))[:, None, None] + torch.arange(g.block_n)[None, None, :]
        hit = m & (k > q)
        if hit.any():
            b, i, j = (int(x) for x in torch.nonzero(hit)[0])
            return int(k[b, 0, j]), int(q[b, i, 0])
    return None


@register_graph_builder("mask")
def mask_graph(pattern: Pattern, seq_len: int, *, level: str = "token", block: int = 64,
               heads: int | None = None) -> AttentionGraph:
    """The attention graph of a mask pattern at ``seq_len``.

    Args:
        pattern: a mask pattern (per-head patterns give the union of their heads).
        seq_len: L.
        level: ``"token"`` (one node per token) or ``"block"`` (block quotient).
        block: block size of the layout used to build either graph.
        heads: number of heads, needed only for opaque per-head mask_mods.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise LayoutError(f"seq_len={seq_len!r} must be a positive integer")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
        raise LayoutError(f"block={block!r} must be a positive integer")
    L, block = int(seq_len), int(block)
    causal = causal_leak(pattern, L, block=block, heads=heads) is None
    notes = []
    if pattern.batch_dependent:
        notes.append("the mask depends on the batch entry: batch entry 0 is analyzed")
    if len(head_patterns(pattern, heads)) > 1:
        notes.append("per-head pattern: the layer graph is the union of its heads")
    if level == "token":
        adj = token_adjacency(pattern, L, block=block, heads=heads)
        kinds = sp.csr_matrix((np.full(adj.nnz, ATTEND, np.int8), adj.indices, adj.indptr), shape=adj.shape)
        return AttentionGraph(pattern, L, np.full(L, TOKEN, np.int8), adj, kinds, causal, 1, tuple(notes), L)
    if level == "block":
        adj, all_full, sym_diag = block_adjacency(pattern, L, block, heads=heads)
        notes.append("block quotient: every non-empty block is full, so token-level results are exact"
                     if all_full else
                     "block quotient with partial blocks: hops are lower bounds and reach fractions upper "
                     "bounds on token level; the spectrum is an estimate")
        kinds = sp.csr_matrix((np.full(adj.nnz, ATTEND, np.int8), adj.indices, adj.indptr), shape=adj.shape)
        return AttentionGraph(pattern, adj.shape[0], np.full(adj.shape[0], TOKEN, np.int8), adj, kinds,
                              causal, block, tuple(notes), L, exact=all_full, intra_pairs=sym_diag)
    raise UnsupportedError(f"level={level!r} must be 'token' or 'block'")
