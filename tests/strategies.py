"""Hypothesis strategies for random attention-pattern expressions.

Other test modules import these: ``cases()`` draws a mask pattern together with lengths that it
is valid at, ``geometries()`` draws lengths and block sizes (including lengths that are not
block multiples). Patterns are built only through the public DSL, so every primitive, every
combinator and both traced and opaque ``mask_mod`` patterns are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import attncompiler as ac

# Opaque mask_mods: tensor methods the tracer does not model make tracing fail, so these stay
# opaque and exercise the chunked-evaluation path. Module-level functions hash stably.


def opaque_parity(b, h, q_idx, kv_idx):
    """Keys with the parity of the query (``Tensor.remainder`` is not traced)."""
    return (q_idx - kv_idx).remainder(2) == 0


def opaque_near(b, h, q_idx, kv_idx):
    """``|q - k| < 5`` via ``Tensor.lt`` (not traced)."""
    return (q_idx - kv_idx).abs().lt(5)


# Traced mask_mods (each traces to an Expr).
TRACED = (
    lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 3 == 0,
    lambda b, h, q_idx, kv_idx: (q_idx // 8) >= (kv_idx // 8),
    lambda b, h, q_idx, kv_idx: torch.where(q_idx < 10, kv_idx < 4, (q_idx - kv_idx).abs() <= 2),
    lambda b, h, q_idx, kv_idx: (kv_idx * 3 + 1) % 7 < 3,
    lambda b, h, q_idx, kv_idx: ((q_idx ^ kv_idx) & 1) == 0,
)
OPAQUE = (opaque_parity, opaque_near)


@dataclass(frozen=True)
class Case:
    """A pattern and lengths at which it is valid."""

    pattern: ac.Pattern
    q_len: int
    kv_len: int


def primitives(max_index: int) -> st.SearchStrategy[ac.Pattern]:
    """Every mask primitive with small parameters; global indices lie below ``max_index``."""
    small = st.integers(0, 12)
    pos = st.integers(1, 12)
    return st.one_of(
        st.just(ac.full()),
        st.just(ac.causal()),
        small.map(ac.sliding_window),
        st.builds(ac.dilated_window, st.integers(0, 5), st.integers(1, 4)),
        pos.map(ac.block_local),
        st.builds(ac.block_window, st.integers(0, 2), st.integers(1, 16)),
        st.integers(1, 9).map(ac.strided),
        st.lists(st.integers(0, max_index - 1), min_size=1, max_size=7).map(ac.global_tokens),
        st.builds(ac.random_blocks, st.integers(0, 3), st.integers(1, 24), st.integers(0, 5)),
        st.integers(0, 40).map(ac.prefix_lm),
        st.lists(st.integers(1, 40), min_size=1, max_size=4).map(ac.document),
        st.sampled_from(TRACED).map(ac.mask),
        st.sampled_from(OPAQUE).map(ac.mask),
    )


def expressions(max_index: int, max_leaves: int = 4) -> st.SearchStrategy[ac.Pattern]:
    """Random trees of primitives combined with ``|``, ``&``, ``~`` and ``.causal()``."""

    def extend(children):
        return st.one_of(
            st.tuples(children, children).map(lambda t: t[0] | t[1]),
            st.tuples(children, children).map(lambda t: t[0] & t[1]),
            children.map(lambda p: ~p),
            children.map(lambda p: p.causal()),
        )

    return st.recursive(primitives(max_index), extend, max_leaves=max_leaves)


@st.composite
def cases(draw, min_len: int = 1, max_len: int = 130, same_len: bool = False,
          max_leaves: int = 4) -> Case:
    """A random pattern expression with query/key lengths in ``[min_len, max_len]``."""
    q_len = draw(st.integers(min_len, max_len))
    kv_len = q_len if same_len else draw(st.integers(min_len, max_len))
    p = draw(expressions(max(q_len, kv_len), max_leaves))
    return Case(p, q_len, kv_len)


@st.composite
def block_sizes(draw) -> tuple[int, int]:
    """(block_m, block_n): small, often different, often not dividing the lengths."""
    return draw(st.sampled_from([1, 3, 8, 16, 32])), draw(st.sampled_from([2, 5, 8, 16, 32]))


def head_dims() -> st.SearchStrategy[int]:
    """Head dims including the awkward ones the issue names (48, 96)."""
    return st.sampled_from([8, 16, 48, 96])


# ---------------------------------------------------------------------------------------------
# Index expressions
# ---------------------------------------------------------------------------------------------

def int_exprs(max_leaves: int = 6, divisors: bool = True) -> st.SearchStrategy:
    """Integer index expressions over ``b, h, q_idx, kv_idx`` and small constants.

    Division and modulo use non-zero constant divisors of both signs (Python floor semantics).
    """
    from attncompiler import expr as E

    leaves = st.one_of(st.sampled_from(E.INDEX_VARS), st.integers(-9, 9).map(E.Const))
    nonzero = st.integers(-7, 7).filter(bool)

    def extend(children):
        ops = [
            st.tuples(children, children).map(lambda t: t[0] + t[1]),
            st.tuples(children, children).map(lambda t: t[0] - t[1]),
            st.tuples(children, st.integers(-3, 3)).map(lambda t: t[0] * t[1]),
            children.map(abs),
            children.map(lambda e: -e),
            st.tuples(children, children).map(lambda t: E.minimum(*t)),
            st.tuples(children, children).map(lambda t: E.maximum(*t)),
            st.tuples(children, children).map(lambda t: t[0] & t[1]),  # bitwise on integers
            st.tuples(children, children).map(lambda t: t[0] ^ t[1]),
        ]
        if divisors:
            ops += [st.tuples(children, nonzero).map(lambda t: t[0] // t[1]),
                    st.tuples(children, nonzero).map(lambda t: t[0] % t[1])]
        return st.one_of(*ops)

    return st.recursive(leaves, extend, max_leaves=max_leaves).map(E.as_expr)


def bool_exprs(max_leaves: int = 4) -> st.SearchStrategy:
    """Boolean index expressions: comparisons of integer expressions under ``& | ^ ~ where``."""
    from attncompiler import expr as E

    ints = int_exprs(3)
    cmp = st.tuples(ints, ints, st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"])).map(
        lambda t: E.binop(t[2], t[0], t[1]))

    def extend(children):
        return st.one_of(
            st.tuples(children, children).map(lambda t: t[0] & t[1]),
            st.tuples(children, children).map(lambda t: t[0] | t[1]),
            st.tuples(children, children).map(lambda t: t[0] ^ t[1]),
            children.map(lambda e: ~e),
            st.tuples(children, children, children).map(lambda t: E.where(*t)),
        )

    return st.recursive(cmp, extend, max_leaves=max_leaves)
