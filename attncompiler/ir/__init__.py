"""Index-expression IR: the nodes mask predicates are written in, their interval bounds, indexing of
captured tensors, and the tracing of a FlexAttention-style ``mask_mod`` into an :class:`Expr`; the float
score expressions (:class:`FExpr`) a ``score_mod`` traces into."""

from .ops import BOOL, INT
from .expr import (INDEX_VARS, KV, B, BinOp, Buffer, Const, Expr, H, Load, Q, UnOp, Var, Where, as_expr, binop,
                   maximum, minimum, unop, where)
from .transform import substitute, to_mask_mod
from .index import Index, check_index_ranges, index
from .trace import Sym, TraceError, TraceResult, trace, trace_report, trace_uses
from .fexpr import FExpr, FSym
from .score_trace import ScoreTrace, trace_score_mod

__all__ = ["B", "BOOL", "BinOp", "Buffer", "Const", "Expr", "FExpr", "FSym", "H", "INDEX_VARS", "INT", "Index", "KV", "Load", "Q",
           "Sym", "TraceError", "TraceResult", "UnOp", "Var", "Where", "as_expr", "binop", "check_index_ranges", "index", "maximum",
           "minimum", "ScoreTrace", "substitute", "to_mask_mod", "trace", "trace_report", "trace_score_mod", "trace_uses",
           "unop", "where"]
