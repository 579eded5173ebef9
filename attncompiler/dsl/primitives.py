"""The primitive mask patterns (windows, strides, global tokens, random blocks, documents,
traced ``mask_mod`` functions) and their public constructors, which validate the parameters.

Each primitive knows its predicate as an :class:`~attncompiler.ir.expr.Expr` and its block
structure analytically (see :mod:`attncompiler.layout.block_sets`). :mod:`attncompiler.dsl.pattern` holds
the base class and the combinators and re-exports everything defined here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..ir import expr as E
from ..errors import InputError, PatternError
from ..ir.expr import Expr
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

    Positions past ``sum(lengths)`` belong to no document and see nothing. ``lengths=None``
    (``ac.document()``): the documents are call-time data, ``cu_seqlens``, bound per call with
    :func:`bind_documents`; such a pattern has no layout or mask until then.
    """

    lengths: tuple[int, ...] | None

    def validate(self, q_len: int, kv_len: int) -> None:
        if self.lengths is None:
            raise InputError("ac.document() without lengths takes its documents at call time: pass "
                             "cu_seqlens=[0, end_0, end_1, ...] to the compiled module or to ac.reference")

    def offsets(self, n: int) -> np.ndarray:
        """Segment boundaries ``[0, end_0, end_1, ...]`` clipped to the first ``n`` positions.

        Clipping keeps every table built from it O(n + documents), never O(sum(lengths)), and
        the running sum inside int64.
        """
        ends = np.cumsum(np.minimum(np.asarray(self.lengths, dtype=np.int64), n))
        return np.minimum(np.concatenate([[0], ends]), n).astype(np.int64)

    def predicate(self, q_len, kv_len):
        self.validate(q_len, kv_len)
        off = self.offsets(max(q_len, kv_len))
        ids = np.repeat(np.arange(len(self.lengths), dtype=np.int64), np.diff(off))  # [<= max(q_len, kv_len)]
        buf = E.Buffer("doc_id", ids)
        return E.Load(buf, E.Q, -1).eq(E.Load(buf, E.KV, -2))

    def __repr__(self) -> str:
        return "ac.document()" if self.lengths is None else f"ac.document({short_list(self.lengths)})"


def has_runtime_documents(p: Pattern) -> bool:
    """Whether ``p`` holds an ``ac.document()`` whose documents come at call time."""
    if isinstance(p, Document):
        return p.lengths is None
    return any(has_runtime_documents(c) for c in p.children())


def bind_documents(p: Pattern, lengths: tuple[int, ...]) -> Pattern:
    """``p`` with every ``ac.document()`` (no lengths) given these document lengths (each >= 1)."""
    if isinstance(p, Document):
        return Document(tuple(lengths)) if p.lengths is None else p
    kids = p.children()
    if not kids:
        return p
    new = tuple(bind_documents(c, lengths) for c in kids)
    return p if new == kids else p._rebuild(new)














# ---------------------------------------------------------------------------------------------
# Batch / head dependence of opaque mask_mods
# ---------------------------------------------------------------------------------------------











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


def document(lengths: Iterable[int] | None = None) -> Pattern:
    """Document packing: query and key fall in the same segment of the packed sequence.

    Args:
        lengths: the length of each packed document, in order; positions past their sum
            belong to no document and see no key. ``None``: the documents change per batch and
            are given at call time as ``cu_seqlens`` (``[0, end_0, end_1, ..., L]``, as in
            FlashAttention), with no new pattern, program or kernel per batch.
    """
    if lengths is None:
        return Document(None)
    try:
        ls = tuple(check_int("document length", n, 1) for n in lengths)
    except TypeError:
        raise PatternError(f"document needs an iterable of positive lengths, got {lengths!r}") from None
    if not ls:
        raise PatternError("document([]) has no documents; pass at least one length")
    return Document(ls)


