"""The pattern DSL: primitive semantics, combinators, immutability, hashing, repr."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import attncompiler as ac

from strategies import OPAQUE, cases

# Each primitive against the sentence that defines it (DESIGN section 4), evaluated literally.
DEFINITIONS = [
    (ac.full(), lambda q, k: True),
    (ac.causal(), lambda q, k: k <= q),
    (ac.sliding_window(3), lambda q, k: abs(q - k) <= 3),
    (ac.sliding_window(0), lambda q, k: q == k),
    (ac.dilated_window(2, 3), lambda q, k: abs(q - k) <= 6 and (q - k) % 3 == 0),
    (ac.global_tokens([0, 5, 6]), lambda q, k: q in (0, 5, 6) or k in (0, 5, 6)),
    (ac.global_tokens(range(1, 12)), lambda q, k: 1 <= q < 12 or 1 <= k < 12),  # table-backed
    (ac.block_local(4), lambda q, k: q // 4 == k // 4),
    (ac.block_window(1, 4), lambda q, k: abs(q // 4 - k // 4) <= 1),
    (ac.strided(5), lambda q, k: (q - k) % 5 == 0),
    (ac.prefix_lm(7), lambda q, k: k < 7 or k <= q),
    (ac.document([3, 9, 4]), lambda q, k: q < 16 and k < 16 and _doc(q, [3, 9, 4]) == _doc(k, [3, 9, 4])),
]


def _doc(i: int, lengths: list[int]) -> int:
    return int(np.searchsorted(np.cumsum(lengths), i, side="right"))


@pytest.mark.parametrize("pattern,definition", DEFINITIONS, ids=[repr(p) for p, _ in DEFINITIONS])
@pytest.mark.parametrize("q_len,kv_len", [(19, 19), (13, 21), (23, 9)])
def test_primitive_matches_its_definition(pattern, definition, q_len, kv_len):
    expected = torch.tensor([[bool(definition(q, k)) for k in range(kv_len)] for q in range(q_len)])
    assert torch.equal(pattern.to_dense(q_len, kv_len), expected)


@pytest.mark.parametrize("count,block,seed", [(1, 4, 0), (2, 3, 7), (3, 5, 1), (9, 4, 2)])
def test_random_blocks_definition(count, block, seed):
    q_len, kv_len = 29, 23
    nkb = -(-kv_len // block)
    d = ac.random_blocks(count, block, seed).to_dense(q_len, kv_len)
    for qb in range(-(-q_len // block)):
        rows = d[qb * block:(qb + 1) * block]
        assert (rows == rows[0]).all(), "every query of a block sees the same keys"
        seen = [kb for kb in range(nkb) if rows[0, kb * block:(kb + 1) * block].any()]
        for kb in seen:
            assert rows[0, kb * block:(kb + 1) * block].all(), "whole key blocks"
        assert len(seen) == min(count, nkb), "count distinct key blocks"
    assert torch.equal(d, ac.random_blocks(count, block, seed).to_dense(q_len, kv_len)), "deterministic"


def test_random_blocks_depend_on_seed():
    dense = {ac.random_blocks(2, 4, s).to_dense(64, 64).numpy().tobytes() for s in range(4)}
    assert len(dense) > 1


def test_combinators_are_set_algebra():
    a, b = ac.sliding_window(2), ac.strided(3)
    da, db = a.to_dense(20), b.to_dense(20)
    assert torch.equal((a | b).to_dense(20), da | db)
    assert torch.equal((a & b).to_dense(20), da & db)
    assert torch.equal((~a).to_dense(20), ~da)
    assert torch.equal(a.causal().to_dense(20), da & ac.causal().to_dense(20))


def test_combinators_flatten_and_deduplicate():
    a, b, c = ac.causal(), ac.sliding_window(2), ac.strided(3)
    assert (a | b) | c == a | (b | c)
    assert ((a | b) | c).parts == (a, b, c)
    assert a | a == a
    assert ~~a == a
    assert a.causal().causal() == a & ac.causal()
    assert ac.union(a, b) == a | b and ac.intersection(a, b) == a & b


# -- immutability, hashing, equality -------------------------------------------------------------

@pytest.mark.parametrize("pattern", [ac.sliding_window(3), ac.global_tokens([1, 2]), ac.causal() | ac.full(),
                                     ac.per_head([ac.causal(), ac.full()])])
def test_patterns_are_frozen(pattern):
    field = dataclasses.fields(pattern)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(pattern, field, 1)


@given(cases())
@settings(max_examples=30)
def test_structural_equality_and_hash(case):
    p = case.pattern
    rebuilt = copy.deepcopy(p)  # new objects all the way down (buffers included)
    assert rebuilt is not p
    assert rebuilt == p and hash(rebuilt) == hash(p)
    assert {p: 1}[rebuilt] == 1
    other = ac.sliding_window(1000)  # never drawn by the strategy
    assert p != ~p and (p | other) != (p & other)


def test_equal_parameters_equal_patterns():
    assert ac.sliding_window(4) == ac.sliding_window(4)
    assert ac.sliding_window(4) != ac.sliding_window(5)
    assert ac.global_tokens([3, 1, 1]) == ac.global_tokens([1, 3])  # a set of indices
    assert hash(ac.document([2, 3])) == hash(ac.document((2, 3)))
    # Traced masks compare by their expression, whichever lambda produced it.
    assert ac.mask(lambda b, h, q, k: q >= k) == ac.mask(lambda b, h, x, y: x >= y)
    assert ac.mask(lambda b, h, q, k: q >= k) != ac.mask(lambda b, h, q, k: q > k)
    # Opaque masks compare by function identity.
    assert ac.mask(OPAQUE[0]) == ac.mask(OPAQUE[0]) and ac.mask(OPAQUE[0]) != ac.mask(OPAQUE[1])


def test_bool_of_a_pattern_raises():
    with pytest.raises(ac.PatternError, match="ambiguous"):
        bool(ac.causal())
    with pytest.raises(ac.PatternError):
        ac.causal() and ac.full()  # noqa: B015 - `and` is what users get wrong
    with pytest.raises(ac.PatternError):
        ac.causal() or ac.full()  # noqa: B015


# -- repr ------------------------------------------------------------------------------------------

@given(cases())
@settings(max_examples=60)
def test_repr_reads_as_the_code_that_builds_it(case):
    p = case.pattern
    scope = {"ac": ac, **{f.__name__: f for f in OPAQUE}}
    again = eval(repr(p), scope)
    assert again == p and hash(again) == hash(p) and repr(again) == repr(p)


def test_repr_examples():
    p = (ac.sliding_window(128) | ac.global_tokens([0, 1, 2, 3])) & ac.causal()
    assert repr(p) == "(ac.sliding_window(128) | ac.global_tokens([0, 1, 2, 3])) & ac.causal()"
    assert repr(~(ac.causal() | ac.full())) == "~(ac.causal() | ac.full())"
    assert repr(ac.global_tokens(range(100))) == "ac.global_tokens(range(100))"
    assert repr(ac.mask(OPAQUE[0])) == "ac.mask(opaque_parity)"


# -- per-head and per-batch patterns -------------------------------------------------------------

def test_per_head_cycles_through_patterns():
    parts = [ac.causal(), ac.sliding_window(1), ac.strided(4)]
    p = ac.per_head(parts)
    assert p.head_period == 3
    for h in range(7):
        assert torch.equal(p.to_dense(16, h=h), parts[h % 3].to_dense(16))
    assert ac.per_head([ac.causal()]) == ac.causal()
    assert repr(p) == "ac.per_head([ac.causal(), ac.sliding_window(1), ac.strided(4)])"


def test_head_and_batch_dependence_is_detected():
    assert ac.sliding_window(3).head_period == 1 and not ac.sliding_window(3).batch_dependent
    traced_h = ac.mask(lambda b, h, q, k: (h == 1) | (q >= k))
    assert traced_h.head_period is None
    assert torch.equal(traced_h.to_dense(8, h=1), torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(traced_h.to_dense(8, h=0), ac.causal().to_dense(8))
    traced_b = ac.mask(lambda b, h, q, k: (b == 1) & (q >= k))
    assert traced_b.batch_dependent and not traced_b.to_dense(8, b=0).any()
    opaque = ac.mask(lambda b, h, q, k: (q - k).remainder(2) == h % 2, per_head=True)
    assert opaque.head_period is None
    assert not torch.equal(opaque.to_dense(8, h=0), opaque.to_dense(8, h=1))
    assert (ac.per_head([ac.causal(), ac.full()]) | traced_h).head_period is None


def test_document_positions_past_the_end_see_nothing():
    d = ac.document([3, 4]).to_dense(10)
    assert not d[7:].any() and not d[:, 7:].any()
    assert d[:7, :7].sum() == 9 + 16


def test_predicate_is_none_only_for_opaque_parts():
    assert ac.causal().predicate(8, 8) is not None
    assert (ac.causal() | ac.mask(OPAQUE[0])).predicate(8, 8) is None
    mixed = ac.causal() | ac.mask(OPAQUE[0])
    expected = ac.causal().to_dense(9) | ac.mask(OPAQUE[0]).to_dense(9)
    assert torch.equal(mixed.to_dense(9), expected)
