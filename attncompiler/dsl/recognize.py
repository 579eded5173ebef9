"""Structural recognition: a traced mask expression rewritten into the DSL pattern it provably
equals, so that it gets the primitives' analytic per-row layout instead of interval bounds over
every (query-block, key-block) pair.

A small rewrite table in the tinygrad style: each rule matches one IR node shape and returns the
equal DSL pattern, or None when the node is not of its form. Every rewrite is exact as a mask
(``&``, ``|``, ``~`` map to the DSL combinators); a boolean subtree no rule recognises stays a
traced :class:`~attncompiler.dsl.mask_mod.Mask` leaf inside the rewritten pattern.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..ir.expr import BinOp, Const, Expr, UnOp, Var
from ..ir.index import Index
from ..ir.ops import BOOL
from .pattern import Causal, Pattern, causal, intersection, union
from .primitives import BlockLocal, BlockWindow, Document, Full, PrefixLM, SlidingWindow, Strided

Linear = tuple[int, int, int]  # (coefficient of q_idx, coefficient of kv_idx, constant)
_CONST_LIMIT = 2**60  # constants kept far from int64 overflow of q - k + c (positions < 2**62)
Leaf = Callable[[Expr], Pattern]  # the traced pattern of an unrecognised subtree
_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def _linear(e: Expr) -> Linear | None:
    """``e`` as ``a*q + b*k + c`` with ``|a|, |b| <= 1`` at every node, else None."""
    match e:
        case Var("q_idx"): return (1, 0, 0)
        case Var("kv_idx"): return (0, 1, 0)
        case Const(value=v) if not isinstance(v, bool) and abs(v) <= _CONST_LIMIT: return (0, 0, v)
        case BinOp(op="add" | "sub", a=a, b=b):
            la, lb = _linear(a), _linear(b)
            if la is None or lb is None:
                return None
            s = 1 if e.op == "add" else -1
            out = tuple(x + s * y for x, y in zip(la, lb))
            return out if abs(out[0]) <= 1 and abs(out[1]) <= 1 and abs(out[2]) <= _CONST_LIMIT else None
        case BinOp(op="mul", a=Const(value=-1), b=x) | BinOp(op="mul", a=x, b=Const(value=-1)):
            lx = _linear(x)
            return None if lx is None else tuple(-v for v in lx)
    return None


def _diff(e: Expr) -> tuple[int, int] | None:
    """``e`` as ``s * (q - k) + c`` (``s`` = +-1): ``(s, c)``, else None."""
    lin = _linear(e)
    return (lin[0], lin[2]) if lin is not None and lin[0] == -lin[1] != 0 else None


def _cmp_range(op: str, t: int) -> tuple[int | None, int | None] | None:
    """The values of ``x`` with ``x op t`` as ``[lo, hi]`` (None: unbounded); None for ``ne``."""
    return {"lt": (None, t - 1), "le": (None, t), "gt": (t + 1, None), "ge": (t, None), "eq": (t, t)}.get(op)


def _at_least(t: int) -> Pattern:
    """``q - k >= t``: causal, widened or narrowed by a sliding window."""
    if t == 0:
        return causal()
    return causal() | SlidingWindow(-t) if t < 0 else causal() & ~SlidingWindow(t - 1)


def _diff_range(lo: int | None, hi: int | None) -> Pattern:
    """``lo <= q - k <= hi`` as DSL (None: unbounded)."""
    if lo is not None and hi is not None and lo > hi:
        return ~Full()
    if lo is None:
        return Full() if hi is None else ~_at_least(hi + 1)
    if hi is None:
        return _at_least(lo)
    if lo == -hi:
        return SlidingWindow(hi)
    if lo == 0:
        return causal() & SlidingWindow(hi)
    return _at_least(lo) & ~_at_least(hi + 1)


def _in_range(rng: tuple[int | None, int | None] | None, negate: bool) -> Pattern | None:
    if rng is None:
        return None
    p = _diff_range(*rng)
    return ~p if negate else p


def _compare_diff(e: BinOp) -> Pattern | None:
    """``lin(a - b) op 0`` with ``lin = s*(q - k) + c``: a range of ``q - k``."""
    d = _diff(BinOp("sub", e.a, e.b))
    if d is None:
        return None
    s, c = d
    op, t = (e.op, -c) if s == 1 else (_FLIP[e.op], c)  # s*x + c op 0  ->  x op' t
    return _in_range(_cmp_range("eq" if op == "ne" else op, t), op == "ne")


def _compare_abs(e: BinOp) -> Pattern | None:
    """``|s*(q - k) + c| op w``: ``q - k`` within ``w`` of ``-s*c`` (``op`` in < <= > >=)."""
    op, a, w = (e.op, e.a, e.b) if isinstance(e.a, UnOp) else (_FLIP[e.op], e.b, e.a)
    if not (isinstance(a, UnOp) and a.op == "abs" and isinstance(w, Const) and op in ("lt", "le", "gt", "ge")):
        return None
    d = _diff(a.a)
    if d is None or isinstance(w.value, bool) or abs(w.value) > _CONST_LIMIT:
        return None
    m = -d[0] * d[1]  # |x - m| op w
    r = w.value - 1 if op in ("lt", "ge") else w.value  # |x - m| <= r, negated for > and >=
    inside = ~Full() if r < 0 else (SlidingWindow(r) if m == 0 else _diff_range(m - r, m + r))
    return ~inside if op in ("gt", "ge") else inside


def _block_eq(e: BinOp) -> Pattern | None:
    """``q // n == k // n`` (either order, ``n > 0``): ``block_local(n)``."""
    match e.a, e.b:
        case (BinOp(op="floordiv", a=Var(x), b=Const(value=n)), BinOp(op="floordiv", a=Var(y), b=Const(value=m))):
            if {x, y} == {"q_idx", "kv_idx"} and n == m and not isinstance(n, bool) and n > 0:
                return BlockLocal(n)
    return None


def _block_window(e: BinOp) -> Pattern | None:
    """``|q // n - k // n| <= w``: ``block_window(w, n)``."""
    match e:
        case BinOp(op="le", a=UnOp(op="abs", a=BinOp(op="sub", a=BinOp(op="floordiv", a=Var(x), b=Const(value=n)),
                                                         b=BinOp(op="floordiv", a=Var(y), b=Const(value=m)))),
                   b=Const(value=w)):
            if {x, y} == {"q_idx", "kv_idx"} and n == m and not isinstance(n, bool) and n > 0 \
                    and not isinstance(w, bool) and 0 <= w <= _CONST_LIMIT:
                return BlockWindow(w, n)
    return None


def _strided(e: BinOp) -> Pattern | None:
    """``s*(q - k) % n == 0`` (either side): ``strided(|n|)``."""
    x, zero = (e.a, e.b) if e.b == Const(0) else (e.b, e.a)
    if zero != Const(0) or not (isinstance(x, BinOp) and x.op == "mod" and isinstance(x.b, Const)):
        return None
    n, d = x.b.value, _diff(x.a)
    if d is None or isinstance(n, bool) or n == 0 or abs(n) > _CONST_LIMIT or d[1] % n != 0:
        return None
    return Strided(abs(n))


def _table_row(e: Expr) -> tuple[tuple, np.ndarray, str] | None:
    """``t[c0, ..., q]`` / ``t[c0, ..., k]`` (constant leading indices): ((buffer, shape, constants), row, var)."""
    if not (isinstance(e, Index) and isinstance(e.indices[-1], Var) and e.indices[-1].name in ("q_idx", "kv_idx")):
        return None
    lead = e.indices[:-1]
    if not all(isinstance(i, Const) and not isinstance(i.value, bool) for i in lead):
        return None
    consts = tuple(int(i.value) % n for i, n in zip(lead, e.shape))
    row = e.buffer.data.reshape(e.shape)[consts] if consts else e.buffer.data
    return (e.buffer, e.shape, consts), row, e.indices[-1].name


def _documents(e: BinOp) -> Pattern | None:
    """``t[q] == t[k]`` over a non-decreasing 1-D row: documents of the runs of equal ids.

    Index ranges are checked on the original expression (``Mask.validate``), so positions
    past the table stay an error, never "no document"."""
    a, b = _table_row(e.a), _table_row(e.b)
    if a is None or b is None or a[0] != b[0] or {a[2], b[2]} != {"q_idx", "kv_idx"}:
        return None
    row = a[1]
    if len(row) == 0 or np.any(row[1:] < row[:-1]):  # O(len): sorted ids only
        return None
    starts = np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))
    return Document(tuple(int(n) for n in np.diff(np.append(starts, len(row)))))


def _prefix_lm(e: BinOp, leaf: Leaf) -> Pattern | None:
    """``(k < n) | causal`` (either order): ``prefix_lm(n)``."""
    for x, y in ((e.a, e.b), (e.b, e.a)):
        lin = _linear(BinOp("sub", x.a, x.b)) if isinstance(x, BinOp) and x.op in ("lt", "le", "gt", "ge") else None
        if lin is None or lin[0] != 0 or abs(lin[1]) != 1:
            continue
        op = x.op if lin[1] == 1 else _FLIP[x.op]  # k + c op 0  (c negated when k's sign is -1)
        c = lin[2] if lin[1] == 1 else -lin[2]
        n = {"lt": -c, "le": -c + 1}.get(op)
        if n is not None and n >= 0 and isinstance(rewrite(y, leaf), Causal):
            return PrefixLM(n)
    return None


def _combine(e: BinOp, leaf: Leaf, make: Callable[..., Pattern]) -> Pattern | None:
    """``a & b`` / ``a | b`` of booleans: the combinator over the parts, an unrecognised part
    as a traced leaf; None when neither part is recognised."""
    pa, pb = rewrite(e.a, leaf), rewrite(e.b, leaf)
    if pa is None and pb is None:
        return None
    return make(pa if pa is not None else leaf(e.a), pb if pb is not None else leaf(e.b))


def _negate(e: UnOp, leaf: Leaf) -> Pattern | None:
    p = rewrite(e.a, leaf)
    return None if p is None else ~p


_BOOL_BIN = lambda e, op: isinstance(e, BinOp) and e.op == op and e.a.kind == BOOL and e.b.kind == BOOL  # noqa: E731
_CMP = lambda e, *ops: isinstance(e, BinOp) and e.op in ops and e.a.kind != BOOL and e.b.kind != BOOL  # noqa: E731

# (matches(node), rewrite(node, leaf) -> Pattern | None): the first rule giving a pattern wins.
RULES: tuple[tuple[Callable[[Expr], bool], Callable[[Expr, Leaf], Pattern | None]], ...] = (
    (lambda e: e == Const(True), lambda e, lf: Full()),                          # True -> full()
    (lambda e: e == Const(False), lambda e, lf: ~Full()),                        # False -> ~full()
    (lambda e: _BOOL_BIN(e, "or"), _prefix_lm),                                  # (k < n) | (k <= q) -> prefix_lm(n)
    (lambda e: _BOOL_BIN(e, "and"), lambda e, lf: _combine(e, lf, intersection)),  # a & b -> A & B
    (lambda e: _BOOL_BIN(e, "or"), lambda e, lf: _combine(e, lf, union)),        # a | b -> A | B
    (lambda e: isinstance(e, UnOp) and e.op == "invert" and e.kind == BOOL, _negate),  # ~a -> ~A
    (lambda e: _CMP(e, "le"), lambda e, lf: _block_window(e)),                   # |q//n - k//n| <= w -> block_window
    (lambda e: _CMP(e, "lt", "le", "gt", "ge"), lambda e, lf: _compare_abs(e)),  # |q - k| <= w -> sliding_window(w)
    (lambda e: _CMP(e, *_FLIP), lambda e, lf: _compare_diff(e)),                 # k <= q, q - k < w, ... -> causal/windows
    (lambda e: _CMP(e, "eq"), lambda e, lf: _block_eq(e)),                       # q // n == k // n -> block_local(n)
    (lambda e: _CMP(e, "eq"), lambda e, lf: _strided(e)),                        # (q - k) % n == 0 -> strided(n)
    (lambda e: _CMP(e, "eq"), lambda e, lf: _documents(e)),                      # t[q] == t[k], t sorted -> document
    (lambda e: _CMP(e, "ne"), lambda e, lf: _negate(UnOp("invert", BinOp("eq", e.a, e.b)), lf)),  # a != b -> ~(a == b)
)


def rewrite(e: Expr, leaf: Leaf) -> Pattern | None:
    """The DSL pattern equal to boolean expression ``e``, or None when no rule recognises any
    part of it. ``leaf(x)`` makes the traced pattern of an unrecognised boolean subtree ``x``
    (the caller's ``Mask``: this module sits below :mod:`.mask_mod`)."""
    if e.variables() & {"b", "h"}:
        return None  # per batch / head: recognised once specialized
    for matches, rule in RULES:
        if matches(e):
            p = rule(e, leaf)
            if p is not None:
                return p
    return None
