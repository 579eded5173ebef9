"""Combiner analysis: summary nodes in the attention graph, one-layer full reach, the
partition-plan checker (with witnesses for broken hand-written plans) and the symbolic cost."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

from attncompiler.families import combiner as C
from attncompiler.analysis import combiner as A
from attncompiler.analysis.graph import READ, SUMMARY, TOKEN, WRITE, attention_graph, layer_operator

SINGLE = [
    C.combiner_fixed(4), C.combiner_fixed(4, causal=True), C.combiner_logsparse(), C.combiner_logsparse(causal=True),
    C.combiner_axial(5), C.combiner_axial(5, causal=True), C.combiner_axial(5, variant="horizontal"),
    C.combiner_axial(5, variant="horizontal", causal=True), C.combiner_axial(5, variant="rowmajor"),
    C.combiner_axial(5, variant="rowmajor", causal=True),
]


def _legal(L, causal):
    return np.tril(np.ones((L, L), dtype=bool)) if causal else np.ones((L, L), dtype=bool)


@pytest.mark.parametrize("pattern", SINGLE, ids=repr)
@pytest.mark.parametrize("L", [1, 17, 32])
def test_partition_holds_and_one_hop(pattern, L):
    check = A.check_partition(A.plan_for(pattern, L))
    assert check.ok, check.witness
    assert A.hops_to_full(pattern, L).hops == 1


@pytest.mark.parametrize("pattern", SINGLE + [C.combiner_mixture(C.combiner_fixed(3), C.combiner_logsparse())], ids=repr)
def test_graph_layer_reaches_exactly_the_legal_keys(pattern):
    L = 21
    g = attention_graph(pattern, L)
    assert g.num_tokens == L and (g.node_kind[:L] == TOKEN).all() and (g.node_kind[L:] == SUMMARY).all()
    n_sum = sum(C.span_table(f, L).num_summaries for f in pattern.factorizations())
    assert g.num_aux == n_sum
    reach = layer_operator(g).toarray()
    causal = all(f.autoregressive for f in pattern.factorizations())
    assert (reach == _legal(L, causal)).all()
    assert g.edge_kind.nnz == g.adj.nnz and (g.edge_kind.indices == g.adj.indices).all()
    kinds = g.edge_kind.tocoo()
    src_is_tok = kinds.col < L
    dst_is_tok = kinds.row < L
    assert ((kinds.data == WRITE) == (src_is_tok & ~dst_is_tok)).all()  # token -> summary
    assert ((kinds.data == READ) == (~src_is_tok & dst_is_tok)).all()  # summary -> query


def test_block_graph_counts_edges():
    p = C.combiner_fixed(8, causal=True)
    tok, blk = attention_graph(p, 40), attention_graph(p, 40, level="block", block=8)
    assert blk.num_tokens == 5 and blk.block == 8 and not blk.exact
    assert blk.adj.sum() == tok.adj.sum()


def test_sparse_plan_fails_with_witness():
    # Sparse Transformer's "own block" head alone, written by hand: nothing outside the block.
    L = 8
    plan = A.PartitionPlan.from_lists(L, [[j for j in range(L) if j // 4 == i // 4] for i in range(L)], [],
                                      [[] for _ in range(L)])
    check = A.check_partition(plan)
    assert not check.ok and (check.query, check.key) == (0, 4)
    assert "never reaches key 4" in check.witness
    assert A.hops_to_full(plan).hops is None


def test_overlapping_and_leaking_plans_fail():
    L = 8
    overlap = A.PartitionPlan.from_lists(L, [[j for j in range(L) if abs(j - i) <= 1] for i in range(L)],
                                         [[0, 1, 2, 3]], [[0]] * L)
    c = A.check_partition(overlap)
    assert not c.ok and "twice" in c.witness and (c.query, c.key) == (0, 0)
    # A window of 1 plus residual connections reaches everything in 7 layers.
    window = A.PartitionPlan.from_lists(L, [[j for j in range(L) if abs(j - i) <= 1] for i in range(L)], [],
                                        [[] for _ in range(L)])
    assert A.hops_to_full(window).hops == 7
    leak = A.PartitionPlan.from_lists(3, [[0], [1], [2]], [[0, 1, 2]], [[], [0], []], causal=True)
    c = A.check_partition(leak)
    assert not c.ok and "future key 2" in c.witness and "span 0" in c.witness


def test_symbolic_cost():
    L = A.L_SYM
    for p in (C.combiner_fixed(64), C.combiner_axial(64), C.combiner_axial(64, variant="rowmajor", causal=True)):
        assert A.cost_order(p) == L ** sympy.Rational(3, 2)
    for p in (C.combiner_logsparse(), C.combiner_logsparse(causal=True)):
        assert A.cost_order(p) == L * sympy.log(L)
    # At a fixed span the summary term grows as L^2 / span.
    fixed = A.combiner_cost(C.combiner_fixed(64), balanced=False)
    assert sympy.limit(fixed / L ** 2, L, sympy.oo) == 2 * A.D_SYM / 64
