"""Safe parsing of pattern text: the code ``repr(pattern)`` prints, rebuilt without ``eval``.

A pattern read from outside the process (a checkpoint, a command line, a config file) is text.
Evaluating it, even with a restricted ``eval``, is not a sandbox: ``().__class__.__base__``
reaches every class of the interpreter and from there the real builtins. This module parses
the text with :mod:`ast` and interprets only the DSL:

* calls of the public constructors listed in :data:`DSL_FUNCTIONS` (``ac.sliding_window(64)``,
  also spelled ``sliding_window(64)`` or ``attncompiler.sliding_window(64)``) and of the
  catalogue (``patterns.bigbird(block=32)``; bare ``bigbird(...)`` where the name is not a DSL
  constructor too), with positional and keyword arguments;
* literals: ints (within int64), finite floats, short strings, bools, ``None``, lists and
  tuples of those, ``range(...)``, a unary minus on a number;
* the pattern operators ``|``, ``&``, ``~`` and the method ``.causal()``;
* a traced mask, ``ac.mask(lambda b, h, q_idx, kv_idx: EXPR)``, whose body is rebuilt as an
  index expression (arithmetic, comparisons, ``& | ^ ~``, ``abs``, ``ac.where``,
  ``ac.minimum``, ``ac.maximum`` over the four parameters and integer constants).

Anything else (other names, attribute access, subscripts, comprehensions, other lambdas,
f-strings, ``**``, starred arguments, ...) raises :class:`~attncompiler.errors.InputError`
naming the offending source segment, line and column. Sizes are bounded (text length, node
count, nesting depth, integer range, sequence and string length), so parsing is cheap even on
hostile input. Nothing outside the tables is ever called.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Callable

from attncompiler.errors import AttnCompilerError, InputError
from attncompiler.dsl.pattern import Pattern

MAX_CHARS = 200_000
"""Longest pattern text accepted."""
MAX_NODES = 50_000
"""Most syntax-tree nodes accepted."""
MAX_DEPTH = 100
"""Deepest nesting accepted (a chain ``a | b | c`` of one operator counts as one level)."""
MAX_SEQUENCE = 1 << 20
"""Longest list, tuple or ``range`` accepted."""
MAX_STRING = 256
"""Longest string literal accepted."""
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
"""Integer literals and folded constants must lie in int64."""

MODULE_PREFIXES: dict[tuple[str, ...], str] = {
    ("ac",): "dsl", ("attncompiler",): "dsl",
    ("patterns",): "catalogue", ("ac", "patterns"): "catalogue", ("attncompiler", "patterns"): "catalogue",
}
"""Dotted prefixes a constructor may be spelled with, and the table each one names."""

METHODS: frozenset[str] = frozenset({"causal"})
"""Pattern methods allowed in text (``p.causal()``), called without arguments."""

_EXPR_BINOPS: dict[type, str] = {
    ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.FloorDiv: "floordiv", ast.Mod: "mod",
    ast.BitAnd: "and", ast.BitOr: "or", ast.BitXor: "xor",
}
_EXPR_COMPARE: dict[type, str] = {
    ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge",
}
_EXPR_FUNCS: dict[str, str] = {"abs": "abs", "where": "where", "minimum": "min", "maximum": "max"}

_NODE_WORDS: dict[type, str] = {
    ast.Subscript: "a subscript", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator expression",
    ast.Lambda: "a lambda", ast.JoinedStr: "an f-string", ast.FormattedValue: "an f-string",
    ast.Starred: "a starred argument", ast.Attribute: "an attribute access", ast.Name: "a name",
    ast.BoolOp: "and/or", ast.IfExp: "a conditional expression", ast.Dict: "a dict", ast.Set: "a set",
    ast.Compare: "a comparison", ast.NamedExpr: "an assignment expression", ast.Await: "await",
    ast.Yield: "yield", ast.YieldFrom: "yield", ast.Slice: "a slice",
}


def parse_pattern(text: str) -> Pattern:
    """Build the pattern that ``text`` (e.g. ``repr(pattern)``) spells, without evaluating code.

    ``parse_pattern(repr(p)) == p`` for every pattern whose parameters are all in its ``repr``:
    every primitive, combinator, Combiner, diffusion and memory pattern, the catalogue, and
    traced ``ac.mask(lambda ...)`` masks that read no tensor. Opaque masks (a Python
    ``mask_mod`` the tracer could not read) have no text form.

    Args:
        text: one Python expression in the pattern DSL (see the module docstring).

    Raises:
        InputError: the text is not a pattern of the DSL, is too large, or a constructor
            rejects its arguments; the message names the offending part, line and column.
    """
    if not isinstance(text, str):
        raise InputError(f"pattern text must be a str, got {type(text).__name__} {text!r:.80}")
    if len(text) > MAX_CHARS:
        raise InputError(f"pattern text of {len(text)} characters exceeds the limit of {MAX_CHARS}; "
                         "a pattern's code is short (pass large tables as ranges or catalogue parameters)")
    tree = _parse_ast(text)
    value = _Reader(text).value(tree.body, 0)
    if not isinstance(value, Pattern):
        raise InputError(f"pattern text {_clip(text)!r} builds {type(value).__name__} {_clip(repr(value))}, "
                         "not an attention pattern")
    return value


def _parse_ast(text: str) -> ast.Expression:
    """``ast.parse`` in eval mode with its failures as InputError, then a node-count check."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise InputError(f"cannot parse pattern text {_clip(text)!r}: {e.msg} at line {e.lineno}, "
                         f"column {e.offset}{_opaque_hint(text)}") from None
    except (RecursionError, MemoryError, ValueError) as e:  # too deeply nested, or a NUL byte
        raise InputError(f"cannot parse pattern text {_clip(text)!r}: {type(e).__name__} "
                         f"({str(e) or 'nested too deeply'}); nest at most {MAX_DEPTH} levels") from None
    count = sum(1 for _ in ast.walk(tree))
    if count > MAX_NODES:
        raise InputError(f"pattern text has {count} syntax nodes, more than the limit of {MAX_NODES}")
    return tree


def _opaque_hint(text: str) -> str:
    if re.search(r"\bmask\((?!\s*lambda\b)", text):
        return ("; it contains an opaque ac.mask(...) (a Python mask_mod that could not be traced), "
                "which cannot be stored as text: write the mask_mod with traceable operations "
                "(arithmetic, comparisons, & | ~, abs, torch.where) or keep the pattern in code")
    return ""


def _clip(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _tables() -> tuple[dict[str, Callable], dict[str, Callable]]:
    """The DSL constructors and the catalogue constructors, by name (imported lazily: the
    catalogue and the families build on the core this module belongs to)."""
    global _TABLES
    if _TABLES is None:
        from attncompiler import dsl as P
        from attncompiler.families import combiner, diffusion
        from attncompiler.families import memory as memory_slots

        from . import CATALOGUE

        dsl: dict[str, Callable] = {f.__name__: f for f in (
            P.full, P.causal, P.sliding_window, P.dilated_window, P.block_local, P.block_window, P.strided,
            P.global_tokens, P.random_blocks, P.prefix_lm, P.document, P.mask, P.per_head, P.union,
            P.intersection, diffusion.diffuse, combiner.combiner_fixed, combiner.combiner_logsparse,
            combiner.combiner_axial, combiner.combiner_mixture, memory_slots.memory)}
        dsl.update({c.__name__: c for c in memory_slots.CONTROLS})
        catalogue = {f.__name__: f for f in CATALOGUE.values()}
        _TABLES = (dsl, catalogue)
    return _TABLES


_TABLES: tuple[dict[str, Callable], dict[str, Callable]] | None = None


def dsl_names() -> tuple[list[str], list[str]]:
    """The constructor names the parser accepts: (DSL names, catalogue names), sorted."""
    dsl, catalogue = _tables()
    return sorted(dsl), sorted(catalogue)


class _Reader:
    """Interprets one parsed pattern text; every error names the node it is about."""

    def __init__(self, text: str):
        self.text = text.strip()

    # -- errors ----------------------------------------------------------------------------
    def fail(self, node: ast.AST, why: str, hint: str = "") -> InputError:
        seg = ast.get_source_segment(self.text, node) or type(node).__name__
        where = f"line {getattr(node, 'lineno', '?')}, column {getattr(node, 'col_offset', -1) + 1}"
        msg = f"cannot parse pattern text: {why}: `{_clip(seg, 80)}` at {where}"
        return InputError(msg + (f"; {hint}" if hint else ""))

    def refuse(self, node: ast.AST) -> InputError:
        word = _NODE_WORDS.get(type(node), f"{type(node).__name__} syntax")
        if isinstance(node, ast.Name):
            dsl, catalogue = _tables()
            if node.id in dsl or node.id in catalogue:
                return self.fail(node, f"constructor {node.id!r} must be called", f"write {node.id}(...)")
            return self.fail(node, f"unknown name {node.id!r}", _NAMES_HINT)
        if isinstance(node, ast.Attribute) and node.attr.startswith("__"):
            return self.fail(node, f"dunder attribute {node.attr!r} is not allowed", _NAMES_HINT)
        if isinstance(node, ast.BinOp):
            word = f"operator {type(node.op).__name__}"
        return self.fail(node, f"{word} is not part of the pattern DSL", _NAMES_HINT)

    def depth(self, node: ast.AST, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise self.fail(node, f"nesting deeper than {MAX_DEPTH} levels")
        return depth + 1

    # -- values ----------------------------------------------------------------------------
    def value(self, node: ast.expr, depth: int) -> Any:
        """A literal, a sequence of values, a pattern or a memory control."""
        d = self.depth(node, depth)
        match node:
            case ast.Constant():
                return self.literal(node)
            case ast.UnaryOp(op=ast.USub(), operand=ast.Constant()):
                v = self.literal(node.operand)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise self.fail(node, "unary minus applies only to numbers")
                return self.check_int(node, -v) if isinstance(v, int) else -v
            case ast.UnaryOp(op=ast.Invert()):
                return self.apply(node, lambda p: ~p, [self.pattern(node.operand, d)])
            case ast.BinOp(op=ast.BitOr() | ast.BitAnd()):
                parts = [self.pattern(n, d) for n in _chain(node)]
                op = (lambda a, b: a | b) if isinstance(node.op, ast.BitOr) else (lambda a, b: a & b)

                def fold(*ps: Pattern) -> Pattern:
                    out = ps[0]
                    for p in ps[1:]:
                        out = op(out, p)
                    return out
                return self.apply(node, fold, parts)
            case ast.List() | ast.Tuple():
                if len(node.elts) > MAX_SEQUENCE:
                    raise self.fail(node, f"{len(node.elts)} elements exceed the limit of {MAX_SEQUENCE}")
                items = [self.value(e, d) for e in node.elts]
                return items if isinstance(node, ast.List) else tuple(items)
            case ast.Call():
                return self.call(node, d)
        raise self.refuse(node)

    def pattern(self, node: ast.expr, depth: int) -> Pattern:
        v = self.value(node, depth)
        if not isinstance(v, Pattern):
            raise self.fail(node, f"expected a pattern, got {type(v).__name__} {_clip(repr(v), 60)}",
                            "the operators | & ~ combine patterns only")
        return v

    def literal(self, node: ast.Constant) -> Any:
        v = node.value
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            return self.check_int(node, v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise self.fail(node, f"float literal {v!r} is not finite")
            return v
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise self.fail(node, f"string of {len(v)} characters exceeds the limit of {MAX_STRING}")
            return v
        raise self.fail(node, f"{type(v).__name__} literals are not part of the pattern DSL")

    def check_int(self, node: ast.AST, v: int) -> int:
        if not INT_MIN <= v <= INT_MAX:
            raise self.fail(node, f"integer {_clip(str(v), 40)} is outside int64")
        return v

    # -- calls -----------------------------------------------------------------------------
    def call(self, node: ast.Call, depth: int) -> Any:
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise self.fail(a, "starred arguments are not part of the pattern DSL")
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail(kw.value, "**keyword arguments are not part of the pattern DSL")
        func = node.func
        path = _dotted(func)
        if path is not None and len(path) == 1 and path[0] == "range":
            return self.range(node, depth)
        if path is not None and (len(path) == 1 or path[:-1] in MODULE_PREFIXES):
            fn = self.lookup(func, path)
            if fn is _tables()[0]["mask"]:
                return self.mask(node, depth)
            args = [self.value(a, depth) for a in node.args]
            kwargs = {kw.arg: self.value(kw.value, depth) for kw in node.keywords}
            return self.apply(node, fn, args, kwargs)
        if isinstance(func, ast.Attribute):
            if func.attr not in METHODS:
                raise self.refuse(func)
            if node.args or node.keywords:
                raise self.fail(node, f".{func.attr}() takes no arguments")
            receiver = self.pattern(func.value, depth)
            return self.apply(node, lambda p: getattr(p, func.attr)(), [receiver])
        raise self.refuse(func)

    def lookup(self, func: ast.expr, path: tuple[str, ...]) -> Callable:
        dsl, catalogue = _tables()
        name = path[-1]
        if name.startswith("__"):
            raise self.fail(func, f"dunder name {name!r} is not allowed", _NAMES_HINT)
        if len(path) == 1:
            table = dsl if name in dsl else catalogue
        else:
            table = dsl if MODULE_PREFIXES[path[:-1]] == "dsl" else catalogue
        fn = table.get(name)
        if fn is None:
            raise self.fail(func, f"{'.'.join(path)!r} is not a pattern constructor", _NAMES_HINT)
        return fn

    def apply(self, node: ast.AST, fn: Callable, args: list, kwargs: dict | None = None) -> Any:
        """Call a table entry; its own validation errors become InputErrors at ``node``."""
        try:
            return fn(*args, **(kwargs or {}))
        except (AttnCompilerError, TypeError, ValueError, OverflowError) as e:
            raise self.fail(node, f"{type(e).__name__}: {e}") from None

    def range(self, node: ast.Call, depth: int) -> range:
        if node.keywords or not 1 <= len(node.args) <= 3:
            raise self.fail(node, "range() takes 1 to 3 positional integers")
        bounds = [self.value(a, depth) for a in node.args]
        if any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
            raise self.fail(node, "range() takes integers")
        if len(bounds) == 3 and bounds[2] == 0:
            raise self.fail(node, "range() step must not be zero")
        r = range(*bounds)
        if len(r) > MAX_SEQUENCE:
            raise self.fail(node, f"range of {len(r)} elements exceeds the limit of {MAX_SEQUENCE}")
        return r

    # -- traced masks ----------------------------------------------------------------------
    def mask(self, node: ast.Call, depth: int) -> Pattern:
        """``ac.mask(lambda b, h, q_idx, kv_idx: EXPR)``: the body becomes the mask's Expr."""
        from attncompiler.ir.ops import BOOL
        from attncompiler.dsl.mask_mod import Mask

        if len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.Lambda):
            raise self.fail(node, "ac.mask(...) in text must hold one lambda b, h, q_idx, kv_idx: <expression>",
                            "an opaque mask_mod (a Python function) cannot be stored as text")
        lam = node.args[0]
        a = lam.args
        params = [p.arg for p in a.args]
        if (a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or a.defaults or len(params) != 4
                or len(set(params)) != 4):
            raise self.fail(lam, "a mask lambda takes exactly four plain parameters (b, h, q_idx, kv_idx)")
        e = _ExprReader(self, dict(zip(params, ("b", "h", "q_idx", "kv_idx")))).expr(lam.body, depth)
        if e.kind != BOOL:
            raise self.fail(lam.body, f"a mask must be boolean, but {e!r} is an integer expression",
                            "compare it with something, e.g. `... == 0`")
        return Mask(None, e)


class _ExprReader:
    """Rebuilds a traced mask's body as an :class:`~attncompiler.ir.expr.Expr` (no code runs)."""

    def __init__(self, reader: _Reader, params: dict[str, str]):
        self.r = reader
        self.params = params

    def expr(self, node: ast.expr, depth: int):
        from attncompiler.ir import expr as E

        d = self.r.depth(node, depth)
        match node:
            case ast.Name(id=name) if name in self.params:
                return E.Var(self.params[name])
            case ast.Constant(value=v) if isinstance(v, (bool, int)):
                return E.Const(v if isinstance(v, bool) else self.r.check_int(node, v))
            case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=v)) if type(v) is int:
                return E.Const(self.r.check_int(node, -v))
            case ast.UnaryOp(op=ast.USub()):
                return self.build(node, E.binop, "sub", 0, self.expr(node.operand, d))
            case ast.UnaryOp(op=ast.Invert()):
                return self.build(node, E.unop, "invert", self.expr(node.operand, d))
            case ast.BinOp() if type(node.op) in _EXPR_BINOPS:
                op = _EXPR_BINOPS[type(node.op)]
                operands = _chain(node)
                out = self.expr(operands[0], d)
                for n in operands[1:]:
                    out = self.build(node, E.binop, op, out, self.expr(n, d))
                return out
            case ast.Compare(ops=[cmp], comparators=[right]) if type(cmp) in _EXPR_COMPARE:
                return self.build(node, E.binop, _EXPR_COMPARE[type(cmp)], self.expr(node.left, d),
                                  self.expr(right, d))
            case ast.Compare():
                raise self.r.fail(node, "chained comparisons are not traceable", "combine comparisons with &")
            case ast.Call():
                return self.call(node, d)
            case ast.Subscript():
                raise self.r.fail(node, "a traced mask that reads a tensor cannot be stored as text "
                                  "(its table is not part of the repr)", "keep such a pattern in code")
        raise self.r.fail(node, f"{_NODE_WORDS.get(type(node), type(node).__name__ + ' syntax')} is not allowed "
                          "in a mask expression",
                          "use the lambda's parameters, integers, + - * // % & | ^ ~, comparisons, abs, "
                          "ac.where, ac.minimum, ac.maximum")

    def call(self, node: ast.Call, depth: int):
        from attncompiler.ir import expr as E

        path = _dotted(node.func)
        name = None
        if path is not None and (len(path) == 1 or path[:-1] in (("ac",), ("attncompiler",))):
            name = _EXPR_FUNCS.get(path[-1])
        if name is None or (path[-1] == "abs" and len(path) != 1):
            raise self.r.fail(node.func, "only abs, ac.where, ac.minimum and ac.maximum may be called in a mask")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise self.r.fail(node, f"{path[-1]}() takes positional arguments only")
        want = {"abs": 1, "where": 3}.get(name, 2)
        if len(node.args) != want:
            raise self.r.fail(node, f"{path[-1]}() takes {want} argument(s), got {len(node.args)}")
        args = [self.expr(a, depth) for a in node.args]
        if name == "abs":
            return self.build(node, E.unop, "abs", *args)
        if name == "where":
            return self.build(node, E.where, *args)
        return self.build(node, E.binop, name, *args)

    def build(self, node: ast.AST, fn: Callable, *args: Any):
        """Apply an Expr smart constructor; folded constants stay within int64."""
        from attncompiler.ir import expr as E

        try:
            out = fn(*args)
        except AttnCompilerError as e:
            raise self.r.fail(node, f"{type(e).__name__}: {e}") from None
        if isinstance(out, E.Const) and not isinstance(out.value, bool):
            self.r.check_int(node, out.value)
        return out


_NAMES_HINT = ("pattern text may use only the DSL constructors (ac.<name>(...), see "
               "attncompiler.patterns.text.dsl_names()), patterns.<catalogue name>(...), literals, "
               "range(...), | & ~ and .causal()")


def _dotted(node: ast.expr) -> tuple[str, ...] | None:
    """``a.b.c`` as ``("a", "b", "c")``, or None when it is not a plain dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return tuple(reversed(parts))


def _chain(node: ast.BinOp) -> list[ast.expr]:
    """Operands of a left-associated chain ``a op b op c`` of one operator, in order (iterative,
    so a long union is not a deep recursion)."""
    op = type(node.op)
    right: list[ast.expr] = []
    while isinstance(node, ast.BinOp) and type(node.op) is op:
        right.append(node.right)
        node = node.left
    return [node, *reversed(right)]
