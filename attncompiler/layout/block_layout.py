"""Block layouts: per (batch, head) group a sorted block list in CSR form, with the transposed
(CSC) lists for the backward pass and FlexAttention ``BlockMask`` export and import.

Which blocks are empty, partial or full is decided analytically by :mod:`attncompiler.layout.block_sets`
(re-exported here: ``EMPTY``, ``PARTIAL``, ``FULL``, ``UNKNOWN``, ``Geometry``, ``BlockSet``,
``block_set``), so a layout always equals the one from dense evaluation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..dsl.pattern import Pattern, check_lengths, require_mask
from .block_sets import (EVAL_CHUNK, EMPTY, FULL, PARTIAL, UNKNOWN, BlockSet, Geometry, block_set,  # noqa: F401
                         combine_segments, pairs_from_ranges, segments_to_blocks)
from ..errors import LayoutError
from ..dsl.memory_limits import check_budget, format_bytes
from ..dsl.mask_mod import check_batch_head_dependence, mask

# ---------------------------------------------------------------------------------------------
# BCSR layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Blocks2D:
    """One group's layout: per query-block row, its full key blocks as a few ``[start, end)``
    ranges (CSR over ranges) and its partial key blocks as an explicit sorted list (CSR).

    Causal at 1M tokens with 64-blocks is 16,384 rows x one range plus one diagonal block. The
    explicit per-block views (``rows``, ``cols``, ``full``, ``row_ptr``, ``csc``) are derived on
    first use, for consumers that need them; counts, ``allowed_pairs()`` and the range views
    (``csc_ranges``, ``csc_partial``) work from the ranges without expanding them.
    """

    geom: Geometry
    pattern: Pattern
    range_ptr: np.ndarray     # [nqb + 1] into range_start / range_end
    range_start: np.ndarray   # first full key block of each range
    range_end: np.ndarray     # one past its last
    part_ptr: np.ndarray      # [nqb + 1] into part_cols
    part_cols: np.ndarray     # partial key blocks, sorted within each row

    # -- sizes (proportional to ranges) ---------------------------------------------------------
    @functools.cached_property
    def num_full(self) -> int:
        return int((self.range_end - self.range_start).sum())

    @property
    def num_partial(self) -> int:
        return len(self.part_cols)

    @property
    def num_blocks(self) -> int:
        return self.num_full + self.num_partial

    @functools.cached_property
    def range_rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.geom.nqb, dtype=np.int64), np.diff(self.range_ptr))

    @functools.cached_property
    def part_rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.geom.nqb, dtype=np.int64), np.diff(self.part_ptr))

    # -- explicit views (derived, size of the result) ----------------------------------------------
    @functools.cached_property
    def _explicit(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fr, fc = pairs_from_ranges(self.range_rows, self.range_start, self.range_end - 1)
        rows = np.concatenate([fr, self.part_rows])
        cols = np.concatenate([fc, self.part_cols])
        full = np.concatenate([np.ones(len(fr), bool), np.zeros(len(self.part_cols), bool)])
        order = np.argsort(rows * self.geom.nkb + cols, kind="stable")
        return rows[order], cols[order], full[order]

    @property
    def rows(self) -> np.ndarray:
        """Query block of every non-empty block, sorted by (row, col)."""
        return self._explicit[0]

    @property
    def cols(self) -> np.ndarray:
        return self._explicit[1]

    @property
    def full(self) -> np.ndarray:
        return self._explicit[2]

    @functools.cached_property
    def row_ptr(self) -> np.ndarray:
        counts = np.diff(self.part_ptr) + np.bincount(self.range_rows, weights=self.range_end - self.range_start,
                                                      minlength=self.geom.nqb).astype(np.int64)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @functools.cached_property
    def csc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(col_ptr, rows, full)`` sorted by key block, for the backward pass."""
        order = np.lexsort((self.rows, self.cols))
        col_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.cols, minlength=self.geom.nkb))])
        return col_ptr, self.rows[order], self.full[order]

    # -- transposed range views (proportional to their result) ---------------------------------------
    @functools.cached_property
    def csc_ranges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(col_range_ptr, row_start, row_end)``: per key block, its full query blocks as ranges.

        Membership of column c changes between rows t-1 and t exactly on the symmetric difference
        of their ranges, so the transposed ranges come from those differences (one range per
        column for causal), never from the expanded blocks.
        """
        g = self.geom
        rr, s, e = self.range_rows, self.range_start, self.range_end
        kinds = np.full(len(rr), FULL, dtype=np.uint8)
        diff = combine_segments((rr + 1, s, e, kinds), (rr, s, e, kinds), g.nkb, _transition_kind)
        t, c, k = segments_to_blocks(*diff)
        order = np.argsort(c * (g.nqb + 2) + t, kind="stable")
        t, c, k = t[order], c[order], k[order]
        starts, ends = k == _OPENS, k == _CLOSES
        ptr = np.concatenate([[0], np.cumsum(np.bincount(c[starts], minlength=g.nkb))]).astype(np.int64)
        return ptr, t[starts], t[ends]

    @functools.cached_property
    def csc_partial(self) -> tuple[np.ndarray, np.ndarray]:
        """``(col_part_ptr, rows)``: per key block, its partial query blocks (sorted)."""
        order = np.lexsort((self.part_rows, self.part_cols))
        ptr = np.concatenate([[0], np.cumsum(np.bincount(self.part_cols, minlength=self.geom.nkb))])
        return ptr.astype(np.int64), self.part_rows[order]

    def allowed_pairs(self) -> int:
        """Number of allowed (q, k) pairs (exact: evaluates partial blocks only)."""
        g = self.geom
        k_cum = np.concatenate([[0], np.cumsum(g.k_hi(np.arange(g.nkb)) - g.k_lo(np.arange(g.nkb)) + 1)])
        rr = self.range_rows
        total = int(((g.q_hi(rr) - g.q_lo(rr) + 1) * (k_cum[self.range_end] - k_cum[self.range_start])).sum())
        per = max(1, EVAL_CHUNK // (g.block_m * g.block_n))  # bounded temporary memory
        for s in range(0, self.num_partial, per):
            total += int(block_masks(self, self.part_rows[s:s + per], self.part_cols[s:s + per]).sum())
        return total


# Kinds of ``csc_ranges``' row transitions: a column's full run opens or closes at a row.
_OPENS, _CLOSES = PARTIAL, FULL


def _transition_kind(above: np.ndarray, here: np.ndarray) -> np.ndarray:
    return np.where(here != EMPTY, np.where(above == EMPTY, _OPENS, EMPTY),
                    np.where(above != EMPTY, _CLOSES, EMPTY))


def block_masks(blocks: Blocks2D, rows: np.ndarray, cols: np.ndarray, device="cpu") -> torch.Tensor:
    """Element masks ``[len(rows), BM, BN]`` of the blocks (rows, cols) (out-of-range elements False)."""
    g = blocks.geom
    q = torch.from_numpy(g.q_lo(np.asarray(rows))).to(device)[:, None] + torch.arange(g.block_m, device=device)
    k = torch.from_numpy(g.k_lo(np.asarray(cols))).to(device)[:, None] + torch.arange(g.block_n, device=device)
    valid = (q < g.q_end)[:, :, None] & (k < g.kv_len)[:, None, :]
    m = blocks.pattern.evaluate(0, 0, q.clamp_max(g.q_end - 1)[:, :, None], k.clamp_max(g.kv_len - 1)[:, None, :],
                                g.q_end, g.kv_len)
    return m & valid


def partial_masks(blocks: Blocks2D, which: np.ndarray, device="cpu") -> torch.Tensor:
    """Element masks ``[len(which), BM, BN]`` of the given blocks of the explicit view
    (indices into ``blocks.rows`` / ``blocks.cols``; out-of-range elements False)."""
    return block_masks(blocks, blocks.rows[which], blocks.cols[which], device)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A pattern's block layout at fixed lengths and block sizes.

    Attributes:
        groups: distinct 2-D layouts; ``group_index[b, h]`` says which one (batch, head) uses.
        group_index: int array ``[Bm, Hm]``; ``Bm``/``Hm`` are 1 when the pattern does not
            depend on the batch entry / head, else the batch size / number of heads.
    """

    pattern: Pattern
    geom: Geometry
    groups: tuple[Blocks2D, ...]
    group_index: np.ndarray

    q_len = property(lambda self: self.geom.q_len)
    kv_len = property(lambda self: self.geom.kv_len)
    block_m = property(lambda self: self.geom.block_m)
    block_n = property(lambda self: self.geom.block_n)
    num_q_blocks = property(lambda self: self.geom.nqb)
    num_kv_blocks = property(lambda self: self.geom.nkb)

    def group_for(self, b: int, h: int) -> Blocks2D:
        gi = self.group_index
        return self.groups[gi[b % gi.shape[0], h % gi.shape[1]]]

    @property
    def num_blocks(self) -> int:
        """Non-empty blocks, summed over (batch, head) entries of ``group_index``."""
        return int(sum(self.groups[i].num_blocks for i in self.group_index.reshape(-1)))

    @property
    def num_full(self) -> int:
        return int(sum(self.groups[i].num_full for i in self.group_index.reshape(-1)))

    @property
    def num_partial(self) -> int:
        return self.num_blocks - self.num_full

    @property
    def block_density(self) -> float:
        """Fraction of block pairs that are computed."""
        return self.num_blocks / (self.group_index.size * self.geom.nqb * self.geom.nkb)

    def density(self) -> float:
        """Fraction of (q, k) pairs allowed (exact)."""
        allowed = sum(self.groups[i].allowed_pairs() for i in self.group_index.reshape(-1))
        return allowed / (self.group_index.size * self.geom.q_len * self.geom.kv_len)

    def block_kinds(self) -> np.ndarray:
        """``[Bm, Hm, nqb, nkb]`` uint8 grid: 0 empty, 1 partial, 2 full (small layouts only)."""
        g = self.geom
        out = np.zeros(self.group_index.shape + (g.nqb, g.nkb), dtype=np.uint8)
        for (bi, hi), gid in np.ndenumerate(self.group_index):
            grp = self.groups[gid]
            out[bi, hi, grp.rows, grp.cols] = np.where(grp.full, FULL, PARTIAL)
        return out

    # -- FlexAttention-compatible BCSR ---------------------------------------------------------
    def bcsr(self, transposed: bool = False, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """FlexAttention-style tensors, ``[Bm, Hm, n]`` counts and ``[Bm, Hm, n, width]`` indices.

        Keys: ``kv_num_blocks``/``kv_indices`` (partial blocks) and ``full_kv_num_blocks``/
        ``full_kv_indices``; with ``transposed=True`` the ``q_*`` lists used by the backward
        pass. Indices past each count are padding (0). ``width`` is the longest row, or
        ``pad_to``.
        """
        g = self.geom
        n_rows = g.nkb if transposed else g.nqb
        per_group = [_ell(*_lists(grp, transposed), n_rows) for grp in self.groups]
        width = max([1] + [max(p[1].shape[1], p[3].shape[1]) for p in per_group])
        width = max(width, pad_to or 0)
        Bm, Hm = self.group_index.shape
        names = ("q" if transposed else "kv")
        out = {f"{names}_num_blocks": torch.zeros(Bm, Hm, n_rows, dtype=torch.int32),
               f"{names}_indices": torch.zeros(Bm, Hm, n_rows, width, dtype=torch.int32),
               f"full_{names}_num_blocks": torch.zeros(Bm, Hm, n_rows, dtype=torch.int32),
               f"full_{names}_indices": torch.zeros(Bm, Hm, n_rows, width, dtype=torch.int32)}
        for (bi, hi), gid in np.ndenumerate(self.group_index):
            pn, pi, fn, fi = per_group[gid]
            out[f"{names}_num_blocks"][bi, hi] = torch.from_numpy(pn)
            out[f"{names}_indices"][bi, hi, :, : pi.shape[1]] = torch.from_numpy(pi)
            out[f"full_{names}_num_blocks"][bi, hi] = torch.from_numpy(fn)
            out[f"full_{names}_indices"][bi, hi, :, : fi.shape[1]] = torch.from_numpy(fi)
        return out

    def bcsr_ranges(self, transposed: bool = False) -> dict[str, torch.Tensor]:
        """Range-aware BCSR: partial blocks as in :meth:`bcsr`, full blocks as ``[start, end)``
        ranges per row, ``full_{kv|q}_num_ranges [Bm, Hm, n]`` and ``full_{kv|q}_ranges
        [Bm, Hm, n, width, 2]`` padded to the most ranges of any row (small: one for causal),
        so a kernel's tables never grow with the length of a full run."""
        g = self.geom
        n_rows = g.nkb if transposed else g.nqb
        names = ("q" if transposed else "kv")
        parts, ranges = [], []
        for grp in self.groups:
            pptr, pidx, rptr, rs, re = _lists(grp, transposed)
            parts.append((np.diff(pptr).astype(np.int32), _pack(pptr, pidx, n_rows)))
            ranges.append((np.diff(rptr).astype(np.int32), _pack(rptr, np.stack([rs, re], axis=-1), n_rows)))
        pw = max(p[1].shape[1] for p in parts)
        rw = max(r[1].shape[1] for r in ranges)
        Bm, Hm = self.group_index.shape
        out = {f"{names}_num_blocks": torch.zeros(Bm, Hm, n_rows, dtype=torch.int32),
               f"{names}_indices": torch.zeros(Bm, Hm, n_rows, pw, dtype=torch.int32),
               f"full_{names}_num_ranges": torch.zeros(Bm, Hm, n_rows, dtype=torch.int32),
               f"full_{names}_ranges": torch.zeros(Bm, Hm, n_rows, rw, 2, dtype=torch.int32)}
        for (bi, hi), gid in np.ndenumerate(self.group_index):
            (pn, pi), (rn, ri) = parts[gid], ranges[gid]
            out[f"{names}_num_blocks"][bi, hi] = torch.from_numpy(pn)
            out[f"{names}_indices"][bi, hi, :, : pi.shape[1]] = torch.from_numpy(pi)
            out[f"full_{names}_num_ranges"][bi, hi] = torch.from_numpy(rn)
            out[f"full_{names}_ranges"][bi, hi, :, : ri.shape[1]] = torch.from_numpy(ri)
        return out

    def to_block_mask(self):
        """Export as a FlexAttention ``BlockMask`` (needs torch >= 2.5)."""
        from torch.nn.attention.flex_attention import BlockMask

        if self.geom.q_start:
            raise LayoutError(f"a layout of query rows at offset q_start={self.geom.q_start} has no BlockMask "
                              "export (FlexAttention places queries at 0); build it with q_start=0")
        t = self.bcsr(pad_to=self.geom.nkb)
        mask_mod = _flex_mask_mod(self)
        return BlockMask.from_kv_blocks(
            t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"], t["full_kv_indices"],
            BLOCK_SIZE=(self.block_m, self.block_n), mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len))

    @staticmethod
    def from_block_mask(block_mask) -> BlockLayout:
        """Import a FlexAttention ``BlockMask`` (its mask_mod becomes an opaque pattern)."""
        bm, bn = block_mask.BLOCK_SIZE
        q_len, kv_len = block_mask.seq_lengths
        g = Geometry(int(q_len), int(kv_len), int(bm), int(bn))
        num, idx = block_mask.kv_num_blocks.cpu().numpy(), block_mask.kv_indices.cpu().numpy()
        # A per-(batch, head) BlockMask may have a mask_mod that reads b/h in ways tracing cannot
        # see: declare the dependence so each group evaluates its partial blocks at its own b, h.
        pat = mask(block_mask.mask_mod, per_batch=num.shape[0] > 1, per_head=num.shape[1] > 1)
        has_full = block_mask.full_kv_num_blocks is not None
        fnum = block_mask.full_kv_num_blocks.cpu().numpy() if has_full else np.zeros_like(num)
        fidx = block_mask.full_kv_indices.cpu().numpy() if has_full else idx
        Bm, Hm = num.shape[:2]
        groups, gindex = [], np.zeros((Bm, Hm), dtype=np.int64)
        for bi in range(Bm):
            for hi in range(Hm):
                rows, cols, kinds = [], [], []
                for i in range(min(num.shape[2], g.nqb)):
                    cp, cf = idx[bi, hi, i, : num[bi, hi, i]], fidx[bi, hi, i, : fnum[bi, hi, i]]
                    rows += [i] * (len(cp) + len(cf))
                    cols += list(cp) + list(cf)
                    kinds += [PARTIAL] * len(cp) + [FULL] * len(cf)
                bs = BlockSet.make(g, rows, cols, kinds)
                gindex[bi, hi] = len(groups)
                groups.append(to_blocks2d(bs, pat.specialize(bi, hi)))
        return BlockLayout(pat, g, tuple(groups), gindex)

    def __repr__(self) -> str:
        g = self.geom
        return (f"BlockLayout({self.pattern!r}, q_len={g.q_len}, kv_len={g.kv_len}, "
                f"block=({g.block_m}, {g.block_n}), blocks={self.num_blocks} "
                f"(full {self.num_full}, partial {self.num_partial}), groups={len(self.groups)})")


def _flex_mask_mod(layout: BlockLayout):
    """A FlexAttention ``mask_mod`` for the layout's pattern.

    FlexAttention traces mask_mods (vmap, dynamo) with tensor ``b``/``h``, so nothing may turn
    them into Python ints (as ``PerHead.specialize`` does) or build numpy tables per call (as
    buffer-backed predicates do): each group's predicate is built once here (``to_mask_mod``
    captures its buffers), and the group is selected per (b, h) with tensor ops.
    """
    from ..ir.transform import to_mask_mod

    q_len, kv_len = layout.q_len, layout.kv_len

    def one(grp: Blocks2D):
        e = grp.pattern.predicate(q_len, kv_len)
        if e is None:  # opaque: the specialized pattern calls the user's tensor function
            return lambda b, h, q, k: grp.pattern.evaluate(b, h, q, k, q_len, kv_len)
        fn = to_mask_mod(e)

        def f(b, h, q, k):
            out = torch.as_tensor(fn(b, h, q, k)).to(torch.bool)
            return out & torch.ones_like(q - k, dtype=torch.bool)  # broadcast constants

        return f

    fns = [one(grp) for grp in layout.groups]
    if len(fns) == 1:
        return fns[0]
    gindex = torch.from_numpy(layout.group_index.copy())  # [Bm, Hm]
    Bm, Hm = gindex.shape

    def mask_mod(b, h, q_idx, kv_idx):
        gid = gindex[b % Bm, h % Hm]
        out = fns[0](b, h, q_idx, kv_idx)
        for i in range(1, len(fns)):
            out = torch.where(gid == i, fns[i](b, h, q_idx, kv_idx), out)
        return out

    return mask_mod


def _lists(grp: Blocks2D, transposed: bool):
    """``(part_ptr, part_idx, range_ptr, range_start, range_end)`` of a group, per query row or
    (transposed) per key column, straight from its ranges."""
    if transposed:
        pptr, pidx = grp.csc_partial
        rptr, rs, re = grp.csc_ranges
        return pptr, pidx, rptr, rs, re
    return grp.part_ptr, grp.part_cols, grp.range_ptr, grp.range_start, grp.range_end


def _pack(ptr: np.ndarray, vals: np.ndarray, n_rows: int) -> np.ndarray:
    """CSR ``(ptr, vals)`` -> ``[n_rows, width, ...]`` int32, rows padded with 0 to the longest."""
    counts = np.diff(ptr)
    width = max(int(counts.max()) if n_rows else 0, 1)
    out = np.zeros((n_rows, width) + vals.shape[1:], dtype=np.int32)
    r = np.repeat(np.arange(n_rows), counts)
    out[r, np.arange(len(r)) - ptr[:-1][r]] = vals
    return out


def _ell(pptr, pidx, rptr, rs, re, n_rows):
    """Padded partial and full index lists; the full lists expand the ranges (the output's size)."""
    fr, fc = pairs_from_ranges(np.repeat(np.arange(n_rows), np.diff(rptr)), rs, re - 1)
    fptr = np.concatenate([[0], np.cumsum(np.bincount(fr, minlength=n_rows))]).astype(np.int64)
    return (np.diff(pptr).astype(np.int32), _pack(pptr, pidx, n_rows),
            np.diff(fptr).astype(np.int32), _pack(fptr, fc, n_rows))


def to_blocks2d(bs: BlockSet, pattern: Pattern) -> Blocks2D:
    """Full segments become ranges, partial segments an explicit list."""
    if (bs.seg_kind == UNKNOWN).any():
        raise LayoutError(f"internal error: unrefined blocks in the final layout of {pattern!r}")
    g = bs.geom
    full = bs.seg_kind == FULL
    fr, fs, fe = bs.seg_row[full], bs.seg_start[full], bs.seg_end[full]
    pr, pc, _ = segments_to_blocks(bs.seg_row[~full], bs.seg_start[~full], bs.seg_end[~full], bs.seg_kind[~full])

    def ptr(rows: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=g.nqb))]).astype(np.int64)

    return Blocks2D(g, pattern, ptr(fr), fs, fe, ptr(pr), pc)


def _check_blocks(block_m, block_n):
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise LayoutError(f"{name}={v!r} must be a positive integer")


@functools.lru_cache(maxsize=128)
def build_layout(pattern: Pattern, q_len: int, kv_len: int, block_m: int = 64, block_n: int = 64,
                 *, batch: int = 1, heads: int = 1, q_start: int = 0) -> BlockLayout:
    """Build (and cache, bounded LRU) the exact block layout of a mask pattern.

    Args:
        pattern: a mask pattern.
        q_len, kv_len: sequence lengths; need not be multiples of the block sizes.
        block_m, block_n: query and key block sizes.
        batch, heads: sizes used only when the pattern depends on the batch entry or head.
        q_start: absolute position of query row 0 (decoding, chunked prefill): the layout holds
            rows ``q_start .. q_start + q_len - 1`` of the pattern at query length
            ``q_start + q_len``, built in time proportional to those rows' blocks.
    """
    require_mask(pattern, "a block layout")
    check_lengths(q_len, kv_len)
    _check_blocks(block_m, block_n)
    for name, v in (("batch", batch), ("heads", heads)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise LayoutError(f"{name}={v!r} must be a positive integer")
    if isinstance(q_start, bool) or not isinstance(q_start, (int, np.integer)) or q_start < 0:
        raise LayoutError(f"q_start={q_start!r} must be a non-negative integer")
    pattern.validate(q_start + q_len, kv_len)
    check_batch_head_dependence(pattern, batch, heads, q_start + q_len, kv_len)  # opaque mask_mods that did not say
    g = Geometry(int(q_len), int(kv_len), int(block_m), int(block_n), int(q_start))
    _check_layout_size(g)
    try:
        return _build_layout(pattern, g, batch, heads)
    except MemoryError:
        raise LayoutError(f"the block layout of {pattern!r} at q_len={q_len}, kv_len={kv_len} with blocks "
                          f"{block_m}x{block_n} does not fit in memory (up to {g.nqb} x {g.nkb} blocks, about "
                          f"{format_bytes(g.nqb * g.nkb * _BYTES_PER_BLOCK)} if dense); use larger blocks or "
                          "shorter sequences") from None


# Bytes per query-block row or key-block column (row pointers and per-row temporaries of the
# analytic classifiers) and per listed block (CSR and CSC indices, kinds, sort keys).
_BYTES_PER_ROW = 64
_BYTES_PER_BLOCK = 48


def _check_layout_size(g: Geometry) -> None:
    """Refuse, before allocating, a layout whose per-row tables alone cannot fit."""
    check_budget(f"a block layout at q_len={g.q_len}, kv_len={g.kv_len} with blocks {g.block_m}x{g.block_n} "
                 f"({g.nqb} x {g.nkb} blocks; up to {format_bytes(g.nqb * g.nkb * _BYTES_PER_BLOCK)} when "
                 "every block is listed)", (g.nqb + g.nkb) * _BYTES_PER_ROW,
                 "use larger blocks (block_m, block_n) or shorter sequences")


def _build_layout(pattern: Pattern, g: Geometry, batch: int, heads: int) -> BlockLayout:
    period = pattern.head_period
    Hm = 1 if period == 1 else (heads if period is None else min(heads, period))
    Bm = batch if pattern.batch_dependent else 1
    groups: list[Blocks2D] = []
    seen: dict[Pattern, int] = {}
    gindex = np.zeros((Bm, Hm), dtype=np.int64)
    for bi in range(Bm):
        for hi in range(Hm):
            spec = pattern.specialize(bi, hi)
            if spec not in seen:
                seen[spec] = len(groups)
                groups.append(to_blocks2d(block_set(spec, g, bi, hi), spec))
            gindex[bi, hi] = seen[spec]
    if period not in (None, 1) and heads > Hm:  # repeat the head cycle up to `heads`
        gindex = gindex[:, np.arange(heads) % Hm]
    return BlockLayout(pattern, g, tuple(groups), gindex)
