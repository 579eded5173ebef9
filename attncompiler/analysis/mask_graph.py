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

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import LayoutError, UnsupportedError
from ..layout.block_layout import Blocks2D, partial_masks
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


def union_blocks(grps: list[Blocks2D]):
    """Union of several layouts: sorted ``(rows, cols, full)`` where full = full in some head."""
    g = grps[0].geom
    keys = np.concatenate([grp.rows * g.nkb + grp.cols for grp in grps])
    full = np.concatenate([grp.full for grp in grps])
    order = np.lexsort((~full, keys))  # per key, a full entry first
    keys, full = keys[order], full[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    keys, full = keys[first], full[first]
    return keys // g.nkb, keys % g.nkb, full


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


def _block_masks(grp: Blocks2D, which: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """:func:`attncompiler.layout.block_layout.partial_masks` with a choice of index dtype."""
    if dtype == torch.int64:
        return partial_masks(grp, which)
    g = grp.geom
    rows, cols = grp.rows[which], grp.cols[which]
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
        have = grp.rows * g.nkb + grp.cols
        pos = np.searchsorted(have, want)
        pos_c = np.minimum(pos, max(len(have) - 1, 0))
        hit = (pos < len(have)) & (have[pos_c] == want) if len(have) else np.zeros(len(want), bool)
        if hit.all():
            out |= _block_masks(grp, pos_c, dtype)
        elif hit.any():
            out[torch.from_numpy(np.flatnonzero(hit))] |= _block_masks(grp, pos_c[hit], dtype)
    return out


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
    rows, cols, full = union_blocks(grps)
    qs, ks = [], []
    bi, bj = np.meshgrid(np.arange(g.block_m), np.arange(g.block_n), indexing="ij")
    bi, bj = bi.reshape(-1), bj.reshape(-1)
    fr, fc = rows[full], cols[full]
    for sl in _chunks(len(fr), g):  # full blocks: whole rectangles, clipped to L
        q = (fr[sl, None] * g.block_m + bi).reshape(-1)
        k = (fc[sl, None] * g.block_n + bj).reshape(-1)
        ok = (q < L) & (k < L)
        qs.append(q[ok]); ks.append(k[ok])
    pr, pc = rows[~full], cols[~full]
    dtype = index_dtype(pats, L)
    for sl in _chunks(len(pr), g):  # partial blocks: evaluate the union of the heads
        m = union_masks(grps, pr[sl], pc[sl], dtype).numpy()
        b, i, j = np.nonzero(m)
        qs.append(pr[sl][b] * g.block_m + i); ks.append(pc[sl][b] * g.block_n + j)
    q, k = np.concatenate(qs), np.concatenate(ks)
    adj = sp.csr_matrix((np.ones(len(q), dtype=bool), (q, k)), shape=(L, L))
    adj.sort_indices()
    return adj


def block_adjacency(pattern: Pattern, L: int, block: int, *, heads: int | None = None):
    """Block quotient of one layer: ``(weights CSR [nb, nb] int64, all_full, sym_diag [nb])``.

    ``weights[r, c]`` = allowed pairs in (query block r, key block c); ``sym_diag[r]`` = ordered
    pairs of distinct tokens of block r connected in either direction (for the spectrum).
    """
    pats = head_patterns(pattern, heads)
    grps = group_layouts(pats, L, block)
    g = grps[0].geom
    rows, cols, full = union_blocks(grps)
    rsize = g.q_hi(rows) - g.q_lo(rows) + 1
    csize = g.k_hi(cols) - g.k_lo(cols) + 1
    w = np.where(full, rsize * csize, 0).astype(np.int64)
    sizes = g.q_hi(np.arange(g.nqb)) - g.q_lo(np.arange(g.nqb)) + 1
    sym_diag = np.zeros(g.nqb, dtype=np.int64)
    diag_full = full & (rows == cols)
    sym_diag[rows[diag_full]] = sizes[rows[diag_full]] * (sizes[rows[diag_full]] - 1)
    part = np.flatnonzero(~full)
    dtype = index_dtype(pats, L)
    for sl in _chunks(len(part), g):
        sel = part[sl]
        m = union_masks(grps, rows[sel], cols[sel], dtype)  # [P, BM, BN]
        w[sel] = np.count_nonzero(m.numpy().reshape(len(sel), -1), axis=1)
        d = rows[sel] == cols[sel]
        if d.any():
            md = m[torch.from_numpy(np.flatnonzero(d))]
            sym = md | md.transpose(1, 2)
            sym_diag[rows[sel][d]] = (sym.sum(dim=(1, 2)) - torch.diagonal(sym, dim1=1, dim2=2).sum(dim=1)).numpy()
    keep = w > 0
    adj = sp.csr_matrix((w[keep], (rows[keep], cols[keep])), shape=(g.nqb, g.nkb))
    adj.sort_indices()
    return adj, bool(full[keep].all()), sym_diag


def causal_leak(pattern: Pattern, L: int, *, block: int = 64, heads: int | None = None) -> tuple[int, int] | None:
    """A pair ``(key, query)`` with ``key > query`` that the pattern allows, or None (exact)."""
    pats = head_patterns(pattern, heads)
    grps = group_layouts(pats, L, block)
    g = grps[0].geom
    rows, cols, full = union_blocks(grps)
    # A block right of the diagonal, or a full diagonal block, leaks for sure: show one pair.
    sure = np.flatnonzero((cols > rows) | ((cols == rows) & full & (g.block_m > 1)))
    check = sure[:1] if len(sure) else np.flatnonzero(cols == rows)
    for sl in _chunks(len(check), g):
        sel = check[sl]
        m = union_masks(grps, rows[sel], cols[sel])  # [P, BM, BN]
        q = torch.from_numpy(g.q_lo(rows[sel]))[:, None, None] + torch.arange(g.block_m)[None, :, None]
        k = torch.from_numpy(g.k_lo(cols[sel]))[:, None, None] + torch.arange(g.block_n)[None, None, :]
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
