"""Analysis: closed forms (spectra, window hops, global tokens) and brute force at small L."""

import dataclasses
import json
import math

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

import attncompiler as ac
from attncompiler import patterns
from attncompiler.analysis import (AttentionGraph, analyze, attention_graph, causality_witness, layer_operator,
                                   layer_path, receptive_field)
from attncompiler.analysis.graph import ATTEND, READ, SUMMARY, TOKEN, WRITE
from attncompiler.analysis.mask_graph import head_patterns
from attncompiler.errors import LayoutError, UnsupportedError


def _dense(p, L):
    m = np.zeros((L, L), dtype=bool)
    for h in head_patterns(p):
        m |= h.to_dense(L).numpy()
    return m


def _brute(p, L, causal):
    """Reach fractions, hops_to_full, undirected diameter and lambda_2 by brute force."""
    m = _dense(p, L)
    legal = np.tril(np.ones((L, L), bool)) if causal else np.ones((L, L), bool)
    r = np.eye(L, dtype=bool)
    fracs, hops = [], None
    for n in range(1, 3 * L):
        r = r | ((m.astype(int) @ r.astype(int)) > 0)
        fracs.append((r & legal).sum() / legal.sum())
        if (r | ~legal).all():
            hops = n
            break
    sym = (m | m.T) & ~np.eye(L, dtype=bool)
    g = nx.from_numpy_array(sym.astype(int))
    diam = nx.diameter(g) if nx.is_connected(g) else None
    deg = sym.sum(1)
    inv = 1 / np.sqrt(np.maximum(deg, 1))
    lam = np.sort(np.linalg.eigvalsh(np.eye(L) - inv[:, None] * sym * inv[None, :]))
    return fracs, hops, diam, lam[1]


# -- closed forms --------------------------------------------------------------------------

def test_path_and_cycle_spectra():
    L = 32
    path = analyze(ac.sliding_window(1), L)
    assert path.spectral_gap == pytest.approx(1 - math.cos(math.pi / (L - 1)), rel=1e-9)
    cyc = ac.mask(lambda b, h, q, k: ((q - k) % 24 == 1) | ((k - q) % 24 == 1))
    rep = analyze(cyc, 24)
    assert rep.spectral_gap == pytest.approx(1 - math.cos(2 * math.pi / 24), rel=1e-9)
    assert rep.slem == pytest.approx(1.0)  # even cycle: bipartite, eigenvalue -1


@pytest.mark.parametrize("L", [2, 7, 20])
def test_complete_graph_gap(L):
    for p in (ac.full(), ac.causal()):  # causal symmetrizes to the complete graph
        rep = analyze(p, L)
        assert rep.spectral_gap == pytest.approx(L / (L - 1), rel=1e-9)
        assert rep.hops_to_full == 1 and rep.components == 1


@pytest.mark.parametrize("w,L", [(1, 17), (3, 64), (5, 50), (8, 33)])
def test_sliding_window_hops(w, L):
    rep = analyze(ac.sliding_window(w), L)
    assert rep.hops_to_full == math.ceil((L - 1) / w) == rep.diameter
    assert analyze(ac.sliding_window(w).causal(), L).hops_to_full == math.ceil((L - 1) / w)
    few = analyze(ac.sliding_window(w), L, layers=2)  # profile cut short: hops still exact
    assert few.hops_to_full == rep.hops_to_full and len(few.reach_fraction) == 2


@pytest.mark.parametrize("base", [ac.sliding_window(1), ac.strided(7), ac.block_local(4), ac.dilated_window(1, 3)])
def test_global_token_reaches_everything_in_two_layers(base):
    for g in (0, 13, 40):
        rep = analyze(base | ac.global_tokens([g]), 41)
        assert rep.hops_to_full is not None and rep.hops_to_full <= 2


# -- brute force ---------------------------------------------------------------------------

BRUTE = [
    (patterns.bigbird(block=4, window_blocks=3, global_blocks=1, random_blocks=2), 48),
    (patterns.longformer(window=3, global_indices=(5,)), 40),
    (patterns.sparse_transformer_fixed(stride=8, summary=2), 64),
    (patterns.sparse_transformer_strided(stride=6), 60),
    (patterns.logsparse(), 50),
    (patterns.axial(cols=8), 64),
    (ac.dilated_window(2, 3), 37),
    (ac.prefix_lm(5), 30),
    (ac.sliding_window(2).causal() | ac.global_tokens([0]).causal(), 45),
]


@pytest.mark.parametrize("p,L", BRUTE)
def test_token_level_matches_brute_force(p, L):
    rep = analyze(p, L, layers=4)
    fracs, hops, diam, lam2 = _brute(p, L, rep.causal)
    assert rep.hops_to_full == hops and rep.diameter == diam and rep.exact
    want = (fracs + [1.0] * 4)[:4]
    np.testing.assert_allclose(rep.reach_fraction, want, rtol=1e-12)
    assert rep.spectral_gap == pytest.approx(lam2, abs=1e-9)
    per_head = [h.to_dense(L).numpy().sum() for h in head_patterns(p)]
    assert rep.density == pytest.approx(np.mean(per_head) / L**2)  # per head, as the kernel pays


def test_never_has_a_true_witness():
    for p, L in [(ac.block_local(8), 32), (ac.document([5, 9, 10]), 24), (ac.strided(4), 20)]:
        rep = analyze(p, L)
        assert rep.hops_to_full is None
        k, q = rep.never_witness
        reach = receptive_field(attention_graph(p, L), 3 * L)
        assert not reach[q, k] and k != q
    assert analyze(ac.block_local(8), 32).components == 4


# -- causality -----------------------------------------------------------------------------

def test_causal_patterns_pass_and_leaks_have_witnesses():
    for p in (ac.causal(), patterns.sliding_window(window=4, causal=True), patterns.logsparse(),
              patterns.sparse_transformer_fixed(stride=8, summary=2)):
        rep = analyze(p, 48)
        assert rep.causal and rep.causality_ok
    leaky = ac.sliding_window(2).causal() | ac.global_tokens([30])
    rep = analyze(leaky, 48, causal=True)
    assert rep.causality_ok is False
    k, q = rep.causality_witness
    assert k > q and _dense(leaky, 48)[q, k]
    blk = analyze(leaky, 256, causal=True, level="block", block=16)
    k, q = blk.causality_witness
    assert k > q and _dense(leaky, 256)[q, k]
    assert analyze(patterns.sliding_window(window=4, causal=True), 256, level="block", block=16).causality_ok


def _summary_graph(causal_ok: bool) -> AttentionGraph:
    """8 tokens, a causal window of 1, and one summary node pooling tokens 0..3.

    The summary is read by tokens 4..7 (causal) or by every token (leaks 3 -> 0).
    """
    n, s = 8, 8
    edges = [(q, k, ATTEND) for q in range(n) for k in range(n) if 0 <= q - k <= 1]
    edges += [(s, k, WRITE) for k in range(4)]
    edges += [(q, s, READ) for q in (range(4, n) if causal_ok else range(n))]
    dst, src, kind = map(np.array, zip(*edges))
    adj = sp.csr_matrix((np.ones(len(dst)), (dst, src)), shape=(n + 1, n + 1))
    kinds = sp.csr_matrix((kind, (dst, src)), shape=(n + 1, n + 1))
    return AttentionGraph(ac.causal(), n, np.array([TOKEN] * n + [SUMMARY], np.int8), adj, kinds, causal=True)


def test_aux_nodes_count_as_one_layer_and_leaks_through_them_are_caught():
    good = _summary_graph(True)
    m = layer_operator(good).toarray()
    assert m[7, 0] and m[4, 3] and not m[3, 0]  # token -> summary -> token is one layer
    assert causality_witness(good) is None
    bad = _summary_graph(False)
    k, q = causality_witness(bad)
    assert k > q
    path = layer_path(bad, k, q)
    assert path[0] == k and path[-1] == q and 8 in path  # the leak goes through the summary
    from attncompiler.analysis import from_graph, reach

    r = reach(from_graph(good, compress=False), causal=True)
    assert r.hops_to_full == 3  # 0 -> 1 -> 2 -> 3 by the window, then the summary carries 0..3 to 4..7


def test_hops_per_layer():
    g = attention_graph(ac.sliding_window(1), 20)
    k2 = dataclasses.replace(g, hops_per_layer=3)
    from attncompiler.analysis import from_graph, reach

    assert reach(from_graph(g), causal=False).hops_to_full == 19
    assert reach(from_graph(k2), causal=False).hops_to_full == 7


# -- block level vs token level ------------------------------------------------------------

def test_block_graph_exact_when_blocks_full():
    p = patterns.bigbird(block=8, window_blocks=3, global_blocks=1, random_blocks=1)
    tok = analyze(p, 128, level="token", layers=3)
    blk = analyze(p, 128, level="block", block=8, layers=3)
    assert blk.exact and blk.level == "block"
    assert (blk.hops_to_full, blk.diameter, blk.components) == (tok.hops_to_full, tok.diameter, tok.components)
    np.testing.assert_allclose(blk.reach_fraction, tok.reach_fraction, rtol=1e-12)
    assert blk.spectral_gap == pytest.approx(tok.spectral_gap, abs=1e-9)
    assert blk.slem == pytest.approx(tok.slem, abs=1e-9)
    assert blk.density == tok.density


@pytest.mark.parametrize("p", [ac.sliding_window(5), ac.sliding_window(3).causal(), ac.dilated_window(2, 3)])
def test_block_graph_bounds_when_blocks_partial(p):
    tok = analyze(p, 96, level="token", layers=3)
    blk = analyze(p, 96, level="block", block=8, layers=3)
    assert not blk.exact and blk.density == pytest.approx(tok.density)
    assert tok.hops_to_full is None or blk.hops_to_full <= tok.hops_to_full  # block hops: a lower bound
    assert all(b >= t - 1e-12 for b, t in zip(blk.reach_fraction, tok.reach_fraction))


# -- report, errors ------------------------------------------------------------------------

def test_report_is_frozen_readable_and_json():
    rep = analyze(patterns.bigbird(block=8), 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.density = 0.0
    text = str(rep)
    for key in ("density", "hops_to_full", "diameter", "spectral_gap", "ramanujan", "blocks visited"):
        assert key in text
    d = json.loads(rep.to_json())
    assert d["hops_to_full"] == rep.hops_to_full and d["cost"]["symbolic"]["name"] == "bigbird"
    assert rep.ramanujan_ratio == pytest.approx(rep.slem / rep.ramanujan_bound)
    lo, hi = rep.conductance_bounds
    assert lo == pytest.approx(rep.spectral_gap / 2) and lo <= hi


def test_bad_arguments():
    with pytest.raises(LayoutError):
        analyze(ac.causal(), 0)
    with pytest.raises(UnsupportedError):
        analyze(ac.causal(), 8, level="pixels")
    with pytest.raises(LayoutError):
        analyze(ac.causal(), 8, block=0)
