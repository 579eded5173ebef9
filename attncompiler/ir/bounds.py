"""Interval bounds of binary index expressions (:meth:`attncompiler.ir.expr.Expr.bounds`).

Given ``(lo, hi)`` int64 arrays bounding each variable (``env``), an expression's bounds are
``(lo, hi)`` arrays of the same broadcast shape; booleans are ``0``/``1``. int64 arithmetic wraps
silently, so any bound that would leave ``[-2**62, 2**62]`` becomes the unknown interval rather
than a wrong "surely true/false".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ops import BOOL

_BIG = np.int64(2**62)  # bounds at or beyond +-_BIG mean "unknown"


def _saturate(fn, lo_args, hi_args):
    """``fn`` applied to the low and high ends, widened to unknown where int64 would overflow."""
    with np.errstate(over="ignore"):
        lo, hi = fn(*lo_args), fn(*hi_args)
    flo = fn(*(np.float64(x) for x in lo_args))
    fhi = fn(*(np.float64(x) for x in hi_args))
    return _unknown_where(lo, hi, flo, fhi)


def _unknown_where(lo, hi, flo, fhi):
    # int64 arithmetic wraps silently: a wrapped bound could claim "surely true/false" for a
    # predicate that is not, so any interval leaving [-_BIG, _BIG] (checked in float64)
    # becomes the unknown interval.
    bad = (flo < -_BIG) | (fhi > _BIG)
    if not np.any(bad):
        return lo, hi
    return np.where(bad, -_BIG, lo), np.where(bad, _BIG, hi)


def _bitwise_nonneg(op: str, alo, ahi, blo, bhi):
    """Bounds of ``& | ^`` on non-negative integers: ``a & b <= min(a, b)``, and ``a | b``,
    ``a ^ b`` stay below the next power of two above both."""
    if op == "and":
        lo = np.where((alo == ahi) & (blo == bhi), alo & blo, 0)
        return np.broadcast_arrays(lo, np.minimum(ahi, bhi))
    top = np.maximum(ahi, bhi)
    exp = np.minimum(np.ceil(np.log2(np.float64(top) + 1)).astype(np.int64), 62)
    ones = (np.int64(1) << exp) - 1
    exp = np.where(ones < top, exp + 1, exp)  # float rounding near a power of two
    hi = np.where(exp >= 62, _BIG, (np.int64(1) << np.minimum(exp, 61)) - 1)
    lo = np.maximum(alo, blo) if op == "or" else np.int64(0)
    return np.broadcast_arrays(lo, hi)


def interval_binop(op: str, ea: Any, eb: Any, env):
    """Bounds of ``ea op eb`` (``ea``, ``eb``: expression nodes) given variable bounds ``env``."""
    alo, ahi = ea.bounds(env)
    blo, bhi = eb.bounds(env)
    one, zero = np.int64(1), np.int64(0)
    match op:
        case "add":
            return _saturate(np.add, (alo, blo), (ahi, bhi))
        case "sub":
            return _saturate(np.subtract, (alo, bhi), (ahi, blo))
        case "mul":
            pairs = ((alo, blo), (alo, bhi), (ahi, blo), (ahi, bhi))
            with np.errstate(over="ignore"):
                cands = np.stack(np.broadcast_arrays(*(x * y for x, y in pairs)))
            exact = np.stack(np.broadcast_arrays(*(np.float64(x) * np.float64(y) for x, y in pairs)))
            return _unknown_where(cands.min(0), cands.max(0), exact.min(0), exact.max(0))
        case "min":
            return np.minimum(alo, blo), np.minimum(ahi, bhi)
        case "max":
            return np.maximum(alo, blo), np.maximum(ahi, bhi)
        case "floordiv" if (c := eb.constant()) is not None and c > 0:
            return alo // c, ahi // c
        case "floordiv" if (c := eb.constant()) is not None and c < 0:  # floor(a / c) falls as a grows
            return ahi // c, alo // c
        case "mod" if (c := eb.constant()) is not None and c > 0:
            m = c
            same = (alo // m) == (ahi // m)
            return np.where(same, alo % m, 0), np.where(same, ahi % m, m - 1)
        case "mod" if (c := eb.constant()) is not None and c < 0:  # Python: the sign of the divisor
            return np.broadcast_to(np.int64(c + 1), np.shape(alo)), np.broadcast_to(zero, np.shape(alo))
        case "floordiv" if np.all((blo > 0) | (bhi < 0)):  # a divisor that is never 0: |a // b| <= |a|
            m = np.maximum(np.abs(alo), np.abs(ahi))
            return -m, m
        case "mod" if np.all((blo > 0) | (bhi < 0)):  # |a % b| < |b|
            m = np.maximum(np.abs(blo), np.abs(bhi)) - 1
            return np.where(blo > 0, 0, -m), np.where(bhi < 0, 0, m)
        case "lt":
            return np.where(ahi < blo, one, zero), np.where(alo >= bhi, zero, one)
        case "le":
            return np.where(ahi <= blo, one, zero), np.where(alo > bhi, zero, one)
        case "gt":
            return interval_binop("lt", eb, ea, env)
        case "ge":
            return interval_binop("le", eb, ea, env)
        case "eq":
            sure = (alo == ahi) & (blo == bhi) & (alo == blo)
            never = (ahi < blo) | (bhi < alo)
            return np.where(sure, one, zero), np.where(never, zero, one)
        case "ne":
            lo, hi = interval_binop("eq", ea, eb, env)
            return 1 - hi, 1 - lo
        case "and" if ea.kind == BOOL and eb.kind == BOOL:
            return np.minimum(alo, blo), np.minimum(ahi, bhi)
        case "or" if ea.kind == BOOL and eb.kind == BOOL:
            return np.maximum(alo, blo), np.maximum(ahi, bhi)
        case "xor" if ea.kind == BOOL and eb.kind == BOOL:
            sure_a, sure_b = alo == ahi, blo == bhi
            fixed = sure_a & sure_b
            val = alo ^ blo
            return np.where(fixed, val, zero), np.where(fixed, val, one)
        case "lshift" if (c := eb.constant()) is not None and 0 <= c <= 61:  # x * 2**c, monotone
            return _saturate(lambda x: x * (2 ** int(c)), (alo,), (ahi,))
        case "rshift" if (c := eb.constant()) is not None and 0 <= c <= 63:  # floor(x / 2**c), monotone
            return alo >> int(c), ahi >> int(c)
        case "and" | "or" | "xor" if np.all(alo >= 0) and np.all(blo >= 0):
            return _bitwise_nonneg(op, alo, ahi, blo, bhi)
    # Bitwise ops on ints, division by a non-constant, ...: no useful bound.
    big = _BIG
    if ea.kind == BOOL and eb.kind == BOOL:
        return zero, one
    return np.broadcast_to(-big, np.broadcast(alo, blo).shape), np.broadcast_to(big, np.broadcast(alo, blo).shape)
