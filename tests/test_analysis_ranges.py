"""The analysis' block graph works from the layouts' ranges (issue 22): weights, the union of
heads, the causality witness and the token graph against dense evaluation, and the work done
(partial blocks evaluated) bounded by the pattern's structure, not by the number of blocks."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

import attncompiler as ac
import attncompiler.analysis.mask_graph as mg
from attncompiler.analysis.mask_graph import block_adjacency, causal_leak, head_patterns, token_adjacency
from attncompiler.layout.shift import depends_on_difference, shift_period

from strategies import bool_exprs, cases, expressions


def _dense_union(p: ac.Pattern, L: int) -> np.ndarray:
    d = np.zeros((L, L), dtype=bool)
    for h in head_patterns(p):
        d |= h.to_dense(L).numpy()
    return d


def _check(p: ac.Pattern, L: int, blk: int) -> None:
    block_adjacency.cache_clear()
    d = _dense_union(p, L)
    nb = -(-L // blk)
    dd = np.zeros((nb * blk, nb * blk), dtype=bool)
    dd[:L, :L] = d
    adj, all_full, sym_diag = block_adjacency(p, L, blk)
    w = dd.reshape(nb, blk, nb, blk).sum(axis=(1, 3))
    assert np.array_equal(adj.toarray(), w), (p, L, blk)
    sym = dd | dd.T
    want = [int(sym[i * blk:(i + 1) * blk, i * blk:(i + 1) * blk].sum())
            - int(np.trace(sym[i * blk:(i + 1) * blk, i * blk:(i + 1) * blk])) for i in range(nb)]
    assert sym_diag.tolist() == want
    leak = causal_leak(p, L, block=blk)
    if leak is None:
        assert not np.triu(d, 1).any()
    else:
        key, query = leak
        assert key > query and d[query, key]


@settings(max_examples=60, deadline=None)
@given(case=cases(max_len=200, same_len=True), blk=st.sampled_from([1, 3, 8, 16, 32]))
def test_block_graph_from_ranges_matches_dense(case, blk):
    _check(case.pattern, case.q_len, blk)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 150), data=st.data(), blk=st.sampled_from([3, 8, 16]))
def test_union_of_heads_matches_dense(L, data, blk):
    a, b = data.draw(expressions(L, max_leaves=3)), data.draw(expressions(L, max_leaves=3))
    _check(ac.per_head([a, b, a & ~b]), L, blk)


def test_large_magnitude_block_weights_and_token_graph(monkeypatch):
    """Odd lengths, shift-invariant and other patterns; the token graph past the dense limit."""
    monkeypatch.setattr(mg, "_DENSE_LIMIT", 0)
    for p in (ac.block_local(64) | ac.strided(64), ac.strided(7) & ac.causal(),
              ac.per_head([ac.sliding_window(9) & ac.causal(), ac.strided(5) & ac.causal()]),
              ~ac.block_local(24) & ac.sliding_window(40), ac.dilated_window(20, 3) | ac.global_tokens([3, 50]),
              ac.block_window(1, block=16) & ~ac.causal()):
        for L, blk in ((1000, 16), (777, 32)):
            _check(p, L, blk)
            assert np.array_equal(token_adjacency(p, L, block=blk).toarray(), _dense_union(p, L))


@settings(max_examples=200, deadline=None)
@given(e=bool_exprs(4), q=st.integers(0, 500), k=st.integers(0, 500), s=st.integers(-400, 400))
def test_difference_detection_is_sound(e, q, k, s):
    """A predicate reported as a function of ``q - k`` gives the same value after a common shift."""
    if not depends_on_difference(e) or min(q + s, k + s) < 0:
        return
    env = lambda a, c: {"b": torch.tensor(0), "h": torch.tensor(0), "q_idx": torch.tensor(a), "kv_idx": torch.tensor(c)}  # noqa: E731
    try:
        x, y = e.evaluate(env(q, k)), e.evaluate(env(q + s, k + s))
    except (ZeroDivisionError, RuntimeError):
        return
    assert bool(x) == bool(y)


def test_shift_period():
    assert shift_period(ac.strided(128) & ac.causal(), 100, 100) == 1
    assert shift_period(ac.block_local(64) | ac.strided(3), 100, 100) == 64
    assert shift_period(ac.block_local(6) & ~ac.block_window(1, block=4), 100, 100) == 12
    assert shift_period(ac.sliding_window(5) | ac.global_tokens([0]), 100, 100) is None
    assert shift_period(ac.mask(lambda b, h, q, k: (q - k) % 3 == 0), 100, 100) == 1
    assert shift_period(ac.mask(lambda b, h, q, k: ((q - k) % 3 == 0) & (q < 10)), 100, 100) is None


def test_block_graph_work_is_bounded(monkeypatch):
    """Strided at L=16384 (the analysis' default length for the 5 s target): the lower triangle
    is 32,896 partial blocks, but one block per diagonal offset is evaluated."""
    evaluated = []
    real = mg._eval_blocks

    def counting(grp, rows, cols, dtype):
        evaluated.append(len(rows))
        return real(grp, rows, cols, dtype)

    monkeypatch.setattr(mg, "_eval_blocks", counting)
    block_adjacency.cache_clear()
    mg.partial_weights.cache_clear()
    p = ac.strided(64) & ac.causal()
    adj, _, _ = block_adjacency(p, 16384, 64)
    assert adj.nnz == 256 * 257 // 2 and adj.sum() == sum(q // 64 + 1 for q in range(16384))
    assert sum(evaluated) <= 2 * 256 + 256  # offsets of whole blocks, plus the diagonal's union masks


def test_combiner_block_graph_is_the_token_graph_aggregated():
    """The Combiner block graph (direct part from the block quotient) counts exactly the token
    graph's edges per (block, block) and (summary, block) pair, with the same kinds."""
    import scipy.sparse as sp

    from attncompiler import patterns
    from attncompiler.analysis.combiner import combiner_graph

    for name in ("combiner_mixture", "combiner_fixed", "combiner_logsparse", "combiner_axial"):
        p = patterns.CATALOGUE[name]()
        for L, unit in ((777, 32), (1000, 64)):
            tok = combiner_graph(p, L, level="token")
            blk = combiner_graph(p, L, level="block", block=unit)
            T = -(-L // unit)
            n = tok.adj.shape[0]
            node = np.concatenate([np.arange(L) // unit, T + np.arange(n - L)])
            agg = sp.csr_matrix((np.ones(n), (node, np.arange(n))), shape=(blk.adj.shape[0], n))
            want = (agg @ tok.adj @ agg.T).toarray()
            assert np.array_equal(blk.adj.toarray(), want), (name, L)
            kinds = (agg @ sp.csr_matrix((tok.edge_kind.data.astype(np.float64) + 1, tok.edge_kind.indices,
                                          tok.edge_kind.indptr), shape=tok.adj.shape) @ agg.T).toarray()
            got = blk.edge_kind.toarray() + (blk.adj.toarray() > 0)  # kind + 1 where an edge exists
            assert np.array_equal(got * (want > 0), np.where(want > 0, kinds / np.maximum(want, 1), 0)), (name, L)
