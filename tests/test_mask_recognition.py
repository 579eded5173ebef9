"""Traced mask expressions recognised as DSL patterns (``Mask.structure()``): the rewrite must be
exactly the original mask, element by element and block by block, on odd lengths and blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler.dsl.mask_mod import Mask
from attncompiler.dsl.pattern import Causal, Pattern
from attncompiler.dsl.primitives import BlockLocal, BlockWindow, Document, PrefixLM, SlidingWindow, Strided
from attncompiler.errors import PatternError
from attncompiler.layout.block_layout import build_layout

from oracle import assert_matches_oracle
from strategies import block_sizes
from test_layout import dense_block_kinds


def _leaves(p: Pattern):
    if isinstance(p, Mask):
        yield p
    for c in p.children():
        yield from _leaves(c)


def _atoms(table: torch.Tensor) -> st.SearchStrategy:
    """(mask fn of (q, k), recognised?) for the forms the rewrite table covers, and a few it does not."""
    c, w, n = st.integers(-6, 6), st.integers(-2, 7), st.integers(1, 9)
    return st.one_of(
        st.just((lambda q, k: k <= q, True)),
        st.just((lambda q, k: q >= k, True)),
        st.just((lambda q, k: k < q, True)),
        st.just((lambda q, k: q != k, True)),
        c.map(lambda t: (lambda q, k: q - k < t, True)),
        c.map(lambda t: (lambda q, k: k - q >= t, True)),
        c.map(lambda t: (lambda q, k: q - (k + t) == 0, True)),
        w.map(lambda t: (lambda q, k: (q - k).abs() <= t, True)),
        st.tuples(c, w).map(lambda a: (lambda q, k: (k - q + a[0]).abs() < a[1], True)),
        w.map(lambda t: (lambda q, k: (q - k).abs() > t, True)),
        n.map(lambda b: (lambda q, k: q // b == k // b, True)),
        st.tuples(st.integers(0, 2), n).map(lambda a: (lambda q, k: (q // a[1] - k // a[1]).abs() <= a[0], True)),
        n.map(lambda s: (lambda q, k: (q - k) % s == 0, True)),
        n.map(lambda s: (lambda q, k: (k - q + 2 * s) % (-s) == 0, True)),
        st.integers(0, 30).map(lambda m: (lambda q, k: (k < m) | (k <= q), True)),
        st.integers(0, 30).map(lambda m: (lambda q, k: (q >= k) | (m > k), True)),
        st.just((lambda q, k: table[q] == table[k], True)),
        st.just((lambda q, k: ((q ^ k) & 1) == 0, False)),
        st.integers(0, 30).map(lambda m: (lambda q, k: q < m, False)),
    )


@st.composite
def traced_cases(draw):
    """A traced mask of combined atoms, its lengths, and whether every atom is recognised."""
    q_len, kv_len = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=12))
    ids = np.repeat(np.arange(len(sizes)) * draw(st.integers(1, 3)), sizes)
    ids = np.resize(ids, max(q_len, kv_len) + draw(st.integers(0, 5)))
    table = torch.from_numpy(np.sort(ids))
    fn, ok = draw(_atoms(table))
    for _ in range(draw(st.integers(0, 3))):
        g, ok2 = draw(_atoms(table))
        op = draw(st.sampled_from(["and", "or", "not"]))
        f = fn
        fn = {"and": lambda q, k, f=f, g=g: f(q, k) & g(q, k), "or": lambda q, k, f=f, g=g: f(q, k) | g(q, k),
              "not": lambda q, k, f=f: ~f(q, k)}[op]
        ok = ok and (ok2 or op == "not")
    return ac.mask(lambda b, h, q, k: fn(q, k)), q_len, kv_len, ok


@given(traced_cases(), block_sizes())
@settings(max_examples=120, deadline=None)
def test_rewrite_equals_dense_evaluation(case, blocks):
    p, q_len, kv_len, ok = case
    assert p.traced
    s = p.structure()
    if s is not None:
        np.testing.assert_array_equal(s.to_dense(q_len, kv_len), p.to_dense(q_len, kv_len), err_msg=repr(p))
    bm, bn = blocks
    layout = build_layout(p, q_len, kv_len, bm, bn)
    np.testing.assert_array_equal(layout.block_kinds()[0, 0], dense_block_kinds(p, q_len, kv_len, bm, bn),
                                  err_msg=repr(p))


@pytest.mark.parametrize("fn, want", [
    (lambda b, h, q, k: k <= q, Causal()),
    (lambda b, h, q, k: q >= k, Causal()),
    (lambda b, h, q, k: (q - k).abs() <= 5, SlidingWindow(5)),
    (lambda b, h, q, k: (k - q).abs() < 5, SlidingWindow(4)),
    (lambda b, h, q, k: q // 16 == k // 16, BlockLocal(16)),
    (lambda b, h, q, k: (q // 16 - k // 16).abs() <= 1, BlockWindow(1, 16)),
    (lambda b, h, q, k: (q - k) % 4 == 0, Strided(4)),
    (lambda b, h, q, k: (k < 8) | (k <= q), PrefixLM(8)),
    (lambda b, h, q, k: torch.tensor([0, 0, 1, 1, 1, 5])[q] == torch.tensor([0, 0, 1, 1, 1, 5])[k],
     Document((2, 3, 1))),
])
def test_primitives_are_recognised(fn, want):
    assert ac.mask(fn).structure() == want


def test_causal_sliding_window_and_strict_causal_have_no_traced_leaf():
    for fn in (lambda b, h, q, k: (q - k < 64) & (k <= q), lambda b, h, q, k: k < q):
        s = ac.mask(fn).structure()
        assert s is not None and not list(_leaves(s)), s
        np.testing.assert_array_equal(s.to_dense(77, 90), ac.mask(fn).to_dense(77, 90))


def test_unrecognised_part_stays_a_traced_leaf():
    p = ac.mask(lambda b, h, q, k: (k <= q) & (((q ^ k) & 1) == 0))
    s = p.structure()
    assert isinstance(s, ac.Pattern) and len(list(_leaves(s))) == 1
    assert ac.mask(lambda b, h, q, k: ((q ^ k) & 1) == 0).structure() is None


def test_unsorted_table_is_not_a_document():
    t = torch.tensor([0, 1, 0, 1, 2, 2, 2, 3])
    p = ac.mask(lambda b, h, q, k: t[q] == t[k])
    assert p.structure() is None
    np.testing.assert_array_equal(build_layout(p, 8, 8, 3, 3).block_kinds()[0, 0], dense_block_kinds(p, 8, 8, 3, 3))


def test_short_document_table_is_still_an_index_error():
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 3, 3, 3]))
    p = ac.mask(lambda b, h, q, k: ids[q] == ids[k])
    assert isinstance(p.structure(), Document)
    with pytest.raises(PatternError, match="outside"):
        p.layout(16, 16, 4)


def test_per_batch_document_rows_are_recognised_once_specialized():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3]])
    p = ac.mask(lambda b, h, q, k: docs[b, q] == docs[b, k])
    assert p.structure() is None  # reads b: recognised per batch entry
    lay = build_layout(p, 11, 11, 3, 2, batch=2)
    for b in range(2):
        assert isinstance(p.specialize(b, 0).structure(), Document)
        np.testing.assert_array_equal(lay.block_kinds()[b, 0], dense_block_kinds(p, 11, 11, 3, 2, b=b))


def test_large_constants_are_not_rewritten():
    p = ac.mask(lambda b, h, q, k: q - k + 2**62 > 2**62 - 3)
    assert p.structure() is None


@pytest.mark.parametrize("fn", [
    lambda b, h, q, k: (q - k < 9) & (k <= q),
    lambda b, h, q, k: ((q - k).abs() <= 4) | ((k < 5) | (k <= q)),
    lambda b, h, q, k: torch.tensor([0] * 13 + [1] * 20 + [4] * 8)[q] == torch.tensor([0] * 13 + [1] * 20 + [4] * 8)[k],
])
def test_torch_backend_matches_oracle(fn):
    p = ac.mask(fn)
    assert p.structure() is not None
    q, k, v = (torch.randn(1, 2, 41, 16, requires_grad=True) for _ in range(3))
    out = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=16, block_n=8))(q, k, v)
    assert_matches_oracle(out, ac.reference(p, q, k, v), (q, k, v))


def test_document_mask_layout_is_fast_at_64k():
    ids = torch.repeat_interleave(torch.arange(64), torch.full((64,), 1024))
    p = ac.mask(lambda b, h, q, k: ids[q] == ids[k])
    assert isinstance(p.structure(), Document)
    assert p.layout(65536, 65536, 64).block_kinds().shape[-1] == 1024
