"""Tracing a FlexAttention-style ``mask_mod`` into an :class:`~attncompiler.ir.expr.Expr`.

The four index variables are handed to the mask_mod as :class:`Sym` proxies whose operators
(and the torch functions listed in ``_TORCH_HANDLERS``) build an Expr. Anything an Expr cannot
represent (Python control flow on an index, an unsupported torch call) raises
:class:`TraceError` inside tracing, and :func:`trace` returns None: the caller keeps the
mask_mod as an opaque predicate.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import PatternError
from .ops import BOOL
from .expr import INDEX_VARS, Buffer, Expr, ExprProxy, as_expr, binop, unop, where
from .index import index
from .fexpr import SLOTS as FLOAT_SLOTS, FSym, as_fexpr, float_load

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
            if isinstance(o, FSym):  # a float operand: the score expression's operator builds it
                return NotImplemented
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

    def __lshift__(self, o): return Sym(_shift("lshift", self.expr, o))
    def __rlshift__(self, o): return Sym(_shift("lshift", o, self.expr))
    def __rshift__(self, o): return Sym(_shift("rshift", self.expr, o))
    def __rrshift__(self, o): return Sym(_shift("rshift", o, self.expr))
    def __pos__(self): return self
    def __neg__(self): return Sym(binop("sub", 0, self.expr))
    def __invert__(self): return Sym(unop("invert", self.expr))
    def __abs__(self): return Sym(unop("abs", self.expr))
    def abs(self): return Sym(unop("abs", self.expr))
    def logical_not(self): return Sym(unop("invert", self.expr))
    def logical_and(self, o): return Sym(binop("and", self.expr, _unwrap(o)))
    def logical_or(self, o): return Sym(binop("or", self.expr, _unwrap(o)))
    def eq(self, o): return Sym(binop("eq", self.expr, _unwrap(o)))
    def ne(self, o): return Sym(binop("ne", self.expr, _unwrap(o)))
    def logical_xor(self, o): return Sym(binop("xor", _as_bool(self.expr), _as_bool(_unwrap(o))))
    def bitwise_and(self, o): return Sym(binop("and", self.expr, _unwrap(o)))
    def bitwise_or(self, o): return Sym(binop("or", self.expr, _unwrap(o)))
    def bitwise_xor(self, o): return Sym(binop("xor", self.expr, _unwrap(o)))
    def bitwise_not(self): return Sym(unop("invert", self.expr))
    def bitwise_left_shift(self, o): return Sym(_shift("lshift", self.expr, o))
    def bitwise_right_shift(self, o): return Sym(_shift("rshift", self.expr, o))
    def minimum(self, o): return Sym(binop("min", self.expr, _unwrap(o)))
    def maximum(self, o): return Sym(binop("max", self.expr, _unwrap(o)))
    def clamp(self, min=None, max=None): return Sym(_clamp(self.expr, min, max))  # noqa: A002
    clip = clamp
    def clamp_min(self, m): return Sym(_clamp(self.expr, m, None))
    def clamp_max(self, m): return Sym(_clamp(self.expr, None, m))
    def new_ones(self, *size, dtype=None, **_): return Sym(_filled(1, size, dtype, self.expr))
    def new_zeros(self, *size, dtype=None, **_): return Sym(_filled(0, size, dtype, self.expr))
    def new_full(self, size, fill_value, *, dtype=None, **_): return Sym(_filled(fill_value, (size,), dtype, self.expr))
    def to(self, *args, **kwargs): return _wrap(_to(self.expr, *args, **kwargs))
    def float(self): return _as_float(self, "float")
    def double(self): return _as_float(self, "double")
    def long(self): return Sym(_cast(self.expr, torch.int64))
    def bool(self): return Sym(_cast(self.expr, torch.bool))
    def clone(self): return self
    def detach(self): return self
    def dim(self): return 0

    # A traced index stands for one 0-d int64 (or bool) value, as under FlexAttention's vmap.
    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: torch.bool if self.expr.kind == BOOL else torch.int64)
    shape = property(lambda self: torch.Size([]))
    ndim = property(lambda self: 0)

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
        if any(isinstance(a, FSym) for a in (*args, *kwargs.values())):
            return NotImplemented  # a score expression: FSym's handlers build it
        handler = _TORCH_HANDLERS.get(func)
        if handler is None:
            raise TraceError(f"torch function {getattr(func, '__name__', func)} is not traceable")
        return _wrap(handler(*args, **kwargs))


def _as_float(x: Sym, name: str) -> FSym:
    """``x.float()``: a float value inside a score_mod trace; a mask_mod's tracer stops there."""
    if not FLOAT_SLOTS:
        raise TraceError(f"unsupported attribute {name!r} on a traced index")
    return FSym(as_fexpr(x.expr))


def _wrap(out):
    """A handler's result as a proxy: index expressions as :class:`Sym`; tensor slices and score
    expressions (a float tensor read, a float conversion) as they are."""
    return out if isinstance(out, (TableView, FSym)) else Sym(out)


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
        return _wrap(out)

    def __bool__(self):
        raise TraceError("Python control flow on a traced tensor slice")

    def __getattr__(self, name):
        raise TraceError(f"unsupported attribute {name!r} on a traced tensor slice")

    def __repr__(self) -> str:
        return f"TableView({tuple(self.tensor.shape)}, {self.prefix!r})"


def _index_tensor(t, idx, prefix: tuple[Expr, ...] = ()):
    """``t[idx]`` with traced indices: an :class:`Index` once every dimension is indexed."""
    if not isinstance(t, torch.Tensor) or t.is_complex() or t.dim() == 0 or t.is_floating_point() and not FLOAT_SLOTS:
        raise TraceError("only integer or boolean tensors of at least one dimension (and float tensors, in a "
                         "score_mod) can be indexed by a traced index")
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
    if t.is_floating_point():
        return float_load(t, tuple(exprs))  # read at run time from the captured tensor
    data = t.detach().cpu().to(torch.int64).reshape(-1).numpy()
    shape = tuple(t.shape)
    name = "table" + "x".join(map(str, shape))
    value = index(Buffer(name, data), shape, tuple(exprs))
    return binop("ne", value, 0) if t.dtype == torch.bool else value


def _div(a, b, *, rounding_mode=None):
    if rounding_mode != "floor":  # true division gives floats; "trunc" is C's, not Python's
        raise TraceError(f"torch.div with rounding_mode={rounding_mode!r} is not traceable")
    return binop("floordiv", _unwrap(a), _unwrap(b))


def _shift(op: str, a, count) -> Expr:
    """``a << count`` / ``a >> count`` with torch's int64 semantics (a count outside [0, 63]:
    ``<<`` gives 0, ``>>`` keeps the sign); a traced (non-constant) count is not traced."""
    c = _unwrap(count)
    if c.constant() is None or isinstance(c.constant(), bool):
        raise TraceError(f"a shift by the non-constant count {c!r}")
    x = _unwrap(a)
    if x.kind == BOOL:
        raise TraceError("a shift of a boolean")
    return binop(op, x, c)


def _clamp(x, lo, hi) -> Expr:
    """torch's ``clamp``: ``min(max(x, lo), hi)`` (``hi`` wins where ``lo > hi``)."""
    e = _unwrap(x)
    if lo is not None:
        e = binop("max", e, _unwrap(lo))
    if hi is not None:
        e = binop("min", e, _unwrap(hi))
    return e


def _as_bool(e: Expr) -> Expr:
    return e if e.kind == BOOL else binop("ne", e, 0)


def _cast(e: Expr, dtype) -> Expr:
    """``e.to(dtype)`` for the dtypes index arithmetic keeps exact: bool and int64."""
    if dtype is torch.bool:
        return _as_bool(e)
    if dtype is torch.int64:
        return where(e, 1, 0) if e.kind == BOOL else e
    if dtype.is_floating_point and FLOAT_SLOTS:  # in a score_mod: an index as a float value
        return FSym(as_fexpr(e))
    raise TraceError(f"a conversion to {dtype} (only torch.bool and torch.int64 are traced)")


def _to(e: Expr, *args, **kwargs) -> Expr:
    """``Tensor.to``: devices and copy flags change nothing for an index; dtypes go to :func:`_cast`."""
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (Sym, torch.Tensor)):
            dtype = torch.bool if isinstance(a, Sym) and a.expr.kind == BOOL else getattr(a, "dtype", None)
        elif not isinstance(a, (str, torch.device, bool)):
            raise TraceError(f"Tensor.to({a!r})")
    return e if dtype is None else _cast(e, dtype)


def _filled(value, size, dtype, like: Expr) -> Expr:
    """A 0-d constant (``new_ones(())``, ``ones_like(q_idx)``): one value per element."""
    dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    if tuple(dims) != ():
        raise TraceError(f"a constant tensor of shape {tuple(dims)} (a traced index is one 0-d value)")
    if dtype is None:
        dtype = torch.bool if like.kind == BOOL else torch.int64
    return _cast(_unwrap(value), dtype)


def _like(value):
    def f(t, *, dtype=None, **_):
        return _filled(value, (), dtype, _unwrap(t))
    return f


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
    torch.Tensor.__xor__: lambda a, b: binop("xor", _unwrap(a), _unwrap(b)),
    torch.Tensor.__rxor__: lambda a, b: binop("xor", _unwrap(b), _unwrap(a)),
    torch.Tensor.__lshift__: lambda a, b: _shift("lshift", a, b),
    torch.Tensor.__rlshift__: lambda a, b: _shift("lshift", b, a),
    torch.Tensor.__rshift__: lambda a, b: _shift("rshift", a, b),
    torch.Tensor.__rrshift__: lambda a, b: _shift("rshift", b, a),
    torch.bitwise_and: lambda a, b: binop("and", _unwrap(a), _unwrap(b)),
    torch.bitwise_or: lambda a, b: binop("or", _unwrap(a), _unwrap(b)),
    torch.bitwise_xor: lambda a, b: binop("xor", _unwrap(a), _unwrap(b)),
    torch.bitwise_not: lambda a: unop("invert", _unwrap(a)),
    torch.bitwise_left_shift: lambda a, b: _shift("lshift", a, b),
    torch.bitwise_right_shift: lambda a, b: _shift("rshift", a, b),
    torch.logical_xor: lambda a, b: binop("xor", _as_bool(_unwrap(a)), _as_bool(_unwrap(b))),
    torch.clamp: lambda x, min=None, max=None: _clamp(x, min, max),  # noqa: A006
    torch.clip: lambda x, min=None, max=None: _clamp(x, min, max),  # noqa: A006
    torch.clamp_min: lambda x, m: _clamp(x, m, None),
    torch.clamp_max: lambda x, m: _clamp(x, None, m),
    torch.lt: lambda a, b: binop("lt", _unwrap(a), _unwrap(b)),
    torch.le: lambda a, b: binop("le", _unwrap(a), _unwrap(b)),
    torch.gt: lambda a, b: binop("gt", _unwrap(a), _unwrap(b)),
    torch.ge: lambda a, b: binop("ge", _unwrap(a), _unwrap(b)),
    torch.add: lambda a, b: binop("add", _unwrap(a), _unwrap(b)),
    torch.sub: lambda a, b: binop("sub", _unwrap(a), _unwrap(b)),
    torch.mul: lambda a, b: binop("mul", _unwrap(a), _unwrap(b)),
    torch.ones_like: _like(1),
    torch.zeros_like: _like(0),
    torch.full_like: lambda t, v, *, dtype=None, **_: _filled(v, (), dtype, _unwrap(t)),
    torch.Tensor.to: lambda t, *a, **k: _to(_unwrap(t), *a, **k),
}


_USES: list[set[str]] = []  # one set per trace in progress


@dataclass(frozen=True)
class TraceResult:
    """What tracing a mask_mod gave: the expression (None: opaque), the index variables it
    touched before it stopped, and, when opaque, why (the first operation the tracer could not
    follow and the user's source line)."""

    expr: Expr | None
    uses: frozenset[str]
    failure: str | None = None


def trace(fn: Callable) -> Expr | None:
    """Trace ``fn(b, h, q_idx, kv_idx)`` into an Expr, or return None when it is not traceable.

    Raises:
        PatternError: when ``fn`` traces but returns a non-boolean value, or uses a constant
            beyond int64 or an impossible index.
    """
    return trace_report(fn).expr


def trace_uses(fn: Callable) -> tuple[Expr | None, frozenset[str]]:
    """:func:`trace`, plus the index variables ``fn`` touched before tracing stopped.

    When ``fn`` stays opaque, a ``b`` or ``h`` among them means its mask may depend on the batch
    entry or head.
    """
    r = trace_report(fn)
    return r.expr, r.uses


def trace_report(fn: Callable) -> TraceResult:
    """Trace ``fn`` and say what happened (see :class:`TraceResult`); raises as :func:`trace`."""
    args = [Sym(v) for v in INDEX_VARS]
    _USES.append(set())
    try:
        out = fn(*args)
        e = _unwrap(out)
    except TraceError as err:
        return TraceResult(None, frozenset(_USES[-1]), _failure(fn, err))
    except PatternError:
        raise
    except (TypeError, RuntimeError, IndexError, ValueError, AttributeError, NotImplementedError) as err:
        # torch or Python refused a proxy somewhere we do not intercept: keep fn opaque.
        return TraceResult(None, frozenset(_USES[-1]), _failure(fn, err, f"{type(err).__name__}: "))
    finally:
        uses = _USES.pop()
    if e.kind != BOOL:
        raise PatternError(
            f"mask_mod must return a boolean, but it returned the integer expression {e!r}; "
            "compare it with something, e.g. `... == 0`"
        )
    return TraceResult(e, frozenset(uses))


_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _failure(fn: Callable, err: BaseException, prefix: str = "") -> str:
    """``"<what stopped the tracer> at <file>:<line>: <source>"``, the line being the innermost
    frame of user code (not this package's tracer, not torch) in the traceback."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not os.path.abspath(f.filename).startswith((_HERE, _TORCH_DIR))]
    what = f"{prefix}{str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if not frames:
        code = getattr(fn, "__code__", None)
        return what if code is None else f"{what} (in {code.co_filename}:{code.co_firstlineno})"
    f = frames[-1]
    src = f" `{f.line.strip()}`" if f.line else ""
    return f"{what} at {f.filename}:{f.lineno}:{src}"
