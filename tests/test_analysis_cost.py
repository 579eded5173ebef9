"""Symbolic and block-level cost, and the analyze/compare commands."""

import json

import numpy as np
import pytest

import attncompiler as ac
from attncompiler import patterns
from attncompiler.analysis import asymptotic_class, block_cost, symbolic_cost
from attncompiler.analysis.symbols import L
from attncompiler.analysis.mask_graph import head_patterns
from attncompiler.cli.main import main

CASES = [
    ("sliding_window", dict(window=3), (32, 48, 64)),
    ("sliding_window", dict(window=3, causal=True), (32, 47)),
    ("causal", {}, (16, 33)),
    ("prefix_lm", dict(prefix=5), (24, 40)),
    ("document", dict(lengths=(5, 9, 4)), (10, 18, 30)),
    ("bigbird", dict(block=4, window_blocks=3, global_blocks=1, random_blocks=0), (32, 48, 64)),
    ("bigbird", dict(block=4, window_blocks=3, global_blocks=2, random_blocks=2), (48, 64)),
    ("longformer", dict(window=3, global_indices=(0, 2)), (32, 48)),
    ("longformer", dict(window=2, dilation=2, global_indices=(0, 5)), (32, 48)),
    ("fixed", dict(stride=4, summary=2), (32, 48)),
    ("fixed", dict(stride=4, summary=2, merged=True), (32, 48)),
    ("strided", dict(stride=4), (32, 48)),
    ("strided", dict(stride=4, merged=True), (32, 48)),
    ("logsparse", {}, (17, 32, 50)),
    ("logsparse", dict(local=3), (32, 50)),
    ("axial", dict(cols=4), (32, 48)),
    ("axial", dict(cols=4, causal=True), (32, 48)),
]


@pytest.mark.parametrize("name,params,lengths", CASES)
def test_symbolic_cost_matches_exact_counts(name, params, lengths):
    p = patterns.CATALOGUE[name](**params)
    sc = symbolic_cost(p)
    assert sc is not None and sc.name == name
    for n in lengths:
        heads = head_patterns(p)
        exact = np.mean([int(h.to_dense(n).sum()) for h in heads])
        row_max = max(int(h.to_dense(n).sum(1).max()) for h in heads)
        got = sc.at(n, head_dim=32)
        if sc.exact:
            assert got["pairs"] == pytest.approx(exact)
        else:  # random blocks may coincide with window or global blocks: an upper bound
            assert exact <= got["pairs"] <= exact + params["random_blocks"] * params["block"] * n
        assert got["row_max"] == row_max
        assert got["flops"] == pytest.approx(4 * got["pairs"] * 32)


def test_growth_classes():
    assert symbolic_cost(patterns.sliding_window()).asymptotic == "O(L)"
    assert symbolic_cost(patterns.bigbird()).asymptotic == "O(L)"
    assert symbolic_cost(patterns.causal()).asymptotic == "O(L^2)"
    assert symbolic_cost(patterns.logsparse()).asymptotic == "O(L log L)"
    strided = symbolic_cost(patterns.sparse_transformer_strided())
    assert strided.asymptotic == "O(L^2)" and strided.scaled.startswith("O(L sqrt L)")
    assert asymptotic_class(L ** 2 / 7 + L) == "O(L^2)"
    assert symbolic_cost(ac.sliding_window(3) | ac.strided(5)) is None  # not a catalogue entry


@pytest.mark.parametrize("p", [ac.sliding_window(5), patterns.sparse_transformer_fixed(stride=8, summary=2),
                               ac.document([20, 30, 14])])
def test_block_cost_is_exact(p):
    n, blk = 64, 16
    bc = block_cost(p, n, blk, head_dim=8)
    heads = head_patterns(p)
    assert bc.allowed_pairs == pytest.approx(np.mean([h.to_dense(n).sum() for h in heads]))
    lays = [h.layout(n, n, blk, blk).group_for(0, 0) for h in heads]
    assert bc.blocks_visited == pytest.approx(np.mean([g.num_blocks for g in lays]))
    assert bc.wasted_pairs == pytest.approx(bc.computed_pairs - bc.allowed_pairs)
    assert bc.kernel_flops >= bc.useful_flops and bc.load_balance >= 1.0


def test_cli_analyze_and_compare(capsys):
    assert main(["analyze", "sliding_window(window=4)", "--seq-len", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["hops_to_full"] == 16 and d["cost"]["asymptotic"] == "O(L)"
    assert main(["analyze", "bigbird(block=8)", "-L", "256", "--layers", "3"]) == 0
    out = capsys.readouterr().out
    assert "hops_to_full" in out and "spectral_gap" in out
    assert main(["compare", "sliding_window(window=4)", "causal", "bigbird(block=8)", "-L", "128"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["pattern", "density", "hops_to_full"] and len(out) == 4
    assert main(["analyze", "nonsense", "-L", "64"]) == 2


def test_cli_png(tmp_path, capsys):
    target = tmp_path / "a.png"
    rc = main(["analyze", "sliding_window(window=4)", "-L", "64", "--png", str(target)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 2 and "matplotlib" in capsys.readouterr().err
    else:
        assert rc == 0 and target.stat().st_size > 0
