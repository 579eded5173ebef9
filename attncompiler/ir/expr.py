"""Index expressions: the small IR in which mask predicates are written.

An :class:`Expr` is a frozen, hashable tree over the four index variables of a FlexAttention
``mask_mod`` (``b``, ``h``, ``q_idx``, ``kv_idx``), integer/boolean constants and read-only
integer buffers. ``==`` between two ``Expr`` is *structural* (so expressions can be dict keys
and compared in tests); element-wise equality is spelled ``.eq()``. While a user's mask_mod is
traced, the variables are wrapped in :class:`Sym` proxies whose ``==`` is element-wise, so
``lambda b, h, q, k: q == k`` traces as written.

Integer division and modulo follow Python (floor) semantics everywhere: torch evaluation,
interval bounds and rendered kernels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import PatternError

from .bounds import interval_binop
from .ops import BINOPS, BOOL, INT, INT64_MAX, INT64_MIN, PY_BINOPS, SHIFTS, TORCH_BINOPS


class Expr:
    """Base class of index-expression nodes. Subclasses are frozen dataclasses."""

    kind: str = INT

    # -- construction through operators ---------------------------------------------------
    def __add__(self, o: Any) -> Expr: return binop("add", self, o)
    def __radd__(self, o: Any) -> Expr: return binop("add", o, self)
    def __sub__(self, o: Any) -> Expr: return binop("sub", self, o)
    def __rsub__(self, o: Any) -> Expr: return binop("sub", o, self)
    def __mul__(self, o: Any) -> Expr: return binop("mul", self, o)
    def __rmul__(self, o: Any) -> Expr: return binop("mul", o, self)
    def __floordiv__(self, o: Any) -> Expr: return binop("floordiv", self, o)
    def __rfloordiv__(self, o: Any) -> Expr: return binop("floordiv", o, self)
    def __mod__(self, o: Any) -> Expr: return binop("mod", self, o)
    def __rmod__(self, o: Any) -> Expr: return binop("mod", o, self)
    def __and__(self, o: Any) -> Expr: return binop("and", self, o)
    def __rand__(self, o: Any) -> Expr: return binop("and", o, self)
    def __or__(self, o: Any) -> Expr: return binop("or", self, o)
    def __ror__(self, o: Any) -> Expr: return binop("or", o, self)
    def __xor__(self, o: Any) -> Expr: return binop("xor", self, o)
    def __rxor__(self, o: Any) -> Expr: return binop("xor", o, self)
    def __lshift__(self, o: Any) -> Expr: return binop("lshift", self, o)
    def __rlshift__(self, o: Any) -> Expr: return binop("lshift", o, self)
    def __rshift__(self, o: Any) -> Expr: return binop("rshift", self, o)
    def __rrshift__(self, o: Any) -> Expr: return binop("rshift", o, self)
    def __lt__(self, o: Any) -> Expr: return binop("lt", self, o)
    def __le__(self, o: Any) -> Expr: return binop("le", self, o)
    def __gt__(self, o: Any) -> Expr: return binop("gt", self, o)
    def __ge__(self, o: Any) -> Expr: return binop("ge", self, o)
    def __neg__(self) -> Expr: return binop("sub", 0, self)
    def __invert__(self) -> Expr: return unop("invert", self)
    def __abs__(self) -> Expr: return unop("abs", self)

    def eq(self, o: Any) -> Expr:
        """Element-wise equality (``==`` on ``Expr`` is structural)."""
        return binop("eq", self, o)

    def ne(self, o: Any) -> Expr:
        """Element-wise inequality."""
        return binop("ne", self, o)

    def __bool__(self) -> bool:
        raise PatternError(
            f"the truth value of index expression {self!r} is unknown until it is evaluated; "
            "combine conditions with & | ~ (not and/or/not) and use where(c, a, b) instead of if"
        )

    # -- queries ---------------------------------------------------------------------------
    def children(self) -> tuple[Expr, ...]:
        return ()

    def variables(self) -> frozenset[str]:
        """Names of the index variables this expression reads."""
        out: set[str] = set()
        for node in self.walk():
            if isinstance(node, Var):
                out.add(node.name)
        return frozenset(out)

    def constant(self):
        """The value of a constant node, None for every other node."""
        return None

    def buffers(self) -> tuple[Buffer, ...]:
        """Distinct buffers read by this expression, in first-use order."""
        seen: dict[Buffer, None] = {}
        for node in self.walk():
            if isinstance(getattr(node, "buffer", None), Buffer):  # Load and Index nodes
                seen.setdefault(node.buffer, None)
        return tuple(seen)

    def walk(self):
        """Pre-order traversal of the tree."""
        yield self
        for c in self.children():
            yield from c.walk()

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, env: Mapping[str, Any]) -> torch.Tensor:
        """Evaluate on (broadcastable) integer tensors bound to the variable names."""
        raise NotImplementedError  # every concrete node overrides this

    def bounds(self, env: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Interval bounds over boxes of variable values (numpy, broadcastable).

        For boolean expressions the bounds are 0/1: ``lo == 1`` means surely true and
        ``hi == 0`` surely false over the whole box. Bounds are conservative, never wrong.
        """
        raise NotImplementedError  # every concrete node overrides this

    def precedence(self) -> int:
        return 10


@dataclass(frozen=True, eq=True, repr=False)
class Var(Expr):
    """One of the index variables ``b``, ``h``, ``q_idx``, ``kv_idx``."""

    name: str

    def evaluate(self, env):
        x = torch.as_tensor(env[self.name])
        # Index arithmetic is int64 (torch's default, FlexAttention's semantics) even when the
        # caller hands int32 positions.
        return x if x.dtype in (torch.int64, torch.bool) else x.to(torch.int64)

    def bounds(self, env):
        return env[self.name]

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False, repr=False)
class Const(Expr):
    """An integer or boolean constant (``Const(True)`` and ``Const(1)`` are different)."""

    value: int | bool

    def constant(self):
        return self.value

    def __post_init__(self):
        v = self.value
        if not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX:
            raise PatternError(
                f"index constant {v} does not fit in int64 [{INT64_MIN}, {INT64_MAX}]; index arithmetic "
                "is int64, as in torch and FlexAttention: use a smaller constant"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Const) and type(other.value) is type(self.value) and other.value == self.value

    def __hash__(self) -> int:
        return hash((type(self.value).__name__, self.value))

    @property
    def kind(self) -> str:  # type: ignore[override]
        return BOOL if isinstance(self.value, bool) else INT

    def evaluate(self, env):
        return torch.tensor(self.value)

    def bounds(self, env):
        v = np.int64(int(self.value))
        return v, v

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True, eq=False, repr=False)
class Buffer:
    """A read-only 1-D integer table (e.g. document ids per position).

    Equality and hashing use a content digest, so two buffers with the same values are the
    same buffer and large tables are hashed once.
    """

    name: str
    data: np.ndarray = field(compare=False)
    digest: str = field(default="")
    # Per-instance device -> tensor cache: keyed by str, so FlexAttention's dynamo tracing of an
    # exported mask_mod can read it (hashing a Buffer there fails on its ndarray field).
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        arr = np.ascontiguousarray(np.asarray(self.data, dtype=np.int64))
        arr.setflags(write=False)
        object.__setattr__(self, "data", arr)
        object.__setattr__(self, "digest", hashlib.sha1(arr.tobytes()).hexdigest()[:16])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Buffer) and (self.name, self.digest) == (other.name, other.digest)

    def __hash__(self) -> int:
        return hash((self.name, self.digest))

    def __len__(self) -> int:
        return len(self.data)

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The table as an int64 tensor on ``device`` (cached)."""
        dev = str(device or "cpu")
        t = self._tensors.get(dev)
        if t is None:
            t = self._tensors[dev] = _buffer_tensor(self, dev)
        return t

    def __repr__(self) -> str:
        return f"{self.name}[{len(self.data)}]"


_BUFFER_TENSORS: dict[tuple[Buffer, str], torch.Tensor] = {}


def _buffer_tensor(buf: Buffer, device: str) -> torch.Tensor:
    key = (buf, device)
    t = _BUFFER_TENSORS.get(key)
    if t is None:
        t = torch.from_numpy(buf.data.copy()).to(device)
        _BUFFER_TENSORS[key] = t
    return t


@dataclass(frozen=True, eq=True, repr=False)
class Load(Expr):
    """``buffer[index]``; indices outside the table read ``fill``."""

    buffer: Buffer
    index: Expr
    fill: int = -1

    def children(self):
        return (self.index,)

    def evaluate(self, env):
        idx = self.index.evaluate(env)
        table = self.buffer.tensor(idx.device if isinstance(idx, torch.Tensor) else None)
        n = len(self.buffer)
        idx = torch.as_tensor(idx)
        inside = (idx >= 0) & (idx < n)
        vals = table[idx.clamp(0, max(n - 1, 0))] if n else torch.full_like(idx, self.fill)
        return torch.where(inside, vals, torch.full_like(vals, self.fill))

    def bounds(self, env):
        lo, hi = self.index.bounds(env)
        data = self.buffer.data
        if len(data) == 0:
            v = np.int64(self.fill)
            return v, v
        # Conservative: the table's global range, widened by the fill value when out of range.
        dlo, dhi = np.int64(data.min()), np.int64(data.max())
        outside = (np.asarray(lo) < 0) | (np.asarray(hi) >= len(data))
        return (np.where(outside, min(dlo, self.fill), dlo), np.where(outside, max(dhi, self.fill), dhi))

    def __repr__(self) -> str:
        return f"{self.buffer.name}[{self.index!r}]"


@dataclass(frozen=True, eq=True, repr=False)
class BinOp(Expr):
    """A binary operation; ``op`` is one of the names in ``BINOPS``."""

    op: str
    a: Expr
    b: Expr

    @property
    def kind(self) -> str:  # type: ignore[override]
        res = BINOPS[self.op][2]
        if res is not None:
            return res
        return BOOL if self.a.kind == BOOL and self.b.kind == BOOL else INT

    def children(self):
        return (self.a, self.b)

    def precedence(self) -> int:
        return BINOPS[self.op][1]

    def evaluate(self, env):
        x, y = self.a.evaluate(env), self.b.evaluate(env)
        return TORCH_BINOPS[self.op](x, y)

    def bounds(self, env):
        return interval_binop(self.op, self.a, self.b, env)

    def __repr__(self) -> str:
        sym, prec, _ = BINOPS[self.op]
        if self.op in ("min", "max"):  # Python's min() would call bool(): spell the IR function
            return f"ac.{'minimum' if self.op == 'min' else 'maximum'}({self.a!r}, {self.b!r})"
        left = _paren(self.a, prec, right=False)
        right = _paren(self.b, prec, right=True)
        return f"{left} {sym} {right}"


@dataclass(frozen=True, eq=True, repr=False)
class UnOp(Expr):
    """A unary operation: ``invert`` (logical/bitwise not) or ``abs``."""

    op: str
    a: Expr

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.a.kind if self.op == "invert" else INT

    def children(self):
        return (self.a,)

    def precedence(self) -> int:
        return 8 if self.op == "invert" else 10

    def evaluate(self, env):
        x = self.a.evaluate(env)
        return torch.abs(x) if self.op == "abs" else ~x

    def bounds(self, env):
        lo, hi = self.a.bounds(env)
        if self.op == "abs":
            alo, ahi = np.abs(lo), np.abs(hi)
            crosses = (lo <= 0) & (hi >= 0)
            return np.where(crosses, 0, np.minimum(alo, ahi)), np.maximum(alo, ahi)
        if self.a.kind == BOOL:
            return 1 - hi, 1 - lo
        return ~hi, ~lo  # bitwise not is decreasing: ~x = -x - 1

    def __repr__(self) -> str:
        if self.op == "abs":
            return f"abs({self.a!r})"
        return f"~{_paren(self.a, 8, right=True)}"


@dataclass(frozen=True, eq=True, repr=False)
class Where(Expr):
    """``where(cond, a, b)``: element-wise selection."""

    cond: Expr
    a: Expr
    b: Expr

    @property
    def kind(self) -> str:  # type: ignore[override]
        return BOOL if self.a.kind == BOOL and self.b.kind == BOOL else INT

    def children(self):
        return (self.cond, self.a, self.b)

    def evaluate(self, env):
        return torch.where(self.cond.evaluate(env).bool(), self.a.evaluate(env), self.b.evaluate(env))

    def bounds(self, env):
        clo, chi = self.cond.bounds(env)
        alo, ahi = self.a.bounds(env)
        blo, bhi = self.b.bounds(env)
        lo = np.where(clo == 1, alo, np.where(chi == 0, blo, np.minimum(alo, blo)))
        hi = np.where(clo == 1, ahi, np.where(chi == 0, bhi, np.maximum(ahi, bhi)))
        return lo, hi

    def __repr__(self) -> str:
        # ``ac.where`` so that a traced mask's repr evaluates back with only ``ac`` in scope.
        return f"ac.where({self.cond!r}, {self.a!r}, {self.b!r})"


# ---------------------------------------------------------------------------------------------
# Smart constructors (light constant folding so traced predicates stay small)
# ---------------------------------------------------------------------------------------------

def as_expr(x: Any) -> Expr:
    """Lift Python ints/bools, 0-d integer tensors and :class:`Sym` proxies to ``Expr``."""
    if isinstance(x, Expr):
        return x
    if isinstance(x, ExprProxy):
        return x.expr
    if isinstance(x, (bool, np.bool_)):
        return Const(bool(x))
    if isinstance(x, (int, np.integer)):
        return Const(int(x))
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        v = x.item()
        return Const(bool(v) if x.dtype == torch.bool else int(v))
    raise PatternError(
        f"cannot use {type(x).__name__} value {x!r} in an index expression; "
        "only integers, booleans and index expressions are allowed"
    )


def binop(op: str, a: Any, b: Any) -> Expr:
    """Build ``a <op> b`` as an index expression, folding constants and trivial identities and rejecting
    division by a constant zero and non-constant shifts."""
    a, b = as_expr(a), as_expr(b)
    if op in ("floordiv", "mod") and isinstance(b, Const) and b.value == 0:
        raise PatternError(f"division by zero in index expression {a!r} {BINOPS[op][0]} 0")
    if op in SHIFTS:
        if not isinstance(b, Const) or isinstance(b.value, bool) or a.kind == BOOL:
            raise PatternError(f"shift {a!r} {BINOPS[op][0]} {b!r}: index expressions shift integers by "
                               "constant counts only; compute a varying power of two with where()")
        if not 0 <= b.value <= 63:  # torch's int64 semantics: << gives 0, >> keeps only the sign
            return Const(0) if op == "lshift" else binop("rshift", a, 63)
    if isinstance(a, Const) and isinstance(b, Const):
        return as_expr(PY_BINOPS[op](a.value, b.value))
    if op == "add":
        if b == Const(0): return a
        if a == Const(0): return b
    if op == "sub" and b == Const(0):
        return a
    if op == "mul":
        if b == Const(1): return a
        if a == Const(1): return b
    if op == "and" and a.kind == BOOL and b.kind == BOOL:
        if a == Const(True): return b
        if b == Const(True): return a
        if Const(False) in (a, b): return Const(False)
    if op == "or" and a.kind == BOOL and b.kind == BOOL:
        if a == Const(False): return b
        if b == Const(False): return a
        if Const(True) in (a, b): return Const(True)
    return BinOp(op, a, b)


def unop(op: str, a: Any) -> Expr:
    """Build the unary ``op`` (``abs`` or ``invert``) of ``a``, folding constants and double inversion."""
    a = as_expr(a)
    if isinstance(a, Const):
        v = a.value
        return as_expr(abs(int(v)) if op == "abs" else ((not v) if isinstance(v, bool) else ~v))
    if op == "invert" and isinstance(a, UnOp) and a.op == "invert":
        return a.a
    return UnOp(op, a)


def where(cond: Any, a: Any, b: Any) -> Expr:
    """Element-wise ``cond ? a : b`` for index expressions (also accepts Sym proxies)."""
    c = as_expr(cond)
    if isinstance(c, Const):
        out = as_expr(a) if c.value else as_expr(b)
    else:
        out = Where(c, as_expr(a), as_expr(b))
    # Inside a traced mask_mod the result must stay a proxy: a bare Expr would make a later
    # ``== 0`` structural (a Python bool) and silently trace the wrong predicate.
    return _rewrap(out, cond, a, b)


def minimum(a: Any, b: Any) -> Expr:
    """Element-wise minimum of two integer expressions (a proxy inside a traced mask_mod)."""
    out = binop("min", a, b)
    return _rewrap(out, a, b)


def maximum(a: Any, b: Any) -> Expr:
    """Element-wise maximum of two integer expressions (a proxy inside a traced mask_mod)."""
    out = binop("max", a, b)
    return _rewrap(out, a, b)


B, H, Q, KV = Var("b"), Var("h"), Var("q_idx"), Var("kv_idx")
INDEX_VARS = (B, H, Q, KV)


def _paren(e: Expr, prec: int, right: bool) -> str:
    p = e.precedence()
    # Comparisons chain in Python (a < b == c), so a comparison operand is always wrapped.
    if p < prec or (p == prec == 1) or (right and p == prec and p < 9):
        return f"({e!r})"
    return repr(e)


class ExprProxy:
    """Base of proxies that stand for an :class:`Expr` while a mask_mod is traced (``trace.Sym``):
    :func:`as_expr` unwraps them, and :func:`where`, :func:`minimum`, :func:`maximum` return a
    proxy of the same type when one of their arguments is one."""

    __slots__ = ("expr",)

    def __init__(self, expr: Expr):
        self.expr = expr


def _rewrap(out: Expr, *args: Any) -> Expr:
    # Inside a traced mask_mod the result must stay a proxy: a bare Expr would make a later
    # ``== 0`` structural (a Python bool) and silently trace the wrong predicate.
    for x in args:
        if isinstance(x, ExprProxy):
            return type(x)(out)
    return out
