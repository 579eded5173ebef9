"""The attention graph: a pattern instantiated at a sequence length, as a directed graph.

Nodes are the token nodes (ids ``0 .. num_tokens-1``) followed by auxiliary nodes that
structural families add (Combiner span summaries, ABC memory slots, ...). An edge
``src -> dst`` means information flows from ``src`` to ``dst`` in one layer: for a mask
pattern, key ``k`` -> query ``q`` whenever ``q`` may attend to ``k``. The adjacency is stored
transposed, as a scipy CSR matrix ``adj[dst, src]`` (row = receiving node), with an edge
weight and an edge kind per stored entry.

Token-level graphs have one node per token (``block == 1``). Block-level quotient graphs
have one node per block of ``block`` consecutive tokens (the last block may be shorter) and
``adj[r, c]`` = the number of allowed (query, key) pairs in block pair ``(r, c)``.

What one *layer* is (the unit of every hop count in :mod:`attncompiler.analysis`):

* A layer moves information from token to token. A path ``token -> aux -> ... -> aux ->
  token`` whose inner nodes are all auxiliary counts as **one** layer: a Combiner summary or
  an ABC memory slot is computed and read inside the same layer. So is a direct
  ``token -> token`` edge.
* ``hops_per_layer = K`` (Diffuser) says one layer applies that token step up to K times
  (``Z_{k+1} = (1-a) P Z_k + a V`` keeps every shorter path), so a layer reaches what K
  token steps reach.
* The residual stream keeps each token's own information: a token always "reaches" itself,
  so after ``n`` layers a key reaches a query iff a path of at most ``n`` layer steps exists.

:func:`layer_operator` turns any graph into this token-to-token one-layer relation; family
engineers only add nodes and edges and let it define the hop count. Families register
builders with :func:`register_graph_builder`; :func:`attention_graph` dispatches on
``pattern.family``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp

from ..errors import UnsupportedError
from ..dsl.pattern import Pattern

# Node kinds.
TOKEN, SUMMARY, MEMORY = 0, 1, 2
NODE_KIND_NAMES = {TOKEN: "token", SUMMARY: "summary", MEMORY: "memory"}

# Edge kinds.
ATTEND, WRITE, READ, HOP = 0, 1, 2, 3
EDGE_KIND_NAMES = {ATTEND: "attend", WRITE: "write", READ: "read", HOP: "hop"}


@dataclass(frozen=True, eq=False)
class AttentionGraph:
    """One layer of a pattern as a directed graph over tokens and auxiliary nodes.

    Attributes:
        pattern: the pattern this graph instantiates.
        num_tokens: number of token nodes; token node ``i`` is node ``i`` (a token at block
            level 1, the block ``i`` of ``block`` tokens otherwise).
        node_kind: ``[N]`` int8 array of node kinds (TOKEN first, then auxiliary nodes).
        adj: ``[N, N]`` CSR, ``adj[dst, src]`` = edge weight (allowed pairs for block graphs).
        edge_kind: CSR with the same sparsity as ``adj`` holding each edge's kind.
        causal: whether queries may only receive from earlier-or-equal tokens.
        block: tokens per token node for block-level quotient graphs (1 = token level).
        notes: human-readable statements about what this graph preserves.
        seq_len: the sequence length L (``num_tokens`` for token-level graphs when None).
        hops_per_layer: token steps one layer performs (Diffuser's K; 1 otherwise).
        exact: for block graphs, whether the tokens of each block are twins (identical in- and
            out-neighbours, e.g. every non-empty block full), which makes token-level results
            computed from the quotient exact. Always True at token level.
        intra_pairs: for block graphs, ``[num_tokens]`` ordered pairs of distinct tokens inside
            each block connected in either direction (the symmetrized diagonal); None = derive
            from the diagonal weights.
    """

    pattern: Pattern
    num_tokens: int
    node_kind: np.ndarray
    adj: sp.csr_matrix
    edge_kind: sp.csr_matrix | None = None
    causal: bool = False
    block: int = 1
    notes: tuple[str, ...] = field(default=())
    seq_len: int | None = None
    hops_per_layer: int = 1
    exact: bool = True
    intra_pairs: np.ndarray | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.adj.shape[0])

    @property
    def num_aux(self) -> int:
        return self.num_nodes - self.num_tokens

    @property
    def num_edges(self) -> int:
        return int(self.adj.nnz)

    @property
    def length(self) -> int:
        """The sequence length L this graph was built for."""
        if self.seq_len is not None:
            return int(self.seq_len)
        return self.num_tokens * self.block

    def node_sizes(self) -> np.ndarray:
        """``[num_tokens]`` tokens per token node (all 1 at token level; last block may be short)."""
        sizes = np.full(self.num_tokens, self.block, dtype=np.int64)
        if self.num_tokens:
            sizes[-1] = self.length - self.block * (self.num_tokens - 1)
        return sizes


_BUILDERS: dict[str, Callable[..., AttentionGraph]] = {}


def register_graph_builder(family: str):
    """Register ``fn(pattern, seq_len, **options) -> AttentionGraph`` for a pattern family.

    Builders should accept ``level="token"|"block"`` and ``block=`` options when they can build
    a block-level quotient; :func:`attncompiler.analysis.analyze` passes them through.
    """

    def deco(fn):
        _BUILDERS[family] = fn
        return fn

    return deco


def attention_graph(pattern: Pattern, seq_len: int, **options) -> AttentionGraph:
    """Instantiate ``pattern`` at ``seq_len`` as an :class:`AttentionGraph`."""
    fn = _BUILDERS.get(pattern.family)
    if fn is None:
        raise UnsupportedError(f"no attention-graph builder for {pattern.family} patterns ({pattern!r}); "
                               "register one with attncompiler.analysis.register_graph_builder")
    return fn(pattern, seq_len, **options)


def _bool_csr(m: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(m, dtype=bool, copy=True)
    out.eliminate_zeros()
    out.sum_duplicates()
    out.sort_indices()
    return out


def layer_operator(graph: AttentionGraph) -> sp.csr_matrix:
    """The one-layer token-to-token relation ``M[dst, src]`` (bool CSR over token nodes).

    ``M[q, k]`` is True iff information from token node ``k`` reaches token node ``q`` in one
    layer: by a direct edge, or by a path through auxiliary nodes only (see the module
    docstring), repeated ``hops_per_layer`` times. The residual self-reach is *not* added:
    ``M[q, q]`` is True only if the graph itself connects ``q`` to ``q``.
    """
    n = graph.num_tokens
    a = _bool_csr(graph.adj)
    step = a[:n, :n]
    if graph.num_aux:
        a_tx = a[:n, n:]   # aux -> token reads        [T, X]
        a_xt = a[n:, :n]   # token -> aux writes       [X, T]
        a_xx = a[n:, n:]   # aux -> aux                [X, X]
        reach = a_xt.copy()  # which tokens reach each aux node through aux-only paths
        for _ in range(graph.num_aux):
            nxt = _bool_csr(reach + a_xx @ reach)
            if nxt.nnz == reach.nnz:
                break
            reach = nxt
        step = _bool_csr(step + a_tx @ reach)
    if graph.hops_per_layer > 1:  # K token steps; shorter paths are kept (Diffuser's a*V term)
        eye = sp.identity(n, dtype=bool, format="csr")
        total = step
        for _ in range(graph.hops_per_layer - 1):
            total = _bool_csr(step @ (total + eye) + total)
        step = total
    return step


def layer_path(graph: AttentionGraph, key: int, query: int) -> list[int] | None:
    """A shortest node path ``key -> ... -> query`` in the raw graph (aux nodes included).

    Used for witnesses: it shows through which summary/memory nodes a key reaches a query.
    """
    from scipy.sparse.csgraph import shortest_path

    g = _bool_csr(graph.adj).T.tocsr()  # [src, dst]: csgraph follows row -> column
    _, pred = shortest_path(g, directed=True, unweighted=True, indices=key, return_predecessors=True)
    if query != key and pred[query] < 0:
        return None
    path = [query]
    while path[-1] != key:
        path.append(int(pred[path[-1]]))
    return path[::-1]
