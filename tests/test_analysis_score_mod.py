"""ac.analyze with a score_mod: ALiBi's effectively-masked graph and its hops_to_full."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler.analysis.edge_reach import THRESHOLD, effective_pattern

PATTERNS = {
    "causal": (ac.causal(), True),
    "window|global": (ac.sliding_window(9) | ac.global_tokens([0, 5]), False),
    "causal strided": ((ac.sliding_window(3) | ac.strided(4)) & ac.causal(), True),
    "full": (ac.full(), False),
}


def kept_by_bias(slope: float, L: int) -> np.ndarray:
    """Brute force: pairs whose ALiBi bias ``slope * (k - q)`` is at least ``-THRESHOLD``."""
    q, k = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    return slope * (k - q) >= -THRESHOLD


def brute_hops(allowed: np.ndarray, causal: bool, max_hops: int = 64):
    """Fewest stacked layers reaching every legal pair (the residual keeps each token's own
    state); None when the reach stops growing first."""
    L = allowed.shape[0]
    step = (allowed | np.eye(L, dtype=bool)).astype(np.int64)
    legal = np.tril(np.ones((L, L), dtype=bool)) if causal else np.ones((L, L), dtype=bool)
    r = np.eye(L, dtype=bool)
    for n in range(1, max_hops + 1):
        new = (step @ r.astype(np.int64)) > 0
        if (new | ~legal).all():
            return n
        if (new == r).all():
            return None
        r = new
    return None


@pytest.mark.parametrize("name", PATTERNS)
@settings(max_examples=15, deadline=None)
@given(slopes=st.lists(st.one_of(st.sampled_from([0.25, 0.5, 2.0, 20.0, 40.0, 0.0, -0.5]),
                                 st.floats(0.01, 30.0)), min_size=1, max_size=4),
       L=st.sampled_from([6, 7, 31, 50]))
def test_effective_mask_equals_where_the_bias_is_above_minus_20(name, slopes, L):
    pattern, causal = PATTERNS[name]
    rep = ac.analyze(pattern, L, score_mod=ac.alibi(torch.tensor(slopes, dtype=torch.float64))).score_mod
    for slope, d, side in zip(slopes, rep.distance, rep.side):
        eff = effective_pattern(pattern, d, causal, future=side == "future").to_dense(L).numpy()
        want = pattern.to_dense(L).numpy() & kept_by_bias(slope, L)
        assert (eff == want).all(), (slope, d)


@pytest.mark.parametrize("L", [1, 2, 33, 97, 200])
def test_causal_window_hops_closed_form(L):
    """Causal attention under ALiBi is a causal window of ``reach - 1`` keys per head, whose hops
    are ``ceil((L - 1) / (reach - 1))``; a slope above 20 leaves the diagonal only (never)."""
    slopes = torch.tensor([0.25, 1.0, 2.5, 25.0, 0.0])
    rep = ac.analyze(ac.causal(), L, score_mod=ac.alibi(slopes))
    s = rep.score_mod
    assert s.analyzed and s.exact and rep.hops_to_full == (1 if L > 1 else 0)
    assert s.distance == (81, 21, 9, 1, None)
    want = [0 if L == 1 else math.ceil((L - 1) / 80), 0 if L == 1 else math.ceil((L - 1) / 20),
            0 if L == 1 else math.ceil((L - 1) / 8), 0 if L == 1 else None, 0 if L == 1 else 1]
    assert list(s.hops_per_head) == want
    assert s.hops_to_full == (0 if L == 1 else None)  # the slope-25 head never reaches
    without = ac.analyze(ac.causal(), L, score_mod=ac.alibi(slopes[:3]))
    assert without.score_mod.hops_to_full == max(want[:3])
    assert f"hops_to_full {max(want[:3])} (worst head)" in str(without)


@pytest.mark.parametrize("name", ["window|global", "causal strided"])
def test_hops_per_head_equal_brute_force(name):
    pattern, causal = PATTERNS[name]
    L = 41
    slopes = [-3.0, 0.9, 3.0, 7.0]  # a negative slope decays towards later keys
    s = ac.analyze(pattern, L, score_mod=ac.alibi(torch.tensor(slopes))).score_mod
    for slope, hops in zip(slopes, s.hops_per_head):
        allowed = pattern.to_dense(L).numpy() & kept_by_bias(slope, L)
        assert hops == brute_hops(allowed, causal), slope
    # the bias lengthens the path: the mask's own hops are fewer for the steepest head
    assert s.hops_per_head[-1] > ac.analyze(pattern, L).hops_to_full or s.hops_per_head[-1] is None


def test_other_score_mods_are_reported_as_not_analyzed():
    for mod in (ac.softcap(30.0), ac.compose(ac.softcap(30.0), ac.alibi(torch.ones(2))),
                lambda score, b, h, q, k: score * 2):
        rep = ac.analyze(ac.causal(), 16, score_mod=mod)
        assert not rep.score_mod.analyzed and "not analyzed" in str(rep)
        assert rep.score_mod.hops_to_full is None and rep.score_mod.reason
    assert ac.analyze(ac.causal(), 16).score_mod is None


def test_report_round_trips_to_json():
    rep = ac.analyze(ac.causal(), 40, score_mod=ac.alibi(torch.tensor([1.0, 4.0])))
    d = json.loads(rep.to_json())["score_mod"]
    assert d["distance"] == [21, 6] and d["hops_per_head"] == [2, 8] and d["hops_to_full"] == 8
