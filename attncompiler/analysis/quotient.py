"""Weighted quotient graphs: the common ground on which reach and expansion are computed.

A :class:`Quotient` groups the tokens of a layer into nodes (single tokens, twin classes or
blocks). Two tokens are *twins* when they have the same in- and out-neighbours; then every
pair of nodes is connected all-or-nothing, and distances and spectra of the token graph follow
exactly from the (much smaller) quotient. Block quotients are exact in that sense when every
non-empty block is full (``exact=True``); otherwise they over-approximate connectivity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .graph import AttentionGraph, layer_operator


@dataclass(frozen=True, eq=False)
class Quotient:
    """Tokens grouped into nodes.

    Attributes:
        length: L, the number of tokens.
        sizes: ``[n]`` tokens per node.
        adj: ``[n, n]`` bool CSR, ``adj[dst, src]``: src's tokens reach dst's in one layer
            (off-diagonal entries only).
        intra: ``[n]`` bool: distinct tokens of a node reach each other in one layer.
        sym: ``[n, n]`` float CSR, symmetric: ordered token pairs connected in either direction
            (diagonal: pairs of distinct tokens inside the node; self-loops never count).
        contiguous: nodes are consecutive token ranges in token order (``starts``).
        starts: ``[n]`` first token of each node (contiguous) or its smallest member.
        second: ``[n]`` another token of the node, -1 for single-token nodes.
        exact: token-level results computed on this quotient are exact.
        label: how the nodes were formed, for reports.
    """

    length: int
    sizes: np.ndarray
    adj: sp.csr_matrix
    intra: np.ndarray
    sym: sp.csr_matrix
    contiguous: bool
    starts: np.ndarray
    second: np.ndarray
    exact: bool
    label: str

    @property
    def n(self) -> int:
        return len(self.sizes)


def _csr_bool(m) -> sp.csr_matrix:
    out = sp.csr_matrix(m, dtype=bool)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def offdiag(m: sp.spmatrix) -> sp.csr_matrix:
    """``m`` without its diagonal, as bool CSR."""
    coo = sp.coo_matrix(m)
    keep = (coo.row != coo.col) & (coo.data != 0)
    return _csr_bool(sp.csr_matrix((np.ones(int(keep.sum()), bool), (coo.row[keep], coo.col[keep])), shape=m.shape))


def twin_classes(m: sp.csr_matrix) -> np.ndarray:
    """``[L]`` class id per token: tokens with identical rows and columns of ``m`` share one.

    Rows and columns are hashed with random projections and every class is then verified
    exactly against its first member, so the result never merges non-twins.
    """
    L = m.shape[0]
    mf = m.astype(np.float64)
    r = np.random.default_rng(0x5EED).random((L, 2))
    sig = np.hstack([mf @ r, mf.T @ r])  # [L, 4]
    _, first_idx, inv = np.unique(sig, axis=0, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    # Relabel classes by their first token so that node order follows token order.
    order = np.argsort(first_idx, kind="stable")
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    cls = relabel[inv]
    rep = np.sort(first_idx)[cls]
    for mat in (m, m.T.tocsr()):
        mat = _csr_bool(mat)
        ptr, idx = mat.indptr, mat.indices
        lens = np.diff(ptr)
        if not np.array_equal(lens, lens[rep]):
            return np.arange(L)
        row = np.repeat(np.arange(L), lens)
        pos = np.arange(len(idx)) - ptr[row] + ptr[rep[row]]
        if not np.array_equal(idx, idx[pos]):
            return np.arange(L)
    return cls


def from_token_operator(m: sp.csr_matrix, *, compress: bool = True) -> Quotient:
    """The quotient of a token-level one-layer operator ``m[q, k]`` (bool CSR ``[L, L]``)."""
    L = m.shape[0]
    m = _csr_bool(m)
    cls = twin_classes(m) if compress else np.arange(L)
    n = int(cls.max()) + 1 if L else 0
    sizes = np.bincount(cls, minlength=n).astype(np.int64)
    coo = m.tocoo()
    qa = sp.csr_matrix((np.ones(coo.nnz, bool), (cls[coo.row], cls[coo.col])), shape=(n, n))
    qa = _csr_bool(qa)
    intra = qa.diagonal().astype(bool)
    off = offdiag(qa)
    # Twins: a node pair is connected all-or-nothing, so token-pair counts are size products.
    either = _csr_bool(off + off.T).tocoo()
    sym = sp.csr_matrix((sizes[either.row] * sizes[either.col] * 1.0, (either.row, either.col)), shape=(n, n))
    diag = np.where(intra, sizes * (sizes - 1), 0).astype(np.float64)
    sym = (sym + sp.diags(diag)).tocsr()
    order = np.argsort(cls, kind="stable")
    starts = np.full(n, -1, np.int64)
    second = np.full(n, -1, np.int64)
    first_pos = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    starts[:] = order[first_pos]
    has2 = sizes > 1
    second[has2] = order[first_pos[has2] + 1]
    contiguous = bool(np.array_equal(order, np.arange(L)) and np.all(np.diff(starts) > 0))
    label = (f"twin quotient: {L} tokens -> {n} classes" if n < L else f"token graph ({L} tokens)")
    return Quotient(L, sizes, off, intra, sym, contiguous, starts, second, True, label)


def from_graph(graph: AttentionGraph, *, compress: bool = True) -> Quotient:
    """The quotient analysis runs on, for any :class:`AttentionGraph`.

    Token-level graphs are reduced to their one-layer operator (auxiliary nodes collapsed, see
    :func:`layer_operator`) and twin-compressed (``compress``). Block graphs become a block
    quotient directly; their weights give the symmetrized pair counts.
    """
    if graph.block == 1:
        return from_token_operator(layer_operator(graph), compress=compress)
    n, L = graph.num_tokens, graph.length
    sizes = graph.node_sizes()
    if graph.num_aux or graph.hops_per_layer > 1:
        w = layer_operator(graph).astype(np.float64)
        w = sp.csr_matrix(w.multiply(sizes[:, None]).multiply(sizes[None, :]))
    else:
        w = sp.csr_matrix(graph.adj, dtype=np.float64)
    diag = w.diagonal()
    off = sp.csr_matrix(w - sp.diags(diag))
    off.eliminate_zeros()
    adj = _csr_bool(off)
    intra = diag > 0
    sym_off = off.maximum(off.T).tocsr()
    if graph.intra_pairs is not None and not (graph.num_aux or graph.hops_per_layer > 1):
        sym_diag = np.asarray(graph.intra_pairs, dtype=np.float64)
    else:  # a diagonal block with w allowed pairs: assume the token diagonal is among them
        sym_diag = np.minimum(sizes * (sizes - 1.0), 2.0 * np.maximum(diag - sizes, 0.0))
        sym_diag = np.where(diag >= sizes * sizes, sizes * (sizes - 1.0), sym_diag)
    sym = (sym_off + sp.diags(sym_diag)).tocsr()
    starts = np.arange(n, dtype=np.int64) * graph.block
    second = np.where(sizes > 1, starts + 1, -1)
    return Quotient(L, sizes, adj, intra, sym, True, starts, second, bool(graph.exact),
                    f"block quotient: {L} tokens in {n} blocks of {graph.block}")
