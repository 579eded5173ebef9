"""Shift invariance of mask predicates: ``p(q + P, k + P) == p(q, k)``.

Windows, strided, causal and block-local masks (and their combinations) are invariant under a
common shift of both positions, so whole blocks with the same offset ``q_lo - k_lo`` (and the
same ``q_lo mod P``) have identical masks: layouts and analyses evaluate one block per class
instead of every block (the lower triangle of a strided or log-sparse mask is O((L/B)^2)
blocks but only O(L/B) classes).
"""

from __future__ import annotations

import numpy as np

from ..dsl.mask_mod import Mask
from ..dsl.pattern import Causal, Complement, Intersection, Pattern, Union
from ..dsl.primitives import BlockLocal, BlockWindow, DilatedWindow, Full, SlidingWindow, Strided
from ..ir.expr import BinOp, Var


def shift_period(p: Pattern, q_len: int, kv_len: int) -> int | None:
    """A period ``P`` with ``p(q + P, k + P) == p(q, k)`` for every pair inside the lengths (1:
    any shift, i.e. a function of ``q - k``), or None when none is known. Exact types only, as
    in :func:`attncompiler.layout.block_sets.cell_size`: a subclass may change the predicate."""
    t = type(p)
    if t in (Full, Causal, SlidingWindow, DilatedWindow, Strided):
        return 1
    if t in (BlockLocal, BlockWindow):
        return int(p.block)
    if t in (Union, Intersection, Complement):
        periods = [shift_period(c, q_len, kv_len) for c in p.children()]
        return None if None in periods else int(np.lcm.reduce(np.array(periods, dtype=np.int64)))
    if t is Mask:
        return 1 if depends_on_difference(p.predicate(q_len, kv_len)) else None
    return None


def depends_on_difference(e) -> bool:
    """Whether the traced predicate ``e`` reads ``q_idx`` and ``kv_idx`` only as a pair
    combined by one binary operation (``q_idx - kv_idx``, ``kv_idx <= q_idx``, ...), i.e. it is
    a function of ``q - k`` (and of the other variables). None (opaque) gives False."""
    if e is None:
        return False
    pos = {"q_idx", "kv_idx"}
    if isinstance(e, Var):
        return e.name not in pos
    for node in e.walk():  # every occurrence of a position must sit in a (q_idx, kv_idx) pair
        kids = node.children()
        if not any(isinstance(c, Var) and c.name in pos for c in kids):
            continue
        pair = isinstance(node, BinOp) and node.op in _DIFFERENCE_OPS and all(isinstance(c, Var) for c in kids) \
            and {c.name for c in kids} == pos
        if not pair:
            return False
    return True


# Binary operations of (q_idx, kv_idx) that are functions of q_idx - kv_idx.
_DIFFERENCE_OPS = frozenset({"sub", "lt", "le", "gt", "ge", "eq", "ne"})


def shift_classes(period: int, q_lo: np.ndarray, q_size: np.ndarray, k_lo: np.ndarray,
                  k_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: blocks ``[q_lo, q_lo + q_size) x [k_lo, k_lo + k_size)`` grouped into
    classes of identical masks under a predicate of shift period ``period``; ``first`` indexes one
    representative per class and ``inverse`` maps every block to its class."""
    keys = np.stack([q_lo - k_lo, q_lo % period, q_size, k_size], axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)
