"""Index-expression IR: the nodes mask predicates are written in, their interval bounds, indexing of
captured tensors, and the tracing of a FlexAttention-style ``mask_mod`` into an :class:`Expr`."""

from .expr import BOOL, INDEX_VARS, BinOp, Buffer, Const, Expr, Load, UnOp, Var, Where, as_expr, maximum, minimum, where
from .index import Index, check_index_ranges, index
from .trace import Sym, TraceError, trace

__all__ = ["BOOL", "INDEX_VARS", "BinOp", "Buffer", "Const", "Expr", "Index", "Load", "Sym", "TraceError", "UnOp",
           "Var", "Where", "as_expr", "check_index_ranges", "index", "maximum", "minimum", "trace", "where"]
