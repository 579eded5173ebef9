"""Combiner pattern nodes (Fixed, Logsparse, Axial, Mixture), their span tables and constructors.

Each single factorization says which keys every query attends to directly (:meth:`Combiner.direct`),
which span summaries exist at a length (:meth:`Combiner.build_table`) and, as an index
expression, which summaries a query reads (:meth:`Combiner.summary_relation`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from ...ir import expr as E
from .tables import SpanTable, Builder
from ...errors import InputError, PatternError
from ...ir.expr import Expr
from ...dsl.pattern import Pattern, check_int, check_lengths
from ...dsl.primitives import block_local, document, sliding_window, strided
from ...dsl.pattern import causal as _causal_mask

FAMILY = "combiner"
POOLS = ("max", "mean")
AXIAL_VARIANTS = ("vertical", "horizontal", "rowmajor")


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
    b = Builder(L)
    n = -(-L // w)
    used = n - 1 if causal else n  # causally the last span is never summarized
    nfull = min(L // w, used)
    b.add(np.arange(nfull * w).reshape(nfull, w), False)
    if used > nfull:
        b.add(np.arange(nfull * w, L)[None, :], False)
    # the pairs of np.nonzero(m < own or m != own), built directly (no L x spans mask), in order
    own = np.arange(L, dtype=np.int64) // w
    if causal:
        counts = own  # spans 0 .. own-1 (own <= used)
        q = np.repeat(np.arange(L, dtype=np.int64), counts)
        s = np.arange(len(q), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    else:
        q = np.repeat(np.arange(L, dtype=np.int64), used - 1)
        s = np.tile(np.arange(used - 1, dtype=np.int64), L)
        s += s >= np.repeat(own, used - 1)
    return b.table(q, s)


@dataclass(frozen=True)
class CombinerLogsparse(Combiner):
    """Combiner-Logsparse: direct attention to itself, dyadic span summaries elsewhere."""

    autoregressive: bool = False
    pool: str = "max"

    def direct(self) -> Pattern:
        return sliding_window(0)

    def build_table(self, L: int) -> SpanTable:
        b = Builder(L)
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
    b = Builder(L)
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

    def _per_part(self, what: str):
        raise PatternError(f"a combiner_mixture has one {what} per part: call it on each of .factorizations()")

    def direct(self) -> Pattern:
        self._per_part("direct set")

    def build_table(self, L: int) -> SpanTable:
        self._per_part("span table")

    def summary_relation(self, table: SpanTable, q: Expr, s: Expr) -> Expr:
        self._per_part("summary relation")

    def validate(self, q_len, kv_len):
        for p in self.parts:
            p.validate(q_len, kv_len)

    def __repr__(self) -> str:
        return f"ac.combiner_mixture({', '.join(map(repr, self.parts))})"


@functools.lru_cache(maxsize=64)
def span_table(pattern: Combiner, L: int) -> SpanTable:
    """The (cached) span table of a single factorization at ``L`` tokens."""
    check_lengths(L, L)
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
    return CombinerFixed(check_int("span", span, 1), bool(causal), _check_pool(pool))


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
    cols = check_int("cols", cols, 1)
    if rows is not None:
        rows = check_int("rows", rows, 1)
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
