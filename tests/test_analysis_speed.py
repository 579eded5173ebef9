"""The analysis' fast paths give the results of the slow ones.

- spectrum: the sparse eigen-solvers (Lanczos, shift-invert) and the single-BLAS-thread dense
  solve against a plain dense ``eigvalsh``, on every catalogue pattern's quotient at small L;
- Combiner tables: the directly built span-partition pairs against ``np.nonzero`` of the mask;
- Combiner block graph: pairs merged by ``bincount`` against the CSR constructor's merge.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.sparse as sp

import attncompiler as ac
from attncompiler.analysis.blas_threads import one_blas_thread, openblas_controls
from attncompiler.families.combiner.pattern import _span_partition_table
from attncompiler.families.combiner.tables import is_sorted_pairs
from attncompiler.patterns import CATALOGUE

ex = importlib.import_module("attncompiler.analysis.expansion")
cg = importlib.import_module("attncompiler.analysis.combiner")
rp = importlib.import_module("attncompiler.analysis.report")


def _normalized(name: str, L: int):
    """The catalogue pattern's normalized quotient adjacency (None when disconnected)."""
    p = CATALOGUE[name]()
    lvl = rp._auto_level(p, L, 64, None)
    _, q, _, _ = rp._graph_and_quotient(p, L, lvl, 64, None, None, rp.Progress(False))
    w = q.sym.tocsr()
    off = sp.csr_matrix(w - sp.diags(w.diagonal()))
    off.eliminate_zeros()
    wdeg = np.asarray(w.sum(axis=1)).reshape(-1)
    if ex._components(q, off) > 1:
        return q
    inv = 1.0 / np.sqrt(wdeg)
    c = sp.csr_matrix(sp.diags(inv) @ w @ sp.diags(inv))
    return c, np.sqrt(wdeg) / np.sqrt(wdeg.sum()), ex._bandwidth(off)


# At L=4096 these quotients have about 4096 nodes: the dense reference solve alone takes 30 s.
SLOW_AT_4096 = {"sliding_window", "longformer", "logsparse"}
CASES = [(n, 1024) for n in sorted(CATALOGUE)] + [(n, 4096) for n in sorted(CATALOGUE) if n not in SLOW_AT_4096]


@pytest.mark.parametrize("name, L", CASES)
def test_sparse_spectrum_matches_dense(name, L, monkeypatch):
    got = _normalized(name, L)
    if not isinstance(got, tuple):  # disconnected (or trivial): no eigen-solve, gap 0 by definition
        e = ex.expansion(got)
        assert (e.spectral_gap, e.slem, e.method) == (0.0, 1.0, "components")
        return
    c, v1, band = got
    ev = np.linalg.eigvalsh(c.toarray())  # plain dense solve (the reference)
    mu2, mumin, method = ex._spectrum(c, v1, band)
    if c.shape[0] < 3:  # a twin quotient of 1-2 classes: nothing for Lanczos to do
        assert method == "trivial" or (mu2, mumin) == pytest.approx((ev[-2], ev[0]), abs=1e-12)
        return
    assert method == "dense eigvalsh" or c.shape[0] > ex._DENSE_LIMIT
    np.testing.assert_allclose([mu2, mumin], [ev[-2], ev[0]], rtol=0, atol=1e-9)
    monkeypatch.setattr(ex, "_DENSE_LIMIT", 1)  # force the sparse solvers
    # small quotients: both sparse solvers (shift-invert, deflated Lanczos); large ones (already on
    # the sparse path above): the solver their bandwidth picks, to keep this test short
    bands = {band, ex._BAND_LIMIT, ex._BAND_LIMIT + 1} if c.shape[0] <= ex._DENSE_LIMIT else {band}
    for b in sorted(bands):
        mu2_s, mumin_s, method_s = ex._spectrum(c, v1, b)
        assert "eigsh" in method_s
        assert mu2_s == pytest.approx(ev[-2], abs=1e-7), method_s
        if "not converged" not in method_s:
            assert mumin_s == pytest.approx(ev[0], abs=1e-5), method_s
        else:  # documented approximation: only |mu_min| <= mu_2 is assumed
            assert abs(ev[0]) <= abs(ev[-2]) + 1e-9


def test_one_blas_thread_restores_counts_and_results():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 300))
    a = a + a.T
    before = [get() for get, _ in openblas_controls()]
    with one_blas_thread():
        inside = [get() for get, _ in openblas_controls()]
        ev1 = np.linalg.eigvalsh(a)
    assert [get() for get, _ in openblas_controls()] == before
    assert all(n == 1 for n in inside)
    np.testing.assert_allclose(ev1, np.linalg.eigvalsh(a), rtol=0, atol=1e-10)
    with pytest.raises(ValueError):  # restored on errors too
        with one_blas_thread():
            raise ValueError("inside")
    assert [get() for get, _ in openblas_controls()] == before


def _partition_pairs_by_mask(L, w, causal):
    n = -(-L // w)
    used = n - 1 if causal else n
    own = np.arange(L)[:, None] // w
    m = np.arange(used)[None, :]
    return np.nonzero((m < own) if causal else (m != own))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,w", [(1, 1), (2, 3), (63, 64), (64, 64), (65, 64), (1000, 7), (1025, 128), (97, 200)])
def test_span_partition_pairs_match_mask(L, w, causal):
    t = _span_partition_table(L, w, causal)
    q, s = _partition_pairs_by_mask(L, w, causal)
    assert t.pair_q.dtype == q.dtype and t.pair_s.dtype == s.dtype
    np.testing.assert_array_equal(t.pair_q, q)
    np.testing.assert_array_equal(t.pair_s, s)


def test_is_sorted_pairs():
    assert is_sorted_pairs(np.array([0, 0, 1, 1]), np.array([0, 3, 1, 1]))
    assert not is_sorted_pairs(np.array([0, 0, 1]), np.array([3, 0, 1]))
    assert not is_sorted_pairs(np.array([1, 0]), np.array([0, 1]))
    assert is_sorted_pairs(np.zeros(0, np.int64), np.zeros(0, np.int64))


def test_count_pairs_matches_csr_merge():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 7, 500), rng.integers(0, 11, 500)
    r, c, w = cg.count_pairs(a, b, 7, 11, 3, 20)
    want = sp.csr_matrix((np.ones(500), (a + 3, b + 20)), shape=(40, 40))
    got = sp.csr_matrix((w, (r, c)), shape=(40, 40))
    assert (got != want).nnz == 0 and len(r) == want.nnz
    r2, c2, w2 = cg.count_pairs(a, b, 7, 11, 3, 20, limit=10)  # too many cells: unmerged
    assert len(r2) == 500 and (w2 == 1).all()


@pytest.mark.parametrize("name", [n for n in sorted(CATALOGUE) if n.startswith("combiner")])
def test_combiner_block_graph_merge_is_exact(name, monkeypatch):
    p = CATALOGUE[name]()
    fast = cg.combiner_graph(p, 4096, level="block", block=64)
    monkeypatch.setattr(cg, "count_pairs", lambda a, b, na, nb, oa, ob: (oa + a, ob + b, np.ones(len(a))))
    slow = cg.combiner_graph(p, 4096, level="block", block=64)
    assert (fast.adj != slow.adj).nnz == 0
    np.testing.assert_array_equal(fast.adj.data, slow.adj.data)
    assert (fast.edge_kind != slow.edge_kind).nnz == 0


def test_combiner_mixture_analysis_at_16384_uses_the_block_level():
    """Issue 21: at L = 16384 the default analysis picks the block level (bounded work; the
    timings of every catalogue pattern are benchmark figures, not asserted here) and answers."""
    r = ac.analyze(CATALOGUE["combiner_mixture"](), seq_len=16384)
    assert r.level.startswith("block") and r.hops_to_full is not None
