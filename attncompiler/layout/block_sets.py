"""Block sets: which (query-block, key-block) pairs of a pattern are empty, partial or full.

Each primitive classifies its block pairs from its parameters in time proportional to the
non-empty blocks (no L x L evaluation); combinators use set algebra on sorted block keys.
Where set algebra cannot decide (a union of two partial blocks may be full, an intersection
may be empty), the block is marked UNKNOWN and resolved at the end by evaluating the root
predicate on that block only, so the result always equals the layout from dense evaluation.
Opaque mask_mods are evaluated chunk by chunk, as FlexAttention's ``create_block_mask`` does.
:mod:`attncompiler.layout.block_layout` turns a block set into the BCSR :class:`~attncompiler.layout.block_layout.BlockLayout`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..dsl.pattern import Causal, Complement, Intersection, Pattern, Union
from ..dsl.primitives import (BlockLocal, BlockWindow, DilatedWindow, Document, Full, GlobalTokens, PrefixLM,
                              RandomBlocks, SlidingWindow, Strided)
from ..dsl.mask_mod import Mask
from ..errors import PatternError

EMPTY, PARTIAL, FULL, UNKNOWN = 0, 1, 2, 3

# Refinement evaluates at most this many elements at once (bounds temporary memory).
EVAL_CHUNK = 1 << 22


@dataclass(frozen=True)
class Geometry:
    """Lengths and block sizes of one layout."""

    q_len: int
    kv_len: int
    block_m: int
    block_n: int

    @property
    def nqb(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def nkb(self) -> int:
        return -(-self.kv_len // self.block_n)

    def q_lo(self, rows):
        return rows * self.block_m

    def q_hi(self, rows):
        return np.minimum((rows + 1) * self.block_m, self.q_len) - 1

    def k_lo(self, cols):
        return cols * self.block_n

    def k_hi(self, cols):
        return np.minimum((cols + 1) * self.block_n, self.kv_len) - 1


@dataclass(frozen=True, eq=False)
class BlockSet:
    """Non-empty blocks of one 2-D layout, sorted by (row, col); ``kind`` is PARTIAL/FULL/UNKNOWN."""

    geom: Geometry
    rows: np.ndarray
    cols: np.ndarray
    kind: np.ndarray

    @staticmethod
    def make(geom: Geometry, rows, cols, kind) -> BlockSet:
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
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
            merged = np.where((merged < FULL) & (any_unknown == 1), UNKNOWN, merged).astype(np.uint8)
            order = order[start]
            return BlockSet(geom, rows[order], cols[order], merged)
        return BlockSet(geom, rows[order], cols[order], kind[order])

    @property
    def keys(self) -> np.ndarray:
        return self.rows * self.geom.nkb + self.cols

    def __len__(self) -> int:
        return len(self.rows)


# ---------------------------------------------------------------------------------------------
# Set algebra
# ---------------------------------------------------------------------------------------------

def _union(a: BlockSet, b: BlockSet) -> BlockSet:
    ka, kb = a.keys, b.keys
    keys = np.union1d(ka, kb)
    kind_a = _lookup(ka, a.kind, keys)
    kind_b = _lookup(kb, b.kind, keys)
    out = np.where((kind_a == FULL) | (kind_b == FULL), FULL,
                   np.where(kind_a == EMPTY, kind_b, np.where(kind_b == EMPTY, kind_a, UNKNOWN)))
    nkb = a.geom.nkb
    return BlockSet(a.geom, keys // nkb, keys % nkb, out.astype(np.uint8))


def _intersection(a: BlockSet, b: BlockSet) -> BlockSet:
    keys, ia, ib = np.intersect1d(a.keys, b.keys, assume_unique=True, return_indices=True)
    kind_a, kind_b = a.kind[ia], b.kind[ib]
    out = np.where(kind_a == FULL, kind_b, np.where(kind_b == FULL, kind_a, UNKNOWN))
    nkb = a.geom.nkb
    return BlockSet(a.geom, keys // nkb, keys % nkb, out.astype(np.uint8))


def _complement(a: BlockSet) -> BlockSet:
    g = a.geom
    all_keys = np.arange(g.nqb * g.nkb, dtype=np.int64)
    kind = _lookup(a.keys, a.kind, all_keys)
    out = np.where(kind == EMPTY, FULL, np.where(kind == FULL, EMPTY, kind)).astype(np.uint8)
    return BlockSet.make(g, all_keys // g.nkb, all_keys % g.nkb, out)


def _lookup(keys: np.ndarray, kinds: np.ndarray, query: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(keys, query)
    pos_c = np.minimum(pos, max(len(keys) - 1, 0))
    hit = (pos < len(keys)) & (keys[pos_c] == query) if len(keys) else np.zeros(len(query), bool)
    return np.where(hit, kinds[pos_c] if len(keys) else 0, EMPTY).astype(np.uint8)


def _pairs_from_ranges(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Expand per-row inclusive column ranges ``[lo, hi]`` into (row, col) pairs."""
    counts = np.maximum(hi - lo + 1, 0)
    r = np.repeat(rows, counts)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    c = np.arange(len(r), dtype=np.int64) + starts
    return r, c


def _all_pairs(g: Geometry):
    rows = np.arange(g.nqb, dtype=np.int64)
    return _pairs_from_ranges(rows, np.zeros_like(rows), np.full_like(rows, g.nkb - 1))


# ---------------------------------------------------------------------------------------------
# Primitive classifiers
# ---------------------------------------------------------------------------------------------

def _band(g: Geometry, window: int, unit: int = 1) -> BlockSet:
    """``|q // unit - k // unit| <= window`` (sliding window for unit 1, BigBird window else)."""
    rows = np.arange(g.nqb, dtype=np.int64)
    qa, qb = g.q_lo(rows) // unit, g.q_hi(rows) // unit
    k_first = np.maximum((qa - window) * unit, 0)
    k_last = np.minimum((qb + window + 1) * unit - 1, g.kv_len - 1)
    r, c = _pairs_from_ranges(rows, k_first // g.block_n, k_last // g.block_n)
    lo, hi = _diff_range(g, r, c, unit)
    far = np.maximum(np.abs(lo), np.abs(hi))
    near = np.where((lo <= 0) & (hi >= 0), 0, np.minimum(np.abs(lo), np.abs(hi)))
    kind = np.where(far <= window, FULL, np.where(near > window, EMPTY, PARTIAL))
    return BlockSet.make(g, r, c, kind)


def _diff_range(g: Geometry, r, c, unit: int = 1):
    """Range of ``q // unit - k // unit`` over each block (all integers in it occur)."""
    return g.q_lo(r) // unit - g.k_hi(c) // unit, g.q_hi(r) // unit - g.k_lo(c) // unit


def _dilated(g: Geometry, window: int, dilation: int) -> BlockSet:
    span = window * dilation
    base = _band(g, span)
    lo, hi = _diff_range(g, base.rows, base.cols)
    lo_c, hi_c = np.maximum(lo, -span), np.minimum(hi, span)
    has_multiple = (hi_c // dilation) * dilation >= lo_c
    single = lo == hi
    kind = np.where(~has_multiple, EMPTY,
                    np.where(dilation == 1, base.kind, np.where(single, FULL, PARTIAL)))
    return BlockSet.make(g, base.rows, base.cols, kind)


def _strided(g: Geometry, stride: int) -> BlockSet:
    r, c = _all_pairs(g)
    lo, hi = _diff_range(g, r, c)
    has_multiple = (hi // stride) * stride >= lo
    full = (stride == 1) | ((lo == hi) & (lo % stride == 0))
    kind = np.where(~has_multiple, EMPTY, np.where(full, FULL, PARTIAL))
    return BlockSet.make(g, r, c, kind)


def _block_local(g: Geometry, block: int) -> BlockSet:
    rows = np.arange(g.nqb, dtype=np.int64)
    qa, qb = g.q_lo(rows) // block, g.q_hi(rows) // block
    k_first = qa * block
    k_last = np.minimum((qb + 1) * block - 1, g.kv_len - 1)
    r, c = _pairs_from_ranges(rows, k_first // g.block_n, np.maximum(k_last, k_first - 1) // g.block_n)
    lo, hi = _diff_range(g, r, c, block)
    kind = np.where((lo == 0) & (hi == 0), FULL, np.where((lo <= 0) & (hi >= 0), PARTIAL, EMPTY))
    return BlockSet.make(g, r, c, kind)


def _causal(g: Geometry) -> BlockSet:
    rows = np.arange(g.nqb, dtype=np.int64)
    last = np.minimum(g.q_hi(rows), g.kv_len - 1) // g.block_n
    r, c = _pairs_from_ranges(rows, np.zeros_like(rows), np.where(g.q_hi(rows) >= 0, last, -1))
    kind = np.where(g.k_hi(c) <= g.q_lo(r), FULL, PARTIAL)
    return BlockSet.make(g, r, c, kind)


def _key_prefix(g: Geometry, n: int) -> BlockSet:
    cols = np.arange(min(-(-n // g.block_n), g.nkb), dtype=np.int64)
    r = np.repeat(np.arange(g.nqb, dtype=np.int64), len(cols))
    c = np.tile(cols, g.nqb)
    return BlockSet.make(g, r, c, np.where(g.k_hi(c) < n, FULL, PARTIAL))


def _global(g: Geometry, indices: tuple[int, ...]) -> BlockSet:
    idx = np.asarray(indices, dtype=np.int64)
    q_count = np.bincount(idx[idx < g.q_len] // g.block_m, minlength=g.nqb)[: g.nqb]
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
    tab = pat.table(g.q_len, g.kv_len)  # [pattern rows, r] key-block ids
    blk = pat.block
    if tab.shape[1] == 0:
        return BlockSet.make(g, [], [], [])
    prow = np.repeat(np.arange(tab.shape[0], dtype=np.int64), tab.shape[1])
    pcol = tab.reshape(-1)
    if g.block_m % blk == 0 and g.block_n % blk == 0:
        return _random_coarse(g, blk, prow, pcol)
    # Layout blocks overlapping each allowed pattern cell.
    r_lo, r_hi = prow * blk // g.block_m, np.minimum((prow + 1) * blk, g.q_len) - 1
    r_hi = r_hi // g.block_m
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
    off = pat.offsets(max(g.q_len, g.kv_len))  # clipped: O(documents), whatever sum(lengths) is
    total = int(off[-1])
    rows = np.arange(g.nqb, dtype=np.int64)
    qa, qb = g.q_lo(rows), np.minimum(g.q_hi(rows), total - 1)
    valid = qa < total
    sa = np.searchsorted(off, qa, side="right") - 1
    sb = np.searchsorted(off, np.maximum(qb, qa), side="right") - 1
    k_first = np.where(valid, off[np.clip(sa, 0, len(off) - 1)], 0)
    k_last = np.minimum(np.where(valid, off[np.clip(sb + 1, 0, len(off) - 1)] - 1, -1), g.kv_len - 1)
    r, c = _pairs_from_ranges(rows[valid], k_first[valid] // g.block_n,
                              np.where(k_last[valid] >= k_first[valid], k_last[valid] // g.block_n, -1))
    ka, kb = g.k_lo(c), np.minimum(g.k_hi(c), total - 1)
    ca = np.searchsorted(off, ka, side="right") - 1
    cb = np.searchsorted(off, np.maximum(kb, ka), side="right") - 1
    rsa, rsb = sa[r], sb[r]
    q_in = g.q_hi(r) < total
    k_in = g.k_hi(c) < total
    full = (rsa == rsb) & (ca == cb) & (rsa == ca) & q_in & k_in
    overlap = (np.maximum(rsa, ca) <= np.minimum(rsb, cb)) & (ka < total)
    return BlockSet.make(g, r, c, np.where(full, FULL, np.where(overlap, PARTIAL, EMPTY)))


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
        rr, cc = np.nonzero(kind)
        parts.append((rows[rr], cc, kind[rr, cc]))
    r, c, k = (np.concatenate(x) for x in zip(*parts)) if parts else ([], [], [])
    return BlockSet.make(g, r, c, k)


def _classify(p: Pattern, g: Geometry) -> BlockSet:
    match p:
        case Full():
            r, c = _all_pairs(g)
            return BlockSet.make(g, r, c, FULL)
        case Causal():
            return _causal(g)
        case SlidingWindow(w):
            return _band(g, w)
        case BlockWindow(w, blk):
            return _band(g, w, blk)
        case DilatedWindow(w, d):
            return _dilated(g, w, d)
        case BlockLocal(blk):
            return _block_local(g, blk)
        case Strided(s):
            return _strided(g, s)
        case GlobalTokens(idx):
            return _global(g, idx)
        case RandomBlocks():
            return _random(g, p)
        case PrefixLM(n):
            return _union(_key_prefix(g, n), _causal(g))
        case Document():
            return _document(g, p)
        case Union(parts):
            return functools.reduce(_union, (_classify(x, g) for x in parts))
        case Intersection(parts):
            return functools.reduce(_intersection, (_classify(x, g) for x in parts))
        case Complement(part):
            return _complement(_classify(part, g))
        case Mask() if p.expr is not None:
            return _traced(g, p.expr)
        case Mask():
            r, c = _all_pairs(g)
            return BlockSet.make(g, r, c, UNKNOWN)
    raise PatternError(f"cannot build a block layout for {p!r} ({p.family} pattern)")


def _refine(p: Pattern, g: Geometry, bs: BlockSet, b: int, h: int) -> BlockSet:
    """Resolve UNKNOWN blocks by evaluating the predicate on their elements only."""
    unknown = np.flatnonzero(bs.kind == UNKNOWN)
    if len(unknown) == 0:
        return bs
    kind = bs.kind.copy()
    per = max(1, EVAL_CHUNK // (g.block_m * g.block_n))
    ar_m, ar_n = torch.arange(g.block_m), torch.arange(g.block_n)
    for start in range(0, len(unknown), per):
        sel = unknown[start:start + per]
        q = torch.from_numpy(g.q_lo(bs.rows[sel]))[:, None] + ar_m  # [P, BM]
        k = torch.from_numpy(g.k_lo(bs.cols[sel]))[:, None] + ar_n  # [P, BN]
        q_ok, k_ok = q < g.q_len, k < g.kv_len
        q, k = q.clamp_max(g.q_len - 1), k.clamp_max(g.kv_len - 1)
        m = p.evaluate(b, h, q[:, :, None], k[:, None, :], g.q_len, g.kv_len)  # [P, BM, BN]
        valid = q_ok[:, :, None] & k_ok[:, None, :]
        hits = (m & valid).sum(dim=(1, 2)).numpy()
        total = valid.sum(dim=(1, 2)).numpy()
        kind[sel] = np.where(hits == 0, EMPTY, np.where(hits == total, FULL, PARTIAL))
    return BlockSet.make(g, bs.rows, bs.cols, kind)


def block_set(p: Pattern, g: Geometry, b: int = 0, h: int = 0) -> BlockSet:
    """The exact layout of a head- and batch-independent mask pattern."""
    return _refine(p, g, _classify(p, g), b, h)
