"""Tracing a FlexAttention-style ``mask_mod`` into an :class:`~attncompiler.expr.Expr`.

The four index variables are handed to the mask_mod as :class:`Sym` proxies whose operators
(and the torch functions listed in ``_TORCH_HANDLERS``) build an Expr. Anything an Expr cannot
represent (Python control flow on an index, an unsupported torch call) raises
:class:`TraceError` inside tracing, and :func:`trace` returns None: the caller keeps the
mask_mod as an opaque predicate.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import PatternError
from .expr import BOOL, INDEX_VARS, Buffer, Expr, Load, as_expr, binop, unop, where

class TraceError(Exception):
    """Raised inside tracing when a mask_mod does something an Expr cannot represent."""


class Sym:
    """Proxy handed to a mask_mod during tracing: operators build an :class:`Expr`.

    Unlike ``Expr``, ``==`` and ``!=`` here are element-wise, as in a FlexAttention mask_mod.
    Python control flow on a proxy (``if``, ``and``, ``int()``) raises :class:`TraceError`,
    which makes the caller fall back to an opaque predicate.
    """

    __slots__ = ("expr",)

    def __init__(self, expr: Expr):
        self.expr = expr

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
        raise TraceError("Python control flow on a traced index")

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
        return Sym(handler(*args, **kwargs))


def _unwrap(x: Any) -> Expr:
    try:
        return as_expr(x)
    except PatternError as e:
        raise TraceError(str(e)) from None


def _index_tensor(t, idx):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
        raise TraceError("only 1-D integer or boolean tensors can be indexed by a traced index")
    if isinstance(idx, tuple):
        if len(idx) != 1:
            raise TraceError("multi-dimensional indexing by a traced index")
        idx = idx[0]
    buf = Buffer(f"buf{len(t)}", t.detach().cpu().to(torch.int64).numpy())
    load = Load(buf, _unwrap(idx))
    return binop("ne", load, 0) if t.dtype == torch.bool else load


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
}


def trace(fn: Callable) -> Expr | None:
    """Trace ``fn(b, h, q_idx, kv_idx)`` into an Expr, or return None when it is not traceable.

    Raises:
        PatternError: when ``fn`` traces but returns a non-boolean value.
    """
    try:
        out = fn(*(Sym(v) for v in INDEX_VARS))
        e = _unwrap(out)
    except TraceError:
        return None
    except (TypeError, RuntimeError, IndexError, ValueError, AttributeError):
        # torch or Python refused a proxy somewhere we do not intercept: keep fn opaque.
        return None
    if e.kind != BOOL:
        raise PatternError(
            f"mask_mod must return a boolean, but it returned the integer expression {e!r}; "
            "compare it with something, e.g. `... == 0`"
        )
    return e
