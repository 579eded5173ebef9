"""Rendering: a pattern's index predicate and the kernel templates into one Triton source file.

The predicate :class:`~attncompiler.ir.expr.Expr` becomes the body of a small ``@triton.jit``
helper, ``_predicate(b, h, q_idx, kv_idx, bufs, buf_meta)``, called only on partial blocks.
Buffers (document ids, random-block tables, ...) are runtime tensors addressed by position,
never inlined, so the rendered text depends on the pattern's structure and not on the
sequence length. Python floor semantics of ``//`` and ``%`` are kept: Triton truncates toward
zero, so a division whose dividend may be negative goes through ``_floordiv``/``_mod``. Shifts
have constant counts in [0, 63] (the IR folds the others with torch's rules); ``<<`` is computed
in int64 unless bounds prove int32 suffices, ``>>`` is arithmetic, as torch's on int64.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attncompiler.ir.ops import BOOL
from attncompiler.ir.expr import BinOp, Const, Expr, Load, UnOp, Var, Where, binop
from attncompiler.ir.index import Index

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATES = ("common.py", "forward.py", "backward.py")
BODY = "# --- template body ---\n"
PRED_BEGIN = "# --- predicate ---\n"
SCORE_BEGIN = "# --- score_mod ---\n"
SCORE_END = "# --- end score_mod ---\n"
PRED_END = "# --- end predicate ---\n"

# Python operator precedence of what we emit (higher binds tighter); calls and names are 10.
_OPS = {"eq": ("==", 1), "ne": ("!=", 1), "lt": ("<", 1), "le": ("<=", 1), "gt": (">", 1), "ge": (">=", 1),
        "or": ("|", 2), "xor": ("^", 3), "and": ("&", 4), "lshift": ("<<", 5), "rshift": (">>", 5),
        "add": ("+", 6), "sub": ("-", 6),
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
        case BinOp(op="rshift", a=a) | BinOp(op="and", a=a, b=Const()) if e.kind != BOOL:
            return _nonneg(a) or (e.op == "and" and _nonneg(e.b))
        case Where(a=a, b=b):
            return _nonneg(a) and _nonneg(b)
    return False


def _count_subtrees(e: Expr, counts: dict[Expr, int]) -> None:
    counts[e] = counts.get(e, 0) + 1
    for c in e.children():
        _count_subtrees(c, counts)


# Where the rendered predicate may run: q_idx, kv_idx are int32 positions and b, h lie below
# the 65535 programs CUDA allows along the (batch * heads) grid axis. Bounds over this box (not
# over one sequence length) keep the kernel text independent of L.
_I32 = 2**31 - 1
_DOMAIN = {"q_idx": (0, _I32), "kv_idx": (0, _I32), "b": (0, 65535), "h": (0, 65535)}
_UNKNOWN = (-(2**62), 2**62)


class _Box(Expr):
    """A leaf standing for an already-bounded operand (to reuse the IR's interval rules)."""

    def __init__(self, rng: tuple[int, int], kind: str, const: Const | None = None):
        self.rng, self._kind, self.const = rng, kind, const

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self._kind

    def bounds(self, env):
        return np.int64(self.rng[0]), np.int64(self.rng[1])


def _fits32(rng: tuple[int, int]) -> bool:
    return -_I32 <= rng[0] and rng[1] <= _I32


class _Emitter:
    """Expression -> Triton text, with buffer positions assigned in first-use order.

    A subexpression that occurs more than once (a table lookup feeding several comparisons,
    say) is bound once to a temporary ``t<i>``: Triton evaluates every operand of ``&``, ``|``
    and ``tl.where`` anyway, so hoisting changes nothing but the number of loads and ops.

    Index arithmetic has int64 semantics (torch's): the positions arrive as int32, and an
    operation is computed in int32 only where interval bounds over :data:`_DOMAIN` prove every
    intermediate fits; otherwise its int32 operands are cast to ``tl.int64`` first. Table reads
    are int64 already, and constants beyond int32 are emitted as int64 scalars.
    """

    def __init__(self, buffers, root: Expr | None = None):
        self.slot = {buf: i for i, buf in enumerate(buffers)}
        self.counts: dict[Expr, int] = {}
        if root is not None:
            _count_subtrees(root, self.counts)
        self.temps: dict[Expr, tuple[str, bool]] = {}
        self.ranges: dict[Expr, tuple[int, int]] = {}
        self.emitted: dict[Expr, tuple[str, int, bool]] = {}
        self.lines: list[str] = []  # temporaries, in dependency order

    def statement(self, name: str, e: Expr) -> None:
        """Append ``name = <e>`` after the temporaries it needs."""
        text = self.emit(e)[0]
        self.lines.append(f"    {name} = {text}")

    # -- value ranges over the kernel's domain ----------------------------------------------
    def range(self, e: Expr) -> tuple[int, int]:
        """Bounds of ``e`` over :data:`_DOMAIN`; table reads are unknown (their data must not
        change the kernel text)."""
        got = self.ranges.get(e)
        if got is None:
            got = self.ranges[e] = self._range(e)
        return got

    def _range(self, e: Expr) -> tuple[int, int]:
        if e.kind == BOOL:
            return (0, 1)
        match e:
            case Var(name):
                return _DOMAIN[name]
            case Const(value=v):
                return (int(v), int(v))
            case Load() | Index():
                return _UNKNOWN
        kids = tuple(c if isinstance(c, Const) else _Box(self.range(c), c.kind) for c in e.children())
        match e:
            case BinOp(op=op):
                node: Expr = BinOp(op, *kids)
            case UnOp(op=op):
                node = UnOp(op, *kids)
            case Where():
                node = Where(*kids)
            case _:
                return _UNKNOWN
        lo, hi = node.bounds({})
        return int(np.min(lo)), int(np.max(hi))

    def _needs64(self, e: Expr) -> bool:
        """Whether ``e`` (an integer operation) may leave int32 in a value or an intermediate."""
        match e:
            case BinOp(op="add" | "sub" | "mul" | "lshift") | UnOp(op="abs"):
                return not _fits32(self.range(e))
            case BinOp(op="floordiv" | "mod", a=a):
                # The floor helpers never step outside their operands' range: |a // b| <= |a| and
                # |a % b| < |b| (a divisor of 0 has no answer in any width; -2**31 // -1 is the
                # one int32 overflow, excluded by a symmetric range).
                return not _fits32(self.range(a))
        return False  # min, max, where, bitwise ops: the result lies within the operands' type

    # -- emission -------------------------------------------------------------------------------
    def emit(self, e: Expr) -> tuple[str, int, bool]:
        """``(text, precedence, is_int64)`` of ``e``."""
        done = self.emitted.get(e)
        if done is not None:
            return done
        text, prec, wide = self._emit(e)
        if self.counts.get(e, 0) > 1 and not isinstance(e, (Var, Const)):
            name = f"t{len(self.temps)}"
            self.lines.append(f"    {name} = {text}")
            self.temps[e] = (name, wide)
            text, prec = name, 10
        self.emitted[e] = (text, prec, wide)
        return text, prec, wide

    def _any64(self, *operands: Expr) -> bool:
        """Whether an operand is int64 already (Triton then computes the operation in int64)."""
        return any(self.emit(x)[2] for x in operands)

    def operand(self, e: Expr, wide: bool) -> tuple[str, int, bool]:
        """``e`` emitted, cast to int64 when ``wide`` and it is an int32 integer."""
        text, prec, is64 = self.emit(e)
        if wide and not is64 and e.kind != BOOL and not isinstance(e, Const):  # literals adapt
            return f"{text if prec >= 10 else f'({text})'}.to(tl.int64)", 10, True
        return text, prec, is64

    def _emit(self, e: Expr) -> tuple[str, int, bool]:
        match e:
            case Var(name):
                return _VAR_NAMES[name], 10, False
            case Const(value=v):
                if not isinstance(v, bool) and not -_I32 - 1 <= v <= _I32:
                    return f"tl.full([], {v}, tl.int64)", 10, True
                return repr(v), (10 if isinstance(v, bool) or v >= 0 else 8), False
            case Index():
                return self.emit(e.lowered())
            case Load(buffer=buf, index=idx, fill=fill):
                i = self.emit(idx)[0]
                return f"_load_buf(bufs, buf_meta, {self.slot[buf]}, {i}, {fill})", 10, True
            case UnOp(op="abs", a=a):
                text, _, wide = self.operand(a, self._needs64(e))
                return f"tl.abs({text})", 10, wide
            case UnOp(op="invert", a=a):
                text, wide = self._wrap(a, 8, right=True)
                return f"~{text}", 8, wide
            case Where(cond=c, a=a, b=b):
                (ta, _, wa), (tb, _, wb) = self.emit(a), self.emit(b)
                return f"tl.where({self.emit(c)[0]}, {ta}, {tb})", 10, wa or wb
            case BinOp(op="min" | "max", a=a, b=b):
                fn = "tl.minimum" if e.op == "min" else "tl.maximum"
                (ta, _, wa), (tb, _, wb) = self.emit(a), self.emit(b)
                return f"{fn}({ta}, {tb})", 10, wa or wb
            case BinOp(op="floordiv" | "mod", a=a, b=Const(value=c)) if not isinstance(c, bool) and c != 0:
                wide = self._needs64(e)
                cabs = self.emit(Const(abs(c)))[0]  # beyond int32: an int64 scalar
                if c > 0 and _nonneg(a):  # C truncation and floor agree: plain operators read best
                    sym, prec = _OPS[e.op]
                    text, w = self._wrap(a, prec, False, wide)
                    return f"{text} {sym} {cabs}", prec, w or abs(c) > _I32
                fn = "_floordiv_pos" if e.op == "floordiv" else "_mod_pos"
                if c > 0:
                    text, _, w = self.operand(a, wide)
                    return f"{fn}({text}, {cabs})", 10, w or abs(c) > _I32
                # a // c == (-a) // (-c) and a % c == -((-a) % (-c)) for c < 0
                neg, _, w = self.operand(binop("sub", 0, a), wide)
                call = f"{fn}({neg}, {cabs})"
                w = w or abs(c) > _I32
                return (call, 10, w) if e.op == "floordiv" else (f"-{call}", 8, w)
            case BinOp(op="floordiv" | "mod", a=a, b=b):
                fn = "_floordiv" if e.op == "floordiv" else "_mod"
                wide = self._needs64(e) and not self._any64(a, b)
                (ta, _, wa), (tb, _, wb) = self.operand(a, wide), self.operand(b, wide)
                return f"{fn}({ta}, {tb})", 10, wa or wb
            case BinOp(op=op, a=a, b=b):
                sym, prec = _OPS[op]
                wide = e.kind != BOOL and self._needs64(e) and not self._any64(a, b)
                ta, wa = self._wrap(a, prec, False, wide)
                tb, wb = self._wrap(b, prec, True, wide)
                return f"{ta} {sym} {tb}", prec, (wa or wb) and e.kind != BOOL
        raise AssertionError(f"cannot render expression node {e!r}")

    def _wrap(self, e: Expr, prec: int, right: bool, wide: bool = False) -> tuple[str, bool]:
        text, p, is64 = self.operand(e, wide)
        # Comparisons chain in Python, so a comparison operand of a comparison is wrapped too.
        if p < prec or (p == prec == 1) or (right and p == prec):
            return f"({text})", is64
        return text, is64


class ScoreEmitter(_Emitter):
    """The predicate's integer emitter, for the index parts of a rendered score_mod
    (:mod:`.score_render`): the same int32/int64 rules and table reads."""

    def __init__(self, buffers):
        super().__init__(buffers)


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
    for buf in expr.buffers():  # a table's length is runtime data: it must not change the kernel text
        text = text.replace(repr(buf), buf.name)
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
def read_template(name: str) -> str:
    """The body of template ``name`` (the text after its body marker), cached."""
    text = (TEMPLATE_DIR / name).read_text()
    if BODY not in text:
        raise AssertionError(f"template {name} has no body marker")
    return text.split(BODY, 1)[1]


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
    score_mod: str = ""  # the rendered _score_mod/_score_mod_grad helpers ("": none, the stubs stay)

    def header(self, key: str) -> str:
        mask = ("opaque mask_mod: partial blocks read per-block byte masks built with the layout"
                if self.opaque else "traced predicate, rendered into _predicate (partial blocks only)")
        pattern = self.pattern_repr.replace("\n", " ")
        return ("# Generated by attncompiler: block-sparse flash attention, forward and backward.\n"
                f"# pattern:   {pattern}\n"
                f"# schedule:  {self.schedule}\n"
                f"# dtype:     {self.dtype} (tl.dot input precision {self.dot_precision!r})\n"
                f"# mask:      {mask}\n"
                + ("# score_mod: traced, rendered into _score_mod and _score_mod_grad (SCORE_MOD=True)\n"
                   if self.score_mod else "")
                + f"# cache key: {key}\n"
                "# Kernels: _attn_fwd, _attn_fwd_split (split-K decoding), _attn_bwd_dkdv (per key tile, over the\n"
                "# transposed lists), _attn_bwd_dq.\n"
                "# Regenerated from the templates when missing or corrupt; edits are overwritten.\n")

    def render(self, key: str) -> str:
        """The complete generated module."""
        common = read_template("common.py")
        before, rest = common.split(PRED_BEGIN, 1)
        _, after = rest.split(PRED_END, 1)
        body = before + self.predicate + after
        if self.score_mod:
            head, rest = body.split(SCORE_BEGIN, 1)
            _, tail = rest.split(SCORE_END, 1)
            body = head + self.score_mod + tail
        return (self.header(key) + "\nimport triton\nimport triton.language as tl\n\n"
                + body.rstrip() + "\n" + read_template("forward.py").rstrip() + "\n"
                + read_template("backward.py").rstrip() + "\n")
