"""The pattern DSL: frozen, hashable nodes that say which query attends to which key.

Every mask pattern denotes a boolean relation over ``(b, h, q_idx, kv_idx)``. Primitives
(:mod:`attncompiler.dsl.primitives`) know their predicate as an
:class:`~attncompiler.ir.expr.Expr` (so it can be analyzed and rendered into kernels) and their
block structure analytically (see :mod:`attncompiler.layout.block_layout`); the combinators here, ``|``,
``&``, ``~`` and :func:`per_head`, compose both. ``repr(pattern)`` reads as the code that
builds it.

Families beyond masks (summaries, diffusion, memory slots) subclass :class:`Pattern` with a
different ``family`` and lower to other program stages.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..ir import expr as E
from ..errors import LayoutError, PatternError
from ..ir.expr import Expr


class Family:
    """Names of the pattern families (what the compiler lowers a pattern to)."""

    MASK = "mask"


class Pattern:
    """Base class of all attention patterns. Subclasses are frozen dataclasses."""

    family: str = Family.MASK

    # -- combinators -------------------------------------------------------------------------
    def __or__(self, other: Pattern) -> Pattern:
        return union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return intersection(self, other)

    def __invert__(self) -> Pattern:
        require_mask(self, "~")
        if isinstance(self, Complement):
            return self.part
        return Complement(self)

    def causal(self) -> Pattern:
        """This pattern restricted to keys at or before the query (``self & causal()``)."""
        return self & causal()

    def __bool__(self) -> bool:
        raise PatternError(
            f"the truth value of pattern {self!r} is ambiguous; combine patterns with | & ~, "
            "not with and/or/not"
        )

    # -- structure ---------------------------------------------------------------------------
    def children(self) -> tuple[Pattern, ...]:
        return ()

    @property
    def head_period(self) -> int | None:
        """Heads repeat with this period (1: head-independent; None: any head may differ)."""
        periods = [c.head_period for c in self.children()]
        if any(p is None for p in periods):
            return None
        return functools.reduce(math.lcm, periods, 1)

    @property
    def batch_dependent(self) -> bool:
        """Whether different batch entries may see different masks."""
        return any(c.batch_dependent for c in self.children())

    def specialize(self, b: int, h: int) -> Pattern:
        """The head- and batch-independent pattern that this one is for batch ``b``, head ``h``."""
        kids = self.children()
        if not kids:
            return self
        new = tuple(c.specialize(b, h) for c in kids)
        return self if new == kids else self._rebuild(new)

    def _rebuild(self, children: tuple[Pattern, ...]) -> Pattern:
        raise AssertionError(f"{type(self).__name__} has no children to rebuild")

    # -- semantics ---------------------------------------------------------------------------
    def predicate(self, q_len: int, kv_len: int) -> Expr | None:
        """The mask as an index expression at these lengths, or None if it is opaque."""
        return None

    def evaluate(self, b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
        """Evaluate the mask on broadcastable integer index tensors (bool result)."""
        e = self.predicate(q_len, kv_len)
        if e is None:
            raise AssertionError(f"{type(self).__name__} must override evaluate()")
        env = {"b": torch.as_tensor(b), "h": torch.as_tensor(h), "q_idx": q_idx, "kv_idx": kv_idx}
        out = e.evaluate(env)
        shape = broadcast_shape(q_idx.shape, kv_idx.shape)
        if out.shape != shape:  # e.g. a constant predicate (also keeps torch.compile's 0-d case simple)
            out = out.expand(shape)
        return out if out.dtype == torch.bool else out.bool()

    def validate(self, q_len: int, kv_len: int) -> None:
        """Raise if this pattern cannot be instantiated at these lengths."""
        for c in self.children():
            c.validate(q_len, kv_len)

    def to_dense(self, q_len: int, kv_len: int | None = None, *, b: int = 0, h: int = 0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """The mask as a dense bool tensor ``[q_len, kv_len]`` for batch ``b``, head ``h``."""
        require_mask(self, "to_dense")
        kv_len = q_len if kv_len is None else kv_len
        check_lengths(q_len, kv_len)
        self.validate(q_len, kv_len)
        _check_dense_size(q_len, kv_len, device)
        p = self.specialize(b, h)
        q = torch.arange(q_len, device=device).view(-1, 1)
        k = torch.arange(kv_len, device=device).view(1, -1)
        return p.evaluate(b, h, q, k, q_len, kv_len)

    def layout(self, q_len: int, kv_len: int | None = None, block_m: int = 64, block_n: int | None = None,
               *, batch: int = 1, heads: int = 1, q_start: int = 0):
        """The BCSR block layout of this pattern (cached). See :func:`attncompiler.layout.block_layout.build_layout`."""
        from ..layout.block_layout import build_layout  # late import: layouts build on patterns

        kv_len = q_len if kv_len is None else kv_len
        block_n = block_m if block_n is None else block_n
        return build_layout(self, q_len, kv_len, block_m, block_n, batch=batch, heads=heads, q_start=q_start)


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The broadcast of two shapes by plain arithmetic (``torch.broadcast_shapes`` imports sympy,
    over a second, on its first call)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = tuple(y if x == 1 else x for x, y in zip(a, b))
    if any(x != 1 and y != 1 and x != y for x, y in zip(a, b)):
        raise PatternError(f"index shapes {tuple(a)} and {tuple(b)} do not broadcast")
    return out


def require_mask(p: Pattern, what: str) -> None:
    """Raise :class:`PatternError` unless ``p`` is a mask-family pattern; ``what`` names the operation
    that needs one."""
    if p.family != Family.MASK:
        raise PatternError(
            f"{what} needs a mask pattern, but {p!r} is a {p.family} pattern; "
            f"{p.family} patterns cannot be combined with masks this way"
        )


def check_lengths(q_len: int, kv_len: int) -> None:
    """Raise :class:`LayoutError` unless ``q_len`` and ``kv_len`` are positive integers (tokens)."""
    for name, v in (("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise LayoutError(f"{name}={v!r} must be a positive integer")


INT_LIMIT = 2**62
"""The largest integer parameter a pattern accepts: index arithmetic on positions and
parameters (``q + window``, ``block * count``) then stays inside int64."""


# A dense mask costs its bool result plus about one int64 temporary of the index arithmetic.
_DENSE_BYTES_PER_ELEMENT = 9


def _check_dense_size(q_len: int, kv_len: int, device) -> None:
    """Refuse a dense ``[q_len, kv_len]`` mask that cannot fit, before allocating it."""
    from .memory_limits import check_budget

    check_budget(f"to_dense({q_len}, {kv_len}) (a [{q_len}, {kv_len}] bool mask)",
                 int(q_len) * int(kv_len) * _DENSE_BYTES_PER_ELEMENT,
                 "use pattern.layout(q_len, kv_len, block_m) for the block structure (O(non-empty blocks)), "
                 "or evaluate a slice of rows with pattern.evaluate", device)


def check_int(name: str, value: Any, minimum: int, maximum: int = INT_LIMIT) -> int:
    """``value`` as an int in ``[minimum, maximum]``, else a :class:`PatternError` naming ``name``
    and the allowed range (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PatternError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise PatternError(f"{name}={value!r} must be >= {minimum}")
    if value > maximum:
        bound = "2**62 (index arithmetic must fit in int64)" if maximum == INT_LIMIT else str(maximum)
        raise PatternError(f"{name}={value!r} is out of range: allowed {minimum} <= {name} <= {bound}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Combinators
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Union(Pattern):
    """Allowed where any part allows."""

    parts: tuple[Pattern, ...]

    def children(self):
        return self.parts

    def _rebuild(self, children):
        return union(*children)

    def predicate(self, q_len, kv_len):
        es = [p.predicate(q_len, kv_len) for p in self.parts]
        return None if any(e is None for e in es) else functools.reduce(lambda a, b: a | b, es)

    def evaluate(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if self.predicate(q_len, kv_len) is not None:
            return super().evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        out = self.parts[0].evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        for p in self.parts[1:]:
            out = out | p.evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        return out

    def __repr__(self) -> str:
        return " | ".join(_wrap(p, 1) for p in self.parts)


@dataclass(frozen=True)
class Intersection(Pattern):
    """Allowed where every part allows."""

    parts: tuple[Pattern, ...]

    def children(self):
        return self.parts

    def _rebuild(self, children):
        return intersection(*children)

    def predicate(self, q_len, kv_len):
        es = [p.predicate(q_len, kv_len) for p in self.parts]
        return None if any(e is None for e in es) else functools.reduce(lambda a, b: a & b, es)

    def evaluate(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if self.predicate(q_len, kv_len) is not None:
            return super().evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        out = self.parts[0].evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        for p in self.parts[1:]:
            out = out & p.evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        return out

    def __repr__(self) -> str:
        return " & ".join(_wrap(p, 2) for p in self.parts)


@dataclass(frozen=True)
class Complement(Pattern):
    """Allowed exactly where ``part`` is not."""

    part: Pattern

    def children(self):
        return (self.part,)

    def _rebuild(self, children):
        return ~children[0]

    def predicate(self, q_len, kv_len):
        e = self.part.predicate(q_len, kv_len)
        return None if e is None else ~e

    def evaluate(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return ~self.part.evaluate(b, h, q_idx, kv_idx, q_len, kv_len)

    def __repr__(self) -> str:
        return f"~{_wrap(self.part, 3)}"


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``h`` uses ``patterns[h % len(patterns)]`` (e.g. Sparse Transformer's two heads)."""

    patterns: tuple[Pattern, ...]

    def children(self):
        return self.patterns

    @property
    def head_period(self):
        inner = super().head_period
        return None if inner is None else math.lcm(inner, len(self.patterns))

    def specialize(self, b, h):
        return self.patterns[h % len(self.patterns)].specialize(b, h)

    def predicate(self, q_len, kv_len):
        parts = [p.predicate(q_len, kv_len) for p in self.patterns]
        if any(e is None for e in parts):
            return None
        n, out = len(parts), parts[-1]
        for i in range(n - 2, -1, -1):  # select the head's predicate with h % n
            out = E.where((E.H % n).eq(i), parts[i], out)
        return out

    def _rebuild(self, children):
        return PerHead(children)

    def evaluate(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return self.specialize(int(b), int(h)).evaluate(b, h, q_idx, kv_idx, q_len, kv_len)

    def __repr__(self) -> str:
        return f"ac.per_head([{', '.join(map(repr, self.patterns))}])"


def _wrap(p: Pattern, prec: int) -> str:
    mine = {Union: 1, Intersection: 2}.get(type(p), 4)
    return f"({p!r})" if mine < prec else repr(p)


def short_list(xs: Sequence[int]) -> str:
    """Compact repr of an int sequence: ``range(a, b)`` for a long consecutive run, else the list."""
    xs = list(xs)
    n = len(xs)
    if n > 8 and xs == list(range(xs[0], xs[0] + n)):
        return f"range({xs[0]}, {xs[0] + n})" if xs[0] else f"range({n})"
    return repr(xs)


# ---------------------------------------------------------------------------------------------
# Combinator constructors
# ---------------------------------------------------------------------------------------------

def per_head(patterns: Sequence[Pattern]) -> Pattern:
    """A different pattern per head: head ``h`` uses ``patterns[h % len(patterns)]``."""
    ps = tuple(patterns)
    if not ps:
        raise PatternError("per_head([]) needs at least one pattern")
    for p in ps:
        if not isinstance(p, Pattern):
            raise PatternError(f"per_head expects patterns, got {p!r}")
        require_mask(p, "per_head")
    return ps[0] if len(ps) == 1 else PerHead(ps)


def union(*parts: Pattern) -> Pattern:
    """The union of mask patterns (``a | b``)."""
    return _combine(Union, parts, "|")


def intersection(*parts: Pattern) -> Pattern:
    """The intersection of mask patterns (``a & b``)."""
    return _combine(Intersection, parts, "&")


def _combine(cls, parts, sym) -> Pattern:
    if not parts:
        raise PatternError(f"{cls.__name__.lower()}() of no patterns is empty; pass at least one pattern")
    flat: list[Pattern] = []
    for p in parts:
        if not isinstance(p, Pattern):
            raise PatternError(f"cannot combine a pattern with {type(p).__name__} {p!r} using {sym}")
        require_mask(p, sym)
        for q in (p.parts if isinstance(p, cls) else (p,)):
            if q not in flat:
                flat.append(q)
    return flat[0] if len(flat) == 1 else cls(tuple(flat))


# The causal mask sits with the base class: ``Pattern.causal()`` builds it.
@dataclass(frozen=True)
class Causal(Pattern):
    """Key ``k`` is visible to query ``q`` iff ``k <= q``."""

    def predicate(self, q_len, kv_len):
        return E.KV <= E.Q

    def __repr__(self) -> str:
        return "ac.causal()"


def causal() -> Pattern:
    """Causal attention: key ``k`` is visible to query ``q`` iff ``k <= q``."""
    return Causal()
