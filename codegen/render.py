"""Rendering: a pattern's index predicate and the kernel templates into one Triton source file.

The predicate :class:`~attncompiler.expr.Expr` becomes the body of a small ``@triton.jit``
helper, ``_predicate(b, h, q_idx, kv_idx, bufs, buf_meta)``, called only on partial blocks.
Buffers (document ids, random-block tables, ...) are runtime tensors addressed by position,
never inlined, so the rendered text depends on the pattern's structure and not on the
sequence length. Python floor semantics of ``//`` and ``%`` are kept: Triton truncates toward
zero, so a division whose dividend may be negative goes through ``_floordiv``/``_mod``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from attncompiler import expr as E
from attncompiler.expr import BOOL, BinOp, Const, Expr, Load, UnOp, Var, Where

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATES = ("common.py", "forward.py", "backward.py")
_BODY = "# --- template body ---\n"
_PRED_BEGIN = "# --- predicate ---\n"
_PRED_END = "# --- end predicate ---\n"

# Python operator precedence of what we emit (higher binds tighter); calls and names are 10.
_OPS = {"eq": ("==", 1), "ne": ("!=", 1), "lt": ("<", 1), "le": ("<=", 1), "gt": (">", 1), "ge": (">=", 1),
        "or": ("|", 2), "xor": ("^", 3), "and": ("&", 4), "add": ("+", 6), "sub": ("-", 6),
        "mul": ("*", 7), "floordiv": ("//", 7), "mod": ("%", 7)}
_VAR_NAMES = {"b": "b", "h": "h", "q_idx": "q_idx", "kv_idx": "kv_idx"}


def _nonneg(e: Expr) -> bool:
    """Whether ``e`` is surely >= 0 from its structure alone (index variables are >= 0)."""
    match e:
        case Var():
            return True
        case Const(value=v):
            return not isinstance(v, bool) and v >= 0
        case UnOp(op="abs"):
            return True
        case BinOp(op="add" | "mul" | "min", a=a, b=b):
            return _nonneg(a) and _nonneg(b)
        case BinOp(op="max", a=a, b=b):
            return _nonneg(a) or _nonneg(b)
        case BinOp(op="floordiv" | "mod", a=a, b=Const(value=v)) if not isinstance(v, bool) and v > 0:
            return _nonneg(a)
        case Where(a=a, b=b):
            return _nonneg(a) and _nonneg(b)
    return False


def _count_subtrees(e: Expr, counts: dict[Expr, int]) -> None:
    counts[e] = counts.get(e, 0) + 1
    for c in e.children():
        _count_subtrees(c, counts)


class _Emitter:
    """Expression -> Triton text, with buffer positions assigned in first-use order.

    A subexpression that occurs more than once (a table lookup feeding several comparisons,
    say) is bound once to a temporary ``t<i>``: Triton evaluates every operand of ``&``, ``|``
    and ``tl.where`` anyway, so hoisting changes nothing but the number of loads and ops.
    """

    def __init__(self, buffers, root: Expr | None = None):
        self.slot = {buf: i for i, buf in enumerate(buffers)}
        self.counts: dict[Expr, int] = {}
        if root is not None:
            _count_subtrees(root, self.counts)
        self.temps: dict[Expr, str] = {}
        self.lines: list[str] = []  # temporaries, in dependency order

    def statement(self, name: str, e: Expr) -> None:
        """Append ``name = <e>`` after the temporaries it needs."""
        text = self.emit(e)[0]
        self.lines.append(f"    {name} = {text}")

    def emit(self, e: Expr) -> tuple[str, int]:
        if e in self.temps:
            return self.temps[e], 10
        text, prec = self._emit(e)
        if self.counts.get(e, 0) > 1 and not isinstance(e, (Var, Const)):
            name = f"t{len(self.temps)}"
            self.lines.append(f"    {name} = {text}")
            self.temps[e] = name
            return name, 10
        return text, prec

    def _emit(self, e: Expr) -> tuple[str, int]:
        match e:
            case Var(name):
                return _VAR_NAMES[name], 10
            case Const(value=v):
                return repr(v), (10 if isinstance(v, bool) or v >= 0 else 8)
            case Load(buffer=buf, index=idx, fill=fill):
                i, _ = self.emit(idx)
                return f"_load_buf(bufs, buf_meta, {self.slot[buf]}, {i}, {fill})", 10
            case UnOp(op="abs", a=a):
                return f"tl.abs({self.emit(a)[0]})", 10
            case UnOp(op="invert", a=a):
                return f"~{self._wrap(a, 8, right=True)}", 8
            case Where(cond=c, a=a, b=b):
                return f"tl.where({self.emit(c)[0]}, {self.emit(a)[0]}, {self.emit(b)[0]})", 10
            case BinOp(op="min" | "max", a=a, b=b):
                fn = "tl.minimum" if e.op == "min" else "tl.maximum"
                return f"{fn}({self.emit(a)[0]}, {self.emit(b)[0]})", 10
            case BinOp(op="floordiv" | "mod", a=a, b=Const(value=c)) if not isinstance(c, bool) and c != 0:
                if c > 0 and _nonneg(a):  # C truncation and floor agree: plain operators read best
                    sym, prec = _OPS[e.op]
                    return f"{self._wrap(a, prec, False)} {sym} {c}", prec
                fn = "_floordiv_pos" if e.op == "floordiv" else "_mod_pos"
                if c > 0:
                    return f"{fn}({self.emit(a)[0]}, {c})", 10
                # a // c == (-a) // (-c) and a % c == -((-a) % (-c)) for c < 0
                neg = self.emit(E.binop("sub", 0, a))[0]
                call = f"{fn}({neg}, {-c})"
                return (call, 10) if e.op == "floordiv" else (f"-{call}", 8)
            case BinOp(op="floordiv" | "mod", a=a, b=b):
                fn = "_floordiv" if e.op == "floordiv" else "_mod"
                return f"{fn}({self.emit(a)[0]}, {self.emit(b)[0]})", 10
            case BinOp(op=op, a=a, b=b):
                sym, prec = _OPS[op]
                return f"{self._wrap(a, prec, False)} {sym} {self._wrap(b, prec, True)}", prec
        raise AssertionError(f"cannot render expression node {e!r}")

    def _wrap(self, e: Expr, prec: int, right: bool) -> str:
        text, p = self.emit(e)
        # Comparisons chain in Python, so a comparison operand of a comparison is wrapped too.
        if p < prec or (p == prec == 1) or (right and p == prec):
            return f"({text})"
        return text


def _terms(e: Expr, op: str) -> list[Expr]:
    if isinstance(e, BinOp) and e.op == op and e.kind == BOOL:
        return _terms(e.a, op) + _terms(e.b, op)
    return [e]


@functools.lru_cache(maxsize=256)
def render_predicate(expr: Expr | None) -> str:
    """The ``_predicate`` helper for ``expr`` (None: an opaque mask_mod, read from byte masks)."""
    head = ("@triton.jit\ndef _predicate(b, h, q_idx, kv_idx, bufs, buf_meta):\n")
    if expr is None:
        return (head + "    # Opaque mask_mod: partial blocks read byte masks built with the layout\n"
                "    # (OPAQUE=True), so this helper is never called.\n"
                "    return (q_idx >= 0) & (kv_idx >= 0)\n")
    if isinstance(expr, Const):  # still a [TM, TN] block, whatever the indices
        cmp = "==" if expr.value else "!="
        return head + f"    return (q_idx {cmp} q_idx) & (kv_idx == kv_idx)\n"
    em = _Emitter(expr.buffers(), expr)
    text = repr(expr)
    comment = [f"    # {text}"] if len(text) <= 160 else []  # the expression as the user wrote it
    for op, sym in (("or", "|"), ("and", "&")):
        terms = _terms(expr, op)
        if len(terms) > 1:
            for i, t in enumerate(terms):
                em.statement(f"m{i}", t)
            result = f" {sym} ".join(f"m{i}" for i in range(len(terms)))
            break
    else:
        result = em.emit(expr)[0]
    return head + "\n".join(comment + em.lines + [f"    return {result}"]) + "\n"


@functools.lru_cache(maxsize=None)
def _template(name: str) -> str:
    text = (TEMPLATE_DIR / name).read_text()
    if _BODY not in text:
        raise AssertionError(f"template {name} has no body marker")
    return text.split(_BODY, 1)[1]


def template_digest() -> str:
    """Hash of the template files (part of every cache key)."""
    h = hashlib.sha256()
    for name in TEMPLATES:
        h.update((TEMPLATE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class KernelSource:
    """What one generated file is made of (everything the cache key covers, plus the text)."""

    pattern_repr: str
    predicate: str  # the rendered _predicate helper
    opaque: bool
    schedule: str
    dtype: str
    dot_precision: str

    def header(self, key: str) -> str:
        mask = ("opaque mask_mod: partial blocks read per-block byte masks built with the layout"
                if self.opaque else "traced predicate, rendered into _predicate (partial blocks only)")
        pattern = self.pattern_repr.replace("\n", " ")
        return ("# Generated by attncompiler: block-sparse flash attention, forward and backward.\n"
                f"# pattern:   {pattern}\n"
                f"# schedule:  {self.schedule}\n"
                f"# dtype:     {self.dtype} (tl.dot input precision {self.dot_precision!r})\n"
                f"# mask:      {mask}\n"
                f"# cache key: {key}\n"
                "# Kernels: _attn_fwd, _attn_bwd_dkdv (per key tile, over the transposed lists), _attn_bwd_dq.\n"
                "# Regenerated from the templates when missing or corrupt; edits are overwritten.\n")

    def render(self, key: str) -> str:
        """The complete generated module."""
        common = _template("common.py")
        before, rest = common.split(_PRED_BEGIN, 1)
        _, after = rest.split(_PRED_END, 1)
        body = before + self.predicate + after
        return (self.header(key) + "\nimport triton\nimport triton.language as tl\n\n"
                + body.rstrip() + "\n" + _template("forward.py").rstrip() + "\n"
                + _template("backward.py").rstrip() + "\n")
