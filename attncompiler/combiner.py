"""Combiner (Ren et al., NeurIPS 2021, arXiv 2107.05768): factorized full attention.

Every query ``i`` attends directly to a set ``D_i`` of keys and, through one *summary node*
per region, to a set ``R_i`` of span summaries, under one joint softmax:

    out_i = sum_{j in D_i} p_j v_j + sum_{S in R_i} p_S v_S,
    p = softmax([scale q_i.k_j for j in D_i ; scale q_i.k_S for S in R_i]).

A span summary pools its members: ``k_S = pool_j k_j``, ``q_S = pool_j q_j`` (max or mean)
and ``v_S = sum_j softmax_j(scale q_S.k_j) v_j`` (the "local expectation", shared by all
queries). ``D_i`` and the spans of ``R_i`` partition the keys ``i`` may see (all keys, or
``[0, i]`` when causal), so every query reaches every legal key in one layer.

This module holds the pattern nodes, the span tables (which summaries exist at a length,
which query reads which summary), the joint mask over ``[keys ; padding ; summaries]`` that
lets the existing :class:`~attncompiler.program.BlockSparseAttention` stage compute the joint
softmax, the program stages and lowering, and the float64 reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import expr as E
from .errors import InputError, LayoutError, PatternError
from .expr import Expr
from .pattern import Pattern, _check_int, _check_lengths
from .pattern import block_local, causal as _causal_mask, document, sliding_window, strided

FAMILY = "combiner"
POOLS = ("max", "mean")
AXIAL_VARIANTS = ("vertical", "horizontal", "rowmajor")


# ---------------------------------------------------------------------------------------------
# Span tables: the summaries of one factorization at one length
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SpanGroup:
    """Summaries pooled over lines of equal length.

    ``members[l]`` lists line ``l``'s token positions in pooling order. A whole group has one
    summary per line; a prefix group has one per prefix of every line (``t = 0 .. length-1``,
    summary ``t * lines + l`` pools ``members[l, :t+1]``), computed with a running max/sum,
    which is how causal partial columns and rows are summarized without seeing the future.
    Prefix ids are t-major because the queries of one grid row read the same ``t`` of every
    column: their summaries then fill a few contiguous key blocks, not one block per column.
    """

    members: np.ndarray  # [lines, length]
    prefix: bool

    @property
    def num_summaries(self) -> int:
        return int(self.members.size if self.prefix else self.members.shape[0])


@dataclass(frozen=True, eq=False)
class SpanTable:
    """All summaries of a factorization at ``num_tokens`` tokens and who reads them.

    Attributes:
        groups: summaries in order (summary ids count up through the groups).
        meta: per-summary integer arrays the summary relation's predicate reads.
        pair_q, pair_s: the relation ``S in R_q`` as sorted (query, summary) pairs.
    """

    num_tokens: int
    groups: tuple[SpanGroup, ...]
    meta: dict
    pair_q: np.ndarray
    pair_s: np.ndarray

    @property
    def num_summaries(self) -> int:
        return sum(g.num_summaries for g in self.groups)

    @functools.cached_property
    def members_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ptr [nS+1], idx)``: the token positions each summary pools."""
        parts, sizes = [], []
        for g in self.groups:
            lines, n = g.members.shape
            if g.prefix:
                for t in range(n):
                    parts.extend(g.members[:, :t + 1])
                    sizes.extend([t + 1] * lines)
            else:
                parts.extend(g.members)
                sizes.extend([n] * lines)
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        idx = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return ptr, idx


class _Builder:
    """Collects span groups and per-summary metadata in summary-id order."""

    def __init__(self, L: int):
        self.L, self.groups, self.meta, self.count = L, [], {}, 0

    def add(self, members: np.ndarray, prefix: bool, **meta: np.ndarray) -> int:
        """Append a group (meta in summary order); returns the group's first summary id."""
        members = np.asarray(members, dtype=np.int64)
        if members.size == 0:
            return self.count
        g = SpanGroup(members, prefix)
        self.groups.append(g)
        first = self.count
        for k, v in meta.items():
            self.meta.setdefault(k, []).append(np.broadcast_to(np.asarray(v, np.int64), (g.num_summaries,)))
        self.count += g.num_summaries
        return first

    def table(self, q: np.ndarray, s: np.ndarray) -> SpanTable:
        order = np.lexsort((s, q))
        meta = {k: np.concatenate(v) for k, v in self.meta.items()}
        return SpanTable(self.L, tuple(self.groups), meta, np.asarray(q)[order], np.asarray(s)[order])


# ---------------------------------------------------------------------------------------------
# Pattern nodes
# ---------------------------------------------------------------------------------------------

class Combiner(Pattern):
    """Base of the Combiner patterns (family ``"combiner"``): not masks, so ``| & ~`` refuse them."""

    family = FAMILY

    def causal(self) -> Pattern:
        """The autoregressive version of this factorization (causal summaries, no future keys)."""
        return dataclasses.replace(self, autoregressive=True)

    def factorizations(self) -> tuple[Combiner, ...]:
        """The single factorizations this pattern averages (itself unless a mixture)."""
        return (self,)

    # -- what every single factorization defines --------------------------------------------
    def direct(self) -> Pattern:
        """The direct set ``D_i`` as a mask pattern over the L tokens."""
        raise NotImplementedError(f"{type(self).__name__} must define direct() (abstract Combiner method)")

    def build_table(self, L: int) -> SpanTable:
        """The spans summarized at length ``L`` and which queries read each of them."""
        raise NotImplementedError(f"{type(self).__name__} must define build_table() (abstract Combiner method)")

    def summary_relation(self, table: SpanTable, q: Expr, s: Expr) -> Expr:
        """Whether query ``q`` reads summary ``s`` (0 <= s < num_summaries), as an index expression."""
        raise NotImplementedError(f"{type(self).__name__} must define summary_relation() (abstract Combiner method)")

    # -- optional: a token order that makes the direct set block-friendly --------------------
    def token_order(self, L: int) -> np.ndarray | None:
        """Positions in the order the joint attention processes them (None: as they are)."""
        return None

    def ordered_direct(self, L: int) -> Pattern:
        """The direct set as a mask over positions in :meth:`token_order`."""
        return self.direct()

    def validate(self, q_len: int, kv_len: int) -> None:
        if q_len != kv_len:
            raise InputError(f"Combiner is self-attention: q_len={q_len} must equal kv_len={kv_len}")


def _meta(table: SpanTable, name: str) -> np.ndarray:
    return table.meta.get(name, np.zeros(0, dtype=np.int64))  # absent when there are no summaries


def _pool_repr(pool: str) -> str:
    return "" if pool == "max" else f", pool={pool!r}"


def _causal_repr(c: bool) -> str:
    return ", causal=True" if c else ""


@dataclass(frozen=True)
class CombinerFixed(Combiner):
    """Combiner-Fixed: direct attention within the own span, one summary per other span."""

    span: int
    autoregressive: bool = False
    pool: str = "max"

    def direct(self) -> Pattern:
        p = block_local(self.span)
        return p & _causal_mask() if self.autoregressive else p

    def build_table(self, L: int) -> SpanTable:
        return _span_partition_table(L, self.span, self.autoregressive)

    def summary_relation(self, table, q, s):
        own = q // self.span
        return s < own if self.autoregressive else s.ne(own)

    def __repr__(self) -> str:
        return f"ac.combiner_fixed({self.span}{_causal_repr(self.autoregressive)}{_pool_repr(self.pool)})"


def _span_partition_table(L: int, w: int, causal: bool) -> SpanTable:
    """Spans ``[m w, (m+1) w)``; query i reads every other span (causal: every earlier one)."""
    b = _Builder(L)
    n = -(-L // w)
    used = n - 1 if causal else n  # causally the last span is never summarized
    nfull = min(L // w, used)
    b.add(np.arange(nfull * w).reshape(nfull, w), False)
    if used > nfull:
        b.add(np.arange(nfull * w, L)[None, :], False)
    own = np.arange(L)[:, None] // w
    m = np.arange(used)[None, :]
    q, s = np.nonzero((m < own) if causal else (m != own))
    return b.table(q, s)


@dataclass(frozen=True)
class CombinerLogsparse(Combiner):
    """Combiner-Logsparse: direct attention to itself, dyadic span summaries elsewhere."""

    autoregressive: bool = False
    pool: str = "max"

    def direct(self) -> Pattern:
        return sliding_window(0)

    def build_table(self, L: int) -> SpanTable:
        b = _Builder(L)
        qs, ss = [], []
        pos = np.arange(L, dtype=np.int64)
        t = 0
        while (1 << t) < L:
            w = 1 << t
            m = np.arange(-(-L // w), dtype=np.int64)
            lo = m * w
            left = (m % 2 == 0) & (lo + w <= L - 1)  # read by the queries in [lo + w, lo + 2w)
            keep = left | ((m % 2 == 1) & (not self.autoregressive))
            ids = np.full(len(m), -1, dtype=np.int64)
            for whole in (True, False):
                sel = np.flatnonzero(keep & ((lo + w <= L) == whole))
                if len(sel) == 0:
                    continue
                mem = lo[sel, None] + np.arange(w) if whole else np.arange(lo[sel[0]], L)[None, :]
                ids[sel] = b.add(mem, False, lo=lo[sel], width=w, odd=m[sel] % 2) + np.arange(len(sel))
            qt = pos >> t
            sel = (qt & 1) == 1  # bit t of q set: [((q>>t)-1) w, (q>>t) w) is in the prefix decomposition
            qs.append(pos[sel]), ss.append(ids[qt[sel] - 1])
            if not self.autoregressive:  # bit t clear: the span after q's own completes the suffix
                sel = ((qt & 1) == 0) & ((qt + 1) * w < L)
                qs.append(pos[sel]), ss.append(ids[qt[sel] + 1])
            t += 1
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        return b.table(cat(qs), cat(ss))

    def summary_relation(self, table, q, s):
        lo = E.Load(E.Buffer("span_lo", _meta(table, "lo")), s, 0)
        w = E.Load(E.Buffer("span_width", _meta(table, "width")), s, 1)
        odd = E.Load(E.Buffer("span_odd", _meta(table, "odd")), s, -1)
        rel = odd.eq(0) & (q >= lo + w) & (q < lo + 2 * w)
        if not self.autoregressive:
            rel = rel | (odd.eq(1) & (q >= lo - w) & (q < lo))
        return rel

    def __repr__(self) -> str:
        args = _causal_repr(self.autoregressive) + _pool_repr(self.pool)
        return f"ac.combiner_logsparse({args.lstrip(', ')})"


@dataclass(frozen=True)
class CombinerAxial(Combiner):
    """Combiner-Axial on a row-major grid with ``cols`` columns (position i = row * cols + col).

    * ``vertical``: direct to the own column; one summary per other column (causal: the part
      of that column before i, a prefix summary).
    * ``horizontal``: direct to the own row (causal: up to i); one summary per other row
      (causal: every earlier row).
    * ``rowmajor``: direct to the ``cols - 1`` neighbours in raster order on each side
      (causal: the previous ``cols - 1``); the rest of every column is summarized as the
      prefix above the window (and, bidirectionally, the suffix below it).

    Block cost: bidirectional ``vertical`` attends in column-major order (a few key blocks per
    query block); causal ``vertical`` keeps row-major order, where the direct column is
    strided, so its joint attention touches about half the key blocks, like dense causal
    attention (``rowmajor`` and ``horizontal`` stay a few blocks per query block).
    """

    cols: int
    rows: int | None = None
    variant: str = "vertical"
    autoregressive: bool = False
    pool: str = "max"

    def validate(self, q_len, kv_len):
        super().validate(q_len, kv_len)
        if self.rows is not None and self.rows * self.cols != q_len:
            raise InputError(f"combiner_axial grid rows={self.rows} x cols={self.cols} = {self.rows * self.cols} "
                             f"!= sequence length {q_len}; pass rows=None to use ceil(L / cols) rows")

    def direct(self) -> Pattern:
        C = self.cols
        p = {"vertical": strided(C), "horizontal": block_local(C), "rowmajor": sliding_window(C - 1)}[self.variant]
        return p & _causal_mask() if self.autoregressive else p

    def token_order(self, L: int) -> np.ndarray | None:
        # A column is strided in row-major order (one key per block row: nearly dense block
        # cost); in column-major order it is one contiguous segment. Only bidirectionally: the
        # causal prefix summaries a query reads depend on its row, so they stay contiguous for
        # a block of queries only in row-major order (and outweigh the direct column).
        if self.variant != "vertical" or self.autoregressive:
            return None
        pos = np.arange(L, dtype=np.int64)
        return np.lexsort((pos // self.cols, pos % self.cols))

    def ordered_direct(self, L: int) -> Pattern:
        if self.token_order(1) is None:
            return self.direct()
        ncol = [len(range(c, L, self.cols)) for c in range(min(self.cols, L))]
        p = document(ncol)  # column-major: each column is one segment, rows in order
        return p & _causal_mask() if self.autoregressive else p

    def build_table(self, L: int) -> SpanTable:
        if self.variant == "horizontal":
            return _span_partition_table(L, self.cols, self.autoregressive)
        return _axial_table(L, self.cols, self.variant, self.autoregressive)

    def summary_relation(self, table, q, s):
        if self.variant == "horizontal":
            own = q // self.cols
            return s < own if self.autoregressive else s.ne(own)
        col = E.Load(E.Buffer("span_col", _meta(table, "col")), s, -1)
        if self.variant == "vertical" and not self.autoregressive:
            return (col >= 0) & col.ne(q % self.cols)
        row = E.Load(E.Buffer("span_row", _meta(table, "row")), s, -10)
        kind = E.Load(E.Buffer("span_kind", _meta(table, "kind")), s, -1)
        r, c = q // self.cols, q % self.cols
        if self.variant == "vertical":
            return kind.eq(0) & (((col > c) & row.eq(r - 1)) | ((col < c) & row.eq(r)))
        above = kind.eq(0) & (((col <= c) & row.eq(r - 1)) | ((col > c) & row.eq(r - 2)))
        if self.autoregressive:
            return above
        below = kind.eq(1) & (((col >= c) & row.eq(r + 1)) | ((col < c) & row.eq(r + 2)))
        return above | below

    def __repr__(self) -> str:
        rows = "" if self.rows is None else f", rows={self.rows}"
        var = "" if self.variant == "vertical" else f", variant={self.variant!r}"
        return (f"ac.combiner_axial({self.cols}{rows}{var}{_causal_repr(self.autoregressive)}"
                f"{_pool_repr(self.pool)})")


def _axial_table(L: int, C: int, variant: str, causal: bool) -> SpanTable:
    b = _Builder(L)
    R = -(-L // C)
    ncol = np.array([len(range(c, L, C)) for c in range(C)], dtype=np.int64)  # rows in each column
    lines = [(c, c + C * np.arange(ncol[c])) for c in range(C) if ncol[c] > 0]
    pos = np.arange(L, dtype=np.int64)
    r, c = (pos // C)[:, None], (pos % C)[:, None]
    cc = np.arange(C, dtype=np.int64)[None, :]
    if variant == "vertical" and not causal:  # whole columns
        col_id = np.full(C, -1, dtype=np.int64)
        for n in (R, R - 1):
            cs = [cl for cl, m in lines if len(m) == n]
            if cs:
                col_id[cs] = b.add(np.stack([m for cl, m in lines if len(m) == n]), False, col=cs, row=0,
                                   kind=0) + np.arange(len(cs))
        q, j = np.nonzero((cc != c) & (ncol[None, :] > 0))
        return b.table(q, col_id[j])
    # Prefix summaries of every column (suffix ones too for bidirectional row-major); summary
    # (column c, prefix t) has id goff[c] + t * glines[c] + lpos[c] (t-major, see SpanGroup).
    goff = {kind: np.zeros(C, dtype=np.int64) for kind in (0, 1)}
    glines, lpos = np.zeros(C, dtype=np.int64), np.zeros(C, dtype=np.int64)
    kinds = (0,) if causal or variant == "vertical" else (0, 1)
    for kind in kinds:
        for n in (R, R - 1):
            sel = [(cl, m) for cl, m in lines if len(m) == n]
            if not sel or n == 0:
                continue
            mem = np.stack([m if kind == 0 else m[::-1] for _, m in sel])
            t = np.arange(n)
            cls = np.array([cl for cl, _ in sel], dtype=np.int64)
            rows = np.repeat(t if kind == 0 else n - 1 - t, len(sel))
            goff[kind][cls] = b.add(mem, True, col=np.tile(cls, n), row=rows, kind=kind)
            glines[cls], lpos[cls] = len(sel), np.arange(len(sel))
    qs, ss = [], []

    def emit(t, kind, ok):
        ok = ok & (t >= 0) & (t < ncol[None, :])
        q, j = np.nonzero(ok)
        tt = t[q, j]
        prefix = tt if kind == 0 else ncol[j] - 1 - tt
        qs.append(q), ss.append(goff[kind][j] + prefix * glines[j] + lpos[j])

    if variant == "vertical":  # causal: column c' before i = rows < r (c' > c) or <= r (c' < c)
        emit(np.where(cc > c, r - 1, r), 0, cc != c)
    else:
        emit(np.where(cc <= c, r - 1, r - 2), 0, True)
        if not causal:
            emit(np.where(cc >= c, r + 1, r + 2), 1, True)
    return b.table(np.concatenate(qs), np.concatenate(ss))


@dataclass(frozen=True)
class CombinerMixture(Combiner):
    """Combiner-Mixture: the average of the outputs of several factorizations."""

    parts: tuple[Combiner, ...]

    def causal(self) -> Pattern:
        return CombinerMixture(tuple(p.causal() for p in self.parts))

    def factorizations(self):
        return self.parts

    def validate(self, q_len, kv_len):
        for p in self.parts:
            p.validate(q_len, kv_len)

    def __repr__(self) -> str:
        return f"ac.combiner_mixture({', '.join(map(repr, self.parts))})"


@functools.lru_cache(maxsize=64)
def span_table(pattern: Combiner, L: int) -> SpanTable:
    """The (cached) span table of a single factorization at ``L`` tokens."""
    _check_lengths(L, L)
    pattern.validate(L, L)
    return pattern.build_table(int(L))


# ---------------------------------------------------------------------------------------------
# Public constructors
# ---------------------------------------------------------------------------------------------

def _check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise PatternError(f"pool={pool!r} must be one of {POOLS}")
    return pool


def combiner_fixed(span: int, *, causal: bool = False, pool: str = "max") -> Pattern:
    """Combiner-Fixed (Ren et al. 2021, sec. 4.1): own span direct, other spans summarized.

    Args:
        span: tokens per span (about sqrt(L) gives O(L sqrt L) cost).
        causal: direct keys ``own span & [0, i]``, summaries of the complete earlier spans.
        pool: how span keys/queries are pooled, ``"max"`` (the paper) or ``"mean"``.
    """
    return CombinerFixed(_check_int("span", span, 1), bool(causal), _check_pool(pool))


def combiner_logsparse(*, causal: bool = False, pool: str = "max") -> Pattern:
    """Combiner-Logsparse (Ren et al. 2021, sec. 4.2): itself direct; the dyadic spans of the
    binary decomposition of ``[0, i)`` (and, bidirectionally, of ``(i, L)``) summarized."""
    return CombinerLogsparse(bool(causal), _check_pool(pool))


def combiner_axial(cols: int, rows: int | None = None, *, variant: str = "vertical", causal: bool = False,
                   pool: str = "max") -> Pattern:
    """Combiner-Axial (Ren et al. 2021, sec. 4.3) on a row-major ``rows x cols`` grid.

    Args:
        cols: grid width; position ``i`` is row ``i // cols``, column ``i % cols``.
        rows: grid height; None means ``ceil(L / cols)`` (a partial last row is allowed),
            otherwise ``L`` must equal ``rows * cols``.
        variant: ``"vertical"``, ``"horizontal"`` or ``"rowmajor"`` (see :class:`CombinerAxial`).
        causal: autoregressive; partial columns are summarized by prefix (running) pooling.
        pool: ``"max"`` or ``"mean"``.
    """
    cols = _check_int("cols", cols, 1)
    if rows is not None:
        rows = _check_int("rows", rows, 1)
    if variant not in AXIAL_VARIANTS:
        raise PatternError(f"variant={variant!r} must be one of {AXIAL_VARIANTS}")
    if variant == "rowmajor" and cols < 2:
        raise PatternError(f"cols={cols} must be >= 2 for the rowmajor variant (its window has cols - 1 keys)")
    return CombinerAxial(cols, rows, variant, bool(causal), _check_pool(pool))


def combiner_mixture(*parts: Pattern) -> Pattern:
    """Combiner-Mixture (Ren et al. 2021, sec. 4.4): the average of ``M = len(parts)`` (at
    least 2) factorizations' outputs, e.g. ``combiner_mixture(combiner_axial(64),
    combiner_axial(64, variant="horizontal"))``."""
    flat: list[Combiner] = []
    for p in parts:
        if not isinstance(p, Combiner):
            raise PatternError(f"combiner_mixture needs Combiner patterns, got {p!r}")
        flat.extend(p.factorizations())
    if len(flat) < 2:
        raise PatternError(f"combiner_mixture needs at least 2 factorizations, got {len(flat)}")
    return CombinerMixture(tuple(flat))

# ---------------------------------------------------------------------------------------------
# The joint softmax as a mask over [keys ; padding ; summaries]
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JointMask(Pattern):
    """Mask of one factorization's joint softmax over the concatenated key axis.

    Key positions ``kv < L`` are the tokens (visible iff in ``D_q``); ``L <= kv < offset`` is
    padding that aligns the summaries to whole key blocks (never visible); ``kv = offset + s``
    is summary ``s`` (visible iff ``s in R_q``). Token rows and columns are in the
    factorization's :meth:`~Combiner.token_order` (column-major for Combiner-Axial-Vertical).
    ``offset`` is ``L`` rounded up to ``align``, so
    summary blocks never share a key block with tokens. The predicate is an index expression
    (rendered into kernels like any mask); the block layout is built analytically from the
    direct pattern's layout and the span table, never by evaluating L x (L + S) elements.
    """

    factorization: Combiner
    align: int

    def offset(self, L: int) -> int:
        return -(-L // self.align) * self.align

    def kv_len(self, L: int) -> int:
        """Length of the concatenated key axis at ``L`` tokens."""
        return self.offset(L) + span_table(self.factorization, L).num_summaries

    def validate(self, q_len, kv_len):
        if kv_len != self.kv_len(q_len):
            raise LayoutError(f"the joint key axis of {self.factorization!r} at L={q_len} has "
                              f"{self.kv_len(q_len)} positions, got kv_len={kv_len}")

    def predicate(self, q_len, kv_len):
        return _joint_expr(self, int(q_len), int(kv_len))

    def layout(self, q_len, kv_len=None, block_m=64, block_n=None, *, batch=1, heads=1):
        kv_len = self.kv_len(q_len) if kv_len is None else kv_len
        return _joint_layout(self, int(q_len), int(kv_len), int(block_m), int(block_m if block_n is None else block_n))

    def __repr__(self) -> str:
        return f"combiner_joint_mask({self.factorization!r}, align={self.align})"


@functools.lru_cache(maxsize=64)
def _joint_expr(joint: JointMask, L: int, kv_len: int) -> Expr:
    joint.validate(L, kv_len)
    f = joint.factorization
    # L and the summary offset are read from a runtime table, not baked in as constants, so a
    # kernel rendered from this predicate does not depend on the sequence length.
    lengths = E.Buffer("combiner_lengths", np.array([L, joint.offset(L)], dtype=np.int64))
    n_tok, off = E.Load(lengths, E.Const(0), 0), E.Load(lengths, E.Const(1), 0)
    direct = f.ordered_direct(L).predicate(L, L)
    order = f.token_order(L)
    q = E.Q if order is None else E.Load(E.Buffer("token_order", order), E.Q, 0)
    summaries = f.summary_relation(span_table(f, L), q, E.KV - off)
    return ((E.KV < n_tok) & direct) | ((E.KV >= off) & summaries)


@functools.lru_cache(maxsize=64)
def _joint_layout(joint: JointMask, L: int, kv_len: int, bm: int, bn: int):
    from .layout import FULL, PARTIAL, BlockLayout, BlockSet, Geometry, _to_blocks2d

    joint.validate(L, kv_len)
    off = joint.offset(L)
    if off % bn:
        raise LayoutError(f"block_n={bn} must divide the summary alignment {joint.align} of {joint!r}; "
                          "compile with this schedule (ac.compile(..., schedule=...)) so lowering aligns to it")
    g = Geometry(L, kv_len, bm, bn)
    d = joint.factorization.ordered_direct(L).layout(L, L, bm, bn).groups[0]
    kind_d = np.where(d.full, FULL, PARTIAL)
    if L % bn:  # the last token block now also spans padding keys: never full
        kind_d = np.where(d.cols == L // bn, PARTIAL, kind_d)
    t = span_table(joint.factorization, L)
    order = joint.factorization.token_order(L)
    pq = t.pair_q if order is None else np.argsort(order)[t.pair_q]  # query rows in token order
    key, counts = np.unique((pq // bm) * g.nkb + (off + t.pair_s) // bn, return_counts=True)
    r, c = key // g.nkb, key % g.nkb
    cap = (g.q_hi(r) - g.q_lo(r) + 1) * (g.k_hi(c) - g.k_lo(c) + 1)
    kind_s = np.where(counts == cap, FULL, PARTIAL)
    bs = BlockSet.make(g, np.concatenate([d.rows, r]), np.concatenate([d.cols, c]), np.concatenate([kind_d, kind_s]))
    return BlockLayout(joint, g, (_to_blocks2d(bs, joint),), np.zeros((1, 1), dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Program stages and lowering
# ---------------------------------------------------------------------------------------------

from .program import BlockSparseAttention, Program, Stage, register_lowering  # noqa: E402
from .reference import masked_attention, register_reference  # noqa: E402
from .schedule import Schedule  # noqa: E402


@dataclass(frozen=True)
class SpanPool(Stage):
    """``q_sum, k_sum [B, H(kv), S, D]``: each summary's pooled query and key (max or mean)."""

    inputs: tuple[str, ...] = ("q", "k")
    outputs: tuple[str, ...] = ("q_sum", "k_sum")
    factorization: Combiner | None = None

    def describe(self) -> str:
        return f"SpanPool[{self.factorization.pool}]({self.factorization!r})"


@dataclass(frozen=True)
class SpanAttention(Stage):
    """``v_sum [B, H, S, Dv]``: each summary's local expectation
    ``sum_j softmax_j(scale q_S . k_j) v_j`` over its span."""

    inputs: tuple[str, ...] = ("q_sum", "k", "v")
    outputs: tuple[str, ...] = ("v_sum",)
    factorization: Combiner | None = None

    def describe(self) -> str:
        return f"SpanAttention({self.factorization!r})"


@dataclass(frozen=True)
class ConcatSummaries(Stage):
    """``k_cat = [k ; 0 ; k_sum]``, ``v_cat = [v ; 0 ; v_sum]`` with the summaries starting at
    ``L`` rounded up to ``align`` (key/value heads expanded to the query heads)."""

    inputs: tuple[str, ...] = ("k", "v", "k_sum", "v_sum")
    outputs: tuple[str, ...] = ("k_cat", "v_cat")
    align: int = 128

    def describe(self) -> str:
        return f"ConcatSummaries(align={self.align})"


@dataclass(frozen=True)
class ReorderTokens(Stage):
    """Put the first ``L`` positions of each input (along the sequence) into the
    factorization's token order, or (``inverse``) back; the rest (padding, summaries) stays."""

    inputs: tuple[str, ...] = ("q", "k_cat", "v_cat")
    outputs: tuple[str, ...] = ("q_ord", "k_ord", "v_ord")
    factorization: Combiner | None = None
    inverse: bool = False

    def describe(self) -> str:
        return f"ReorderTokens({'inverse, ' if self.inverse else ''}{self.factorization!r})"


@dataclass(frozen=True)
class MixOutputs(Stage):
    """``out = mean(outputs of the factorizations)`` (Combiner-Mixture)."""

    inputs: tuple[str, ...] = ("out_0", "out_1")
    outputs: tuple[str, ...] = ("out",)

    def describe(self) -> str:
        return f"MixOutputs(M={len(self.inputs)})"


@register_lowering(FAMILY)
def lower_combiner(pattern: Combiner, schedule: Schedule) -> Program:
    """Summaries (pool, local expectation), then one joint block-sparse softmax per
    factorization over ``[keys ; summaries]``; mixtures average the outputs."""
    align = math.lcm(schedule.block_n, 128)
    parts = pattern.factorizations()
    stages: list[Stage] = []
    for i, f in enumerate(parts):
        n = (lambda x: x) if len(parts) == 1 else (lambda x, i=i: f"{x}_{i}")
        stages += [
            SpanPool(("q", "k"), (n("q_sum"), n("k_sum")), f),
            SpanAttention((n("q_sum"), "k", "v"), (n("v_sum"),), f),
            ConcatSummaries(("k", "v", n("k_sum"), n("v_sum")), (n("k_cat"), n("v_cat")), align),
        ]
        joint = JointMask(f, align)
        if f.token_order(1) is None:
            stages.append(BlockSparseAttention(("q", n("k_cat"), n("v_cat")), (n("out"), n("lse")), joint, schedule))
        else:  # attend in the factorization's token order, then restore the original order
            ordered = (n("q_ord"), n("k_ord"), n("v_ord"))
            stages += [
                ReorderTokens(("q", n("k_cat"), n("v_cat")), ordered, f),
                BlockSparseAttention(ordered, (n("out_ord"), n("lse_ord")), joint, schedule),
                ReorderTokens((n("out_ord"), n("lse_ord")), (n("out"), n("lse")), f, inverse=True),
            ]
    if len(parts) > 1:
        stages.append(MixOutputs(tuple(f"out_{i}" for i in range(len(parts))), ("out",)))
    return Program(pattern, tuple(stages))


# ---------------------------------------------------------------------------------------------
# Float64 reference (dense; small L)
# ---------------------------------------------------------------------------------------------

def summary_membership(table: SpanTable) -> torch.Tensor:
    """``[S, L]`` bool: which tokens each summary pools."""
    ptr, idx = table.members_csr
    m = torch.zeros(table.num_summaries, table.num_tokens, dtype=torch.bool)
    m[torch.from_numpy(np.repeat(np.arange(table.num_summaries), np.diff(ptr))), torch.from_numpy(idx)] = True
    return m


def summary_readers(table: SpanTable) -> torch.Tensor:
    """``[L, S]`` bool: which summaries each query reads (``R_i``)."""
    m = torch.zeros(table.num_tokens, table.num_summaries, dtype=torch.bool)
    m[torch.from_numpy(table.pair_q), torch.from_numpy(table.pair_s)] = True
    return m


def _dense_pool(x: torch.Tensor, member: torch.Tensor, pool: str) -> torch.Tensor:
    """``x [B, H, L, D]`` pooled over each summary's members ``[S, L]`` -> ``[B, H, S, D]``."""
    if pool == "mean":
        w = member.to(x.dtype)
        return (w @ x) / w.sum(-1, keepdim=True)
    return x[:, :, None].masked_fill(~member[:, :, None], float("-inf")).amax(dim=3)


def _factorization_reference(f: Combiner, q, k, v, scale):
    B, H, L, _ = q.shape
    G = H // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    table = span_table(f, L)
    member = summary_membership(table).to(q.device)  # [S, L]
    q_sum, k_sum = _dense_pool(q, member, f.pool), _dense_pool(k, member, f.pool)  # [B, H, S, D]
    v_sum, _ = masked_attention(q_sum, k, v, member, scale)  # [B, H, S, Dv]
    mask = torch.cat([f.direct().to_dense(L, device=q.device), summary_readers(table).to(q.device)], dim=1)
    return masked_attention(q, torch.cat([k, k_sum], 2), torch.cat([v, v_sum], 2), mask, scale)


@register_reference(FAMILY)
def combiner_reference(pattern: Combiner, q, k, v, scale):
    """Dense float64 Combiner attention (mixtures average their factorizations, lse None)."""
    if q.shape[2] != k.shape[2]:
        raise InputError(f"Combiner is self-attention: q has {q.shape[2]} positions, k has {k.shape[2]}")
    outs = [_factorization_reference(f, q, k, v, scale) for f in pattern.factorizations()]
    if len(outs) == 1:
        return outs[0]
    return sum(o for o, _ in outs) / len(outs), None
