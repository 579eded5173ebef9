"""``analyze(level="auto")``: the exact token graph while it answers in seconds, else the block
quotient, said in the report, with its figures as bounds of the exact ones."""

from __future__ import annotations

import importlib

import pytest

import attncompiler as ac
from attncompiler import patterns
from attncompiler.analysis import analyze
from attncompiler.analysis.progress import Progress

report_mod = importlib.import_module("attncompiler.analysis.report")


def test_small_lengths_stay_exact():
    rep = analyze(ac.sliding_window(16), 512)
    assert rep.level == "token" and rep.exact
    assert "level auto -> token graph: exact" in rep.notes


def test_a_large_token_graph_falls_back_to_bounds(monkeypatch):
    """With a tiny edge budget the auto level takes the block quotient: hops are lower bounds
    and reach fractions upper bounds of the exact token-level values."""
    p, L = ac.sliding_window(24), 1100  # > TOKEN_ALWAYS_MAX, not a block multiple
    exact = analyze(p, L, level="token", block=32)
    monkeypatch.setattr(report_mod, "QUOTIENT_EDGES_MAX", 1000)
    auto = analyze(p, L, block=32)
    assert auto.level == "block" and not auto.exact
    assert any(n.startswith("level auto -> block quotient") and "level='token'" in n for n in auto.notes)
    assert "(bounds, not exact)" in str(auto)
    assert exact.exact and exact.hops_to_full is not None
    assert auto.hops_to_full <= exact.hops_to_full
    for a, e in zip(auto.reach_fraction, exact.reach_fraction):
        assert a >= e - 1e-12
    assert auto.density == pytest.approx(exact.density)  # allowed pairs are counted exactly either way


def test_auto_equals_token_level_when_it_is_chosen():
    p, L = patterns.bigbird(block=32), 1088
    auto, tok = analyze(p, L, block=32), analyze(p, L, level="token", block=32)
    assert auto.level == "token" and auto.exact
    for field in ("hops_to_full", "diameter", "reach_fraction", "density", "components"):
        assert getattr(auto, field) == getattr(tok, field), field
    assert auto.spectral_gap == pytest.approx(tok.spectral_gap, rel=1e-6)


@pytest.mark.parametrize("name", ["sliding_window", "causal", "diffuser", "abc_mlp", "combiner_fixed"])
def test_catalogue_at_4096_answers_quickly(name):
    rep = analyze(patterns.CATALOGUE[name](), 4096)
    assert rep.seconds < 20  # about 1 s each on a quiet 2-core machine; generous for noisy CI
    assert any(n.startswith("level auto ->") for n in rep.notes)


def test_progress_is_one_updating_line(capsys):
    prog = Progress(True)
    for i in range(3):
        prog.update("reach layer", i, 3)
    prog.done()
    err = capsys.readouterr().err
    assert "\n" not in err and "\r" in err and "analyze: reach layer" in err


def _brute_hops_and_diameter(p, L):
    import numpy as np

    m = p.to_dense(L).numpy()
    r = np.eye(L, dtype=bool)
    hops = None
    for n in range(1, 3 * L):
        r = r | ((m.astype(np.int64) @ r.astype(np.int64)) > 0)
        if r.all():
            hops = n
            break
    sym = (m | m.T) & ~np.eye(L, dtype=bool)
    d, reach, diam = 0, np.eye(L, dtype=bool), None
    while d < L:
        if reach.all():
            diam = d
            break
        reach = reach | ((sym.astype(np.int64) @ reach.astype(np.int64)) > 0)
        d += 1
    return hops, diam


@pytest.mark.parametrize("p", [ac.sliding_window(3), ac.dilated_window(2, 3) | ac.sliding_window(1),
                               ac.sliding_window(4).causal() | ac.sliding_window(1),
                               ac.mask(lambda b, h, q, k: (k - q <= 4) & (q - k <= 1))])
def test_long_hops_from_bitset_layers_match_brute_force(p):
    """Hops beyond the 8-layer profile come from bitset layers (directed) and the diameter from
    the symmetrized graph: both exact, checked against dense matrix powers."""
    L = 150
    rep = analyze(p, L, level="token")
    hops, diam = _brute_hops_and_diameter(p, L)
    assert rep.hops_to_full == hops and rep.diameter == diam and hops > 8
