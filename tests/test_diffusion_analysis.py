"""Diffusion analysis claims checked by brute force on small graphs."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

import attncompiler as ac
from attncompiler.analysis import attention_graph, layer_operator
from attncompiler.analysis import diffusion as AD
from attncompiler.families.diffusion.pattern import diffuse
from attncompiler.patterns.diffuser import diffuser_graph

BASES = [
    ac.sliding_window(1),
    ac.sliding_window(2) | ac.global_tokens([5]),
    ac.causal(),
    ac.block_local(4),  # disconnected: no K connects every pair
    diffuser_graph(window=4, random_blocks=1, num_global=1, seed=2),
]
L = 14


def _random_positive_P(mask: np.ndarray, rng) -> np.ndarray:
    """A row-stochastic matrix with strictly positive entries exactly on the mask."""
    P = np.where(mask, rng.uniform(0.1, 1.0, mask.shape), 0.0)
    den = P.sum(axis=1, keepdims=True)
    return P / np.where(den == 0, 1, den)


def _dense_support(p, P: np.ndarray) -> np.ndarray:
    T = sum(c * np.linalg.matrix_power(P, k) for k, c in enumerate(p.weights()))
    return T > 1e-300


@pytest.mark.parametrize("base", BASES, ids=repr)
@pytest.mark.parametrize("params", [dict(alpha=0.1), dict(alpha=0.0), dict(alpha=1.0), dict(kernel="heat", t=2.0)],
                         ids=str)
def test_one_layer_support_matches_dense_matrix_powers(base, params):
    rng = np.random.default_rng(0)
    mask = base.to_dense(L).numpy()
    for K in (0, 1, 3):
        p = diffuse(base, hops=K, **params)
        want = _dense_support(p, _random_positive_P(mask, rng))
        assert np.array_equal(AD.one_layer_support(p, L).toarray(), want)


def _bfs_diameter(mask: np.ndarray) -> int | None:
    reach = np.eye(len(mask), dtype=bool)
    for k in range(len(mask) + 1):
        if reach.all():
            return k
        reach = reach | ((mask.astype(int) @ reach.astype(int)) > 0)
    return None


@pytest.mark.parametrize("base", BASES, ids=repr)
def test_every_pair_interacts_iff_hops_reach_the_diameter(base):
    mask = base.to_dense(L).numpy()
    diam = AD.base_diameter(diffuse(base), L)
    assert diam == _bfs_diameter(mask)
    rng = np.random.default_rng(1)
    for K in range(0, 9):
        p = diffuse(base, hops=K, alpha=0.2)
        brute = bool(_dense_support(p, _random_positive_P(mask, rng)).all())
        assert AD.every_pair_interacts(p, L) == brute
        assert brute == (diam is not None and K >= diam)


@pytest.mark.parametrize("base", BASES[:3], ids=repr)
def test_generic_layer_operator_agrees_with_exact_support(base):
    p = diffuse(base, hops=3, alpha=0.3)
    g = attention_graph(p, L)
    assert g.hops_per_layer == 3 and g.pattern == p
    assert np.array_equal(layer_operator(g).toarray(), AD.one_layer_support(p, L).toarray())
    g0 = attention_graph(diffuse(base, hops=0), L)
    assert layer_operator(g0).nnz == 0


def test_receptive_field_across_layers_matches_boolean_powers():
    p = diffuse(ac.sliding_window(1), hops=2, alpha=0.5)
    M = AD.one_layer_support(p, L).toarray()
    step = M | np.eye(L, dtype=bool)
    R = M | np.eye(L, dtype=bool)
    for layers in (1, 2, 3):
        rf = AD.receptive_field(p, L, layers=layers)
        want = M if layers == 1 else R
        assert np.array_equal(rf.reach, want.sum(axis=1))
        R = (step.astype(int) @ R.astype(int)) > 0
    diam = AD.base_diameter(p, L)  # 13 on a path of 14 tokens
    for layers in range(5, 9):  # n layers of K hops reach everything iff n * K >= diameter
        assert AD.receptive_field(p, L, layers=layers).all_pairs == (layers * 2 >= diam)


@pytest.mark.parametrize("params", [dict(alpha=0.15), dict(kernel="heat", t=1.5)], ids=str)
def test_spectral_map_matches_eigenvalues_of_the_diffused_operator(params):
    p = diffuse(ac.sliding_window(2) | ac.global_tokens([0]), hops=4, **params)
    P = AD.uniform_walk(p, L)
    T = sum(c * np.linalg.matrix_power(P, k) for k, c in enumerate(p.weights()))
    got = np.sort_complex(AD.spectral_map(p, np.linalg.eigvals(P)))
    want = np.sort_complex(np.linalg.eigvals(T))
    np.testing.assert_allclose(got, want, atol=1e-8)
    spec = AD.diffused_spectrum(p, L)
    assert spec.gap_after > spec.gap_before > 0


def test_ppr_limit_map_is_the_resolvent():
    p = diffuse(ac.sliding_window(1), hops=5, alpha=0.2)
    P = AD.uniform_walk(p, L)
    T = 0.2 * np.linalg.inv(np.eye(L) - 0.8 * P)
    got = np.sort_complex(AD.spectral_map(p, np.linalg.eigvals(P), limit=True))
    np.testing.assert_allclose(got, np.sort_complex(np.linalg.eigvals(T)), atol=1e-8)


def test_hops_table_gap_and_reach_grow_with_k():
    p = diffuse(ac.sliding_window(1), hops=6, alpha=0.1)
    rows = AD.hops_table(p, L)
    assert [r[0] for r in rows] == list(range(7))
    gaps, fracs = [r[1] for r in rows], [r[2] for r in rows]
    assert all(b >= a for a, b in zip(gaps, gaps[1:])) and all(b >= a for a, b in zip(fracs, fracs[1:]))
    assert fracs[0] == pytest.approx(1 / L)  # K = 0: each token only sees itself (through alpha V)


def test_symbolic_cost_is_linear_in_hops_edges_and_dim():
    p = diffuse(ac.sliding_window(2), hops=5)
    c = AD.diffusion_cost(p, seq_len=L, head_dim=8)
    E = int(p.base.to_dense(L).sum())
    flops, mem = c.at()
    assert flops == 2 * E * 8 * 6 + 4 * E + 5 * 3 * L * 8
    assert mem == E + 5 * L * 8
    lead = sympy.expand(c.flops - 2 * (AD.K_ + 1) * AD.E_ * AD.D_)
    assert lead == 4 * AD.E_ + 3 * AD.K_ * AD.L_ * AD.D_


def test_registered_closed_form_scales_the_base_pairs_by_hops():
    from attncompiler.analysis import symbolic_cost
    from attncompiler.analysis.symbols import L as Ls
    from attncompiler.patterns import sliding_window

    base = sliding_window(8)
    p = diffuse(base, hops=4)
    c, b = symbolic_cost(p), symbolic_cost(base)
    assert c is not None and c.pairs == b.pairs and c.asymptotic == "O(L)"
    vals = {**dict(b.values), Ls: 100, AD.D_: 16}
    pairs = int(b.pairs.subs(vals))
    assert pairs == int(base.to_dense(100).sum())
    D = sympy.Symbol("D", positive=True, integer=True)
    assert int(c.flops.subs({**vals, D: 16})) == 2 * 5 * pairs * 16 + 4 * pairs + 3 * 4 * 100 * 16
    assert symbolic_cost(diffuse(diffuser_graph())) is None  # base not a catalogue mask entry
