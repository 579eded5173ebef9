"""The primitive mask patterns (windows, strides, global tokens, random blocks, documents,
traced ``mask_mod`` functions) and their public constructors, which validate the parameters.

Each primitive knows its predicate as an :class:`~attncompiler.ir.expr.Expr` and its block
structure analytically (see :mod:`attncompiler.layout.block_sets`). :mod:`attncompiler.dsl.pattern` holds
the base class and the combinators and re-exports everything defined here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ..ir import expr as E
from ..errors import PatternError
from ..ir.expr import Expr
from ..ir.trace import trace_uses
from ..ir.index import check_index_ranges
from ..ir.transform import substitute
from .pattern import INT_LIMIT, Pattern, check_int, short_list

# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every key."""

    def predicate(self, q_len, kv_len):
        return E.Const(True)

    def __repr__(self) -> str:
        return "ac.full()"


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """``|q - k| <= window``."""

    window: int

    def predicate(self, q_len, kv_len):
        return abs(E.Q - E.KV) <= self.window

    def __repr__(self) -> str:
        return f"ac.sliding_window({self.window})"


@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """``|q - k| <= window * dilation`` and ``(q - k) % dilation == 0``."""

    window: int
    dilation: int

    def predicate(self, q_len, kv_len):
        d = E.Q - E.KV
        return (abs(d) <= self.window * self.dilation) & (d % self.dilation).eq(0)

    def __repr__(self) -> str:
        return f"ac.dilated_window({self.window}, {self.dilation})"


@dataclass(frozen=True)
class BlockLocal(Pattern):
    """``q // block == k // block``."""

    block: int

    def predicate(self, q_len, kv_len):
        return (E.Q // self.block).eq(E.KV // self.block)

    def __repr__(self) -> str:
        return f"ac.block_local({self.block})"


@dataclass(frozen=True)
class BlockWindow(Pattern):
    """``|q // block - k // block| <= window``: a sliding window over whole blocks (BigBird)."""

    window: int
    block: int

    def predicate(self, q_len, kv_len):
        return abs(E.Q // self.block - E.KV // self.block) <= self.window

    def __repr__(self) -> str:
        return f"ac.block_window({self.window}, block={self.block})"


@dataclass(frozen=True)
class Strided(Pattern):
    """``(q - k) % stride == 0``."""

    stride: int

    def predicate(self, q_len, kv_len):
        return ((E.Q - E.KV) % self.stride).eq(0)

    def __repr__(self) -> str:
        return f"ac.strided({self.stride})"


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """``q in indices or k in indices``: global tokens see and are seen by everything.

    ``clip``: indices at or past the sequence length are dropped at that length (a catalogue
    pattern's "first n tokens are global" at a shorter sequence) instead of being an error.
    """

    indices: tuple[int, ...]
    clip: bool = False

    def validate(self, q_len, kv_len):
        bad = [i for i in self.indices if i >= max(q_len, kv_len)]
        if bad and not self.clip:
            raise PatternError(
                f"global token indices {bad[:5]} are out of range for q_len={q_len}, kv_len={kv_len}; "
                "indices must be < the sequence length"
            )

    def runs(self) -> list[tuple[int, int]]:
        """The indices as maximal half-open ranges ``[lo, hi)``."""
        out: list[list[int]] = []
        for i in self.indices:
            if out and out[-1][1] == i:
                out[-1][1] = i + 1
            else:
                out.append([i, i + 1])
        return [(a, b) for a, b in out]

    def predicate(self, q_len, kv_len):
        runs = self.runs()
        if len(runs) <= 4:  # a few range checks keep the rendered kernel independent of L
            def member(x: Expr) -> Expr:
                terms = [x.eq(lo) if hi == lo + 1 else (x >= lo) & (x < hi) for lo, hi in runs]
                return functools.reduce(lambda a, b: a | b, terms)
        else:
            n = max(q_len, kv_len)
            is_global = np.zeros(n, dtype=np.int64)  # indices >= n exist only when clipped
            is_global[[i for i in self.indices if i < n]] = 1
            buf = E.Buffer("is_global", is_global)

            def member(x: Expr) -> Expr:
                return E.Load(buf, x, 0).eq(1)
        return member(E.Q) | member(E.KV)

    def __repr__(self) -> str:
        clip = ", clip=True" if self.clip else ""
        return f"ac.global_tokens({short_list(self.indices)}{clip})"


@dataclass(frozen=True)
class RandomBlocks(Pattern):
    """Each query block (of ``block`` rows) sees ``count`` distinct key blocks drawn from ``seed``."""

    count: int
    block: int
    seed: int

    def table(self, q_len: int, kv_len: int) -> np.ndarray:
        """``[ceil(q_len/block), min(count, nkb)]`` key-block ids per query block (cached)."""
        return _random_block_table(self.count, self.block, self.seed, -(-q_len // self.block), -(-kv_len // self.block))

    def predicate(self, q_len, kv_len):
        tab = self.table(q_len, kv_len)
        r = tab.shape[1]
        if r == 0:
            return E.Const(False)
        buf = E.Buffer("random_blocks", tab.reshape(-1))
        row = (E.Q // self.block) * r
        kb = E.KV // self.block
        out: Expr = E.Const(False)
        for j in range(r):
            out = out | E.Load(buf, row + j).eq(kb)
        return out

    def __repr__(self) -> str:
        return f"ac.random_blocks({self.count}, block={self.block}, seed={self.seed})"


@functools.lru_cache(maxsize=64)
def _random_block_table(count: int, block: int, seed: int, nqb: int, nkb: int) -> np.ndarray:
    r = min(count, nkb)
    if r == nkb:
        tab = np.broadcast_to(np.arange(nkb, dtype=np.int64), (nqb, nkb)).copy()
    else:
        rng = np.random.default_rng(seed)
        tab = np.empty((nqb, r), dtype=np.int64)
        for j in range(r):  # draw column j; redraw the rows that collide with earlier picks
            cand = rng.integers(0, nkb, size=nqb)
            clash = (tab[:, :j] == cand[:, None]).any(axis=1)
            while clash.any():
                cand[clash] = rng.integers(0, nkb, size=int(clash.sum()))
                clash = (tab[:, :j] == cand[:, None]).any(axis=1)
            tab[:, j] = cand
        tab.sort(axis=1)
    tab.setflags(write=False)
    return tab


@dataclass(frozen=True)
class PrefixLM(Pattern):
    """``k < prefix or k <= q``: a bidirectional prefix followed by causal attention."""

    prefix: int

    def predicate(self, q_len, kv_len):
        return (E.KV < self.prefix) | (E.KV <= E.Q)

    def __repr__(self) -> str:
        return f"ac.prefix_lm({self.prefix})"


@dataclass(frozen=True)
class Document(Pattern):
    """Query and key lie in the same segment of a packed sequence of these lengths.

    Positions past ``sum(lengths)`` belong to no document and see nothing.
    """

    lengths: tuple[int, ...]

    def offsets(self, n: int) -> np.ndarray:
        """Segment boundaries ``[0, end_0, end_1, ...]`` clipped to the first ``n`` positions.

        Clipping keeps every table built from it O(n + documents), never O(sum(lengths)), and
        the running sum inside int64.
        """
        ends = np.cumsum(np.minimum(np.asarray(self.lengths, dtype=np.int64), n))
        return np.minimum(np.concatenate([[0], ends]), n).astype(np.int64)

    def predicate(self, q_len, kv_len):
        off = self.offsets(max(q_len, kv_len))
        ids = np.repeat(np.arange(len(self.lengths), dtype=np.int64), np.diff(off))  # [<= max(q_len, kv_len)]
        buf = E.Buffer("doc_id", ids)
        return E.Load(buf, E.Q, -1).eq(E.Load(buf, E.KV, -2))

    def __repr__(self) -> str:
        return f"ac.document({short_list(self.lengths)})"


@dataclass(frozen=True, eq=False)
class Mask(Pattern):
    """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    Traced into an :class:`Expr` when possible (``expr`` is then set, the pattern compares
    structurally and its ``b``/``h`` dependence is read off the expression); otherwise kept
    opaque and evaluated chunk by chunk on tensors. For an opaque ``fn``, ``per_batch`` /
    ``per_head`` are True (evaluate per batch entry / head), False (declared independent: the
    b=0 / h=0 mask serves all) or None (undeclared: checked against the actual batch and heads
    when the pattern is used, see :func:`check_batch_head_dependence`).
    """

    fn: Callable | None
    expr: Expr | None
    per_head: bool | None = None
    per_batch: bool | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if self.expr is not None or other.expr is not None:
            return self.expr == other.expr
        return (self.fn, self.per_head, self.per_batch) == (other.fn, other.per_head, other.per_batch)

    def __hash__(self) -> int:
        return hash(("mask", self.expr)) if self.expr is not None else hash(("mask", self.fn, self.per_head, self.per_batch))

    @property
    def traced(self) -> bool:
        return self.expr is not None

    @property
    def head_period(self):
        if self.expr is not None:
            return None if "h" in self.expr.variables() else 1
        return None if self.per_head else 1

    @property
    def batch_dependent(self):
        if self.expr is not None:
            return "b" in self.expr.variables()
        return bool(self.per_batch)

    def specialize(self, b, h):
        if self.expr is not None and self.expr.variables() & {"b", "h"}:
            # Substitution checks table indices that become constants (``docs[b, q]`` at b=2).
            return Mask(None, substitute(self.expr, {"b": b, "h": h}))
        if self.expr is None and (self.per_head or self.per_batch):
            return Mask(functools.partial(_call_at, self.fn, b, h), None, False, False)
        return self

    def validate(self, q_len, kv_len):
        if self.expr is not None:
            check_index_ranges(self.expr, q_len, kv_len)

    def predicate(self, q_len, kv_len):
        return self.expr

    def evaluate(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if self.expr is not None:
            return super().evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        shape = torch.broadcast_shapes(q_idx.shape, kv_idx.shape)
        try:
            out = self.fn(torch.as_tensor(b), torch.as_tensor(h), q_idx, kv_idx)
        except RuntimeError as e:
            if "Boolean value of Tensor" not in str(e):
                raise PatternError(f"mask_mod {_fn_name(self.fn)} raised RuntimeError: {e}") from e
            # Python control flow on an index (`if q > k:`): correct one element at a time.
            return _evaluate_elementwise(self.fn, b, h, q_idx, kv_idx, shape)
        except Exception as e:  # a user function failing on tensors: say which and how
            raise PatternError(f"mask_mod {_fn_name(self.fn)} raised {type(e).__name__}: {e}") from e
        return _check_mask_output(self.fn, out, shape)

    def __repr__(self) -> str:
        if self.expr is not None:
            return f"ac.mask(lambda b, h, q_idx, kv_idx: {self.expr!r})"
        return f"ac.mask({_fn_name(self.fn)})"


def _call_at(fn, b, h, _b, _h, q, k):
    return fn(torch.as_tensor(b), torch.as_tensor(h), q, k)


def _fn_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.args[0] if fn.func is _call_at else fn.func
    return getattr(fn, "__qualname__", None) or repr(fn)


def _check_mask_output(fn, out, shape) -> torch.Tensor:
    """``out`` as a bool tensor of ``shape``, or a PatternError saying what ``fn`` returned."""
    if not isinstance(out, torch.Tensor):
        try:
            out = torch.as_tensor(out)
        except (TypeError, RuntimeError, ValueError):
            raise PatternError(
                f"mask_mod {_fn_name(fn)} returned {type(out).__name__} {out!r}; "
                "it must return a bool tensor") from None
    if out.dtype != torch.bool:
        raise PatternError(f"mask_mod {_fn_name(fn)} returned dtype {out.dtype}; it must return a bool tensor")
    try:
        return torch.broadcast_to(out, shape)
    except RuntimeError:
        raise PatternError(
            f"mask_mod {_fn_name(fn)} returned shape {tuple(out.shape)} for index tensors "
            f"broadcasting to {tuple(shape)}; it must be element-wise"
        ) from None


# Elements a mask_mod with Python control flow on an index is called for, one call each, in
# one evaluation (a chunk of a layout, a dense mask): about a second of Python calls.
ELEMENTWISE_LIMIT = 1 << 16


def _evaluate_elementwise(fn, b, h, q_idx, kv_idx, shape) -> torch.Tensor:
    """``fn`` called once per (q, kv) element with 0-d tensors, for mask_mods that branch on an
    index with Python ``if`` (which tensors of indices cannot take)."""
    n = math.prod(shape)
    if n > ELEMENTWISE_LIMIT:
        raise PatternError(
            f"mask_mod {_fn_name(fn)} uses Python control flow (`if`, `and`, `or`, `not`) on an index, "
            f"so it can only be evaluated one element at a time, and this evaluation has {n} elements "
            f"(more than {ELEMENTWISE_LIMIT}). Write the condition with `&`, `|`, `~` and "
            "`torch.where(cond, a, b)` instead: it then traces into a predicate that runs in kernels"
        )
    qs, ks = torch.broadcast_tensors(q_idx, kv_idx)
    bt, ht = torch.as_tensor(b), torch.as_tensor(h)
    out = torch.empty(shape, dtype=torch.bool)
    flat_q, flat_k, flat_out = qs.reshape(-1), ks.reshape(-1), out.view(-1)
    for i in range(n):
        try:
            v = fn(bt, ht, flat_q[i], flat_k[i])
        except Exception as e:
            raise PatternError(f"mask_mod {_fn_name(fn)} raised {type(e).__name__} at q_idx={int(flat_q[i])}, "
                               f"kv_idx={int(flat_k[i])}: {e}") from e
        flat_out[i] = bool(_check_mask_output(fn, v, ()))
    return out.to(qs.device)


# ---------------------------------------------------------------------------------------------
# Batch / head dependence of opaque mask_mods
# ---------------------------------------------------------------------------------------------

_PROBE_POINTS = 48  # probe positions per axis (plus the first and last)


def check_batch_head_dependence(pattern: Pattern, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    """Raise :class:`PatternError` if an opaque mask_mod of ``pattern`` that did not declare
    ``per_batch`` / ``per_head`` gives a different mask for some batch entry ``b < batch`` than
    for ``b = 0`` (or head ``h < heads`` than ``h = 0``) on a probe grid of positions.

    Without this check such a mask would silently use the b=0 / h=0 mask everywhere (as
    FlexAttention's ``B=None, H=None`` broadcast does). Called with the actual sizes when a
    layout or the reference is built.
    """
    for m in _undeclared_opaque(pattern):
        try:
            _probe(m, int(batch), int(heads), int(q_len), int(kv_len))
        except TypeError:  # unhashable mask_mod: probe without the cache
            _probe.__wrapped__(m, int(batch), int(heads), int(q_len), int(kv_len))


def _undeclared_opaque(p: Pattern):
    if isinstance(p, Mask):
        if p.expr is None and (p.per_batch is None or p.per_head is None):
            yield p
        return
    for c in p.children():
        yield from _undeclared_opaque(c)


def _probe_positions(n: int) -> torch.Tensor:
    if n <= 2 * _PROBE_POINTS:
        return torch.arange(n)
    even = torch.linspace(0, n - 1, _PROBE_POINTS).round().long()
    rand = torch.randint(0, n, (_PROBE_POINTS,), generator=torch.Generator().manual_seed(n))
    return torch.unique(torch.cat([even, rand, torch.tensor([0, n - 1])]))


@functools.lru_cache(maxsize=256)
def _probe(m: Mask, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    q, k = _probe_positions(q_len)[:, None], _probe_positions(kv_len)[None, :]
    base = m.evaluate(0, 0, q, k, q_len, kv_len)
    for name, flag, n in (("b", m.per_batch, batch), ("h", m.per_head, heads)):
        if flag is not None:
            continue
        for i in range(1, n):
            b, h = (i, 0) if name == "b" else (0, i)
            diff = (m.evaluate(b, h, q, k, q_len, kv_len) != base).nonzero()
            if len(diff):
                qi, ki = (int(x) for x in diff[0])
                option, what = ("per_batch", "batch entry") if name == "b" else ("per_head", "head")
                raise PatternError(
                    f"mask_mod {_fn_name(m.fn)} depends on the {what} {name}: at {name}={i} it differs from "
                    f"{name}=0 (q_idx={int(q[qi, 0])}, kv_idx={int(k[0, ki])}), but it is opaque and did not "
                    f"declare it, so every {what} would silently get {name}=0's mask. Pass "
                    f"ac.mask(fn, {option}=True), or {option}=False to use {name}=0's mask everywhere"
                )


# ---------------------------------------------------------------------------------------------
# Public constructors (validation lives here)
# ---------------------------------------------------------------------------------------------

def full() -> Pattern:
    """Dense attention: every query sees every key."""
    return Full()


def sliding_window(window: int) -> Pattern:
    """Local attention: ``|q - k| <= window`` (``window`` keys on each side plus the diagonal)."""
    return SlidingWindow(check_int("window", window, 0))


def dilated_window(window: int, dilation: int) -> Pattern:
    """Dilated local attention: ``|q - k| <= window * dilation`` and ``(q - k) % dilation == 0``."""
    w, d = check_int("window", window, 0), check_int("dilation", dilation, 1)
    if w * d > INT_LIMIT:
        raise PatternError(f"window * dilation = {w} * {d} = {w * d} is out of range: the reach of a dilated "
                           "window must be <= 2**62 (index arithmetic must fit in int64)")
    return DilatedWindow(w, d)


def block_local(block: int) -> Pattern:
    """Block-diagonal attention: ``q // block == k // block``."""
    return BlockLocal(check_int("block", block, 1))


def block_window(window: int, block: int) -> Pattern:
    """Block-granular sliding window: ``|q // block - k // block| <= window`` (BigBird's window).

    Args:
        window: how many neighbouring blocks on each side a query block sees.
        block: the block size in tokens.
    """
    return BlockWindow(check_int("window", window, 0), check_int("block", block, 1))


def strided(stride: int) -> Pattern:
    """Strided attention: ``(q - k) % stride == 0``."""
    return Strided(check_int("stride", stride, 1))


def global_tokens(indices: Iterable[int], *, clip: bool = False) -> Pattern:
    """Global tokens: ``q in indices or k in indices``.

    Args:
        indices: positions that attend to, and are attended by, every position.
        clip: at a sequence shorter than an index, drop that index (the tokens that exist stay
            global) instead of raising a :class:`PatternError`. Default False.
    """
    if not isinstance(clip, bool):
        raise PatternError(f"clip={clip!r} must be True or False")
    if isinstance(indices, (int, np.integer)):
        indices = [indices]
    try:
        idx = sorted({check_int("global token index", i, 0) for i in indices})
    except TypeError:
        raise PatternError(f"global_tokens needs an iterable of integers, got {indices!r}") from None
    if not idx:
        raise PatternError("global_tokens([]) is empty; pass at least one index (or drop the term)")
    return GlobalTokens(tuple(idx), clip)


def random_blocks(count: int, block: int, seed: int = 0) -> Pattern:
    """Random block attention (BigBird): each query block sees ``count`` distinct key blocks.

    The draw is deterministic for a given ``seed`` and number of blocks. When there are fewer
    than ``count`` key blocks, every key block is seen.
    """
    return RandomBlocks(check_int("count", count, 0), check_int("block", block, 1), check_int("seed", seed, 0))


def prefix_lm(prefix: int) -> Pattern:
    """Prefix-LM attention: ``k < prefix or k <= q``."""
    return PrefixLM(check_int("prefix", prefix, 0))


def document(lengths: Iterable[int]) -> Pattern:
    """Document packing: query and key fall in the same segment of the packed sequence.

    Args:
        lengths: the length of each packed document, in order; positions past their sum
            belong to no document and see no key.
    """
    try:
        ls = tuple(check_int("document length", n, 1) for n in lengths)
    except TypeError:
        raise PatternError(f"document needs an iterable of positive lengths, got {lengths!r}") from None
    if not ls:
        raise PatternError("document([]) has no documents; pass at least one length")
    return Document(ls)


def mask(fn: Callable, *, per_head: bool | None = None, per_batch: bool | None = None) -> Pattern:
    """A pattern from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    ``fn`` is first called with symbolic indices. If it uses only arithmetic, comparisons,
    ``& | ~ % //``, ``abs``, ``torch.where`` and indexing of integer/bool tensors (any number
    of dimensions, torch's rules: negative indices wrap, out of range is an error), the result
    is an :class:`Expr` the compiler analyzes and renders into kernels, with int64 index
    arithmetic, and ``b``/``h`` dependence is read off it. Otherwise ``fn`` stays opaque and is
    evaluated chunk by chunk (one element at a time where it branches on an index with ``if``).

    Args:
        per_head, per_batch: for an opaque ``fn`` only: True evaluates it per head / batch entry;
            False declares it independent (the h=0 / b=0 mask is used everywhere, FlexAttention's
            ``H=None``/``B=None``); None (default) means per head / batch entry when tracing saw
            ``fn`` touch ``h`` / ``b``, and otherwise a check, with the actual heads and batch
            size, that it does not depend on them (a PatternError if it does).
    """
    if not callable(fn):
        raise PatternError(f"mask() needs a callable mask_mod(b, h, q_idx, kv_idx), got {fn!r}")
    for name, v in (("per_head", per_head), ("per_batch", per_batch)):
        if v is not None and not isinstance(v, (bool, np.bool_)):
            raise PatternError(f"{name}={v!r} must be True, False or None")
    e, uses = trace_uses(fn)
    if e is not None:
        return Mask(None, e)
    if per_head is None and "h" in uses:
        per_head = True
    if per_batch is None and "b" in uses:
        per_batch = True
    return Mask(fn, None, None if per_head is None else bool(per_head), None if per_batch is None else bool(per_batch))
