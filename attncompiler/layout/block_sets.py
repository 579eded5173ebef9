"""Block sets: which (query-block, key-block) pairs of a pattern are empty, partial or full.

A block set holds, per query-block row, a few sorted, disjoint segments ``[start, end)`` of key
blocks, each of one kind (FULL, PARTIAL or UNKNOWN; gaps are EMPTY). Causal, prefix, windows,
block-local and documents are a few intervals per row, so each primitive is classified from its
parameters in time proportional to its rows plus its explicitly listed blocks (no L x L
evaluation), and union, intersection and complement work row by row on the segments' end points
(vectorized over rows): a dense operand such as ``causal()`` or ``~block_local(n)`` is never
expanded block by block. Where set algebra cannot decide (a union of two partial blocks may be
full, an intersection may be empty), the block is UNKNOWN and resolved at the end by evaluating
the root predicate on that block only, so the result always equals the layout from dense
evaluation. Opaque mask_mods are evaluated chunk by chunk, as FlexAttention's
``create_block_mask`` does. :mod:`attncompiler.layout.block_layout` turns a block set into the
BCSR :class:`~attncompiler.layout.block_layout.BlockLayout` (full runs as ranges).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..dsl.pattern import Causal, Complement, Intersection, Pattern, Union
from ..dsl.primitives import (BlockLocal, BlockWindow, DilatedWindow, Document, Full, GlobalTokens, PrefixLM,
                              RandomBlocks, SlidingWindow, Strided)
from ..dsl.mask_mod import Mask
from ..errors import PatternError
from .shift import shift_classes, shift_period

EMPTY, PARTIAL, FULL, UNKNOWN = 0, 1, 2, 3

# Refinement evaluates at most this many elements at once (bounds temporary memory).
EVAL_CHUNK = 1 << 22

# Segments: (row, start, end, kind) arrays sorted by (row, start), disjoint within a row.
Segments = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Geometry:
    """Lengths and block sizes of one layout.

    ``q_len`` query rows sit at positions ``q_start .. q_start + q_len - 1`` (a decode step or a
    chunk of prefill: ``q_start > 0``); the pattern is evaluated at those positions, as if its
    query length were ``q_end``. Only the layout's own rows are classified, so a one-row query
    against a long cache costs its visible blocks, not the whole square.
    """

    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    q_start: int = 0

    @property
    def q_end(self) -> int:
        """One past the last query position (the pattern's query length)."""
        return self.q_start + self.q_len

    @property
    def nqb(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def nkb(self) -> int:
        return -(-self.kv_len // self.block_n)

    def q_lo(self, rows):
        """First query position of each query block (absolute: ``q_start`` included)."""
        return rows * self.block_m + self.q_start

    def q_hi(self, rows):
        return np.minimum((rows + 1) * self.block_m, self.q_len) - 1 + self.q_start

    def k_lo(self, cols):
        return cols * self.block_n

    def k_hi(self, cols):
        return np.minimum((cols + 1) * self.block_n, self.kv_len) - 1


# ---------------------------------------------------------------------------------------------
# Segment algebra on raw arrays (any number of rows and columns)
# ---------------------------------------------------------------------------------------------

def empty_segments() -> Segments:
    """Segments ``(rows, start, end, kind)`` holding no segment."""
    z = np.zeros(0, dtype=np.int64)
    return z, z.copy(), z.copy(), np.zeros(0, dtype=np.uint8)


def normalize_segments(rows, start, end, kind) -> Segments:
    """Drop empty segments and merge contiguous ones of one kind (input sorted and disjoint)."""
    rows, start, end = (np.asarray(x, dtype=np.int64) for x in (rows, start, end))
    kind = np.asarray(kind, dtype=np.uint8)
    keep = (end > start) & (kind != EMPTY)
    rows, start, end, kind = rows[keep], start[keep], end[keep], kind[keep]
    if len(rows) < 2:
        return rows, start, end, kind
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (rows[1:] != rows[:-1]) | (start[1:] != end[:-1]) | (kind[1:] != kind[:-1])
    if new.all():
        return rows, start, end, kind
    first = np.flatnonzero(new)
    last = np.concatenate([first[1:], [len(rows)]]) - 1
    return rows[first], start[first], end[last], kind[first]


def sort_segments(rows, start, end, kind, ncols: int) -> Segments:
    """Sort disjoint segments by (row, start) and normalize them."""
    order = np.argsort(np.asarray(rows, dtype=np.int64) * (ncols + 1) + start, kind="stable")
    return normalize_segments(rows[order], start[order], end[order], kind[order])


def _lookup(ks: np.ndarray, ke: np.ndarray, kinds: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Kind of the segment (global keys ``[ks, ke)``) holding each point ``q``; EMPTY if none."""
    if len(ks) == 0:
        return np.zeros(len(q), dtype=np.uint8)
    i = np.searchsorted(ks, q, side="right") - 1
    ic = np.maximum(i, 0)
    return np.where((i >= 0) & (ke[ic] > q), kinds[ic], EMPTY).astype(np.uint8)


def combine_segments(a: Segments, b: Segments, ncols: int,
                     op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Segments:
    """Apply a per-block kind operator to two segment sets, row by row on their end points.

    Cost is O((|a| + |b|) log): the elementary intervals between consecutive end points of
    either side carry one kind on each side. ``op(EMPTY, EMPTY)`` must be EMPTY.
    """
    w = ncols + 1
    keys_a = (a[0] * w + a[1], a[0] * w + a[2])
    keys_b = (b[0] * w + b[1], b[0] * w + b[2])
    pts = np.unique(np.concatenate(keys_a + keys_b))
    if len(pts) < 2:
        return empty_segments()
    lo, hi = pts[:-1], pts[1:]
    same = lo // w == hi // w
    lo, hi = lo[same], hi[same]
    out = op(_lookup(*keys_a, a[3], lo), _lookup(*keys_b, b[3], lo)).astype(np.uint8)
    rows = lo // w
    return normalize_segments(rows, lo - rows * w, hi - rows * w, out)


def union_kind(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise block kind of the union of two masks: FULL if either is, the other if one is
    EMPTY, else UNKNOWN."""
    return np.where((a == FULL) | (b == FULL), FULL, np.where(a == EMPTY, b, np.where(b == EMPTY, a, UNKNOWN)))


def intersection_kind(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise block kind of the intersection of two masks: EMPTY if either is, the other if one
    is FULL, else UNKNOWN."""
    return np.where((a == EMPTY) | (b == EMPTY), EMPTY,
                    np.where(a == FULL, b, np.where(b == FULL, a, UNKNOWN)))


def _complement_kind(a: np.ndarray, universe: np.ndarray) -> np.ndarray:
    return np.where(universe == EMPTY, EMPTY, np.where(a == EMPTY, FULL, np.where(a == FULL, EMPTY, a)))


def segments_to_blocks(rows, start, end, kind) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand segments to one entry per block: ``(rows, cols, kinds)``, in segment order."""
    if (end - start == 1).all():  # already one block each (e.g. strided, refined blocks)
        return rows, start, kind
    r, c = pairs_from_ranges(rows, start, end - 1)
    return r, c, np.repeat(kind, np.maximum(end - start, 0))


def pairs_from_ranges(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Expand per-row inclusive column ranges ``[lo, hi]`` into (row, col) pairs."""
    counts = np.maximum(hi - lo + 1, 0)
    r = np.repeat(rows, counts)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    c = np.arange(len(r), dtype=np.int64) + starts
    return r, c


# ---------------------------------------------------------------------------------------------
# Block sets
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class BlockSet:
    """Non-empty blocks of one 2-D layout as per-row segments of key blocks, sorted by (row, start).

    ``seg_kind`` is PARTIAL/FULL/UNKNOWN; every block of a segment has that kind.
    """

    geom: Geometry
    seg_row: np.ndarray
    seg_start: np.ndarray
    seg_end: np.ndarray
    seg_kind: np.ndarray

    @staticmethod
    def of(geom: Geometry, segs: Segments) -> BlockSet:
        return BlockSet(geom, *segs)

    @staticmethod
    def make(geom: Geometry, rows, cols, kind) -> BlockSet:
        """A block set from explicit blocks (duplicates keep the strongest kind)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        kind = np.broadcast_to(np.asarray(kind, dtype=np.uint8), rows.shape).copy()
        keep = kind != EMPTY
        rows, cols, kind = rows[keep], cols[keep], kind[keep]
        keys = rows * geom.nkb + cols
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        uniq = np.ones(len(keys), dtype=bool)
        uniq[1:] = keys[1:] != keys[:-1]
        if not uniq.all():  # duplicates from overlapping candidate ranges: keep the strongest kind
            kind_sorted = kind[order]
            start = np.flatnonzero(uniq)
            merged = np.maximum.reduceat(np.where(kind_sorted == UNKNOWN, 0, kind_sorted), start)
            any_unknown = np.maximum.reduceat((kind_sorted == UNKNOWN).astype(np.uint8), start)
            kind = np.where((merged < FULL) & (any_unknown == 1), UNKNOWN, merged).astype(np.uint8)
            order = order[start]
        else:
            kind = kind[order]
        r, c = rows[order], cols[order]
        return BlockSet(geom, *normalize_segments(r, c, c + 1, kind))

    @staticmethod
    def rows_of(geom: Geometry, kind: int) -> BlockSet:
        """Every block of every row, of one kind."""
        rows = np.arange(geom.nqb, dtype=np.int64)
        return BlockSet(geom, *normalize_segments(rows, np.zeros_like(rows), np.full_like(rows, geom.nkb),
                                                  np.full(len(rows), kind, dtype=np.uint8)))

    @property
    def segments(self) -> Segments:
        return self.seg_row, self.seg_start, self.seg_end, self.seg_kind

    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Explicit ``(rows, cols, kinds)``, one entry per block (size of the result)."""
        return segments_to_blocks(*self.segments)

    def __len__(self) -> int:
        return int((self.seg_end - self.seg_start).sum())

    def __or__(self, other: BlockSet) -> BlockSet:
        return BlockSet.of(self.geom, combine_segments(self.segments, other.segments, self.geom.nkb, union_kind))

    def __and__(self, other: BlockSet) -> BlockSet:
        return BlockSet.of(self.geom, combine_segments(self.segments, other.segments, self.geom.nkb,
                                                       intersection_kind))

    def __invert__(self) -> BlockSet:
        universe = BlockSet.rows_of(self.geom, FULL)
        return BlockSet.of(self.geom, combine_segments(self.segments, universe.segments, self.geom.nkb,
                                                       _complement_kind))


def _from_intervals(g: Geometry, rows, ne_lo, ne_hi, f_lo, f_hi) -> BlockSet:
    """Per row: non-empty key blocks ``[ne_lo, ne_hi)``, of which ``[f_lo, f_hi)`` are full."""
    ne_hi = np.maximum(ne_hi, ne_lo)
    has_full = f_lo < f_hi
    f_lo = np.where(has_full, np.clip(f_lo, ne_lo, ne_hi), ne_hi)
    f_hi = np.where(has_full, np.clip(f_hi, f_lo, ne_hi), ne_hi)
    n = len(rows)
    r = np.repeat(rows, 3)
    start = np.stack([ne_lo, f_lo, f_hi], 1).reshape(-1)
    end = np.stack([f_lo, f_hi, ne_hi], 1).reshape(-1)
    kind = np.tile(np.array([PARTIAL, FULL, PARTIAL], dtype=np.uint8), n)
    return BlockSet(g, *normalize_segments(r, start, end, kind))


# ---------------------------------------------------------------------------------------------
# Primitive classifiers
# ---------------------------------------------------------------------------------------------

def _rows(g: Geometry) -> np.ndarray:
    return np.arange(g.nqb, dtype=np.int64)


def _cols(g: Geometry) -> np.ndarray:
    return np.arange(g.nkb, dtype=np.int64)


def _band(g: Geometry, window: int, unit: int = 1) -> BlockSet:
    """``|q // unit - k // unit| <= window`` (sliding window for unit 1, BigBird window else).

    Over a block ``q // unit - k // unit`` takes every integer in ``[lo, hi]``, with
    ``lo = q_lo//u - k_hi//u`` and ``hi = q_hi//u - k_lo//u`` falling with the key block: the
    non-empty and the full blocks of a row are intervals found by binary search.
    """
    rows, cols = _rows(g), _cols(g)
    a, b = g.k_lo(cols) // unit, g.k_hi(cols) // unit  # both nondecreasing in the key block
    qa, qb = g.q_lo(rows) // unit, g.q_hi(rows) // unit
    ne_lo = np.searchsorted(b, qa - window, side="left")
    ne_hi = np.searchsorted(a, qb + window, side="right")
    f_lo = np.searchsorted(a, qb - window, side="left")
    f_hi = np.searchsorted(b, qa + window, side="right")
    return _from_intervals(g, rows, ne_lo, ne_hi, f_lo, f_hi)


def _diff_range(g: Geometry, r, c, unit: int = 1):
    """Range of ``q // unit - k // unit`` over each block (all integers in it occur)."""
    return g.q_lo(r) // unit - g.k_hi(c) // unit, g.q_hi(r) // unit - g.k_lo(c) // unit


def _dilated(g: Geometry, window: int, dilation: int) -> BlockSet:
    span = window * dilation
    base_r, base_c, base_kind = _band(g, span).blocks()
    lo, hi = _diff_range(g, base_r, base_c)
    lo_c, hi_c = np.maximum(lo, -span), np.minimum(hi, span)
    has_multiple = (hi_c // dilation) * dilation >= lo_c
    single = lo == hi
    kind = np.where(~has_multiple, EMPTY,
                    np.where(dilation == 1, base_kind, np.where(single, FULL, PARTIAL)))
    return BlockSet.make(g, base_r, base_c, kind)


def _strided(g: Geometry, stride: int) -> BlockSet:
    """``(q - k) % stride == 0``: per row, the key blocks around each multiple of the stride in
    ``[q_lo - kv_len + 1, q_hi]`` (an arithmetic progression; O(nqb * kv_len / stride) blocks)."""
    if stride == 1:
        return BlockSet.rows_of(g, FULL)
    if g.block_m == g.block_n and stride % g.block_n == 0 and stride >= 2 * g.block_n and g.q_start % stride == 0:
        return _strided_aligned(g, stride // g.block_n)
    if stride <= max(g.block_m, g.block_n):  # nearly every block is hit: classify all of them
        r, c = pairs_from_ranges(_rows(g), np.zeros(g.nqb, np.int64), np.full(g.nqb, g.nkb - 1, np.int64))
    else:
        rows = _rows(g)
        m_lo = -((-(g.q_lo(rows) - g.kv_len + 1)) // stride)  # ceil division
        m_hi = g.q_hi(rows) // stride
        rm, m = pairs_from_ranges(rows, m_lo, m_hi)
        d = m * stride
        c_lo = np.maximum(g.q_lo(rm) - d, 0) // g.block_n
        c_hi = np.minimum(g.q_hi(rm) - d, g.kv_len - 1) // g.block_n
        r, c = pairs_from_ranges(rm, c_lo, c_hi)
    lo, hi = _diff_range(g, r, c)
    has_multiple = (hi // stride) * stride >= lo
    full = (lo == hi) & (lo % stride == 0)
    kind = np.where(~has_multiple, EMPTY, np.where(full, FULL, PARTIAL))
    return BlockSet.make(g, r, c, kind)


def _strided_aligned(g: Geometry, step: int) -> BlockSet:
    """Strided with square blocks dividing the stride: block (r, c) is hit exactly when
    ``c = r (mod step)`` (``q_lo - k_lo`` is then a multiple of the stride), partial unless the
    blocks are single elements. Generated in sorted order, without a sort."""
    rows = _rows(g)
    c0 = rows % step
    counts = np.maximum(-(-(g.nkb - c0) // step), 0)
    r = np.repeat(rows, counts)
    j = np.arange(len(r), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    c = c0[r] + step * j
    kind = np.full(len(r), FULL if g.block_n == 1 else PARTIAL, dtype=np.uint8)
    return BlockSet(g, r, c, c + 1, kind)  # columns step >= 2 apart: no runs to merge


def _causal(g: Geometry) -> BlockSet:
    rows = _rows(g)
    k_hi = g.k_hi(_cols(g))
    ne_hi = np.minimum(g.q_hi(rows), g.kv_len - 1) // g.block_n + 1
    f_hi = np.searchsorted(k_hi, g.q_lo(rows), side="right")  # k_hi <= q_lo
    return _from_intervals(g, rows, np.zeros_like(rows), ne_hi, np.zeros_like(rows), f_hi)


def _key_prefix(g: Geometry, n: int) -> BlockSet:
    rows = _rows(g)
    k_hi = g.k_hi(_cols(g))
    ne_hi = np.full_like(rows, min(-(-n // g.block_n), g.nkb))
    f_hi = np.full_like(rows, np.searchsorted(k_hi, n - 1, side="right"))  # k_hi < n
    return _from_intervals(g, rows, np.zeros_like(rows), ne_hi, np.zeros_like(rows), f_hi)


def _global(g: Geometry, indices: tuple[int, ...]) -> BlockSet:
    idx = np.asarray(indices, dtype=np.int64)
    loc = idx - g.q_start  # query rows of the layout
    q_count = np.bincount(loc[(loc >= 0) & (loc < g.q_len)] // g.block_m, minlength=g.nqb)[: g.nqb]
    k_count = np.bincount(idx[idx < g.kv_len] // g.block_n, minlength=g.nkb)[: g.nkb]
    rows_all, cols_all = np.arange(g.nqb), np.arange(g.nkb)
    q_full = q_count == (g.q_hi(rows_all) - g.q_lo(rows_all) + 1)
    k_full = k_count == (g.k_hi(cols_all) - g.k_lo(cols_all) + 1)
    grows, gcols = np.flatnonzero(q_count), np.flatnonzero(k_count)
    r = np.concatenate([np.repeat(grows, g.nkb), np.tile(rows_all, len(gcols))])
    c = np.concatenate([np.tile(cols_all, len(grows)), np.repeat(gcols, g.nqb)])
    kind = np.where(q_full[r] | k_full[c], FULL, PARTIAL)
    return BlockSet.make(g, r, c, kind)


def _random(g: Geometry, pat: RandomBlocks) -> BlockSet:
    tab = pat.table(g.q_end, g.kv_len)  # [pattern rows, r] key-block ids
    blk = pat.block
    if tab.shape[1] == 0:
        return BlockSet.make(g, [], [], [])
    prow = np.repeat(np.arange(tab.shape[0], dtype=np.int64), tab.shape[1])
    pcol = tab.reshape(-1)
    if g.block_m % blk == 0 and g.block_n % blk == 0 and g.q_start == 0:
        return _random_coarse(g, blk, prow, pcol)
    keep = ((prow + 1) * blk > g.q_start) & (prow * blk < g.q_end)  # pattern rows among the layout's
    prow, pcol = prow[keep], pcol[keep]
    # Layout blocks overlapping each allowed pattern cell.
    r_lo = (np.maximum(prow * blk, g.q_start) - g.q_start) // g.block_m
    r_hi = (np.minimum((prow + 1) * blk, g.q_end) - 1 - g.q_start) // g.block_m
    c_lo, c_hi = pcol * blk // g.block_n, (np.minimum((pcol + 1) * blk, g.kv_len) - 1) // g.block_n
    nr, nc = r_hi - r_lo + 1, c_hi - c_lo + 1
    cell = np.repeat(np.arange(len(prow)), nr * nc)
    within = np.arange(len(cell)) - np.repeat(np.concatenate([[0], np.cumsum(nr * nc)[:-1]]), nr * nc)
    r = r_lo[cell] + within // nc[cell]
    c = c_lo[cell] + within % nc[cell]
    # A layout block lying entirely inside one allowed cell is full; others need a look.
    inside = ((g.q_lo(r) // blk == g.q_hi(r) // blk) & (g.k_lo(c) // blk == g.k_hi(c) // blk))
    return BlockSet.make(g, r, c, np.where(inside, FULL, UNKNOWN))


def _random_coarse(g: Geometry, blk: int, prow, pcol) -> BlockSet:
    """Random cells when layout blocks are whole multiples of the pattern's block: every cell lies
    in exactly one layout block, which is full exactly when all the cells it covers are allowed
    (counted, no element evaluation: a misaligned block size would have to evaluate them)."""
    ok = (pcol >= 0) & (pcol * blk < g.kv_len) & (prow * blk < g.q_len)
    ncell_cols = -(-g.kv_len // blk)
    cells = np.unique(prow[ok] * ncell_cols + pcol[ok])  # duplicates in a row count once
    r, c = (cells // ncell_cols) * blk // g.block_m, (cells % ncell_cols) * blk // g.block_n
    keys, count = np.unique(r * g.nkb + c, return_counts=True)
    r, c = keys // g.nkb, keys % g.nkb
    covered = (-(-(g.q_hi(r) - g.q_lo(r) + 1) // blk)) * (-(-(g.k_hi(c) - g.k_lo(c) + 1) // blk))
    return BlockSet.make(g, r, c, np.where(count == covered, FULL, PARTIAL))


def _document(g: Geometry, pat: Document) -> BlockSet:
    """Per row: the key blocks of the documents its queries lie in; full where the row lies in
    one document and the key block inside that same document."""
    off = pat.offsets(max(g.q_end, g.kv_len))  # clipped: O(documents), whatever sum(lengths) is
    total = int(off[-1])
    rows, cols = _rows(g), _cols(g)
    qa, qb = g.q_lo(rows), np.minimum(g.q_hi(rows), total - 1)
    valid = qa < total
    sa = np.searchsorted(off, qa, side="right") - 1
    sb = np.searchsorted(off, np.maximum(qb, qa), side="right") - 1
    k_first = np.where(valid, off[np.clip(sa, 0, len(off) - 1)], 0)
    k_last = np.minimum(np.where(valid, off[np.clip(sb + 1, 0, len(off) - 1)] - 1, -1), g.kv_len - 1)
    ne_lo = k_first // g.block_n
    ne_hi = np.where(valid & (k_last >= k_first), k_last // g.block_n + 1, ne_lo)
    one_doc = valid & (sa == sb) & (g.q_hi(rows) < total)
    doc_lo = off[np.clip(sa, 0, len(off) - 1)]
    doc_hi = off[np.clip(sa + 1, 0, len(off) - 1)] - 1
    f_lo = np.searchsorted(g.k_lo(cols), doc_lo, side="left")
    f_hi = np.where(one_doc, np.searchsorted(g.k_hi(cols), doc_hi, side="right"), f_lo)
    return _from_intervals(g, rows, ne_lo, ne_hi, f_lo, f_hi)


def _traced(g: Geometry, e) -> BlockSet:
    """Interval bounds of a traced predicate over every block: sure-full, sure-empty or unknown."""
    rows_per = max(1, EVAL_CHUNK // max(g.nkb, 1) // 4)
    parts = []
    cols = np.arange(g.nkb, dtype=np.int64)
    k_box = (g.k_lo(cols)[None, :], g.k_hi(cols)[None, :])
    for start in range(0, g.nqb, rows_per):
        rows = np.arange(start, min(start + rows_per, g.nqb), dtype=np.int64)
        env = {"q_idx": (g.q_lo(rows)[:, None], g.q_hi(rows)[:, None]), "kv_idx": k_box,
               "b": (np.int64(0), np.int64(0)), "h": (np.int64(0), np.int64(0))}
        lo, hi = e.bounds(env)
        lo, hi = np.broadcast_to(lo, (len(rows), g.nkb)), np.broadcast_to(hi, (len(rows), g.nkb))
        kind = np.where(lo == 1, FULL, np.where(hi == 0, EMPTY, UNKNOWN)).astype(np.uint8)
        kind = traced_subtiles(g, e, rows, kind)
        rr, cc = np.nonzero(kind)
        parts.append((rows[rr], cc, kind[rr, cc]))
    r, c, k = (np.concatenate(x) for x in zip(*parts)) if parts else ([], [], [])
    return BlockSet.make(g, r, c, k)


SUBTILES = 16  # per block side: UNKNOWN blocks are split into SUBTILES**2 tiles for interval bounds


def traced_subtiles(g: Geometry, e, rows: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Decide UNKNOWN blocks of a traced predicate ``e`` (rows ``rows``) from interval bounds
    over sub-tiles: a sure-true and a sure-false sub-tile make a block PARTIAL, all sure-true
    FULL, all sure-false EMPTY; the rest stay UNKNOWN (evaluated later). Exact, and it spares
    the element-wise evaluation of most partial blocks (windows narrower than a block)."""
    rr, cc = np.nonzero(kind == UNKNOWN)
    if len(rr) == 0 or g.block_m < SUBTILES or g.block_n < SUBTILES:
        return kind
    tm, tn = -(-g.block_m // SUBTILES), -(-g.block_n // SUBTILES)
    out = kind.copy()
    step = max(1, EVAL_CHUNK // (SUBTILES * SUBTILES * 8))
    sub = np.arange(SUBTILES, dtype=np.int64)
    for s in range(0, len(rr), step):
        r, c = rows[rr[s:s + step]], cc[s:s + step].astype(np.int64)
        q0 = g.q_lo(r)[:, None, None] + sub[None, :, None] * tm  # [P, S, 1]
        k0 = g.k_lo(c)[:, None, None] + sub[None, None, :] * tn  # [P, 1, S]
        q1 = np.minimum(np.minimum(q0 + tm, g.q_hi(r)[:, None, None] + 1), g.q_end) - 1
        k1 = np.minimum(np.minimum(k0 + tn, g.k_hi(c)[:, None, None] + 1), g.kv_len) - 1
        valid = (q0 <= q1) & (k0 <= k1)  # tiles past the block's (or the sequence's) end
        env = {"q_idx": (q0, np.maximum(q1, q0)), "kv_idx": (k0, np.maximum(k1, k0)),
               "b": (np.int64(0), np.int64(0)), "h": (np.int64(0), np.int64(0))}
        lo, hi = (np.broadcast_to(x, valid.shape) for x in e.bounds(env))
        any_true = ((lo == 1) & valid).any(axis=(1, 2))
        any_false = ((hi == 0) & valid).any(axis=(1, 2))
        all_true = ((lo == 1) | ~valid).all(axis=(1, 2))
        all_false = ((hi == 0) | ~valid).all(axis=(1, 2))
        k = np.where(all_true, FULL, np.where(all_false, EMPTY, np.where(any_true & any_false, PARTIAL, UNKNOWN)))
        out[rr[s:s + step], cc[s:s + step]] = k
    return out


def _classify(p: Pattern, g: Geometry) -> BlockSet:
    match p:
        case Full():
            return BlockSet.rows_of(g, FULL)
        case Causal():
            return _causal(g)
        case SlidingWindow(w):
            return _band(g, w)
        case BlockWindow(w, blk):
            return _band(g, w, blk)
        case DilatedWindow(w, d):
            return _dilated(g, w, d)
        case BlockLocal(blk):
            return _band(g, 0, blk)  # q // blk == k // blk
        case Strided(s):
            return _strided(g, s)
        case GlobalTokens(idx):
            return _global(g, idx)
        case RandomBlocks():
            return _random(g, p)
        case PrefixLM(n):
            return _key_prefix(g, n) | _causal(g)
        case Document():
            return _document(g, p)
        case Union(parts):
            return functools.reduce(BlockSet.__or__, (_classify(x, g) for x in parts))
        case Intersection(parts):
            sets = sorted((_classify(x, g) for x in parts), key=lambda s: len(s.seg_row))  # sparsest first
            return functools.reduce(BlockSet.__and__, sets)
        case Complement(part):
            return ~_classify(part, g)
        case Mask() if p.expr is not None:
            s = p.structure()  # the equal DSL pattern where recognised (dsl/recognize.py)
            return _traced(g, p.expr) if s is None else _classify(s, g)
        case Mask():
            return BlockSet.rows_of(g, UNKNOWN)
    raise PatternError(f"cannot build a block layout for {p!r} ({p.family} pattern)")


def cell_size(p: Pattern) -> int:
    """A period ``c`` such that ``p`` is constant on every aligned cell ``[a*c, (a+1)*c) x [b*c, (b+1)*c)``
    of absolute positions (0: constant everywhere; 1: no structure known).

    BigBird's parts (block windows, random blocks, global tokens on whole blocks) are constant on
    their block's cells, so an undecided layout block is decided from one element per cell it
    meets, not from all of its elements. Exact types only: a subclass may change the predicate.
    """
    t = type(p)
    if t is Full:
        return 0
    if t in (BlockWindow, BlockLocal, RandomBlocks):
        return p.block
    if t is GlobalTokens:
        idx = np.unique(np.asarray(p.indices, dtype=np.int64))
        if len(idx) == 0:
            return 0
        breaks = np.flatnonzero(idx[1:] != idx[:-1] + 1)  # last index of every run but the last
        starts, ends = np.append(idx[:1], idx[breaks + 1]), np.append(idx[breaks], idx[-1]) + 1
        return int(np.gcd.reduce(np.concatenate([starts, ends])))
    if t is Document and p.lengths is not None:
        return int(np.gcd.reduce(np.cumsum(np.asarray(p.lengths, dtype=np.int64))))
    if t in (Union, Intersection, Complement):
        return int(functools.reduce(np.gcd, (cell_size(c) for c in p.children()), 0))
    return 1


def _representatives(lo: np.ndarray, hi: np.ndarray, cell: int, n: int) -> np.ndarray:
    """``[P, n]`` positions of blocks ``[lo, hi]``: ``lo`` and the start of every later cell of
    size ``cell`` (all positions when ``cell`` is 1), clipped to ``hi`` (repeats are harmless)."""
    if cell <= 1:
        return np.minimum(lo[:, None] + np.arange(n, dtype=np.int64), hi[:, None])
    nxt = (lo // cell + 1) * cell  # first cell start after lo
    steps = np.concatenate([[0], np.arange(n - 1, dtype=np.int64)])
    pts = np.where(np.arange(n) == 0, lo[:, None], nxt[:, None] + steps * cell)
    return np.minimum(pts, hi[:, None])


def _refine(p: Pattern, g: Geometry, bs: BlockSet, b: int, h: int) -> BlockSet:
    """Resolve UNKNOWN blocks by evaluating the predicate on their elements only: one element
    per cell on which the pattern is constant (:func:`cell_size`), vectorized over blocks; for
    shift-invariant predicates only one block per class of equal masks (:mod:`.shift`)."""
    unknown = bs.seg_kind == UNKNOWN
    if not unknown.any():
        return bs
    rows, cols, _ = segments_to_blocks(bs.seg_row[unknown], bs.seg_start[unknown], bs.seg_end[unknown],
                                       bs.seg_kind[unknown])
    period = shift_period(p, g.q_end, g.kv_len)
    if period is not None and period <= g.q_end and len(rows) > 1:
        first, inverse = shift_classes(period, g.q_lo(rows), g.q_hi(rows) - g.q_lo(rows) + 1, g.k_lo(cols),
                                       g.k_hi(cols) - g.k_lo(cols) + 1)
        kind = _decide(p, g, rows[first], cols[first], b, h)[inverse]
    else:
        kind = _decide(p, g, rows, cols, b, h)
    known = ~unknown
    segs = (np.concatenate([bs.seg_row[known], rows]), np.concatenate([bs.seg_start[known], cols]),
            np.concatenate([bs.seg_end[known], cols + 1]), np.concatenate([bs.seg_kind[known], kind]))
    return BlockSet.of(g, sort_segments(*segs, g.nkb))


def _decide(p: Pattern, g: Geometry, rows: np.ndarray, cols: np.ndarray, b: int, h: int) -> np.ndarray:
    """EMPTY / PARTIAL / FULL of the given blocks from one element per cell of each."""
    cell = cell_size(p)
    n_q = 1 if cell == 0 else min(g.block_m, -(-g.block_m // cell) + 1)  # cells a block can meet
    n_k = 1 if cell == 0 else min(g.block_n, -(-g.block_n // cell) + 1)
    kind = np.zeros(len(rows), dtype=np.uint8)
    per = max(1, EVAL_CHUNK // (n_q * n_k))
    for start in range(0, len(rows), per):
        r, c = rows[start:start + per], cols[start:start + per]
        q = torch.from_numpy(_representatives(g.q_lo(r), g.q_hi(r), cell, n_q))  # [P, n_q], inside the block
        k = torch.from_numpy(_representatives(g.k_lo(c), g.k_hi(c), cell, n_k))
        m = p.evaluate(b, h, q[:, :, None], k[:, None, :], g.q_end, g.kv_len)  # [P, n_q, n_k]
        kind[start:start + per] = np.where(m.all(dim=2).all(dim=1).numpy(), FULL,
                                           np.where(m.any(dim=2).any(dim=1).numpy(), PARTIAL, EMPTY))
    return kind


def block_set(p: Pattern, g: Geometry, b: int = 0, h: int = 0) -> BlockSet:
    """The exact layout of a head- and batch-independent mask pattern."""
    return _refine(p, g, _classify(p, g), b, h)
