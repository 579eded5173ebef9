"""Score expressions: the float half of the IR, in which a traced ``score_mod`` is written.

An :class:`FExpr` is a frozen, hashable tree over the score (:class:`Score`), float constants,
integer index expressions converted to float (:class:`IntToFloat` of an :class:`Expr`), reads of
captured float tensors at integer indices (:class:`FLoad`: the tensor is a runtime argument, by
slot, never baked in, since learned tables change every step), arithmetic, ``exp``, ``log``,
``tanh``, ``sigmoid``, ``abs``, ``sqrt``, ``log1p``, ``minimum``/``maximum``, comparisons and
``where``. Each node evaluates on tensors (:meth:`FExpr.evaluate`) and has a symbolic derivative
with respect to the score (:meth:`FExpr.derivative`), which a kernel's backward needs.

:class:`FSym` is the proxy a score_mod sees for ``score`` while it is traced (see
:func:`attncompiler.ir.score_trace.trace_score_mod`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .expr import Expr, ExprProxy

FLOAT, FBOOL = "float", "bool"

UNARY: dict[str, Callable] = {"neg": torch.neg, "exp": torch.exp, "log": torch.log, "tanh": torch.tanh,
                              "sigmoid": torch.sigmoid, "abs": torch.abs, "sqrt": torch.sqrt, "log1p": torch.log1p}
BINARY: dict[str, Callable] = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
                               "min": torch.minimum, "max": torch.maximum}
COMPARE: dict[str, Callable] = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq,
                                "ne": torch.ne, "and": torch.logical_and, "or": torch.logical_or}


class FExpr:
    """Base of score-expression nodes (frozen dataclasses, structural equality)."""

    kind = FLOAT

    def children(self) -> tuple:
        return ()

    def evaluate(self, score: torch.Tensor, env: dict, tensors: tuple) -> torch.Tensor:
        """The value on tensors: ``score``, index tensors ``env`` (``b``, ``h``, ``q_idx``,
        ``kv_idx``, broadcastable), captured ``tensors`` by slot."""
        raise NotImplementedError  # every concrete node overrides this

    def derivative(self) -> FExpr:
        """``d self / d score`` as an expression."""
        raise NotImplementedError  # every concrete node overrides this

    def walk(self):
        yield self
        for c in self.children():
            if isinstance(c, FExpr):
                yield from c.walk()

    def uses_score(self) -> bool:
        return any(isinstance(n, Score) for n in self.walk())


@dataclass(frozen=True)
class Score(FExpr):
    """The scaled score ``q . k * scale`` of the edge."""

    def evaluate(self, score, env, tensors):
        return score

    def derivative(self):
        return ONE

    def __repr__(self) -> str:
        return "score"


@dataclass(frozen=True)
class FConst(FExpr):
    value: float

    def evaluate(self, score, env, tensors):
        return torch.tensor(self.value, dtype=score.dtype, device=score.device)

    def derivative(self):
        return ZERO

    def __repr__(self) -> str:
        return repr(self.value)


ZERO, ONE = FConst(0.0), FConst(1.0)


@dataclass(frozen=True)
class IntToFloat(FExpr):
    """An integer index expression as a float (``(kv_idx - q_idx).float()``)."""

    e: Expr

    def evaluate(self, score, env, tensors):
        return self.e.evaluate(env).to(score.dtype)

    def derivative(self):
        return ZERO

    def __repr__(self) -> str:
        return f"float({self.e!r})"


@dataclass(frozen=True)
class FLoad(FExpr):
    """``tensors[slot][index]``: a captured float tensor read at integer index expressions."""

    slot: int
    shape: tuple[int, ...]
    index: tuple[Expr, ...]

    def children(self):
        return self.index

    def evaluate(self, score, env, tensors):
        t = tensors[self.slot]
        return t[tuple(e.evaluate(env) for e in self.index)].to(score.dtype) if self.index else t.to(score.dtype)

    def derivative(self):
        return ZERO

    def __repr__(self) -> str:
        return f"t{self.slot}[{', '.join(map(repr, self.index))}]"


@dataclass(frozen=True)
class FUn(FExpr):
    op: str
    x: FExpr

    def children(self):
        return (self.x,)

    def evaluate(self, score, env, tensors):
        return UNARY[self.op](self.x.evaluate(score, env, tensors))

    def derivative(self):
        dx, x = self.x.derivative(), self.x
        if dx == ZERO:
            return ZERO
        local = {"neg": lambda: FConst(-1.0), "exp": lambda: self, "log": lambda: fbin("div", ONE, x),
                 "tanh": lambda: fbin("sub", ONE, fbin("mul", self, self)),
                 "sigmoid": lambda: fbin("mul", self, fbin("sub", ONE, self)),
                 "abs": lambda: fwhere(FCmp("ge", x, ZERO), ONE, FConst(-1.0)),
                 "sqrt": lambda: fbin("div", FConst(0.5), self),
                 "log1p": lambda: fbin("div", ONE, fbin("add", ONE, x))}[self.op]()
        return fbin("mul", local, dx)

    def __repr__(self) -> str:
        return f"-({self.x!r})" if self.op == "neg" else f"{self.op}({self.x!r})"


@dataclass(frozen=True)
class FBin(FExpr):
    op: str
    a: FExpr
    b: FExpr

    def children(self):
        return (self.a, self.b)

    def evaluate(self, score, env, tensors):
        return BINARY[self.op](self.a.evaluate(score, env, tensors), self.b.evaluate(score, env, tensors))

    def derivative(self):
        a, b, da, db = self.a, self.b, self.a.derivative(), self.b.derivative()
        if self.op in ("add", "sub"):
            return fbin(self.op, da, db)
        if self.op == "mul":
            return fbin("add", fbin("mul", da, b), fbin("mul", a, db))
        if self.op == "div":
            return fbin("div", fbin("sub", fbin("mul", da, b), fbin("mul", a, db)), fbin("mul", b, b))
        return fwhere(FCmp("le" if self.op == "min" else "ge", a, b), da, db)  # the branch torch's grad takes

    def __repr__(self) -> str:
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}.get(self.op)
        return f"({self.a!r} {sym} {self.b!r})" if sym else f"{self.op}({self.a!r}, {self.b!r})"


@dataclass(frozen=True)
class FCmp(FExpr):
    """A boolean: a comparison of two score expressions, or ``and``/``or`` of two booleans."""

    op: str
    a: FExpr
    b: FExpr
    kind = FBOOL

    def children(self):
        return (self.a, self.b)

    def evaluate(self, score, env, tensors):
        return COMPARE[self.op](self.a.evaluate(score, env, tensors), self.b.evaluate(score, env, tensors))

    def __repr__(self) -> str:
        return f"({self.a!r} {self.op} {self.b!r})"


@dataclass(frozen=True)
class IntCond(FExpr):
    """A boolean integer index expression used as a condition (``q_idx >= kv_idx``)."""

    e: Expr
    kind = FBOOL

    def evaluate(self, score, env, tensors):
        return self.e.evaluate(env).to(torch.bool)

    def __repr__(self) -> str:
        return repr(self.e)


@dataclass(frozen=True)
class FWhere(FExpr):
    c: FExpr
    a: FExpr
    b: FExpr

    def children(self):
        return (self.c, self.a, self.b)

    def evaluate(self, score, env, tensors):
        return torch.where(self.c.evaluate(score, env, tensors), self.a.evaluate(score, env, tensors),
                           self.b.evaluate(score, env, tensors))

    def derivative(self):
        return fwhere(self.c, self.a.derivative(), self.b.derivative())

    def __repr__(self) -> str:
        return f"where({self.c!r}, {self.a!r}, {self.b!r})"


def fbin(op: str, a: FExpr, b: FExpr) -> FExpr:
    """A binary node, folding constants and the identities the derivative rules produce."""
    ca, cb = (x.value if isinstance(x, FConst) else None for x in (a, b))
    if ca is not None and cb is not None and not (op == "div" and cb == 0):
        return FConst(float(BINARY[op](torch.tensor(ca, dtype=torch.float64), torch.tensor(cb, dtype=torch.float64))))
    if op == "add" and ca == 0.0 or op == "mul" and ca == 1.0:
        return b
    if op in ("add", "sub") and cb == 0.0 or op in ("mul", "div") and cb == 1.0:
        return a
    if op == "mul" and (ca == 0.0 or cb == 0.0):
        return ZERO  # scores are finite where this is used (derivative terms)
    if op == "sub" and ca == 0.0:
        return FUn("neg", b)
    return FBin(op, a, b)


def fwhere(c: FExpr, a: FExpr, b: FExpr) -> FExpr:
    """``where(c, a, b)``, folded when both branches are the same."""
    return a if a == b else FWhere(c, a, b)


class FSym:
    """Proxy for a float value while a score_mod is traced: operators and the torch functions of
    :data:`attncompiler.ir.score_trace.FLOAT_HANDLERS` build an :class:`FExpr`."""

    __slots__ = ("fexpr",)

    def __init__(self, fexpr: FExpr):
        self.fexpr = fexpr

    def _op(op, swap=False):  # noqa: N805 - helper evaluated at class creation
        def f(self, o):
            a, b = self.fexpr, as_fexpr(o)
            return FSym(fbin(op, b, a) if swap else fbin(op, a, b))
        return f

    __add__, __radd__ = _op("add"), _op("add", True)
    __sub__, __rsub__ = _op("sub"), _op("sub", True)
    __mul__, __rmul__ = _op("mul"), _op("mul", True)
    __truediv__, __rtruediv__ = _op("div"), _op("div", True)
    del _op

    def _cmp(op):  # noqa: N805
        def f(self, o):
            return FSym(FCmp(op, self.fexpr, as_fexpr(o)))
        return f

    __lt__, __le__, __gt__, __ge__ = _cmp("lt"), _cmp("le"), _cmp("gt"), _cmp("ge")
    __eq__, __ne__ = _cmp("eq"), _cmp("ne")  # type: ignore[assignment]
    __and__ = __rand__ = _cmp("and")
    __or__ = __ror__ = _cmp("or")
    del _cmp
    __hash__ = None  # type: ignore[assignment]

    def __neg__(self): return FSym(FUn("neg", self.fexpr))
    def __pos__(self): return self
    def __abs__(self): return FSym(FUn("abs", self.fexpr))

    def __bool__(self):
        raise TypeError("Python control flow on the traced score (use torch.where)")

    def float(self): return self
    def double(self): return self
    def to(self, *args, **kwargs):
        dtypes = [a for a in (*args, kwargs.get("dtype")) if isinstance(a, torch.dtype)]
        if any(not d.is_floating_point for d in dtypes):
            raise TypeError(f"a float -> {dtypes} conversion of the traced score")
        return self
    def tanh(self): return FSym(FUn("tanh", self.fexpr))
    def exp(self): return FSym(FUn("exp", self.fexpr))
    def log(self): return FSym(FUn("log", self.fexpr))
    def sigmoid(self): return FSym(FUn("sigmoid", self.fexpr))
    def abs(self): return FSym(FUn("abs", self.fexpr))
    def sqrt(self): return FSym(FUn("sqrt", self.fexpr))
    def log1p(self): return FSym(FUn("log1p", self.fexpr))
    def clamp(self, min=None, max=None): return FSym(clamp(self.fexpr, min, max))  # noqa: A002

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = FLOAT_HANDLERS.get(func)
        if handler is None:
            raise TypeError(f"torch function {getattr(func, '__name__', func)} is not traceable in a score_mod")
        return FSym(handler(*args, **(kwargs or {})))

    def __repr__(self) -> str:
        return f"FSym({self.fexpr!r})"


def as_fexpr(x: Any) -> FExpr:
    """``x`` (an :class:`FSym`, an index proxy, a Python number, a one-element constant tensor)
    as an :class:`FExpr`; anything else cannot be traced."""
    if isinstance(x, FSym):
        return x.fexpr
    if isinstance(x, FExpr):
        return x
    if isinstance(x, ExprProxy):
        e = x.expr
        return IntCond(e) if e.kind == "bool" else IntToFloat(e)
    if isinstance(x, Expr):
        return IntCond(x) if x.kind == "bool" else IntToFloat(x)
    if isinstance(x, bool):
        raise TypeError("a Python bool in a score expression")
    if isinstance(x, (int, float)):
        return FConst(float(x))
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() == 1 and SLOTS:
        return load_slot(x, ())  # a captured scalar (e.g. a learned temperature): read at run time
    raise TypeError(f"{type(x).__name__} in a score expression")


# Captured float tensors of the score_mod traces in progress (innermost last), by slot.
SLOTS: list[list[torch.Tensor]] = []


def load_slot(t: torch.Tensor, index: tuple[Expr, ...]) -> FLoad:
    """``t[index]`` as an :class:`FLoad`, ``t`` taking a slot of the trace in progress."""
    if not SLOTS:
        raise TypeError("a float tensor indexed by a traced index outside a score_mod trace")
    slots = SLOTS[-1]
    for i, u in enumerate(slots):
        if u is t:
            return FLoad(i, tuple(t.shape), index)
    slots.append(t)
    return FLoad(len(slots) - 1, tuple(t.shape), index)


def float_load(t: torch.Tensor, index: tuple[Expr, ...]) -> FSym:
    """A captured float tensor indexed in every dimension by traced integer indices."""
    if len(index) != t.dim():
        raise TypeError(f"a float tensor of shape {tuple(t.shape)} indexed with {len(index)} indices; index every "
                        "dimension")
    return FSym(load_slot(t, index))


def clamp(x: FExpr, lo, hi) -> FExpr:
    """``torch.clamp`` on a score expression (``min`` first, then ``max``, as torch does)."""
    if lo is not None:
        x = fbin("max", x, as_fexpr(lo))
    if hi is not None:
        x = fbin("min", x, as_fexpr(hi))
    return x


def _unary(op):
    return lambda x: FUn(op, as_fexpr(x))


def _binary(op, swap=False):
    return lambda a, b, **_: fbin(op, as_fexpr(b), as_fexpr(a)) if swap else fbin(op, as_fexpr(a), as_fexpr(b))


def _cond(c) -> FExpr:
    e = as_fexpr(c)
    if e.kind != FBOOL:
        raise TypeError(f"torch.where condition {e!r} is not a boolean")
    return e


FLOAT_HANDLERS: dict[Callable, Callable] = {
    **{getattr(torch, op): _unary(op) for op in UNARY if op != "neg"},
    **{getattr(torch.Tensor, op): _unary(op) for op in UNARY if op != "neg"},
    torch.neg: _unary("neg"), torch.Tensor.__neg__: _unary("neg"), torch.Tensor.neg: _unary("neg"),
    torch.add: _binary("add"), torch.sub: _binary("sub"), torch.mul: _binary("mul"), torch.div: _binary("div"),
    torch.minimum: _binary("min"), torch.maximum: _binary("max"),
    torch.Tensor.__add__: _binary("add"), torch.Tensor.__radd__: _binary("add", True),
    torch.Tensor.__sub__: _binary("sub"), torch.Tensor.__rsub__: _binary("sub", True),
    torch.Tensor.__mul__: _binary("mul"), torch.Tensor.__rmul__: _binary("mul", True),
    torch.Tensor.__truediv__: _binary("div"), torch.Tensor.__rtruediv__: _binary("div", True),
    torch.where: lambda c, a, b: fwhere(_cond(c), as_fexpr(a), as_fexpr(b)),
    torch.clamp: lambda x, min=None, max=None: clamp(as_fexpr(x), min, max),  # noqa: A006
    torch.Tensor.clamp: lambda x, min=None, max=None: clamp(as_fexpr(x), min, max),  # noqa: A006
    torch.Tensor.__lt__: lambda a, b: FCmp("lt", as_fexpr(a), as_fexpr(b)),
    torch.Tensor.__le__: lambda a, b: FCmp("le", as_fexpr(a), as_fexpr(b)),
    torch.Tensor.__gt__: lambda a, b: FCmp("gt", as_fexpr(a), as_fexpr(b)),
    torch.Tensor.__ge__: lambda a, b: FCmp("ge", as_fexpr(a), as_fexpr(b)),
}
