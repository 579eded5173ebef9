"""The attention graph: a pattern instantiated at a sequence length, as a directed graph.

Nodes are the L tokens (ids ``0 .. L-1``) followed by auxiliary nodes that structural
families add (Combiner span summaries, ABC memory slots, ...). An edge ``src -> dst`` means
information flows from ``src`` to ``dst`` in one layer: for a mask pattern, key ``k`` ->
query ``q`` whenever ``q`` may attend to ``k``. The adjacency is stored transposed, as a
scipy CSR matrix ``adj[dst, src]`` (row = receiving node), with an edge weight and an edge
kind per stored entry.

Families register builders with :func:`register_graph_builder`; :func:`attention_graph`
dispatches on ``pattern.family``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp

from ..errors import UnsupportedError
from ..pattern import Pattern

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
        num_tokens: L; token ``i`` is node ``i``.
        node_kind: ``[N]`` int8 array of node kinds (TOKEN first, then auxiliary nodes).
        adj: ``[N, N]`` CSR, ``adj[dst, src]`` = edge weight (allowed pairs for block graphs).
        edge_kind: CSR with the same sparsity as ``adj`` holding each edge's kind.
        causal: whether queries may only receive from earlier-or-equal tokens.
        block: tokens per node for block-level quotient graphs (1 = token level).
    """

    pattern: Pattern
    num_tokens: int
    node_kind: np.ndarray
    adj: sp.csr_matrix
    edge_kind: sp.csr_matrix | None = None
    causal: bool = False
    block: int = 1
    notes: tuple[str, ...] = field(default=())

    @property
    def num_nodes(self) -> int:
        return int(self.adj.shape[0])

    @property
    def num_aux(self) -> int:
        return self.num_nodes - self.num_tokens

    @property
    def num_edges(self) -> int:
        return int(self.adj.nnz)


_BUILDERS: dict[str, Callable[..., AttentionGraph]] = {}


def register_graph_builder(family: str):
    """Register ``fn(pattern, seq_len, **options) -> AttentionGraph`` for a pattern family."""

    def deco(fn):
        _BUILDERS[family] = fn
        return fn

    return deco


def attention_graph(pattern: Pattern, seq_len: int, **options) -> AttentionGraph:
    """Instantiate ``pattern`` at ``seq_len`` as an :class:`AttentionGraph`."""
    fn = _BUILDERS.get(pattern.family)
    if fn is None:
        raise UnsupportedError(f"no attention-graph builder for {pattern.family} patterns ({pattern!r})")
    return fn(pattern, seq_len, **options)
