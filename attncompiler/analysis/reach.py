"""Reachability across stacked layers: receptive fields, hops to full reach, diameter, causality.

Hop counts follow the layer definition of :mod:`attncompiler.analysis.graph`: one layer is a
token-to-token step (through auxiliary nodes if any) and the residual stream keeps what a
token already had, so after ``n`` layers key ``k`` reaches query ``q`` iff a path of at most
``n`` steps exists, and every token reaches itself after 0 layers.

*Legal* pairs are those a query could see at all: every (key, query) pair for bidirectional
patterns, ``key <= query`` for causal ones. ``hops_to_full`` is the fewest layers after which
every legal pair is reached (None: never, with a witness pair). ``diameter`` is the diameter
of the symmetrized token graph (directions ignored; None when it is disconnected).

Algorithms (all exact on an exact quotient): per-layer reach is propagated as bitsets over
quotient nodes (a layer costs one OR per edge and word); when the profile ends before full
reach, the maximum distance comes from the bounding-eccentricities method (a few BFS runs
for bidirectional graphs) or from a BFS per node (causal graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, shortest_path

from .graph import AttentionGraph, layer_operator
from .progress import Progress
from .quotient import Quotient

# Word operations one profiled layer may cost before the profile is cut short.
_LAYER_BUDGET = 3e9
_DEFAULT_PROFILE = 8
# A large-diameter graph still tries this many bitset layers first when they cost at most
# _CHEAP_BUDGET word operations in all (bounding eccentricities can need thousands of BFS runs).
_CHEAP_LAYERS = 64
_CHEAP_BUDGET = 5e8


@dataclass(frozen=True)
class ReachResult:
    """Reachability of one layer graph stacked ``n`` times.

    Attributes:
        hops_to_full: fewest layers reaching every legal pair; None if never.
        never_witness: ``(key, query)`` token pair that is never reached (when None above).
        reach_fraction: fraction of legal pairs reached after 1, 2, ... layers.
        diameter: diameter of the symmetrized token graph; None when disconnected.
        legal_pairs: number of legal (key, query) pairs.
        exact: whether these are token-level exact values (False: block-level bounds).
    """

    hops_to_full: int | None
    never_witness: tuple[int, int] | None
    reach_fraction: tuple[float, ...]
    diameter: int | None
    legal_pairs: int
    exact: bool


def legal_pairs(L: int, causal: bool) -> int:
    """Number of (key, query) pairs a query may legally see: ``L^2`` or ``L(L+1)/2``."""
    return L * (L + 1) // 2 if causal else L * L


# ---------------------------------------------------------------------------------------------
# Bitset propagation
# ---------------------------------------------------------------------------------------------

def _self_bits(n: int) -> np.ndarray:
    words = (n + 63) // 64
    bits = np.zeros((n, words), dtype=np.uint64)
    i = np.arange(n)
    bits[i, i >> 6] = np.left_shift(np.uint64(1), (i & 63).astype(np.uint64))
    return bits


def _propagate(in_adj: sp.csr_matrix, t: np.ndarray) -> np.ndarray:
    """``out[q] = OR of t[p] over in-neighbours p of q``, chunked to bound the gather."""
    n, words = t.shape
    ptr, idx = in_adj.indptr, in_adj.indices
    out = np.zeros_like(t)
    per_chunk = max(1, (1 << 22) // max(words, 1))
    row = 0
    while row < n:
        end = int(np.searchsorted(ptr, ptr[row] + per_chunk, side="right")) - 1
        end = min(max(end, row + 1), n)
        a, b = ptr[row], ptr[end]
        if b > a:
            gathered = t[idx[a:b]]  # [E, W]
            starts = ptr[row:end] - a
            red = np.bitwise_or.reduceat(gathered, np.minimum(starts, b - a - 1), axis=0)
            red[ptr[row + 1:end + 1] == ptr[row:end]] = 0
            out[row:end] = red
        row = end
    return out


def _diag_bits(r: np.ndarray) -> np.ndarray:
    i = np.arange(r.shape[0])
    return ((r[i, i >> 6] >> (i & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)


def _weighted_rows(q: Quotient, r: np.ndarray, lower_only: bool) -> np.ndarray:
    """``S[Q] = sum of sizes of the nodes whose bit is set in row Q`` (strictly lower if asked)."""
    n = q.n
    vals = np.unique(q.sizes)
    if not lower_only and len(vals) <= 8:
        out = np.zeros(n, dtype=np.int64)
        for v in vals:
            idx = np.flatnonzero(q.sizes == v)
            mask = np.zeros(r.shape[1], dtype=np.uint64)
            np.bitwise_or.at(mask, idx >> 6, np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64)))
            out += int(v) * np.bitwise_count(r & mask).sum(axis=1, dtype=np.int64)
        return out
    out = np.zeros(n, dtype=np.int64)
    step = max(1, (1 << 24) // max(n, 1))
    for a in range(0, n, step):
        bits = np.unpackbits(r[a:a + step].view(np.uint8), axis=1, bitorder="little")[:, :n]
        if lower_only:
            bits = bits * (np.arange(n)[None, :] < np.arange(a, min(a + step, n))[:, None])
        out[a:a + step] = bits.astype(np.int64) @ q.sizes
    return out


def _reached(q: Quotient, r: np.ndarray, causal: bool, clean: bool) -> int:
    s = q.sizes
    d = _diag_bits(r)
    srow = _weighted_rows(q, r, lower_only=causal and not clean)
    if not (causal and not clean):
        srow = srow - np.where(d, s, 0)
    inner = s * (s - 1) // 2 if causal else s * (s - 1)
    return int((s * srow).sum() + np.where(d, inner, 0).sum() + q.length)


def _first_unreached(q: Quotient, r: np.ndarray, causal: bool) -> tuple[int, int] | None:
    n = q.n
    d = _diag_bits(r)
    step = max(1, (1 << 24) // max(n, 1))
    for a in range(0, n, step):
        bits = np.unpackbits(r[a:a + step].view(np.uint8), axis=1, bitorder="little")[:, :n].astype(bool)
        rows = np.arange(a, min(a + step, n))
        legal = np.ones_like(bits) if not causal else (np.arange(n)[None, :] < rows[:, None])
        legal[np.arange(len(rows)), rows] = False
        miss = legal & ~bits
        if miss.any():
            qi, p = np.argwhere(miss)[0]
            return int(q.starts[p]), int(q.starts[rows[qi]])
    for node in np.flatnonzero(~d & (q.sizes > 1)):
        return int(q.starts[node]), int(q.second[node])
    return None


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------

def _bfs(g: sp.csr_matrix, v) -> np.ndarray:
    return shortest_path(g, method="D", directed=True, unweighted=True, indices=v)


def max_distance(fwd: sp.csr_matrix, bwd: sp.csr_matrix, progress: Progress | None = None,
                 max_iter: int = 500) -> int:
    """Largest distance between two nodes of a strongly connected graph (bounding eccentricities).

    ``fwd`` has edges ``src -> dst`` as rows -> columns; ``bwd`` is its transpose. Each step
    runs a BFS each way from one node and tightens ``ecc(w) <= d(w, v) + ecc(v)`` and
    ``ecc(w) >= max(d(w, v), ecc(v) - d(v, w))`` until no node can exceed the best found
    (Takes and Kosters 2011, adapted to directed graphs); exact, usually a handful of BFS runs.
    """
    n = fwd.shape[0]
    if n <= 1:
        return 0
    lower = np.zeros(n)
    upper = np.full(n, np.inf)
    cand = np.ones(n, dtype=bool)
    deg = np.diff(fwd.indptr) + np.diff(bwd.indptr)
    best = 0.0
    pick_upper = True
    for it in range(max_iter):
        if not cand.any():
            return int(best)
        idx = np.flatnonzero(cand)
        if np.isinf(upper[idx]).all():
            v = idx[np.argmax(deg[idx])]
        elif pick_upper:
            v = idx[np.lexsort((-deg[idx], -upper[idx]))[0]]
        else:
            v = idx[np.lexsort((-deg[idx], lower[idx]))[0]]
        pick_upper = not pick_upper
        f = _bfs(fwd, v)
        b = f if bwd is fwd else _bfs(bwd, v)
        ecc = f.max()
        best = max(best, ecc, b.max())
        upper = np.minimum(upper, b + ecc)
        lower = np.maximum(lower, np.maximum(b, ecc - f))
        best = max(best, lower.max())
        cand[v] = False
        cand &= upper > best
        if progress:
            progress.update("diameter (BFS runs)", it + 1)
    # Did not converge: finish exactly with a BFS from every remaining candidate.
    for v in np.flatnonzero(cand):
        best = max(best, _bfs(fwd, v).max())
    return int(best)


def _intra_cycles(q: Quotient) -> tuple[int, tuple[int, int] | None]:
    """Max over multi-token nodes without intra edges of the shortest cycle through them."""
    nodes = np.flatnonzero(~q.intra & (q.sizes > 1))
    worst = 1 if (q.intra & (q.sizes > 1)).any() else 0
    if len(nodes) == 0:
        return worst, None
    out_adj = q.adj.tocsc()  # column p: the nodes p sends to
    for a in range(0, len(nodes), 64):
        chunk = nodes[a:a + 64]
        back = np.atleast_2d(_bfs(q.adj, chunk))  # back[i, w] = d(w, chunk[i])
        for i, p in enumerate(chunk):
            outs = out_adj.indices[out_adj.indptr[p]:out_adj.indptr[p + 1]]
            c = 1 + back[i, outs].min() if len(outs) else np.inf
            if not np.isfinite(c):
                return worst, (int(q.starts[p]), int(q.second[p]))
            worst = max(worst, int(c))
    return worst, None


def _directed_hops(q: Quotient, causal: bool, progress: Progress) -> tuple[int | None, tuple[int, int] | None]:
    fwd = q.adj.T.tocsr()
    if not causal:
        ncomp, labels = connected_components(q.adj, directed=True, connection="strong")
        if ncomp > 1:
            f = _bfs(fwd, 0)
            miss = np.flatnonzero(~np.isfinite(f))
            if len(miss):
                return None, (int(q.starts[0]), int(q.starts[miss[0]]))
            b = _bfs(q.adj, 0)
            miss = np.flatnonzero(~np.isfinite(b))
            return None, (int(q.starts[miss[0]]), int(q.starts[0]))
        hops = None
        if q.adj.nnz * ((q.n + 63) // 64) * _CHEAP_LAYERS <= _CHEAP_BUDGET:  # bitset layers: exact, fast
            hops = _closure_layers(q.adj, q.n, limit=_CHEAP_LAYERS)
        if hops is None:
            hops = max_distance(fwd, q.adj, progress)
    else:  # legal pairs are P < Q in token order: a BFS per node
        hops = 0
        n = q.n
        for a in range(0, n, 64):
            d = np.atleast_2d(_bfs(fwd, np.arange(a, min(a + 64, n))))
            legal = np.arange(n)[None, :] > np.arange(a, min(a + 64, n))[:, None]
            bad = legal & ~np.isfinite(d)
            if bad.any():
                i, w = np.argwhere(bad)[0]
                return None, (int(q.starts[a + i]), int(q.starts[w]))
            if legal.any():
                hops = max(hops, int(d[legal].max()))
            progress.update("hops (BFS per node)", min(a + 64, n), n)
    cyc, witness = _intra_cycles(q)
    if witness is not None:
        return None, witness
    return max(hops, cyc), None


def _closure_layers(adj: sp.csr_matrix, n: int, limit: int = _DEFAULT_PROFILE) -> int | None:
    """Layers until every node reaches every node (bitsets), or None if more than ``limit``."""
    in_adj = sp.csr_matrix(adj.astype(np.int8) + sp.identity(n, dtype=np.int8, format="csr"), dtype=bool)
    in_adj.sort_indices()
    t = _self_bits(n)
    words = t.shape[1]
    limit = int(max(1, min(limit, _LAYER_BUDGET // max(in_adj.nnz * words, 1))))
    if n == 1:
        return 0
    for layer in range(1, limit + 1):
        t = _propagate(in_adj, t)
        if int(np.bitwise_count(t).sum()) == n * n:
            return layer
    return None


def undirected_diameter(q: Quotient, progress: Progress | None = None, small: bool = True) -> int | None:
    """Diameter of the symmetrized token graph (None when disconnected).

    ``small`` says the diameter is probably small (few bitset layers find it); otherwise the
    bounding-eccentricities method goes first. Both are exact.
    """
    if q.length <= 1:
        return 0
    sym = sp.csr_matrix(q.sym - sp.diags(q.sym.diagonal()))
    sym.eliminate_zeros()
    sym = sp.csr_matrix(sym, dtype=bool)
    ncomp, _ = connected_components(sym, directed=False)
    lonely = (~q.intra) & (q.sizes > 1) & (np.diff(sym.indptr) == 0)
    if ncomp > 1 or lonely.any():
        return None
    words = (q.n + 63) // 64
    if small:
        d = _closure_layers(sym, q.n)
    elif sym.nnz * words * _CHEAP_LAYERS <= _CHEAP_BUDGET:  # bitset layers are cheap here: exact and fast
        d = _closure_layers(sym, q.n, limit=_CHEAP_LAYERS)
    else:
        d = None
    if d is None:  # large diameter: bounding eccentricities converge fast on such graphs
        d = max_distance(sym, sym, progress)
    if (q.intra & (q.sizes > 1)).any():
        d = max(d, 1)
    if ((~q.intra) & (q.sizes > 1)).any():
        d = max(d, 2)
    return d


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def reach(q: Quotient, *, causal: bool, clean: bool = True, layers: int | None = None,
          progress: Progress | None = None) -> ReachResult:
    """Reach profile, hops to full reach and diameter of a quotient graph.

    Args:
        q: the quotient (see :mod:`attncompiler.analysis.quotient`).
        causal: count only ``key <= query`` pairs as legal.
        clean: the graph has no ``key > query`` path (False only for leaking causal graphs).
        layers: profile exactly this many layers (default: until full reach, at most 8).
        progress: optional progress line.
    """
    progress = progress or Progress(False)
    L, n = q.length, q.n
    total = legal_pairs(L, causal)
    selfb = _self_bits(n)
    in_adj = sp.csr_matrix(q.adj.astype(np.int8) + sp.diags(q.intra.astype(np.int8), dtype=np.int8), dtype=bool)
    in_adj.sort_indices()
    words = selfb.shape[1]
    limit = layers if layers is not None else _DEFAULT_PROFILE
    if layers is None:
        limit = int(max(1, min(limit, _LAYER_BUDGET // max(in_adj.nnz * words, 1))))
    r = np.zeros_like(selfb)
    fractions: list[float] = []
    hops, witness, stable = (0 if total == L else None), None, False
    for layer in range(1, limit + 1):
        if hops is not None or stable:
            if layers is None:
                break
            fractions.append(fractions[-1] if fractions else 1.0)
            continue
        progress.update("reach layer", layer, limit)
        nxt = _propagate(in_adj, r | selfb)
        count = _reached(q, nxt, causal, clean)
        fractions.append(count / total)
        if count == total:
            hops = layer
        elif np.array_equal(nxt, r):
            stable = True
            witness = _first_unreached(q, nxt, causal)
        r = nxt
    if hops is None and witness is None:
        if stable:
            witness = _first_unreached(q, r, causal)
        else:
            hops, witness = _directed_hops(q, causal, progress)
    progress.update("diameter")
    # Symmetrizing only shortens paths: a short directed reach means a short diameter.
    small = hops is not None and hops <= _DEFAULT_PROFILE
    diameter = undirected_diameter(q, progress, small=small or witness is not None)
    return ReachResult(hops, witness, tuple(fractions), diameter, total, q.exact)


def receptive_field(graph: AttentionGraph, layers: int) -> np.ndarray:
    """Dense ``[L, L]`` bool: ``out[q, k]`` iff key ``k`` reaches query ``q`` within ``layers``.

    Token-level graphs only; meant for small L (brute force, plots).
    """
    m = layer_operator(graph).toarray().astype(np.int64)
    r = np.eye(m.shape[0], dtype=bool)
    for _ in range(layers):
        r = r | ((m @ r.astype(np.int64)) > 0)
    return r


def causality_witness(graph: AttentionGraph) -> tuple[int, int] | None:
    """A ``(key, query)`` token pair with ``key > query`` that one layer connects, or None.

    Checks the one-layer operator, so paths through summary or memory nodes count; stacking
    causal layers stays causal, so one layer decides. For mask block graphs the pattern is
    evaluated inside diagonal blocks (exact); other block graphs are checked between blocks.
    """
    if graph.block == 1:
        m = layer_operator(graph).tocoo()
        bad = np.flatnonzero(m.col > m.row)
        return (int(m.col[bad[0]]), int(m.row[bad[0]])) if len(bad) else None
    if graph.pattern.family == "mask":
        from .mask_graph import causal_leak

        return causal_leak(graph.pattern, graph.length, block=graph.block)
    m = layer_operator(graph).tocoo()
    bad = np.flatnonzero(m.col > m.row)
    if not len(bad):
        return None
    return int(m.col[bad[0]]) * graph.block, min((int(m.row[bad[0]]) + 1) * graph.block, graph.length) - 1
