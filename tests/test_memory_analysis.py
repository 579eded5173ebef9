"""ABC analysis: memory-slot graphs against brute force, claims, causality, symbolic cost."""

from __future__ import annotations

import numpy as np
import pytest
import sympy
import torch

import attncompiler as ac
from attncompiler.families import memory as M
from attncompiler.analysis import analyze, layer_operator, symbolic_cost
from attncompiler.analysis.graph import MEMORY, READ, TOKEN, WRITE
from attncompiler.analysis.memory import memory_claims, memory_flops, memory_graph


def brute_reach(pattern, L):
    """Which keys feed which queries, from the definition (not the graph)."""
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    if isinstance(pattern.control, M.WindowControl):
        return (j <= i) & (j >= i - pattern.slots + 1)
    return (j <= i) if pattern.is_causal else np.ones((L, L), bool)


@pytest.mark.parametrize("pattern", [M.memory(4), M.memory(4, causal=True), M.memory(3, M.ClusterControl()),
                                     M.memory(5, M.WindowControl(), causal=True),
                                     M.memory(2, M.LinformerControl(max_len=64), causal=True)])
@pytest.mark.parametrize("L", [1, 7, 16])
def test_graph_layer_matches_definition(pattern, L):
    g = memory_graph(pattern, L)
    assert (layer_operator(g).toarray() == brute_reach(pattern, L)).all()
    assert (g.node_kind[:L] == TOKEN).all() and (g.node_kind[L:] == MEMORY).all()
    kinds = g.edge_kind.toarray()
    assert set(np.unique(kinds[L:, :L][g.adj.toarray()[L:, :L] > 0])) <= {WRITE}
    assert set(np.unique(kinds[:L, L:][g.adj.toarray()[:L, L:] > 0])) <= {READ}
    if not pattern.is_causal:
        assert g.num_aux == pattern.slots  # token -> n slots -> query


@pytest.mark.parametrize("pattern", [M.memory(8, causal=True), M.memory(8, M.WindowControl(), causal=True)])
def test_block_graph_counts_token_edges(pattern):
    tok, blk = memory_graph(pattern, 20), memory_graph(pattern, 20, level="block", block=4)
    L = 20
    assert blk.num_tokens == 5
    writes_tok, writes_blk = tok.adj[L:, :L].sum(), blk.adj[5:, :5].sum()
    assert writes_blk == writes_tok  # block weights count the token-level edges they merge
    assert blk.adj[:5, 5:].sum() == L  # every query reads its memory node once


@pytest.mark.parametrize("n,L", [(4, 50), (8, 64), (2, 9)])
def test_window_hops_and_analysis_report(n, L):
    p = M.memory(n, M.WindowControl(), causal=True)
    rep = analyze(p, L)
    assert rep.hops_to_full == memory_claims(p, L).hops_to_full
    assert rep.causality_ok
    mlp = analyze(M.memory(n, causal=True), L)
    assert mlp.hops_to_full == 1 and mlp.causality_ok
    assert any("rank <=" in note for note in mlp.notes) and any("reach:" in note for note in mlp.notes)


def test_rank_bound_of_one_layer():
    """The L x L matrix of a bidirectional ABC layer has rank <= n (out = A v with v = I)."""
    L, n = 24, 3
    attn = ac.compile(M.memory(n), backend="torch")
    q, k = torch.randn(1, 1, L, 8, dtype=torch.float64), torch.randn(1, 1, L, 8, dtype=torch.float64)
    A = attn.reference(q, k, torch.eye(L, dtype=torch.float64)[None, None])[0, 0]  # [L, L]
    assert torch.linalg.matrix_rank(A) <= memory_claims(M.memory(n), L).rank_bound == n
    assert torch.allclose(A.sum(-1), torch.ones(L, dtype=torch.float64))  # rows are still averages


def test_symbolic_cost_is_linear():
    L, n, D, C = (sympy.Symbol(s, positive=True, integer=True) for s in ("L", "n", "D", "C"))
    c = symbolic_cost(M.memory(64, causal=True))
    assert c.name == "abc_mlp" and c.asymptotic == "O(L)"
    assert sympy.simplify(c.flops - 8 * L * n * D) == 0
    f = memory_flops(M.memory(64, causal=True))
    assert sympy.degree(sympy.expand(f), L) == 1  # O(L n D) for a fixed chunk C
    assert symbolic_cost(M.memory(16, M.WindowControl(), causal=True)).name == "abc_window"
    claims = memory_claims(M.memory(64, causal=True), 4096, head_dim=64)
    assert claims.state_numbers < claims.kv_cache_numbers / 30
