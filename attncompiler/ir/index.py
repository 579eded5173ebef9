"""Indexing captured integer tensors inside traced predicates, with torch's rules.

``docs[b, q_idx]`` in a traced ``mask_mod`` becomes an :class:`Index` node: the tensor's values
(row-major, in a :class:`~attncompiler.ir.expr.Buffer`), its shape and one index expression per
dimension. As in torch, a negative index counts from the end once (``-1`` is the last entry) and
an index outside ``[-n, n)`` is an error, never a silently read fill value. Ranges are checked
statically from interval bounds where possible (:func:`check_index_ranges`, when a layout is
built), on the actual values whenever the node is evaluated, and constant indices (``b`` and
``h`` once a pattern is specialized to one batch entry and head) when the node is built.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import PatternError
from .expr import BinOp, Buffer, Const, Expr, Load, Var, as_expr, binop, where


@dataclass(frozen=True, eq=True, repr=False)
class Index(Expr):
    """``table[i0, i1, ...]`` of a captured integer tensor of ``shape`` (torch's indexing rules)."""

    buffer: Buffer  # the table's values, flattened row-major
    shape: tuple[int, ...]
    indices: tuple[Expr, ...]

    def children(self):
        return self.indices

    def evaluate(self, env):
        flat: torch.Tensor | int = 0
        for d, (e, n) in enumerate(zip(self.indices, self.shape)):
            i = torch.as_tensor(e.evaluate(env))
            if i.numel():
                lo, hi = int(i.min()), int(i.max())
                if lo < -n or hi >= n:
                    raise _out_of_range(self, d, lo, hi)
            flat = flat * n + torch.where(i < 0, i + n, i)
        flat = torch.as_tensor(flat)
        return self.buffer.tensor(flat.device)[flat]

    def bounds(self, env):
        sub = self.buffer.data.reshape(self.shape)
        for e in self.indices:
            if not isinstance(e, Const):
                break
            sub = sub[e.value]
        if sub.size == 0:  # only reachable through an index error, which evaluation raises
            return np.int64(0), np.int64(0)
        # The values of the sub-table the constant leading indices select (an index out of
        # range is an error wherever it is evaluated, so it never needs a bound of its own).
        lo, hi = np.int64(sub.min()), np.int64(sub.max())
        shape = np.broadcast_shapes(*(np.shape(x) for e in self.indices for x in e.bounds(env)))
        return np.broadcast_to(lo, shape), np.broadcast_to(hi, shape)

    def flat_index(self) -> Expr:
        """The row-major position this node reads, negatives wrapped (ranges already checked)."""
        flat: Expr = Const(0)
        for e, n in zip(self.indices, self.shape):
            wrapped = e if _surely_nonneg(e) else where(e < 0, e + n, e)
            flat = binop("add", binop("mul", flat, n), wrapped)
        return flat

    def lowered(self) -> Load:
        """The same read as a :class:`Load` of the flat position (what kernels render)."""
        return Load(self.buffer, self.flat_index(), 0)

    def __repr__(self) -> str:
        return f"{self.buffer.name}[{', '.join(repr(i) for i in self.indices)}]"


def _surely_nonneg(e: Expr) -> bool:
    lo, _ = e.bounds(_NONNEG_ENV)
    return bool(np.all(np.asarray(lo) >= 0))


# Index variables are never negative; this box only asks "can it be < 0?".
_NONNEG_ENV = {n: (np.int64(0), np.int64(2**31 - 1)) for n in ("b", "h", "q_idx", "kv_idx")}


def _out_of_range(node: Index, dim: int, lo: int, hi: int) -> PatternError:
    n = node.shape[dim]
    return PatternError(
        f"mask_mod indexes {node!r}, a tensor of shape {tuple(node.shape)}, with {node.indices[dim]!r} "
        f"in dimension {dim} taking values in [{lo}, {hi}], outside [{-n}, {n - 1}]; torch raises "
        "IndexError there too. Make the tensor cover every position, batch entry and head the "
        "pattern is used with, or clamp the index"
    )


def index(buffer: Buffer, shape: tuple[int, ...], indices: tuple[Expr, ...]) -> Expr:
    """``buffer.reshape(shape)[indices]``: checks constant indices now and folds a constant read."""
    if len(indices) != len(shape) or math.prod(shape) != len(buffer):
        raise AssertionError(f"index({buffer!r}, {shape}, {indices}) is malformed")
    node = Index(buffer, tuple(int(n) for n in shape), tuple(as_expr(i) for i in indices))
    for d, (e, n) in enumerate(zip(node.indices, node.shape)):
        if isinstance(e, Const) and not -n <= e.value < n:
            raise _out_of_range(node, d, int(e.value), int(e.value))
    if all(isinstance(e, Const) for e in node.indices):
        flat = np.ravel_multi_index(tuple(int(e.value) % n for e, n in zip(node.indices, node.shape)), node.shape)
        return Const(int(buffer.data[flat]))
    return node


def _index_nodes(e: Expr) -> Iterator[Index]:
    for node in e.walk():
        if isinstance(node, Index):
            yield node


def check_index_ranges(e: Expr, q_len: int, kv_len: int) -> None:
    """Raise :class:`PatternError` if an index of ``e`` leaves its tensor at these lengths.

    Indices that read ``b`` or ``h`` are checked when the pattern is specialized to each batch
    entry and head (and on evaluation); the others over every ``q_idx < q_len``,
    ``kv_idx < kv_len``: by interval bounds when those prove the range, else exactly.
    """
    for node in _index_nodes(e):
        for d, (ie, n) in enumerate(zip(node.indices, node.shape)):
            names = ie.variables()
            if names & {"b", "h"} or not names:
                continue
            lo, hi = _index_range(ie, q_len, kv_len)
            if lo < -n or hi >= n:
                raise _out_of_range(node, d, lo, hi)


@functools.lru_cache(maxsize=256)
def _index_range(e: Expr, q_len: int, kv_len: int) -> tuple[int, int]:
    """Exact ``(min, max)`` of ``e`` over the positions (from bounds where those are exact)."""
    box = {"q_idx": (np.int64(0), np.int64(q_len - 1)), "kv_idx": (np.int64(0), np.int64(kv_len - 1))}
    blo, bhi = (int(np.min(x)) if i == 0 else int(np.max(x)) for i, x in enumerate(e.bounds(box)))
    if _bounds_exact(e):
        return blo, bhi
    q = torch.arange(q_len)
    if "kv_idx" not in e.variables():
        return _minmax(e.evaluate({"q_idx": q}))
    k = torch.arange(kv_len)
    if "q_idx" not in e.variables():
        return _minmax(e.evaluate({"kv_idx": k}))
    lo, hi = None, None
    rows = max(1, (1 << 22) // max(kv_len, 1))
    for start in range(0, q_len, rows):
        a, b = _minmax(e.evaluate({"q_idx": q[start:start + rows, None], "kv_idx": k[None, :]}))
        lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return lo, hi


def _minmax(t: torch.Tensor) -> tuple[int, int]:
    return int(t.min()), int(t.max())


def _bounds_exact(e: Expr) -> bool:
    """Whether interval bounds are exact for ``e``: sums/differences of distinct variables and
    constants, scaled by constants (every variable used once, monotone operations)."""
    seen: set[str] = set()

    def ok(x: Expr) -> bool:
        match x:
            case Var(name):
                if name in seen:
                    return False
                seen.add(name)
                return True
            case Const():
                return True
            case BinOp(op="add" | "sub", a=a, b=b):
                return ok(a) and ok(b)
            case BinOp(op="mul", a=Const(), b=b):
                return ok(b)
            case BinOp(op="mul" | "floordiv", a=a, b=Const(value=c)) if x.op == "mul" or c > 0:
                return ok(a)
        return False

    return ok(e)
