"""Tracing a FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)`` into an
:class:`~attncompiler.ir.fexpr.FExpr`.

The score is handed in as an :class:`~attncompiler.ir.fexpr.FSym`, the indices as the mask
tracer's :class:`~attncompiler.ir.trace.Sym`; index arithmetic stays in the integer IR, float
tensors indexed by traced indices become runtime reads (:class:`~attncompiler.ir.fexpr.FLoad`,
one slot per captured tensor). Whatever cannot be represented (Python control flow on a value,
an untraced torch call, a float -> int conversion) leaves the score_mod opaque: the torch
backend evaluates it on tensors, and backends that need the expression refuse it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PatternError
from .expr import INDEX_VARS
from .fexpr import FBOOL, SLOTS, FExpr, FSym, Score, as_fexpr
from .trace import Sym, TraceError


@dataclass(frozen=True)
class ScoreTrace:
    """A traced score_mod: ``expr`` (None when opaque), the captured float tensors its
    :class:`~attncompiler.ir.fexpr.FLoad` slots read, and why it is opaque."""

    expr: FExpr | None
    tensors: tuple[torch.Tensor, ...] = ()
    failure: str | None = None

    def evaluate(self, score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
        """The traced expression on tensors (what the score_mod computes)."""
        env = {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx}
        return self.expr.evaluate(score, env, self.tensors).expand(score.shape)


def trace_score_mod(fn: Callable) -> ScoreTrace:
    """Trace ``fn`` into a :class:`ScoreTrace`; opaque (``expr`` None, ``failure`` set) when it
    does something the IR cannot represent.

    Raises:
        PatternError: when ``fn`` traces but returns a boolean (a mask_mod given as score_mod).
    """
    SLOTS.append([])
    try:
        out = fn(FSym(Score()), *(Sym(v) for v in INDEX_VARS))
        e = as_fexpr(out)
    except (TraceError, TypeError, RuntimeError, IndexError, ValueError, AttributeError, NotImplementedError) as err:
        return ScoreTrace(None, (), f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    finally:
        tensors = tuple(SLOTS.pop())
    if e.kind == FBOOL:
        raise PatternError(f"score_mod {fn!r} returned the boolean {e!r}; a score_mod returns a score "
                           "(a mask belongs in the pattern: ac.mask(...))")
    return ScoreTrace(e, tensors)
