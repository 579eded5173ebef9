"""Rendering a traced score_mod (:class:`~attncompiler.ir.fexpr.FExpr`) into the Triton helpers
``_score_mod`` and ``_score_mod_grad`` (its derivative with respect to the score).

Both take the scaled score ``s`` in natural units and the index tensors ``b, h, q_idx, kv_idx``
(broadcastable tiles), the captured float tensors (``sbuf``/``smeta``: flattened, with offset,
length and strides per slot) and the expression's integer tables (``bufs``/``buf_meta``, the same
layout as the predicate's). Integer index arithmetic is rendered by the predicate's emitter
(int64 where bounds do not prove int32), so both halves keep the IR's semantics. A subexpression
used more than once (``tanh`` in softcap's derivative) is bound once to a temporary.
"""

from __future__ import annotations

import functools

from attncompiler.ir.expr import Buffer, Const, Expr
from attncompiler.ir.fexpr import (FBin, FCmp, FConst, FExpr, FLoad, FUn, FWhere, IntCond, IntToFloat, Score)

from .render import ScoreEmitter

UNARY = {"exp": "tl.exp({})", "log": "tl.log({})", "tanh": "_tanh({})", "sigmoid": "tl.sigmoid({})",
         "abs": "tl.abs({})", "sqrt": "tl.sqrt({})", "log1p": "tl.log(1.0 + {})", "neg": "-({})"}
BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} / {})",
          "min": "tl.minimum({}, {})", "max": "tl.maximum({}, {})"}
COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}
SIGNATURE = "(s, b, h, q_idx, kv_idx, sbuf, smeta, bufs, buf_meta)"


def int_buffers(*exprs: FExpr) -> tuple[Buffer, ...]:
    """The integer tables the score expressions read, in first-use order (their kernel slots)."""
    seen: dict[Buffer, None] = {}
    for e in exprs:
        for node in e.walk():
            for ie in int_parts(node):
                for buf in ie.buffers():
                    seen.setdefault(buf, None)
    return tuple(seen)


def int_parts(node: FExpr) -> tuple[Expr, ...]:
    """The integer index expressions held directly by ``node``."""
    if isinstance(node, (IntToFloat, IntCond)):
        return (node.e,)
    if isinstance(node, FLoad):
        return node.index
    return ()


class FloatEmitter:
    """Score expression -> Triton text; integer parts through the predicate's emitter."""

    def __init__(self, root: FExpr, buffers: tuple[Buffer, ...]):
        self.ints = ScoreEmitter(buffers)
        self.counts: dict[FExpr, int] = {}
        for n in root.walk():
            self.counts[n] = self.counts.get(n, 0) + 1
        self.done: dict[FExpr, str] = {}
        self.lines = self.ints.lines  # one list: integer and float temporaries in dependency order

    def emit(self, e: FExpr) -> str:
        if e in self.done:
            return self.done[e]
        text = self._emit(e)
        if self.counts.get(e, 0) > 1 and not isinstance(e, (Score, FConst)):
            name = f"f{sum(1 for x in self.lines if x.startswith('    f'))}"
            self.lines.append(f"    {name} = {text}")
            text = name
        self.done[e] = text
        return text

    def _emit(self, e: FExpr) -> str:
        match e:
            case Score():
                return "s"
            case FConst(value=v):
                return f'float("{v}")' if v != v or v in (float("inf"), float("-inf")) else repr(float(v))
            case IntToFloat(e=x):
                return f"({self.ints.emit(x)[0]}).to(tl.float32)"
            case IntCond(e=x):
                return f"({self.ints.emit(x)[0]})"
            case FLoad(slot=slot, index=index):
                terms = []
                for d, ix in enumerate(index):
                    stride = f"tl.load(smeta + {6 * slot + 2 + d})"
                    if isinstance(ix, Const):
                        if int(ix.value) != 0:
                            terms.append(f"{int(ix.value)} * {stride}")
                        continue
                    terms.append(f"({self.ints.emit(ix)[0]}).to(tl.int64) * {stride}")
                return f"_sload(sbuf, smeta, {slot}, {' + '.join(terms) if terms else '0'})"
            case FUn(op=op, x=x):
                return UNARY[op].format(self.emit(x))
            case FBin(op=op, a=a, b=b):
                return BINARY[op].format(self.emit(a), self.emit(b))
            case FCmp(op=op, a=a, b=b):
                return f"({self.emit(a)} {COMPARE[op]} {self.emit(b)})"
            case FWhere(c=c, a=a, b=b):
                return f"tl.where({self.emit(c)}, {self.emit(a)}, {self.emit(b)})"
        raise AssertionError(f"cannot render score expression node {e!r}")


def render_function(name: str, e: FExpr, buffers: tuple[Buffer, ...], comment: str) -> str:
    """One ``@triton.jit`` helper returning ``e`` broadcast to the score tile."""
    em = FloatEmitter(e, buffers)
    result = em.emit(e)
    if not e.uses_score():  # a weight that ignores the score still has the tile's shape
        result = f"{result} + s * 0.0"
    head = f"@triton.jit\ndef {name}{SIGNATURE}:\n"
    note = [f"    # {comment}"] if len(comment) <= 160 else []
    return head + "\n".join(note + em.lines + [f"    return {result}"]) + "\n"


@functools.lru_cache(maxsize=256)
def render_score_mod(expr: FExpr) -> tuple[str, tuple[Buffer, ...]]:
    """``(text of _score_mod and _score_mod_grad, integer tables they read by slot)``."""
    grad = expr.derivative()
    buffers = int_buffers(expr, grad)
    text = (render_function("_score_mod", expr, buffers, repr(expr)) + "\n\n"
            + render_function("_score_mod_grad", grad, buffers, f"d/ds of the above: {grad!r}"))
    return text, buffers
