"""Tracing a FlexAttention-style ``mask_mod`` into an :class:`~attncompiler.ir.expr.Expr`.

The four index variables are handed to the mask_mod as :class:`Sym` proxies whose operators
(and the torch functions listed in ``_TORCH_HANDLERS``) build an Expr. Anything an Expr cannot
represent (Python control flow on an index, an unsupported torch call) raises
:class:`TraceError` inside tracing, and :func:`trace` returns None: the caller keeps the
mask_mod as an opaque predicate.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import PatternError
from .ops import BOOL
from .expr import INDEX_VARS, Buffer, Expr, ExprProxy, as_expr, binop, unop, where
from .index import index

class TraceError(Exception):
    """Raised inside tracing when a mask_mod does something an Expr cannot represent."""


class Sym(ExprProxy):
    """Proxy handed to a mask_mod during tracing: operators build an :class:`Expr`.

    Unlike ``Expr``, ``==`` and ``!=`` here are element-wise, as in a FlexAttention mask_mod.
    Python control flow on a proxy (``if``, ``and``, ``int()``) raises :class:`TraceError`,
    which makes the caller fall back to an opaque predicate.
    """

    __slots__ = ()

    def __init__(self, expr: Expr):
        self.expr = expr
        if _USES:  # record which index variables the traced function touched (see trace_uses)
            _USES[-1].update(expr.variables())

    def _bin(op):  # noqa: N805 - helper evaluated at class creation
        def f(self, o):
            return Sym(binop(op, self.expr, _unwrap(o)))

        def r(self, o):
            return Sym(binop(op, _unwrap(o), self.expr))

        return f, r

    __add__, __radd__ = _bin("add")
    __sub__, __rsub__ = _bin("sub")
    __mul__, __rmul__ = _bin("mul")
    __floordiv__, __rfloordiv__ = _bin("floordiv")
    __mod__, __rmod__ = _bin("mod")
    __and__, __rand__ = _bin("and")
    __or__, __ror__ = _bin("or")
    __xor__, __rxor__ = _bin("xor")
    __lt__, _ = _bin("lt")
    __le__, _ = _bin("le")
    __gt__, _ = _bin("gt")
    __ge__, _ = _bin("ge")
    __eq__, _ = _bin("eq")  # type: ignore[assignment]
    __ne__, _ = _bin("ne")  # type: ignore[assignment]
    del _bin, _

    def __neg__(self): return Sym(binop("sub", 0, self.expr))
    def __invert__(self): return Sym(unop("invert", self.expr))
    def __abs__(self): return Sym(unop("abs", self.expr))
    def abs(self): return Sym(unop("abs", self.expr))
    def logical_not(self): return Sym(unop("invert", self.expr))
    def logical_and(self, o): return Sym(binop("and", self.expr, _unwrap(o)))
    def logical_or(self, o): return Sym(binop("or", self.expr, _unwrap(o)))
    def eq(self, o): return Sym(binop("eq", self.expr, _unwrap(o)))
    def ne(self, o): return Sym(binop("ne", self.expr, _unwrap(o)))

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise TraceError(
            "Python control flow on a traced index (`if`, `and`, `or`, `not`); write it with "
            "`&`, `|`, `~` and `torch.where(cond, a, b)` to keep the predicate traceable")

    def __index__(self):
        raise TraceError("a traced index used as a Python integer")

    __int__ = __index__

    def __getattr__(self, name):
        raise TraceError(f"unsupported attribute {name!r} on a traced index")

    def __repr__(self) -> str:
        return f"Sym({self.expr!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _TORCH_HANDLERS.get(func)
        if handler is None:
            raise TraceError(f"torch function {getattr(func, '__name__', func)} is not traceable")
        out = handler(*args, **kwargs)
        return out if isinstance(out, TableView) else Sym(out)


def _unwrap(x: Any) -> Expr:
    if isinstance(x, TableView):
        raise TraceError(f"{x!r} is a slice of a tensor, not one value; index every dimension")
    if isinstance(x, int) and not isinstance(x, bool):
        return as_expr(x)  # a constant beyond int64 is a PatternError, not a reason to go opaque
    try:
        return as_expr(x)
    except PatternError as e:
        raise TraceError(str(e)) from None


class TableView:
    """A captured integer tensor indexed in its leading dimensions by traced indices so far
    (``t[q]`` of a 2-D ``t``); indexing the remaining dimensions (``t[q][k]``) reads a value."""

    __slots__ = ("tensor", "prefix")

    def __init__(self, tensor: torch.Tensor, prefix: tuple[Expr, ...]):
        self.tensor, self.prefix = tensor, prefix

    def __getitem__(self, idx):
        out = _index_tensor(self.tensor, idx, self.prefix)
        return out if isinstance(out, TableView) else Sym(out)

    def __bool__(self):
        raise TraceError("Python control flow on a traced tensor slice")

    def __getattr__(self, name):
        raise TraceError(f"unsupported attribute {name!r} on a traced tensor slice")

    def __repr__(self) -> str:
        return f"TableView({tuple(self.tensor.shape)}, {self.prefix!r})"


def _index_tensor(t, idx, prefix: tuple[Expr, ...] = ()):
    """``t[idx]`` with traced indices: an :class:`Index` once every dimension is indexed."""
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dim() == 0:
        raise TraceError("only integer or boolean tensors of at least one dimension can be indexed by a traced index")
    items = idx if isinstance(idx, tuple) else (idx,)
    exprs = list(prefix)
    for item in items:
        if item is None or item is Ellipsis or isinstance(item, (slice, list)):
            raise TraceError(f"indexing with {item!r} alongside a traced index")
        if isinstance(item, torch.Tensor) and item.numel() != 1:
            raise TraceError("indexing with a tensor of several indices alongside a traced index")
        e = _unwrap(item)
        if e.kind == BOOL:
            raise TraceError("a boolean index is a mask in torch, not a position")
        exprs.append(e)
    if len(exprs) > t.dim():
        raise PatternError(
            f"mask_mod indexes a tensor of shape {tuple(t.shape)} with {len(exprs)} indices "
            f"({', '.join(map(repr, exprs))}); torch raises IndexError: too many indices"
        )
    if len(exprs) < t.dim():
        return TableView(t, tuple(exprs))
    data = t.detach().cpu().to(torch.int64).reshape(-1).numpy()
    shape = tuple(t.shape)
    name = "table" + "x".join(map(str, shape))
    value = index(Buffer(name, data), shape, tuple(exprs))
    return binop("ne", value, 0) if t.dtype == torch.bool else value


def _div(a, b, *, rounding_mode=None):
    if rounding_mode != "floor":  # true division gives floats; "trunc" is C's, not Python's
        raise TraceError(f"torch.div with rounding_mode={rounding_mode!r} is not traceable")
    return binop("floordiv", _unwrap(a), _unwrap(b))


_TORCH_HANDLERS: dict[Any, Callable[..., Expr]] = {
    torch.where: lambda c, a, b: where(_unwrap(c), _unwrap(a), _unwrap(b)),
    torch.abs: lambda a: unop("abs", _unwrap(a)),
    torch.Tensor.abs: lambda a: unop("abs", _unwrap(a)),
    torch.logical_and: lambda a, b: binop("and", _unwrap(a), _unwrap(b)),
    torch.logical_or: lambda a, b: binop("or", _unwrap(a), _unwrap(b)),
    torch.logical_not: lambda a: unop("invert", _unwrap(a)),
    torch.remainder: lambda a, b: binop("mod", _unwrap(a), _unwrap(b)),
    torch.minimum: lambda a, b: binop("min", _unwrap(a), _unwrap(b)),
    torch.maximum: lambda a, b: binop("max", _unwrap(a), _unwrap(b)),
    torch.eq: lambda a, b: binop("eq", _unwrap(a), _unwrap(b)),
    torch.ne: lambda a, b: binop("ne", _unwrap(a), _unwrap(b)),
    torch.Tensor.__getitem__: _index_tensor,
    torch.Tensor.__eq__: lambda a, b: binop("eq", _unwrap(a), _unwrap(b)),
    torch.Tensor.__ne__: lambda a, b: binop("ne", _unwrap(a), _unwrap(b)),
    torch.Tensor.__add__: lambda a, b: binop("add", _unwrap(a), _unwrap(b)),
    torch.Tensor.__radd__: lambda a, b: binop("add", _unwrap(b), _unwrap(a)),
    torch.Tensor.__sub__: lambda a, b: binop("sub", _unwrap(a), _unwrap(b)),
    torch.Tensor.__rsub__: lambda a, b: binop("sub", _unwrap(b), _unwrap(a)),
    torch.Tensor.__mul__: lambda a, b: binop("mul", _unwrap(a), _unwrap(b)),
    torch.Tensor.__lt__: lambda a, b: binop("lt", _unwrap(a), _unwrap(b)),
    torch.Tensor.__le__: lambda a, b: binop("le", _unwrap(a), _unwrap(b)),
    torch.Tensor.__gt__: lambda a, b: binop("gt", _unwrap(a), _unwrap(b)),
    torch.Tensor.__ge__: lambda a, b: binop("ge", _unwrap(a), _unwrap(b)),
    torch.Tensor.__and__: lambda a, b: binop("and", _unwrap(a), _unwrap(b)),
    torch.Tensor.__or__: lambda a, b: binop("or", _unwrap(a), _unwrap(b)),
    torch.Tensor.__rmul__: lambda a, b: binop("mul", _unwrap(b), _unwrap(a)),
    torch.Tensor.__rand__: lambda a, b: binop("and", _unwrap(b), _unwrap(a)),
    torch.Tensor.__ror__: lambda a, b: binop("or", _unwrap(b), _unwrap(a)),
    torch.Tensor.__xor__: lambda a, b: binop("xor", _unwrap(a), _unwrap(b)),
    torch.Tensor.__floordiv__: lambda a, b: binop("floordiv", _unwrap(a), _unwrap(b)),
    torch.Tensor.__rfloordiv__: lambda a, b: binop("floordiv", _unwrap(b), _unwrap(a)),
    torch.Tensor.__mod__: lambda a, b: binop("mod", _unwrap(a), _unwrap(b)),
    torch.Tensor.__rmod__: lambda a, b: binop("mod", _unwrap(b), _unwrap(a)),
    torch.floor_divide: lambda a, b: binop("floordiv", _unwrap(a), _unwrap(b)),
    torch.div: _div,
}


_USES: list[set[str]] = []  # one set per trace in progress


def trace(fn: Callable) -> Expr | None:
    """Trace ``fn(b, h, q_idx, kv_idx)`` into an Expr, or return None when it is not traceable.

    Raises:
        PatternError: when ``fn`` traces but returns a non-boolean value, or uses a constant
            beyond int64 or an impossible index.
    """
    return trace_uses(fn)[0]


def trace_uses(fn: Callable) -> tuple[Expr | None, frozenset[str]]:
    """:func:`trace`, plus the index variables ``fn`` touched before tracing stopped.

    When ``fn`` stays opaque, a ``b`` or ``h`` among them means its mask may depend on the batch
    entry or head.
    """
    args = [Sym(v) for v in INDEX_VARS]
    _USES.append(set())
    try:
        out = fn(*args)
        e = _unwrap(out)
    except TraceError:
        return None, frozenset(_USES[-1])
    except PatternError:
        raise
    except (TypeError, RuntimeError, IndexError, ValueError, AttributeError):
        # torch or Python refused a proxy somewhere we do not intercept: keep fn opaque.
        return None, frozenset(_USES[-1])
    finally:
        uses = _USES.pop()
    if e.kind != BOOL:
        raise PatternError(
            f"mask_mod must return a boolean, but it returned the integer expression {e!r}; "
            "compare it with something, e.g. `... == 0`"
        )
    return e, frozenset(uses)
