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
from .block_sets import EVAL_CHUNK, EMPTY, FULL, PARTIAL, UNKNOWN, BlockSet, Geometry, block_set  # noqa: F401
from ..errors import LayoutError
from ..dsl.memory_limits import check_budget, format_bytes
from ..dsl.mask_mod import check_batch_head_dependence, mask

# ---------------------------------------------------------------------------------------------
# BCSR layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Blocks2D:
    """One group's layout in CSR (by query block) and CSC (by key block) form, numpy int64."""

    geom: Geometry
    pattern: Pattern
    row_ptr: np.ndarray
    cols: np.ndarray
    full: np.ndarray

    @functools.cached_property
    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.geom.nqb), np.diff(self.row_ptr))

    @functools.cached_property
    def csc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(col_ptr, rows, full)`` sorted by key block, for the backward pass."""
        order = np.lexsort((self.rows, self.cols))
        col_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.cols, minlength=self.geom.nkb))])
        return col_ptr, self.rows[order], self.full[order]

    @property
    def num_blocks(self) -> int:
        return len(self.cols)

    @property
    def num_full(self) -> int:
        return int(self.full.sum())

    def allowed_pairs(self) -> int:
        """Number of allowed (q, k) pairs (exact: evaluates partial blocks)."""
        g = self.geom
        rows, cols = self.rows, self.cols
        sizes = (g.q_hi(rows) - g.q_lo(rows) + 1) * (g.k_hi(cols) - g.k_lo(cols) + 1)
        total = int(sizes[self.full].sum())
        partial = np.flatnonzero(~self.full)
        per = max(1, EVAL_CHUNK // (g.block_m * g.block_n))  # bounded temporary memory
        for s in range(0, len(partial), per):
            total += int(partial_masks(self, partial[s:s + per]).sum())
        return total


def partial_masks(blocks: Blocks2D, which: np.ndarray, device="cpu") -> torch.Tensor:
    """Element masks ``[len(which), BM, BN]`` of the given blocks (out-of-range elements False)."""
    g = blocks.geom
    rows, cols = blocks.rows[which], blocks.cols[which]
    q = torch.from_numpy(g.q_lo(rows)).to(device)[:, None] + torch.arange(g.block_m, device=device)
    k = torch.from_numpy(g.k_lo(cols)).to(device)[:, None] + torch.arange(g.block_n, device=device)
    valid = (q < g.q_len)[:, :, None] & (k < g.kv_len)[:, None, :]
    m = blocks.pattern.evaluate(0, 0, q.clamp_max(g.q_len - 1)[:, :, None], k.clamp_max(g.kv_len - 1)[:, None, :],
                                g.q_len, g.kv_len)
    return m & valid


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
        per_group = []
        for grp in self.groups:
            if transposed:
                ptr, idx, full = grp.csc
            else:
                ptr, idx, full = grp.row_ptr, grp.cols, grp.full
            per_group.append(_ell(ptr, idx, full, n_rows))
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

    def to_block_mask(self):
        """Export as a FlexAttention ``BlockMask`` (needs torch >= 2.5)."""
        from torch.nn.attention.flex_attention import BlockMask

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


def _ell(ptr, idx, full, n_rows):
    counts_p = np.zeros(n_rows, dtype=np.int64)
    counts_f = np.zeros(n_rows, dtype=np.int64)
    row_of = np.repeat(np.arange(n_rows), np.diff(ptr))
    np.add.at(counts_p, row_of[~full], 1)
    np.add.at(counts_f, row_of[full], 1)

    def pack(sel, counts):
        width = int(counts.max()) if n_rows else 0
        out = np.zeros((n_rows, max(width, 1)), dtype=np.int32)
        r = row_of[sel]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(len(r)) - starts[r]
        out[r, pos] = idx[sel]
        return out

    return (counts_p.astype(np.int32), pack(~full, counts_p), counts_f.astype(np.int32), pack(full, counts_f))


def to_blocks2d(bs: BlockSet, pattern: Pattern) -> Blocks2D:
    assert not (bs.kind == UNKNOWN).any(), "unrefined blocks in a final layout"
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(bs.rows, minlength=bs.geom.nqb))])
    return Blocks2D(bs.geom, pattern, row_ptr, bs.cols, bs.kind == FULL)


def _check_blocks(block_m, block_n):
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise LayoutError(f"{name}={v!r} must be a positive integer")


@functools.lru_cache(maxsize=128)
def build_layout(pattern: Pattern, q_len: int, kv_len: int, block_m: int = 64, block_n: int = 64,
                 *, batch: int = 1, heads: int = 1) -> BlockLayout:
    """Build (and cache) the exact block layout of a mask pattern.

    Args:
        pattern: a mask pattern.
        q_len, kv_len: sequence lengths; need not be multiples of the block sizes.
        block_m, block_n: query and key block sizes.
        batch, heads: sizes used only when the pattern depends on the batch entry or head.
    """
    require_mask(pattern, "a block layout")
    check_lengths(q_len, kv_len)
    _check_blocks(block_m, block_n)
    for name, v in (("batch", batch), ("heads", heads)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise LayoutError(f"{name}={v!r} must be a positive integer")
    pattern.validate(q_len, kv_len)
    check_batch_head_dependence(pattern, batch, heads, q_len, kv_len)  # opaque mask_mods that did not say
    g = Geometry(int(q_len), int(kv_len), int(block_m), int(block_n))
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
