"""Index-expression IR: the nodes mask predicates are written in, their interval bounds, indexing of
captured tensors, and the tracing of a FlexAttention-style ``mask_mod`` into an :class:`Expr`."""

from .ops import BOOL, INT
from .expr import (INDEX_VARS, KV, B, BinOp, Buffer, Const, Expr, H, Load, Q, UnOp, Var, Where, as_expr, binop,
                   maximum, minimum, unop, where)
from .transform import substitute, to_mask_mod
from .index import Index, check_index_ranges, index
from .trace import Sym, TraceError, TraceResult, trace, trace_report, trace_uses

__all__ = ["B", "BOOL", "BinOp", "Buffer", "Const", "Expr", "H", "INDEX_VARS", "INT", "Index", "KV", "Load", "Q",
           "Sym", "TraceError", "TraceResult", "UnOp", "Var", "Where", "as_expr", "binop", "check_index_ranges", "index", "maximum",
           "minimum", "substitute", "to_mask_mod", "trace", "trace_report", "trace_uses", "unop", "where"]
